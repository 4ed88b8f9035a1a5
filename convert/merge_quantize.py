"""Base model + LoRA adapter -> validated model bundle: merge, convert to GGUF, quantise, validate, write.

    python convert/merge_quantize.py --base BASE --adapter ADAPTER --out BUNDLE [--quant Q4_K_M] ...
    vlm2vla-edge convert --base BASE --adapter ADAPTER --out BUNDLE ...

Phases (each prints one progress line with its time):

1. check: the converter's `gguf` module, the base, the adapter, the destination, free disk space;
2. merge: load the base as training did, merge the adapter (peft `merge_and_unload`), save a
   converter-ready Hugging Face folder (convert/hf_folder.py: the converter's quirks);
3. convert: text model to an F16 GGUF (F32 if F16 fails or is asked for), vision projector to F16;
4. validate (a): the F16 GGUF against the merged transformers model (top-1 agreement, logit diff);
5. quantise: llama.cpp's quantiser, default Q4_K_M (the projector stays F16);
6. validate (b): quantised against F16 action chunks through the runtime decoder and grammar;
7. write: `write_bundle` moves the files into the bundle folder atomically with the manifest.

Everything happens in a hidden work folder next to the destination, removed at the end whatever
happens: a failure (or failed validation) leaves no bundle and no half-written files. Exit codes: 0
bundle written, 1 validation or conversion failed, 2 user mistake (one sentence).
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

try:
    from vlm2vla_edge.convert.validate import Thresholds, ValidationReport
except ImportError as _missing:  # run as a script by an interpreter without the package installed
    if __name__ == "__main__":
        import sys

        print(
            f"error: vlm2vla-edge is not installed for this Python ({_missing}); run 'bash .ci/setup', then "
            "'.venv/bin/python convert/merge_quantize.py ...'",
            file=sys.stderr,
        )
        sys.exit(2)
    raise
from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError

Progress = Callable[[str], None]


class ValidationFailed(Vlm2VlaError):
    """The converted model does not behave like the trained one; no bundle was written (exit 1)."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__("validation failed, no bundle written: " + "; ".join(report.failures))


@dataclass(frozen=True)
class ConvertOptions:
    """Everything one conversion needs; the CLI fills it from its options."""

    base: Path
    adapter: Path
    out: Path
    quant: str = "Q4_K_M"
    dataset: Path | None = None
    name: str | None = None
    base_model_id: str | None = None
    vocab_gguf: Path | None = None
    reference_type: str = "f16"  # the unquantised GGUF validated against transformers: f16 or f32
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_prompts: int = 8
    n_threads: int | None = None
    overwrite: bool = False
    work_dir: Path | None = None  # parent of the temporary work folder (default: next to `out`)


@dataclass
class ConvertResult:
    bundle: Any  # runtime.policy.bundle.Bundle
    report: ValidationReport
    phase_seconds: dict[str, float]
    tensor_types: dict[str, int]


