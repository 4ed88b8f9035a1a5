"""The `vlm2vla-edge` command line: the app, its groups and global options; the commands live in their
own modules (cli_check, cli_config, cli_run, cli_daemon, cli_episode) and are registered here, so
`--help` lists them in one place; `sim` and `eval` are mounted from their subsystems, and the
training and conversion tools (`demo`, `data`, `train`, `convert`) only when they are installed.

Exit codes (README.md, "Exit codes"): 0 success, 1 the task or check failed, 2 usage or input error. A user
mistake ends in one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer

from vlm2vla_edge.runtime import __version__
from vlm2vla_edge.runtime.cli_check import check
from vlm2vla_edge.runtime.cli_config import config_check, config_show
from vlm2vla_edge.runtime.cli_daemon import install_service, reset, serve, status, stop
from vlm2vla_edge.runtime.cli_episode import episode_report, episode_show, episode_view
from vlm2vla_edge.runtime.cli_run import do
from vlm2vla_edge.runtime.errors import UserError

app = typer.Typer(
    name="vlm2vla-edge",
    help="On-robot runtime and toolchain for 'actions as language' robot policies (VLM2VLA on llama.cpp).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Validate and show configuration files (robot, policy, runtime).", no_args_is_help=True)
app.add_typer(config_app, name="config")
episode_app = typer.Typer(help="Inspect recorded episodes.", no_args_is_help=True)
app.add_typer(episode_app, name="episode")
config_app.command("check")(config_check)
config_app.command("show")(config_show)
app.command("check")(check)
app.command("do")(do)
app.command("serve")(serve)
app.command("status")(status)
app.command("stop")(stop)
app.command("reset")(reset)
app.command("install-service")(install_service)
episode_app.command("show")(episode_show)
episode_app.command("report")(episode_report)
episode_app.command("view")(episode_view)


@functools.cache
def _mount_optional_subapps() -> None:
    """Sub-apps that live with their subsystem; mounted here so `--help` lists them. The training and
    conversion tools are looked up by name (`optional_tool`): the runtime never imports them, a partial
    install (no training tools) still runs, and their heavy dependencies (torch, ...) load only when
    they run. Once per process (cached): mounting again on every `main()` call piled up copies of every
    sub-app, so each later call built a bigger command tree (the quick tests' CLI calls slowed down 3x)."""
    from vlm2vla_edge.runtime.cli_support import optional_tool
    from vlm2vla_edge.runtime.eval_cli import eval_command
    from vlm2vla_edge.runtime.sim.cli import app as sim_app

    app.add_typer(sim_app, name="sim")
    app.command("eval")(eval_command)
    for module, name, attr in (
        ("vlm2vla_edge.convert.demo_cli", "demo", "demo_command"),  # one command
        ("vlm2vla_edge.train.data.cli", "data", "app"),  # a group of commands
        ("vlm2vla_edge.train.lora.cli", "train", "app"),  # one command as the group's callback
        ("vlm2vla_edge.convert.cli", "convert", "convert_command"),  # one command
    ):
        found = optional_tool(module, attr)
        if found is None:
            continue
        if isinstance(found, typer.Typer):
            app.add_typer(found, name=name)
        else:
            app.command(name)(found)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vlm2vla-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", help="Print the version and exit.", callback=_version_callback, is_eager=True),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level: DEBUG, INFO, WARNING or ERROR.")] = "WARNING",
) -> None:
    from vlm2vla_edge.runtime.logs import configure_logging

    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise UserError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, not '{log_level}'")
    configure_logging(level)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs the app and turns our errors into one-line messages."""
    from vlm2vla_edge.runtime.cli_support import run_typer_app

    _mount_optional_subapps()
    return run_typer_app(app, argv, "vlm2vla-edge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
