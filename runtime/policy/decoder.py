"""The module that drives llama.cpp: model, context, KV cache, batches, samplers, mtmd, grammar.

Why it exists: llama-cpp-python's high-level API puts the grammar sampler inside the sampler chain,
so every token checks Gemma's whole 262,144-token vocabulary against the grammar (2.4-3.8x slower
than free decoding), and its vision handlers clear the KV cache on every call. Here we drive
llama.cpp's native sampler chain through the low-level API and constrain it with llguidance:

- *mask* mode: the native chain samples from the allowed tokens only. Usually a handful of
  tokens are allowed, so the chain runs on a tiny candidate array instead of 262,144 logits,
  and a constrained step costs *less* than a free one (bench/grammar_overhead.py).
  *check* mode: sample from the whole vocabulary first, ask the matcher (`validate_tokens`), and
  restrict and resample only on rejection.
- *fast-forward*: tokens the grammar forces (`compute_ff_tokens`) are appended without sampling
  and evaluated in ONE batch together with the sampled token, which costs little more than one.
- *sparse logits*: where the grammar allows few tokens next, a batch ends at the final hidden state
  and only those tokens' logits are computed (output_head.py): the output layer over Gemma's 262k
  tokens is most of a small model's work on a CPU.
- a shared prefix (text, or text + image through mtmd) is evaluated once; each stage drops what
  follows the prefix from the KV cache and appends its own suffix (`swa_full` makes that possible
  for Gemma 3's sliding-window layers).

Every NULL pointer and error code from llama.cpp becomes an exception here or in llama_handles.py,
which owns llama.cpp's C objects (one class each, freed once); speculation.py proposes the drafts that
speculative decoding verifies here. Nothing outside runtime/policy/ touches ctypes. A decoder is not
thread-safe: one generation at a time (the cancel event is the only thing another thread may touch).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # llguidance is imported when the decoder is built (the `llm` extra)
    from llguidance import LLTokenizer

from vlm2vla_edge.grammars import validate_gbnf
from vlm2vla_edge.runtime.config import PolicyConfig, Sampling
from vlm2vla_edge.runtime.errors import GrammarError, UserError
from vlm2vla_edge.runtime.policy.interface import GenerationCancelled
from vlm2vla_edge.runtime.policy.llama_handles import (
    DecoderError,
    LlamaBatch,
    LlamaContext,
    LlamaModel,
    LoraAdapter,
    ModelLoadError,
    MtmdBitmap,
    MtmdContext,
    MtmdInputChunks,
    SamplerChain,
    check_gguf,
    ensure_backend,
)
from vlm2vla_edge.runtime.policy.output_head import HIDDEN_NODE, HiddenStateTap, OutputMatrix, adapter_changes_output
from vlm2vla_edge.runtime.policy.speculation import SEP, SPARSE_MAX_WORDS, Draft, Drafter, Speculation, StageKey

log = logging.getLogger(__name__)

StopReason = Literal["grammar_end", "eos", "max_tokens", "cancelled"]

_ARANGE32 = np.arange(32, dtype=np.int64)
_CANDIDATE_DTYPE = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
# Up to this many allowed tokens a row's logits are computed here from the hidden state (output_head.py);
# above it llama.cpp's whole output layer is cheaper than gathering that many rows in numpy.
_HEAD_MAX_TOKENS = 1024


class _Aborted(Exception):
    """Internal: llama_decode returned 2 because the abort callback saw the cancel event."""


# Errors: a grammar that does not compile raises `runtime.errors.GrammarError` when it is loaded
# (`compile_grammar`), never at generation time; llama.cpp failures raise `DecoderError` and files it
# refuses `ModelLoadError`, both defined in llama_handles.py with the handles that raise them first.
__all__ = ["Generation", "Grammar", "LlamaDecoder", "Prefix", "StopReason", "Timings"]


# --- public value types -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timings:
    """Where the time of one generation went. Prefill counts only what this call evaluated."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    image_encode_s: float = 0.0
    decode_s: float = 0.0
    sampled_tokens: int = 0
    forced_tokens: int = 0
    masked_resamples: int = 0
    decode_batches: int = 0
    reused_tokens: int = 0  # prompt tokens found in the cache after the prefix, not evaluated again
    drafted_tokens: int = 0  # speculative: draft tokens evaluated for verification
    accepted_tokens: int = 0  # speculative: draft tokens the model agreed with (kept in the output)
    evaluated_tokens: int = 0  # tokens evaluated by the decode batches (after the prompt), rejected drafts included

    @property
    def generated_tokens(self) -> int:
        return self.sampled_tokens + self.forced_tokens + self.accepted_tokens

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that were accepted (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_batch(self) -> float:
        """Tokens evaluated per decode batch (one llama_decode call: a forward pass over the model)."""
        return self.evaluated_tokens / self.decode_batches if self.decode_batches else 0.0

    @property
    def model_s(self) -> float:
        return self.prefill_s + self.image_encode_s + self.decode_s


@dataclass(frozen=True, slots=True)
class Generation:
    """One stage's output. `text` is exactly the grammar's language when a grammar was given."""

    text: str
    tokens: tuple[int, ...]
    stop_reason: StopReason
    timings: Timings


@dataclass(frozen=True, slots=True)
class Grammar:
    """A grammar compiled and validated against this decoder's tokenizer."""

    name: str
    source: str  # the GBNF text as given
    compiled: str  # llguidance's grammar definition


@dataclass(frozen=True, slots=True)
class Prefix:
    """A handle on a prefix evaluated into the KV cache; valid until the next `eval_prefix`."""

    n_pos: int  # KV length after the prefix (text tokens + image positions)
    text_tokens: int
    image_tokens: int
    timings: Timings
    epoch: int = field(repr=False)


# --- the decoder ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LoopResult:
    """What a decode loop hands back to `generate`: the output tokens, why it stopped, and its counts."""

    tokens: list[int]
    stop: StopReason
    sampled: int
    forced: int
    resamples: int
    batches: int
    evaluated: int


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: systemd's CPUAffinity=, a cgroup cpuset, taskset),
    not the machine's count. llama.cpp's threads spin at every graph barrier, so a thread more than there are
    CPUs to run it does no work and slows the others (two 2-thread decoders on 2 cores: several times slower)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class LlamaDecoder:
    """A loaded GGUF model (plus optional vision projector) with one context and one sequence.

    It owns its llama.cpp objects (llama_handles.py) through one `ExitStack`: `close()` frees them in
    reverse order of creation (projector, batch, context, LoRA adapters, model), each exactly once, and
    a constructor that fails half-way frees what it had created before raising.
    """

    # Greedy decoding checks the unmasked argmax before computing a grammar mask (`_sample_allowed`);
    # the tests turn this off to compare against the masked path.
    _greedy_fast_path: bool = True

    def __init__(
        self, model_path: str | Path, config: PolicyConfig | None = None, mmproj_path: str | Path | None = None
    ) -> None:
        self._handles = contextlib.ExitStack()  # first: close() (and __del__) work whatever fails below
        # Raw pointers for the hot paths (one attribute read per llama.cpp call); close() clears them
        # before the handles free what they point to.
        self._model: Any = None
        self._ctx: Any = None
        self._mtmd: Any = None
        self._batch: Any = None
        self._adapters: dict[str, LoraAdapter] = {}
        self._adapter_changes_output: dict[str, bool] = {}
        # The output layer for few allowed tokens (output_head.py): `_tap` ends a batch's graph at the hidden
        # state, `_head` computes the allowed tokens' logits from it. Both None when sparse logits are off.
        self._tap: HiddenStateTap | None = None
        self._head: OutputMatrix | None = None
        self._logits_ok = True  # False after a batch that skipped the output layer: llama.cpp's logits are stale
        self._out_index: dict[int, int] = {}  # batch position -> row of the tap's hidden state (last batch)
        self._dense_starts: set[str] = set()  # grammars whose first token may be any of many: no head skipping there
        import llama_cpp  # the `llm` extra: imported here so the module imports without it
        from llguidance.llamacpp import lltokenizer_from_vocab
        from llguidance.numpy import fill_next_token_bitmask

        self._fill_bitmask = fill_next_token_bitmask

        self._ll = llama_cpp
        self.config = config or PolicyConfig()
        self.model_path = Path(model_path).expanduser()
        self._active_adapter: str | None = None
        self._adapter_scale = 1.0
        self._epoch = 0
        self._prefix: Prefix | None = None
        self._n_pos = 0  # KV length of sequence 0
        self._tail: list[int] = []  # tokens in the cache after the current prefix, in order
        self._prefix_tokens: list[int] = []  # the current prefix's text tokens (-1 where an image was): draft lookup
        check_gguf(self.model_path, "model")
        if mmproj_path is not None:
            mmproj_path = Path(mmproj_path).expanduser()
            check_gguf(mmproj_path, "vision projector")
        self._llama_log = ensure_backend()
        cfg = self.config
        usable = usable_cpus()
        n_threads = min(cfg.n_threads or usable, usable)
        if cfg.n_threads is not None and cfg.n_threads > usable:
            log.info("event=threads_capped asked=%d usable_cpus=%d", cfg.n_threads, usable)

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = cfg.n_gpu_layers if cfg.n_gpu_layers >= 0 else 2**31 - 1
        try:
            model = self._handles.enter_context(LlamaModel(self.model_path, mparams, self._llama_log))
            self._model = model.ptr
            self._model_handle = model
            # Adapters are freed after the context that applied them and before their model: their
            # callback goes on the stack between the two.
            self._handles.callback(self._free_adapters)
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = cfg.n_ctx
            cparams.n_batch = cfg.n_batch
            cparams.n_ubatch = cfg.n_ubatch
            cparams.n_seq_max = 1
            cparams.n_threads = n_threads
            cparams.n_threads_batch = n_threads
            cparams.swa_full = True  # prefix reuse needs the full cache on sliding-window layers
            cparams.no_perf = True
            if cfg.sparse_logits and cfg.n_gpu_layers == 0:  # on a GPU the output layer is cheap, a split graph not
                self._tap = HiddenStateTap(int(llama_cpp.llama_model_n_embd(self._model)))
                cparams.cb_eval = self._tap.callback
            self._ctx = self._handles.enter_context(
                LlamaContext(model, cparams, self.model_path, self._llama_log)
            ).ptr
            mem = llama_cpp.llama_get_memory(self._ctx)
            if not mem:
                raise DecoderError("llama.cpp context has no KV memory")
            self._mem = mem
            vocab = llama_cpp.llama_model_get_vocab(self._model)
            if not vocab:
                raise ModelLoadError(f"{self.model_path} has no vocabulary")
            self._vocab = vocab
            self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
            self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
            self.n_batch = int(llama_cpp.llama_n_batch(self._ctx))
            self.n_ubatch = int(llama_cpp.llama_n_ubatch(self._ctx))
            eog = [int(llama_cpp.llama_vocab_eos(vocab)), int(llama_cpp.llama_vocab_eot(vocab))]
            self.eog_tokens: tuple[int, ...] = tuple(dict.fromkeys(t for t in eog if t >= 0))
            self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
            self._batch = self._handles.enter_context(LlamaBatch(self.n_batch)).ptr
            # Prompt evaluation runs in batches of up to n_batch tokens (hundreds of ms on a CPU); the abort
            # callback lets a cancel stop one mid-call. It is installed only while prefilling: llama.cpp calls
            # it after every graph node, which would cost ~1 ms per generated token if left on.
            self._abort_event: threading.Event | None = None
            self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)
            self._no_abort_cb = llama_cpp.ggml_abort_callback()
            self._piece_buf = ctypes.create_string_buffer(256)
            self._bitmask = np.zeros((1, (self.n_vocab + 31) // 32), dtype=np.int32)
            self._neg_inf = np.float32(-np.inf)
            self._lltok_factory = lltokenizer_from_vocab
            self._lltok_cache: LLTokenizer | None = None  # built on the first grammar (1.2 s on Gemma's vocabulary)
            self._drafter = Drafter(self.token_bytes, self.eog_tokens, self._fill_bitmask, self._bitmask)
            self._warm_up()
            if mmproj_path is not None:
                self._init_mtmd(Path(mmproj_path), n_threads)
            self.mmproj_path = Path(mmproj_path) if mmproj_path is not None else None
        except BaseException:
            self.close()
            raise
        log.info(
            "event=model_loaded path=%s n_ctx=%d n_threads=%d vision=%s", self.model_path, self.n_ctx, n_threads,
            self._mtmd is not None,
        )

    @property
    def _lltok(self) -> LLTokenizer:
        """llguidance's view of the vocabulary, built once, when the first grammar needs it: a decoder that
        never constrains (teacher-forced validation) does not pay its 1.2 s."""
        if self._lltok_cache is None:
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # it calls a deprecated llama.cpp getter once per token
                warnings.simplefilter("ignore", DeprecationWarning)
                try:
                    self._lltok_cache = self._lltok_factory(self._vocab, eos_token=list(self.eog_tokens))
                except TypeError:  # llguidance < 1.7 takes a single EOS token
                    self._lltok_cache = self._lltok_factory(self._vocab, eos_token=self.eog_tokens[0])
            log.debug("event=tokenizer_built seconds=%.2f n_vocab=%d", time.perf_counter() - t0, self.n_vocab)
        return self._lltok_cache

    def _warm_up(self) -> None:
        """Run one token through the model so the first real step does not pay for page-ins and
        graph allocation (over a second on the 270M model), then forget it. With the sparse-logits tap
        installed, a short real prompt instead, whose last position also checks the output matrix
        (`_check_output_head`): one batch serves both."""
        self._n_pos = 0
        tap = self._tap
        if tap is None:
            bos = int(self._ll.llama_vocab_bos(self._vocab))
            tokens = [bos if bos >= 0 else 0]
        else:
            tokens = self.tokenize("Move the gripper 5 cm to the left, then close it.", add_bos=True)
            tap.capture = True
        try:
            self._decode(tokens)
            if tap is not None:
                self._check_output_head(tap)
        finally:
            if tap is not None:
                tap.capture = False
            self._clear()

    def _check_output_head(self, tap: HiddenStateTap) -> None:
        """Turn on sparse logits (output_head.py) if the output matrix read here gives llama.cpp's logits at the
        last position of the batch just evaluated (with `tap.capture`); otherwise keep llama.cpp's output layer
        for every batch and say why in the log."""
        try:
            head = OutputMatrix(self.model_path, tap.n_embd, self.n_vocab)
            if tap.hidden is None or len(tap.hidden) != 1:
                raise DecoderError(f"no hidden state node '{HIDDEN_NODE.decode()}' in this model's graph")
            agrees, diff = head.agrees_with(tap.hidden[-1], self._logits())
            if not agrees:
                raise DecoderError(f"its logits differ from llama.cpp's by up to {diff:.3f}")
        except DecoderError as exc:
            log.info("event=sparse_logits_off model=%s reason=%s", self.model_path.name, exc)
            return  # `_tap` stays: llama.cpp holds its callback (it only ever passes nodes through now)
        self._head = head
        log.debug("event=sparse_logits_on tensor=%s max_diff=%.4f", head.tensor_name, diff)

    @property
    def sparse_logits(self) -> bool:
        """Whether batches whose next tokens are few skip llama.cpp's output layer now (output_head.py): the
        model passed the check at load and the active adapter (if any) leaves the output layer alone."""
        return (
            self._head is not None and self.config.sparse_logits
            and not self._adapter_changes_output.get(self._active_adapter or "", False)
        )

    def _init_mtmd(self, mmproj_path: Path, n_threads: int) -> None:
        from llama_cpp import mtmd_cpp

        self._mtmd_api = mtmd_cpp
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = self.config.n_gpu_layers != 0
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        mctx = self._handles.enter_context(MtmdContext(mmproj_path, self._model_handle, params, self._llama_log)).ptr
        self._mtmd = mctx
        if not mtmd_cpp.mtmd_support_vision(mctx):
            raise ModelLoadError(f"{mmproj_path} is not a vision projector")
        marker = mtmd_cpp.mtmd_default_marker()
        self.media_marker: str = marker.decode() if marker else "<__media__>"

    # --- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Free every llama.cpp handle, each once, in reverse order of creation; safe to call twice."""
        self._model = self._ctx = self._mtmd = self._batch = None  # the hot paths' copies first
        self._active_adapter = None
        self._handles.close()

    def _free_adapters(self) -> None:
        adapters, self._adapters = self._adapters, {}
        for adapter in adapters.values():
            adapter.close()

    def __enter__(self) -> "LlamaDecoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten decoder must not leak hundreds of MB
        with contextlib.suppress(Exception):  # at interpreter exit llama_cpp may be half torn down
            self.close()

    def _require_open(self) -> None:
        if self._ctx is None:
            raise DecoderError("the decoder is closed")

    # --- model facts --------------------------------------------------------------------------------

    @property
    def has_vision(self) -> bool:
        return self._mtmd is not None

    @property
    def model_size_bytes(self) -> int:
        """Bytes of weights; every decoded token reads (almost) all of them."""
        self._require_open()
        return int(self._ll.llama_model_size(self._model))

    @property
    def n_params(self) -> int:
        self._require_open()
        return int(self._ll.llama_model_n_params(self._model))

    # --- LoRA adapters applied at run time -----------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a LoRA GGUF (general.type = adapter) for this model under `name`, without applying it.

        A few MB per adapter; the base stays loaded once. llama.cpp refuses an adapter whose tensors do
        not fit the model (another base, another architecture): that is a `ModelLoadError` with its reason.
        """
        self._require_open()
        if name in self._adapters:
            raise ValueError(f"an adapter named '{name}' is already loaded")
        path = Path(path).expanduser()
        check_gguf(path, "LoRA adapter")
        # freed by close() through `_free_adapters`, after the context that may have applied it
        self._adapters[name] = LoraAdapter(self._model_handle, path, self.model_path.name, self._llama_log)
        if self._head is not None:
            self._adapter_changes_output[name] = adapter_changes_output(path)
        log.info("event=adapter_loaded name=%s path=%s", name, path)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    @property
    def active_adapter(self) -> str | None:
        """The adapter applied now (None: the bare base model)."""
        return self._active_adapter

    def use_adapter(self, name: str | None, scale: float = 1.0) -> bool:
        """Apply adapter `name` (None: none) to every following evaluation; True when that changed anything.

        The base is not reloaded; only the adapter set of the context changes. Whatever the KV cache
        holds was computed with the previous adapter, so a change clears it and makes every `Prefix`
        handle stale: the next stage evaluates its prefix again.
        """
        self._require_open()
        if name is not None and name not in self._adapters:
            raise ValueError(f"no adapter named '{name}' is loaded (loaded: {', '.join(self._adapters) or 'none'})")
        if name == self._active_adapter and (name is None or scale == self._adapter_scale):
            return False
        ll = self._ll
        if name is None:
            rc = ll.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            handles = (ll.llama_adapter_lora_p_ctypes * 1)(self._adapters[name].ptr)
            scales = (ctypes.c_float * 1)(scale)
            rc = ll.llama_set_adapters_lora(self._ctx, handles, 1, scales)
        if rc != 0:
            self._invalidate()
            raise DecoderError(f"llama.cpp could not apply the LoRA adapter '{name}' (code {rc})")
        self._active_adapter = name
        self._adapter_scale = scale
        self._clear()
        log.debug("event=adapter_applied name=%s scale=%g", name, scale)
        return True

    # --- tokens <-> text ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Tokens of `text`; `add_bos` prepends BOS where the model wants one (start of a prompt)."""
        self._require_open()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        bos = add_bos and self.add_bos
        buf = (self._ll.llama_token * capacity)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, capacity, bos, parse_special)
        if n < 0:
            capacity = -n
            buf = (self._ll.llama_token * capacity)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, capacity, bos, parse_special)
        if n < 0:
            raise DecoderError(f"llama.cpp failed to tokenize {len(data)} bytes of text")
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token as text (special tokens render as their name)."""
        n = self._ll.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            if n < 0:
                raise DecoderError(f"llama.cpp could not render token {token}")
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._require_open()
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # --- grammars -----------------------------------------------------------------------------------

    def compile_grammar(self, gbnf: str, name: str = "grammar") -> Grammar:
        """Compile and validate a GBNF grammar now, so a broken one fails at load, not mid-episode."""
        import llguidance

        validate_gbnf(gbnf, name)  # names the broken rule
        compiled = llguidance.grammar_from("gbnf", gbnf)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled, self._lltok)
        if is_error:
            raise GrammarError(f"grammar '{name}' does not compile: {messages[0] if messages else 'unknown error'}")
        for message in messages:
            log.warning("event=grammar_warning grammar=%s message=%s", name, message)
        matcher = llguidance.LLMatcher(self._lltok, compiled, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"grammar '{name}' does not compile: {matcher.get_error()}")
        return Grammar(name=name, source=gbnf, compiled=compiled)

    # --- KV cache and batches -----------------------------------------------------------------------

    def _clear(self) -> None:
        # Metadata only (data=False): the cells become free and are overwritten before they are read;
        # zeroing the buffers too cost 1.5-2 ms per adapter switch for nothing.
        self._ll.llama_memory_clear(self._mem, False)
        self._n_pos = 0
        self._tail = []
        self._prefix = None
        self._epoch += 1

    def _truncate(self, n_pos: int) -> None:
        """Drop every cached position >= n_pos."""
        if n_pos == self._n_pos:
            return
        if not self._ll.llama_memory_seq_rm(self._mem, 0, n_pos, -1):
            self._invalidate()
            raise DecoderError(f"llama.cpp could not remove KV cache positions from {n_pos} on")
        if self._prefix is not None:
            del self._tail[max(0, n_pos - self._prefix.n_pos) :]
        self._n_pos = n_pos

    def _invalidate(self) -> None:
        """After a failure the cache content is uncertain: forget the prefix, start over next time."""
        self._clear()

    def _decode(
        self,
        tokens: Sequence[int],
        *,
        logits_last: bool = True,
        logits_all: bool = False,
        outputs: Sequence[int] = (),
        head: bool = True,
    ) -> None:
        """Evaluate tokens at the end of sequence 0 in one llama_decode call (len <= n_batch); logits for the
        last token, for all, and for the batch positions in `outputs` (the rows a speculative draft needs).

        `head=False` (only with `sparse_logits`, one micro-batch): the graph ends at the hidden state of those
        positions (`_hidden_row`); the caller computes the logits of the tokens it allows (`_head`)."""
        n = len(tokens)
        if n == 0:
            return
        if self._n_pos + n > self.n_ctx:
            raise DecoderError(f"context full: {self._n_pos} + {n} tokens exceed n_ctx={self.n_ctx}")
        if not head and (not self.sparse_logits or n > self.n_ubatch):
            raise DecoderError("internal: only a one-micro-batch batch with sparse logits may skip the output layer")
        batch = self._batch
        batch.n_tokens = n
        pos0 = self._n_pos
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if logits_all else 0
        for i in outputs:
            batch.logits[i] = 1
        if logits_last:
            batch.logits[n - 1] = 1
        tap = self._tap
        if tap is not None:
            tap.skip_output = not head
            tap.hidden = tap.error = None
        try:
            rc = self._ll.llama_decode(self._ctx, batch)
        finally:
            if tap is not None:
                tap.skip_output = False
        if rc == 2 and self._abort_event is not None and self._abort_event.is_set():
            self._invalidate()  # an aborted batch may be partly in the cache
            raise _Aborted()
        if rc != 0:
            self._invalidate()  # rc < 0 may leave part of the batch in the cache
            what = {1: "no KV cache slot (context full)", 2: "aborted", -1: "invalid batch"}.get(rc, "fatal error")
            raise DecoderError(f"llama_decode failed with code {rc}: {what}")
        self._n_pos = pos0 + n
        self._tail.extend(tokens)
        self._logits_ok = head
        if not head:
            rows = [i for i in range(n) if batch.logits[i]]
            if tap is None or tap.error is not None or tap.hidden is None or len(tap.hidden) != len(rows):
                self._invalidate()
                raise DecoderError(f"the hidden state was not captured: {tap.error if tap is not None else 'no tap'}")
            self._out_index = {pos: k for k, pos in enumerate(rows)}
            self._out_index[-1] = len(rows) - 1

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        """llama.cpp's abort callback (called after every graph node while prefilling). `wait(0)` reads
        the flag like `is_set()`; the decode loop's own `is_set()` checks stay one per step."""
        event = self._abort_event
        return event is not None and event.wait(0)

    def _prefill(self, tokens: Sequence[int], cancel: threading.Event | None, *, head: bool = True) -> bool:
        """Evaluate tokens in n_batch slices, logits for the last one (`head=False`: its hidden state, see
        `_decode`; the last slice must fit one micro-batch); False if cancelled, also mid-batch (the cache is
        then cleared: the prefix must be evaluated again)."""
        if cancel is not None:
            self._abort_event = cancel
            self._ll.llama_set_abort_callback(self._ctx, self._abort_cb, None)
        try:
            for start in range(0, len(tokens), self.n_batch):
                if cancel is not None and cancel.is_set():
                    return False
                piece = tokens[start : start + self.n_batch]
                last = start + len(piece) == len(tokens)
                self._decode(piece, logits_last=last, head=head or not last)
            return True
        except _Aborted:
            return False
        finally:
            if cancel is not None:
                self._ll.llama_set_abort_callback(self._ctx, self._no_abort_cb, None)
                self._abort_event = None

    def _logits(self, row: int = -1) -> np.ndarray:
        """A writable view of one output row of logits (n_vocab floats, owned by llama.cpp): the last one,
        or batch position `row` of the last batch (it must have been evaluated with its logits flag)."""
        if not self._logits_ok:
            raise DecoderError("internal: the last batch skipped the output layer, llama.cpp holds no logits for it")
        ptr = self._ll.llama_get_logits_ith(self._ctx, row)
        if not ptr:
            raise DecoderError(f"llama.cpp returned no logits for batch row {row}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _head_logits(self, row: int, ids: np.ndarray) -> np.ndarray:
        """Logits of tokens `ids` at batch position `row` of the last batch, which skipped the output layer."""
        tap, head = self._tap, self._head
        if self._logits_ok or tap is None or tap.hidden is None or head is None or row not in self._out_index:
            raise DecoderError(f"internal: no hidden state for batch row {row} (the last batch had its logits)")
        return head.logits(tap.hidden[self._out_index[row]], ids)

    def _allowed_ids(self, matcher: Any) -> np.ndarray | None:
        """The tokens the grammar allows next, ascending, or None when they are many (more than SPARSE_MAX_WORDS
        words of the bitmask: free text); a dead end raises."""
        self._fill_bitmask(matcher, self._bitmask)
        words = self._bitmask[0]
        nonzero = np.flatnonzero(words)
        if len(nonzero) == 0:
            raise DecoderError(f"the grammar allows no token here: {matcher.get_error() or 'dead end'}")
        if len(nonzero) > SPARSE_MAX_WORDS:
            return None
        bits = np.unpackbits(words[nonzero].view(np.uint8), bitorder="little").reshape(-1, 32).astype(bool)
        ids = (nonzero[:, None] * 32 + _ARANGE32)[bits]
        return ids[ids < self.n_vocab]

    def _mask_bits(self) -> np.ndarray:
        """The bitmask `_allowed_ids` last filled as one bool per token (for many allowed tokens)."""
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)

    def _head_ids(self, matcher: Any) -> np.ndarray | None:
        """The allowed tokens when they are few enough for `_head_logits` (the next batch may skip the output
        layer), else None."""
        ids = self._allowed_ids(matcher)
        return ids if ids is not None and len(ids) <= _HEAD_MAX_TOKENS else None

    def teacher_forced_logits(self, tokens: Sequence[int], prefix: Prefix) -> np.ndarray:
        """Logits after each of `tokens` appended to `prefix`, evaluated as ONE batch (len x n_vocab).

        Row i predicts tokens[i + 1]: what a model would write at each position of a known answer. One
        batch costs about one prefill, where token-by-token teacher forcing costs a decode step per token.
        """
        self._require_open()
        if prefix.epoch != self._epoch or self._prefix is None:
            raise DecoderError("the prefix handle is stale: another prefix was evaluated since")
        tokens = list(tokens)
        if not 0 < len(tokens) <= self.n_batch:
            raise ValueError(f"teacher forcing takes 1 to n_batch={self.n_batch} tokens, not {len(tokens)}")
        self._truncate(prefix.n_pos)
        self._decode(tokens, logits_all=True)
        rows = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for i in range(len(tokens)):
            ptr = self._ll.llama_get_logits_ith(self._ctx, i)
            if not ptr:
                raise DecoderError(f"llama.cpp returned no logits for position {i}")
            rows[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return rows

    def last_logits(self) -> np.ndarray:
        """A copy of the logits of the last evaluated token (for diagnostics and tests). After a batch that
        skipped the output layer (sparse logits), that token is evaluated again alone, with it."""
        self._require_open()
        if not self._logits_ok:
            if not self._tail:
                raise DecoderError("internal: no token after the prefix to evaluate again")
            last = self._tail[-1]
            self._truncate(self._n_pos - 1)
            self._decode([last])
        return self._logits().copy()

    # --- prefix (text or text + image) --------------------------------------------------------------

    def eval_prefix(
        self, text: str, image: np.ndarray | None = None, *, cancel: threading.Event | None = None
    ) -> Prefix:
        """Clear the cache and evaluate a shared prefix once; stages then append their suffixes.

        With an image, `text` must contain `media_marker` where the image goes; the image is
        encoded by the projector and its embeddings are decoded into the cache.
        """
        self._require_open()
        self._clear()
        if image is None:
            t0 = time.perf_counter()
            tokens = self.tokenize(text, add_bos=True)
            if not self._prefill(tokens, cancel):
                raise GenerationCancelled("cancelled while evaluating the prompt prefix")
            timings = Timings(prefill_tokens=len(tokens), prefill_s=time.perf_counter() - t0)
            prefix = Prefix(
                n_pos=self._n_pos, text_tokens=len(tokens), image_tokens=0, timings=timings, epoch=self._epoch
            )
            self._prefix_tokens = list(tokens)
        else:
            prefix = self._eval_image_prefix(text, image, cancel)
        self._prefix = prefix
        self._tail = []
        return prefix

    def _eval_image_prefix(self, text: str, image: np.ndarray, cancel: threading.Event | None) -> Prefix:
        if self._mtmd is None:
            raise UserError("this model has no vision projector (mmproj), so it cannot take an image")
        if self.media_marker not in text:
            raise ValueError(f"the prompt must contain the media marker {self.media_marker!r} where the image goes")
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an H x W x 3 uint8 RGB array, got {image.dtype} {image.shape}")
        api = self._mtmd_api
        height, width = image.shape[:2]
        data = image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        with MtmdBitmap(width, height, data) as bitmap_handle, MtmdInputChunks() as chunks_handle:
            bitmap, chunks = bitmap_handle.ptr, chunks_handle.ptr
            encoded = text.encode("utf-8")
            text_in = api.mtmd_input_text(encoded, len(encoded), self.add_bos, True)
            bitmaps = (api.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = api.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text_in), bitmaps, 1)
            if rc != 0:
                what = {
                    1: "the number of media markers does not match the number of images",
                    2: "image preprocessing failed",
                }
                raise DecoderError(f"mtmd_tokenize failed with code {rc}: {what.get(rc, 'unknown error')}")
            text_tokens = image_tokens = 0
            prefill_s = encode_s = 0.0
            lookup_tokens: list[int] = []  # text tokens, -1 for the image: what drafts may copy from
            new_pos = self._ll.llama_pos(0)
            for i in range(api.mtmd_input_chunks_size(chunks)):
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled("cancelled while evaluating the image prefix")
                chunk = api.mtmd_input_chunks_get(chunks, i)
                kind = api.mtmd_input_chunk_get_type(chunk)
                if kind == api.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n_out = ctypes.c_size_t(0)
                    ptr = api.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_out))
                    tokens = [int(ptr[j]) for j in range(n_out.value)]
                    t0 = time.perf_counter()
                    if not self._prefill(tokens, cancel):
                        raise GenerationCancelled("cancelled while evaluating the image prefix")
                    prefill_s += time.perf_counter() - t0
                    text_tokens += len(tokens)
                    lookup_tokens.extend(tokens)
                elif kind == api.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n_img = int(api.mtmd_input_chunk_get_n_tokens(chunk))
                    if n_img > int(self._ll.llama_n_ubatch(self._ctx)):
                        raise UserError(
                            f"the image needs {n_img} tokens in one micro-batch but n_ubatch is "
                            f"{self._ll.llama_n_ubatch(self._ctx)}: raise n_ubatch (and n_batch) in the policy config"
                        )
                    t0 = time.perf_counter()
                    rc = api.mtmd_encode_chunk(self._mtmd, chunk)
                    if rc != 0:
                        raise DecoderError(f"mtmd_encode_chunk failed with code {rc}")
                    embd = api.mtmd_get_output_embd(self._mtmd)
                    if not embd:
                        raise DecoderError("mtmd returned no image embeddings")
                    t1 = time.perf_counter()
                    rc = api.mtmd_helper_decode_image_chunk(
                        self._mtmd, self._ctx, chunk, embd, self._n_pos, 0, self.n_batch, ctypes.byref(new_pos),
                        api.mtmd_helper_post_decode_callback(), None,  # NULL: no callback
                    )
                    t2 = time.perf_counter()
                    if rc != 0:
                        raise DecoderError(f"mtmd_helper_decode_image_chunk failed with code {rc}")
                    self._n_pos = int(new_pos.value)
                    encode_s += t1 - t0
                    prefill_s += t2 - t1
                    image_tokens += n_img
                    lookup_tokens.append(SEP)
                else:
                    raise DecoderError(f"unsupported mtmd chunk type {kind} (audio?)")
        timings = Timings(prefill_tokens=text_tokens + image_tokens, prefill_s=prefill_s, image_encode_s=encode_s)
        self._prefix_tokens = lookup_tokens
        return Prefix(
            n_pos=self._n_pos, text_tokens=text_tokens, image_tokens=image_tokens, timings=timings, epoch=self._epoch
        )

    # --- sampling -----------------------------------------------------------------------------------

    def _make_chain(self, sampling: Sampling, *, draw: bool = True) -> SamplerChain:
        """llama.cpp's native chain (the caller closes it). Temperature before top-k/top-p, as in Hugging
        Face's generate (the paper's settings), then a seeded draw; temperature 0 is greedy. Without `draw`
        the chain only shapes the distribution (speculative verification reads the probabilities it leaves)."""
        ll = self._ll
        with contextlib.ExitStack() as on_error:  # a sampler that cannot be made frees the chain
            chain = on_error.enter_context(SamplerChain())
            if sampling.temperature == 0.0:
                chain.add(ll.llama_sampler_init_greedy())
            else:
                chain.add(ll.llama_sampler_init_temp(sampling.temperature))
                if sampling.top_k > 0:
                    chain.add(ll.llama_sampler_init_top_k(sampling.top_k))
                if sampling.top_p < 1.0:
                    chain.add(ll.llama_sampler_init_top_p(sampling.top_p, 1))
                if draw:
                    seed = sampling.seed if sampling.seed is not None else secrets.randbits(32) % 0xFFFFFFFF
                    chain.add(ll.llama_sampler_init_dist(seed))
            on_error.pop_all()
        return chain

    def _sample_allowed(
        self, chain: Any, matcher: Any, row: int = -1, *, greedy: bool = False, ids: np.ndarray | None = None
    ) -> int:
        """Sample from the chain restricted to the tokens the grammar allows.

        `ids`: the allowed tokens, computed before a batch that skipped the output layer (`_head_ids`); their
        logits come from the hidden state, and the choice is made among them as below.

        Greedy first asks the grammar about the unmasked argmax alone: when it is allowed, it is the
        argmax over the allowed tokens too (a mask only removes tokens; ties go to the lowest id either
        way), so the ~3 ms llguidance takes to compute a mask over Gemma's 262k tokens in free text is
        spent only when the model's favourite is forbidden. The chain is not consulted then: a greedy
        chain neither changes nor remembers anything.

        The usual case is a handful of allowed tokens (a digit, a separator): then the chain runs on
        a candidate array of just those, which is far cheaper than the ~2 ms its top-p and softmax
        take over Gemma's 262,144 logits, so a constrained step costs less than a free one. When
        many tokens are allowed (free text), the forbidden logits are set to -inf in llama.cpp's
        buffer and the chain runs as usual. Both draw from the same distribution: temperature,
        then top-p over the allowed tokens, then the seeded draw.
        """
        ll = self._ll
        if ids is not None:
            logits = self._head_logits(row, ids)
            if greedy:  # the greedy chain's choice: the first (lowest) id of the highest logit
                return int(ids[int(np.argmax(logits))])
        else:
            if greedy and self._greedy_fast_path:
                favourite = int(np.argmax(self._logits(row)))
                if matcher.validate_tokens([favourite]) == 1:
                    return favourite
            ids = self._allowed_ids(matcher)
            if ids is None:
                self._logits(row)[~self._mask_bits()] = self._neg_inf
                return int(ll.llama_sampler_sample(chain, self._ctx, row))
            logits = self._logits(row)[ids]
        candidates = np.zeros(len(ids), dtype=_CANDIDATE_DTYPE)
        candidates["id"] = ids
        candidates["logit"] = logits
        array = ll.llama_token_data_array(
            candidates.ctypes.data_as(ll.llama_token_data_p), len(ids), -1, False
        )
        ll.llama_sampler_apply(chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise DecoderError("the sampler chain selected no token")
        token = int(array.data[array.selected].id)  # the chain may have re-pointed `data`
        ll.llama_sampler_accept(chain, token)
        return token

    # --- generation ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        grammar: Grammar | None,
        sampling: Sampling,
        *,
        prefix: Prefix | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Generate after `prompt` (text, or tokens), which follows `prefix` if given.

        Without a prefix the cache is cleared and `prompt` is the whole prompt (BOS added to text).
        With a grammar the output stays exactly inside it and generation ends at the grammar's end.
        """
        import llguidance

        self._require_open()
        if prefix is not None:
            if prefix.epoch != self._epoch or self._prefix is None:
                raise DecoderError("the prefix handle is stale: another prefix was evaluated since")
            suffix = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            if not suffix:
                raise ValueError("the prompt (suffix) must not be empty")
            # Keep what the cache already holds after the prefix if the suffix starts with it (the
            # action stage's suffix repeats the motion stage's prompt and answer); at least the last
            # token is evaluated again, for its logits.
            reused = 0
            for cached, wanted in zip(self._tail, suffix[:-1]):
                if cached != wanted:
                    break
                reused += 1
            self._truncate(prefix.n_pos + reused)
            tokens_in = suffix[reused:]
        else:
            self._clear()
            reused = 0
            tokens_in = self.tokenize(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
            if not tokens_in:
                raise ValueError("the prompt must not be empty")

        matcher = None
        if grammar is not None:
            matcher = llguidance.LLMatcher(self._lltok, grammar.compiled, log_level=0)
            if matcher.is_error():
                raise GrammarError(f"grammar '{grammar.name}' failed to start: {matcher.get_error()}")
        # Tokens the grammar forces before any choice (a waypoint plan's subtask, a chunk's "[[") go in with the
        # prompt: fast-forward as after a chosen token, one batch fewer.
        lead: list[int] = []
        n_prompt = len(tokens_in)
        if matcher is not None and self.config.fast_forward:
            lead = list(matcher.compute_ff_tokens()[: sampling.max_tokens - 1])
            if lead and not matcher.consume_tokens(lead):
                raise DecoderError(f"grammar matcher rejected its own forced tokens: {matcher.get_error()}")
            tokens_in = list(tokens_in) + lead
            sampling = sampling.model_copy(update={"max_tokens": sampling.max_tokens - len(lead)})

        # Sparse logits (output_head.py) from the first token on when the grammar starts with few choices; a
        # grammar that started with many last time (free text) is not asked again (its mask costs ~4 ms).
        first_ids = None
        sparse = (
            matcher is not None and self.config.constraint == "mask" and self.sparse_logits
            and grammar is not None and grammar.compiled not in self._dense_starts
        )
        if sparse and ((len(tokens_in) - 1) % self.n_batch) + 1 <= self.n_ubatch:
            first_ids = self._head_ids(matcher)
            if first_ids is None:
                self._dense_starts.add(grammar.compiled)  # type: ignore[union-attr]  # `sparse` says it is set
                sparse = False
        t0 = time.perf_counter()
        if not self._prefill(tokens_in, cancel, head=first_ids is None):
            prefill_s = time.perf_counter() - t0
            return Generation(
                "", (), "cancelled", Timings(prefill_tokens=n_prompt, prefill_s=prefill_s, reused_tokens=reused)
            )
        t1 = time.perf_counter()

        spec = None
        with self._make_chain(sampling) as chain:
            if matcher is not None and matcher.is_stopped():  # the grammar was one forced text
                result = _LoopResult([], "grammar_end", 0, 0, 0, 0, 0)
            elif self.config.speculative and (matcher is None or self.config.constraint != "check"):
                context = (self._prefix_tokens + suffix + lead) if prefix is not None else list(tokens_in)
                stage: StageKey = (grammar.compiled if grammar is not None else None, self._active_adapter)
                spec = self._drafter.start(stage, context)
                result = self._speculative_loop(chain.ptr, matcher, sampling, spec, cancel, first_ids, sparse)
                if result.stop != "cancelled":
                    self._drafter.remember(stage, lead + result.tokens)
            else:
                result = self._decode_loop(
                    chain.ptr, matcher, sampling.max_tokens, cancel, greedy=sampling.temperature == 0.0,
                    first_ids=first_ids, sparse=sparse,
                )
        t2 = time.perf_counter()
        out, stop = lead + result.tokens, result.stop
        timings = Timings(
            prefill_tokens=n_prompt,  # the forced lead is evaluated with the prompt but counted as output
            reused_tokens=reused,
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            sampled_tokens=result.sampled,
            forced_tokens=len(lead) + result.forced,
            masked_resamples=result.resamples,
            decode_batches=result.batches,
            evaluated_tokens=result.evaluated,
            drafted_tokens=spec.drafted if spec is not None else 0,
            accepted_tokens=spec.accepted if spec is not None else 0,
        )
        text = self.detokenize(out)
        log.debug(
            "event=generation stop=%s tokens=%d forced=%d resamples=%d drafted=%d accepted=%d batches=%d decode_s=%.4f",
            stop, len(out), timings.forced_tokens, result.resamples, timings.drafted_tokens, timings.accepted_tokens,
            result.batches, t2 - t1,
        )
        return Generation(text=text, tokens=tuple(out), stop_reason=stop, timings=timings)

    @staticmethod
    def _consume(matcher: Any, token: int, ff_room: int) -> list[int]:
        """Advance the grammar by a sampled `token` and return the forced tokens that follow it (at most
        `ff_room`; 0 turns fast-forward off), consumed too. No grammar: nothing is forced."""
        if matcher is None:
            return []
        if not matcher.consume_token(token):
            raise DecoderError(f"grammar matcher rejected a checked token: {matcher.get_error()}")
        if ff_room <= 0:
            return []
        ff = list(matcher.compute_ff_tokens()[:ff_room])
        if ff and not matcher.consume_tokens(ff):
            raise DecoderError(f"grammar matcher rejected its own forced tokens: {matcher.get_error()}")
        return ff

    def _decode_loop(
        self,
        chain: Any,
        matcher: Any,
        max_tokens: int,
        cancel: threading.Event | None,
        *,
        greedy: bool = False,
        first_ids: np.ndarray | None = None,
        sparse: bool = False,
    ) -> _LoopResult:
        """Plain decoding: sample (within the grammar), append the forced tokens that follow, evaluate
        them as one batch; the cancel event is checked once per step.

        With `sparse` (mask mode), the grammar's next allowed tokens are computed before each batch; when
        they are few the batch skips the output layer and the choice is made from their logits alone
        (`first_ids`: those of the first choice, after the prompt). The first time they are many, the loop
        goes back to llama.cpp's logits for the rest of the output (free text: its mask costs ~4 ms)."""
        ll = self._ll
        ctx = self._ctx
        eog = set(self.eog_tokens)
        check = self.config.constraint == "check"
        fast_forward = self.config.fast_forward
        out: list[int] = []
        sampled = forced = resamples = batches = evaluated = 0
        stop: StopReason = "max_tokens"
        ids = first_ids  # the allowed tokens of the next choice when the last batch skipped the output layer
        while True:
            if cancel is not None and cancel.is_set():
                stop = "cancelled"
                break
            if matcher is not None and not check:
                token = self._sample_allowed(chain, matcher, greedy=greedy, ids=ids)
            else:
                token = ll.llama_sampler_sample(chain, ctx, -1)
                if matcher is not None and matcher.validate_tokens([token]) != 1:
                    token = self._sample_allowed(chain, matcher)
                    resamples += 1
            if token in eog:  # the end is chosen, not generated: the counts add up to the output's length
                stop = "eos"
                break
            sampled += 1
            new = [token] + self._consume(matcher, token, max_tokens - len(out) - 1 if fast_forward else 0)
            forced += len(new) - 1
            out.extend(new)
            if matcher is not None and matcher.is_stopped():
                if matcher.is_error():
                    raise DecoderError(f"grammar matcher failed: {matcher.get_error()}")
                stop = "grammar_end"
                break
            if len(out) >= max_tokens:
                break
            ids = self._head_ids(matcher) if sparse and len(new) <= self.n_ubatch else None
            sparse = ids is not None
            self._decode(new, head=ids is None)
            batches += 1
            evaluated += len(new)
        return _LoopResult(out, stop, sampled, forced, resamples, batches, evaluated)

    # --- speculative decoding: drafts from the text itself, verified in one batch ----------------------
    #
    # Why: a batch of 8 tokens costs about twice one token on a CPU, and the text a policy writes copies
    # its prompt (speculation.py proposes the drafts). We evaluate [token + forced + draft] as ONE batch
    # with logits for every drafted row, and keep the drafted tokens the model itself would have chosen.
    # The first disagreement is replaced by the model's own choice from that row, and the rejected rows
    # are removed from the KV cache. Greedy: the same argmax over the same allowed tokens as plain
    # decoding, so the same text. Sampling: the speculative-sampling rule for a deterministic draft
    # (accept draft token t with probability p(t), else draw from p without t, renormalised), with p the
    # chain's distribution after the grammar mask, so the output distribution is unchanged.

    def _speculative_loop(
        self,
        chain: Any,
        matcher: Any,
        sampling: Sampling,
        spec: Speculation,
        cancel: threading.Event | None,
        first_ids: np.ndarray | None = None,
        sparse: bool = False,
    ) -> _LoopResult:
        """The decode loop with drafts; returns what `_decode_loop` returns. The cancel event is checked
        once per batch, as in the plain loop (a batch is one forward pass: tens of ms on a CPU).

        Every position is decided as plain decoding decides it: a position right after a chosen token
        whose grammar forces what follows (fast-forward) takes the forced tokens, without looking at
        the model, so forced draft rows need no logits; every other position is the model's choice from
        its row (verification), so greedy output is plain decoding's.

        Sparse logits as in `_decode_loop`: before a batch, the grammar is walked through the draft to find
        the allowed tokens of every row verification will read (`_draft_row_ids`); when all are few, the
        batch skips the output layer.
        """
        ll = self._ll
        eog = set(self.eog_tokens)
        fast_forward = self.config.fast_forward and matcher is not None
        max_tokens = sampling.max_tokens
        rng = np.random.default_rng(sampling.seed)
        out: list[int] = []
        sampled = forced = batches = evaluated = 0
        stop: StopReason = "max_tokens"
        row = -1  # batch row whose logits predict the next token
        token: int | None = None  # the next token when verification has already chosen it
        pending: list[int] = []  # forced tokens that follow the last accepted draft token (not consumed yet)
        budget = self.config.draft_max_tokens  # halved after a draft fails at once, doubled after a full accept
        row_ids: dict[int, np.ndarray] = {-1: first_ids} if first_ids is not None else {}  # rows without logits
        with contextlib.ExitStack() as owned:  # frees the probability chain (sampling only)
            probs_chain = None
            if sampling.temperature != 0.0:
                probs_chain = owned.enter_context(self._make_chain(sampling, draw=False)).ptr
            while True:
                if cancel is not None and cancel.is_set():
                    stop = "cancelled"
                    break
                if pending:
                    new, pending = pending, []
                    if not matcher.consume_tokens(new):
                        raise DecoderError(f"grammar matcher rejected its own forced tokens: {matcher.get_error()}")
                    forced += len(new)
                else:
                    if token is None:
                        if matcher is not None:
                            token = self._sample_allowed(
                                chain, matcher, row, greedy=probs_chain is None, ids=row_ids.get(row)
                            )
                        else:
                            token = int(ll.llama_sampler_sample(chain, self._ctx, row))
                    if token in eog:
                        stop = "eos"
                        break
                    sampled += 1
                    new = [token] + self._consume(matcher, token, max_tokens - len(out) - 1 if fast_forward else 0)
                    forced += len(new) - 1
                    token = None
                out.extend(new)
                spec.extend(new)
                if matcher is not None and matcher.is_stopped():
                    if matcher.is_error():
                        raise DecoderError(f"grammar matcher failed: {matcher.get_error()}")
                    stop = "grammar_end"
                    break
                if len(out) >= max_tokens:
                    break
                room = min(budget, max_tokens - len(out), self.n_batch - len(new))
                planned = self._drafter.draft(spec, matcher, room, fast_forward) if room > 0 else Draft()
                draft, is_forced = planned.tokens, planned.forced
                rows = [len(new) - 1 + i for i, f in enumerate(is_forced) if not f]
                row_ids = {}
                if sparse and len(new) + len(draft) <= self.n_ubatch:
                    planned_ids = self._draft_row_ids(matcher, len(new), draft, is_forced, fast_forward)
                    sparse = planned_ids is not None
                    row_ids = planned_ids or {}
                self._decode(new + draft, outputs=rows, head=not row_ids)
                batches += 1
                evaluated += len(new) + len(draft)
                spec.drafted += len(rows)
                row = len(new) + len(draft) - 1  # all accepted: the next token comes from the last row
                kept = self._n_pos - len(draft)
                forced_next: list[int] = []  # what plain decoding would force after the last token kept
                accepted_here = 0
                done = False
                for i, drafted in enumerate(draft):
                    if is_forced[i]:  # plain decoding appends it unseen (the plan matched it to the forced run)
                        del forced_next[:1]
                        forced += 1
                    else:
                        verified = len(new) - 1 + i
                        choice = self._verify(
                            chain, probs_chain, rng, matcher, verified, drafted, row_ids.get(verified)
                        )
                        if choice != drafted:
                            self._truncate(kept)  # the rejected rows leave the KV cache
                            token = choice  # drawn from the right distribution already: the next step takes it
                            break
                        spec.accepted += 1
                        accepted_here += 1
                    if matcher is not None and not matcher.consume_token(drafted):
                        raise DecoderError(f"grammar matcher rejected a validated draft token: {matcher.get_error()}")
                    kept += 1
                    out.append(drafted)
                    spec.extend((drafted,))
                    if matcher is not None and matcher.is_stopped():
                        stop, done = "grammar_end", True
                    elif len(out) >= max_tokens:
                        stop, done = "max_tokens", True
                    if done:
                        self._truncate(kept)
                        break
                    if not is_forced[i] and fast_forward:
                        forced_next = matcher.compute_ff_tokens()[: max_tokens - len(out)]
                else:
                    pending = forced_next  # the draft ended inside a forced run: the rest comes next
                if done:
                    break
                if rows:
                    if token is not None and accepted_here == 0:
                        budget = max(1, budget // 2)
                    elif token is None:
                        budget = min(self.config.draft_max_tokens, budget * 2)
        return _LoopResult(out, stop, sampled, forced, 0, batches, evaluated)

    def _draft_row_ids(
        self, matcher: Any, n_new: int, draft: list[int], is_forced: list[bool], fast_forward: bool
    ) -> dict[int, np.ndarray] | None:
        """The allowed tokens at each row of the coming batch whose logits verification reads: the row before
        each drafted token plain decoding would choose, and the last row unless a forced token or the grammar's
        end follows. The grammar is walked through the draft and rolled back. None when a row allows many."""
        row_ids: dict[int, np.ndarray] = {}
        consumed = 0
        queue: list[int] = []  # forced tokens still to come (plain decoding appends them unseen)
        try:
            for i, token in enumerate(draft):
                if is_forced[i]:
                    del queue[:1]
                else:
                    ids = self._head_ids(matcher)
                    if ids is None:
                        return None
                    row_ids[n_new - 1 + i] = ids
                if not matcher.consume_token(token):
                    raise DecoderError(f"grammar matcher rejected a validated draft token: {matcher.get_error()}")
                consumed += 1
                if matcher.is_stopped():
                    return row_ids
                if not is_forced[i] and fast_forward:
                    queue = list(matcher.compute_ff_tokens())
            if not queue:
                ids = self._head_ids(matcher)
                if ids is None:
                    return None
                row_ids[n_new + len(draft) - 1] = ids
            return row_ids
        finally:
            if consumed and not matcher.rollback(consumed):
                raise DecoderError(f"grammar matcher could not roll back a draft: {matcher.get_error()}")

    def _verify(
        self,
        chain: Any,
        probs_chain: Any,
        rng: np.random.Generator,
        matcher: Any,
        row: int,
        drafted: int,
        ids: np.ndarray | None = None,
    ) -> int:
        """The token at batch row `row` given that the draft proposes `drafted` there: `drafted` itself
        when accepted, else the replacement drawn from the residual distribution. `ids`: the row's allowed
        tokens when the batch skipped the output layer."""
        if probs_chain is None:  # greedy: exactly the choice plain decoding makes from these logits
            if matcher is not None:
                return self._sample_allowed(chain, matcher, row, greedy=True, ids=ids)
            return int(self._ll.llama_sampler_sample(chain, self._ctx, row))
        ids, p = self._target_probs(probs_chain, matcher, row, ids)
        hit = np.flatnonzero(ids == drafted)
        p_drafted = float(p[hit[0]]) if len(hit) else 0.0
        if rng.random() < p_drafted:
            return drafted
        if len(hit):
            p = p.copy()
            p[hit[0]] = 0.0
        return int(ids[rng.choice(len(ids), p=p / p.sum())])

    def _target_probs(
        self, probs_chain: Any, matcher: Any, row: int, ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) that plain decoding samples from at batch row `row`: the grammar's
        allowed tokens (all without a grammar) through the chain's temperature, top-k and top-p. `ids`: as in
        `_sample_allowed` (the batch skipped the output layer)."""
        ll = self._ll
        if ids is not None:
            logits = self._head_logits(row, ids)
        else:
            if matcher is None:
                ids = np.arange(self.n_vocab)
            else:
                ids = self._allowed_ids(matcher)
                if ids is None:  # many: every token of the mask `_allowed_ids` filled
                    ids = np.flatnonzero(self._mask_bits())
            logits = self._logits(row)[ids]
        candidates = np.zeros(len(ids), dtype=_CANDIDATE_DTYPE)
        candidates["id"] = ids
        candidates["logit"] = logits
        array = ll.llama_token_data_array(candidates.ctypes.data_as(ll.llama_token_data_p), len(ids), -1, False)
        ll.llama_sampler_apply(probs_chain, ctypes.byref(array))
        n = int(array.size)
        if n <= 0:
            raise DecoderError("the sampler chain kept no token")
        address = ctypes.cast(array.data, ctypes.c_void_p).value  # the chain may have re-pointed `data`
        if not address:
            raise DecoderError("the sampler chain left no candidate array")
        raw = (ctypes.c_char * (n * _CANDIDATE_DTYPE.itemsize)).from_address(address)
        kept = np.frombuffer(raw, dtype=_CANDIDATE_DTYPE)  # type: ignore[call-overload]  # a ctypes array is a buffer
        kept_logits = kept["logit"].astype(np.float64)
        p = np.exp(kept_logits - kept_logits.max())
        return kept["id"].astype(np.int64), p / p.sum()
