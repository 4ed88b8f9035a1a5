"""Cut a demonstration into segments, and word its motions and subtasks in the action language.

Everything here is deterministic and local: the same episode always gives the same labels. The cloud
annotator uses the same segments, chunks and checks, and only rewrites the wording.

**Segments.** A demonstration is cut after every gripper event (the step whose commanded gripper
differs from the gripper state before it: the event rides on the last step of a move, as the simulator's
expert and teleoperators do it), and inside the spans between events wherever the direction of travel
turns by more than `SegmentRules.turn_deg` (`approach_turn_deg` in a span that ends with a gripper
event, so the final approach to a grasp or a release is a segment of its own). Directions are compared over short windows of path
(`SegmentRules.window_m` behind and ahead), so teleoperation jitter does not cut; pieces shorter than
`SegmentRules.min_segment_m` are merged into a neighbour.

**Motion wording** (`WordingRules`), in the robot base frame: +x forward, -x backward, +y to the
left, -y to the right, +z up, -z down. The axis with the largest displacement is the primary one
("Move primarily down"); every other axis whose displacement is at least `comparable_ratio` of the
primary one is added plainly ("and to the right"), one at least `secondary_ratio` of it as slight
("and slightly forward"); smaller ones are not named. Then the rounded path length ("about 8 cm") and
the gripper event of the window (", then close the gripper"). Below `still_m` there is no direction:
"Stay in place" (with the gripper event when there is one).

**Subtasks.** Named from the instruction's objects (`parse_instruction`: English patterns, or the
simulator's multilingual noun table, or generic "the object"/"the target"), by the role of each segment
between gripper events: before a close, "Move to the X" then (last segment) "Grasp the X"; while
holding, "Lift the X" (first segment, when it rises), "Move to the Y", and (last segment, ending with
the release) "Release the X"; holding at the end, "Lift the X"; moves after a release belong to the
release or to the next "Move to ...". Without any gripper event the instruction itself is the one subtask.

**Action chunks.** The recorded deltas of a window (raw moves longer than the robot's per-action
limit split first), re-aggregated with the paper's `reaggregate`, emitted moves longer than the
per-action limit split again (the gripper change stays on the last piece), and rounded to the
language's decimals with the rounding error carried into the next action, so a chunk ends where the
recording does to within half a unit of the last decimal. A window is as long as fits in the robot's
chunk length and path budget and does not cross a segment end.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from vlm2vla_edge.runtime.action_text import (
    format_action_chunk,
    format_motion_plan,
    format_number,
    format_subtasks,
    rounded_offset,
)
from vlm2vla_edge.runtime.actions import Action, ActionChunk
from vlm2vla_edge.runtime.config import ActionLanguage, RobotConfig
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.runtime.postprocess import reaggregate

GripperEvent = Literal["close", "open"]

#: Base-frame direction words per axis: (positive, negative).
AXIS_WORDS: tuple[tuple[str, str], ...] = (("forward", "backward"), ("to the left", "to the right"), ("up", "down"))


# ---------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class SegmentRules:
    """Where a demonstration is cut."""

    turn_deg: float = 45.0  # a turn sharper than this between the path behind and ahead starts a segment
    approach_turn_deg: float = 15.0  # the same before a gripper event, so the final approach is its own segment
    window_m: float = 0.01  # path length over which the directions behind and ahead are measured
    min_segment_m: float = 0.015  # shorter pieces (and pieces of fewer than 1 step) merge into a neighbour
    still_m: float = 1e-4  # a step shorter than this has no direction


@dataclass(frozen=True)
class WordingRules:
    """How a displacement becomes words (see the module docstring)."""

    secondary_ratio: float = 0.25
    comparable_ratio: float = 0.6
    still_m: float = 0.005
    distance: bool = True  # add "about N cm"
    contradiction_m: float = 0.01  # a named direction opposed by more than this contradicts the motion
    primary_named_m: float = 0.02  # above this the plan must name the primary direction


@dataclass(frozen=True)
class ChunkLimits:
    """What one action chunk may hold: the language's and the robot's limits, the stricter of each."""

    max_actions: int = 10
    max_action_m: float = 0.05
    max_chunk_path_m: float = 0.20

    @classmethod
    def for_robot(cls, robot: RobotConfig, language: ActionLanguage) -> "ChunkLimits":
        limits = robot.limits
        return cls(
            max_actions=min(limits.max_chunk_length, language.max_steps),
            max_action_m=min(limits.max_translation_per_action_m, language.max_abs_value_m),
            max_chunk_path_m=limits.max_translation_per_chunk_m,
        )


# ---------------------------------------------------------------------------------------------- trajectory


@dataclass(frozen=True)
class Trajectory:
    """The usable part of an episode: steps with a position and an action, in order.

    Row i is step `indices[i]` of steps.jsonl: the gripper was `gripper_before[i]` and at
    `positions[i]`, then the action `deltas[i]` with the commanded gripper `gripper_cmd[i]` ran.
    `positions` has one more row: where the last action ended.
    """

    episode_id: str
    path: Path
    instruction: str
    instruction_en: str | None
    indices: list[int]
    positions: np.ndarray  # (N + 1, 3) metres, base frame
    deltas: np.ndarray  # (N, 3) metres
    gripper_cmd: np.ndarray  # (N,) bool, True = open
    gripper_before: np.ndarray  # (N,) bool
    images: list[str | None]  # (N,) frame paths relative to the episode
    scenes: list[str | None]  # (N,) text observations

    def __len__(self) -> int:
        return len(self.indices)

    def frame_file(self, row: int) -> Path | None:
        image = self.images[row]
        return None if image is None else self.path / image


class NotADemonstration(ValueError):
    """The episode has no steps with both a position and an action (e.g. a policy run's stage records)."""


def load_trajectory(reader: EpisodeReader) -> Trajectory:
    """The demonstration steps of an episode: those with `ee_position` and a 4-value `action`."""
    rows = [
        s for s in reader.steps()
        if s.action is not None and len(s.action) >= 4 and s.ee_position is not None
        and all(math.isfinite(v) for v in (*s.action[:4], *s.ee_position))
    ]
    if not rows:
        raise NotADemonstration(f"episode {reader.episode_id} has no steps with both ee_position and action")
    positions = np.array([r.ee_position for r in rows], dtype=float)
    deltas = np.array([r.action[:3] for r in rows], dtype=float)
    cmd = np.array([r.action[3] >= 0.5 for r in rows], dtype=bool)
    before = np.empty(len(rows), dtype=bool)
    for i, r in enumerate(rows):
        before[i] = r.gripper_open if r.gripper_open is not None else (cmd[i - 1] if i else cmd[0])
    # Where the last action ended: the next recorded position (an importer's final observation step), else
    # the last position plus its action.
    steps = reader.steps()
    last = rows[-1].index
    later = [s for s in steps if s.index > last and s.ee_position is not None]
    end = np.array(later[0].ee_position, dtype=float) if later else positions[-1] + deltas[-1]
    extra = reader.meta.extra or {}
    english = extra.get("instruction_en")
    return Trajectory(
        episode_id=reader.episode_id,
        path=reader.path,
        instruction=reader.meta.instruction,
        instruction_en=english if isinstance(english, str) and english.strip() else None,
        indices=[r.index for r in rows],
        positions=np.vstack([positions, end]),
        deltas=deltas,
        gripper_cmd=cmd,
        gripper_before=before,
        images=[r.image for r in rows],
        scenes=[(r.extra or {}).get("scene_description") if isinstance((r.extra or {}).get("scene_description"), str) else None
                for r in rows],
    )


# ---------------------------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of a trajectory; `event` is the gripper event on its last row, if any."""

    start: int
    end: int
    event: GripperEvent | None
    displacement: tuple[float, float, float]

    def __len__(self) -> int:
        return self.end - self.start


def gripper_events(traj: Trajectory) -> dict[int, GripperEvent]:
    """Rows whose commanded gripper differs from the gripper state before them."""
    events: dict[int, GripperEvent] = {}
    for i in range(len(traj)):
        if traj.gripper_cmd[i] != traj.gripper_before[i]:
            events[i] = "open" if traj.gripper_cmd[i] else "close"
    return events


def _direction(deltas: np.ndarray, rows: range, length_m: float) -> np.ndarray | None:
    """Unit direction of the path over `rows` (in that order) until `length_m` of path is covered."""
    total = np.zeros(3)
    path = 0.0
    for r in rows:
        total += deltas[r]
        path += float(np.linalg.norm(deltas[r]))
        if path >= length_m:
            break
    norm = float(np.linalg.norm(total))
    return total / norm if norm > 1e-9 else None


def segment(traj: Trajectory, rules: SegmentRules = SegmentRules()) -> list[Segment]:
    """Segments at gripper events and direction turns (see the module docstring)."""
    events = gripper_events(traj)
    n = len(traj)
    cuts = sorted({0, n, *(i + 1 for i in events if i + 1 < n)})
    pieces: list[tuple[int, int]] = []
    for a, b in zip(cuts, cuts[1:]):
        turn = min(rules.turn_deg, rules.approach_turn_deg) if (b - 1) in events else rules.turn_deg
        pieces.extend(_split_span(traj.deltas, a, b, turn, rules))
    pieces = _merge_short(traj, pieces, set(events), rules)
    return [
        Segment(a, b, events.get(b - 1), tuple(float(v) for v in traj.deltas[a:b].sum(axis=0)))  # type: ignore[arg-type]
        for a, b in pieces
    ]


def _split_span(deltas: np.ndarray, a: int, b: int, turn_deg: float, rules: SegmentRules) -> list[tuple[int, int]]:
    cos_turn = math.cos(math.radians(turn_deg))
    out: list[tuple[int, int]] = []
    start = a
    for t in range(a + 1, b):
        if float(np.linalg.norm(deltas[t])) < rules.still_m:
            continue
        if float(np.linalg.norm(deltas[start:t].sum(axis=0))) < rules.window_m:
            continue  # the segment so far is too short to have a direction
        behind = _direction(deltas, range(t - 1, start - 1, -1), rules.window_m)
        ahead = _direction(deltas, range(t, b), rules.window_m)
        if behind is not None and ahead is not None and float(behind @ ahead) < cos_turn:
            out.append((start, t))
            start = t
    out.append((start, b))
    return out


def _merge_short(
    traj: Trajectory, pieces: list[tuple[int, int]], event_rows: set[int], rules: SegmentRules
) -> list[tuple[int, int]]:
    """Merge pieces shorter than min_segment_m into a neighbour within the same gripper span."""
    pieces = list(pieces)
    changed = True
    while changed and len(pieces) > 1:
        changed = False
        for k, (a, b) in enumerate(pieces):
            if float(np.linalg.norm(traj.deltas[a:b].sum(axis=0))) >= rules.min_segment_m:
                continue
            # Neighbours in the same span: the previous one unless it ends with a gripper event.
            prev_ok = k > 0 and (pieces[k - 1][1] - 1) not in event_rows
            next_ok = k + 1 < len(pieces) and (b - 1) not in event_rows
            if prev_ok:
                pieces[k - 1 : k + 1] = [(pieces[k - 1][0], b)]
            elif next_ok:
                pieces[k : k + 2] = [(a, pieces[k + 1][1])]
            else:
                continue
            changed = True
            break
    return pieces


# ---------------------------------------------------------------------------------------------- wording


def direction_phrase(displacement: Sequence[float], rules: WordingRules = WordingRules()) -> str | None:
    """'Move primarily down and slightly to the right', or None when the move is below `still_m`."""
    d = np.asarray(displacement, dtype=float)
    mags = np.abs(d)
    primary = int(np.argmax(mags))
    if mags[primary] < rules.still_m:
        return None

    def word(axis: int) -> str:
        return AXIS_WORDS[axis][0 if d[axis] > 0 else 1]

    parts = [f"Move primarily {word(primary)}"]
    for axis in sorted((a for a in range(3) if a != primary), key=lambda a: -mags[a]):
        ratio = mags[axis] / mags[primary]
        if ratio >= rules.comparable_ratio:
            parts.append(f"and {word(axis)}")
        elif ratio >= rules.secondary_ratio:
            parts.append(f"and slightly {word(axis)}")
    return " ".join(parts)


def motion_plan_text(
    displacement: Sequence[float], event: GripperEvent | None, rules: WordingRules = WordingRules()
) -> str:
    """The motion plan of a window: direction, distance and gripper event (module docstring)."""
    phrase = direction_phrase(displacement, rules)
    gripper = {"close": "close the gripper", "open": "open the gripper", None: None}[event]
    if phrase is None:
        text = f"Stay in place and {gripper}" if gripper else "Stay in place"
    else:
        text = phrase
        if rules.distance:
            cm = max(1, round(float(np.linalg.norm(displacement)) * 100))
            text += f", about {cm} cm"
        if gripper:
            text += f", then {gripper}"
    return format_motion_plan(text)


_DIRECTION_PATTERNS: tuple[tuple[str, int, int], ...] = (
    (r"\b(?:up|upwards?|upward|raise|rise|higher)\b", 2, +1),
    (r"\b(?:down|downwards?|lower|descend)\b", 2, -1),
    (r"\b(?:forwards?|ahead|away from the robot)\b", 0, +1),
    (r"\b(?:backwards?|back|toward the robot|towards the robot)\b", 0, -1),
    (r"\bleft\b", 1, +1),
    (r"\bright\b", 1, -1),
)


def named_directions(text: str) -> set[tuple[int, int]]:
    """(axis, sign) of every base-frame direction a motion text names."""
    lowered = text.lower()
    return {(axis, sign) for pattern, axis, sign in _DIRECTION_PATTERNS if re.search(pattern, lowered)}


def plan_contradiction(
    plan: str, displacement: Sequence[float], event: GripperEvent | None, rules: WordingRules = WordingRules()
) -> str | None:
    """Why a motion plan contradicts the recorded motion of its window, or None when it does not.

    A plan contradicts when it names a direction the gripper moves against by more than
    `contradiction_m` ("up" while dz < -1 cm), when it does not name the primary direction of a move
    longer than `primary_named_m`, or when it names the opposite gripper event and not the real one.
    """
    d = np.asarray(displacement, dtype=float)
    named = named_directions(plan)
    for axis, sign in sorted(named):
        if sign * d[axis] < -rules.contradiction_m:
            said = AXIS_WORDS[axis][0 if sign > 0 else 1]
            moved = AXIS_WORDS[axis][0 if d[axis] > 0 else 1]
            return f"the plan says '{said}' but the gripper moves {abs(d[axis]) * 100:.1f} cm {moved}"
    primary = int(np.argmax(np.abs(d)))
    if abs(d[primary]) >= rules.primary_named_m and (primary, int(np.sign(d[primary]))) not in named:
        main = AXIS_WORDS[primary][0 if d[primary] > 0 else 1]
        return f"the plan does not name the main direction ({main}, {abs(d[primary]) * 100:.1f} cm)"
    lowered = plan.lower()
    says_close = re.search(r"\b(?:close|closes|closing|grasp|grip|grab)\b", lowered) is not None
    says_open = re.search(r"\b(?:open|opens|opening|release|let go)\b", lowered) is not None
    if event == "close" and says_open and not says_close:
        return "the plan opens the gripper but the recording closes it"
    if event == "open" and says_close and not says_open:
        return "the plan closes the gripper but the recording opens it"
    return None


# ---------------------------------------------------------------------------------------------- instructions


@dataclass(frozen=True)
class TaskPart:
    """One clause of an instruction: the object handled and where it goes (noun phrases with article)."""

    obj: str
    destination: str | None = None


@dataclass(frozen=True)
class ParsedInstruction:
    parts: tuple[TaskPart, ...]
    sentence: str  # the (English, when known) instruction as one clean subtask, for episodes without grasps
    method: str  # "english", "nouns" or "generic": how the objects were found


_ARTICLES = re.compile(r"^(?:the|a|an|some|that|this|these|those|your)\s+")
_PLACE_VERBS = r"(?:put|place|move|set|drop|transfer|stack|lay|bring|push|slide|pour|flip|sweep|turn|throw)"
_TAKE_VERBS = r"(?:pick\s+up|pick|lift\s+up|lift|grab|grasp|take|raise|hold|get|remove)"
_PREPOSITIONS = (r"(?:on\s+top\s+of|in\s+front\s+of|next\s+to|to\s+the\s+(?:left|right)\s+of|inside\s+of|inside|into|onto|"
                 r"in|on|to|towards|toward|near|over|under|beside|behind|at)")
_CLAUSE_SPLIT = re.compile(r"\s*(?:,\s*and\s+then|\band\s+then\b|,\s*then\b|\bthen\b|;|\.\s+)\s*")


def _noun_phrase(text: str) -> str | None:
    words = text.strip(" ,.!?").lower()
    words = re.sub(r"\s+(?:up|please|now|carefully)$", "", words)
    while True:
        stripped = _ARTICLES.sub("", words)
        if stripped == words:
            break
        words = stripped
    words = re.sub(r"[^a-z0-9 '\-]", "", words).strip()
    tokens = words.split()
    if not tokens or len(tokens) > 6:
        return None
    return "the " + " ".join(tokens)


def _parse_english_clause(clause: str, generic: bool) -> TaskPart | None:
    """A clause by the placing and taking verbs; with `generic`, also "<any verb> <object> [<prep> <place>]"."""
    clause = clause.strip(" ,.!?").lower()
    clause = re.sub(r"^(?:please\s+|now\s+|robot,?\s+)+", "", clause)
    m = re.match(rf"^{_PLACE_VERBS}\s+(?P<obj>.+?)\s+{_PREPOSITIONS}\s+(?P<dest>.+)$", clause)
    if m:
        obj, dest = _noun_phrase(m["obj"]), _noun_phrase(m["dest"])
        if obj:
            return TaskPart(obj, dest)
    m = re.match(rf"^{_TAKE_VERBS}\s+(?P<obj>.+?)(?:\s+up)?(?:\s+(?:from|off|out\s+of|off\s+of)\s+(?P<src>.+))?$", clause)
    if m:
        obj = _noun_phrase(m["obj"])
        if obj:
            return TaskPart(obj, None)
    m = re.match(rf"^[a-z]+\s+(?P<obj>.+?)(?:\s+{_PREPOSITIONS}\s+(?P<dest>.+))?$", clause) if generic else None
    if m:
        obj = _noun_phrase(m["obj"])
        if obj:
            return TaskPart(obj, _noun_phrase(m["dest"]) if m["dest"] else None)
    return None


@functools.lru_cache(maxsize=1)
def _noun_table() -> list[tuple[str, str]]:
    """(surface form, English name) from the simulator's multilingual nouns, longest forms first."""
    try:
        from vlm2vla_edge.runtime.sim.tasks import NOUNS
    except ImportError:  # pragma: no cover - the simulator ships with the runtime
        return []
    forms: dict[str, str] = {}
    for nouns in NOUNS.values():
        for english, phrase in nouns.items():
            forms[phrase.lower()] = english
            bare = re.sub(r"^(?:the|la|el|le|l'|les|die|den|das|der)\s*", "", phrase.lower())
            if len(bare) >= 2:
                forms.setdefault(bare, english)
    return sorted(forms.items(), key=lambda item: -len(item[0]))


def _find_known_nouns(text: str) -> list[str]:
    """English names of the known objects in `text`, in order of appearance (any language of the table)."""
    lowered = unicodedata.normalize("NFC", text.lower())
    hits: list[tuple[int, str]] = []
    taken = [False] * len(lowered)
    for form, english in _noun_table():
        is_word = form.isascii()
        for m in re.finditer(re.escape(form), lowered):
            a, b = m.span()
            if is_word and ((a > 0 and lowered[a - 1].isalpha()) or (b < len(lowered) and lowered[b].isalpha())):
                continue
            if any(taken[a:b]):
                continue
            for i in range(a, b):
                taken[i] = True
            hits.append((a, english))
    return [english for _, english in sorted(hits)]


def _sentence(text: str) -> str:
    clean = " ".join(re.sub(r'["\\\x00-\x1f\x7f]', " ", text).split()).strip(" .")
    clean = clean[:1].upper() + clean[1:]
    return (clean[:93] + "...") if len(clean) > 96 else (clean or "Do the task")


def parse_instruction(instruction: str, instruction_en: str | None = None) -> ParsedInstruction:
    """Objects and destinations of an instruction, clause by clause ("... then ...").

    English text (the canonical `instruction_en` when the episode has one) goes through verb and
    preposition patterns; otherwise the known objects of the simulator's noun table are looked up in
    any of its languages (in order: first the object, then the destination of each placement); else
    the parts are the generic "the object" and "the target".
    """
    english = instruction_en or (instruction if instruction.isascii() else None)

    def english_parts(generic: bool) -> list[TaskPart]:
        clauses = [c for c in _CLAUSE_SPLIT.split(english or "") if c.strip()]
        return [p for p in (_parse_english_clause(c, generic) for c in clauses) if p]

    # The canonical English form is trusted as English; an ASCII instruction may be French or Spanish,
    # so for it the known verbs come first, then the noun table, and only then any verb.
    parts = english_parts(generic=instruction_en is not None) if english else []
    if parts:
        return ParsedInstruction(tuple(parts), _sentence(english or instruction), "english")
    nouns = _find_known_nouns(instruction)
    if nouns:
        from vlm2vla_edge.runtime.sim.scene import CATALOGUE

        parts = []
        i = 0
        while i < len(nouns):
            obj = nouns[i]
            dest = nouns[i + 1] if i + 1 < len(nouns) and CATALOGUE[nouns[i + 1]].container else None
            parts.append(TaskPart(f"the {obj}", f"the {dest}" if dest else None))
            i += 2 if dest else 1
        return ParsedInstruction(tuple(parts), _sentence(english or instruction), "nouns")
    parts = english_parts(generic=True) if english else []
    if parts:
        return ParsedInstruction(tuple(parts), _sentence(english or instruction), "english")
    return ParsedInstruction((TaskPart("the object", "the target"),), _sentence(english or instruction), "generic")


def name_subtasks(
    traj: Trajectory, segments: list[Segment], parsed: ParsedInstruction, max_subtasks: int = 8
) -> tuple[list[str], list[int]]:
    """The subtask list and, per segment, the index of its subtask (module docstring: Subtasks)."""
    labels: list[str] = []
    grasps = 0
    holding: TaskPart | None = None
    has_events = any(s.event for s in segments)
    # Group segments into spans that end with a gripper event (or the end of the episode).
    spans: list[list[int]] = [[]]
    for k, seg in enumerate(segments):
        spans[-1].append(k)
        if seg.event is not None:
            spans.append([])
    if not spans[-1]:
        spans.pop()
    by_segment: dict[int, str] = {}
    for span in spans:
        last = segments[span[-1]]
        gripper_open = bool(traj.gripper_before[segments[span[0]].start])
        if not has_events:
            for k in span:
                by_segment[k] = parsed.sentence
        elif last.event == "close":
            part = parsed.parts[min(grasps, len(parsed.parts) - 1)]
            grasps += 1
            holding = part
            for k in span:
                by_segment[k] = f"Grasp {part.obj}" if k == span[-1] else f"Move to {part.obj}"
        elif not gripper_open:  # holding: carry, ending with a release or with the episode
            part = holding or parsed.parts[min(max(grasps - 1, 0), len(parsed.parts) - 1)]
            rises = segments[span[0]].displacement[2] > 0 and _primary_axis(segments[span[0]].displacement) == 2
            for k in span:
                if last.event == "open" and k == span[-1]:
                    by_segment[k] = f"Release {part.obj}"
                elif k == span[0] and (rises or last.event is None):
                    by_segment[k] = f"Lift {part.obj}"
                elif last.event is None:
                    by_segment[k] = f"Lift {part.obj}" if rises else f"Move {part.obj}"
                else:
                    by_segment[k] = f"Move to {part.destination}" if part.destination else f"Move {part.obj}"
            if last.event == "open":
                holding = None
        else:  # open moves not ending in a grasp: after a release, or an open event with nothing held
            previous = by_segment.get(span[0] - 1)
            for k in span:
                by_segment[k] = previous or parsed.sentence
    for k in range(len(segments)):
        labels.append(_clean_subtask(by_segment[k]))
    subtasks: list[str] = []
    index: list[int] = []
    for label in labels:
        if not subtasks or subtasks[-1] != label:
            subtasks.append(label)
        index.append(len(subtasks) - 1)
    return _cap_subtasks(subtasks, index, max_subtasks)


def _primary_axis(d: Sequence[float]) -> int:
    return int(np.argmax(np.abs(np.asarray(d))))


def _clean_subtask(text: str) -> str:
    text = " ".join(re.sub(r'["\\\x00-\x1f\x7f]', " ", text).split())
    return text[:96]


def _cap_subtasks(subtasks: list[str], index: list[int], limit: int) -> tuple[list[str], list[int]]:
    """Merge adjacent subtasks (the pair with the fewest segments) until at most `limit` remain."""
    while len(subtasks) > limit:
        sizes = [index.count(i) for i in range(len(subtasks))]
        k = min(range(len(subtasks) - 1), key=lambda i: sizes[i] + sizes[i + 1])
        merged = f"{subtasks[k]} and {subtasks[k + 1][:1].lower()}{subtasks[k + 1][1:]}"
        subtasks[k : k + 2] = [merged if len(merged) <= 96 else subtasks[k]]
        index = [i if i <= k else i - 1 for i in index]
    format_subtasks(subtasks)  # raises if anything slipped through
    return subtasks, index


# ---------------------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Window:
    """The rows [start, end) one action chunk covers, the chunk's text and the wording of its motion."""

    start: int
    end: int
    segment: int
    chunk: ActionChunk
    chunk_text: str
    displacement: tuple[float, float, float]  # of the chunk as written (rounded)
    event: GripperEvent | None
    plan: str


def _split_action(action: Action, max_m: float, previous_gripper: float) -> list[Action]:
    n = max(1, math.ceil(action.norm() / max_m - 1e-9))
    if n == 1:
        return [action]
    return [
        Action(action.dx / n, action.dy / n, action.dz / n, action.gripper if i == n - 1 else previous_gripper)
        for i in range(n)
    ]


def _round_chunk(actions: list[Action], decimals: int) -> list[Action]:
    """Round translations to `decimals`, carrying each rounding error into the next action; drop no-ops."""
    out: list[Action] = []
    carry = [0.0, 0.0, 0.0]
    for i, a in enumerate(actions):
        want = [v + c for v, c in zip(a.translation(), carry)]
        rounded = [round(v, decimals) + 0.0 for v in want]
        carry = [w - r for w, r in zip(want, rounded)]
        if not any(rounded) and out and out[-1].gripper == a.gripper and i < len(actions) - 1:
            continue  # a no-op; its remainder is still carried
        out.append(Action(rounded[0], rounded[1], rounded[2], a.gripper))
    if out and not any(out[-1].translation()) and len(out) > 1 and out[-2].gripper == out[-1].gripper:
        out.pop()
    return out


def build_chunk(
    deltas: np.ndarray, grippers: np.ndarray, gripper_before: bool, language: ActionLanguage, limits: ChunkLimits
) -> ActionChunk:
    """The action chunk of recorded rows: split, re-aggregated, split again, rounded (module docstring)."""
    raw: list[Action] = []
    previous = 1.0 if gripper_before else 0.0
    for d, g in zip(deltas, grippers):
        action = Action(float(d[0]), float(d[1]), float(d[2]), 1.0 if g else 0.0)
        raw.extend(_split_action(action, limits.max_action_m, previous))
        previous = action.gripper
    merged = reaggregate(ActionChunk(tuple(raw)), language.postprocess)
    split: list[Action] = []
    previous = 1.0 if gripper_before else 0.0
    for action in merged:
        split.extend(_split_action(action, limits.max_action_m * 0.999, previous))
        previous = action.gripper
    return ActionChunk(tuple(_round_chunk(split, language.decimals)))


def _fits(chunk: ActionChunk, limits: ChunkLimits) -> bool:
    return 0 < len(chunk) <= limits.max_actions and chunk.path_length() <= limits.max_chunk_path_m + 1e-9


def windows(
    traj: Trajectory,
    segments: list[Segment],
    language: ActionLanguage,
    limits: ChunkLimits,
    wording: WordingRules = WordingRules(),
) -> list[Window]:
    """Consecutive chunk windows over each segment, each the longest prefix that fits the limits."""
    out: list[Window] = []
    for k, seg in enumerate(segments):
        start = seg.start
        while start < seg.end:
            # Grow the window row by row while its chunk still fits (a chunk only grows with its window).
            end = start + 1
            chunk = build_chunk(traj.deltas[start:end], traj.gripper_cmd[start:end],
                                bool(traj.gripper_before[start]), language, limits)
            while end < seg.end:
                candidate = build_chunk(traj.deltas[start:end + 1], traj.gripper_cmd[start:end + 1],
                                        bool(traj.gripper_before[start]), language, limits)
                if not _fits(candidate, limits):
                    break
                end, chunk = end + 1, candidate
            if not _fits(chunk, limits):  # one raw row too long for one chunk: keep its first part
                chunk = ActionChunk(chunk.actions[: limits.max_actions])
            text = format_action_chunk(chunk, language)
            moved = chunk.total_translation()
            event = None
            if any(chunk[i].gripper != (chunk[i - 1].gripper if i else (1.0 if traj.gripper_before[start] else 0.0))
                   for i in range(len(chunk))):
                event = "open" if chunk[-1].gripper == 1.0 else "close"
            out.append(Window(start, end, k, chunk, text, moved, event, motion_plan_text(moved, event, wording)))
            start = end
    return out


def waypoint_plan_text(
    name: str | None, displacement: Sequence[float], event: GripperEvent | None, decimals: int,
    rules: WordingRules = WordingRules(), *, gripper_open: bool | None = None,
) -> str:
    """The motion plan of a waypoint window: the subtask (which names its object) and the offset to reach,
    in the numbers the action chunk will copy, e.g. "Move to the lemon: (-0.18, -0.16, -0.06)." or
    "Grasp the lemon: (0, 0, -0.08), then close the gripper." Naming the object before its numbers is
    what lets a small model find the right object's line in the scene (DESIGN.md §5b). A move without a
    gripper event states the gripper it keeps (`gripper_open`: "..., gripper open."), in the scene's own
    first words: without it the action stage had to infer the gripper value, and after a release it often
    closed on arrival, so every later grasp closed on nothing. A subtask the plan grammar cannot hold
    (non-ASCII, too long) is replaced by the direction phrase."""
    offset = "(" + ", ".join(format_number(float(v), decimals) for v in displacement) + ")"
    gripper = {"close": ", then close the gripper", "open": ", then open the gripper", None: ""}[event]
    if event is None and gripper_open is not None:
        gripper = ", gripper open" if gripper_open else ", gripper closed"
    head = (name or "").strip().rstrip(".")
    for lead in (head, direction_phrase(displacement, rules) or "Stay in place"):
        if lead:
            try:
                return format_motion_plan(f"{lead}: {offset}{gripper}.")
            except ValueError:
                continue  # the plan grammar cannot hold this lead (non-ASCII, too long): try the next
    return format_motion_plan(f"Move: {offset}{gripper}.")


def waypoint_rows(traj: Trajectory, seg: Segment, budget_m: float) -> list[int]:
    """The rows of a segment where a waypoint policy's loop stands: its start, and each point where the path
    from the start first reaches another chunk budget (the runtime walks at most one budget per step).
    Other rows would teach answers the observation cannot tell apart (half-way up a lift looks like its
    start), and the loop never stands there."""
    rows = [seg.start]
    travelled, next_stop = 0.0, budget_m
    for row in range(seg.start, seg.end - 1):
        travelled += float(np.linalg.norm(traj.deltas[row]))
        if travelled >= next_stop - 1e-6:
            rows.append(row + 1)
            next_stop += budget_m
    return rows


def waypoint_windows(
    traj: Trajectory, segments: list[Segment], language: ActionLanguage, segment_names: Sequence[str | None],
    limits: ChunkLimits,
) -> list[Window]:
    """Windows of a waypoint action language: a one-action chunk from each row where the loop stands
    (`waypoint_rows`) to the end of its segment (where the arm went, not where it was told to go), with
    the segment's final gripper value."""
    from vlm2vla_edge.runtime.postprocess import LIMIT_MARGIN

    out: list[Window] = []
    for k, seg in enumerate(segments):
        end_gripper = 1.0 if traj.gripper_cmd[seg.end - 1] else 0.0
        event = seg.event
        for row in waypoint_rows(traj, seg, limits.max_chunk_path_m * LIMIT_MARGIN):
            rounded = rounded_offset(traj.positions[row], traj.positions[seg.end], language.decimals)
            chunk = ActionChunk((Action(rounded[0], rounded[1], rounded[2], end_gripper),))
            # The gripper event belongs to the window only when the gripper is not already where it ends.
            before = 1.0 if traj.gripper_before[row] else 0.0
            window_event = event if before != end_gripper else None
            text = format_action_chunk(chunk, language)
            plan = waypoint_plan_text(segment_names[k], rounded, window_event, language.decimals,
                                      gripper_open=end_gripper == 1.0)
            out.append(Window(row, seg.end, k, chunk, text, rounded, window_event, plan))  # type: ignore[arg-type]
    return out


def settings_dict(segment_rules: SegmentRules, wording: WordingRules, limits: ChunkLimits) -> dict[str, object]:
    """The rules as plain data, recorded in dataset.json."""
    return {"segment": asdict(segment_rules), "wording": asdict(wording), "chunk_limits": asdict(limits)}


__all__ = [
    "AXIS_WORDS", "ChunkLimits", "NotADemonstration", "ParsedInstruction", "Segment", "SegmentRules", "TaskPart",
    "Trajectory", "Window", "WordingRules", "build_chunk", "direction_phrase", "gripper_events", "load_trajectory",
    "motion_plan_text", "name_subtasks", "named_directions", "parse_instruction", "plan_contradiction", "segment",
    "settings_dict", "waypoint_plan_text", "waypoint_rows", "waypoint_windows", "windows",
]
