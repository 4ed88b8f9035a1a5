"""llama.cpp's C objects, one small owner class each, and llama.cpp's process-wide setup (backend, log).

Why: a model, a context, a batch, a vision projector, a LoRA adapter, a sampler chain, an image bitmap
and mtmd's input chunks are each allocated by one C call and must be freed by exactly one other, in
the right order (an adapter after the context that applied it, before its model). Each class here
owns one such pointer from the call that made it (a NULL result raises at once, with llama.cpp's own
last error lines) and frees it exactly once: `close()` is idempotent, and every class is a context
manager, so an owner (the decoder's `ExitStack`, a `with` around one generation) frees in reverse
order of creation whatever was created, also when a later step fails half-way.

Nothing outside runtime/policy/ touches ctypes; `llama_cpp` is imported inside the functions so that
this module (and the decoder's) imports without the `llm` extra.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any, TypeVar

from vlm2vla_edge.runtime.errors import UserError, Vlm2VlaError

__all__ = [
    "DecoderError", "LlamaBatch", "LlamaContext", "LlamaLog", "LlamaModel", "LoraAdapter", "ModelLoadError",
    "MtmdBitmap", "MtmdContext", "MtmdInputChunks", "SamplerChain", "check_gguf", "ensure_backend",
]

_GGUF_MAGIC = b"GGUF"


class DecoderError(Vlm2VlaError):
    """llama.cpp or llguidance failed at run time (decode error, KV cache full, matcher error)."""


class ModelLoadError(UserError):
    """A model or projector file is missing, not a GGUF, truncated, or incompatible."""


def check_gguf(path: Path, what: str) -> None:
    """Refuse a path that is not a readable GGUF file before llama.cpp sees it (its own errors are vaguer)."""
    if not path.exists():
        raise ModelLoadError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"{what} path {path} is not a file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{what} file {path} is not a GGUF file (wrong magic bytes)")


# --- llama.cpp's log and backend (once per process) --------------------------------------------------

# ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation. llama.cpp's "info" is a
# page of model facts per load: debug for us. Its warnings are about model files and cache settings
# we chose on purpose (full-size SWA cache): info for us; they are still kept for error messages.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_llama_log = logging.getLogger("vlm2vla_edge.llama_cpp")


class LlamaLog:
    """llama.cpp's log lines routed into `logging` (it prints everything to stderr unless given a
    callback), keeping the last warnings and errors so that a failed load can say *why* in its exception.

    llama.cpp has one log callback per process: there is one instance, made by `ensure_backend`.
    """

    def __init__(self) -> None:
        self._recent: deque[str] = deque(maxlen=8)
        self._last_level = logging.DEBUG
        self._callbacks: list[object] = []  # the ctypes callbacks, alive as long as llama.cpp may call them

    def on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        py_level = self._last_level if level == 5 else _LEVELS.get(level, logging.DEBUG)
        self._last_level = py_level
        if py_level >= logging.INFO and message:  # llama.cpp warnings and errors: kept for error messages
            self._recent.append(message)
        if message and _llama_log.isEnabledFor(py_level):
            _llama_log.log(py_level, message)

    def install(self) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp

        llama_cb = llama_cpp.llama_log_callback(self.on_log)
        llama_cpp.llama_log_set(llama_cb, ctypes.c_void_p(0))
        self._callbacks.append(llama_cb)
        try:
            mtmd_cb = llama_cpp.llama_log_callback(self.on_log)
            mtmd_cpp.mtmd_helper_log_set(mtmd_cb, ctypes.c_void_p(0))
            self._callbacks.append(mtmd_cb)
        except (AttributeError, OSError):  # a build without mtmd: text models still work
            pass

    def take_recent(self) -> str:
        """The warnings and errors logged since the last call, joined, and forget them."""
        text = " | ".join(line for line in self._recent if line)
        self._recent.clear()
        return text


@functools.cache
def _init_backend() -> LlamaLog:
    import llama_cpp

    llama_log = LlamaLog()
    llama_log.install()
    llama_cpp.llama_backend_init()
    return llama_log


_backend_lock = threading.Lock()  # functools.cache alone could run the initialisation twice in a race


def ensure_backend() -> LlamaLog:
    """Initialise llama.cpp's backend and route its log, once per process; returns the log."""
    with _backend_lock:
        return _init_backend()


def _with_reason(message: str, llama_log: LlamaLog) -> str:
    reason = llama_log.take_recent()
    return message + (f": {reason}" if reason else "")


# --- one owner per C object ---------------------------------------------------------------------------


_H = TypeVar("_H", bound="_Handle")


