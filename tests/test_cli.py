"""The CLI: help on everything, exit codes 0/1/2, one-line errors instead of tracebacks."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlm2vla_edge.runtime import __version__
from vlm2vla_edge.runtime.cli import main
from vlm2vla_edge.runtime.errors import UserError

CLI = [sys.executable, "-m", "vlm2vla_edge.runtime.cli"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=stdin, timeout=60)


def test_help_lists_implemented_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in (
        "check", "config", "episode", "sim", "do", "serve", "status", "stop", "reset", "install-service", "data",
        "train", "convert", "demo", "eval",
    ):
        assert f" {command} " in result.stdout


@pytest.mark.slow  # a process each; test_help_of_every_command_reads_well runs every --help in-process
@pytest.mark.parametrize("command", [
    ["config"], ["config", "check"], ["config", "show"], ["check"], ["episode", "show"], ["episode", "report"], ["sim"],
    ["demo"], ["eval"],
])
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def _command_tree() -> list[tuple[list[str], object]]:
    """Every command and group under `vlm2vla-edge`, as its argument path and its click object."""
    from vlm2vla_edge.runtime.cli import _mount_optional_subapps, app
    from vlm2vla_edge.runtime.cli_support import click_command

    _mount_optional_subapps()
    found: list[tuple[list[str], object]] = []

    def walk(path: list[str], command: object) -> None:
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk([*path, name], sub)

    walk([], click_command(app))
    return found


_TYPE_PLACEHOLDER = re.compile(r"<(?:str|bool|int|float|path|file|directory|datetime|list\[\w+\])(?: range)?>")


def test_help_of_every_command_reads_well(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` of every command: no `<str>`/`<bool>` type placeholders, and on a wide terminal each paragraph of
    the command's docstring is one line (typer's rich help kept the source's line breaks mid-sentence)."""
    monkeypatch.setenv("COLUMNS", "2000")
    tree = _command_tree()
    assert len(tree) > 20  # every command, also those of the mounted sub-apps
    checked_paragraphs = 0
    for path, command in tree:
        assert main([*path, "--help"]) == 0, path
        out = capsys.readouterr().out
        assert not _TYPE_PLACEHOLDER.search(out), f"{path}: {_TYPE_PLACEHOLDER.search(out)}"
        lines = [line.strip() for line in out.splitlines()]
        doc = inspect.getdoc(getattr(command, "callback", None)) or ""
        for paragraph in doc.partition("\f")[0].split("\n\n"):
            rows = paragraph.splitlines()
            if len(rows) < 2 or any(re.match(r"\s*(?:[-*]\s|\d+[.)]\s)|\s{2,}", row) for row in rows):
                continue  # one line already, or a list / an indented block that keeps its lines
            joined = " ".join(row.strip() for row in rows)
            assert any(joined in line for line in lines), f"{path}: paragraph broken into lines:\n{paragraph}"
            checked_paragraphs += 1
    assert checked_paragraphs > 5  # the check is not vacuous: several commands have multi-line paragraphs


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_config_check_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "widowx250s"]) == 0
    bad = tmp_path / "robot.yaml"
    bad.write_text("name: x\nmodel: wx250s\nworkspace: {x: {min: 1, max: 0}}\n")
    assert main(["config", "check", str(bad), "--kind", "robot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _user_mistakes(tmp_path: Path) -> list[list[str]]:
    return [
        ["config", "check", "/no/such/file.yaml"],
        ["config", "show", "widowx2"],
        ["check", "[[0, 0, 0, 1]]", "--start", "a,b"],
        ["check", "[[0, 0, 0, 1]]", "--robot", str(tmp_path / "missing.yaml")],
        ["episode", "show", str(tmp_path / "nothing-here")],
        ["--log-level", "LOUD", "config", "show"],
        ["no-such-command"],
    ]


@pytest.mark.slow  # a process each; the in-process twin below is in the quick set
def test_user_mistakes_never_print_tracebacks(tmp_path: Path) -> None:
    for args in _user_mistakes(tmp_path):
        result = run(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, args


def test_user_mistakes_never_print_tracebacks_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in _user_mistakes(tmp_path):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.strip() and "Traceback" not in err, args


def test_check_accepts_and_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "[[0.01, 0, -0.02, 1], [0, 0.01, 0, 0]]", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["commands"]
    assert main(["check", "[[NaN, 0, 0, 1]]", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["rejected_by"] == "parser" and result["code"] == "nan"


def test_check_reads_stdin() -> None:
    result = run("check", "-", "--stage", "subtasks", stdin='["Move to the carrot", "Grasp the carrot"]')
    assert result.returncode == 0, result.stderr
    assert "Grasp the carrot" in result.stdout


def test_do_without_local_says_no_daemon_and_mentions_local(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["do", "levanta la zanahoria"]) == 2
    err = capsys.readouterr().err
    assert "no vlm2vla-edge daemon" in err and "--local" in err


def test_do_needs_a_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # On a real robot there is no default model: a clear usage error.
    assert main(["do", "--local", "pick up the carrot"]) == 2
    err = capsys.readouterr().err
    assert "--bundle" in err and "with --sim and no bundle the demo model runs" in err
    assert main(["do", "--local", "--sim", "--bundle", str(tmp_path / "nope"), "pick up the carrot"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_do_local_sim_without_a_bundle_runs_the_demo_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A newcomer's `do --local --sim "..."` gets the demo bundle (found or built as `demo` does)."""
    from vlm2vla_edge.convert import demo_bundle as demo
    from vlm2vla_edge.runtime import local_run

    asked: dict[str, object] = {}

    def fake_bundle(*args: object, **kwargs: object) -> demo.DemoBundle:
        return demo.DemoBundle(tmp_path / "demo-bundle", built=False)

    def fake_run(options: local_run.LocalRunOptions, echo: object) -> object:
        asked["bundle"] = options.bundle
        raise UserError("stop here: the bundle was chosen")

    monkeypatch.setattr(demo, "find_or_build_bundle", fake_bundle)
    monkeypatch.setattr(local_run, "run_local", fake_run)
    assert main(["do", "--local", "--sim", "--episodes-dir", str(tmp_path), "pick up the carrot"]) == 2
    assert asked["bundle"] == tmp_path / "demo-bundle"
    assert "running the demo model" in capsys.readouterr().out


@pytest.mark.slow
def test_do_local_sim_runs_and_records_an_episode(
    gemma270m_bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole loop with the real Gemma-3-270M (a base model: its plans are nonsense, but every
    output is in-grammar, every command passes the limiter, and the episode is recorded)."""
    from vlm2vla_edge.runtime.episode import EpisodeReader, list_episodes

    code = main([
        "do", "--local", "--sim", "--bundle", str(gemma270m_bundle.root), "--episodes-dir", str(tmp_path),
        "--max-retries", "0", "--verifier", "heuristic", "levanta la zanahoria",
    ])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "instruction: levanta la zanahoria" in out and "outcome:" in out and "episode recorded in" in out
    (episode,) = list_episodes(tmp_path)
    reader = EpisodeReader(episode)
    assert reader.outcome in ("success", "failed") and not reader.truncated
    stages = [s.stage for s in reader.steps()]
    assert stages[0] == "subtasks" and ("verify" in stages or "action" in stages)
    assert reader.meta.bundle_id.startswith("gemma-3-270m")


def test_episode_report_writes_html_and_refuses_a_non_episode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.sim.expert import run_expert_episode
    from vlm2vla_edge.runtime.sim.tasks import sample_episode

    run_expert_episode(sample_episode(2), load_robot_config("widowx250s"), record_to=tmp_path, episode_id="e1")
    assert main(["episode", "report", str(tmp_path / "e1"), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert main(["episode", "report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
