"""NAAViT attention (paper Sec. 3.2): text queries over [visual; text] keys, masked by position, not by index.

Unusual here: keys are laid out as [all visual slots of the sample; its text tokens], not in sequence order. Every
key carries its RoPE position, and the mask is `key_position <= query_position`, so text before an image does not see
it and text after it sees all of it, exactly as in LLaVA's spliced sequence. A placeholder `image_token_id` in
`input_ids` stands for a whole image: it occupies v consecutive positions, is itself never a key, and its own row only
attends to itself (its output carries no meaning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceLayout:
    """Where every text token and every image sits in RoPE-position space, for a padded batch."""

    text_pos: torch.Tensor  # (B, L) long: position of each input_ids slot (a placeholder: its image's first position)
    text_is_key: torch.Tensor  # (B, L) bool: a real text token (not padding, not a placeholder)
    is_placeholder: torch.Tensor  # (B, L) bool
    image_slots: torch.Tensor  # (B, I) long: index of the sample's i-th image in the batch's images, -1 = none
    image_start: torch.Tensor  # (B, I) long: first position of that image
    next_pos: torch.Tensor  # (B,) long: the position the next appended token will take
    # (B, L - P) columns that are not placeholders, when every row holds the same number P of them, else None:
    # lets the inference fast path drop the meaningless placeholder rows from the query stream.
    text_columns: torch.Tensor | None = None

    def to(self, device: torch.device) -> "SequenceLayout":
        moved = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return SequenceLayout(**{f: None if t is None else t.to(device) for f, t in moved.items()})

    @property
    def max_images(self) -> int:
        return self.image_slots.shape[1]

    def visual_positions(self, v: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, I*v) and validity (B, I*v) of the visual keys, slot by slot."""
        offsets = torch.arange(v, device=self.image_start.device)
        pos = (self.image_start.unsqueeze(-1) + offsets).flatten(1)
        valid = (self.image_slots >= 0).unsqueeze(-1).expand(-1, -1, v).flatten(1)
        return pos, valid


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    num_visual_tokens: int,
    num_images: int,
    start_pos: torch.Tensor | None = None,
) -> SequenceLayout:
    """Positions of a padded batch whose images are given in reading order (sample 0's first).

    Each real text token takes one position, each placeholder `num_visual_tokens`, padding none; positions start at
    `start_pos` (B,) (0 without a cache), so left and right padding give the same positions as an unpadded sample.
    """
    real = attention_mask.bool()
    is_placeholder = (input_ids == image_token_id) & real
    counts = is_placeholder.sum(dim=1)  # (B,)
    found = int(counts.sum())
    if found != num_images:
        raise ValueError(
            f"input_ids hold {found} image placeholder(s) (image_token_id={image_token_id}, per sample "
            f"{counts.tolist()}) but {num_images} image(s) were given; put exactly one image_token_id in the text "
            f"for each image, in the order the images are passed"
        )
    lengths = torch.where(is_placeholder, num_visual_tokens, real.long())  # (B, L)
    ends = torch.cumsum(lengths, dim=1)
    if start_pos is None:
        start_pos = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    text_pos = ends - lengths + start_pos.unsqueeze(1)  # exclusive cumsum: (B, L)
    max_images = int(counts.max()) if counts.numel() and found else 0
    batch, _ = input_ids.shape
    image_slots = torch.full((batch, max_images), -1, dtype=torch.long, device=input_ids.device)
    image_start = torch.zeros((batch, max_images), dtype=torch.long, device=input_ids.device)
    if found:
        b_idx, l_idx = is_placeholder.nonzero(as_tuple=True)  # row-major: reading order, sample by sample
        slot = torch.cumsum(is_placeholder.long(), dim=1)[b_idx, l_idx] - 1
        image_slots[b_idx, slot] = torch.arange(found, device=input_ids.device)
        image_start[b_idx, slot] = text_pos[b_idx, l_idx]
    text_columns = None
    if found and bool((counts == counts[0]).all()):
        columns = torch.arange(input_ids.shape[1], device=input_ids.device).expand(batch, -1)
        text_columns = columns[~is_placeholder].view(batch, -1)
    return SequenceLayout(
        text_columns=text_columns,
        text_pos=text_pos,
        text_is_key=real & ~is_placeholder,
        is_placeholder=is_placeholder,
        image_slots=image_slots,
        image_start=image_start,
        next_pos=start_pos + ends[:, -1],
    )


def naavit_mask(
    query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor, self_key_index: torch.Tensor | None
) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S): True where query t may attend to key s.

    A query sees every valid key whose position is <= its own. `self_key_index` (T,) names each query's own key
    column; it is always allowed, so padding and placeholder rows never see an empty row (no NaN), while staying
    invisible to every other query (their keys are invalid).
    """
    mask = (key_pos.unsqueeze(1) <= query_pos.unsqueeze(2)) & key_valid.unsqueeze(1)  # (B, T, S)
    if self_key_index is not None:  # a comparison, not an indexed write: no host value enters a CUDA graph
        columns = torch.arange(key_pos.shape[1], device=key_pos.device)
        mask = mask | (columns.unsqueeze(0) == self_key_index.unsqueeze(1))
    return mask.unsqueeze(1)


def naavit_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """SDPA with an explicit mask. query (B, Hq, T, D), key/value (B, Hkv, S, D), mask (B, 1, T, S) -> (B, T, Hq*D)."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # GQA: repeat K/V heads (enable_gqa is not supported by every backend with a mask)
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).flatten(2)
