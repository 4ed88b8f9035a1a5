"""Safety limiter for arm commands: the only producer of `SafeCommand`, the only thing an arm executes.

Sits between the parser and every arm, the simulator included. Limits come from the robot config
alone (`RobotConfig`); nothing in model output or instruction text can loosen them, and there is no
switch to turn a rule off: each rule clamps or rejects (`RuleMode`). Every decision carries a reason
that is logged and recorded in the episode. The e-stop latches until an explicit `reset()`.

Rules, in the order they are applied to one action (the first rejection ends the checks):

- ``estop``: the e-stop is latched. Always reject.
- ``finite``: NaN or infinity in the action or in the start pose. Always reject.
- ``gripper``: neither 1.0 (open) nor 0.0 (closed). Clamp snaps to the nearer one (0.5 closes).
- ``action_translation``: a move longer than `max_translation_per_action_m`. Clamp scales the
  delta down to that length, keeping its direction.
- ``table_floor``: a target below `z_floor` (table + clearance). Clamp raises z to the floor.
- ``workspace``: a target outside the workspace box. Clamp projects it onto the box.
- ``start_pose``: after the clamps the command would still break a limit (the projected target is
  farther than one action from the start), which can happen only when the arm already stands
  outside the allowed box. Always reject ("home it first").
- ``reachability``: inverse kinematics fails for the final target. Always reject.

Chunk rules: ``chunk_length`` (clamp truncates, reject refuses the whole chunk) and
``chunk_translation`` (the path budget; clamp shortens the action that crosses it and drops the rest,
reject refuses that action and the rest). At execution time ``rate`` spaces commands (clamp: wait,
reject: refuse).

Every emitted `SafeCommand` satisfies, exactly: finite target inside the box with z >= z_floor,
move length <= max_translation_per_action_m + 1e-9, chunk path <= max_translation_per_chunk_m + 1e-9,
reachable target, gripper exactly open or closed. The clamps are designed to get there, and a final
verification re-checks it independently before a command is made (defence in depth).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import ValidationError

from vlm2vla_edge.runtime.actions import Action, ActionChunk, Vec3
from vlm2vla_edge.runtime.config import RobotConfig, RuleMode
from vlm2vla_edge.runtime.errors import ConfigError, Vlm2VlaError

RuleVerdict = Literal["pass", "clamp", "reject"]  # one rule on one action or chunk (`ChunkVerdict`: the whole chunk)
Reachability = Callable[[Vec3], bool]

# Only this module holds the token that makes a SafeCommand constructible.
_LIMITER_TOKEN = object()

#: Slack, in metres, for float rounding: a length within this of its limit counts as at the limit,
#: and a coordinate within this of a box face is snapped onto the face without a decision.
TOLERANCE_M = 1e-9

GRIPPER_OPEN = 1.0
GRIPPER_CLOSED = 0.0


class SafetyViolation(Vlm2VlaError):
    """A command was refused by the limiter at execution time (replayed, rate-limited, ...)."""


class EStopEngaged(SafetyViolation):
    """The e-stop is latched: nothing moves until `SafetyLimiter.reset()`."""


@dataclass(frozen=True, slots=True)
class SafetyDecision:
    """One rule's verdict on one action (index) or on the whole chunk (index None)."""

    rule: str  # e.g. "workspace", "table_floor", "action_translation", "chunk_length", "gripper", ...
    verdict: RuleVerdict
    reason: str  # one human-readable sentence with the numbers involved
    index: int | None = None  # position of the action in its chunk; None for chunk-level rules

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "verdict": self.verdict, "reason": self.reason, "index": self.index}


