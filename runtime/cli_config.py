"""`vlm2vla-edge config check|show`: validate a config file and print it as the runtime sees it."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from vlm2vla_edge.runtime.config_kind import ConfigKind, config_model


def config_check(
    path: Annotated[str, typer.Argument(help="A YAML file, or a preset name such as 'widowx250s'.")],
    kind: Annotated[
        ConfigKind, typer.Option(help="What the file configures; auto guesses from its fields.")
    ] = ConfigKind.auto,
) -> None:
    """Validate a config file; exit 0 if valid, 2 with the file, field and allowed range if not."""
    from vlm2vla_edge.runtime.config import load_config, resolve_config_path

    model = config_model(kind, path)
    load_config(path, model)
    typer.echo(f"ok: {resolve_config_path(path, model)} is a valid {model.__name__}")


def config_show(
    path: Annotated[str, typer.Argument(help="A YAML file, or a preset name such as 'widowx250s'.")] = "widowx250s",
    kind: Annotated[
        ConfigKind, typer.Option(help="What the file configures; auto guesses from its fields.")
    ] = ConfigKind.auto,
) -> None:
    """Print a config with every default filled in, as the runtime sees it."""
    from vlm2vla_edge.runtime.config import load_config

    loaded = load_config(path, config_model(kind, path))
    typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False).rstrip())

