"""Hostile input: model output through the parser and the safety limiter, requests to the daemon's API,
and config files. Each fuzzer returns one `Tally` (inputs tried, inputs handled cleanly, unsafe commands).

Generation uses plain `random` (seeded): ~100,000 parser/limiter inputs must fit in a bench run, which a
hypothesis search cannot do in reasonable time; the CI tests run the same generators at a small count.

The invariant behind `unsafe_commands`: every parsed chunk goes through the real `SafetyLimiter` and the
real `Arm.execute` into `LimitCheckingArm`, a double that re-checks each command it is asked to perform
against the robot's limits on its own (box, table floor, move length, chunk path, gripper, e-stop latch,
replays). A command that reaches its motors while breaking any of them counts as unsafe; there must be 0.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import random
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm2vla_edge.runtime.action_text import format_action_chunk
from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import (
    HARD_LIMITS,
    ActionLanguage,
    GripperValues,
    PolicyConfig,
    PostProcess,
    RobotConfig,
    load_config,
    load_robot_config,
    packaged_configs_dir,
)
from vlm2vla_edge.runtime.errors import ConfigError
from vlm2vla_edge.runtime.parser import MAX_TEXT_CHARS, ParseError, parse_action_chunk
from vlm2vla_edge.runtime.postprocess import reaggregate
from vlm2vla_edge.runtime.robot.base import Arm, ArmState, CommandRefusedError, MoveResult
from vlm2vla_edge.runtime.runtime_config import RuntimeConfig
from vlm2vla_edge.runtime.safety import SafeCommand, SafetyLimiter, SafetyViolation

from .tally import Tally

TOL = 1e-9  # the limiter's documented slack (safety.TOLERANCE_M), restated here on purpose
_SILENT = logging.getLogger("reliability.fuzz.silent")
_SILENT.disabled = True  # the limiter logs every decision; 100,000 chunks of that is noise, not evidence


# --- the arm double ------------------------------------------------------------------------------


class LimitCheckingArm(Arm):
    """An arm whose motors check every move against the robot's limits, independently of the limiter.

    `violations` lists each move that broke a limit (or arrived while the e-stop was latched, or
    replayed a command); `commands` counts the `SafeCommand`s it was handed. Nothing here trusts the limiter:
    the limits are read from the `RobotConfig` and re-checked against the arm's own position.
    """

    def __init__(self, robot: RobotConfig, limiter: SafetyLimiter) -> None:
        self.robot = robot
        self.limiter = limiter
        self.position: tuple[float, float, float] = (0.3, 0.0, 0.2)
        self.gripper_open = True
        self.commands = 0  # SafeCommands handed to execute()
        self.violations: list[str] = []
        self.moves = 0
        self._chunk_path = 0.0
        self._chunk_moves = 0
        self._moved: list[SafeCommand] = []  # this chunk's commands that reached the motors
        self._current: SafeCommand | None = None

    def place(self, position: tuple[float, float, float]) -> None:
        """Put the arm somewhere (by hand) and start a new chunk."""
        self.position = position
        self.begin_chunk()

    def begin_chunk(self) -> None:
        self._chunk_path = 0.0
        self._chunk_moves = 0
        self._moved = []

    def execute(self, command: SafeCommand, cancel: threading.Event | None = None) -> MoveResult:
        self.commands += 1
        self._current = command
        return super().execute(command, cancel)

    # -- Arm interface --
    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    @property
    def is_connected(self) -> bool:
        return True

    def read_state(self) -> ArmState:
        return ArmState(position=self.position, rpy=(0.0, 0.0, 0.0), gripper_open=self.gripper_open)

    def stop(self) -> None:
        pass

    def go_home(self) -> None:
        pass

    def go_sleep(self) -> None:
        pass

    def _move_to(self, target: tuple[float, float, float], cancel: threading.Event | None) -> MoveResult:
        problems = self.check(target)
        if any(c is self._current for c in self._moved):
            problems.append("a command was executed twice")
        self._moved.append(self._current)  # type: ignore[arg-type]
        if problems:
            self.violations.append(f"move {self.position} -> {target}: " + "; ".join(problems))
        self._chunk_path += math.dist(self.position, target)
        self._chunk_moves += 1
        self.position = (float(target[0]), float(target[1]), float(target[2]))
        self.moves += 1
        return MoveResult(completed=True, reached=self.position, error_m=0.0, duration_s=0.0)

    def _set_gripper(self, open_: bool) -> None:
        if open_ is not True and open_ is not False:
            self.violations.append(f"gripper command {open_!r} is neither open nor closed")
        self.gripper_open = bool(open_)

    def check(self, target: tuple[float, float, float]) -> list[str]:
        """Every limit a move from the present position to `target` breaks (empty: a safe move)."""
        robot, limits, hard = self.robot, self.robot.limits, self.robot.hard_limits
        problems: list[str] = []
        if self.limiter.engaged:
            problems.append("the e-stop is latched")
        if len(target) != 3 or not all(isinstance(v, float) and math.isfinite(v) for v in target):
            return [*problems, "target is not three finite floats"]
        for axis, value in zip("xyz", target):
            box, ceiling = getattr(robot.workspace, axis), getattr(hard.workspace, axis)
            if not box.min - TOL <= value <= box.max + TOL:
                problems.append(f"{axis}={value} outside the workspace [{box.min}, {box.max}]")
            if not ceiling.min <= value <= ceiling.max:
                problems.append(f"{axis}={value} outside the robot model's reach")
        if target[2] < robot.table_z + robot.min_clearance_m - TOL:
            problems.append(f"z={target[2]} below the table floor {robot.z_floor}")
        step = math.dist(self.position, target)
        if step > limits.max_translation_per_action_m + TOL:
            problems.append(f"move of {step} m over the per-action limit {limits.max_translation_per_action_m}")
        if self._chunk_path + step > limits.max_translation_per_chunk_m + TOL:
            problems.append(f"chunk path {self._chunk_path + step} m over {limits.max_translation_per_chunk_m}")
        if self._chunk_moves + 1 > limits.max_chunk_length:
            problems.append(f"more than {limits.max_chunk_length} moves in one chunk")
        return problems


@dataclass
class ParserFuzzStats:
    """What the parser/limiter inputs exercised (so a run that never reached the arm shows as such)."""

    parsed: int = 0  # inputs the parser accepted (the rest got a ParseError)
    raw_chunks: int = 0  # chunks given to the limiter without the parser (hostile floats)
    commands: int = 0  # SafeCommands the limiter emitted and the runner tried to execute
    moves: int = 0  # commands that reached the arm's motors
    estops: int = 0  # e-stops latched during the run
    by_kind: Counter[str] = field(default_factory=Counter)  # inputs per generator

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.items()))
        return (f"parsed {self.parsed}, raw chunks {self.raw_chunks}, commands {self.commands}, "
                f"moves {self.moves}, e-stops {self.estops} ({kinds})")


class _StepClock:
    """A clock that jumps one second per reading: the rate limit never makes the fuzzer sleep."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


