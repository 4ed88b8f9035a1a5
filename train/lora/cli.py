"""`vlm2vla-edge train`: LoRA fine-tuning from the command line (also `python -m vlm2vla_edge.train.lora`).

`app` has the command as its callback: the main CLI mounts it as `train`, and `__main__.py` runs it, so
`accelerate launch -m vlm2vla_edge.train.lora ...` takes the same options.
Torch is imported only when the command runs, so `--help` and the runtime CLI stay light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vlm2vla_edge.runtime.errors import UserError


def train_command(
    dataset: Annotated[Path, typer.Option(help="Labelled dataset folder (dataset.json + samples.jsonl).")],
    base: Annotated[
        Path,
        typer.Option(help="Base model: a Hugging Face folder (Gemma-3, vision or text) or a GGUF file (text only)."),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the adapter, checkpoints and training_card.json.")],
    config: Annotated[
        Optional[Path], typer.Option(help="Training YAML (default: the packaged configs/train/lora.yaml).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.")] = False,
) -> None:
    """Train a LoRA adapter on a labelled dataset; prints step, loss, tokens/s and ETA as it goes."""
    from vlm2vla_edge.train.lora.config import load_train_config

    train_config = load_train_config(config)  # config errors before any heavy import
    if not dataset.is_dir():
        raise UserError(f"--dataset {dataset} is not a folder")
    if not base.exists():
        raise UserError(f"--base {base} does not exist; give a Hugging Face model folder or a GGUF file")
    from vlm2vla_edge.train.lora.trainer import train

    result = train(dataset, base, out, train_config, resume=resume)
    if not result.main_process:
        return
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    typer.echo(
        f"done: {result.steps} steps, final loss {loss}, {result.tokens_per_s:.0f} tokens/s, "
        f"{result.wall_time_s:.1f} s; adapter in {result.out_dir}"
    )


# The command is the app's callback (no sub-commands), so both `vlm2vla-edge train --dataset ...` (the main
# CLI mounts `app` with add_typer) and `python -m vlm2vla_edge.train.lora --dataset ...` take the options directly.
app = typer.Typer(
    name="train",
    add_completion=False,
    pretty_exceptions_enable=False,
    invoke_without_command=True,
)
app.callback()(train_command)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m vlm2vla_edge.train.lora`): user mistakes exit 2 with one sentence."""
    from vlm2vla_edge.runtime.cli_support import run_typer_app

    return run_typer_app(app, argv, "vlm2vla_edge.train.lora")
