"""The `vlm2vla-edge` command line.

Exit codes (DESIGN.md §6): 0 success, 1 the task or check failed, 2 usage or input error. A user
mistake ends in one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer
import yaml
from pydantic import BaseModel

from vlm2vla_edge.runtime import __version__
from vlm2vla_edge.runtime.errors import UserError

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.config import RobotConfig

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


def _mount_optional_subapps() -> None:
    """Sub-apps that live with their subsystem; mounted here so `--help` lists them. The training tools
    are part of the package but their heavy dependencies (torch, ...) are imported only when they run."""
    from vlm2vla_edge.runtime.eval_cli import eval_command
    from vlm2vla_edge.runtime.sim.cli import app as sim_app

    app.add_typer(sim_app, name="sim")
    app.command("eval")(eval_command)
    for module, name, attr in (
        ("vlm2vla_edge.train.data.cli", "data", "app"),  # a group of commands
        ("vlm2vla_edge.train.lora.cli", "train", "app"),  # one command as the group's callback
        ("vlm2vla_edge.convert.cli", "convert", "convert_command"),  # one command
    ):
        try:
            found = getattr(__import__(module, fromlist=[attr]), attr)
        except (ImportError, AttributeError) as exc:  # a partial install (no training tools): the runtime works
            logging.getLogger(__name__).debug("not mounting %s: %s", name, exc)
            continue
        if isinstance(found, typer.Typer):
            app.add_typer(found, name=name)
        else:
            app.command(name)(found)


class ConfigKind(str, Enum):
    auto = "auto"
    robot = "robot"
    policy = "policy"
    runtime = "runtime"


class Stage(str, Enum):
    action = "action"
    motion = "motion"
    subtasks = "subtasks"


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


def _config_model(kind: ConfigKind, path: str) -> type[BaseModel]:
    from vlm2vla_edge.runtime import config

    models = {"robot": config.RobotConfig, "policy": config.PolicyConfig, "runtime": config.RuntimeConfig}
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
                return config.RuntimeConfig
    if as_path.stem in ("policy", "runtime"):
        return models[as_path.stem]
    raise UserError(f"cannot tell what kind of config '{path}' is; pass --kind robot|policy|runtime")


@config_app.command("check")
def config_check(
    path: Annotated[str, typer.Argument(help="A YAML file, or a preset name such as 'widowx250s'.")],
    kind: Annotated[ConfigKind, typer.Option(help="What the file configures; auto guesses from its fields.")] = ConfigKind.auto,
) -> None:
    """Validate a config file; exit 0 if valid, 2 with the file, field and allowed range if not."""
    from vlm2vla_edge.runtime.config import load_config, resolve_config_path

    model = _config_model(kind, path)
    load_config(path, model)
    typer.echo(f"ok: {resolve_config_path(path, model)} is a valid {model.__name__}")


@config_app.command("show")
def config_show(
    path: Annotated[str, typer.Argument(help="A YAML file, or a preset name such as 'widowx250s'.")] = "widowx250s",
    kind: Annotated[ConfigKind, typer.Option(help="What the file configures; auto guesses from its fields.")] = ConfigKind.auto,
) -> None:
    """Print a config with every default filled in, as the runtime sees it."""
    from vlm2vla_edge.runtime.config import load_config

    loaded = load_config(path, _config_model(kind, path))
    typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False).rstrip())


def _parse_start(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"--start must be three comma-separated numbers in metres (x,y,z), not '{text}'")
    return values  # type: ignore[return-value]


@app.command("check")
def check(
    text: Annotated[str, typer.Argument(help="Model output to check; '-' reads it from standard input.")],
    stage: Annotated[Stage, typer.Option(help="Which stage's language the text is in.")] = Stage.action,
    robot: Annotated[str, typer.Option(help="Robot config (preset name or YAML file).")] = "widowx250s",
    policy: Annotated[str, typer.Option(help="Policy config (preset or YAML) with the action language.")] = "policy",
    start: Annotated[
        Optional[str], typer.Option(help="End-effector position x,y,z in metres; default: the home pose.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Parse model output, post-process it and run it through the safety limiter, without moving anything.

    Exit 0 when the text parses and every action passes (possibly clamped), 1 when it is rejected.
    """
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
    from vlm2vla_edge.runtime.parser import ParseError, parse_action_chunk, parse_motion_plan, parse_subtasks

    if text == "-":
        text = sys.stdin.read()
    policy_config = load_policy_config(policy)
    try:
        if stage == Stage.subtasks:
            subtasks = parse_subtasks(text)
            _emit({"stage": "subtasks", "ok": True, "subtasks": list(subtasks)}, as_json)
            return
        if stage == Stage.motion:
            plan = parse_motion_plan(text)
            _emit({"stage": "motion", "ok": True, "motion_plan": plan.text}, as_json)
            return
        chunk = parse_action_chunk(text, policy_config.action_language)
    except ParseError as exc:
        _emit({"stage": stage.value, "ok": False, "rejected_by": "parser", "code": exc.code, "reason": str(exc)}, as_json)
        raise typer.Exit(1) from exc

    from vlm2vla_edge.runtime.postprocess import postprocess_chunk
    from vlm2vla_edge.runtime.safety import SafetyLimiter

    robot_config = load_robot_config(robot)
    start_xyz = _parse_start(start) if start else _home_position(robot_config)
    processed = postprocess_chunk(chunk, policy_config.action_language, robot_config.limits, gripper_open=True)
    verdict = SafetyLimiter(robot_config, reachable=_reachability(robot_config)).check_chunk(processed, start_xyz)
    result = {
        "stage": "action",
        "ok": not verdict.rejected,
        "parsed": chunk.as_lists(),
        "postprocessed": processed.as_lists(),
        "start": list(start_xyz),
        "commands": [c.to_dict() for c in verdict.commands],
        "decisions": [d.to_dict() for d in verdict.decisions],
        "reason": verdict.reason,
    }
    _emit(result, as_json)
    if verdict.rejected:
        raise typer.Exit(1)