# --- hostile model output ------------------------------------------------------------------------

_BASE_ROBOT = load_robot_config().model_dump(mode="json")
_RULES = ("workspace", "table_floor", "action_translation", "chunk_translation", "chunk_length", "gripper", "rate")
_NEAR_MISS = "[], -.0123456789 eE+naifNI\t\n'\"x"
_SPECIALS = "\u2212\u2013\uff10\uff11\u0663\u200b\u202e\ufeff\x00\x1b\x7f\u00a0\u3000\u00b2\ud800"
_HOSTILE_NUMBERS = (
    "1e308", "-1e-400", "1E5", "NaN", "nan", "-inf", "Infinity", "+0.1", "-0", "00.1", ".5", "0.", "0.1234",
    "9" * 400, "0." + "9" * 400, "0x1p3", "1_000", "\u0663", "\u22120.1", "0.1.2", "--0.1", "1/0", "'0.1'",
    "0.999", "-0.999", "1", "-1", "2", "0.5", "1e-3", "0.0001", "\uff10.1", "0.1\u200b", "null", "true",
)
_HOSTILE_FLOATS = (math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 2.0, -1.0, 1e-12, 0.999)


def _robot_pool(rng: random.Random, size: int) -> list[RobotConfig]:
    """The shipped robot with random rule modes, limits, workspace and floor (all valid configs)."""
    pool = [load_robot_config()]
    while len(pool) < size:
        data: dict[str, Any] = json.loads(json.dumps(_BASE_ROBOT))
        data["rules"] = {rule: "clamp" if rng.random() < 0.7 else "reject" for rule in _RULES}
        per_action = rng.uniform(0.005, 0.1)
        data["limits"] = {
            "max_translation_per_action_m": per_action,
            "max_translation_per_chunk_m": rng.uniform(per_action, 0.5),
            "max_chunk_length": rng.randint(1, 64),
            "max_commands_per_s": 10.0,
        }
        z_min = rng.uniform(-0.05, 0.1)
        data["workspace"]["z"] = {"min": z_min, "max": rng.uniform(0.3, 0.6)}
        data["table_z"] = rng.uniform(-0.02, 0.05)
        data["min_clearance_m"] = rng.uniform(0.0, 0.05)
        try:
            pool.append(RobotConfig.model_validate(data))
        except Exception:  # noqa: BLE001 - a random combination that is invalid is simply not used
            continue
    return pool


