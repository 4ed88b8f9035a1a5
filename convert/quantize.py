"""Quantise a text GGUF with llama.cpp's own quantiser (`llama_model_quantize` through llama-cpp-python).

The projector is never quantised here (it stays F16: the vision tower is small and sensitive). For the
text model llama.cpp picks a type per tensor from the requested file type ("mostly" Q4_K_M etc.), and
falls back where a type does not fit: k-quants pack 256 values per block, so a tensor whose rows are
not a multiple of 256 (every tensor of a width-64 test model) gets a 32-value type instead (Q4_K ->
Q5_0/Q4_0-family, Q6_K -> Q8_0). `QuantResult.tensor_types` counts what each tensor really got, so the
progress log shows a fallback rather than hiding it.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError
from vlm2vla_edge.runtime.policy.bundle import read_gguf_header

# Quant name -> llama_ftype (llama.h). F16/F32 need no quantiser run: the converter writes them.
QUANT_FTYPES: dict[str, int] = {
    "Q4_K_M": 15,
    "Q4_K_S": 14,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "Q8_0": 7,
    "Q4_0": 2,
    "F16": 1,
    "F32": 0,
}
UNQUANTISED = ("F16", "F32")

# ggml type id -> name, for the per-tensor census.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 20: "IQ4_NL", 30: "BF16",
}


class QuantizeError(Vlm2VlaError):
    """llama.cpp's quantiser failed (its return code is in the message)."""


def normalize_quant(name: str) -> str:
    """The canonical spelling of a quant type ('q4_k_m' -> 'Q4_K_M'), or a `UserError` listing the choices."""
    canonical = name.strip().upper().replace("-", "_")
    if canonical not in QUANT_FTYPES:
        raise UserError(f"unknown quant type '{name}'; choose one of {', '.join(QUANT_FTYPES)}")
    return canonical


def tensor_type_census(path: Path) -> dict[str, int]:
    """How many tensors of a GGUF have each ggml type, e.g. {'Q4_K': 120, 'F32': 60}."""
    header = read_gguf_header(path)
    counts = Counter(GGML_TYPE_NAMES.get(t.ggml_type, f"type{t.ggml_type}") for t in header.tensors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass(frozen=True)
class QuantResult:
    path: Path
    quant: str
    tensor_types: dict[str, int]
    size_bytes: int
    seconds: float


def quantize_gguf(source: Path, dest: Path, quant: str, *, n_threads: int = 0) -> QuantResult:
    """Write `dest` as `source` quantised to `quant` (F16/F32: a copy, when the source already is one)."""
    quant = normalize_quant(quant)
    t0 = time.monotonic()
    source_type = read_gguf_header(source).metadata.get("general.file_type")
    if quant in UNQUANTISED and source_type == QUANT_FTYPES[quant]:
        if Path(source).resolve() != Path(dest).resolve():  # the same file already is the result
            shutil.copyfile(source, dest)
    else:
        import llama_cpp

        # The runtime decoder's backend set-up routes llama.cpp's log (a line per tensor here) into
        # `logging` instead of stderr.
        from vlm2vla_edge.runtime.policy.llama_handles import ensure_backend

        ensure_backend()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_FTYPES[quant]
        params.nthread = n_threads
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
        if rc != 0 or not dest.is_file():
            dest.unlink(missing_ok=True)
            raise QuantizeError(f"llama_model_quantize failed with code {rc} quantising {source.name} to {quant}")
    return QuantResult(dest, quant, tensor_type_census(dest), dest.stat().st_size, time.monotonic() - t0)