class _Phases:
    """Numbered progress lines with the time each phase took."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.total = total
        self.index = 0
        self.seconds: dict[str, float] = {}

    def run(self, name: str, what: str, fn: Callable[[], Any]) -> Any:
        self.index += 1
        self.progress(f"[{self.index}/{self.total}] {name}: {what}")
        t0 = time.monotonic()
        result = fn()
        self.seconds[name] = time.monotonic() - t0
        self.progress(f"[{self.index}/{self.total}] {name}: done in {self.seconds[name]:.1f} s")
        return result


def count_parameters(base: Any) -> int:
    """Number of weights of the base (from the GGUF header or the safetensors headers, no loading)."""
    from vlm2vla_edge.runtime.policy.bundle import read_gguf_header

    if base.path.is_file():
        total = 0
        for tensor in read_gguf_header(base.path).tensors:
            n = 1
            for dim in tensor.shape:
                n *= dim
            total += n
        return total
    from safetensors import safe_open

    total = 0
    for path in base.path.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                n = 1
                for dim in handle.get_slice(key).get_shape():
                    n *= dim
                total += n
    if total == 0:  # *.bin only: bytes / 2 is a fair guess for a bf16/f16 checkpoint
        total = base.size_bytes // 2
    return total


def estimate_disk_bytes(n_params: int, reference_type: str) -> int:
    """Peak bytes the work folder needs: merged float32 folder + reference GGUF + quantised GGUF (at most
    F16 size) + 10% for tokenizer, projector and headers."""
    reference = n_params * (4 if reference_type == "f32" else 2)
    return int((n_params * 4 + reference + n_params * 2) * 1.1)


def _check_destination(options: ConvertOptions) -> None:
    from vlm2vla_edge.runtime.policy.bundle import BundleError

    if options.out.exists() and not options.overwrite:
        raise BundleError(f"{options.out} already exists; pass --overwrite to replace it")
    if options.out.exists() and not options.out.is_dir():
        raise BundleError(f"{options.out} exists and is not a folder")


def adapter_fields(
    adapter: Any, base_path: Path, base_model_id: str | None = None, dataset: Path | None = None
) -> dict[str, Any]:
    """Base id, prompts and action language of an adapter (`AdapterInfo`): from its training card, and the
    dataset when the card does not say; the same for merged bundles and run-time adapters, so whatever
    the training recorded (a new action language, new templates) reaches the runtime unchanged."""
    from vlm2vla_edge.runtime.config import ActionLanguage
    from vlm2vla_edge.runtime.policy.bundle import runtime_grammar_version
    from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, PromptTemplates

    card = adapter.training_card or {}
    base_id = base_model_id or (card.get("base_model") or {}).get("id") or base_path.name
    templates = ((card.get("prompts") or {}).get("templates")) or None
    prompts = PromptTemplates.model_validate(templates) if templates else DEFAULT_PROMPTS
    language_data = (card.get("dataset") or {}).get("action_language")
    if language_data is None and dataset is not None:
        info = dataset / "dataset.json"
        if info.is_file():
            language_data = json.loads(info.read_text(encoding="utf-8")).get("action_language")
    language = ActionLanguage.model_validate(language_data) if language_data else ActionLanguage(
        grammar_version=runtime_grammar_version()
    )
    trained_base = {k: v for k, v in ((card.get("base_model") or {}).get("sha256") or {}).items() if isinstance(v, str)}
    return {"base_model": base_id, "prompts": prompts, "action_language": language, "trained_base_sha256": trained_base}


def _manifest_fields(options: ConvertOptions, adapter: Any, base: Any) -> dict[str, Any]:
    return adapter_fields(adapter, base.path, options.base_model_id, options.dataset)


def convert(options: ConvertOptions, progress: Progress = print) -> ConvertResult:
    """Run every phase; returns the written bundle, or raises (UserError: exit 2; others: exit 1)."""
    from vlm2vla_edge.convert.converter import check_gguf_module
    from vlm2vla_edge.convert.merge import check_card_base, read_adapter, resolve_base
    from vlm2vla_edge.convert.quantize import normalize_quant

    if options.reference_type not in ("f16", "f32"):
        raise UserError(f"--reference-type must be f16 or f32, not '{options.reference_type}'")
    quant = normalize_quant(options.quant)
    check_gguf_module()
    base = resolve_base(options.base)
    adapter = read_adapter(options.adapter)
    check_card_base(adapter, base)
    _check_destination(options)
    if options.dataset is not None and not (options.dataset / "samples.jsonl").is_file():
        raise UserError(f"--dataset {options.dataset} has no samples.jsonl")
    fields = _manifest_fields(options, adapter, base)

    parent = Path(options.work_dir or options.out.parent).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    needed = estimate_disk_bytes(count_parameters(base), options.reference_type)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise UserError(
            f"{parent} has {free / 1e9:.1f} GB free but the conversion needs about {needed / 1e9:.1f} GB; "
            "free some space or give --work-dir on a larger disk"
        )
    progress(
        f"base {base.path} ({base.kind}), adapter {adapter.path} (sha256 {adapter.sha256[:12]}), quant {quant}, "
        f"work space ~{needed / 1e9:.2f} GB of {free / 1e9:.1f} GB free"
    )
    work = Path(tempfile.mkdtemp(prefix=f".{options.out.name}.convert-", dir=parent))
    try:
        return _run(options, quant, base, adapter, fields, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    options: ConvertOptions, quant: str, base: Any, adapter: Any, fields: dict[str, Any], work: Path, progress: Progress
) -> ConvertResult:
    from vlm2vla_edge.convert import validate as V
    from vlm2vla_edge.convert.converter import ConversionError, run_converter
    from vlm2vla_edge.convert.merge import load_base_model, merge_adapter, save_merged
    from vlm2vla_edge.convert.quantize import quantize_gguf
    from vlm2vla_edge.runtime.policy.bundle import write_bundle
    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder

    import transformers

    transformers.utils.logging.set_verbosity_error()  # our progress lines say what happens
    transformers.utils.logging.disable_progress_bar()
    phases = _Phases(progress, 6)
    merged_dir = work / "merged"

    def merge() -> Any:
        model = merge_adapter(load_base_model(base), adapter, base)
        fixes = save_merged(model, base, merged_dir, vocab_gguf=options.vocab_gguf)
        progress(f"  converter quirks: {fixes.describe()}")
        return model

    model = phases.run("merge", "load the base, merge the adapter, save a converter-ready folder", merge)

    def convert_files() -> tuple[Path, Path | None, str]:
        outtype = options.reference_type
        text = work / f"text-{outtype}.gguf"
        try:
            run_converter(merged_dir, text, outtype=outtype)
        except ConversionError as exc:
            if outtype != "f16":
                raise
            progress(f"  F16 conversion failed, retrying as F32: {str(exc).splitlines()[0]}")
            outtype, text = "f32", work / "text-f32.gguf"
            run_converter(merged_dir, text, outtype=outtype)
        mmproj = None
        if base.vision:
            mmproj = work / "mmproj-f16.gguf"
            run_converter(merged_dir, mmproj, outtype="f16", mmproj=True)
        progress(f"  text model {text.stat().st_size / 1e6:.1f} MB ({outtype.upper()})"
                 + (f", projector {mmproj.stat().st_size / 1e6:.1f} MB" if mmproj else ""))
        return text, mmproj, outtype

    reference, mmproj, reference_type = phases.run("convert", "Hugging Face folder -> GGUF (llama.cpp converter)", convert_files)

    prompts = fields["prompts"]
    language = fields["action_language"]
    image_size = None
    image_spec = None
    if base.vision:
        from transformers import Gemma3ImageProcessorPil

        config = model.config
        image_size = int(config.vision_config.image_size)
        processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
        image_spec = V.ImageSpec(int(config.image_token_index), int(config.mm_tokens_per_image), processor)
    if options.dataset is not None:
        cases = V.dataset_cases(options.dataset, vision=base.vision, image_size=image_size, limit=options.max_prompts)
    else:
        cases = V.builtin_cases(vision=base.vision, image_size=image_size)[: options.max_prompts]
    report = ValidationReport(thresholds=options.thresholds)
    decoder_config = V.validation_decoder_config(options.n_threads)

    def validate_reference() -> None:
        decoder = LlamaDecoder(reference, decoder_config, mmproj_path=mmproj)
        try:
            report.logits = V.compare_logits(model, decoder, cases, prompts, image_spec, progress=progress)
        finally:
            decoder.close()
        progress(
            f"  {reference_type.upper()} vs transformers: top-1 agreement {report.logits.top1_agreement:.2%} over "
            f"{report.logits.positions} positions, max |logit diff| {report.logits.max_logit_diff:.4f}"
        )

    phases.run("validate-reference", f"{reference_type.upper()} GGUF vs the merged transformers model on {len(cases)} prompts",
               validate_reference)
    del model
    gc.collect()
    if report.failures:  # a wrong conversion is not worth quantising
        raise ValidationFailed(report)

    quantized = work / f"text-{quant.lower()}.gguf"

    def do_quantize() -> Any:
        result = quantize_gguf(reference, quantized, quant, n_threads=options.n_threads or 0)
        types = ", ".join(f"{k} x{v}" for k, v in result.tensor_types.items())
        progress(f"  {quant}: {result.size_bytes / 1e6:.1f} MB; tensor types: {types}")
        return result

    quant_result = phases.run("quantize", f"text model -> {quant} (llama.cpp)", do_quantize)

    def validate_quant() -> None:
        max_tokens = 512
        ref_decoder = LlamaDecoder(reference, decoder_config, mmproj_path=mmproj)
        try:
            ref_chunks = V.greedy_chunks(ref_decoder, cases, prompts, language, max_tokens)
        finally:
            ref_decoder.close()
        q_decoder = LlamaDecoder(quantized, decoder_config, mmproj_path=mmproj)
        try:
            q_chunks = V.greedy_chunks(q_decoder, cases, prompts, language, max_tokens)
        finally:
            q_decoder.close()
        report.chunks = V.compare_chunks(ref_chunks, q_chunks, options.thresholds.chunk_tolerance_cm)
        for ref, cand in zip(ref_chunks, q_chunks):
            progress(f"  {ref.source}: {reference_type.upper()} {ref.text[:60]!r} | {quant} {cand.text[:60]!r}")
        progress(
            f"  {quant} vs {reference_type.upper()}: chunk agreement {report.chunks.agreement:.2%} on "
            f"{report.chunks.prompts} prompts, mean |diff| {report.chunks.mean_abs_diff_cm:.3f} cm, max "
            f"{report.chunks.max_abs_diff_cm:.3f} cm"
        )

    phases.run("validate-quant", f"{quant} vs {reference_type.upper()} action chunks (greedy, action grammar)", validate_quant)
    if report.failures:
        raise ValidationFailed(report)

    def write() -> Any:
        validation = dict(report.figures)
        validation.update({f"seconds_{k.replace('-', '_')}": round(v, 3) for k, v in phases.seconds.items()})
        return write_bundle(
            options.out,
            text_model=quantized,
            mmproj=mmproj,
            name=options.name or options.out.name,
            base_model=fields["base_model"],
            quant_type=quant,
            prompts=prompts,
            action_language=language,
            adapter_sha256=adapter.sha256,
            validation=validation,
            move=True,
            overwrite=options.overwrite,
        )

    bundle = phases.run("write", f"bundle -> {options.out}", write)
    return ConvertResult(bundle, report, phases.seconds, quant_result.tensor_types)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`python convert/merge_quantize.py`): same options as `vlm2vla-edge convert`."""
    from vlm2vla_edge.convert.cli import run_app

    return run_app(argv, prog_name="merge_quantize.py")


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
