"""The scripted expert solves the suite through the safety limiter and records loadable demonstrations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeReader
from vlm2vla_edge.runtime.safety import SafetyLimiter
from vlm2vla_edge.runtime.sim.expert import ScriptedExpert, run_expert_episode
from vlm2vla_edge.runtime.sim.scene import Scene
from vlm2vla_edge.runtime.sim.tasks import Episode, paper_composite, sample_episode
from vlm2vla_edge.runtime.sim.world import SimArm, SimWorld

ROBOT = load_robot_config()
LIMITS = ROBOT.limits


@pytest.mark.parametrize("seed", range(30))
def test_chunks_respect_the_action_language_and_limits(seed: int) -> None:
    episode = sample_episode(seed)
    world = SimWorld(ROBOT, episode.scene.copy())
    arm = SimArm(world)
    limiter = SafetyLimiter(ROBOT, reachable=world.reachable, clock=world.clock)
    with arm:
        for chunk in ScriptedExpert(ROBOT).chunks(episode.task, world):
            assert 1 <= len(chunk) <= LIMITS.max_chunk_length
            assert chunk.path_length() <= LIMITS.max_translation_per_chunk_m
            for action in chunk:
                assert action.norm() <= LIMITS.max_translation_per_action_m
                assert action.gripper in (0.0, 1.0)
            verdict = limiter.check_chunk(chunk, arm.read_state().position)
            assert not verdict.rejected and not verdict.decisions
            for command in verdict.commands:
                assert arm.execute(command).completed
    assert episode.task.success(world)


def check_demo(path: Path, frames: bool, steps: int) -> None:
    reader = EpisodeReader(path)
    assert reader.outcome == "success" and not reader.truncated
    assert reader.meta.source == "sim" and reader.meta.robot_model == "wx250s"
    records = reader.steps()
    assert len(records) == steps
    position = np.array(records[0].ee_position)
    for i, step in enumerate(records):
        assert step.index == i and step.stage == "demo"
        assert step.action is not None and len(step.action) == 4
        assert math.dist((0, 0, 0), step.action[:3]) <= LIMITS.max_translation_per_action_m
        assert step.safety == []  # every command passed unchanged
        assert np.allclose(step.ee_position, position, atol=1e-9)  # observation = previous pose + action
        position = np.array(step.ee_position) + np.array(step.action[:3])
        assert step.executed and step.executed[0].completed
        assert step.extra["scene_description"].startswith("gripper open, ") or step.extra[
            "scene_description"
        ].startswith("gripper closed, ")
        if frames:
            assert step.image is not None and reader.frame(step.image).shape == (256, 256, 3)
        else:
            assert step.image is None


def test_expert_demonstrations_with_frames_load_back(tmp_path: Path) -> None:
    episodes = [sample_episode(s) for s in range(3)]
    episodes.append(
        Episode(seed=99, task=paper_composite("es"), scene=Scene.random(99, ["eggplant", "pan", "fish"], 2))
    )
    for episode in episodes:
        result = run_expert_episode(episode, ROBOT, record_to=tmp_path, frames=True)
        assert result.success and result.partial_credit == 1.0, (result.instruction, result.notes)
        assert result.rejected == 0 and result.clamped == 0 and result.incomplete_moves == 0
        assert result.path is not None
        check_demo(result.path, frames=True, steps=result.steps)
    reader = EpisodeReader(tmp_path / "sim-0000099")
    assert reader.meta.instruction == "pon la berenjena en la sartén y luego levanta el pez"
    assert reader.meta.extra["instruction_en"] == "put the eggplant in the pan then lift the fish"
    last = reader.steps()[-1]  # the final lift, observed with the fish already in the closed gripper
    assert "closed, holding the fish" in last.extra["scene_description"] and last.gripper_open is False


def test_an_existing_demonstration_is_never_overwritten(tmp_path: Path) -> None:
    from vlm2vla_edge.runtime.episode import EpisodeExistsError

    run_expert_episode(sample_episode(1), ROBOT, record_to=tmp_path, frames=False)
    with pytest.raises(EpisodeExistsError):
        run_expert_episode(sample_episode(1), ROBOT, record_to=tmp_path, frames=False)


@pytest.mark.slow
def test_expert_solves_500_random_episodes_without_a_single_limiter_reject(tmp_path: Path) -> None:
    solved = 0
    for seed in range(500):
        episode = sample_episode(10_000 + seed)
        record = seed % 10 == 0  # every tenth is recorded (fsync per step dominates the time) and read back
        result = run_expert_episode(episode, ROBOT, record_to=tmp_path if record else None, frames=False)
        assert result.rejected == 0 and result.clamped == 0, (seed, result.notes)
        solved += result.success
        if record:
            assert result.path is not None
            reader = EpisodeReader(result.path)
            assert len(reader) == result.steps
            assert reader.outcome == ("success" if result.success else "failed")
    assert solved >= 495, f"expert solved {solved}/500"
