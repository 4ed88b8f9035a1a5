"""The episode loop in the simulator with fake policies: outcomes, recording, safety, cancel, e-stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeReader, EpisodeWriter
from vlm2vla_edge.runtime.events import EpisodeEnded, EpisodeStarted, LoopEvent, SafetyChecked
from vlm2vla_edge.runtime.recording import EpisodeRecorder, ProgressPrinter
from vlm2vla_edge.runtime.robot.base import DeviceError
from vlm2vla_edge.runtime.runner import EpisodeRunner, RunnerConfig, SceneHooks
from vlm2vla_edge.runtime.safety import SafetyLimiter
from vlm2vla_edge.runtime.sim.scene import Scene
from vlm2vla_edge.runtime.sim.world import SimArm, SimCamera, SimWorld
from vlm2vla_edge.runtime.verifier.base import Verdict, Verifier
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier
from vlm2vla_edge.testing.policies import ScriptedPolicy, block_until_cancelled

ROBOT = load_robot_config()


class ScriptedVerifier(Verifier):
    name = "scripted"

    def __init__(self, answers: list[bool]) -> None:
        self.answers = list(answers)
        self.requests = []

    def verify(self, request, cancel=None) -> Verdict:
        self.requests.append(request)
        ok = self.answers.pop(0) if self.answers else True
        return Verdict(success=ok, reason="scripted", verifier=self.name, latency_s=0.0)


class Collect:
    def __init__(self) -> None:
        self.events: list[LoopEvent] = []

    def on_event(self, event: LoopEvent) -> None:
        self.events.append(event)


def make(
    policy, verifier=None, tmp_path: Path | None = None, realtime: bool = False, config: RunnerConfig | None = None
):
    world = SimWorld(ROBOT, Scene.random(7, required=("carrot",), n_distractors=1), realtime=realtime)
    arm, camera = SimArm(world), SimCamera(world)
    arm.connect()
    camera.connect()
    limiter = SafetyLimiter(ROBOT, reachable=world.reachable, clock=world.clock)
    collect = Collect()
    subscribers = [collect]
    writer = None
    if tmp_path is not None:
        writer = EpisodeWriter.create(tmp_path, EpisodeMeta(instruction="pick up the carrot", source="test"))
        subscribers.append(EpisodeRecorder(writer))
    runner = EpisodeRunner(
        policy, arm, camera, verifier or ScriptedVerifier([]), limiter, config=config,
        hooks=SceneHooks(describe=world.describe), subscribers=subscribers,
    )
    return runner, world, limiter, collect, writer


def inside_limits(position) -> bool:
    box = ROBOT.workspace
    x, y, z = position
    eps = 1e-6
    return (box.x.min - eps <= x <= box.x.max + eps and box.y.min - eps <= y <= box.y.max + eps
            and max(box.z.min, ROBOT.z_floor) - eps <= z <= box.z.max + eps)


def test_success_is_recorded_step_by_step(tmp_path: Path) -> None:
    runner, world, _, collect, writer = make(ScriptedPolicy(), tmp_path=tmp_path)
    result = runner.run("pick up the carrot")
    assert result.outcome == "success", result.detail
    assert result.completed_subtasks == 2 and result.steps == 2
    reader = EpisodeReader(writer.path)
    assert reader.outcome == "success"
    stages = [s.stage for s in reader.steps()]
    assert stages == ["subtasks", "motion", "action", "verify", "motion", "action", "verify"]
    action = [s for s in reader.steps() if s.stage == "action"][0]
    assert action.raw_text == "[[0.02, 0, -0.02, 1]]" and action.parsed_actions == [[0.02, 0.0, -0.02, 1.0]]
    assert action.executed and action.executed[0].completed
    assert reader.frame(reader.steps()[0].image).shape == (256, 256, 3)
    verify = [s for s in reader.steps() if s.stage == "verify"][0]
    assert verify.verifier.verifier == "scripted" and "after" in verify.images
    assert isinstance(collect.events[0], EpisodeStarted) and isinstance(collect.events[-1], EpisodeEnded)


def test_retries_then_fails_with_subtask_and_reason(tmp_path: Path) -> None:
    policy = ScriptedPolicy()
    runner, *_, writer = make(
        policy, ScriptedVerifier([False] * 10), tmp_path, config=RunnerConfig(max_retries_per_subtask=2)
    )
    result = runner.run("pick up the carrot")
    assert result.outcome == "failed"
    assert "subtask 1 'Move to the carrot' failed 3 times" in result.detail
    assert policy.retries == 2 and result.retries == 3
    assert EpisodeReader(writer.path).outcome == "failed"


class CutOffSubtasksPolicy(ScriptedPolicy):
    """A model whose subtask list runs into its token budget (seen with untrained models)."""

    def subtasks(self, observation, instruction, *, cancel=None):
        from vlm2vla_edge.runtime.policy.interface import PolicyOutputError

        raise PolicyOutputError("subtasks", '["Move to the carr', "cut off by the token budget")


def test_unusable_subtask_list_is_recorded_with_its_raw_text(tmp_path: Path) -> None:
    runner, world, _, collect, writer = make(CutOffSubtasksPolicy(), tmp_path=tmp_path)
    start = world.ee_position
    result = runner.run("pick up the carrot")
    assert result.outcome == "failed" and "token budget" in result.detail
    reader = EpisodeReader(writer.path)
    (step,) = reader.steps()
    assert step.stage == "subtasks" and step.raw_text == '["Move to the carr' and "token budget" in step.error
    assert reader.frame(step.image).shape == (256, 256, 3)
    assert np.allclose(world.ee_position, start)
    lines: list[str] = []
    printer = ProgressPrinter(echo=lines.append)
    for event in collect.events:
        printer.on_event(event)
    assert any("subtasks: model output rejected" in line for line in lines)


def test_hostile_policy_never_moves_the_arm_out_of_limits() -> None:
    hostile = [
        "[[0.2, 0.2, 0.2, 1], [0.2, 0.2, 0.2, 1], [0.2, 0.2, 0.2, 1]]",
        "[[0, 0, -0.2, 0], [0, 0, -0.2, 0], [0, 0, -0.2, 0], [0, 0, -0.2, 0]]",
        "[[-0.2, -0.2, 0, 1], [-0.2, -0.2, 0, 1], [-0.2, -0.2, 0, 1], [-0.2, -0.2, 0, 1]]",
        "[[0.2, 0, 0, 1]]",
    ]
    policy = ScriptedPolicy(subtasks=("Go",), actions=hostile)
    runner, world, _, collect, _ = make(policy, ScriptedVerifier([False] * 3 + [True]))
    positions = []
    original = world.set_joints

    def spy(joints, ee=None):
        original(joints, ee)
        positions.append(world.ee_position)

    world.set_joints = spy  # type: ignore[method-assign]
    result = runner.run("go everywhere")
    assert result.outcome == "success"
    assert positions, "the arm never moved"
    assert all(inside_limits(p) for p in positions)
    safety = [e for e in collect.events if isinstance(e, SafetyChecked)]
    assert any(d.verdict == "clamp" for e in safety for c in e.verdict.commands for d in c.decisions)


def test_cancel_mid_generation_takes_effect_in_milliseconds(tmp_path: Path) -> None:
    started = threading.Event()
    runner, *_ , writer = make(ScriptedPolicy(on_step=block_until_cancelled(started)), tmp_path=tmp_path)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", runner.run("pick up the carrot")))
    thread.start()
    assert started.wait(5)
    t0 = time.monotonic()
    runner.cancel("user pressed stop")
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - t0 < 0.5
    assert outcome["result"].outcome == "aborted"
    assert "user pressed stop" in outcome["result"].detail
    assert EpisodeReader(writer.path).outcome == "aborted"


def test_estop_mid_chunk_halts_the_arm_and_latches(tmp_path: Path) -> None:
    moving = threading.Event()
    policy = ScriptedPolicy(actions=("[[0, 0, -0.05, 1], [0, 0, -0.05, 1], [0, 0, -0.05, 1]]",))
    runner, world, limiter, _, writer = make(policy, tmp_path=tmp_path, realtime=True)
    original = world.set_joints

    def spy(joints, ee=None):
        moving.set()
        original(joints, ee)

    world.set_joints = spy  # type: ignore[method-assign]
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", runner.run("pick up the carrot")))
    thread.start()
    assert moving.wait(5)
    runner.estop("operator")
    stopped_at = world.ee_position
    thread.join(5)
    assert outcome["result"].outcome == "aborted"
    assert limiter.engaged
    time.sleep(0.05)
    assert np.allclose(world.ee_position, stopped_at, atol=0.01)  # at most one segment after the stop
    again = runner.run("pick up the carrot")
    assert again.outcome == "aborted" and "reset" in again.detail


class FailingCamera(SimCamera):
    def __init__(self, world, fail_after: int) -> None:
        super().__init__(world)
        self.reads = 0
        self.fail_after = fail_after

    def read(self, timeout_s: float = 1.0):
        self.reads += 1
        if self.reads > self.fail_after:
            raise DeviceError("camera unplugged")
        return super().read(timeout_s)


def test_device_fault_ends_in_error_with_arm_stopped(tmp_path: Path) -> None:
    runner, world, *_ = make(ScriptedPolicy(), tmp_path=tmp_path)
    runner.camera = FailingCamera(world, fail_after=2)
    runner.camera.connect()
    stops = []
    original_stop = runner.arm.stop
    runner.arm.stop = lambda: (stops.append(1), original_stop())  # type: ignore[method-assign]
    result = runner.run("pick up the carrot")
    assert result.outcome == "error" and "camera unplugged" in result.detail
    assert stops


def test_text_only_policy_gets_the_scene_description() -> None:
    policy = ScriptedPolicy(needs_image=False)
    runner, *_ = make(policy)
    assert runner.run("pick up the carrot").outcome == "success"
    assert all(o.scene and "carrot" in o.scene for o in policy.observations)


def test_heuristic_verifier_in_the_loop() -> None:
    # The first subtask moves and the heuristic sees the motion; the run ends either way, recorded.
    runner, *_ = make(
        ScriptedPolicy(subtasks=("Move to the carrot",)),
        HeuristicVerifier(),
        config=RunnerConfig(max_retries_per_subtask=1),
    )
    result = runner.run("pick up the carrot")
    assert result.outcome in ("success", "failed")
    assert result.stage_latency_s["verify"]


def test_progress_printer_lines() -> None:
    lines: list[str] = []
    runner, *_ = make(ScriptedPolicy())
    runner.subscribers.append(ProgressPrinter(echo=lines.append))
    runner.run("levanta la zanahoria")
    text = "\n".join(lines)
    assert "instruction: levanta la zanahoria" in text
    assert "subtasks: Move to the carrot -> Grasp the carrot" in text
    assert "verdict: done" in text and "outcome: success" in text


def test_empty_instruction_is_a_user_error() -> None:
    from vlm2vla_edge.runtime.errors import UserError

    runner, *_ = make(ScriptedPolicy())
    with pytest.raises(UserError):
        runner.run("   ")


KILL_SCRIPT = r"""
import sys, time
from vlm2vla_edge.testing.policies import ScriptedPolicy
from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.episode import EpisodeMeta, EpisodeWriter
from vlm2vla_edge.runtime.recording import EpisodeRecorder
from vlm2vla_edge.runtime.runner import EpisodeRunner, SceneHooks
from vlm2vla_edge.runtime.safety import SafetyLimiter
from vlm2vla_edge.runtime.sim.scene import Scene
from vlm2vla_edge.runtime.sim.world import SimArm, SimCamera, SimWorld
from vlm2vla_edge.runtime.verifier.base import Verdict, Verifier