class SafeCommand:
    """A limiter-approved arm command: move the end effector from `start` to `target`, then set the gripper.

    Only `SafetyLimiter` can create one (the constructor demands a token private to this module), and
    `authorize()` must succeed right before execution: it re-checks the e-stop latch, spends the
    command (each is executed at most once) and applies the rate limit. A command checked before an
    e-stop stays void after the reset: the arm may have been moved by hand meanwhile.
    """

    __slots__ = ("start", "target", "gripper_open", "source", "decisions", "_limiter", "_epoch", "_spent", "_lock")

    def __init__(
        self,
        *,
        token: object,
        limiter: "SafetyLimiter",
        start: Vec3,
        target: Vec3,
        gripper_open: bool,
        source: Action,
        decisions: tuple[SafetyDecision, ...],
        epoch: int = 0,
    ) -> None:
        if token is not _LIMITER_TOKEN:
            raise TypeError("a SafeCommand can only be created by the SafetyLimiter")
        self.start = start
        self.target = target
        self.gripper_open = gripper_open
        self.source = source
        self.decisions = decisions
        self._limiter = limiter
        self._epoch = epoch
        self._spent = False
        self._lock = threading.Lock()

    @property
    def delta(self) -> Vec3:
        return (self.target[0] - self.start[0], self.target[1] - self.start[1], self.target[2] - self.start[2])

    @property
    def length(self) -> float:
        """Straight-line length of the move, metres."""
        return math.dist(self.start, self.target)

    @property
    def clamped(self) -> bool:
        return any(d.verdict == "clamp" for d in self.decisions)

    @property
    def spent(self) -> bool:
        return self._spent

    def authorize(self, now: float | None = None) -> float:
        """Check the latch, spend the command, and return how many seconds to wait (rate limit).

        `now` defaults to the limiter's clock. Raises `EStopEngaged` while the e-stop is latched,
        `SafetyViolation` for a spent or pre-e-stop command, or a rate violation under the 'reject' rule.
        """
        with self._lock:
            if self._spent:
                raise SafetyViolation("this command was already executed; commands cannot be replayed")
            wait = self._limiter._authorize(self, now)
            self._spent = True
            return wait

    def to_dict(self) -> dict[str, object]:
        return {
            "start": list(self.start),
            "target": list(self.target),
            "gripper_open": self.gripper_open,
            "source": self.source.as_list(),
            "decisions": [d.to_dict() for d in self.decisions],
        }

    def __repr__(self) -> str:
        return f"SafeCommand(start={self.start}, target={self.target}, gripper_open={self.gripper_open})"