def _home_position(robot_config: "RobotConfig") -> tuple[float, float, float]:
    """The end-effector position of the robot config's home pose."""
    from vlm2vla_edge.runtime.robot.kinematics import fk_position

    return fk_position(robot_config.home_joints)


def _reachability(robot_config: "RobotConfig") -> Callable[[tuple[float, float, float]], bool]:
    """Inverse kinematics within the config's joint limits (the same check the simulator and drivers use)."""
    from vlm2vla_edge.runtime.robot.kinematics import WX250sKinematics

    return WX250sKinematics(robot_config).reachable


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    if not result["ok"]:
        typer.echo(f"rejected by the {result.get('rejected_by', 'safety limiter')}: {result['reason']}")
    if "subtasks" in result:
        typer.echo("subtasks: " + " | ".join(result["subtasks"]))
    if "motion_plan" in result:
        typer.echo(f"motion plan: {result['motion_plan']}")
    if "parsed" in result:
        typer.echo(f"parsed:        {result['parsed']}")
        typer.echo(f"post-processed: {result['postprocessed']}")
        for decision in result["decisions"]:
            where = "chunk" if decision["index"] is None else f"action {decision['index']}"
            typer.echo(f"  {decision['verdict']:<6} {decision['rule']:<20} {where}: {decision['reason']}")
        for i, command in enumerate(result["commands"]):
            target = ", ".join(f"{v:.3f}" for v in command["target"])
            grip = "open" if command["gripper_open"] else "closed"
            typer.echo(f"  command {i}: to ({target}) gripper {grip}")
        if result["ok"]:
            typer.echo(f"ok: {len(result['commands'])} command(s) would be sent to the arm")


class VerifierKind(str, Enum):
    auto = "auto"
    heuristic = "heuristic"
    gemini = "gemini"


