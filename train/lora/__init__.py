"""LoRA fine-tuning of Gemma-3 (transformers + peft + accelerate) on a labelled dataset.

`samples` renders labelled samples with the runtime's prompt templates, `collate` tokenizes them the way
llama.cpp's mtmd will see them (answer-only labels, image tokens, pixels), `config` is the recipe,
`trainer` the loop (checkpoints, resume, training card) and `cli` the `train` command. Only `collate` and
`trainer` import torch; importing this package does not.
"""
