"""Which config model a file on the command line is (`config check/show --kind auto`).

A user passes a path or a preset name; the kind is guessed from where the file lives, then from the
fields it sets, then from its name, so `config check configs/robots/x.yaml` needs no `--kind`. A file
that gives no clue is a usage error naming the option that settles it.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import yaml
from pydantic import BaseModel

from vlm2vla_edge.runtime.errors import UserError


class ConfigKind(str, Enum):
    auto = "auto"
    robot = "robot"
    policy = "policy"
    runtime = "runtime"


def config_model(kind: ConfigKind, path: str) -> type[BaseModel]:
    """The config model for `path`: `kind` itself, or (auto) the one the file's place, fields or name point to."""
    from vlm2vla_edge.runtime import config
    from vlm2vla_edge.runtime.runtime_config import RuntimeConfig

    models: dict[str, type[BaseModel]] = {
        "robot": config.RobotConfig, "policy": config.PolicyConfig, "runtime": RuntimeConfig,
    }
    if kind != ConfigKind.auto:
        return models[kind.value]
    as_path = Path(path)
    if as_path.parent.name == "robots" or (as_path.suffix == "" and path in config.preset_names(config.RobotConfig)):
        return config.RobotConfig
    if as_path.is_file():
        try:
            data = yaml.safe_load(as_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None  # load_config reports the precise problem
        if isinstance(data, dict):
            if "model" in data or "workspace" in data:
                return config.RobotConfig
            if "sampling" in data or "action_language" in data:
                return config.PolicyConfig
            if "episodes_dir" in data or "robot" in data:
                return RuntimeConfig
    if as_path.stem in ("policy", "runtime"):
        return models[as_path.stem]
    raise UserError(f"cannot tell what kind of config '{path}' is; pass --kind robot|policy|runtime")