def _languages() -> list[ActionLanguage]:
    return [
        ActionLanguage(),
        ActionLanguage(max_abs_value_m=0.999),
        ActionLanguage(max_abs_value_m=0.999, max_steps=1),
        ActionLanguage(max_abs_value_m=0.5, gripper=GripperValues(open=0.0, closed=1.0)),
        ActionLanguage(decimals=1, postprocess=PostProcess(enabled=False)),
        ActionLanguage(max_abs_value_m=0.999, postprocess=PostProcess(enabled=False)),
    ]


def _valid_text(rng: random.Random, language: ActionLanguage) -> str:
    limit = min(language.max_abs_value_m, 0.999)
    n = rng.randint(1, language.max_steps)

    def value() -> float:
        roll = rng.random()
        if roll < 0.15:
            return rng.choice((limit, -limit, 0.0))
        if roll < 0.6:
            return round(rng.uniform(-0.06, 0.06), 3)
        return round(rng.uniform(-limit, limit), 3)

    chunk = ActionChunk(tuple(Action(value(), value(), value(), rng.choice((0.0, 1.0))) for _ in range(n)))
    return format_action_chunk(chunk, language)


def _mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        pos = rng.randrange(len(chars) + 1)
        pool = _NEAR_MISS if rng.random() < 0.85 else _SPECIALS
        if op < 0.3 or not chars:
            chars.insert(pos, rng.choice(pool))
        elif op < 0.55:
            del chars[min(pos, len(chars) - 1)]
        elif op < 0.8:
            chars[min(pos, len(chars) - 1)] = rng.choice(pool)
        else:  # duplicate or cut a span (repeated actions, truncated output)
            a, b = sorted((rng.randrange(len(chars)), rng.randrange(len(chars))))
            chars = chars[:b] + chars[a:b] + chars[b:] if rng.random() < 0.5 else chars[:a] + chars[b:]
    return "".join(chars)


def _hostile_numbers(rng: random.Random, language: ActionLanguage) -> str:
    text = _valid_text(rng, language)
    parts = text.split(", ")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(parts))
        head = parts[i][: len(parts[i]) - len(parts[i].lstrip("["))]
        tail = parts[i][len(parts[i].rstrip("]")) :]
        parts[i] = head + rng.choice(_HOSTILE_NUMBERS) + tail
    return ", ".join(parts)


def _nesting(rng: random.Random, language: ActionLanguage) -> str:
    depth = rng.choice((1, 2, 3, 50, 1000, rng.randint(1, 30_000)))
    inner = _valid_text(rng, language) if rng.random() < 0.5 else "0.1, 0, 0, 1"
    opened, closed = depth, depth + rng.choice((0, 0, -1, 1))
    return "[" * opened + inner + "]" * max(closed, 0)


def _long(rng: random.Random, language: ActionLanguage) -> str:
    roll = rng.random()
    if roll < 0.4:  # far more actions than allowed
        action = "[0.01, 0, 0, 1]"
        return "[" + ", ".join([action] * rng.choice((17, 65, 200, 3000))) + "]"
    if roll < 0.6:  # just over the size cap, or far over it (must be rejected cheaply)
        return "[" + "0" * (MAX_TEXT_CHARS + rng.choice((0, 1, 10, 5_000_000))) + "]"
    if roll < 0.8:  # whitespace padding around a valid chunk
        pad = rng.choice(" \t\n\r\x0b\x0c") * rng.randint(1, 40_000)
        return pad + _valid_text(rng, language) + pad
    return _valid_text(rng, language) * rng.randint(2, 200)


def _random_unicode(rng: random.Random, _: ActionLanguage) -> str:
    n = rng.randint(0, 200)
    ranges = ((0, 0x7F), (0x80, 0x2FF), (0x2000, 0x206F), (0xD800, 0xDFFF), (0xFF00, 0xFFEF), (0x10000, 0x10FFFF))
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def _random_bytes(rng: random.Random, _: ActionLanguage) -> str:
    raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    return raw.decode(rng.choice(("latin-1", "utf-8")), errors=rng.choice(("replace", "surrogateescape", "ignore")))


_GENERATORS: tuple[tuple[str, float, Callable[[random.Random, ActionLanguage], str]], ...] = (
    ("valid", 0.30, _valid_text),
    ("mutated", 0.30, lambda rng, lang: _mutate(rng, _valid_text(rng, lang))),
    ("numbers", 0.15, _hostile_numbers),
    ("nesting", 0.04, _nesting),
    ("long", 0.02, _long),
    ("unicode", 0.07, _random_unicode),
    ("bytes", 0.07, _random_bytes),
    ("not_text", 0.01, lambda rng, lang: rng.choice((None, b"[[0.1, 0, 0, 1]]", 42, [[0.1, 0, 0, 1]], 1.5))),  # type: ignore[arg-type,return-value]
    ("raw_actions", 0.04, lambda rng, lang: ""),  # bypasses the parser: the limiter alone must hold
)


