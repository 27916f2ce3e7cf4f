"""SAISA's visual path: every layer's visual keys/values from Z, up front, in batched form (paper Eq. 6-7).

Unusual here: visual work does not depend on the text, so it is done before any text layer runs, a chunk of layers
at a time: one bmm per projector linear for the chunk, then the keys/values. For inference, `fold_kv_weights` stacks
each layer's k_proj/v_proj with its input-norm weight folded in, so a chunk's K/V is one more bmm and the RMS scale,
RoPE and the copies are done once for all the chunk's layers instead of per layer. On CUDA the chunks can run on a
side stream with one event per chunk, so the compute-bound visual path overlaps the memory-bound text layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .decoder import query_key_value, rope
from .naavit import SequenceLayout


@dataclass
class FoldedKV:
    """k_proj/v_proj of all layers stacked, input-norm weight folded in: (n, 2k, h), bias (n, 2k) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    kv_dim: int
    head_dim: int


@torch.no_grad()
def fold_kv_weights(layers: nn.ModuleList) -> FoldedKV:
    """W_i = [W_k; W_v] diag(gamma_i): RMSNorm(x) W^T == rms_scale(x) W_i^T (the norm's weight folded in)."""
    weights, biases = [], []
    for layer in layers:
        attn = layer.self_attn
        if getattr(attn, "k_norm", None) is not None:
            raise ValueError("folding is not defined for per-head k norms (Qwen3); use the unfolded path")
        gamma = layer.input_layernorm.weight
        weights.append(torch.cat([attn.k_proj.weight, attn.v_proj.weight]) * gamma)
        if attn.k_proj.bias is not None:
            biases.append(torch.cat([attn.k_proj.bias, attn.v_proj.bias]))
    norm = layers[0].input_layernorm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    attn = layers[0].self_attn
    return FoldedKV(
        weight=torch.stack(weights),
        bias=torch.stack(biases) if biases else None,
        eps=eps,
        kv_dim=attn.k_proj.out_features,
        head_dim=attn.head_dim,
    )


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _place(projected: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """(c, N, v, h) per image -> (c, B, I*v, h) in each sample's image slots (empty slots read image 0, masked)."""
    return projected[:, layout.image_slots.clamp(min=0)].flatten(2, 3)


def saisa_visual_kv(
    layers: nn.ModuleList,
    projector: nn.Module,
    features: torch.Tensor,
    layout: SequenceLayout,
    cos: torch.Tensor,
    sin: torch.Tensor,
    folded: FoldedKV | None = None,
    chunk: int | None = None,
    stream: torch.cuda.Stream | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.cuda.Event | None]]:
    """Per-layer visual (K, V), each (B, Hkv, I*v, D) rotated at the images' positions, and per-layer events that
    the text layer must wait on (None when computed on the current stream)."""
    n = len(layers)
    chunk = chunk or n
    main = torch.cuda.current_stream() if stream is not None else None
    if stream is not None:
        stream.wait_stream(main)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    events: list[torch.cuda.Event | None] = []
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        with torch.cuda.stream(stream) if stream is not None else _null():
            visual = _place(projector(features, layers=sl), layout)  # (c, B, Sv, h)
            if folded is not None:
                part = _folded_chunk(visual, folded, sl, cos, sin)
            else:
                part = []
                for j, i in enumerate(range(sl.start, sl.stop)):
                    normed = layers[i].input_layernorm(visual[j])
                    _, k, v = query_key_value(layers[i], normed, cos, sin, with_query=False)
                    part.append((k, v))
            event = None
            if stream is not None:
                for k, v in part:  # allocated on the side stream, used on the main one
                    k.record_stream(main)
                    v.record_stream(main)
                event = torch.cuda.Event()
                event.record(stream)
        kv.extend(part)
        events.extend([event] * len(part))
    return kv, events


def _folded_chunk(visual, folded: FoldedKV, sl: slice, cos, sin) -> list[tuple[torch.Tensor, torch.Tensor]]:
    c, batch, sv, h = visual.shape
    x = _rms_scale(visual, folded.eps).reshape(c, batch * sv, h)
    w = folded.weight[sl].transpose(1, 2)
    out = torch.bmm(x, w) if folded.bias is None else torch.baddbmm(folded.bias[sl].unsqueeze(1), x, w)
    out = out.view(c, batch, sv, 2, -1, folded.head_dim)  # (c, B, Sv, 2, Hkv, D)
    keys = out[:, :, :, 0].permute(0, 1, 3, 2, 4)  # (c, B, Hkv, Sv, D)
    values = out[:, :, :, 1].permute(0, 1, 3, 2, 4)
    keys = rope(keys.flatten(0, 1), cos.repeat(c, 1, 1), sin.repeat(c, 1, 1)).view_as(keys)
    return [(keys[j], values[j]) for j in range(c)]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