class _Handle:
    """Owns one C object: made by a subclass's constructor, freed by `close()` exactly once."""

    __slots__ = ("_ptr",)

    def __init__(self, ptr: Any) -> None:
        self._ptr = ptr

    @property
    def ptr(self) -> Any:
        """The C pointer (or struct), for the llama.cpp calls; an error once freed."""
        if self._ptr is None:
            raise DecoderError(f"the {type(self).__name__} was freed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _free(self, ptr: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free the C object; safe to call again."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._free(ptr)

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LlamaModel(_Handle):
    """A loaded GGUF model (weights and vocabulary)."""

    __slots__ = ()

    def __init__(self, path: Path, params: Any, llama_log: LlamaLog) -> None:
        import llama_cpp

        llama_log.take_recent()
        ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadError(
                _with_reason(f"llama.cpp could not load {path} (truncated, corrupt or unsupported GGUF)", llama_log)
            )
        super().__init__(ptr)

    def _free(self, ptr: Any) -> None:
        import llama_cpp

        llama_cpp.llama_model_free(ptr)


class LlamaContext(_Handle):
    """An inference context of a model: the KV cache and the compute buffers."""

    __slots__ = ()

    def __init__(self, model: LlamaModel, params: Any, path: Path, llama_log: LlamaLog) -> None:
        import llama_cpp

        ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise ModelLoadError(_with_reason(
                f"llama.cpp could not create a context for {path} (n_ctx={params.n_ctx}: out of memory?)", llama_log
            ))
        super().__init__(ptr)

    def _free(self, ptr: Any) -> None:
        import llama_cpp

        llama_cpp.llama_free(ptr)


class LlamaBatch(_Handle):
    """A token batch of up to `n_tokens` tokens for one sequence (a struct of arrays llama.cpp allocates)."""

    __slots__ = ()

    def __init__(self, n_tokens: int) -> None:
        import llama_cpp

        super().__init__(llama_cpp.llama_batch_init(n_tokens, 0, 1))

    def _free(self, ptr: Any) -> None:
        import llama_cpp

        llama_cpp.llama_batch_free(ptr)


class LoraAdapter(_Handle):
    """A LoRA GGUF loaded for one model; free it after every context that applied it, before the model."""

    __slots__ = ()

    def __init__(self, model: LlamaModel, path: Path, model_name: str, llama_log: LlamaLog) -> None:
        import llama_cpp

        llama_log.take_recent()
        ptr = llama_cpp.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not ptr:
            raise ModelLoadError(_with_reason(
                f"llama.cpp could not load the LoRA adapter {path} for {model_name} (made for another "
                "model, or not a LoRA GGUF)", llama_log,
            ))
        super().__init__(ptr)

    def _free(self, ptr: Any) -> None:
        import llama_cpp

        llama_cpp.llama_adapter_lora_free(ptr)


class MtmdContext(_Handle):
    """A vision projector (mmproj GGUF) loaded for a model through libmtmd."""

    __slots__ = ()

    def __init__(self, path: Path, model: LlamaModel, params: Any, llama_log: LlamaLog) -> None:
        from llama_cpp import mtmd_cpp

        llama_log.take_recent()
        ptr = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model.ptr, params)
        if not ptr:
            raise ModelLoadError(_with_reason(
                f"llama.cpp could not load the vision projector {path} (corrupt, or made for another model)",
                llama_log,
            ))
        super().__init__(ptr)

    def _free(self, ptr: Any) -> None:
        from llama_cpp import mtmd_cpp

        mtmd_cpp.mtmd_free(ptr)


class MtmdBitmap(_Handle):
    """An RGB image handed to libmtmd (it copies the pixels)."""

    __slots__ = ()

    def __init__(self, width: int, height: int, data: Any) -> None:
        from llama_cpp import mtmd_cpp

        ptr = mtmd_cpp.mtmd_bitmap_init(width, height, data)
        if not ptr:
            raise DecoderError("mtmd could not create an image bitmap")
        super().__init__(ptr)

    def _free(self, ptr: Any) -> None:
        from llama_cpp import mtmd_cpp

        mtmd_cpp.mtmd_bitmap_free(ptr)


class MtmdInputChunks(_Handle):
    """A prompt tokenized by libmtmd into text and image chunks."""

    __slots__ = ()

    def __init__(self) -> None:
        from llama_cpp import mtmd_cpp

        ptr = mtmd_cpp.mtmd_input_chunks_init()
        if not ptr:
            raise DecoderError("mtmd could not allocate input chunks")
        super().__init__(ptr)

    def _free(self, ptr: Any) -> None:
        from llama_cpp import mtmd_cpp

        mtmd_cpp.mtmd_input_chunks_free(ptr)


class SamplerChain(_Handle):
    """llama.cpp's native sampler chain; it owns the samplers added to it."""

    __slots__ = ()

    def __init__(self) -> None:
        import llama_cpp

        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        ptr = llama_cpp.llama_sampler_chain_init(params)
        if not ptr:
            raise DecoderError("llama.cpp could not create a sampler chain")
        super().__init__(ptr)

    def add(self, sampler: Any) -> None:
        """Append a sampler (the result of a `llama_sampler_init_*` call); the chain frees it."""
        import llama_cpp

        if not sampler:
            raise DecoderError("llama.cpp could not create a sampler")
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)

    def _free(self, ptr: Any) -> None:
        import llama_cpp

        llama_cpp.llama_sampler_free(ptr)
