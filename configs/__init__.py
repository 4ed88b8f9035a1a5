"""Packaged YAML configs (`vlm2vla_edge.configs`), loaded and validated by `vlm2vla_edge.runtime.config`."""