def _start_pose(rng: random.Random, robot: RobotConfig) -> tuple[float, float, float]:
    box = robot.workspace
    roll = rng.random()
    if roll < 0.75:  # inside the allowed box
        return (rng.uniform(box.x.min, box.x.max), rng.uniform(box.y.min, box.y.max),
                rng.uniform(max(box.z.min, robot.z_floor), box.z.max))
    if roll < 0.9:  # on or near a face
        point = [rng.uniform(i.min, i.max) for i in (box.x, box.y, box.z)]
        axis = rng.randrange(3)
        face = (box.x, box.y, box.z)[axis]
        point[axis] = rng.choice((face.min, face.max)) + rng.choice((0.0, 1e-10, -1e-10, 0.01, -0.01))
        return tuple(point)  # type: ignore[return-value]
    if roll < 0.97:  # somewhere outside (the arm was moved by hand)
        return (rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), rng.uniform(-0.4, 1.0))
    return (rng.choice(_HOSTILE_FLOATS), 0.0, 0.2)  # an arm whose position reads as garbage


def _raw_chunk(rng: random.Random) -> ActionChunk:
    def value() -> float:
        return rng.choice(_HOSTILE_FLOATS) if rng.random() < 0.3 else rng.uniform(-0.3, 0.3)

    n = rng.randint(0, 80)
    return ActionChunk(
        tuple(Action(value(), value(), value(), rng.choice((0.0, 1.0, 0.5, math.nan, 2.0))) for _ in range(n))
    )


def _pick(rng: random.Random) -> tuple[str, Callable[[random.Random, ActionLanguage], str]]:
    roll, acc = rng.random(), 0.0
    for name, weight, gen in _GENERATORS:
        acc += weight
        if roll < acc:
            return name, gen
    return _GENERATORS[0][0], _GENERATORS[0][2]


def fuzz_parser_and_limiter(n: int, seed: int = 0, stats: ParserFuzzStats | None = None) -> Tally:
    """`n` hostile model outputs: parse, post-process, limit, execute on `LimitCheckingArm`.

    A run survives when the parser answers a parsed chunk or a `ParseError` (nothing else), and every
    command that reaches the arm keeps every limit; each command that does not is one unsafe command.
    E-stops are latched at random points (before the check, between check and execution), commands
    are replayed, and the arm starts inside, on, near and outside the workspace.
    """
    rng = random.Random(seed)
    tally = Tally("fuzz", "parser+limiter")
    robots = _robot_pool(rng, 24)
    limiters = [SafetyLimiter(r, reachable=None, clock=_StepClock(), logger=_SILENT) for r in robots]
    arms = [LimitCheckingArm(r, lim) for r, lim in zip(robots, limiters)]
    languages = _languages()
    for i in range(n):
        kind, gen = _pick(rng)
        which = rng.randrange(len(robots))
        robot, limiter, arm = robots[which], limiters[which], arms[which]
        language = rng.choice(languages)
        before, commands_before, moves_before = len(arm.violations), arm.commands, arm.moves
        stats.by_kind[kind] += 1
        try:
            if kind == "raw_actions":
                chunk = _raw_chunk(rng)
                stats.raw_chunks += 1
            else:
                text = gen(rng, language)
                try:
                    chunk = parse_action_chunk(text, language)
                except ParseError:
                    tally.record(True, "")
                    continue
                stats.parsed += 1
                chunk = reaggregate(chunk, language.postprocess)
            stats.estops += _limit_and_execute(rng, robot, limiter, arm, chunk)
        except Exception as exc:  # noqa: BLE001 - any other exception is a finding
            tally.record(False, f"input {i} ({kind}): {type(exc).__name__}: {str(exc)[:200]}")
            limiter.reset()
            continue
        finally:
            stats.commands += arm.commands - commands_before
            stats.moves += arm.moves - moves_before
        new = arm.violations[before:]
        tally.unsafe_commands += len(new)
        tally.record(not new, f"input {i} ({kind}): unsafe command: {new[0] if new else ''}")
    return tally


def _limit_and_execute(
    rng: random.Random, robot: RobotConfig, limiter: SafetyLimiter, arm: LimitCheckingArm, chunk: ActionChunk
) -> int:
    """Check `chunk` from a random start and execute what the limiter approves; returns e-stops latched."""
    estops = 0
    start = _start_pose(rng, robot)
    arm.place(start)
    roll = rng.random()
    if roll < 0.03:
        limiter.estop("fuzz: before the check")
        estops += 1
    verdict = limiter.check_chunk(chunk, start)
    if roll < 0.03 and verdict.commands:
        raise AssertionError("the limiter approved commands while the e-stop was latched")
    if 0.03 <= roll < 0.08 and verdict.commands:
        limiter.estop("fuzz: between check and execution")
        estops += 1
        if rng.random() < 0.5:
            limiter.reset()  # commands checked before an e-stop stay void after the reset
    stop_at = rng.randrange(len(verdict.commands)) if verdict.commands and rng.random() < 0.05 else None
    executed: list[SafeCommand] = []
    for index, command in enumerate(verdict.commands):
        if index == stop_at:
            limiter.estop("fuzz: mid-chunk")
            estops += 1
        try:
            arm.execute(command)
            executed.append(command)
        except (SafetyViolation, CommandRefusedError):
            break  # refused: the runner stops the chunk here too
    if executed and rng.random() < 0.05:
        with contextlib.suppress(SafetyViolation, CommandRefusedError):  # a replay must be refused before it moves
            arm.execute(rng.choice(executed))
    limiter.reset()
    return estops


