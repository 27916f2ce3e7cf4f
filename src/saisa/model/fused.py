"""Inference fast path: a decoder layer's text step and a chunk of SAISA's visual path as pure tensor functions.

Unusual here: the functions take weights as arguments instead of modules, so `torch.compile` (dynamic shapes) traces
each of them ONCE and the same compiled kernels serve all n layers; elementwise work (RMSNorm, RoPE, SiLU*up,
residuals, the K/V concatenation) fuses into a few kernels per layer instead of ~30 eager launches. Numerics follow
transformers' Llama modules (norm in fp32, cast, then scale by the weight); `tests/test_model.py` checks the result
equals the reference path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import apply_rope


class TextLayer(NamedTuple):
    """The tensors of one Llama-family decoder layer (biases and q/k norms optional); a NamedTuple, so a compiled
    function guards on shapes and dtypes, never on which layer's tensors it was given."""

    ln1: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    ln2: torch.Tensor
    wg: torch.Tensor
    wu: torch.Tensor
    wd: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    qn: torch.Tensor | None
    kn: torch.Tensor | None


def supports_fused(layer: nn.Module) -> bool:
    """The fused step covers SiLU-gated MLPs (Llama, Mistral, Qwen2/3, SmolLM2)."""
    mlp = layer.mlp
    act = type(getattr(mlp, "act_fn", None)).__name__  # nn.SiLU, or transformers' SiLUActivation
    return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU", "SiLUActivation")


def text_layer_tensors(layer: nn.Module) -> TextLayer:
    a, m = layer.self_attn, layer.mlp
    norm = lambda name: getattr(getattr(a, name, None), "weight", None)  # noqa: E731
    return TextLayer(
        ln1=layer.input_layernorm.weight, wq=a.q_proj.weight, wk=a.k_proj.weight, wv=a.v_proj.weight,
        wo=a.o_proj.weight, ln2=layer.post_attention_layernorm.weight, wg=m.gate_proj.weight,
        wu=m.up_proj.weight, wd=m.down_proj.weight, bq=a.q_proj.bias, bk=a.k_proj.bias, bv=a.v_proj.bias,
        qn=norm("q_norm"), kn=norm("k_norm"),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm as a function: normalise in fp32, cast back, then scale (weight None: no scale)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


def text_layer_step(
    hidden: torch.Tensor,  # (B, T, h)
    vis_k: torch.Tensor,  # (B, Sv + T, Hkv, D): this layer's rotated visual keys, then room for the T text keys
    vis_v: torch.Tensor,  # (B, Sv + T, Hkv, D)
    mask: torch.Tensor,  # (B, 1, T, Sv + T) bool
    cos: torch.Tensor,  # (B, T, D)
    sin: torch.Tensor,
    w: TextLayer,
    eps: float,
    head_dim: int,
) -> torch.Tensor:
    """One NAAViT layer for text queries: attention over [visual; text] keys, then the FFN. Returns (B, T, h).

    Keys and values stay in (B, S, H, D) layout, so attention reads transposed views. vis_k/vis_v come from
    `visual_kv_chunk(text_len=T)`: this layer's text keys/values are written into their last T rows in place and
    attention reads the buffers as they are (a new [visual; text] tensor per layer cost ~28 us at Sv = 576 on an
    H100, copying the visual rows again).
    """
    b, t, _ = hidden.shape
    x = rms_norm(hidden, w.ln1, eps)
    q = F.linear(x, w.wq, w.bq).view(b, t, -1, head_dim)
    k = F.linear(x, w.wk, w.bk).view(b, t, -1, head_dim)
    v = F.linear(x, w.wv, w.bv).view(b, t, -1, head_dim)
    if w.qn is not None:
        q, k = rms_norm(q, w.qn, eps), rms_norm(k, w.kn, eps)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if vis_k.shape[1] != mask.shape[-1]:
        raise ValueError(f"visual keys have {vis_k.shape[1]} rows; expected Sv + T = {mask.shape[-1]} "
                         "(visual_kv_chunk(text_len=T) leaves room for the text rows)")
    vis_k[:, -t:] = k
    vis_v[:, -t:] = v
    k, v = vis_k.transpose(1, 2), vis_v.transpose(1, 2)  # (B, Hkv, Sv + T, D) views
    q = q.transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
    hidden = hidden + F.linear(attn.transpose(1, 2).reshape(b, t, -1), w.wo)
    x = rms_norm(hidden, w.ln2, eps)
    return hidden + F.linear(F.silu(F.linear(x, w.wg)) * F.linear(x, w.wu), w.wd)


def visual_kv_chunk(
    features: torch.Tensor,  # (N, v, d)
    slots: torch.Tensor,  # (B, I) image index per slot (clamped >= 0)
    w1: torch.Tensor,  # (c, h, d) projector linear_1 (c layers, or 1 shared)
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,  # (c, h, h) linear_2, None for a linear projector
    b2: torch.Tensor | None,
    wkv: torch.Tensor,  # (c, 2k, h) folded k/v projections of the chunk's layers
    bkv: torch.Tensor | None,
    cos: torch.Tensor,  # (B, Sv, D)
    sin: torch.Tensor,
    layers: int,
    eps: float,
    head_dim: int,
    text_len: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V_i = MLP_i(Z) for `layers` layers, then their rotated visual K/V: each (c, B, Sv + text_len, Hkv, D), the
    visual rows first; the last `text_len` rows are left for `text_layer_step` to fill (zeros until then)."""
    n_img, v, d = features.shape
    z = features.reshape(1, n_img * v, d)
    x = torch.bmm(z.expand(w1.shape[0], -1, -1), w1.transpose(1, 2))
    if b1 is not None:
        x = x + b1.unsqueeze(1)
    if w2 is not None:
        x = torch.bmm(F.gelu(x), w2.transpose(1, 2))
        if b2 is not None:
            x = x + b2.unsqueeze(1)
    x = x.view(x.shape[0], n_img, v, -1)[:, slots].flatten(2, 3)  # (c|1, B, Sv, h)
    if x.shape[0] == 1 and layers > 1:
        x = x.expand(layers, -1, -1, -1)
    c, batch, sv, h = x.shape
    x = rms_norm(x, None, eps).reshape(c, batch * sv, h)  # the norm's weight is folded into wkv
    kv = torch.bmm(x, wkv.transpose(1, 2))
    if bkv is not None:
        kv = kv + bkv.unsqueeze(1)
    kv = kv.view(c, batch, sv, 2, -1, head_dim)
    keys = apply_rope(kv[:, :, :, 0], cos.unsqueeze(0).unsqueeze(3), sin.unsqueeze(0).unsqueeze(3))
    values = kv[:, :, :, 1]
    if text_len:
        room = keys.new_zeros(c, batch, text_len, *keys.shape[3:])
        keys, values = torch.cat([keys, room], dim=2), torch.cat([values, room], dim=2)
    return keys, values
