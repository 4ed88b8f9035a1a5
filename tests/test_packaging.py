"""Packaging: one import namespace, every package folder shipped, the runtime free of torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared_packages() -> dict[str, Path]:
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    result = {}
    for name in setuptools["packages"]:
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):
            prefix = ".".join(parts[:depth])
            if prefix in mapping:
                result[name] = ROOT / mapping[prefix] / Path(*parts[depth:])
                break
    return result


def test_every_package_folder_is_declared() -> None:
    declared = {path.resolve() for path in _declared_packages().values()}
    for top in ("runtime", "train", "convert", "grammars", "configs"):
        for init in (ROOT / top).rglob("__init__.py"):
            assert init.parent.resolve() in declared, f"{init.parent} is not in pyproject's package list"


def test_no_top_level_runtime_train_convert_modules() -> None:
    for name in _declared_packages():
        assert name.startswith("vlm2vla_edge."), name


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "import vlm2vla_edge.runtime.cli, vlm2vla_edge.runtime.parser, vlm2vla_edge.runtime.safety\n"
        "import vlm2vla_edge.runtime.episode, vlm2vla_edge.runtime.sim.world, vlm2vla_edge.runtime.robot.devices\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
