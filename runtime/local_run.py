"""One episode in this process (`vlm2vla-edge do --local`): load the bundle, set up the robot (simulated
or real), run the loop with live progress, and record the episode.

The daemon (`runtime/daemon/`) holds the same pieces (`runtime/station.py`) across episodes; here they
live for one run and are always released (arm stopped, model freed) on the way out.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlm2vla_edge.runtime.config import PolicyConfig, RobotConfig
from vlm2vla_edge.runtime.episode import EpisodeWriter
from vlm2vla_edge.runtime.events import EpisodeResult
from vlm2vla_edge.runtime.recording import EpisodeRecorder, ProgressPrinter
from vlm2vla_edge.runtime.runner import EpisodeRunner, RunnerConfig
from vlm2vla_edge.runtime.station import episode_meta, load_policy, open_station
from vlm2vla_edge.runtime.verifier.fallback import VerifierConfig, make_verifier


@dataclass(frozen=True)
class LocalRunOptions:
    instruction: str
    bundle: Path
    robot: RobotConfig
    policy: PolicyConfig
    episodes_dir: Path
    sim: bool = True
    seed: int = 0
    devices: Path | None = None  # YAML with `arm:` and `camera:` sections (real hardware)
    verifier: VerifierConfig = VerifierConfig()
    runner: RunnerConfig = RunnerConfig()
    realtime: bool = False
    record_frames: bool = True
    adapter: str | None = None  # a base + adapters bundle's adapter (skill); None: the bundle's default


@dataclass(frozen=True)
class LocalRunResult:
    result: EpisodeResult
    episode_dir: Path


def run_local(options: LocalRunOptions, echo: Callable[[str], None] = print) -> LocalRunResult:
    """Run one episode end to end; Ctrl-C cancels it cleanly (arm stopped, episode recorded)."""
    with contextlib.closing(load_policy(options.bundle, options.policy, echo, adapter=options.adapter)) as policy:
        with open_station(
            options.robot, sim=options.sim, seed=options.seed, instruction=options.instruction,
            devices=options.devices, realtime=options.realtime,
        ) as station:
            writer = EpisodeWriter.create(
                options.episodes_dir,
                episode_meta(
                    options.instruction, options.robot, station, policy, seed=options.seed if options.sim else None
                ),
            )
            runner = EpisodeRunner(
                policy, station.arm, station.camera, make_verifier(options.verifier), station.limiter,
                config=options.runner, hooks=station.hooks,
                subscribers=[EpisodeRecorder(writer, options.record_frames), ProgressPrinter(echo=echo)],
            )
            with on_interrupt(lambda: runner.cancel(INTERRUPTED)):
                result = runner.run(options.instruction)
            return LocalRunResult(result, writer.path)


INTERRUPTED = "interrupted by the user (Ctrl-C)"


@contextlib.contextmanager
def on_interrupt(callback: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C (SIGINT) calls `callback` instead of killing the process mid-move (main thread only;
    elsewhere signals cannot be handled and nothing changes). The previous handler comes back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        callback()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
