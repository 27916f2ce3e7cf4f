"""SaisaCache: per-layer keys/values laid out [visual slots; text], each key tagged with its RoPE position.

Unusual here: because NAAViT masks by position (see naavit.py), the cache is an append-only list of keys plus their
positions and validity; a decode step needs no knowledge of where images were. Its length equals LLaVA's KV cache
(v keys per image, one per text token), so decoding costs the same under every architecture. The same property lets
the engine (saisa.generate) fill it out of order: a block of stored visual keys can be appended at any time, and
queries only see it once their own position passes the block's.
"""

from __future__ import annotations

import torch


class SaisaCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each (B, Hkv, S, D)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_pos: torch.Tensor | None = None  # (B, S) long
        self.key_valid: torch.Tensor | None = None  # (B, S) bool
        self.next_pos: torch.Tensor | None = None  # (B,) long

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def get_seq_length(self) -> int:
        return 0 if self.key_pos is None else int(self.key_pos.shape[1])

    def append_positions(self, key_pos: torch.Tensor, key_valid: torch.Tensor, next_pos: torch.Tensor) -> None:
        if self.key_pos is None:
            self.key_pos, self.key_valid = key_pos, key_valid
        else:
            self.key_pos = torch.cat([self.key_pos, key_pos], dim=1)
            self.key_valid = torch.cat([self.key_valid, key_valid], dim=1)
        self.next_pos = next_pos

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for `layer`; return all of them."""
        if self.keys[layer] is not None:
            key = torch.cat([self.keys[layer], key], dim=2)
            value = torch.cat([self.values[layer], value], dim=2)
        self.keys[layer], self.values[layer] = key, value
        return key, value

    def append_block(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        key_pos: torch.Tensor,
        key_valid: torch.Tensor,
        next_pos: torch.Tensor,
    ) -> None:
        """Append precomputed keys/values (already RoPE-rotated at `key_pos`) to every layer at once.

        keys[i], values[i]: (B, Hkv, T, D); key_pos (B, T) long; key_valid (B, T) bool; next_pos (B,).
        """
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"append_block got {len(keys)} layers of keys for a {self.num_layers}-layer cache")
        for i, (k, v) in enumerate(zip(keys, values)):
            self.update(i, k, v)
        self.append_positions(key_pos, key_valid, next_pos)

    def nbytes(self) -> int:
        """Bytes held by the keys and values of all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
