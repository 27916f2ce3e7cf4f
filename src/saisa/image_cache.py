"""ImageKVCache: every layer's visual keys/values of an image, kept across requests so a repeat image costs nothing.

Unusual here: under SAISA (and NAAViT) an image's keys/values in every layer depend only on the image and on where
it sits in RoPE-position space, never on the text around it (paper Eq. 6-7: V_i = MLP_i(Z) enters layer i's
attention directly). So an entry keyed by (model, image content, start position) is exact, and a hit skips the
vision tower, the projector and all K/V projections. Under LLaVA the visual tokens are queries too and their keys in
layers > 0 depend on the text before them, so the engine does not consult this cache for `architecture="llava"`.

Entries live in an `OrderedDict` as an LRU bounded in bytes; `stats()` reports hits, misses, evictions, bytes and the
seconds spent computing the misses (what a hit saves, on average).
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class ImageKV:
    """One image's visual keys/values in every layer, rotated at positions start .. start + v - 1."""

    keys: torch.Tensor  # (n_layers, Hkv, v, D)
    values: torch.Tensor  # (n_layers, Hkv, v, D)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def image_digest(pixels: torch.Tensor) -> str:
    """sha256 of one preprocessed image's bytes, shape and dtype (a content key independent of the file's name)."""
    t = pixels.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(model: nn.Module) -> tuple:
    """(instance token, weights version, config digest, dtype, device) for `model`.

    The token is a uuid stored on the instance (an `id()` may be reused after garbage collection); the version sums
    the parameters' in-place modification counters, so loading or editing weights invalidates earlier entries.
    """
    token = getattr(model, "_saisa_identity", None)
    if token is None:
        token = uuid.uuid4().hex
        model._saisa_identity = token  # a plain attribute: not a parameter, not saved
    params = list(model.parameters())
    version = sum(p._version for p in params)
    config = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]
    return token, version, config, str(params[0].dtype), str(params[0].device)


class ImageKVCache:
    """LRU of `ImageKV` entries keyed by (model identity, image digest, start position), bounded by `max_bytes`.

    `device`: where entries are stored (None: where they were computed; "cpu" trades GPU memory for a copy per hit).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, device: str | torch.device | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.device = device
        self._entries: OrderedDict[tuple, ImageKV] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.miss_seconds = 0.0  # time spent computing missed entries (vision tower + projector + K/V)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> ImageKV | None:
        """The entry for `key` (marked most recently used) or None; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, entry: ImageKV) -> None:
        """Store `entry`, evicting least recently used ones to stay within `max_bytes` (a too-large one is skipped)."""
        if entry.nbytes > self.max_bytes:
            return
        if self.device is not None:
            entry = ImageKV(entry.keys.to(self.device), entry.values.to(self.device))
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self._entries and self.bytes + entry.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = entry
        self.bytes += entry.nbytes

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else 0.0,
            "evictions": self.evictions,
            "miss_seconds": self.miss_seconds,
            "seconds_per_miss": self.miss_seconds / self.misses if self.misses else 0.0,
        }

    def __repr__(self) -> str:
        s = self.stats()
        return (f"ImageKVCache({s['entries']} entries, {s['bytes'] / 2**20:.1f}/{s['max_bytes'] / 2**20:.0f} MiB, "
                f"hits={s['hits']} misses={s['misses']} evictions={s['evictions']}, "
                f"{1e3 * s['seconds_per_miss']:.2f} ms per miss)")