@app.command("do")
def do(
    instruction: Annotated[str, typer.Argument(help="The task, in any language, e.g. 'levanta la zanahoria'.")],
    local: Annotated[bool, typer.Option("--local", help="Run the episode in this process (no daemon).")] = False,
    sim: Annotated[bool, typer.Option("--sim", help="Use the built-in simulator instead of a real robot.")] = False,
    bundle: Annotated[
        Optional[Path], typer.Option(help="Model bundle folder (with manifest.json); default: runtime config's.")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Simulator scene seed.")] = 0,
    adapter: Annotated[
        Optional[str],
        typer.Option(help="Which LoRA adapter (skill) of a base + adapters bundle runs the task; default: the bundle's default."),
    ] = None,
    devices: Annotated[
        Optional[Path], typer.Option(help="Real robot: YAML with 'arm:' and 'camera:' device sections.")
    ] = None,
    verifier: Annotated[
        VerifierKind, typer.Option(help="auto: Gemini when an API key is set, else local heuristics.")
    ] = VerifierKind.auto,
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    robot: Annotated[Optional[str], typer.Option(help="Robot config; default: the runtime config's.")] = None,
    policy: Annotated[Optional[str], typer.Option(help="Policy config; default: the runtime config's.")] = None,
    episodes_dir: Annotated[
        Optional[Path], typer.Option(help="Where the episode is recorded; default: the runtime config's.")
    ] = None,
    max_retries: Annotated[int, typer.Option(min=0, max=20, help="Failed attempts allowed per subtask.")] = 3,
    timeout: Annotated[float, typer.Option(min=1, help="Episode time budget, seconds.")] = 600.0,
    realtime: Annotated[bool, typer.Option(help="Simulator: move at the arm's real speed.")] = False,
    socket_path: Annotated[
        Optional[Path], typer.Option("--socket", help="The daemon's socket; default: the runtime config's, else the usual places.")
    ] = None,
) -> None:
    """Carry out one instruction: plan subtasks, then motion plan -> actions -> safety -> arm -> verify.

    Without --local the running daemon (`vlm2vla-edge serve`) does the work and its progress streams
    here; Ctrl-C cancels the task. With --local the episode runs in this process (the options below
    --local apply to it only). Exit 0 when every subtask is verified, 1 when the task failed, was
    stopped or hit a fault, 2 when no daemon answers or the input is wrong.
    """
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config, load_runtime_config
    from vlm2vla_edge.runtime.local_run import LocalRunOptions, run_local
    from vlm2vla_edge.runtime.runner import RunnerConfig
    from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig

    if not local:
        raise typer.Exit(_do_via_daemon(instruction, runtime_config, socket_path, adapter))
    if not instruction.strip():
        raise UserError("the instruction is empty")
    settings = load_runtime_config(runtime_config)
    chosen_bundle = bundle or settings.bundle
    if chosen_bundle is None and sim:
        # A newcomer's first try: the simulator with no bundle runs the demo model, built or cached as `demo` does.
        from vlm2vla_edge.runtime.demo import find_or_build_bundle

        chosen_bundle = find_or_build_bundle(echo=typer.echo).path
        typer.echo(f"no bundle given: running the demo model ({chosen_bundle})")
    if chosen_bundle is None:
        raise UserError(
            "no model bundle: pass --bundle PATH (a folder with manifest.json) or set 'bundle' in the runtime config "
            "(with --sim and no bundle the demo model runs)"
        )
    options = LocalRunOptions(
        instruction=instruction,
        bundle=chosen_bundle,
        robot=load_robot_config(robot or settings.robot),
        policy=load_policy_config(policy or settings.policy),
        episodes_dir=(episodes_dir or settings.episodes_dir).expanduser(),
        sim=sim,
        seed=seed,
        devices=devices,
        verifier=VerifierConfig(kind=verifier.value),
        runner=RunnerConfig(max_retries_per_subtask=max_retries, episode_timeout_s=timeout),
        realtime=realtime,
        adapter=adapter,
    )
    outcome = run_local(options, echo=typer.echo)
    typer.echo(f"episode recorded in {outcome.episode_dir}")
    if outcome.result.outcome != "success":
        raise typer.Exit(1)


@app.command("demo")
def demo(
    instruction: Annotated[
        Optional[str], typer.Argument(help="The task, in any language (default: 'put the carrot in the pot').")
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Simulator scene seed.")] = 0,
    bundle: Annotated[
        Optional[Path], typer.Option(help="Run this model bundle instead of the built-in demo model.")
    ] = None,
    episodes_dir: Annotated[
        Optional[Path], typer.Option(help="Where the episode and its report go (default: ~/vlm2vla-edge-demo/episodes).")
    ] = None,
    cache_dir: Annotated[
        Optional[Path], typer.Option(help="Where the demo bundle is built and kept (default: ~/.cache/vlm2vla-edge/demo).")
    ] = None,
    max_retries: Annotated[int, typer.Option(min=0, max=20, help="Failed attempts allowed per subtask (a long reach takes several chunks).")] = 4,
    timeout: Annotated[float, typer.Option(min=1, help="Episode time budget, seconds.")] = 300.0,
    realtime: Annotated[bool, typer.Option(help="Move the simulated arm at the real arm's speed.")] = False,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads for llama.cpp (default: all cores).")] = None,
) -> None:
    """The offline field demo: the demo policy (Gemma-3-270M + LoRA) runs one episode in the simulator.

    No network, no robot, no camera: the model writes subtasks, motion plans and action chunks, the
    safety limiter checks every command, the local verifier checks every step, and the episode is
    recorded with an HTML report (frames, plans, actions, safety decisions, verdicts, the gripper's
    path). The first run builds the demo model bundle (a few minutes) and caches it. Exit 0 when the
    task succeeded, 1 when it failed, 2 on a usage error.
    """
    from vlm2vla_edge.runtime.demo import DEFAULT_INSTRUCTION, default_episodes_dir, find_or_build_bundle

    text = DEFAULT_INSTRUCTION if instruction is None else instruction
    if not text.strip():
        raise UserError("the instruction is empty")
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
    from vlm2vla_edge.runtime.local_run import LocalRunOptions, run_local
    from vlm2vla_edge.runtime.report import write_report
    from vlm2vla_edge.runtime.runner import RunnerConfig
    from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig

    if bundle is None:
        bundle = find_or_build_bundle(cache_dir, echo=typer.echo, threads=threads).path
    policy = load_policy_config("policy")
    if threads is not None:
        policy = policy.model_copy(update={"n_threads": threads})
    options = LocalRunOptions(
        instruction=text,
        bundle=bundle,
        robot=load_robot_config("widowx250s"),
        policy=policy,
        episodes_dir=(episodes_dir or default_episodes_dir()).expanduser(),
        sim=True,
        seed=seed,
        verifier=VerifierConfig(kind="heuristic"),
        runner=RunnerConfig(max_retries_per_subtask=max_retries, episode_timeout_s=timeout),
        realtime=realtime,
    )
    outcome = run_local(options, echo=typer.echo)
    report = write_report(outcome.episode_dir)
    result = outcome.result
    typer.echo(
        f"outcome: {result.outcome} ({result.detail}); {result.completed_subtasks}/{len(result.subtasks)} subtasks, "
        f"{result.steps} steps, {result.duration_s:.1f} s"
    )
    typer.echo(f"episode: {outcome.episode_dir}")
    typer.echo(f"report:  {report}")
    if result.outcome != "success":
        raise typer.Exit(1)


# --- the daemon and its clients ---------------------------------------------------------------------

_NO_DAEMON_HINT = "start it with 'vlm2vla-edge serve' (or its systemd unit), or run the episode here with 'do --local'"


def _client(runtime_config: str, socket_path: Optional[Path], timeout_s: float = 5.0):  # noqa: ANN202
    from vlm2vla_edge.runtime.config import load_runtime_config
    from vlm2vla_edge.runtime.daemon.client import DaemonClient

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


def _do_via_daemon(instruction: str, runtime_config: str, socket_path: Optional[Path], adapter: Optional[str] = None) -> int:
    from vlm2vla_edge.runtime.daemon.client import DaemonApiError, DaemonUnavailable, format_event

    if not instruction.strip():
        raise UserError("the instruction is empty")
    client = _client(runtime_config, socket_path)
    task = _call(lambda: client.submit(instruction, adapter))
    assert isinstance(task, dict)
    task_id = str(task["id"])
    typer.echo(f"task {task_id} accepted by the daemon at {client.where}")
    outcome: str | None = None
    cancelled = False
    seen = 0
    while outcome is None:
        try:
            for event in client.events(task_id, since=seen):
                seen += 1
                for line in format_event(event):
                    typer.echo(line)
                if event.get("kind") == "episode_end":
                    outcome = str(event.get("outcome"))
            if outcome is None:  # the stream ended without the end event (e.g. the daemon stopped)
                state = _call(lambda: client.task(task_id))
                assert isinstance(state, dict)
                result = state.get("result") or {}
                outcome = str(result.get("outcome") or "unknown")
                if state.get("state") == "running":
                    continue
        except KeyboardInterrupt:
            if cancelled:
                raise
            cancelled = True
            typer.echo("cancelling the task (Ctrl-C again to stop waiting)...", err=True)
            try:
                client.cancel(task_id)
            except (DaemonUnavailable, DaemonApiError) as exc:
                typer.echo(f"error: could not cancel: {exc}", err=True)
                return 1
        except DaemonUnavailable as exc:
            typer.echo(f"error: {exc}; the task's outcome is unknown (see 'vlm2vla-edge status')", err=True)
            return 1
    typer.echo(f"episode recorded by the daemon as {task_id}")
    return 0 if outcome == "success" else 1


@app.command("serve")
def serve(
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    sim: Annotated[Optional[bool], typer.Option("--sim/--no-sim", help="Simulator instead of devices; default: the config's.")] = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Model bundle folder; default: the runtime config's.")] = None,
    devices: Annotated[Optional[Path], typer.Option(help="Real robot: YAML with 'arm:' and 'camera:' sections.")] = None,
    episodes_dir: Annotated[Optional[Path], typer.Option(help="Where episodes are recorded; default: the config's.")] = None,
) -> None:
    """Run the daemon: load the model, connect the robot, serve the local API until SIGTERM.

    Under systemd (Type=notify) it reports READY=1 once serving and pings the watchdog; on SIGTERM it
    stops the episode, parks the arm in its sleep pose and exits 0.
    """
    from vlm2vla_edge.runtime.config import load_runtime_config
    from vlm2vla_edge.runtime.daemon.server import serve_from_config

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


@app.command("status")
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


@app.command("stop")
def stop(
    reason: Annotated[str, typer.Option(help="Why (recorded with the episode and in the log).")] = "e-stop from the command line",
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    socket_path: Annotated[Optional[Path], typer.Option("--socket", help="The daemon's socket.")] = None,
) -> None:
    """E-stop: halt the arm and the model now; latched until 'vlm2vla-edge reset'."""
    client = _client(runtime_config, socket_path, timeout_s=2.0)
    _call(lambda: client.estop(reason))
    typer.echo("e-stop latched: the arm is halted; run 'vlm2vla-edge reset' to release it")


@app.command("reset")
def reset(
    runtime_config: Annotated[str, typer.Option("--config", help="Runtime config (preset or YAML).")] = "runtime",
    socket_path: Annotated[Optional[Path], typer.Option("--socket", help="The daemon's socket.")] = None,
) -> None:
    """Release the latched e-stop (after making sure the robot's surroundings are safe)."""
    client = _client(runtime_config, socket_path, timeout_s=10.0)
    _call(client.reset)
    typer.echo("e-stop released: the daemon accepts tasks again")


@app.command("install-service")
def install_service(
    output: Annotated[
        Path, typer.Option(help="Where to write the unit ('-' prints it).")
    ] = Path("/etc/systemd/system/vlm2vla-edge.service"),
    user: Annotated[str, typer.Option(help="Account the daemon runs as.")] = "vlm2vla",
    group: Annotated[Optional[str], typer.Option(help="Group of the socket (who may drive the robot); default: --user.")] = None,
    runtime_config: Annotated[Path, typer.Option("--config", help="Runtime config the service reads.")] = Path("/etc/vlm2vla-edge/runtime.yaml"),
    gemini_key: Annotated[
        Optional[Path], typer.Option(help="Gemini API key file passed as a systemd credential; default: the usual one if it exists.")
    ] = None,
    sim: Annotated[bool, typer.Option("--sim", help="Serve the simulator (a demo machine without a robot).")] = False,
) -> None:
    """Render the systemd unit for this machine's paths (this venv's vlm2vla-edge) and write it."""
    import shutil

    from vlm2vla_edge.runtime.daemon.unit import DEFAULT_CREDENTIAL, UnitOptions, render_unit

    executable = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "vlm2vla-edge" else None
    if executable is None or not executable.is_file():
        found = Path(sys.executable).parent / "vlm2vla-edge"
        executable = found if found.is_file() else Path(shutil.which("vlm2vla-edge") or found)
    if not executable.is_file():
        raise UserError(f"cannot find the vlm2vla-edge executable (looked at {executable}); install the package first")
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


@episode_app.command("show")
def episode_show(
    path: Annotated[Path, typer.Argument(help="An episode folder (with meta.json and steps.jsonl).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a recorded episode: instruction, outcome, steps, and whether its tail was cut by a crash."""
    from vlm2vla_edge.runtime.episode import EpisodeReader

    reader = EpisodeReader(path)
    steps = list(reader.steps())
    summary = {
        "path": str(path),
        "instruction": reader.meta.instruction,
        "outcome": reader.outcome,
        "steps": len(steps),
        "truncated": reader.truncated,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            typer.echo(f"{key:>12}: {value}")


@episode_app.command("report")
def episode_report(
    path: Annotated[Path, typer.Argument(help="An episode folder (with meta.json and steps.jsonl).")],
    output: Annotated[
        Optional[Path], typer.Option("--out", help="HTML file to write (default: EPISODE/report.html).")
    ] = None,
) -> None:
    """Write a self-contained HTML report of a recorded episode: frames, subtasks, plans, actions,
    safety decisions, verdicts, latencies and a plot of the end-effector path (works offline)."""
    from vlm2vla_edge.runtime.report import write_report

    typer.echo(f"report: {write_report(path, output)}")


@episode_app.command("view")
def episode_view(
    path: Annotated[Path, typer.Argument(help="An episode folder (with meta.json and steps.jsonl).")],
    output: Annotated[
        Optional[Path], typer.Option("--out", help="Write the recording to this .rrd file (open it with 'rerun FILE').")
    ] = None,
    spawn: Annotated[bool, typer.Option("--spawn", help="Start a Rerun viewer and send the episode to it.")] = False,
    connect: Annotated[
        Optional[str], typer.Option(help="Send to the Rerun viewer at this gRPC URL (rerun+http://HOST:9876/proxy).")
    ] = None,
) -> None:
    """Show a recorded episode in Rerun: frames, end-effector path in 3D, actions, safety decisions and each
    stage's text on one timeline. Without --out it goes to a running viewer, or to EPISODE/episode.rrd when
    none runs. Needs the [viewer] extra; 'episode report' is the zero-dependency view."""
    from vlm2vla_edge.runtime.episode_view import view_episode

    if output is not None and (spawn or connect):
        raise UserError("give --out, --spawn or --connect, not several")
    result = view_episode(path, out=output, spawn=spawn, connect=connect)
    where = f"saved to {result.destination} (open it with: rerun {result.destination})" if result.saved else f"sent to {result.destination}"
    typer.echo(f"{result.records} records, {result.frames} frames {where}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs the app and turns our errors into one-line messages."""
    from vlm2vla_edge.runtime.cli_support import run_typer_app

    _mount_optional_subapps()
    return run_typer_app(app, argv, "vlm2vla-edge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
