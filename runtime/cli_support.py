"""Running a typer app as a command: our exceptions become one line on stderr and an exit code.

Shared by `vlm2vla-edge` and the tools that also run on their own (`python convert/merge_quantize.py`,
`python -m vlm2vla_edge.train.lora`), so all of them follow the exit codes of README.md: 0 success, 1 the
task or check failed, 2 usage or input error; never a traceback for a user mistake.

`optional_tool` is how the runtime's command line reaches the training and conversion tools (the
`data`, `train`, `convert` and `demo` commands, the demo model of `do --local --sim`): by name at run
time, so the runtime never imports them (tests/test_layers.py) and a runtime-only install still works.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import typer

from vlm2vla_edge.grammars import GrammarError as LanguageGrammarError
from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError


def optional_tool(module: str, attr: str) -> Any:
    """`module.attr` of a tool that may not be installed (a partial install: no training tools), else None."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        logging.getLogger(__name__).debug("optional tool %s.%s is not available: %s", module, attr, exc)
        return None


def click_command(app: typer.Typer) -> Any:
    """The click command typer builds for `app`, with help that reads well (`cli_help.readable_help`)."""
    from vlm2vla_edge.runtime.cli_help import readable_help

    return readable_help(typer.main.get_command(app))


def run_typer_app(app: typer.Typer, argv: list[str] | None, prog_name: str) -> int:
    """Run `app` standalone (typer prints usage errors and exits 2, --help exits 0) and map our errors."""
    try:
        click_command(app).main(args=argv, prog_name=prog_name)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except (Vlm2VlaError, LanguageGrammarError) as exc:  # the grammars package's error is not one of ours by type
        typer.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    finally:
        sys.stdout.flush()
    return 0
