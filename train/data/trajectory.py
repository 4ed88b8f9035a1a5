"""A demonstration as arrays: the steps of a recorded episode that have both a position and an action.

Everything the annotators derive (segments, wording, chunks) is computed from a `Trajectory`, so an
episode's format is read in one place. `GripperEvent` is the vocabulary of gripper changes they share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from vlm2vla_edge.runtime.episode import EpisodeReader

GripperEvent = Literal["close", "open"]


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
        scenes=[
            (r.extra or {}).get("scene_description")
            if isinstance((r.extra or {}).get("scene_description"), str)
            else None
            for r in rows
        ],
    )
