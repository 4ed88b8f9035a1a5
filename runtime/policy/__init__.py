"""The policy engine: model bundle, prompts, the llama.cpp decoder and the three-stage policy.

Importing this package is cheap (no llama.cpp, no torch): it re-exports the bundle and prompt API;
the decoder and `LlamaPolicy` (engine.py) live in their own modules and load llama.cpp when imported.
"""

from vlm2vla_edge.runtime.policy.bundle import (
    Bundle,
    BundleError,
    BundleManifest,
    load_bundle,
    read_gguf_header,
    write_bundle,
)
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, MEDIA_MARKER, PromptError, PromptTemplates

__all__ = [
    "Bundle",
    "BundleError",
    "BundleManifest",
    "DEFAULT_PROMPTS",
    "MEDIA_MARKER",
    "PromptError",
    "PromptTemplates",
    "load_bundle",
    "read_gguf_header",
    "write_bundle",
]
