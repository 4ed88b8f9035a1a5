"""Configs: the shipped presets load, and bad files fail with file, field and range in one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm2vla_edge.runtime.config import (
    HARD_LIMITS,
    PolicyConfig,
    RobotConfig,
    load_config,
    load_policy_config,
    load_robot_config,
    packaged_configs_dir,
)
from vlm2vla_edge.runtime.errors import ConfigError, UserError
from vlm2vla_edge.runtime.runtime_config import RuntimeConfig, load_runtime_config

ROBOT_YAML = packaged_configs_dir() / "robots" / "widowx250s.yaml"


def _robot_dict() -> dict:
    return yaml.safe_load(ROBOT_YAML.read_text())


def _write(tmp_path: Path, data: object, name: str = "robot.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_shipped_presets_load() -> None:
    robot = load_robot_config()
    assert robot.model == "wx250s"
    assert robot.z_floor == pytest.approx(robot.table_z + robot.min_clearance_m)
    assert [i.min for i in robot.joint_intervals()][0] == pytest.approx(-3.14158)
    policy = load_policy_config()
    assert (policy.sampling.subtasks.temperature, policy.sampling.motion.temperature) == (0.5, 0.1)
    assert (policy.sampling.action.temperature, policy.sampling.retry.temperature) == (0.5, 1.0)
    assert all(s.top_p == 0.95 for s in (policy.sampling.subtasks, policy.sampling.motion, policy.sampling.action))
    assert isinstance(load_runtime_config(), RuntimeConfig)


def test_presets_and_defaults_agree() -> None:
    """The YAML presets restate the paper's defaults; the model defaults must say the same."""
    assert load_policy_config() == PolicyConfig()


def test_home_and_sleep_inside_joint_limits() -> None:
    robot = load_robot_config()
    for pose in (robot.home_joints, robot.sleep_joints):
        assert all(i.contains(v) for i, v in zip(robot.joint_intervals(), pose))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["limits"].update(max_translation_per_action_m=0.5), "limits.max_translation_per_action_m"),
        (lambda d: d["limits"].update(max_chunk_length=1000), "max_chunk_length"),
        (lambda d: d["limits"].update(max_commands_per_s=0), "limits.max_commands_per_s"),
        (lambda d: d["workspace"]["x"].update(max=5.0), "workspace.x"),
        (lambda d: d["workspace"]["z"].update(min=0.5), "workspace.z"),
        (lambda d: d["rules"].update(workspace="off"), "rules.workspace"),
        (lambda d: d["joint_limits"].pop("elbow"), "joint_limits"),
        (lambda d: d.update(home_joints=[0, 0, 3.0, 0, 0, 0]), "elbow"),
        (lambda d: d.update(sleep_joints=[0, 0]), "sleep_joints"),
        (lambda d: d.update(table_z=0.5), "table_z"),
        (lambda d: d.update(min_clearence_m=0.01), "min_clearence_m"),
        (lambda d: d["workspace"]["y"].update(min=float("nan")), "workspace.y.min"),
        (lambda d: d.update(model="wx250"), "model"),
    ],
)
def test_bad_robot_config_names_file_and_field(tmp_path: Path, change, expected: str) -> None:
    data = _robot_dict()
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_robot_config(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message


def test_safety_rules_cannot_be_switched_off(tmp_path: Path) -> None:
    for rule in (
        "workspace",
        "table_floor",
        "action_translation",
        "chunk_translation",
        "chunk_length",
        "gripper",
        "rate",
    ):
        data = _robot_dict()
        data["rules"][rule] = "off"
        with pytest.raises(ConfigError, match=f"rules.{rule}"):
            load_robot_config(_write(tmp_path, data))


def test_hard_ceilings_apply_to_every_limit() -> None:
    hard = HARD_LIMITS["wx250s"]
    data = _robot_dict()
    data["limits"]["max_translation_per_chunk_m"] = hard.max_translation_per_chunk_m + 0.01
    with pytest.raises(ValueError, match="max_translation_per_chunk_m"):
        RobotConfig.model_validate(data)


def test_robot_config_is_frozen() -> None:
    robot = load_robot_config()
    with pytest.raises(Exception):
        robot.limits.max_translation_per_action_m = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed", "not valid YAML at line 1"),
        ("- just\n- a list\n", "expected a mapping"),
        ("\xff\xfe", None),
    ],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str | None) -> None:
    path = tmp_path / "robot.yaml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_robot_config(path)
    assert str(path) in str(info.value)
    if expected:
        assert expected in str(info.value)


def test_missing_file_and_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_robot_config("/nonexistent/robot.yaml")
    with pytest.raises(ConfigError, match="did you mean 'widowx250s'"):
        load_robot_config("widowx250")
    assert issubclass(ConfigError, UserError)


def test_policy_config_validation(tmp_path: Path) -> None:
    path = _write(tmp_path, {"sampling": {"motion": {"temperature": 3.0, "max_tokens": 10}}}, "policy.yaml")
    with pytest.raises(ConfigError, match="sampling.motion.temperature"):
        load_config(path, PolicyConfig)
    path = _write(tmp_path, {"n_batch": 64, "n_ubatch": 512}, "policy.yaml")
    with pytest.raises(ConfigError, match="n_ubatch"):
        load_config(path, PolicyConfig)
    path = _write(tmp_path, {"action_language": {"max_abs_value_m": 1.5}}, "policy.yaml")
    with pytest.raises(ConfigError, match="action_language.max_abs_value_m"):
        load_config(path, PolicyConfig)


def test_runtime_config_expands_home(tmp_path: Path) -> None:
    path = _write(tmp_path, {"episodes_dir": "~/episodes"}, "runtime.yaml")
    config = load_runtime_config(path)
    assert "~" not in str(config.episodes_dir)
