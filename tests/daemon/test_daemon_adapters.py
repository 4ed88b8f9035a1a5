"""The daemon with a base + adapters bundle: a task names its adapter (or gets the default), the switch
happens between episodes, and status, the task and the recorded episode name the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm2vla_edge.runtime.config import load_robot_config
from vlm2vla_edge.runtime.daemon.service import Daemon, InvalidRequest, validate_adapter
from vlm2vla_edge.runtime.runtime_config import DaemonConfig
from vlm2vla_edge.runtime.sim.session import make_sim_session
from vlm2vla_edge.runtime.station import Station
from vlm2vla_edge.runtime.verifier.heuristic import HeuristicVerifier
from vlm2vla_edge.testing.policies import ScriptedPolicy


class SkilledPolicy(ScriptedPolicy):
    """A scripted policy with the engine's adapter surface (adapters, adapter, default_adapter, use_adapter)."""

    def __init__(self) -> None:
        super().__init__(needs_image=False)
        self.adapters = ("pick", "wipe")
        self.default_adapter = "pick"
        self.adapter = "pick"
        self.switches: list[str] = []

    @property
    def bundle_id(self) -> str:
        return f"skills@0123+{self.adapter}@4567"

    def use_adapter(self, name: str) -> float:
        self.switches.append(name)
        self.adapter = name
        return 0.002


def test_validate_adapter() -> None:
    assert validate_adapter(None, ("pick",)) is None
    assert validate_adapter("pick", ("pick", "wipe")) == "pick"
    with pytest.raises(InvalidRequest, match="no adapter 'mop'; its adapters: pick, wipe"):
        validate_adapter("mop", ("pick", "wipe"))
    with pytest.raises(InvalidRequest, match="must be a string"):
        validate_adapter(["pick"], ("pick",))
    with pytest.raises(InvalidRequest, match="has no adapters .*merged"):
        validate_adapter("pick", ())
    with pytest.raises(InvalidRequest, match=r"no adapter 'a\?b'"):  # control characters are not echoed
        validate_adapter("a\x1bb", ("pick",))


@pytest.fixture()
def daemon(tmp_path: Path):
    robot = load_robot_config()
    session = make_sim_session(robot, realtime=False)
    station = Station(session.arm, session.camera, session.limiter, session.hooks, "sim", sim=session)
    daemon = Daemon(SkilledPolicy(), station, HeuristicVerifier(), robot=robot, episodes_dir=tmp_path / "episodes",
                    config=DaemonConfig())
    try:
        yield daemon
    finally:
        daemon.shutdown()
        session.close()


def test_tasks_name_their_adapter_and_the_episode_records_it(daemon: Daemon) -> None:
    policy = daemon.policy
    assert isinstance(policy, SkilledPolicy)
    status = daemon.status()
    assert status["adapter"] == "pick" and status["adapters"] == ["pick", "wipe"] and status["adapter_switches"] == 0

    task = daemon.submit("lift the carrot", adapter="wipe")
    assert task.adapter == "wipe" and task.to_json()["adapter"] == "wipe" and policy.switches == ["wipe"]
    assert task.done.wait(60)
    meta = json.loads((task.episode_dir / "meta.json").read_text())
    assert meta["adapter"] == "wipe" and meta["bundle_id"].endswith("+wipe@4567")
    status = daemon.status()
    assert status["adapter"] == "wipe" and status["adapter_switches"] == 1 and status["last_adapter_switch_ms"] == 2.0

    again = daemon.submit("lift the carrot", adapter="wipe")  # already applied: no switch
    assert again.done.wait(60) and policy.switches == ["wipe"]
    default = daemon.submit("lift the carrot")  # no name: the bundle's default
    assert default.adapter == "pick" and policy.switches == ["wipe", "pick"]
    assert default.done.wait(60)

    text = daemon.metrics.render(estop_engaged=False).decode()
    assert 'vlm2vla_adapter_active{adapter="pick"} 1.0' in text and 'vlm2vla_adapter_active{adapter="wipe"} 0.0' in text
    assert (
        'vlm2vla_adapter_switches_total{adapter="wipe"} 1.0' in text
        and "vlm2vla_adapter_switch_seconds_count 2.0" in text
    )

    with pytest.raises(InvalidRequest, match="no adapter 'mop'"):
        daemon.submit("lift the carrot", adapter="mop")
    assert policy.adapter == "pick"  # a refused task changes nothing
