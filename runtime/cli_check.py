"""`vlm2vla-edge check`: parse model output, post-process it and run it through the safety limiter.

Nothing moves: the command shows what the arm would be told (or why the text is rejected), so a
model's output can be checked by hand or in a script (`--json`).
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from vlm2vla_edge.runtime.errors import UserError

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.config import RobotConfig


class Stage(str, Enum):
    action = "action"
    motion = "motion"
    subtasks = "subtasks"


def _parse_start(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"--start must be three comma-separated numbers in metres (x,y,z), not '{text}'")
    return values



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
        _emit(
            {"stage": stage.value, "ok": False, "rejected_by": "parser", "code": exc.code, "reason": str(exc)}, as_json
        )
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
