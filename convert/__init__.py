"""Model conversion (`vlm2vla_edge.convert`): merge the LoRA adapter, convert to GGUF, quantize,
validate against the source model and write a model bundle. Needs the `[convert]` extra."""
