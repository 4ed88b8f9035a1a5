"""Training toolchain (`vlm2vla_edge.train`): relabel teleoperation trajectories into the hierarchical
language format and train the LoRA adapter. Needs the `[train]` extra (torch, transformers, peft);
the on-robot runtime never imports it."""
