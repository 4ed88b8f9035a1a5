"""A local verifier from proprioception and image difference: no network, deterministic, ~1 ms.

It is the fallback when the cloud verifier is unavailable, so it must never be the reason an
episode stalls on a slow link; it is also weaker than a vision model (it cannot see *what* moved),
so every verdict says which evidence it used. The subtask text picks the check:

=================  ==========================================================================
move / reach       the end effector covered most of the commanded displacement, in its direction
grasp / pick       gripper closed and the fingers stopped clearly above fully closed (on an
                   object); without a finger measurement: the image changed near the gripper
lift / pick up     height gained and still grasping
place / release    gripper open and the image changed near the gripper (the object left)
push               the arm followed the command and the scene changed
open / close       the gripper is in the asked state
gripper
unknown            the arm followed any command and the scene changed
=================  ==========================================================================
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from enum import Enum

import numpy as np
from pydantic import Field

from vlm2vla_edge.runtime.config import StrictModel
from vlm2vla_edge.runtime.verifier.base import Verdict, VerificationRequest, Verifier, cancelled_verdict


class HeuristicConfig(StrictModel):
    """Thresholds of the heuristic verifier; defaults suit the WidowX 250 and a 256-640 px camera."""

    min_commanded_move_m: float = Field(
        0.005, gt=0, description="A chunk commanding less end-effector travel than this commands no move."
    )
    min_move_fraction: float = Field(
        0.6, gt=0, le=1, description="Share of the commanded displacement the arm must achieve along its direction."
    )
    max_move_fraction: float = Field(
        1.6, gt=1, description="Achieving more than this share of the commanded displacement is a fault, not success."
    )
    min_direction_cosine: float = Field(
        0.7, ge=-1, le=1, description="Cosine between achieved and commanded displacement needed for a move."
    )
    min_lift_m: float = Field(0.02, gt=0, description="Height gain that counts as a lift, metres.")
    move_arrival_cm: float = Field(
        3.0, gt=0, description="'Move to X' is done when the gripper is this close to X's approach point, horizontally "
        "and in height (scene text only): a move cut short by the chunk budget is not an arrival.",
    )
    gripper_closed_max: float = Field(
        0.05, ge=0, lt=1, description="Finger opening (0 closed, 1 open) at or below which nothing is between them."
    )
    grasp_opening_max: float = Field(
        0.9, gt=0, le=1, description="A closed gripper reading above this did not close at all (fault)."
    )
    gripper_open_min: float = Field(
        0.5, gt=0, le=1, description="Finger opening at or above which the gripper is open."
    )
    pixel_change_threshold: int = Field(
        25, ge=1, le=255, description="Mean absolute channel difference (0-255) above which a pixel has changed."
    )
    min_changed_fraction: float = Field(
        0.01, gt=0, lt=1, description="Share of changed pixels (in the region) that counts as a scene change."
    )
    region_half_size: float = Field(
        0.2,
        gt=0,
        le=0.5,
        description="Half side of the square around the gripper pixel, share of the shorter image side.",
    )


class SubtaskKind(str, Enum):
    move = "move"
    grasp = "grasp"
    lift = "lift"
    place = "place"
    push = "push"
    open_gripper = "open_gripper"
    close_gripper = "close_gripper"
    unknown = "unknown"


# Verbs (and two-word phrases) per kind. The earliest match in the subtask wins: subtasks are
# imperative, so the first verb is the main one ("move to the carrot and grasp it" is a move).
_KEYWORDS: dict[SubtaskKind, tuple[str, ...]] = {
    SubtaskKind.lift: ("pick up", "lift", "raise", "elevate"),
    SubtaskKind.place: ("place", "put", "drop", "release", "set down", "lay", "insert", "deposit", "let go", "stack"),
    SubtaskKind.grasp: ("grasp", "grab", "pick", "grip", "hold", "seize", "take", "catch"),
    SubtaskKind.push: ("push", "slide", "sweep", "shove", "nudge", "press"),
    SubtaskKind.move: (
        "move", "reach", "approach", "go to", "go", "position", "align", "hover", "lower", "rotate", "turn",
        "bring", "carry", "transport", "return", "retract", "center",
    ),
}
_GRIPPER_WORDS = frozenset({"gripper", "grippers", "fingers", "finger", "claw", "claws", "jaws", "hand"})


def _inflections(word: str) -> set[str]:
    forms = {word, word + "s", word + "es", word + "ed", word + "d", word + "ing"}
    if word.endswith("e"):
        forms |= {word[:-1] + "ing"}
    if len(word) >= 3 and word[-1] not in "aeiouwy" and word[-2] in "aeiou" and word[-3] not in "aeiou":
        forms |= {word + word[-1] + "ing", word + word[-1] + "ed"}  # drop -> dropping, put -> putting
    return forms


def _build_table() -> list[tuple[tuple[frozenset[str], ...], SubtaskKind]]:
    table = []
    for kind, phrases in _KEYWORDS.items():
        for phrase in phrases:
            words = phrase.split()
            table.append((tuple([frozenset(_inflections(words[0]))] + [frozenset({w}) for w in words[1:]]), kind))
    table.sort(key=lambda item: -len(item[0]))  # two-word phrases before their first word alone
    return table


_TABLE = _build_table()
_OPEN = frozenset(_inflections("open"))
_CLOSE = frozenset(_inflections("close")) | frozenset(_inflections("shut"))


def classify_subtask(subtask: str) -> SubtaskKind:
    """The kind of check a subtask calls for, from its verbs (case and punctuation do not matter)."""
    tokens = re.findall(r"[a-z]+", subtask.lower())
    mentions_gripper = any(t in _GRIPPER_WORDS for t in tokens)
    for i, token in enumerate(tokens):
        if mentions_gripper and token in _OPEN:
            return SubtaskKind.open_gripper
        if mentions_gripper and token in _CLOSE:
            return SubtaskKind.close_gripper
        for words, kind in _TABLE:
            if all(i + j < len(tokens) and tokens[i + j] in forms for j, forms in enumerate(words)):
                return kind
    return SubtaskKind.unknown


@dataclass(frozen=True, slots=True)
class ImageChange:
    """How much the post image differs from the pre image, whole and near the gripper."""

    mean_abs_diff: float  # mean absolute difference, 0-1, whole image
    changed_fraction: float  # share of pixels over the threshold, whole image
    region_changed_fraction: float  # the same near the gripper (the whole image without a gripper pixel)
    region_known: bool

    def describe(self) -> str:
        region = f" region {self.region_changed_fraction:.1%}" if self.region_known else ""
        return f"image mad {self.mean_abs_diff:.3f} changed {self.changed_fraction:.1%}{region}"


def image_change(request: VerificationRequest, config: HeuristicConfig) -> ImageChange:
    """Per-pixel mean absolute channel difference, thresholded; ~1 ms for a 256 x 256 image."""
    pre = request.pre_image.astype(np.int16)
    diff = np.abs(request.post_image.astype(np.int16) - pre).sum(axis=2, dtype=np.int32)  # H x W, 0..765
    changed = diff > 3 * config.pixel_change_threshold  # H x W bool: channel mean over the threshold
    whole = float(changed.mean())
    mad = float(diff.mean()) / (3 * 255)
    if request.gripper_pixel is None:
        return ImageChange(mad, whole, whole, region_known=False)
    h, w = changed.shape
    half = max(1, round(config.region_half_size * min(h, w)))
    cu, cv = round(request.gripper_pixel[0] * (w - 1)), round(request.gripper_pixel[1] * (h - 1))
    region = changed[max(0, cv - half) : cv + half + 1, max(0, cu - half) : cu + half + 1]
    return ImageChange(mad, whole, float(region.mean()), region_known=True)


@dataclass(frozen=True, slots=True)
class Motion:
    """Achieved versus commanded end-effector displacement."""

    commanded_m: float
    achieved_m: float
    fraction: float  # achieved displacement projected on the commanded direction, over the commanded length
    cosine: float  # direction agreement; 0 when either displacement is zero
    commanded: bool  # the chunk commanded a move at all

    def describe(self) -> str:
        if not self.commanded:
            return f"no move commanded, moved {self.achieved_m * 100:.1f} cm"
        return (
            f"moved {self.achieved_m * 100:.1f} cm of {self.commanded_m * 100:.1f} cm commanded "
            f"({self.fraction:.0%} along it, cos {self.cosine:.2f})"
        )


def measure_motion(request: VerificationRequest, config: HeuristicConfig) -> Motion:
    c = np.asarray(request.commanded_translation, dtype=float)
    a = np.asarray(request.achieved_translation, dtype=float)
    c_len, a_len = float(np.linalg.norm(c)), float(np.linalg.norm(a))
    commanded = c_len >= config.min_commanded_move_m
    fraction = float(a @ c) / (c_len * c_len) if commanded else 0.0
    cosine = float(a @ c) / (a_len * c_len) if commanded and a_len > 0 else 0.0
    return Motion(c_len, a_len, fraction, cosine, commanded)


# One object of the simulator's scene text (`runtime.sim.render.describe`): "carrot on the table: above
# (-0.18, -0.16, -0.06), grasp (...)": the offset, metres, from the gripper to the object's approach point.
_NUMBER = r"-?[0-9]+(?:\.[0-9]+)?"
_OFFSET = re.compile(
    r"(?P<name>[a-z][a-z ]*?) (?:on|in) the [a-z ]+?: "
    rf"above \((?P<dx>{_NUMBER}), (?P<dy>{_NUMBER}), (?P<dz>{_NUMBER})\)"
)


def target_offset(subtask: str, scene: str | None) -> tuple[str, tuple[int, int, int]] | None:
    """The offset (cm) from the gripper to the approach point of the object a "move to ..." subtask names,
    read from the scene text; None without scene text or when no listed object is named (then motion
    alone decides)."""
    if not scene:
        return None
    wanted = subtask.lower()
    found = None
    for match in _OFFSET.finditer(scene):  # the gripper's own line and a held object have no offset
        name = match["name"].strip()
        if re.search(rf"\b{re.escape(name)}\b", wanted) and (found is None or len(name) > len(found[0])):
            offset = tuple(round(float(match[axis]) * 100) for axis in ("dx", "dy", "dz"))
            found = (name, (offset[0], offset[1], offset[2]))
    return found


class HeuristicVerifier(Verifier):
    """Judges a step from the arm's own readings and a pixel difference; see the module table."""

    name = "heuristic"

    def __init__(self, config: HeuristicConfig | None = None) -> None:
        self.config = config or HeuristicConfig()

    def verify(self, request: VerificationRequest, cancel: threading.Event | None = None) -> Verdict:
        start = time.perf_counter()
        if cancel is not None and cancel.is_set():
            return cancelled_verdict(self.name, 0.0, attempts=0)
        kind = classify_subtask(request.subtask)
        motion = measure_motion(request, self.config)
        change = image_change(request, self.config)
        success, decision = self._decide(kind, request, motion, change)
        reason = f"{kind.value}: {decision}; {motion.describe()}; {change.describe()}"
        return Verdict(success, reason, self.name, latency_s=time.perf_counter() - start, attempts=1)

    # -- the checks ---------------------------------------------------------------------------------

    def _tracked(self, motion: Motion) -> bool:
        c = self.config
        return motion.commanded and c.min_move_fraction <= motion.fraction <= c.max_move_fraction and (
            motion.cosine >= c.min_direction_cosine
        )

    def _scene_changed(self, change: ImageChange) -> bool:
        return change.region_changed_fraction >= self.config.min_changed_fraction

    def _holding(self, request: VerificationRequest, change: ImageChange) -> tuple[bool, str]:
        """Closed on something: the fingers stopped between fully closed and not closed at all."""
        c, state = self.config, request.post_state
        if state.gripper_open:
            return False, "the gripper is open"
        opening = state.gripper_opening
        if opening is None:
            if self._scene_changed(change):
                return True, "gripper closed and the image changed near it (no finger measurement: image evidence only)"
            return False, "gripper closed but nothing changed near it (no finger measurement)"
        if not math.isfinite(opening):
            return False, f"finger opening reading is not a number ({opening})"
        if opening <= c.gripper_closed_max:
            return False, f"fingers closed fully (opening {opening:.2f} <= {c.gripper_closed_max:.2f}): nothing held"
        if opening > c.grasp_opening_max:
            return False, f"gripper commanded closed but still open (opening {opening:.2f})"
        return True, f"fingers stopped on an object (opening {opening:.2f} > {c.gripper_closed_max:.2f})"

    def _open(self, request: VerificationRequest) -> tuple[bool, str]:
        state, c = request.post_state, self.config
        if not state.gripper_open:
            return False, "the gripper is closed"
        if state.gripper_opening is not None and not state.gripper_opening >= c.gripper_open_min:
            return (
                False,
                f"gripper commanded open but opening is {state.gripper_opening:.2f} < {c.gripper_open_min:.2f}",
            )
        return True, "the gripper is open"

    def _decide(
        self, kind: SubtaskKind, request: VerificationRequest, motion: Motion, change: ImageChange
    ) -> tuple[bool, str]:
        c = self.config
        if kind is SubtaskKind.move:
            if not motion.commanded:
                return False, "no end-effector move was commanded, so the move cannot be confirmed"
            if not self._tracked(motion):
                return False, "the end effector did not follow the commanded move"
            target = target_offset(request.subtask, request.scene_after)
            if target is None:
                return True, "the end effector followed the commanded move"
            name, (dx, dy, dz) = target
            away = math.hypot(dx, dy)
            if away <= c.move_arrival_cm and abs(dz) <= c.move_arrival_cm:
                return (
                    True,
                    f"the gripper is over the {name} ({away:.0f} cm off, {abs(dz):.0f} cm in height, scene text)",
                )
            if away <= c.move_arrival_cm:
                return False, (f"the gripper is above the {name} but still {abs(dz):.0f} cm from its approach height "
                               "(scene text)")
            return False, f"the gripper followed the move but is still {away:.0f} cm from the {name} (scene text)"
        if kind is SubtaskKind.grasp:
            return self._holding(request, change)
        if kind is SubtaskKind.lift:
            rise = request.post_state.position[2] - request.pre_state.position[2]
            holding, why = self._holding(request, change)
            if rise < c.min_lift_m:
                return False, f"height gained {rise * 100:.1f} cm < {c.min_lift_m * 100:.1f} cm; {why}"
            return holding, f"height gained {rise * 100:.1f} cm; {why}"
        if kind is SubtaskKind.place:
            is_open, why = self._open(request)
            if not is_open:
                return False, why
            if not self._scene_changed(change):
                return False, f"{why} but the image did not change near it (the object did not leave)"
            return True, f"{why} and the image changed near it (the object left)"
        if kind is SubtaskKind.push:
            if not self._tracked(motion):
                return False, "the end effector did not follow the commanded push"
            if not self._scene_changed(change):
                return False, "the arm moved but the scene did not change (nothing was pushed)"
            return True, "the arm followed the push and the scene changed"
        if kind is SubtaskKind.open_gripper:
            return self._open(request)
        if kind is SubtaskKind.close_gripper:
            state = request.post_state
            if state.gripper_open:
                return False, "the gripper is open"
            if state.gripper_opening is not None and not state.gripper_opening < c.gripper_open_min:
                return False, f"gripper commanded closed but opening is {state.gripper_opening:.2f}"
            return True, "the gripper is closed"
        # unknown: the weakest evidence that anything happened as commanded
        if motion.commanded and not self._tracked(motion):
            return False, "unrecognised subtask and the end effector did not follow the command"
        if not self._scene_changed(change):
            return False, "unrecognised subtask and the scene did not change"
        return True, "unrecognised subtask; the arm followed the command and the scene changed"
