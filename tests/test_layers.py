"""The package's layers, enforced: which of our modules may import which, and no import cycles.

Every module of the installed package (runtime/, train/, convert/, grammars/, tests/support/, mapped to
`vlm2vla_edge.*` as pyproject.toml maps them) is parsed with `ast`, never imported. An import counts
wherever it is written: at module level, inside a function or method (a lazy import still runs, and
still ties the two modules together), and inside `if TYPE_CHECKING:` blocks (the type checker follows
them, and a reader does too). `from pkg import name` counts as an import of `pkg`, and of `pkg.name`
when that is a module. Not counted: imports by a string at run time (`__import__`, `importlib`), which
is how the command line mounts the optional training tools (`runtime/cli.py` `_mount_optional_subapps`):
that lookup tolerates their absence, which is the point of the layer. Nor are imports under
`if __name__ == "__main__":`: they run only when the file is the program, as `__main__`, a module
no other module imports.

The contracts (issue 16):
- runtime never imports train or convert (a robot computer installs the runtime alone);
- the robot-side core (runtime/robot, safety, policy, runner) never imports the simulator, the daemon
  or the command line: it runs the same on a real arm, in a test and in the daemon;
- grammars imports nothing of ours: the GBNF/Lark files and their loader are the shared language;
- no import cycles among our modules (counting function-level imports too);
- a helper is imported from the module that defines it, not through one that merely imports it
  (package `__init__` files, the packages' public faces, excepted);
- tests and bench import shared helpers as a package (`vlm2vla_edge.testing`), never by editing sys.path.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vlm2vla_edge"
# Folder -> package, as [tool.setuptools] package-dir maps them (configs holds no Python).
FOLDERS = {
    "runtime": "runtime",
    "train": "train",
    "convert": "convert",
    "grammars": "grammars",
    "tests/support": "testing",
}

RUNTIME = f"{PACKAGE}.runtime"
TRAIN_OR_CONVERT = (f"{PACKAGE}.train", f"{PACKAGE}.convert")
ROBOT_CORE = (f"{RUNTIME}.robot", f"{RUNTIME}.safety", f"{RUNTIME}.policy", f"{RUNTIME}.runner")
OUTER_LAYERS = (f"{RUNTIME}.sim", f"{RUNTIME}.daemon", f"{RUNTIME}.cli", f"{RUNTIME}.eval_cli")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (ours)
    line: int
    where: str  # "module", "function" or "TYPE_CHECKING"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}, {self.where} level)"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package's folders."""
    modules: dict[str, Path] = {}
    for folder, sub in FOLDERS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = [PACKAGE, sub, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_main_guard(test: ast.expr) -> bool:
    return ast.unparse(test).replace("'", '"') == '__name__ == "__main__"'


def _walk(node: ast.AST, where: str) -> Iterable[tuple[ast.AST, str]]:
    """Every node with the context it runs in: module level, inside a function, or for the type checker."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_main_guard(child.test):
            continue
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.body:
                yield sub, "TYPE_CHECKING"
                yield from _walk(sub, "TYPE_CHECKING")
            for sub in child.orelse:
                yield sub, where
                yield from _walk(sub, where)
            continue
        inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else where
        yield child, inner
        yield from _walk(child, inner)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Our modules that `name` (the file `path`) imports, wherever the import statement is."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    for node, where in _walk(tree, "module"):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [origin] + [
                f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in modules
            ]
        for target in targets:
            if target in modules and target != name:
                found.append(Import(name, target, node.lineno, where))  # type: ignore[attr-defined]
    return found


def import_graph(root: Path = ROOT) -> list[Import]:
    modules = module_files(root)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    """`module` is one of `prefixes` or inside one (cli also covers cli_check, cli_run, ...)."""
    for prefix in prefixes:
        if module == prefix or module.startswith(prefix + ".") or (
            prefix.endswith(".cli") and module.startswith(prefix + "_")
        ):
            return True
    return False


def wrong_way_imports(imports: list[Import]) -> list[Import]:
    """Every import that breaks one of the layer contracts (module docstring)."""
    wrong = []
    for imp in imports:
        if _within(imp.source, (RUNTIME,)) and _within(imp.target, TRAIN_OR_CONVERT):
            wrong.append(imp)
        elif _within(imp.source, ROBOT_CORE) and _within(imp.target, OUTER_LAYERS):
            wrong.append(imp)
        elif _within(imp.source, (f"{PACKAGE}.grammars",)) and not _within(imp.target, (f"{PACKAGE}.grammars",)):
            wrong.append(imp)
    return wrong


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds at least one cycle).

    A package's own submodules are left out of its edges (`pkg/__init__.py` importing `pkg.sub` while
    `pkg.sub` is imported through `pkg` is how packages work, not a cycle)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.target.startswith(imp.source + "."):
            graph.setdefault(imp.source, set()).add(imp.target)
    reach: dict[str, set[str]] = {}
    for node in graph:  # everything each module pulls in, directly or not (a few hundred modules: plain searches)
        seen: set[str] = set()
        todo = list(graph[node])
        while todo:
            nxt = todo.pop()
            if nxt not in seen:
                seen.add(nxt)
                todo.extend(graph.get(nxt, ()))
        reach[node] = seen
    components = {
        tuple(sorted({node} | {other for other in reach[node] if node in reach.get(other, ())}))
        for node in graph if node in reach[node]
    }
    return sorted(list(c) for c in components)


def sys_path_edits(root: Path = ROOT) -> list[str]:
    """`sys.path` changes in tests/ and bench/ (file:line): shared helpers come from the package instead."""
    edits = []
    for folder in ("tests", "bench", *FOLDERS):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                target = (
                    node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
                )
                if isinstance(node, (ast.Assign, ast.AugAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    target = next((t for t in targets if ast.unparse(t) == "sys.path"), None)
                if target is not None and ast.unparse(target) == "sys.path":
                    edits.append(f"{path.relative_to(root)}:{node.lineno}")  # type: ignore[attr-defined]
    return edits


def _top_level_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names a module defines, names it only imports) at its top level, `if`/`try` blocks included."""
    defined: set[str] = set()
    imported: set[str] = set()
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            todo.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            todo.extend(stmt for handler in getattr(node, "handlers", []) for stmt in handler.body)
    return defined, imported - defined


def imports_through_reexports(root: Path = ROOT) -> list[str]:
    """`from our.module import name` where our.module (not a package) only imports `name` itself."""
    modules = module_files(root)
    names = {m: _top_level_names(ast.parse(p.read_text(encoding="utf-8"))) for m, p in modules.items()}
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module in modules and not node.level):
                continue
            if modules[node.module].name == "__init__.py":
                continue
            for alias in node.names:
                if alias.name in names[node.module][1] and f"{node.module}.{alias.name}" not in modules:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {alias.name} via {node.module}")
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return import_graph()


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checker itself: module, function and TYPE_CHECKING imports, relative ones, and `from pkg import mod`."""
    (tmp_path / "runtime" / "robot").mkdir(parents=True)
    for folder in ("train", "convert", "grammars", "tests/support"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "robot" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "sim.py").write_text("from vlm2vla_edge.runtime.robot import arm\n")
    (tmp_path / "runtime" / "robot" / "arm.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlm2vla_edge.train import x\n"
        "def f():\n    from .. import sim\n"
        "if __name__ == '__main__':\n    import vlm2vla_edge.runtime.sim\n"
    )
    (tmp_path / "grammars" / "__init__.py").write_text("import vlm2vla_edge.convert\n")
    (tmp_path / "train" / "files.py").write_text("def digest(): ...\n")
    (tmp_path / "train" / "bundle.py").write_text("from vlm2vla_edge.train.files import digest\n")
    (tmp_path / "convert" / "merge.py").write_text("from vlm2vla_edge.train.bundle import digest\n")
    assert imports_through_reexports(tmp_path) == ["convert/merge.py:1: digest via vlm2vla_edge.train.bundle"]
    found = [i for i in import_graph(tmp_path) if i.source.split(".")[1] in ("runtime", "grammars")]
    assert {(i.source.split(".", 1)[1], i.target.split(".", 1)[1], i.where) for i in found} == {
        ("runtime.sim", "runtime.robot", "module"),
        ("runtime.sim", "runtime.robot.arm", "module"),
        ("runtime.robot.arm", "train", "TYPE_CHECKING"),
        ("runtime.robot.arm", "runtime", "function"),
        ("runtime.robot.arm", "runtime.sim", "function"),
        ("grammars", "convert", "module"),
    }
    assert len(wrong_way_imports(found)) == 3  # runtime -> train, robot -> sim, grammars -> convert
    assert import_cycles(found) == [["vlm2vla_edge.runtime.robot.arm", "vlm2vla_edge.runtime.sim"]]


def test_the_graph_covers_the_package(imports: list[Import]) -> None:
    sources = {imp.source for imp in imports}
    for expected in (
        "vlm2vla_edge.runtime.cli",
        "vlm2vla_edge.runtime.runner",
        "vlm2vla_edge.train.data.local_annotator",
    ):
        assert expected in sources
    assert len(imports) > 300  # a parser that found nothing would pass every contract


def test_no_wrong_way_imports(imports: list[Import]) -> None:
    wrong = wrong_way_imports(imports)
    assert not wrong, "imports against the layers:\n" + "\n".join(map(str, wrong))


def test_no_import_cycles(imports: list[Import]) -> None:
    cycles = import_cycles(imports)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_helpers_are_imported_from_where_they_are_defined() -> None:
    found = imports_through_reexports()
    assert not found, "imported through a module that only re-exports it:\n" + "\n".join(found)


def test_no_sys_path_edits() -> None:
    edits = sys_path_edits()
    assert not edits, "tests and bench share helpers through vlm2vla_edge.testing, not sys.path: " + ", ".join(edits)
