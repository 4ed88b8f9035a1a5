"""The daemon on the command line: `serve` runs it; `status`, `stop`, `reset` and `do` (without --local) are
its clients; `install-service` writes its systemd unit.

No daemon answering is exit 2 with a hint how to start one; a refusal by the daemon is exit 1 with
its message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from vlm2vla_edge.runtime.errors import UserError

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.daemon.client import DaemonClient

_NO_DAEMON_HINT = "start it with 'vlm2vla-edge serve' (or its systemd unit), or run the episode here with 'do --local'"


def _client(runtime_config: str, socket_path: Optional[Path], timeout_s: float = 5.0) -> "DaemonClient":
    from vlm2vla_edge.runtime.daemon.client import DaemonClient
    from vlm2vla_edge.runtime.runtime_config import load_runtime_config

    settings = load_runtime_config(runtime_config)
    return DaemonClient.locate(settings.daemon, socket_path, timeout_s=timeout_s)


def _call(action: Callable[[], object]) -> object:
    """Run a client call; no daemon -> one sentence and exit 2, an API refusal -> its message and exit 1."""
    from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonUnavailable

    try:
        return action()
    except DaemonUnavailable as exc:
        typer.echo(f"error: {exc}; {_NO_DAEMON_HINT}", err=True)
        raise typer.Exit(2) from None
    except DaemonApiError as exc:
        typer.echo(f"error: the daemon refused ({exc.status}): {exc.message}", err=True)
        raise typer.Exit(1) from None



def do_via_daemon(
    instruction: str, runtime_config: str, socket_path: Optional[Path], adapter: Optional[str] = None
) -> int:
    """Submit the task to the running daemon and follow its events to the end (see `daemon.follow`)."""
    from vlm2vla_edge.runtime.daemon.follow import follow_task

    if not instruction.strip():
        raise UserError("the instruction is empty")
    client = _client(runtime_config, socket_path)
    task = _call(lambda: client.submit(instruction, adapter))
    assert isinstance(task, dict)
    task_id = str(task["id"])
    typer.echo(f"task {task_id} accepted by the daemon at {client.where}")
    return follow_task(client, task_id, echo=typer.echo, echo_err=lambda line: typer.echo(line, err=True), call=_call)

def serve(
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    sim: Annotated[
        Optional[bool], typer.Option("--sim/--no-sim", help="Simulator instead of devices; default: the config's.")
    ] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Model bundle folder; default: the runtime config's.")] = None,
    devices: Annotated[
        Optional[Path], typer.Option(help="Real robot: YAML with 'arm:' and 'camera:' sections.")
    ] = None,
    episodes_dir: Annotated[
        Optional[Path], typer.Option(help="Where episodes are recorded; default: the config's.")
    ] = None,
) -> None:
    """Run the daemon: load the model, connect the robot, serve the local API until SIGTERM.

    Under systemd (Type=notify) it reports READY=1 once serving and pings the watchdog; on SIGTERM it
    stops the episode, parks the arm in its sleep pose and exits 0.
    """
    from vlm2vla_edge.runtime.daemon.server import serve_from_config
    from vlm2vla_edge.runtime.runtime_config import load_runtime_config

    settings = load_runtime_config(runtime_config)
    update: dict[str, object] = {}
    if devices is not None:
        update.update(devices=devices, sim=False)
    if episodes_dir is not None:
        update["episodes_dir"] = episodes_dir.expanduser()
    if update:
        settings = settings.model_copy(update=update)
    if sim and settings.devices is not None and devices is not None:
        raise UserError("--sim and --devices exclude each other")
    raise typer.Exit(serve_from_config(settings, bundle=bundle, sim=sim, echo=lambda line: typer.echo(line, err=True)))


def status(
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    socket_path: Annotated[Optional[Path], typer.Option("--socket", help="The daemon's socket.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the daemon's answer as JSON.")] = False,
) -> None:
    """Show the daemon's state: idle, running (which task), or e-stop latched. Exit 2 when none answers."""
    client = _client(runtime_config, socket_path)
    data = _call(client.status)
    assert isinstance(data, dict)
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    typer.echo(f"daemon: {data['state']} ({client.where}); model {data['bundle_id']}; robot {data['robot']}"
               + (" (simulated)" if data.get("sim") else ""))
    if data.get("adapters"):
        typer.echo(f"adapter: {data.get('adapter')} (loaded: {', '.join(data['adapters'])})")
    if data.get("error"):
        typer.echo(f"problem: {data['error']}")
    estop = data.get("estop") or {}
    typer.echo(f"e-stop: {'LATCHED: ' + str(estop.get('reason')) if estop.get('engaged') else 'released'}")
    task = data.get("task")
    if task:
        result = task.get("result") or {}
        typer.echo(f"last task: {task['id']} '{task['instruction']}': {task['state']}"
                   + (f", {result.get('outcome')}: {result.get('detail')}" if result else ""))


