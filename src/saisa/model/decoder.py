"""Llama-family decoder layers driven piecewise: projections, RoPE, attention and FFN called on chosen tokens only.

Unusual here: we never call an HF decoder layer's `forward`. We reuse its modules (`input_layernorm`,
`self_attn.{q,k,v,o}_proj`, optional `q_norm`/`k_norm` of Qwen3, `post_attention_layernorm`, `mlp`) so that weights
keep their HF names, and apply them to exactly the tokens each architecture needs: visual tokens get only K/V
projections under SAISA and NAAViT, and an FFN only under NAAViT and LLaVA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from saisa.config import SUPPORTED_TEXT_MODEL_TYPES

from .naavit import naavit_attention

_REQUIRED = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTN_REQUIRED = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_decoder(language_model: nn.Module) -> None:
    """Fail clearly when the backbone does not have the Llama module layout this file drives."""
    model_type = getattr(language_model.config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(f"unsupported LLM backbone {model_type!r}; supported: {SUPPORTED_TEXT_MODEL_TYPES}")
    layer = language_model.model.layers[0]
    missing = [n for n in _REQUIRED if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in _ATTN_REQUIRED if not hasattr(layer.self_attn, n)]
    if missing:
        raise ValueError(f"{type(layer).__name__} lacks {missing}: not the Llama module layout saisa supports")
    for i, kind in enumerate(getattr(language_model.config, "layer_types", None) or []):
        if kind not in (None, "full_attention"):
            raise ValueError(
                f"layer {i} of the backbone uses {kind!r}; saisa implements full attention only (disable "
                f"sliding-window attention in the text config, e.g. use_sliding_window=False)"
            )


def _heads(attn: nn.Module, x: torch.Tensor, proj: nn.Module, norm_name: str) -> torch.Tensor:
    """(B, T, h) -> (B, H, T, D) through one projection, with Qwen3's per-head q/k norm where the layer has one."""
    out = proj(x).unflatten(-1, (-1, attn.head_dim))  # (B, T, H, D)
    norm = getattr(attn, norm_name, None)
    if norm is not None:
        out = norm(out)
    return out.transpose(1, 2)


def apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' rotate-half convention; cos/sin already broadcastable to `states`."""
    return states * cos + rotate_half(states) * sin


def rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by RoPE tables (B, T, D)."""
    return apply_rope(states, cos.unsqueeze(1), sin.unsqueeze(1))


def query_key_value(
    layer: nn.Module, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, with_query: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Q (optional), K, V for already-normed inputs (B, T, h); Q and K rotated at their positions."""
    attn = layer.self_attn
    key = rope(_heads(attn, normed, attn.k_proj, "k_norm"), cos, sin)
    value = attn.v_proj(normed).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
    query = rope(_heads(attn, normed, attn.q_proj, "q_norm"), cos, sin) if with_query else None
    return query, key, value


def attention_block(
    layer: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """o_proj(attention): the residual update of the queries' hidden states, (B, T, h)."""
    attn = layer.self_attn
    return attn.o_proj(naavit_attention(query, key, value, mask, attn.scaling))


def feed_forward(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """h <- h + FFN(norm(h))."""
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
