"""Validated configuration: the robot (limits, poses), the policy (stages, sampling) and the runtime.

Configs are YAML files checked by the pydantic models below. A bad file is reported as one sentence
naming the file, the field and the allowed range (`ConfigError`), never as a traceback.

Safety limits live only in the robot config, and even there they cannot be loosened past the
hard ceilings of the robot model (`HARD_LIMITS`): a config can tighten a limit or choose between
clamping and rejecting, but it cannot switch the limiter off.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlm2vla_edge.runtime.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https://, got {value!r}")
    return value


#: An http(s) endpoint, e.g. a cloud API override (a proxy, or a local fake server in tests).
HttpUrl = Annotated[str, AfterValidator(_http_url)]


class Interval(StrictModel):
    """A closed interval [min, max] in the unit of the field that holds it."""

    min: FiniteFloat
    max: FiniteFloat

    @model_validator(mode="after")
    def _ordered(self) -> "Interval":
        if not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be smaller than max ({self.max})")
        return self

    def contains(self, value: float) -> bool:
        return self.min <= value <= self.max

    def clamp(self, value: float) -> float:
        return min(max(value, self.min), self.max)

    def within(self, outer: "Interval") -> bool:
        return outer.min <= self.min and self.max <= outer.max


class WorkspaceBox(StrictModel):
    """Axis-aligned box, in metres, in the robot base frame, that the end effector must stay inside."""

    x: Interval
    y: Interval
    z: Interval


class RuleMode(str, Enum):
    """What a safety rule does with a command that breaks it."""

    clamp = "clamp"  # change the command to the nearest allowed one, and record that it was changed
    reject = "reject"  # refuse the command (and, for chunk rules, the rest of the chunk)


class SafetyRules(StrictModel):
    """Per rule: clamp or reject. There is deliberately no 'off'."""

    workspace: RuleMode = Field(RuleMode.clamp, description="End-effector target outside the workspace box.")
    table_floor: RuleMode = Field(RuleMode.clamp, description="Target below table_z + min_clearance_m.")
    action_translation: RuleMode = Field(
        RuleMode.clamp, description="One action moves farther than max_translation_per_action_m."
    )
    chunk_translation: RuleMode = Field(
        RuleMode.clamp,
        description="A chunk's path is longer than max_translation_per_chunk_m "
        "(clamp: the moves past the budget are shortened).",
    )
    chunk_length: RuleMode = Field(
        RuleMode.reject, description="A chunk has more than max_chunk_length actions (clamp: truncate)."
    )
    gripper: RuleMode = Field(
        RuleMode.reject, description="A gripper value that is neither open nor closed (clamp: snap to nearest)."
    )
    rate: RuleMode = Field(
        RuleMode.clamp,
        description="Commands faster than max_commands_per_s (clamp: the command is delayed; reject: refused).",
    )
    # Unreachable targets (inverse kinematics fails within joint limits) are always rejected: there is no
    # safe way to 'clamp' a pose the arm cannot reach.


class StepLimits(StrictModel):
    """Bounds on motion per command, per chunk and per second."""

    max_translation_per_action_m: float = Field(0.05, gt=0, description="Longest single end-effector move, metres.")
    max_translation_per_chunk_m: float = Field(0.20, gt=0, description="Longest path of one chunk, metres.")
    max_chunk_length: int = Field(10, ge=1, description="Most actions in one chunk.")
    max_commands_per_s: float = Field(10.0, gt=0, description="Most arm commands per second.")


class GripperValues(StrictModel):
    """The action language's gripper values (what the model writes); the parser maps them to the
    canonical `Action.gripper` (1.0 = open, 0.0 = closed)."""

    open: float = Field(1.0, description="Value meaning 'open' in an action.")
    closed: float = Field(0.0, description="Value meaning 'closed' in an action.")

    @model_validator(mode="after")
    def _distinct(self) -> "GripperValues":
        if self.open == self.closed:
            raise ValueError("open and closed gripper values must differ")
        return self


class GripperHardware(StrictModel):
    """How the robot's gripper is driven (the action's gripper value is always 1 = open, 0 = closed)."""

    pressure: float = Field(0.5, ge=0.0, le=1.0, description="Interbotix gripper pressure (effort fraction).")
    settle_s: float = Field(0.4, ge=0.0, le=5.0, description="Time to wait for the fingers after a gripper command.")


class HardLimits(StrictModel):
    """Ceilings of a robot model that no config may exceed (physical reach and sane speeds)."""

    workspace: WorkspaceBox
    max_translation_per_action_m: float
    max_translation_per_chunk_m: float
    max_chunk_length: int
    max_commands_per_s: float
    joint_names: tuple[str, ...]


# WidowX 250 6DOF: 650 mm reach from the shoulder; the base sits on the table (table z = 0).
HARD_LIMITS: dict[str, HardLimits] = {
    "wx250s": HardLimits(
        workspace=WorkspaceBox(
            x=Interval(min=-0.70, max=0.70), y=Interval(min=-0.70, max=0.70), z=Interval(min=-0.30, max=0.90)
        ),
        max_translation_per_action_m=0.10,
        max_translation_per_chunk_m=0.50,
        max_chunk_length=64,
        max_commands_per_s=50.0,
        joint_names=("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate"),
    ),
}


class RobotConfig(StrictModel):
    """One robot: its geometry limits, poses and safety rules. The only source of safety limits."""

    name: str = Field(description="Human-readable name of this robot setup.")
    model: Literal["wx250s"] = Field(description="Robot model; selects the hard limits and kinematics.")
    workspace: WorkspaceBox = Field(description="Box the end effector must stay in (metres, base frame).")
    table_z: FiniteFloat = Field(0.0, description="Height of the table surface in the base frame (metres).")
    min_clearance_m: float = Field(
        0.01, ge=0, le=0.2, description="Lowest allowed end-effector height above the table (metres)."
    )
    joint_limits: dict[str, Interval] = Field(description="Joint limits in radians, by joint name.")
    limits: StepLimits = Field(default_factory=StepLimits)
    rules: SafetyRules = Field(default_factory=SafetyRules)
    gripper: GripperHardware = Field(default_factory=GripperHardware)
    home_joints: tuple[float, ...] = Field(description="Joint positions (rad) of the home pose, in joint order.")
    sleep_joints: tuple[float, ...] = Field(description="Joint positions (rad) of the sleep (rest) pose.")

    @property
    def hard_limits(self) -> HardLimits:
        return HARD_LIMITS[self.model]

    @property
    def z_floor(self) -> float:
        """Lowest end-effector z a command may reach: the table plus the clearance."""
        return self.table_z + self.min_clearance_m

    @model_validator(mode="after")
    def _within_hard_limits(self) -> "RobotConfig":
        hard = self.hard_limits
        for axis in ("x", "y", "z"):
            mine: Interval = getattr(self.workspace, axis)
            ceiling: Interval = getattr(hard.workspace, axis)
            if not mine.within(ceiling):
                raise ValueError(
                    f"workspace.{axis} [{mine.min}, {mine.max}] must lie within [{ceiling.min}, {ceiling.max}] "
                    f"for a {self.model}"
                )
        for field in (
            "max_translation_per_action_m",
            "max_translation_per_chunk_m",
            "max_chunk_length",
            "max_commands_per_s",
        ):
            value = getattr(self.limits, field)
            ceiling_value = getattr(hard, field)
            if value > ceiling_value:
                raise ValueError(f"limits.{field} = {value} must be at most {ceiling_value} for a {self.model}")
        if self.limits.max_translation_per_action_m > self.limits.max_translation_per_chunk_m:
            raise ValueError("limits.max_translation_per_action_m must not exceed limits.max_translation_per_chunk_m")
        if self.z_floor >= self.workspace.z.max:
            raise ValueError(
                f"table_z + min_clearance_m ({self.z_floor}) must be below workspace.z.max ({self.workspace.z.max})"
            )
        names = set(self.joint_limits)
        expected = set(hard.joint_names)
        if names != expected:
            missing = sorted(expected - names)
            unknown = sorted(names - expected)
            raise ValueError(
                f"joint_limits must name exactly {list(hard.joint_names)} (missing {missing}, unknown {unknown})"
            )
        for pose_name in ("home_joints", "sleep_joints"):
            pose = getattr(self, pose_name)
            if len(pose) != len(hard.joint_names):
                raise ValueError(f"{pose_name} must have {len(hard.joint_names)} values, one per joint")
            for joint, value in zip(hard.joint_names, pose):
                interval = self.joint_limits[joint]
                if not (math.isfinite(value) and interval.contains(value)):
                    raise ValueError(
                        f"{pose_name}: {joint} = {value} is outside its joint limits [{interval.min}, {interval.max}]"
                    )
        return self

    def joint_intervals(self) -> list[Interval]:
        """Joint limits in the robot's joint order."""
        return [self.joint_limits[name] for name in self.hard_limits.joint_names]