def stop(
    reason: Annotated[
        str, typer.Option(help="Why (recorded with the episode and in the log).")
    ] = "e-stop from the command line",
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    socket_path: Annotated[Optional[Path], typer.Option("--socket", help="The daemon's socket.")] = None,
) -> None:
    """E-stop: halt the arm and the model now; latched until 'vlm2vla-edge reset'."""
    client = _client(runtime_config, socket_path, timeout_s=2.0)
    _call(lambda: client.estop(reason))
    typer.echo("e-stop latched: the arm is halted; run 'vlm2vla-edge reset' to release it")


def reset(
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    socket_path: Annotated[Optional[Path], typer.Option("--socket", help="The daemon's socket.")] = None,
) -> None:
    """Release the latched e-stop (after making sure the robot's surroundings are safe)."""
    client = _client(runtime_config, socket_path, timeout_s=10.0)
    _call(client.reset)
    typer.echo("e-stop released: the daemon accepts tasks again")


def install_service(
    output: Annotated[Path, typer.Option(help="Where to write the unit ('-' prints it).")] = Path(
        "/etc/systemd/system/vlm2vla-edge.service"
    ),
    user: Annotated[str, typer.Option(help="Account the daemon runs as.")] = "vlm2vla",
    group: Annotated[
        Optional[str], typer.Option(help="Group of the socket (who may drive the robot); default: --user.")
    ] = None,
    runtime_config: Annotated[Path, typer.Option("--config", help="Runtime config the service reads.")] = Path(
        "/etc/vlm2vla-edge/runtime.yaml"
    ),
    gemini_key: Annotated[
        Optional[Path],
        typer.Option(help="Gemini API key file passed as a systemd credential; default: the usual one if it exists."),
    ] = None,
    sim: Annotated[bool, typer.Option("--sim", help="Serve the simulator (a demo machine without a robot).")] = False,
) -> None:
    """Render the systemd unit for this machine's paths (this venv's vlm2vla-edge) and write it."""
    from vlm2vla_edge.runtime.daemon.unit import DEFAULT_CREDENTIAL, UnitOptions, installed_executable, render_unit

    executable = installed_executable()
    credential = gemini_key or (DEFAULT_CREDENTIAL if DEFAULT_CREDENTIAL.is_file() else None)
    if gemini_key is not None and not gemini_key.is_file():
        raise UserError(f"the Gemini key file {gemini_key} does not exist (systemd would refuse to start the unit)")
    text = render_unit(UnitOptions(
        executable=executable, config=runtime_config.expanduser().absolute(), user=user, group=group or user,
        gemini_credential=credential, sim=sim,
    ))
    if str(output) == "-":
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {output}: {exc.strerror or exc} (use --output PATH or run as root)") from None
    typer.echo(f"wrote {output}; next: systemctl daemon-reload && systemctl enable --now vlm2vla-edge")
    if not runtime_config.exists():
        typer.echo(f"note: {runtime_config} does not exist yet; copy configs/runtime.yaml there and set 'bundle'")
