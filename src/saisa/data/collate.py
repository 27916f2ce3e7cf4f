"""Collator: per-sample dicts -> one `MultimodalBatch` (padding, and images of all samples in reading order).

Unusual here: samples the dataset marked as skipped (no supervised token left) are dropped, counted in
`num_skipped` and logged with their id, so they can neither vanish silently nor enter the loss as zeros. Given
`image_token_id`, the collator also checks that each sample has as many placeholders as images, the invariant the
model's merge relies on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from saisa.batch import MultimodalBatch
from saisa.data.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)


class Collator:
    """`Collator(pad_token_id, padding_side, image_processor)(samples) -> MultimodalBatch`.

    Samples: `{"id", "input_ids": (L,), "labels": (L,) (optional), "images": [PIL] | (N, C, H, W)}`. Padding positions
    get `attention_mask` 0 and label -100. PIL images are turned into pixels by
    `image_processor(images=[...], return_tensors="pt")["pixel_values"]`, in one call for the batch.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", image_processor: Callable | None = None, *,
                 image_token_id: int | None = None, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; pass e.g. tokenizer.eos_token_id "
                             "(padding is masked out of attention and loss, so any id works)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' (training) or 'left' (batched generation), "
                             f"got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_skipped = 0

    def _pad(self, rows: Sequence[torch.Tensor], value: int, length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, length - len(row):] = row
        return out

    def _pixels(self, samples: Sequence[dict[str, Any]]) -> torch.Tensor | None:
        pil = [img for s in samples if isinstance(s.get("images"), (list, tuple)) for img in s["images"]]
        if pil and not all(isinstance(img, Image.Image) for img in pil):
            raise TypeError("sample images must be PIL images or one (N, C, H, W) tensor per sample")
        if pil and self.image_processor is None:
            raise ValueError("samples carry PIL images but the Collator has no image_processor to turn them into "
                             "pixels; pass image_processor= (e.g. saisa.model.vision.image_processor_for(...))")
        processed = self.image_processor(images=pil, return_tensors="pt")["pixel_values"] if pil else None  # (N,C,H,W)
        chunks, used = [], 0
        for s in samples:
            images = s.get("images")
            if isinstance(images, torch.Tensor):
                chunks.append(images if images.dim() == 4 else images.unsqueeze(0))
            elif images:
                chunks.append(processed[used: used + len(images)])
                used += len(images)
        if not chunks:
            return None
        shapes = {tuple(c.shape[1:]) for c in chunks}
        if len(shapes) > 1:
            raise ValueError(f"images of one batch have different shapes {sorted(shapes)}; resize them to one size")
        return torch.cat(chunks).float()  # (N_images, C, H, W)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> MultimodalBatch:
        kept = []
        for s in samples:
            if s.get("skipped"):
                self.num_skipped += 1
                logger.warning("skipping sample %r: %s (%d skipped so far)", s.get("id"), s["skipped"],
                               self.num_skipped)
            else:
                kept.append(s)
        if not kept:
            raise ValueError(f"every sample of this batch was skipped (ids {[s.get('id') for s in samples]}): no "
                             "supervised tokens; raise max_length or run `saisa data check` to find such samples")
        ids = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in kept]
        has_labels = ["labels" in s and s["labels"] is not None for s in kept]
        if any(has_labels) and not all(has_labels):
            raise ValueError("some samples of the batch have labels and some do not; collate them separately")
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pixel_values = self._pixels(kept)
        if self.image_token_id is not None:
            for s, x in zip(kept, ids):
                images = s.get("images")
                n = 0 if images is None else (len(images) if not isinstance(images, torch.Tensor)
                                              else (images.shape[0] if images.dim() == 4 else 1))
                found = int((x == self.image_token_id).sum())
                if found != n:
                    raise ValueError(f"sample {s.get('id')!r}: {found} image placeholder tokens but {n} images")
        return MultimodalBatch(
            input_ids=self._pad(ids, self.pad_token_id, length),  # (B, L)
            attention_mask=self._pad([torch.ones_like(x) for x in ids], 0, length),  # (B, L)
            labels=(self._pad([torch.as_tensor(s["labels"], dtype=torch.long) for s in kept], IGNORE_INDEX, length)
                    if all(has_labels) else None),  # (B, L)
            pixel_values=pixel_values,  # (N_images, C, H, W) or None
        )
