"""Running a typer app as a command: our exceptions become one line on stderr and an exit code.

Shared by `vlm2vla-edge` and the tools that also run on their own (`python convert/merge_quantize.py`,
`python -m vlm2vla_edge.train.lora`), so all of them follow DESIGN.md's exit codes: 0 success, 1 the
task or check failed, 2 usage or input error; never a traceback for a user mistake.
"""

from __future__ import annotations

import sys

import typer

from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError


def run_typer_app(app: typer.Typer, argv: list[str] | None, prog_name: str) -> int:
    """Run `app` standalone (typer prints usage errors and exits 2, --help exits 0) and map our errors."""
    try:
        app(args=argv, prog_name=prog_name)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except Vlm2VlaError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    finally:
        sys.stdout.flush()
    return 0
