"""MultimodalBatch: the one object that carries a batch from data to model.

Unusual here: `input_ids` hold ONE `image_token_id` per image (never expanded to the v visual tokens); images of all
samples are concatenated in reading order in `pixel_values`, and the model consumes them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True, kw_only=True)
class MultimodalBatch:
    input_ids: torch.Tensor  # (B, L) long; one image_token_id per image
    attention_mask: torch.Tensor  # (B, L) long; 1 = real token, 0 = padding (left or right)
    labels: torch.Tensor | None = None  # (B, L) long; -100 = no loss (prompt, padding, image placeholders)
    pixel_values: torch.Tensor | None = None  # (N_images, C, H, W), images of sample 0 first, in reading order

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MultimodalBatch":
        """Move tensors to `device`; `dtype` applies to pixel_values only."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                is_float = value.is_floating_point()
                value = value.to(device=device, dtype=dtype if (dtype is not None and is_float) else None)
            moved[f.name] = value
        return replace(self, **moved)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `SaisaForConditionalGeneration.forward`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])