class Sampling(StrictModel):
    """Sampling settings of one generation stage (llama.cpp's native sampler chain)."""

    temperature: float = Field(ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    max_tokens: int = Field(ge=1, le=4096, description="Upper bound on generated tokens for the stage.")
    seed: int | None = Field(None, ge=0, description="Fixed seed for reproducible runs; None draws one per call.")


class StageSampling(StrictModel):
    """Per-stage sampling, defaults from the paper (top-p 0.95; temperatures 0.5 / 0.1 / 0.5, 1.0 on retries)."""

    subtasks: Sampling = Sampling(temperature=0.5, max_tokens=256)
    motion: Sampling = Sampling(temperature=0.1, max_tokens=64)
    # 512 tokens hold the longest v1 chunk (16 actions of three signed 3-decimal numbers: ~420 tokens).
    action: Sampling = Sampling(temperature=0.5, max_tokens=512)
    retry: Sampling = Field(
        Sampling(temperature=1.0, max_tokens=512),
        description="Used for motion and action stages after a failed step (out-of-distribution retry).",
    )


class PostProcess(StrictModel):
    """The paper's re-aggregation of tiny moves into meaningful ones."""

    enabled: bool = True
    per_direction_threshold_m: float = Field(0.025, gt=0, le=0.2, description="Flush when any axis reaches this.")
    absolute_threshold_m: float = Field(0.05, gt=0, le=0.5, description="Flush when the accumulated norm reaches this.")


class ActionLanguage(StrictModel):
    """How actions are written as text. Part of a model bundle: training and runtime must agree."""

    grammar_version: str = Field(
        "1", description="Version of grammars/ the model was trained with (this runtime speaks 1 and 2; cm needs 2)."
    )
    units: Literal["m", "cm"] = Field(
        "m",
        description="Unit of dx, dy, dz in the text (and of the scene's numbers, PromptTemplates.scene_units). "
        "m: signed decimals below 1 ('-0.24'); cm (grammar version 2): integers ('-24'), the same value in 1-3 "
        "tokens instead of 3-5. Parsed values are metres either way.",
    )
    decimals: int = Field(
        3, ge=1, le=3,
        description="Resolution: decimals of a metre the values are rounded to (m: 1-3; cm: 1 or 2, written as "
        "integers: 2 is centimetres).",
    )
    actions: Literal["steps", "waypoints"] = Field(
        "steps",
        description="What one action means. steps: one arm command each (the paper's chunks of small deltas). "
        "waypoints: a relative goal the runtime reaches in straight steps no longer than the robot's per-action "
        "limit, up to the robot's per-chunk path budget (the rest of the way is the next step's: the loop "
        "re-plans from the new observation). Either way every command passes the safety limiter.",
    )
    max_abs_value_m: float = Field(0.2, gt=0, lt=1.0, description="Parser rejects any |dx|, |dy|, |dz| above this.")
    max_steps: int = Field(
        16, ge=1, le=16, description="Parser rejects chunks with more actions than this (v1 grammar: at most 16)."
    )
    gripper: GripperValues = Field(default_factory=GripperValues)
    postprocess: PostProcess = Field(default_factory=PostProcess)
    subtasks: Literal["free", "scene_objects"] = Field(
        "free",
        description="What a subtask may say. free: any text (grammars/subtasks.gbnf). scene_objects: for a model "
        "trained on the local annotator's labels that reads the scene as text: only the annotator's phrases "
        "('Move to the X', 'Grasp the X', ...) over the objects the scene text names, so a word of the instruction "
        "the model cannot map never becomes a subtask about an object that is not there.",
    )


    chunk_gripper: Literal["free", "from_plan"] = Field(
        "free",
        description="What gripper values the action chunk may write. free: 0 or 1. from_plan: for waypoint languages "
        "whose plans end by stating the gripper the chunk leaves (the local annotator's ', gripper open.', ', then "
        "close the gripper.'; runtime.action_text.PLAN_GRIPPER_ENDINGS), only that value: the chunk cannot "
        "contradict its own plan (measured on the demo model: a chunk that closed the gripper on its way to an "
        "object after a plan that said 'gripper open' made every later grasp close on nothing). A plan without "
        "such an ending leaves the chunk free.",
    )
    motion_plan: Literal["free", "subtask_offset"] = Field(
        "free",
        description="What a motion plan may say. free: one line of plan text (grammars/motion_plan.gbnf). "
        "subtask_offset: for waypoint languages trained on the local annotator's labels: the current subtask as "
        "the prompt states it, the offset the chunk will copy and the plan's ending ('Move to the lemon: (-18, "
        "-16, -6), gripper open.'; grammars.waypoint_plan_gbnf), so the plan's words are forced and only its "
        "numbers and ending are chosen: a handful of tokens each, which the decoder's sparse logits make cheap "
        "(bench/step_latency.py). A subtask a plan cannot hold (non-ASCII, too long) leaves that plan free.",
    )

    @model_validator(mode="after")
    def _units_fit_version(self) -> "ActionLanguage":
        from vlm2vla_edge.grammars import FIRST_VERSION_FOR_UNITS, SUPPORTED_GRAMMAR_VERSIONS

        # An unknown version is refused where a bundle is loaded or a chunk parsed (check_grammar_version),
        # with a message that says which release to use; here only the units are checked against it.
        first = FIRST_VERSION_FOR_UNITS[self.units]
        known = SUPPORTED_GRAMMAR_VERSIONS
        if self.grammar_version in known and known.index(self.grammar_version) < known.index(first):
            raise ValueError(f"units '{self.units}' need grammar_version {first} or later, not {self.grammar_version}")
        if self.units == "cm" and self.decimals > 2:
            raise ValueError("units 'cm' write integers: decimals must be 1 or 2 (2 is centimetre resolution)")
        if self.motion_plan == "subtask_offset" and self.actions != "waypoints":
            raise ValueError("motion_plan 'subtask_offset' states a waypoint's offset: it needs actions 'waypoints'")
        return self


class PolicyConfig(StrictModel):
    """The policy engine's settings that are not part of the model bundle."""

    sampling: StageSampling = Field(default_factory=StageSampling)
    action_language: ActionLanguage = Field(default_factory=ActionLanguage)
    n_ctx: int = Field(4096, ge=256, le=131072, description="Context length (tokens).")
    n_threads: int | None = Field(
        None, ge=1, description="CPU threads; None uses every CPU the process may run on (its affinity), and more "
        "than that are not started (llama.cpp's threads spin at barriers: an extra one only steals time)."
    )
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU (-1: all).")
    n_batch: int = Field(512, ge=32)
    n_ubatch: int = Field(512, ge=32, description="Must hold one image's tokens (256 for Gemma-3).")
    constraint: Literal["check", "mask", "none"] = Field(
        "mask",
        description="mask: sample from the allowed tokens only (fastest, bench/grammar_overhead.py); "
        "check: sample, then validate and resample on rejection; none: no grammar, for measuring a model's "
        "format adherence (outputs are still parsed and every action still passes the safety limiter).",
    )
    fast_forward: bool = Field(True, description="Append grammar-forced tokens without sampling.")
    speculative: bool = Field(
        False,
        description="Draft tokens by lookup in the prompt and the output so far (and the previous output of the "
        "same stage), check them against the grammar, and verify them in one batch with the sampled token: "
        "greedy output is identical to plain decoding, sampled output has the same distribution "
        "(bench/action_decode.py). Not used with constraint: check. Off by default until greedy identity holds on "
        "every test prompt (base-model near ties, margin ~0.01 logit, flip with llama.cpp's batch shape).",
    )
    draft_max_tokens: int = Field(
        16, ge=1, le=64, description="Longest draft verified in one batch (each drafted token costs a row of logits)."
    )
    sparse_logits: bool = Field(
        True,
        description="Where the grammar allows few tokens next (a digit, a sign, a bracket), end the forward pass at "
        "the hidden state and compute just those tokens' logits from the output matrix, instead of llama.cpp's "
        "logits over the whole vocabulary (Gemma-3-270M on 2 CPU cores: 5.4 ms per generated token instead of "
        "15.6; runtime/policy/output_head.py). Checked against llama.cpp's logits when the model loads, and off "
        "by itself where that check fails, with an adapter that changes the output layer, and on a GPU. Its graph "
        "callback costs ~0.4 ms per token where the whole output layer runs (free text).",
    )

    @model_validator(mode="after")
    def _batches(self) -> "PolicyConfig":
        if self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")
        return self


# --- loading ---------------------------------------------------------------------------------------

_PRESET_FOLDERS: dict[type[BaseModel], str] = {RobotConfig: "robots", PolicyConfig: ""}  # others: top level


def packaged_configs_dir() -> Path:
    """The `configs/` folder shipped with the package."""
    return Path(str(resources.files("vlm2vla_edge.configs")))


def preset_names(model: type[BaseModel]) -> list[str]:
    folder = packaged_configs_dir() / _PRESET_FOLDERS.get(model, "")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path, model: type[BaseModel]) -> Path:
    """A path to an existing file, or a preset name looked up in the packaged configs."""
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
        raise ConfigError(f"config file {candidate} does not exist or is not a file")
    names = preset_names(model)
    if str(name_or_path) in names:
        return packaged_configs_dir() / _PRESET_FOLDERS.get(model, "") / f"{name_or_path}.yaml"
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known presets: {', '.join(names) or 'none'}"
    raise ConfigError(f"no {model.__name__} preset named '{name_or_path}'{hint}")


