"""Chat samples → token ids with answer-only labels, images → pixels, and padded batches.

The token sequence must be the one llama.cpp's mtmd feeds the model at runtime, not the one Hugging
Face's `Gemma3Processor` builds:

- mtmd replaces the media marker by `<start_of_image>`, the image's embeddings and `<end_of_image>`,
  nothing else (the HF processor also wraps the image in "\\n\\n" and needs an `<image_soft_token>` the
  270M vocabulary lacks). So the prompt is split at `MEDIA_MARKER`, and `[boi] + [image] * n + [eoi]`
  is inserted between the two tokenized halves; `image` is the model's `image_token_index`, whose
  embeddings the model overwrites with the projected image features.
- Each text piece is tokenized on its own, as mtmd does; `<bos>` is prepended once (the prompts
  leave it out, see prompts.py).
- Image tokens get `token_type_ids == 1`: Gemma-3 attends bidirectionally within an image, in
  transformers as in llama.cpp (mtmd decodes Gemma-3 images non-causally).

Labels are -100 everywhere except the answer tokens (the target and its end-of-turn), so the loss
teaches the answer only, never the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from vlm2vla_edge.runtime.errors import UserError
from vlm2vla_edge.runtime.policy.prompts import MEDIA_MARKER
from vlm2vla_edge.train.lora.samples import ChatSample

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ImageTokens:
    """How a vision model spells one image in its token sequence (from Gemma3Config)."""

    boi_id: int  # <start_of_image>
    eoi_id: int  # <end_of_image>
    image_id: int  # placeholder whose embedding is replaced by an image feature
    per_image: int  # mm_tokens_per_image (256 for the real Gemma-3 models)

    @classmethod
    def from_config(cls, config: Any) -> "ImageTokens":
        return cls(
            boi_id=int(config.boi_token_index),
            eoi_id=int(config.eoi_token_index),
            image_id=int(config.image_token_index),
            per_image=int(config.mm_tokens_per_image),
        )

    def ids(self) -> list[int]:
        return [self.boi_id] + [self.image_id] * self.per_image + [self.eoi_id]


@dataclass(frozen=True)
class EncodedSample:
    """One tokenized sample; lists, not tensors, so that thousands of them stay cheap to hold."""

    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on the answer tokens
    token_type_ids: list[int]  # 1 on image placeholder tokens
    image: Path | None

    @property
    def answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_sample(sample: ChatSample, tokenizer: Any, image_tokens: ImageTokens | None) -> EncodedSample:
    """Tokenize prompt and answer as the runtime would see them; loss only on the answer."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UserError("the tokenizer has no <bos> token; Gemma-3 prompts need one")
    if sample.has_image:
        if image_tokens is None:
            raise UserError(f"sample {sample.id} has an image but the model is text-only")
        before, after = sample.prompt.split(MEDIA_MARKER)
        prompt_ids = [bos] + _text_ids(tokenizer, before) + image_tokens.ids() + _text_ids(tokenizer, after)
    else:
        prompt_ids = [bos] + _text_ids(tokenizer, sample.prompt)
    answer_ids = _text_ids(tokenizer, sample.answer)
    image_id = image_tokens.image_id if (image_tokens is not None and sample.has_image) else None
    return EncodedSample(
        id=sample.id,
        input_ids=prompt_ids + answer_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        token_type_ids=[1 if t == image_id else 0 for t in prompt_ids] + [0] * len(answer_ids),
        image=sample.image,
    )


def encode_all(
    samples: Sequence[ChatSample], tokenizer: Any, image_tokens: ImageTokens | None, max_length: int
) -> tuple[list[EncodedSample], list[str]]:
    """Encode every sample; those longer than max_length are left out (their ids are returned)."""
    kept: list[EncodedSample] = []
    too_long: list[str] = []
    for sample in samples:
        encoded = encode_sample(sample, tokenizer, image_tokens)
        if len(encoded.input_ids) > max_length:
            log.warning("sample_skipped id=%s tokens=%d max_length=%d", sample.id, len(encoded.input_ids), max_length)
            too_long.append(sample.id)
            continue
        kept.append(encoded)
    return kept, too_long


def load_pixels(processor: Any, path: Path) -> torch.Tensor:
    """One image file → pixel values (3, H, W) through Gemma3ImageProcessorPil (no torchvision)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc
    pixels = processor(images=[rgb], return_tensors="pt")["pixel_values"]  # (1, 3, H, W)
    return pixels[0]  # (3, H, W)


class EncodedDataset(torch.utils.data.Dataset):
    """Encoded samples; images are decoded when an item is fetched (in dataloader workers if any)."""

    def __init__(self, samples: Sequence[EncodedSample], image_processor: Any | None) -> None:
        self.samples = list(samples)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[EncodedSample, torch.Tensor | None]:
        sample = self.samples[index]
        if sample.image is None:
            return sample, None
        if self.image_processor is None:
            raise UserError(f"sample {sample.id} has an image but no image processor was loaded")
        return sample, load_pixels(self.image_processor, sample.image)


@dataclass
class Batch:
    """A padded micro-batch (right padding); `to()` lets accelerate move it to the device."""

    input_ids: torch.Tensor  # (B, T) int64, pad_id after each sequence
    attention_mask: torch.Tensor  # (B, T) int64, 1 on real tokens
    labels: torch.Tensor  # (B, T) int64, IGNORE_INDEX off the answers
    token_type_ids: torch.Tensor | None = None  # (B, T) int64, 1 on image tokens; None for text-only models
    pixel_values: torch.Tensor | None = None  # (N_images, 3, H, W), in the order the images occur in the batch
    ids: list[str] = field(default_factory=list)

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        moved = {
            f.name: (value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value)
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }
        return Batch(**moved)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def answer_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward (labels excluded)."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs


@dataclass(frozen=True)
class Collator:
    """Pads a list of dataset items into a `Batch`."""

    pad_id: int
    vision: bool  # vision models get token_type_ids (bidirectional attention inside images)
    pad_to_multiple_of: int = 8

    def __call__(self, items: Sequence[tuple[EncodedSample, torch.Tensor | None]]) -> Batch:
        longest = max(len(sample.input_ids) for sample, _ in items)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        token_type_ids = torch.zeros((batch, width), dtype=torch.long)  # (B, T)
        for row, (sample, _) in enumerate(items):
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids)  # (n,)
            labels[row, :n] = torch.tensor(sample.labels)  # (n,)
            attention_mask[row, :n] = 1
            token_type_ids[row, :n] = torch.tensor(sample.token_type_ids)  # (n,)
        images = [pixels for _, pixels in items if pixels is not None]
        pixel_values = torch.stack(images) if images else None  # (N_images, 3, H, W)
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            token_type_ids=token_type_ids if self.vision else None,
            pixel_values=pixel_values,
            ids=[sample.id for sample, _ in items],
        )