@dataclass(frozen=True, slots=True)
class ChunkVerdict:
    """What the limiter made of one chunk.

    `commands` are the approved moves in order, each starting where the previous one ends. When
    `rejected` is True, the action named by the rejecting decision and every action after it were
    refused, while `commands` still holds the approved prefix before it (each of those is safe on its
    own; whether to execute a partial chunk is the caller's choice). A chunk-level rejection (e-stop,
    an empty chunk, chunk_length in reject mode) leaves `commands` empty. `reason` is the rejecting
    decision's reason, or a summary of the clamps, or "" when everything passed unchanged.
    """

    commands: tuple[SafeCommand, ...]
    decisions: tuple[SafetyDecision, ...]
    rejected: bool
    reason: str

    @property
    def clamped(self) -> bool:
        return any(d.verdict == "clamp" for d in self.decisions)

    def to_dict(self) -> dict[str, object]:
        return {
            "commands": [c.to_dict() for c in self.commands],
            "decisions": [d.to_dict() for d in self.decisions],
            "rejected": self.rejected,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    """An action that passed the per-action rules: where it goes and what the gripper does."""

    target: Vec3
    gripper_open: bool


class SafetyLimiter:
    """Checks actions against one robot's limits and issues `SafeCommand`s; holds the e-stop latch.

    Thread-safe: `estop()` may be called from any thread (a signal handler, the daemon's API) while
    another thread checks or executes commands.
    """

    def __init__(
        self,
        robot: RobotConfig,
        reachable: Reachability | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(robot, RobotConfig):
            raise TypeError(f"SafetyLimiter needs a RobotConfig, got {type(robot).__name__}")
        # Re-validate: `model_copy(update=...)` and `model_construct` skip validation, and a config
        # that slipped past the hard limits must not reach the motors.
        try:
            self._robot = RobotConfig.model_validate(robot.model_dump())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise ConfigError(
                f"robot config '{getattr(robot, 'name', '?')}' is invalid for the safety limiter: {where}: "
                f"{first['msg'].removeprefix('Value error, ')}"
            ) from exc
        self._reachable = reachable
        self._clock = clock
        self._log = logger or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._estop_reason: str | None = None
        self._epoch = 0
        self._last_issue: float | None = None

        box = self._robot.workspace
        # The allowed set is itself a box: the workspace with its bottom raised to the table floor.
        self._lo: Vec3 = (box.x.min, box.y.min, max(box.z.min, self._robot.z_floor))
        self._hi: Vec3 = (box.x.max, box.y.max, box.z.max)
        limits = self._robot.limits
        self._max_action = limits.max_translation_per_action_m
        self._max_chunk = limits.max_translation_per_chunk_m
        self._max_len = limits.max_chunk_length
        self._min_interval = 1.0 / limits.max_commands_per_s
        if reachable is None:
            self._log.warning(
                "safety event=reachability_unchecked robot=%s reason=%s",
                self._robot.name,
                json.dumps("no inverse-kinematics hook given: only the workspace box is checked"),
            )

    # --- state ------------------------------------------------------------------------------------

    @property
    def robot(self) -> RobotConfig:
        return self._robot

    @property
    def engaged(self) -> bool:
        """True while the e-stop is latched."""
        with self._lock:
            return self._estop_reason is not None

    @property
    def estop_reason(self) -> str | None:
        with self._lock:
            return self._estop_reason

    def estop(self, reason: str) -> None:
        """Latch the e-stop: every check and every pending command is refused until `reset()`."""
        with self._lock:
            already = self._estop_reason is not None
            if not already:
                self._estop_reason = reason or "e-stop"
            self._epoch += 1  # commands checked before now are void, even after a reset
        self._log.warning("safety event=estop already_engaged=%s reason=%s", already, json.dumps(reason))

    def reset(self) -> None:
        """Release the e-stop latch (an explicit operator action); earlier commands stay void."""
        with self._lock:
            was = self._estop_reason
            self._estop_reason = None
        self._log.warning("safety event=estop_reset was_engaged=%s reason=%s", was is not None, json.dumps(was or ""))

    # --- checks -----------------------------------------------------------------------------------

    def check_action(
        self, action: Action, start: Vec3, index: int | None = None
    ) -> tuple[SafeCommand | None, tuple[SafetyDecision, ...]]:
        """Check one action from `start`; return the command (None when rejected) and the non-pass decisions."""
        decisions: list[SafetyDecision] = []
        epoch = self._current_epoch()
        start = _as_vec3(start)
        plan = self._plan(action, start, index, decisions)
        command = None
        if plan is not None:
            command = self._emit(action, start, plan, index, decisions, epoch)
        return command, tuple(decisions)

    def check_chunk(self, chunk: ActionChunk, start: Vec3) -> ChunkVerdict:
        """Check a chunk along its predicted path: each action starts where the previous command ends.

        See `ChunkVerdict` for what a rejection keeps. Decisions holds only non-pass verdicts.
        """
        decisions: list[SafetyDecision] = []
        epoch = self._current_epoch()
        start = _as_vec3(start)
        actions = tuple(chunk)

        reason = self._estop_block()
        if reason is not None:
            return self._reject_chunk(decisions, SafetyDecision("estop", "reject", reason))
        if not actions:
            return self._reject_chunk(
                decisions, SafetyDecision("chunk_length", "reject", "the chunk holds no actions; nothing to execute")
            )
        if len(actions) > self._max_len:
            if self._mode("chunk_length") is RuleMode.clamp:
                self._decide(
                    decisions,
                    SafetyDecision(
                        "chunk_length",
                        "clamp",
                        f"chunk has {len(actions)} actions, more than the {self._max_len} allowed; "
                        f"truncated to the first {self._max_len}",
                    ),
                )
                actions = actions[: self._max_len]
            else:
                return self._reject_chunk(
                    decisions,
                    SafetyDecision(
                        "chunk_length",
                        "reject",
                        f"chunk has {len(actions)} actions, more than the {self._max_len} allowed; chunk refused",
                    ),
                )

        commands: list[SafeCommand] = []
        position = start
        used = 0.0
        for index, action in enumerate(actions):
            plan = self._plan(action, position, index, decisions)
            if plan is None:
                return self._finish(commands, decisions)
            length = math.dist(position, plan.target)
            # A move still longer than one action allows (the arm stands outside the box) is left for
            # _emit to refuse as start_pose, rather than being passed off as a budget clamp.
            budget_hit = length <= self._max_action + TOLERANCE_M and used + length > self._max_chunk + TOLERANCE_M
            if budget_hit:
                remaining = max(self._max_chunk - used, 0.0)
                dropped = len(actions) - index - 1
                if self._mode("chunk_translation") is RuleMode.reject:
                    self._decide(
                        decisions,
                        SafetyDecision(
                            "chunk_translation",
                            "reject",
                            f"chunk path would reach {_cm(used + length)} at action {index}, over the "
                            f"{_cm(self._max_chunk)} budget; action {index} and the {dropped} after it refused",
                            index,
                        ),
                    )
                    return self._finish(commands, decisions)
                scale = remaining / length
                target = tuple(p + (t - p) * scale for p, t in zip(position, plan.target))
                plan = _Plan(_snap_into(target, self._lo, self._hi), plan.gripper_open)  # type: ignore[arg-type]
                self._decide(
                    decisions,
                    SafetyDecision(
                        "chunk_translation",
                        "clamp",
                        f"chunk path would reach {_cm(used + length)} at action {index}, over the "
                        f"{_cm(self._max_chunk)} budget; action {index} shortened from {_cm(length)} to "
                        f"{_cm(remaining)} and the {dropped} after it dropped",
                        index,
                    ),
                )
            command = self._emit(action, position, plan, index, decisions, epoch, path_used=used)
            if command is None:
                return self._finish(commands, decisions)
            commands.append(command)
            used += command.length
            position = command.target
            if budget_hit:
                break
        return self._finish(commands, decisions)

    # --- execution-time gate (called by SafeCommand.authorize) -------------------------------------

    def _authorize(self, command: SafeCommand, now: float | None) -> float:
        """Refuse under a latched e-stop or a stale epoch; apply the rate limit; record the issue time."""
        with self._lock:
            if self._estop_reason is not None:
                raise EStopEngaged(f"e-stop engaged ({self._estop_reason}); reset it before moving")
            if command._limiter is not self:
                raise SafetyViolation("this command was checked by another limiter")
            if command._epoch != self._epoch:
                raise SafetyViolation(
                    "this command was checked before an e-stop or reset; check it again from the present pose"
                )
            now = self._clock() if now is None else now
            if not math.isfinite(now):
                raise SafetyViolation(f"the clock returned {now!r}; cannot apply the rate limit")
            wait = 0.0
            if self._last_issue is not None:
                earliest = self._last_issue + self._min_interval
                if now < earliest:
                    wait = earliest - now
                    rate = self._robot.limits.max_commands_per_s
                    if self._mode("rate") is RuleMode.reject:
                        reason = (
                            f"command comes {wait * 1000:.1f} ms too early for the limit of {rate:g} commands/s; "
                            "refused"
                        )
                        self._log_decision(SafetyDecision("rate", "reject", reason))
                        raise SafetyViolation(reason)
                    self._log_decision(
                        SafetyDecision(
                            "rate", "clamp", f"command delayed {wait * 1000:.1f} ms to keep within {rate:g} commands/s"
                        )
                    )
            self._last_issue = now + wait
            return wait

    # --- internals --------------------------------------------------------------------------------

    def _current_epoch(self) -> int:
        with self._lock:
            return self._epoch

    def _estop_block(self) -> str | None:
        reason = self.estop_reason
        return None if reason is None else f"e-stop engaged ({reason}); nothing moves until it is reset"

    def _mode(self, rule: str) -> RuleMode:
        return RuleMode(getattr(self._robot.rules, rule))

    def _plan(self, action: Action, start: Vec3, index: int | None, decisions: list[SafetyDecision]) -> _Plan | None:
        """Apply the per-action rules; None when a rule rejected (its decision is in `decisions`)."""

        def reject(rule: str, reason: str) -> None:
            self._decide(decisions, SafetyDecision(rule, "reject", reason, index))

        def clamp(rule: str, reason: str) -> None:
            self._decide(decisions, SafetyDecision(rule, "clamp", reason, index))

        blocked = self._estop_block()
        if blocked is not None:
            reject("estop", blocked)
            return None
        values = _action_values(action)
        if values is None or not all(math.isfinite(v) for v in values):
            reject("finite", f"action {_fmt_list(values)} holds a value that is not a finite number; refused")
            return None
        if not all(math.isfinite(v) for v in start):
            reject("finite", f"start pose {_fmt_list(start)} is not finite; the arm's position is unknown")
            return None
        dx, dy, dz, gripper = values

        # gripper
        if gripper in (GRIPPER_OPEN, GRIPPER_CLOSED):
            gripper_open = gripper == GRIPPER_OPEN
        elif self._mode("gripper") is RuleMode.clamp:
            gripper_open = abs(gripper - GRIPPER_OPEN) < abs(gripper - GRIPPER_CLOSED)
            snapped = "open (1)" if gripper_open else "closed (0)"
            clamp("gripper", f"gripper value {_fmt(gripper)} is neither open (1) nor closed (0); snapped to {snapped}")
        else:
            reject("gripper", f"gripper value {_fmt(gripper)} is neither open (1) nor closed (0); refused")
            return None

        # per-action translation
        norm = math.hypot(dx, dy, dz)
        if norm > self._max_action + TOLERANCE_M:
            if self._mode("action_translation") is RuleMode.reject:
                reject(
                    "action_translation",
                    f"move of {_cm(norm)} exceeds the {_cm(self._max_action)} per-action limit; refused",
                )
                return None
            scale = self._max_action / norm
            dx, dy, dz = dx * scale, dy * scale, dz * scale
            clamp(
                "action_translation",
                f"move of {_cm(norm)} exceeds the {_cm(self._max_action)} per-action limit; "
                f"scaled to {_cm(math.hypot(dx, dy, dz))} keeping its direction",
            )
        x, y, z = start[0] + dx, start[1] + dy, start[2] + dz

        # table floor
        floor = self._robot.z_floor
        if z < floor - TOLERANCE_M:
            if self._mode("table_floor") is RuleMode.reject:
                reject(
                    "table_floor",
                    f"target z {_fmt(z)} m is below the table floor {_fmt(floor)} m "
                    f"(table {_fmt(self._robot.table_z)} m + clearance {_fmt(self._robot.min_clearance_m)} m); refused",
                )
                return None
            clamp(
                "table_floor",
                f"target z {_fmt(z)} m is below the table floor {_fmt(floor)} m "
                f"(table {_fmt(self._robot.table_z)} m + clearance {_fmt(self._robot.min_clearance_m)} m); "
                "raised to the floor",
            )
            z = floor
        z = max(z, floor)  # a sub-nanometre rounding below the floor is snapped without a decision

        # workspace box
        box = self._robot.workspace
        lo = (box.x.min, box.y.min, box.z.min)
        hi = (box.x.max, box.y.max, box.z.max)
        target = (x, y, z)
        outside = _distance_outside(target, lo, hi)
        if outside > TOLERANCE_M:
            projected = tuple(min(max(v, a), b) for v, a, b in zip(target, lo, hi))
            described = (
                f"target {_fmt_list(target)} is {_cm(outside)} outside the workspace box "
                f"x[{_fmt(lo[0])}, {_fmt(hi[0])}] y[{_fmt(lo[1])}, {_fmt(hi[1])}] z[{_fmt(lo[2])}, {_fmt(hi[2])}]"
            )
            if self._mode("workspace") is RuleMode.reject:
                reject("workspace", f"{described}; refused")
                return None
            clamp("workspace", f"{described}; projected to {_fmt_list(projected)}")
        return _Plan(_snap_into(target, self._lo, self._hi), gripper_open)

    def _emit(
        self,
        action: Action,
        start: Vec3,
        plan: _Plan,
        index: int | None,
        decisions: list[SafetyDecision],
        epoch: int,
        path_used: float = 0.0,
    ) -> SafeCommand | None:
        """Verify the final command against every limit, independently of how it was reached, and make it."""
        target = plan.target
        length = math.dist(start, target)
        problem = None
        if not all(math.isfinite(v) for v in target):
            problem = f"target {_fmt_list(target)} is not finite"
        elif _distance_outside(target, self._lo, self._hi) > 0.0:
            problem = f"target {_fmt_list(target)} lies outside the allowed box"
        elif not length <= self._max_action + TOLERANCE_M:
            problem = (
                f"reaching the workspace takes {_cm(length)}, more than the {_cm(self._max_action)} per-action limit"
            )
        elif not path_used + length <= self._max_chunk + TOLERANCE_M:
            problem = f"the chunk path would reach {_cm(path_used + length)}, over the {_cm(self._max_chunk)} budget"
        if problem is not None:
            away = _distance_outside(start, self._lo, self._hi)
            if away > 0.0:
                reason = f"arm is {_cm(away)} outside the workspace at {_fmt_list(start)} and {problem}; home it first"
            else:  # unreachable by construction; kept so that a future bug refuses instead of moving
                reason = f"command from {_fmt_list(start)} fails the final safety check: {problem}; refused"
            self._decide(decisions, SafetyDecision("start_pose", "reject", reason, index))
            return None
        if self._reachable is not None:
            try:
                ok = bool(self._reachable(target))
            except Exception as exc:  # noqa: BLE001 - an IK failure of any kind is an unreachable pose
                ok = False
                detail = f" (inverse kinematics raised {type(exc).__name__}: {exc})"
            else:
                detail = ""
            if not ok:
                self._decide(
                    decisions,
                    SafetyDecision(
                        "reachability",
                        "reject",
                        f"target {_fmt_list(target)} is not reachable within the joint limits{detail}; refused",
                        index,
                    ),
                )
                return None
        own = tuple(d for d in decisions if d.index == index)  # index None: a lone action owns them all
        return SafeCommand(
            token=_LIMITER_TOKEN,
            limiter=self,
            start=start,
            target=target,
            gripper_open=plan.gripper_open,
            source=action,
            decisions=own,
            epoch=epoch,
        )

    def _decide(self, decisions: list[SafetyDecision], decision: SafetyDecision) -> None:
        decisions.append(decision)
        self._log_decision(decision)

    def _log_decision(self, decision: SafetyDecision) -> None:
        level = logging.WARNING if decision.verdict == "reject" else logging.INFO
        self._log.log(
            level,
            "safety rule=%s verdict=%s index=%s reason=%s",
            decision.rule,
            decision.verdict,
            "-" if decision.index is None else decision.index,
            json.dumps(decision.reason),
        )

    def _reject_chunk(self, decisions: list[SafetyDecision], decision: SafetyDecision) -> ChunkVerdict:
        self._decide(decisions, decision)
        return ChunkVerdict(commands=(), decisions=tuple(decisions), rejected=True, reason=decision.reason)

    @staticmethod
    def _finish(commands: list[SafeCommand], decisions: list[SafetyDecision]) -> ChunkVerdict:
        rejects = [d for d in decisions if d.verdict == "reject"]
        if rejects:
            return ChunkVerdict(tuple(commands), tuple(decisions), True, rejects[0].reason)
        clamps = sorted({d.rule for d in decisions if d.verdict == "clamp"})
        reason = f"clamped by {', '.join(clamps)}" if clamps else ""
        return ChunkVerdict(tuple(commands), tuple(decisions), False, reason)


# --- helpers -------------------------------------------------------------------------------------


def _as_vec3(start: Vec3) -> Vec3:
    values = tuple(float(v) for v in start)
    if len(values) != 3:
        raise ValueError(f"a start pose has 3 coordinates (x, y, z), got {len(values)}")
    return values


def _action_values(action: Action) -> tuple[float, float, float, float] | None:
    """The action's numbers as floats, or None when one is not a number at all."""
    try:
        return (float(action.dx), float(action.dy), float(action.dz), float(action.gripper))
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _distance_outside(point: Vec3, lo: Vec3, hi: Vec3) -> float:
    """Euclidean distance from `point` to the box [lo, hi]; 0 inside."""
    return math.hypot(*(max(a - v, 0.0, v - b) for v, a, b in zip(point, lo, hi)))


def _snap_into(point: Vec3, lo: Vec3, hi: Vec3) -> Vec3:
    """Clip onto the box faces: used only where the point is inside up to rounding (< TOLERANCE_M)."""
    return tuple(min(max(v, a), b) for v, a, b in zip(point, lo, hi))  # type: ignore[return-value]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _fmt_list(values: tuple[float, ...] | None) -> str:
    if values is None:
        return "(not numbers)"
    return "(" + ", ".join(_fmt(v) for v in values) + ")"


def _cm(metres: float) -> str:
    return f"{metres * 100:.3g} cm"