# --- hostile API requests --------------------------------------------------------------------------

_METHODS = (
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "HEAD",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "FOO",
    "get",
    'G"ET',
    "G\\ET",
    "X" * 300,
)
_ENDPOINTS = ("/v1/health", "/v1/status", "/v1/tasks", "/v1/estop", "/v1/reset", "/metrics")
_HOSTILE_PATHS = (
    "/v1/tasks/../../etc/passwd", "/v1/tasks/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/v1/tasks/..", "/v1/tasks/.",
    "/v1/tasks/a..b", "/v1/tasks/~root", "/v1/tasks/%00", "/v1/tasks/x%0d%0aSet-Cookie:%20a", "//v1//status",
    "/v1/status/", "/metrics/../v1/status", "*", "http://evil.example/v1/status", "/v1/tasks/" + "a" * 80,
    "/v1/tasks/" + "a" * 81, "/v1/tasks/\u00e9", "/v1/status?" + "x=1&" * 2000, "/v1/tasks/x/events?since=-1",
    "/v1/tasks/x/events?since=1e9", "/v1/tasks/x/events?since=\u00b2", "/v1/tasks/x/events?since=9999999999",
    "/v1/tasks/x/cancel", "/v1/tasks/x/events/../cancel", "/" + "a/" * 3000, "/v1/" + "%" * 50, "",
)
_HOSTILE_INSTRUCTIONS = (
    "", " ", "\t\n", "\x00", "lift\x00 the carrot", "lift\x1b[31m the carrot", "\u202eliftoff", "\u200b",
    "\ud800", "\udfff lift", "\ufeff", "../../etc/passwd", "/etc/shadow", "~/.ssh/id_rsa", "%s%s%n",
    "{{7*7}}", "'; DROP TABLE tasks; --", "lift the carrot " * 40, "\U0001f955" * 60, "e\u0301" * 90,
    "A" * 201, "lift the carrot", "put the eggplant in the pot",
)
_PATHLIKE_KEYS = ("path", "episode_dir", "episodes_dir", "bundle", "config", "file", "../../etc/passwd", "socket",
                  "device", "id", "episode", "__proto__", "", "instruction ", "Instruction")


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice((None, True, False, 0, -1, 10**30, 1.5, 1e308, "x", rng.choice(_HOSTILE_INSTRUCTIONS)))
    if roll < 0.6:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(_PATHLIKE_KEYS): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _api_body(rng: random.Random, limit: int) -> tuple[str, bytes]:
    roll = rng.random()
    if roll < 0.15:
        return "bad json", rng.choice((
            b"{not json", b'{"instruction": ', b'{"instruction": NaN}', b'{"instruction": Infinity}', b"\xff\xfe{}",
            b'"lift the carrot"', b"42", b"null", b"[]", b'{"instruction": "a\\ud800"}', b'{"instruction": "\\u0000"}',
            b"{" + b'"a":' * rng.randint(1, limit // 4), b"[" * rng.randint(1, limit), b"{}" * 3,
            b'{"instruction": 1' + b"0" * 5000 + b"}", b'{"instruction": "lift", "instruction": 5}',
            bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))),
        ))
    if roll < 0.35:
        return "wrong types", json.dumps({"instruction": _json_value(rng, 2)}).encode()
    if roll < 0.65:
        text = rng.choice(_HOSTILE_INSTRUCTIONS)
        return "instruction", json.dumps({"instruction": text}, ensure_ascii=rng.random() < 0.5).encode(
            "utf-8", "surrogatepass"
        )
    if roll < 0.85:
        body = {"instruction": "lift the carrot", rng.choice(_PATHLIKE_KEYS): _json_value(rng, 2)}
        return "path-like fields", json.dumps(body).encode()
    return "any json", json.dumps(_json_value(rng)).encode()


