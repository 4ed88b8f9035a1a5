"""Packaging: one import namespace, every package folder shipped, the runtime free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

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


def test_every_data_file_is_package_data() -> None:
    """A template or grammar that `[tool.setuptools.package-data]` misses works in a checkout (and in an editable
    install) but is absent from a wheel: every non-Python file in a package folder must match a pattern there."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, timeout=60)
    if listed.returncode != 0:
        import pytest

        pytest.skip("not a git checkout")
    present = {ROOT / name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()}
    packages = sorted(_declared_packages().items(), key=lambda item: len(item[1].parts), reverse=True)
    package_data = PYPROJECT["tool"]["setuptools"].get("package-data", {})
    shipped = {path for name, folder in packages for pattern in package_data.get(name, [])
               for path in folder.glob(pattern)}
    unshipped = []
    for path in sorted(present):
        owner = next((name for name, folder in packages if folder in path.parents), None)
        if owner is not None and path.suffix != ".py" and path not in shipped:
            unshipped.append(str(path.relative_to(ROOT)))
    assert not unshipped, f"not in [tool.setuptools.package-data], so missing from a wheel: {unshipped}"