class Never(Verifier):
    def verify(self, request, cancel=None):
        return Verdict(success=False, reason="not yet", verifier="never", latency_s=0.0)

robot = load_robot_config()
world = SimWorld(robot, Scene.random(3, required=("carrot",)))
arm, camera = SimArm(world), SimCamera(world)
arm.connect(); camera.connect()
writer = EpisodeWriter.create(sys.argv[1], EpisodeMeta(instruction="pick up the carrot"), episode_id="killed")
policy = ScriptedPolicy(actions=("[[0.01, 0, 0, 1]]", "[[-0.01, 0, 0, 1]]"), on_step=lambda i, c: time.sleep(0.05))
runner = EpisodeRunner(policy, arm, camera, Never(), SafetyLimiter(robot, reachable=world.reachable, clock=world.clock),
                       hooks=SceneHooks(describe=world.describe), subscribers=[EpisodeRecorder(writer)])
from vlm2vla_edge.runtime.runner import RunnerConfig
runner.config = RunnerConfig(max_retries_per_subtask=20, max_steps=1000)
print("started", flush=True)
runner.run("pick up the carrot")
"""


def test_sigkill_mid_episode_leaves_a_readable_episode(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        steps_file = tmp_path / "killed" / "steps.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not steps_file.exists() or steps_file.read_text().count("\n") < 12):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader = EpisodeReader(tmp_path / "killed")
    steps = list(reader.steps())
    assert len(steps) >= 12
    assert reader.outcome == "interrupted"
    assert [s.index for s in steps] == list(range(len(steps)))
    for step in steps:
        if step.image:
            assert reader.frame(step.image).shape[2] == 3


@pytest.mark.slow
@pytest.mark.parametrize("bundle_fixture", ["gemma270m_bundle", "tiny_vision_bundle"])
def test_real_bundles_run_whole_episodes_inside_the_limits(bundle_fixture: str, request, tmp_path: Path) -> None:
    """Real llama.cpp policies (the text-only Gemma-3-270M and the tiny random vision model) through the
    whole loop: outcome recorded, files readable, and no arm position ever outside the limits."""
    from vlm2vla_edge.runtime.config import PolicyConfig
    from vlm2vla_edge.runtime.policy.engine import LlamaPolicy
    from vlm2vla_edge.runtime.sim.session import make_sim_session

    bundle = request.getfixturevalue(bundle_fixture)
    session = make_sim_session(ROBOT, seed=4, instruction="pick up the carrot")
    positions = []
    original = session.world.set_joints

    def spy(joints, ee=None):
        original(joints, ee)
        positions.append(session.world.ee_position)

    session.world.set_joints = spy  # type: ignore[method-assign]
    writer = EpisodeWriter.create(
        tmp_path, EpisodeMeta(instruction="pick up the carrot", bundle_id=bundle.manifest.name)
    )
    config = PolicyConfig(n_threads=2, n_ctx=2048, n_batch=256, n_ubatch=256)
    with LlamaPolicy.from_bundle(bundle, config) as policy:
        runner = EpisodeRunner(
            policy, session.arm, session.camera, HeuristicVerifier(), session.limiter,
            config=RunnerConfig(max_retries_per_subtask=0, max_steps=3),
            hooks=session.hooks, subscribers=[EpisodeRecorder(writer)],
        )
        result = runner.run("pick up the carrot")
    assert result.outcome in ("success", "failed"), result.detail
    reader = EpisodeReader(writer.path)
    assert reader.outcome == result.outcome and not reader.truncated
    steps = list(reader.steps())
    # the grammar opens every subtask list; an untrained model may still run out of tokens inside it
    assert steps[0].stage == "subtasks" and steps[0].raw_text.startswith("[")
    assert (steps[0].error is None) == (len(steps) > 1)
    for step in steps:
        if step.image:
            reader.frame(step.image)
    assert all(inside_limits(p) for p in positions)