def _api_request(rng: random.Random, limit: int) -> tuple[str, bytes, bool, bool]:
    """(kind, raw request bytes, half-close after sending, is HEAD)."""
    roll = rng.random()
    method, path = rng.choice(("GET", "POST")), rng.choice(_ENDPOINTS)
    headers: list[tuple[str, str]] = [("Host", "localhost")]
    body = b""
    kind = "endpoint"
    if roll < 0.45:
        method, path = "POST", rng.choice(("/v1/tasks", "/v1/tasks", "/v1/estop", "/v1/reset", "/v1/tasks/x/cancel"))
        kind, body = _api_body(rng, limit)
        headers.append(("Content-Type", rng.choice(("application/json", "application/json; charset=utf-8", "text/plain",
                                                      "application/JSON", "multipart/form-data; boundary=x"))))
    elif roll < 0.6:
        kind, path = "path", rng.choice(_HOSTILE_PATHS)
        method = rng.choice(("GET", "GET", "POST", "HEAD"))
    elif roll < 0.68:
        kind, method = "method", rng.choice(_METHODS)
    elif roll < 0.8:
        kind = "headers"
        method, path = "POST", "/v1/tasks"
        body = b'{"instruction": "lift the carrot"}'
        choice = rng.randrange(9)
        if choice == 0:
            headers.append(
                (
                    "Content-Length",
                    rng.choice(
                        ("-1", "abc", "\u00b2", "\u00b9\u00b3", "1e3", "+5", " 5", "99999999999999999999", "0x10")
                    ),
                )
            )
        elif choice == 1:
            headers += [("Content-Length", str(len(body))), ("Content-Length", "3")]
        elif choice == 2:
            headers.append(("Transfer-Encoding", "chunked"))
            body = b"5\r\nhello\r\n0\r\n\r\n"
        elif choice == 3:
            headers += [(f"X-Flood-{i}", "y") for i in range(rng.choice((50, 101, 500)))]
        elif choice == 4:
            headers.append(("X-Long", "z" * rng.choice((1000, 70_000))))
        elif choice == 5:
            headers.append(("Authorization", "Bearer " + "t" * rng.randint(0, 5000)))
        elif choice == 6:
            headers.append(("Bad Header", "x"))
        elif choice == 7:
            headers.append(("X-Ctl", "a\x00b\x7f\u00ff"))
        else:
            headers = []  # no Host, HTTP/1.1
    elif roll < 0.88:
        kind = "oversized"
        method, path = "POST", rng.choice(("/v1/tasks", "/v1/estop"))
        size = rng.choice((limit + 1, limit * 4, 1_048_576, 1_048_577, 50_000_000))
        headers += [("Content-Type", "application/json"), ("Content-Length", str(size))]
        # The whole body up to 1 MiB (the server drains that much before its 413); beyond, only a start.
        body = (b'{"instruction": "' + b"a" * size)[: size if size <= 1_048_576 else limit * 2]
        return kind, _render(method, path, headers, body, explicit_length=True), False, False
    elif roll < 0.95:
        kind = "partial body"
        method, path = "POST", "/v1/tasks"
        full = b'{"instruction": "lift the carrot"}'
        cut = rng.randrange(len(full))
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(full)))]
        return kind, _render(method, path, headers, full[:cut], explicit_length=True), True, False
    else:
        kind = "request line"
        line = rng.choice(
            (
                b"GET /v1/status HTTP/1.1\x01",
                b"GET /v1/status HTTP/2.0",
                b"GET /v1/status HTTP/1.0",
                b"GET /v1/status",
                b"GET  /v1/status  HTTP/1.1",
                b"GET /v1/status HTTP/1.1 extra",
                b"\x00\x01\x02",
                b'GET /v1/status HTTP/1.1"',
                b"GET /v1/st\\atus HTTP/1.1\\",
                b"GET " + b"/a" * 40_000 + b" HTTP/1.1",
                b"\r\n\r\n",
                b"HTTP/1.1 200 OK",
            )
        )
        return kind, line + b"\r\nHost: x\r\n\r\n", True, False
    version = rng.choice(("HTTP/1.1", "HTTP/1.1", "HTTP/1.0"))
    return kind, _render(method, path, headers, body, version=version), False, method == "HEAD"


def _render(method: str, path: str, headers: list[tuple[str, str]], body: bytes, *, version: str = "HTTP/1.1",
            explicit_length: bool = False) -> bytes:
    lines = [f"{method} {path} {version}"]
    names = {name.lower() for name, _ in headers}
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not explicit_length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("utf-8", "surrogatepass") + b"\r\n\r\n" + body


