"""Fake policies at the `Policy` interface: scripted, hostile and blocking ones (no model needed)."""

from __future__ import annotations

import re
import threading
from typing import Callable, Sequence

from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.policy.interface import (
    GenerationCancelled,
    Observation,
    StageOutput,
    StepResult,
    SubtasksResult,
)


class ScriptedPolicy:
    """Answers from fixed texts, parsed by the real parser, exactly like a model would be.

    `actions` is a list of action-chunk texts used in turn (the last one repeats, or all of them with
    `cycle=True`); `on_step` lets a test observe or block each step.
    """

    def __init__(
        self,
        subtasks: Sequence[str] = ("Move to the carrot", "Grasp the carrot"),
        actions: Sequence[str] = ("[[0.02, 0, -0.02, 1]]",),
        motion: str = "Move primarily forward and slightly down",
        needs_image: bool = True,
        on_step: Callable[[int, threading.Event | None], None] | None = None,
        cycle: bool = False,
        language: ActionLanguage | None = None,
    ) -> None:
        self._language = language or ActionLanguage()
        self._subtasks = '["' + '", "'.join(subtasks) + '"]'
        self._actions = list(actions)
        self._motion = motion
        self._needs_image = needs_image
        self._on_step = on_step
        self._cycle = cycle  # True: the action texts repeat in turn (a long-lived daemon does not drift)
        self.steps = 0
        self.retries = 0
        self.observations: list[Observation] = []

    @property
    def needs_image(self) -> bool:
        return self._needs_image

    @property
    def action_language(self) -> ActionLanguage:
        return self._language

    @property
    def bundle_id(self) -> str:
        return "scripted-fake"

    def subtasks(
        self, observation: Observation, instruction: str, *, cancel: threading.Event | None = None
    ) -> SubtasksResult:
        self.observations.append(observation)
        return SubtasksResult(
            subtasks=parse_subtasks(self._subtasks),
            output=StageOutput("subtasks", f"plan: {instruction}", self._subtasks, {"total_s": 0.001}),
        )

    def step(
        self,
        observation: Observation,
        instruction: str,
        subtask: str,
        *,
        retry: bool = False,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        self.observations.append(observation)
        index = self.steps
        self.steps += 1
        self.retries += int(retry)
        if self._on_step is not None:
            self._on_step(index, cancel)
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("cancelled")
        text = self._actions[index % len(self._actions) if self._cycle else min(index, len(self._actions) - 1)]
        return StepResult(
            motion=parse_motion_plan(self._motion),
            chunk=parse_action_chunk(text, self.action_language),
            motion_output=StageOutput("motion", f"motion for {subtask}", self._motion, {"total_s": 0.001}),
            action_output=StageOutput("action", f"action for {subtask}", text, {"total_s": 0.001}),
        )


def block_until_cancelled(
    started: threading.Event, limit_s: float = 10.0
) -> Callable[[int, threading.Event | None], None]:
    """An `on_step` hook that simulates a long generation which checks the cancel flag every step."""

    def hook(index: int, cancel: threading.Event | None) -> None:
        started.set()
        assert cancel is not None
        if cancel.wait(limit_s):
            raise GenerationCancelled("cancelled mid-generation")

    return hook


class SceneCopyPolicy:
    """What a trained waypoint model should do, done by rules: a text-only policy that copies the key point
    of the subtask's object from the simulator's scene text into its plan and its one-action chunk.

    It speaks the `policy_waypoints` action language with the annotator's plan wording, so runs with it
    measure the ceiling of the loop around the model (runner, interpolation, limiter, verifier, sim).
    """

    _OBJECT = re.compile(r"([a-z]+) (?:on|in) the [a-z]+: above (\([^)]*\))(?:, grasp (\([^)]*\)))?")

    def __init__(
        self, subtasks: Sequence[str] | Callable[[str], Sequence[str]], language: ActionLanguage | None = None
    ) -> None:
        """`subtasks`: the list to answer, or a function of the instruction giving it."""
        from vlm2vla_edge.runtime.config import load_policy_config

        self._subtasks = subtasks if callable(subtasks) else (lambda _instruction, fixed=list(subtasks): fixed)
        self._language = language or load_policy_config("policy_waypoints").action_language
        self.steps = 0

    @property
    def needs_image(self) -> bool:
        return False

    @property
    def action_language(self) -> ActionLanguage:
        return self._language

    @property
    def bundle_id(self) -> str:
        return "scene-copy-fake"

    def subtasks(
        self, observation: Observation, instruction: str, *, cancel: threading.Event | None = None
    ) -> SubtasksResult:
        text = '["' + '", "'.join(self._subtasks(instruction)) + '"]'
        return SubtasksResult(subtasks=parse_subtasks(text), output=StageOutput("subtasks", instruction, text, {}))

    def step(
        self, observation: Observation, instruction: str, subtask: str, *, retry: bool = False,
        cancel: threading.Event | None = None,
    ) -> StepResult:
        from vlm2vla_edge.runtime.scene_text import scene_in_units
        from vlm2vla_edge.train.data.chunks import waypoint_plan_text

        self.steps += 1
        assert observation.scene is not None
        points = {m[1]: (m[2], m[3]) for m in self._OBJECT.finditer(observation.scene)}
        verb, name = subtask.split(" ")[0], subtask.rsplit(" ", 1)[-1]
        offset, gripper, event = "(0, 0, 0)", "1", None
        if verb == "Move" and name in points:
            offset = points[name][0]
            gripper = "0" if "holding nothing" not in observation.scene else "1"
        elif verb == "Grasp" and name in points and points[name][1]:
            offset, gripper, event = points[name][1], "0", "close"
        elif verb == "Lift":
            offset, gripper = "(0, 0, 0.1)", "0"
        elif verb == "Release":
            offset, gripper, event = "(0, 0, -0.03)", "1", "open"
        values = [float(v) for v in offset.strip("()").split(", ")]  # metres, as the scene source states them
        units = self._language.units
        plan = waypoint_plan_text(subtask, values, event, self._language.decimals, gripper_open=gripper == "1",
                                  units=units)
        text = f"[[{scene_in_units(offset, units).strip('()')}, {gripper}]]"  # the numbers a model would copy
        return StepResult(
            motion=parse_motion_plan(plan),
            chunk=parse_action_chunk(text, self._language),
            motion_output=StageOutput("motion", subtask, plan, {}),
            action_output=StageOutput("action", subtask, text, {}),
        )
