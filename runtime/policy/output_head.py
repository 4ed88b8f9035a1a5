"""The model's output layer for the few tokens a grammar allows, computed here from the final hidden state.

Why: a grammar-constrained step chooses among a handful of tokens (a digit, a sign, a bracket), but
llama.cpp computes a logit for every token of the vocabulary, and on a CPU that output layer is the
largest part of a small model's work. Gemma-3-270M Q4_K_M (2 threads, measured on this machine): its
output matrix (262,144 x 640, Q8_0) is 178 MB of the 253 MB file, so one generated token costs 15.6 ms
with it and 5.4 ms without it, and each row of logits a speculative draft verifies costs another ~4 ms.

So the decoder installs llama.cpp's graph-evaluation callback (`cb_eval`, the hook its eval-callback and
imatrix tools use): when the node that holds the final normed hidden state (`result_norm`) is computed,
`HiddenStateTap` copies its rows (one per output position of the batch) and, when asked to, ends the
graph there: the KV cache is complete by then (every layer wrote it), only the output projection is
left out. `OutputMatrix` then computes logits for just the allowed tokens: their rows of the output
matrix, found through the project's GGUF header reader (`bundle.read_gguf_header`), read from the file
memory-mapped (the same pages llama.cpp maps) and dequantized by ggml's own routine, times the hidden state.

The logits are the same function as llama.cpp's, computed in float32 where llama.cpp first rounds the
hidden state to 8 bits (measured: within 0.2 logit of llama.cpp's). `LlamaDecoder` checks that at load
on a real prompt (`agrees_with`) and keeps llama.cpp's full output layer whenever the check fails (an
architecture that scales or soft-caps its logits), a LoRA adapter changes the output layer, or layers
run on a GPU (where the output layer is cheap and the callback would split the graph).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vlm2vla_edge.runtime.policy.bundle import GgufFormatError, GgufHeader, read_gguf_header
from vlm2vla_edge.runtime.policy.llama_handles import DecoderError

__all__ = ["HiddenStateTap", "OutputMatrix", "adapter_changes_output", "ggml_api"]

log = logging.getLogger(__name__)

HIDDEN_NODE = b"result_norm"  # llama.cpp's name for the final normed hidden state (llm_graph_context: every text model)
OUTPUT_TENSORS = ("output.weight", "token_embd.weight")  # the output matrix; tied models have only the embedding
_CACHE_BYTES = 64 << 20  # dequantized rows kept (the allowed sets of a few grammars recur: digits, signs, brackets)


class _TypeTraits(ctypes.Structure):  # ggml.h: struct ggml_type_traits (its leading fields)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_GGML_TYPE_F32 = 0
_api: Any = None


def ggml_api() -> Any:
    """ggml's C library (llama-cpp-python's libggml-base), with the prototypes this module calls."""
    global _api
    if _api is None:
        import llama_cpp
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
        c = ctypes
        for name, restype, argtypes in (
            ("ggml_get_name", c.c_char_p, [c.c_void_p]),
            ("ggml_nbytes", c.c_size_t, [c.c_void_p]),
            ("ggml_backend_tensor_get", None, [c.c_void_p, c.c_void_p, c.c_size_t, c.c_size_t]),
            ("ggml_row_size", c.c_size_t, [c.c_int, c.c_int64]),
            ("ggml_blck_size", c.c_int64, [c.c_int]),
            ("ggml_type_name", c.c_char_p, [c.c_int]),
            ("ggml_get_type_traits", c.POINTER(_TypeTraits), [c.c_int]),
        ):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _api = lib
    return _api


def _header(path: Path) -> GgufHeader:
    try:
        return read_gguf_header(path)
    except (GgufFormatError, OSError) as exc:
        raise DecoderError(f"cannot read the GGUF header of {path}: {exc}") from exc


def adapter_changes_output(path: Path) -> bool:
    """Whether a LoRA adapter GGUF adapts the output layer (then its logits are not the base matrix's)."""
    return any(t.name.split(".weight")[0] in ("output", "token_embd") for t in _header(path).tensors)


class OutputMatrix:
    """Rows of a GGUF model's output matrix, dequantized on demand (and kept, up to 64 MB)."""

    def __init__(self, model_path: Path, n_embd: int, n_vocab: int) -> None:
        api = ggml_api()
        self.n_embd = n_embd
        self.n_vocab = n_vocab
        header = _header(model_path)
        tensors = {t.name: t for t in header.tensors}
        name = next((n for n in OUTPUT_TENSORS if n in tensors), None)
        if name is None:
            raise DecoderError(f"{model_path} has no output matrix ({' or '.join(OUTPUT_TENSORS)})")
        tensor = tensors[name]
        self.tensor_name = name
        self.ggml_type = tensor.ggml_type
        offset = header.data_offset + tensor.offset
        self.row_bytes = int(api.ggml_row_size(self.ggml_type, n_embd))
        if n_embd % int(api.ggml_blck_size(self.ggml_type)) or tensor.shape != (n_embd, n_vocab):
            raise DecoderError(
                f"{name} of {model_path} is not {n_vocab} rows of {n_embd} values (shape {tensor.shape}, type "
                f"{api.ggml_type_name(self.ggml_type).decode()})"
            )
        if offset + self.row_bytes * n_vocab > header.file_size:
            raise DecoderError(f"{model_path} ends inside {name}")
        self._to_float: Any = None
        if self.ggml_type != _GGML_TYPE_F32:
            traits = api.ggml_get_type_traits(self.ggml_type).contents
            if not traits.to_float:
                raise DecoderError(f"ggml cannot dequantize {name}'s type {traits.type_name!r}")
            self._to_float = _TO_FLOAT(traits.to_float)
        self._file = np.memmap(model_path, dtype=np.uint8, mode="r", offset=offset, shape=(n_vocab, self.row_bytes))
        self._rows: dict[int, np.ndarray] = {}
        self._max_rows = max(1024, _CACHE_BYTES // (4 * n_embd))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The dequantized rows of `ids` (len(ids) x n_embd float32)."""
        missing = [int(i) for i in ids if int(i) not in self._rows]
        if missing:
            raw = np.ascontiguousarray(self._file[missing])
            if self._to_float is None:
                values = raw.view(np.float32).reshape(len(missing), self.n_embd)
            else:
                values = np.empty((len(missing), self.n_embd), dtype=np.float32)
                self._to_float(raw.ctypes.data, values.ctypes.data, values.size)
            if len(self._rows) + len(missing) > self._max_rows:
                self._rows.clear()  # rare (an unusual grammar): start over rather than track recency
            for i, row in zip(missing, values):
                self._rows[i] = row
        return np.stack([self._rows[int(i)] for i in ids])

    def logits(self, hidden: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Logits of tokens `ids` (ascending) given one output position's final hidden state."""
        return self.rows(ids) @ hidden

    def agrees_with(self, hidden: np.ndarray, llama_logits: np.ndarray, tolerance: float = 0.5) -> tuple[bool, float]:
        """Whether the logits computed here match llama.cpp's full row on its 64 highest tokens and 64 others
        (within `tolerance`, or 2% of the largest logit): llama.cpp rounds the hidden state to 8 bits first."""
        top = np.argsort(llama_logits)[-64:]
        spread = np.linspace(0, self.n_vocab - 1, 64).astype(np.int64)
        ids = np.unique(np.concatenate([top, spread]))
        diff = float(np.max(np.abs(self.logits(hidden, ids) - llama_logits[ids])))
        return diff <= max(tolerance, 0.02 * float(np.max(np.abs(llama_logits[ids])))), diff


class HiddenStateTap:
    """llama.cpp's graph-evaluation callback: keeps the final hidden state of the batch's output positions
    and, while `skip_output` is set, stops the graph before the output layer.

    llama.cpp asks about every graph node (`ask` true: do you want this one?) and calls again with the
    computed node when the answer was yes; a False answer to that second call ends the graph. A callback
    must not raise into C: an error is kept in `error` and the graph runs on.
    """

    def __init__(self, n_embd: int) -> None:
        import llama_cpp

        api = ggml_api()
        self._name = api.ggml_get_name
        self._nbytes = api.ggml_nbytes
        self._get = api.ggml_backend_tensor_get
        self.n_embd = n_embd
        self.skip_output = False  # end the graph at the hidden state (no logits this batch)
        self.capture = False  # copy the hidden state (also when the output layer runs)
        self.hidden: np.ndarray | None = None  # output positions x n_embd, from the last batch that captured
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)  # kept alive with the tap

    def _on_node(self, tensor: int, ask: bool, _user: int) -> bool:
        try:
            if ask:
                return bool(self._name(tensor) == HIDDEN_NODE)
            if not (self.skip_output or self.capture):
                return True
            nbytes = int(self._nbytes(tensor))
            if nbytes % (4 * self.n_embd):
                raise DecoderError(f"the hidden state node holds {nbytes} bytes, not rows of {self.n_embd} floats")
            hidden = np.empty((nbytes // (4 * self.n_embd), self.n_embd), dtype=np.float32)
            self._get(tensor, hidden.ctypes.data, 0, nbytes)
            self.hidden = hidden
            return not self.skip_output
        except BaseException as exc:  # noqa: BLE001 - reported by the decoder after llama_decode returns
            self.error = exc
            return True
