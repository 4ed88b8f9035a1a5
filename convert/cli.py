"""`vlm2vla-edge convert` (and `python convert/merge_quantize.py`): base + LoRA adapter -> model bundle.

The main CLI mounts `convert_command` as `convert` (`app.command("convert")(convert_command)`); `app` is
the same command as a standalone typer app, which `python convert/merge_quantize.py` runs. torch, transformers and
the converter are imported only when the command runs, so `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlm2vla_edge.runtime.cli_support import run_typer_app
from vlm2vla_edge.runtime.errors import UserError

_QUANT_HELP = ("Quantisation of the text model: Q4_K_M (default), Q5_K_M, Q8_0, Q4_0, Q4_K_S, Q6_K, F16 or F32. "
               "--mode adapter keeps a quantised GGUF base as it is (default: its own type).")


def convert_command(
    base: Annotated[
        Path,
        typer.Option(
            help="Base model the adapter was trained on: a Gemma-3 Hugging Face folder (vision or text) "
            "or a Gemma-3 text GGUF file (loaded through transformers, dequantised)."
        ),
    ],
    adapter: Annotated[
        Path, typer.Option(help="LoRA adapter folder (peft save_pretrained: adapter_config.json + weights).")
    ],
    out: Annotated[
        Path, typer.Option(help="Bundle folder to write (model-<quant>.gguf, mmproj-f16.gguf, manifest.json).")
    ],
    quant: Annotated[Optional[str], typer.Option(help=_QUANT_HELP)] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="merge: bake the adapter into the weights and quantise (one model per skill). adapter: keep "
            "the base as it is (a quantised GGUF base untouched; a Hugging Face base quantised once) and "
            "write the adapter as a LoRA GGUF that llama.cpp applies at run time (one base, many skills)."
        ),
    ] = "merge",
    adapter_name: Annotated[
        Optional[str],
        typer.Option(
            help="--mode adapter: the adapter's name in the bundle, which tasks use "
                 "(default: the adapter folder's name)."
        ),
    ] = None,
    add: Annotated[
        bool,
        typer.Option(
            "--add", help="--mode adapter: add the adapter to the base + adapters bundle at --out (same base)."
        ),
    ] = False,
    make_default: Annotated[
        bool, typer.Option("--make-default", help="--mode adapter --add: tasks that name no adapter get this one.")
    ] = False,
    min_adapter_top1: Annotated[
        float,
        typer.Option(
            help="--mode adapter: least top-1 agreement of base + run-time LoRA with the merged F16 reference."
        ),
    ] = 0.95,
    dataset: Annotated[
        Optional[Path],
        typer.Option(
            help="Labelled dataset folder (samples.jsonl) to take held-out validation prompts from; "
            "default: a built-in set of action prompts."
        ),
    ] = None,
    name: Annotated[
        Optional[str], typer.Option(help="Bundle name in the manifest (default: the --out folder name).")
    ] = None,
    base_model_id: Annotated[
        Optional[str],
        typer.Option(
            help="Base model id for the manifest, e.g. google/gemma-3-4b-it "
                 "(default: from the training card, else the --base name)."
        ),
    ] = None,
    vocab_gguf: Annotated[
        Optional[Path],
        typer.Option(
            help="A GGUF with the model's vocabulary, to rebuild tokenizer.model when the base folder has none."
        ),
    ] = None,
    reference_type: Annotated[
        str, typer.Option(help="Unquantised GGUF validated against transformers and quantised from: f16 or f32.")
    ] = "f16",
    min_top1: Annotated[
        float, typer.Option(help="(a) Least top-1 next-token agreement, reference GGUF vs transformers.")
    ] = 0.99,
    max_logit_diff: Annotated[
        float, typer.Option(help="(a) Largest |logit difference| allowed at any checked position.")
    ] = 2.0,
    min_chunk_agreement: Annotated[
        float, typer.Option(help="(b) Least share of prompts whose quantised action chunk agrees with the reference's.")
    ] = 0.75,
    chunk_tolerance_cm: Annotated[
        float,
        typer.Option(help="(b) Two chunks agree when lengths and grippers match and translations are this close."),
    ] = 1.0,
    max_mean_diff_cm: Annotated[float, typer.Option(help="(b) Largest mean |translation difference| in cm.")] = 1.0,
    max_prompts: Annotated[int, typer.Option(help="Validation prompts to use (spread over --dataset).", min=1)] = 8,
    threads: Annotated[
        Optional[int], typer.Option(help="CPU threads for llama.cpp (default: all cores).", min=1)
    ] = None,
    work_dir: Annotated[
        Optional[Path],
        typer.Option(
            help="Where the temporary work folder goes (default: next to --out); needs ~10 bytes per parameter."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Merge a LoRA adapter into its base, convert to GGUF, quantise, validate and write a model bundle;
    or (--mode adapter) keep the base and ship the adapter as a LoRA GGUF applied at run time.

    Validation: (a) the unquantised GGUF against the merged transformers model (top-1 next-token agreement,
    largest logit difference, teacher-forced over the action prompt and its answer); (b) the quantised model
    against the unquantised one (greedy action chunks through the runtime decoder and the action grammar).
    Figures go into the manifest; a missed threshold exits 1 and writes no bundle. Exit 2: a usage mistake.
    """
    from vlm2vla_edge.convert.merge_quantize import ConvertOptions, convert
    from vlm2vla_edge.convert.validate import Thresholds

    for label, value in (
        ("--min-top1", min_top1),
        ("--min-chunk-agreement", min_chunk_agreement),
        ("--min-adapter-top1", min_adapter_top1),
    ):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{label} must be between 0 and 1, not {value}")
    options = ConvertOptions(
        base=base,
        adapter=adapter,
        out=out,
        quant=quant,
        mode=mode.lower(),
        adapter_name=adapter_name,
        add=add,
        make_default=make_default,
        dataset=dataset,
        name=name,
        base_model_id=base_model_id,
        vocab_gguf=vocab_gguf,
        reference_type=reference_type.lower(),
        thresholds=Thresholds(
            min_top1_agreement=min_top1,
            max_logit_diff=max_logit_diff,
            min_chunk_agreement=min_chunk_agreement,
            chunk_tolerance_cm=chunk_tolerance_cm,
            max_mean_abs_diff_cm=max_mean_diff_cm,
            min_adapter_top1_agreement=min_adapter_top1,
        ),
        max_prompts=max_prompts,
        n_threads=threads,
        overwrite=overwrite,
        work_dir=work_dir,
    )
    result = convert(options, progress=lambda line: typer.echo(line))
    figures = ", ".join(f"{k}={v:g}" for k, v in result.report.figures.items() if not k.startswith("threshold_"))
    typer.echo(f"validation: {figures}")
    adapters = result.bundle.adapters
    typer.echo(
        f"bundle written: {result.bundle.root} ({result.bundle.manifest.quant_type}"
        + (
            f" base + LoRA adapters {', '.join(adapters)}; default {result.bundle.default_adapter})"
            if adapters
            else ")"
        )
    )


app = typer.Typer(
    name="convert",
    help="Merge a LoRA adapter, convert to GGUF, quantise, validate, write a model bundle.",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("convert")(convert_command)


def run_app(argv: list[str] | None = None, prog_name: str = "convert") -> int:
    """Run `app` standalone: user mistakes exit 2 and failed checks exit 1, each with one line on stderr."""
    return run_typer_app(app, argv, prog_name)