#: Far above any real config (the shipped ones are a few KB); a bigger file is a mistake, and parsing
#: a huge one would stall start-up for minutes.
MAX_CONFIG_BYTES = 1_048_576

#: Deepest flow nesting ('[' / '{') accepted: PyYAML takes time quadratic in the depth (20,000 levels:
#: ~20 s) before it fails, so a deeper file is refused before parsing.
MAX_CONFIG_NESTING = 64

# Bounded repr of a bad value: a YAML alias bomb, or a 100 KB string, must not be expanded into a message.
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel, _VALUE_REPR.maxstring, _VALUE_REPR.maxother, _VALUE_REPR.maxlong = 2, 80, 80, 40
_VALUE_REPR.maxlist = _VALUE_REPR.maxtuple = _VALUE_REPR.maxdict = _VALUE_REPR.maxset = 4
_MAX_FIELDS_SHOWN = 8


def describe_validation_error(where: str | Path, error: ValidationError) -> str:
    """One line naming `where` (a file, or a config section), each bad field, why, and the value given."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        message = message if len(message) <= 300 else message[:300] + "..."  # a validator may quote a huge input
        if item["type"] == "extra_forbidden":
            message = "unknown field (typo?)"
        value = item.get("input")
        plain = item["type"] in ("missing", "extra_forbidden") or isinstance(value, dict)
        shown = "" if plain else f" (got {_VALUE_REPR.repr(value)})"
        parts.append(f"field '{field}': {message}{shown}")
    if len(parts) > _MAX_FIELDS_SHOWN:
        parts[_MAX_FIELDS_SHOWN:] = [f"and {len(parts) - _MAX_FIELDS_SHOWN} more"]
    return f"{where}: " + "; ".join(parts)


def load_config(name_or_path: str | Path, model: type[ModelT]) -> ModelT:
    """Read and validate a YAML config; every failure is a `ConfigError` naming file, field and range."""
    path = resolve_config_path(name_or_path, model)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text") from exc
    depth = _flow_depth(text)
    if depth > MAX_CONFIG_NESTING:
        raise ConfigError(f"{path}: brackets are nested {depth} levels deep; a config allows {MAX_CONFIG_NESTING}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: not valid YAML: collections are nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from exc


def _flow_depth(text: str) -> int:
    """Deepest nesting of '[' and '{' (brackets inside strings and comments count too: an upper bound)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


_BRACKETS = re.compile(r"[\[\]{}]")


def load_robot_config(name_or_path: str | Path = "widowx250s") -> RobotConfig:
    return load_config(name_or_path, RobotConfig)


def load_policy_config(name_or_path: str | Path = "policy") -> PolicyConfig:
    return load_config(name_or_path, PolicyConfig)
