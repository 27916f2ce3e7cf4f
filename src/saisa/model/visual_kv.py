"""SAISA's visual path: every layer's visual keys/values from Z, up front, in batched form (paper Eq. 6-7).

Unusual here: visual work does not depend on the text, so it is done before any text layer runs, a chunk of layers
at a time: one bmm per projector linear for the chunk, then the keys/values. For inference, `fold_kv_weights` stacks
each layer's k_proj/v_proj with its input-norm weight folded in, so a chunk's K/V is one more bmm and the RMS scale,
RoPE and the copies are done once for all the chunk's layers (fused.visual_kv_chunk) instead of per layer. On CUDA the chunks can run on a
side stream with one event per chunk, so the compute-bound visual path overlaps the memory-bound text layers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .decoder import apply_rope
from .fused import rms_norm, visual_kv_chunk
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
    folded_fn: Callable = visual_kv_chunk,
    heads_first: bool = True,
    text_len: int = 0,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.cuda.Event | None]]:
    """Per-layer visual (K, V) rotated at the images' positions, (B, Hkv, I*v, D) (or (B, I*v, Hkv, D) with
    `heads_first=False`, folded path only), and per-layer events the text layer must wait on (None when computed
    on the current stream). With `folded`, each chunk is `folded_fn` (fused.visual_kv_chunk, or its compiled
    version), and `text_len` > 0 leaves that many rows after the visual ones for the text keys/values (see
    fused.text_layer_step); without, the reference: each layer's own input norm, k_proj/v_proj and RoPE."""
    n = len(layers)
    chunk = chunk or n
    main = torch.cuda.current_stream() if stream is not None else None
    # Made on the main stream BEFORE the side stream's wait, and kept alive for it: the side stream reads it
    # (computed after the wait, or freed on return, it could be read before it is written or after it is reused).
    slots = layout.image_slots.clamp(min=0)
    if stream is not None:
        stream.wait_stream(main)
        slots.record_stream(stream)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    events: list[torch.cuda.Event | None] = []
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if folded is not None:
                keys, values = folded_fn(
                    features, slots, *projector_weights(projector, sl), folded.weight[sl],
                    None if folded.bias is None else folded.bias[sl], cos, sin, sl.stop - sl.start, folded.eps,
                    folded.head_dim, text_len,
                )  # (c, B, Sv + text_len, Hkv, D)
                if heads_first:
                    keys, values = keys.transpose(2, 3), values.transpose(2, 3)
                part = list(zip(keys.unbind(0), values.unbind(0)))
            else:
                visual = _place(projector(features, layers=sl), layout)  # (c, B, Sv, h)
                part = stacked_key_value(layers[sl], visual, cos, sin)
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


def stacked_key_value(layers: nn.ModuleList | list, visual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's input norm, k_proj/v_proj (+ Qwen3's k norm) and RoPE on its visual tokens (c, B, Sv, h), as
    batched ops over the c layers (stacked weights, differentiable): (K, V) (B, Hkv, Sv, D) per layer.

    The same function as `query_key_value(layer, layer.input_layernorm(visual[j]), ...)` layer by layer, which the
    training path used to run: ~15 small kernels per layer forward and twice that backward (a training step at batch
    8 was launch-bound), and indexing `visual[j]` made autograd fill and add a full-size gradient per layer.
    """
    first = layers[0]
    attn, norm = first.self_attn, first.input_layernorm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    c, batch, sv, h = visual.shape
    weights = torch.stack([layer.input_layernorm.weight for layer in layers])[:, None, None]
    normed = rms_norm(visual, weights, eps).reshape(c, batch * sv, h)

    def project(name: str) -> torch.Tensor:  # (c, B, H, Sv, D)
        projs = [getattr(layer.self_attn, name) for layer in layers]
        out = torch.bmm(normed, torch.stack([p.weight for p in projs]).transpose(1, 2))
        if projs[0].bias is not None:
            out = out + torch.stack([p.bias for p in projs]).unsqueeze(1)
        return out.view(c, batch, sv, -1, attn.head_dim).transpose(2, 3)

    key, value = project("k_proj"), project("v_proj")
    if getattr(attn, "k_norm", None) is not None:  # Qwen3: RMSNorm over each head's D, then RoPE
        k_eps = getattr(attn.k_norm, "variance_epsilon", getattr(attn.k_norm, "eps", 1e-6))
        key = rms_norm(key, torch.stack([layer.self_attn.k_norm.weight for layer in layers])[:, None, None, None],
                       k_eps)
    key = apply_rope(key, cos[None, :, None], sin[None, :, None])
    return list(zip(key.unbind(0), value.unbind(0)))


def projector_weights(projector: nn.Module, layers: slice) -> tuple[torch.Tensor | None, ...]:
    """(w1, b1, w2, b2) of the projector MLPs of `layers` (the one shared MLP when it is shared)."""
    pick = (lambda p: p if p is None or projector.num_mlps == 1 else p[layers])  # noqa: E731
    lin2 = getattr(projector, "linear_2", None)
    return (pick(projector.linear_1.weight), pick(projector.linear_1.bias),
            pick(None if lin2 is None else lin2.weight), pick(None if lin2 is None else lin2.bias))