def fuzz_api(n: int, seed: int = 0, *, timeout_s: float = 5.0, slowloris: int = 8) -> Tally:
    """`n` hostile requests to a real in-process daemon API (Unix socket), then `slowloris` connections
    that send part of a request and stall while the daemon must keep answering others.

    A request survives when it gets a clean answer within `timeout_s`: a status below 500 and, for
    4xx, the API's JSON error object. Every 200 requests, and at the end, `/v1/health` must answer.
    """
    from vlm2vla_edge.runtime.runtime_config import DaemonConfig

    from .load import clean_error, daemon_in_process, raw_exchange

    rng = random.Random(seed)
    tally = Tally("fuzz", "API requests")
    limit = 4096
    stderr = io.StringIO()  # an uncaught exception's traceback printed past the log would land here
    server_errors = _ErrorRecords()  # the HTTP server's own errors (uvicorn: "Exception in ASGI application")
    with tempfile.TemporaryDirectory(prefix="reliability-api-") as tmp, _quiet_daemon_log(), \
            contextlib.redirect_stderr(stderr), server_errors.watching("uvicorn.error"):
        folder = Path(tmp)
        config = DaemonConfig(socket_path=folder / "d.sock", max_request_bytes=limit, max_instruction_chars=200)
        with daemon_in_process(folder, config) as (daemon, path):
            for i in range(n):
                kind, data, half_close, head = _api_request(rng, limit)
                response = raw_exchange(path, data, timeout_s, half_close=half_close, head=head)
                problem = clean_error(response, head)
                if problem is None and response.elapsed_s > timeout_s:
                    problem = f"answered after {response.elapsed_s:.1f} s"
                tally.record(problem is None, f"request {i} ({kind}) {data[:120]!r}: {problem}")
                if i % 200 == 199 or i == n - 1:
                    health = raw_exchange(path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", timeout_s)
                    tally.record(
                        health.status == 200, f"after request {i}: /v1/health answered {health.status} ({health.error})"
                    )
                if daemon.station.limiter.engaged and rng.random() < 0.5:
                    with contextlib.suppress(Exception):
                        daemon.reset(wait_s=2.0)
            _slowloris(path, slowloris, timeout_s, tally)
    crashes = stderr.getvalue().count("Traceback (most recent call last)")
    tally.record(crashes == 0, f"{crashes} request handlers ended in an uncaught exception (a traceback on stderr, "
                               f"not in the log): {_last_exception_line(stderr.getvalue())}")
    tally.record(not server_errors.messages, f"{len(server_errors.messages)} errors from the HTTP server itself, "
                                             f"e.g. {server_errors.messages[:1]}")
    return tally


class _ErrorRecords(logging.Handler):
    """Collects ERROR (and worse) records of one logger for the duration of `watching`."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.getMessage()[:150]} ({record.exc_info[1]!r})" if record.exc_info else
                             record.getMessage()[:200])

    @contextlib.contextmanager
    def watching(self, name: str) -> Iterator[None]:
        logger = logging.getLogger(name)
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)


def _last_exception_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line and not line.startswith((" ", "-", "Traceback"))]
    return lines[-1][:200] if lines else ""


@contextlib.contextmanager
def _quiet_daemon_log() -> Iterator[None]:
    """The in-process daemon logs every bad request; the fuzz report counts them instead."""
    logger = logging.getLogger("vlm2vla_edge")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    previous, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = previous


def _slowloris(path: Path, connections: int, timeout_s: float, tally: Tally) -> None:
    """Stalled partial requests must not block other clients (each gets its own handler thread)."""
    from .load import raw_exchange

    stalled: list[socket.socket] = []
    try:
        for i in range(connections):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            stalled.append(sock)
            for _ in range(100):  # the listen backlog is tested elsewhere (load); here: stalled clients
                try:
                    sock.connect(str(path))
                    break
                except BlockingIOError:
                    time.sleep(0.01)
            partial = [b"GET /v1/sta", b"POST /v1/tasks HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"instr"][i % 2]
            sock.sendall(partial)
        began = time.monotonic()
        health = raw_exchange(path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", timeout_s)
        tally.record(health.status == 200 and time.monotonic() - began < timeout_s,
                     f"with {connections} stalled connections /v1/health answered {health.status} ({health.error})")
    finally:
        for sock in stalled:
            sock.close()


# --- hostile config files ----------------------------------------------------------------------------

_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


def _config_sources() -> list[tuple[type, dict[str, Any]]]:
    configs = packaged_configs_dir()
    robot = yaml.safe_load((configs / "robots" / "widowx250s.yaml").read_text())
    policy = yaml.safe_load((configs / "policy.yaml").read_text()) or {}
    runtime = yaml.safe_load((configs / "runtime.yaml").read_text()) or {}
    return [(RobotConfig, robot), (PolicyConfig, policy), (RuntimeConfig, runtime)]


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*prefix, index))
    return found


def _set(data: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


_HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, "x", "", [], {}, [1, 2], {"min": 1}, -1, 0, 1e-300, 1e300, float("nan"), float("inf"), -float("inf"),
    10**400, -0.0, 0.7, -0.7, 0.9, 65, 51.0, "0.05", "1e3", "~", "\x00", "a" * 5000, [[[[[]]]]],
)


def _mutated_config(rng: random.Random, base: dict[str, Any]) -> str:
    """A YAML text: the shipped config with random hostile edits, or one of the structural attacks."""
    roll = rng.random()
    if roll < 0.05:
        return _BOMB + rng.choice(
            ("name: *i\n", "model: *i\n", "home_joints: [*i, *i]\n", "limits: *i\n", "sampling: *h\n")
        )
    if roll < 0.08:
        return "[" * rng.choice((100, 1000, 20_000)) + "]" * rng.choice((0, 100, 20_000))
    if roll < 0.11:
        return rng.choice(("", "~", "42", "- a\n- b", "a: b: c", "\t\x00", "\xff\xfe", "a: !!python/object:os.system x",
                           "a: !!binary AAAA", "? [a, b]\n: c", "{a: 1, a: 2}", "%YAML 9.9\n---\na: 1"))
    if roll < 0.14:
        return "# padding\n" * rng.choice((1000, 120_000)) + yaml.safe_dump(base)
    data = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 4)):
        paths = _paths(data)
        op = rng.random()
        if op < 0.6 and paths:
            _set(data, rng.choice(paths), copy.deepcopy(rng.choice(_HOSTILE_VALUES)))
        elif op < 0.75 and paths:
            where = rng.choice(paths)
            parent = data
            for key in where[:-1]:
                parent = parent[key]
            if isinstance(parent, dict):
                parent.pop(where[-1], None)
        elif op < 0.9:
            target = data
            for key in rng.choice([()] + paths):
                if isinstance(target, dict) and key in target and isinstance(target[key], dict):
                    target = target[key]
            target[rng.choice(("extra", "worksapce", "limits ", "off", "enabled", "__class__", "../../x"))] = 1
        elif paths:  # a numeric limit scaled up or down
            where = rng.choice(paths)
            parent = data
            for key in where[:-1]:
                parent = parent[key]
            value = parent[where[-1]]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                with contextlib.suppress(OverflowError):  # 10**400 * 0.5
                    parent[where[-1]] = value * rng.choice((-1, 0.5, 1.5, 10, 1000))
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    try:
        return yaml.dump(data, Dumper=dumper, allow_unicode=True)
    except Exception:  # noqa: BLE001 - 10**400 and friends: write it by hand
        return json.dumps(data, default=str)


def widens_hard_limits(robot: RobotConfig) -> list[str]:
    """What in a loaded robot config lies outside its model's hard limits (empty: nothing)."""
    hard = HARD_LIMITS[robot.model]
    problems: list[str] = []
    for axis in "xyz":
        mine, ceiling = getattr(robot.workspace, axis), getattr(hard.workspace, axis)
        if not (
            math.isfinite(mine.min) and math.isfinite(mine.max) and ceiling.min <= mine.min < mine.max <= ceiling.max
        ):
            problems.append(f"workspace.{axis} [{mine.min}, {mine.max}]")
    for name in (
        "max_translation_per_action_m",
        "max_translation_per_chunk_m",
        "max_chunk_length",
        "max_commands_per_s",
    ):
        value = getattr(robot.limits, name)
        if not (math.isfinite(value) and 0 < value <= getattr(hard, name)):
            problems.append(f"limits.{name} = {value}")
    if not (math.isfinite(robot.z_floor) and robot.z_floor < robot.workspace.z.max):
        problems.append(f"z_floor {robot.z_floor}")
    return problems


def fuzz_configs(n: int, seed: int = 0, *, timeout_s: float = 10.0) -> Tally:
    """`n` mutated robot, policy and runtime config files through `load_config`.

    A file survives when it loads into a config that keeps every hard limit, or fails with a
    `ConfigError` whose message names the file, within `timeout_s`. Any other exception, a message
    without the file name, or a load slower than the timeout is a finding.
    """
    rng = random.Random(seed)
    tally = Tally("fuzz", "config files")
    sources = _config_sources()
    with tempfile.TemporaryDirectory(prefix="reliability-config-") as tmp:
        for i in range(n):
            model, base = rng.choice(sources)
            text = _mutated_config(rng, base)
            path = Path(tmp) / f"config-{i}.yaml"
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            began = time.monotonic()
            try:
                loaded = load_config(path, model)
            except ConfigError as exc:
                message = str(exc)
                elapsed = time.monotonic() - began
                ok = str(path) in message and elapsed < timeout_s and len(message) < 4000
                tally.record(ok, f"config {i} ({model.__name__}): ConfigError in {elapsed:.1f} s, "
                                 f"{len(message)} chars, naming the file: {str(path) in message}: {message[:200]}")
            except Exception as exc:  # noqa: BLE001 - anything but a ConfigError is a finding
                tally.record(False, f"config {i} ({model.__name__}): {type(exc).__name__}: {str(exc)[:200]}")
            else:
                elapsed = time.monotonic() - began
                wide = widens_hard_limits(loaded) if isinstance(loaded, RobotConfig) else []
                tally.record(not wide and elapsed < timeout_s,
                             f"config {i}: loaded in {elapsed:.1f} s; outside the hard limits: {wide}")
            finally:
                path.unlink()
    return tally
