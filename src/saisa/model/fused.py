"""Inference fast path: a decoder layer's text step and a chunk of SAISA's visual path as pure tensor functions.

Unusual here: the functions take weights as arguments instead of modules, so `torch.compile` (dynamic shapes) traces
each of them ONCE and the same compiled kernels serve all n layers; elementwise work (RMSNorm, RoPE, SiLU*up,
residuals) fuses into a few kernels per layer instead of ~30 eager launches. The visual chunk stops at each layer's
normalised visual inputs; the text step projects them together with its text rows, one k/v GEMM per layer (see
text_layer_step). Numerics follow transformers' Llama modules (norm in fp32, cast, then scale by the weight), except
that k/v use the norm weight folded into W_k/W_v; `tests/test_model.py` checks the result equals the reference path.
Attention has three interchangeable forms in torch (`attend`): at batch 1 a fused SDPA kernel gives each head's few
text queries one tile, so 32 blocks loop over the keys on a 132-SM H100, where two batched matmuls and a softmax
spread the same work over the whole GPU (20 against 13 us per layer at t=64: profile-prefill-h100-t64.json); on CUDA
text_attention's Triton kernels do RoPE, attention and the merge of key spans in two launches (ATTENTION "triton").
`skinny_layer_step` is the same layer with no norm kernel (STEP "skinny"): each RMSNorm's division by the row's RMS
is deferred into the kernels that read its output, and the sums of squares come from the GEMM before it; on Hopper
its kernels, all but the k/v GEMM, are programmatic dependent launches that overlap the end of the one before.
For one sample with one image it reads `visual_rows_chunk`'s rows: the projector's last GEMM writes them in place,
before its bias and the norm, and attention adds the bias's k/v and divides (no normalised copy is written).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import skinny, text_attention
from .decoder import apply_rope

ATTEND = ("sdpa", "eager", "flex")  # the forms of `attend`
ATTENTION = (*ATTEND, "triton")  # text_layer_step's: attend's, or text_attention's kernels
FFN = ("aten", "triton")  # the forms of the FFN's first half: two GEMMs and SiLU * up, or skinny.gate_up's kernel
STEP = ("compiled", "skinny")  # a text layer as text_layer_step under torch.compile, or skinny_layer_step
GELU = ("exact", "tanh")  # the projector MLP's GELU in the fast path: LLaVA's erf form, or the tanh approximation


class TextLayer(NamedTuple):
    """The tensors of one Llama-family decoder layer for the fused step (biases optional); a NamedTuple, so a compiled
    function guards on shapes and dtypes, never on which layer's tensors it was given. wkv/bkv: the layer's folded
    [W_k; W_v] diag(ln1) and [b_k; b_v] (visual_kv.fold_kv_weights), which serve its visual and text rows alike."""

    ln1: torch.Tensor
    wq: torch.Tensor
    bq: torch.Tensor | None
    wkv: torch.Tensor
    bkv: torch.Tensor | None
    wo: torch.Tensor
    ln2: torch.Tensor
    wg: torch.Tensor
    wu: torch.Tensor
    wd: torch.Tensor


def supports_fused(layer: nn.Module) -> bool:
    """The fused step covers SiLU-gated MLPs (Llama, Mistral, Qwen2/3, SmolLM2)."""
    mlp = layer.mlp
    act = type(getattr(mlp, "act_fn", None)).__name__  # nn.SiLU, or transformers' SiLUActivation
    return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU", "SiLUActivation")


def text_layer_tensors(layer: nn.Module, wkv: torch.Tensor, bkv: torch.Tensor | None) -> TextLayer:
    """`layer`'s tensors, with its folded k/v projection (one layer's slice of visual_kv.FoldedKV)."""
    a, m = layer.self_attn, layer.mlp
    return TextLayer(
        ln1=layer.input_layernorm.weight, wq=a.q_proj.weight, bq=a.q_proj.bias, wkv=wkv, bkv=bkv,
        wo=a.o_proj.weight, ln2=layer.post_attention_layernorm.weight, wg=m.gate_proj.weight,
        wu=m.up_proj.weight, wd=m.down_proj.weight,
    )


TILED = ("wq", "wo", "wg", "wu", "wd")  # the TextLayer weights tiled_text_layer lays out for skinny's kernels


def tiled_text_layer(w: TextLayer) -> TextLayer | None:
    """`w` with copies of q/o_proj, gate/up_proj and down_proj's weights laid out as skinny's kernels read them
    (skinny.tile, for the tiles skinny_layer_step runs them with: RESIDUAL and GATE_UP share block sizes); None
    where one of them does not tile into those blocks."""
    if skinny.RESIDUAL[:2] != skinny.GATE_UP[:2]:
        raise ValueError("skinny.RESIDUAL and skinny.GATE_UP tile weights differently: tile each for its own")
    if not all(skinny.tiles_evenly(getattr(w, n), skinny.RESIDUAL) for n in TILED):
        return None
    return w._replace(**{n: skinny.tile(getattr(w, n), skinny.RESIDUAL) for n in TILED})


def rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS of x's rows in fp32 (..., h) -> (...), as transformers' LlamaRMSNorm computes it."""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm as a function: normalise in fp32, cast back, then scale (weight None: no scale)."""
    x32 = x.float()
    normed = (x32 * rstd(x32, eps).unsqueeze(-1)).to(x.dtype)
    return normed if weight is None else weight * normed


def key_value(kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output of a folded [W_k; W_v] (..., S, 2k) -> keys rotated by cos/sin (..., S, D) and values, each
    (..., S, Hkv, D); the values are a view of `kv`."""
    kv = kv.unflatten(-1, (2, -1, head_dim))  # (..., S, 2, Hkv, D)
    return apply_rope(kv[..., 0, :, :], cos.unsqueeze(-2), sin.unsqueeze(-2)), kv[..., 1, :, :]


def text_layer_step(
    hidden: torch.Tensor,  # (B, T, h)
    delta: torch.Tensor,  # (B, T, h): the previous layer's FFN output, not yet added to `hidden` (zeros at layer 0)
    inputs: torch.Tensor,  # (B, Sv + T, h): this layer's unit-RMS visual inputs, then room for the T text rows
    attn_bias: torch.Tensor,  # (B, 1, T, Sv + T): 0 where a query may attend to a key, -inf elsewhere
    cos: torch.Tensor,  # (B, Sv + T, D): the keys' positions, visual then text
    sin: torch.Tensor,
    w: TextLayer,
    eps: float,
    head_dim: int,
    attention: str = "sdpa",
    ffn: str = "aten",
    rope_half: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One NAAViT layer for text queries: attention over [visual; text] keys, then the FFN. Returns the layer's
    output as two (B, T, h) terms, (hidden, delta), whose sum is its hidden state: the residual add is left to the
    next layer's first kernel (its input norm), one elementwise kernel per layer fewer; the caller adds the last.

    `inputs` comes from `visual_inputs_chunk(text_len=T)`. The text rows' unit-RMS inputs are written into its last
    T rows in place, and ONE GEMM with the folded [W_k; W_v] diag(ln1) gives the keys/values of visual and text rows
    alike: the layer's k/v weights are read once, not once for the visual rows and again for the text rows (the
    text GEMMs are memory-bound at batch 1). Writing in place, not concatenating, saves copying the visual rows
    per layer. Keys and values stay in (B, S, H, D) layout, so attention reads transposed views. `attn_bias` is
    the float form SDPA turns a boolean mask into, made once per forward instead of once per layer. `attention`
    names the form of `attend`, or "triton": text_attention's kernels (only where `text_attention.supported`; they
    rotate q and k as they read them; rope_half: cos/sin repeat their first half); `ffn` the FFN's first half (FFN;
    "triton" only where `skinny.supported`).
    """
    b, t, _ = hidden.shape
    if inputs.shape[1] != attn_bias.shape[-1]:
        raise ValueError(f"visual inputs have {inputs.shape[1]} rows; expected Sv + T = {attn_bias.shape[-1]} "
                         "(visual_inputs_chunk(text_len=T) leaves room for the text rows)")
    hidden = hidden + delta
    unit = rms_norm(hidden, None, eps)
    inputs[:, -t:] = unit
    kv = F.linear(inputs, w.wkv, w.bkv)  # (B, Sv + T, 2k): keys, then values
    q = F.linear(w.ln1 * unit, w.wq, w.bq)  # w.ln1 * unit == rms_norm(hidden, w.ln1)
    if attention == "triton":
        attn = text_attention.text_attention_op(q, kv, cos, sin, attn_bias, head_dim, rope_half)  # (B, T, Hq * D)
    else:
        k, v = key_value(kv, cos, sin, head_dim)  # (B, Sv + T, Hkv, D)
        q = apply_rope(q.view(b, t, -1, head_dim), cos[:, -t:].unsqueeze(2), sin[:, -t:].unsqueeze(2))
        k, v, q = k.transpose(1, 2), v.transpose(1, 2), q.transpose(1, 2)  # (B, H, S, D) views
        attn = attend(q, k, v, attn_bias, head_dim**-0.5, attention).transpose(1, 2).reshape(b, t, -1)
    hidden = hidden + F.linear(attn, w.wo)
    x = rms_norm(hidden, w.ln2, eps)
    if ffn == "triton":
        return hidden, F.linear(skinny.gate_up_op(x, w.wg, w.wu), w.wd)
    return hidden, F.linear(F.silu(F.linear(x, w.wg)) * F.linear(x, w.wu), w.wd)


def skinny_supported(hidden: torch.Tensor, w: TextLayer, head_dim: int) -> bool:
    """Whether `skinny_layer_step` can run a layer on these rows: its kernels serve them (skinny.supported for
    q/o/down_proj, gate/up, text_attention.supported) and no q/k/v bias (the RMS division it defers to
    attention commutes with the projections, not with a bias)."""
    rows = hidden.numel() // hidden.shape[-1]
    return (w.bq is None and w.bkv is None and text_attention.supported(hidden, w.wkv, head_dim)
            and skinny.supported(hidden, w.wg, w.wu, tiles=skinny.GATE_UP)
            and all(skinny.fits(rows, skinny.weight_shape(w_)[1], hidden, w_, tiles=skinny.RESIDUAL)
                    for w_ in (w.wq, w.wo, w.wd)))


def skinny_layer_step(
    hidden: torch.Tensor,  # (B, T, h): the residual stream
    x_ln: torch.Tensor,  # (B, T, h): hidden * the input norm's weight, not yet divided by the rows' RMS
    row_sums: torch.Tensor,  # (B*T,) fp32: the sums of hidden^2 per row (skinny.linear_residual)
    sums: torch.Tensor,  # (2, B*T) fp32 zeros: this layer's o_proj and down_proj add their rows' sums into them
    inputs: torch.Tensor,  # (B, Sv + T, h): unit-RMS visual inputs, then `hidden` in the last T rows
    next_rows: torch.Tensor | None,  # (B, T, h): the next layer's `inputs` text rows, written here; None: last layer
    attn_bias: torch.Tensor,  # (B, 1, T, Sv + T)
    cos: torch.Tensor,  # (B, Sv + T, D)
    sin: torch.Tensor,
    w: TextLayer,
    next_ln1: torch.Tensor | None,  # the next layer's input-norm weight (None: last layer)
    eps: float,
    head_dim: int,
    rope_half: bool = False,
    pdl: bool = False,
    prefetch: int = skinny.PREFETCH,
    vis_rstd: torch.Tensor | None = None,
    kv_bias: torch.Tensor | None = None,
    beside: tuple[Callable, Callable] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`text_layer_step`'s function in six kernels, none of them a norm (check `skinny_supported`): the RMSNorms'
    division by each row's RMS is deferred to the kernels that read their output. A row's RMS is a scalar, so it
    commutes with the projections: q, and the text rows' k/v (the folded W_kv diag(ln1) of the layer's one k/v GEMM),
    are projected from the undivided rows and divided inside text_attention; gate/up inside skinny.gate_up. The
    sums of squares come from the previous GEMM's epilogue (skinny.linear_residual, which also adds the residual and
    writes the rows times the next norm's weight, and the next layer's k/v input rows). At batch 1 and t=64 each norm
    is a ~3 us kernel of its own, and so is cuBLAS's split-K reduction of down_proj. Returns the next layer's
    (hidden, x_ln, row_sums); x_ln None after the last layer.

    pdl: every kernel but the k/v GEMM (cuBLAS's) a programmatic dependent launch (skinny.pdl_supported), and
    q_proj a skinny.linear run before the k/v GEMM, so five launches in a row overlap: each kernel's programs take
    the SMs the one before leaves, send the first `prefetch` 128-byte lines of their weight rows to L2 (weights
    do not depend on the kernel before) and wait for its writes.

    vis_rstd, kv_bias: `inputs`' visual rows are `visual_rows_chunk`'s (before linear_2's bias and the norm's
    division); attention adds their k/v bias and divides (text_attention's arguments of those names).

    beside: (fork, join), called after q_proj's launch and after the k/v GEMM's: work for a side stream that runs
    beside the k/v GEMM and that attention waits for (modeling's rows' 1 / RMS).

    The k/v GEMM's output is a temporary: o_proj's programs drop it from L2 unwritten (skinny.linear_residual's
    `dead`) while the attention merge, the kernel before them, still runs. In sessions 17-18 the merge did that
    (8.125 against 8.157 ms for the whole t=64 prefill on an H100 without dropping; benchmarks/results/
    prefill-ab-h100/kv-discard), and its completion, which o_proj waits for, included the discards (8.018
    against 8.045 ms since the move, prefill-ab-h100/discard-in-o-proj).

    `w`'s q/o_proj, gate/up_proj and down_proj weights may be laid out by skinny.tile (tiled_text_layer): the
    kernels then read each program's blocks as contiguous pieces of memory."""
    residual, gate_up = skinny.RESIDUAL._replace(prefetch=prefetch), skinny.GATE_UP._replace(prefetch=prefetch)
    q = skinny.linear(x_ln, w.wq, residual, pdl=pdl) if pdl or w.wq.dim() == 4 else F.linear(x_ln, w.wq)
    if beside is not None:
        beside[0]()
    kv = F.linear(inputs, w.wkv)  # (B, Sv + T, 2k)
    if beside is not None:
        beside[1]()
    attn = text_attention.text_attention(q, kv, cos, sin, attn_bias, head_dim, half_table=rope_half,
                                         row_sums=row_sums, row_dim=hidden.shape[-1], eps=eps, pdl=pdl,
                                         vis_rstd=vis_rstd, kv_bias=kv_bias)
    # kv's last reader is the span kernel: with a merge kernel after it, o_proj's early programs may drop kv
    dead = kv if text_attention.merges(q, kv, head_dim) or not pdl else None
    hidden, x_ln, row_sums = skinny.linear_residual(attn, w.wo, hidden, w.ln2, sums=sums[0], tiles=residual,
                                                    pdl=pdl, dead=dead)
    inner = skinny.gate_up(x_ln, w.wg, w.wu, gate_up, ss=row_sums, eps=eps, pdl=pdl)
    return skinny.linear_residual(inner, w.wd, hidden, next_ln1, rows_out=next_rows, sums=sums[1], tiles=residual,
                                  pdl=pdl)


def skinny_first_inputs(hidden: torch.Tensor, ln1: torch.Tensor, layers: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the first `skinny_layer_step` needs besides `hidden`: (hidden * ln1, the rows' fp32 sums of squares
    (B*T,), zeros (layers, 2, B*T) for every layer's sums); two kernels under torch.compile instead of five."""
    rows = hidden.numel() // hidden.shape[-1]
    return (hidden * ln1, hidden.float().pow(2).sum(-1).flatten(),
            hidden.new_zeros(layers, 2, rows, dtype=torch.float32))


def placed_final_norm(hidden: torch.Tensor, index: torch.Tensor | None, length: int, keep: int,
                      weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The last layer's text rows (B, T, h) back at their `index` (B, T, h) positions in a (B, length, h) sequence,
    zeros at the rows between (index None: the rows are the sequence), then the last `keep` (0: all) through the
    final RMSNorm (transformers' Llama form, `rms_norm`): three kernels under torch.compile instead of eleven."""
    if index is not None:
        hidden = hidden.new_zeros(hidden.shape[0], length, hidden.shape[2]).scatter(1, index, hidden)
    return rms_norm(hidden[:, -keep:] if keep else hidden, weight, eps)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, kind: str = "sdpa"
           ) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for q (B, Hq, T, D), k/v (B, Hkv, S, D) (GQA: Hq a multiple of Hkv), bias
    (B, 1, T, S) (0 or -inf; every row keeps a finite entry) -> (B, Hq, T, D). `kind`:

    - "sdpa": F.scaled_dot_product_attention with the bias as its mask (a fused kernel: cuDNN or memory-efficient);
      K/V heads repeated for GQA.
    - "eager": transformers' eager attention (matmul, scale, bias, fp32 softmax cast back, matmul), with the query
      heads of each K/V head stacked as rows, so GQA needs no K/V copies. Each step is a GPU-wide kernel; under
      inductor the scale, bias and softmax fuse into one.
    - "flex": torch's flex_attention with the bias added by a score_mod (fp32 scores; under inductor one Triton
      kernel, which splits the keys over blocks when the queries are few). Without compile: a dense reference.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if kind == "sdpa":
        if hq > hkv:
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if kind == "eager":
        grouped = q.reshape(b, hkv, hq // hkv * t, d)  # query head j*rep + r reads K/V head j (repeat_interleave)
        scores = torch.matmul(grouped, k.transpose(-1, -2)).unflatten(2, (hq // hkv, t))  # (B, Hkv, rep, T, S)
        scores = scores * scale + bias.unsqueeze(1)
        probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype).flatten(2, 3)
        return torch.matmul(probs, v).view(b, hq, t, d)
    if kind == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        def add_bias(score, batch, head, q_idx, kv_idx):
            return score + bias[batch, 0, q_idx, kv_idx]

        # V contiguous: inductor's CPU flex kernel (torch 2.13) read a strided V view (text_layer_step's) wrongly
        # when K was not a view of the same tensor; the copy is one pointwise kernel.
        return flex_attention(q, k, v.contiguous(), score_mod=add_bias, scale=scale, enable_gqa=hq > hkv)
    raise ValueError(f"unknown attention {kind!r}; choose from {ATTEND}")


@torch.library.custom_op("saisa::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GELU(x w^T + b) in its tanh form: on CUDA one cuBLASLt GEMM whose epilogue adds the bias and applies the
    activation; an operator torch.compile keeps whole (inductor would split it into a GEMM and a pointwise kernel).
    Elsewhere a GEMM and F.gelu(approximate="tanh"): aten's CPU `_addmm_activation` applies the erf form instead."""
    if x.is_cuda:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return F.gelu(F.linear(x, w, b), approximate="tanh")


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def visual_inputs_chunk(
    features: torch.Tensor,  # (N, v, d)
    slots: torch.Tensor,  # (B, I) image index per slot (clamped >= 0)
    w1: torch.Tensor,  # (c, h, d) projector linear_1 (c layers, or 1 shared)
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,  # (c, h, h) linear_2, None for a linear projector
    b2: torch.Tensor | None,
    layers: int,
    eps: float,
    text_len: int = 0,
    gelu: str = "exact",
) -> torch.Tensor:
    """V_i = MLP_i(Z) for `layers` layers, placed in each sample's image slots and RMS-normalised without the norm's
    weight (folded into the k/v projections): (layers, B, Sv + text_len, h). The last `text_len` rows are zeros, room
    for `text_layer_step` to write the text rows into. gelu (GELU): "exact", the erf form LLaVA's projector uses;
    "tanh", its tanh approximation computed in the first GEMM's epilogue (`linear_gelu_tanh`), for an MLP with
    biases: one pass over the (c, N*v, h) activations fewer."""
    if gelu not in GELU:
        raise ValueError(f"unknown gelu {gelu!r}; choose from {GELU}")
    if w2 is None:  # a linear projector: no activation
        x = projector_hidden(features, w1, b1, gelu=None)
    else:
        x = torch.bmm(projector_hidden(features, w1, b1, gelu), w2.transpose(1, 2))  # (c, N*v, h)
        if b2 is not None:
            x = x + b2.unsqueeze(1)
    return _placed_unit_rows(x, slots, features.shape[0], features.shape[1], layers, eps, text_len)


def projector_hidden(features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, gelu: str | None = "exact"
                     ) -> torch.Tensor:
    """GELU(Z W1_i^T + b1_i) for the c MLPs, (c, N*v, h) (a transposed view for the tanh form with b1, whose
    activation is the first GEMM's epilogue): the input of their linear_2. gelu: GELU's form (fused.GELU); None:
    no activation (a linear projector's output)."""
    n_img, v, d = features.shape
    c, h = w1.shape[0], w1.shape[1]
    if gelu == "tanh" and b1 is not None:
        x = linear_gelu_tanh(features.reshape(n_img * v, d), w1.reshape(c * h, d), b1.reshape(c * h))
        return x.view(n_img * v, c, h).transpose(0, 1)
    x = torch.bmm(features.reshape(1, n_img * v, d).expand(c, -1, -1), w1.transpose(1, 2))
    if b1 is not None:
        x = x + b1.unsqueeze(1)
    return x if gelu is None else F.gelu(x, approximate="none" if gelu == "exact" else "tanh")


def rows_rstd(rows: torch.Tensor, b2: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS of rows + b2 (c, R, h) + (c, h) -> (c, R) fp32 (`rstd`)."""
    return rstd(rows + b2.unsqueeze(1), eps)


def visual_rows_chunk(
    features: torch.Tensor,  # (1, v, d): one image
    slots: torch.Tensor,  # (1, 1): that image in the one sample's one slot
    w1: torch.Tensor,  # (c, h, d): c = layers per-layer MLPs
    b1: torch.Tensor | None,
    w2: torch.Tensor,  # (c, h, h)
    b2: torch.Tensor,  # (c, h)
    layers: int,
    eps: float,
    text_len: int = 0,
    hidden: Callable = projector_hidden,
    row_rstd: Callable | None = rows_rstd,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`visual_inputs_chunk` for one sample with one image, per-layer MLPs with a linear_2 bias, as
    `skinny_layer_step` reads it: linear_2's GEMM writes its output, before the bias, straight into each layer's
    k/v input rows (c, 1, v + text_len, h) (the last text_len rows left for the text), and only the rows' 1 / RMS
    with the bias (c, 1, v) fp32 is computed from them. Attention adds W_kv b2 to those rows' keys and values and
    divides by the RMS (text_attention's kv_bias, vis_rstd), so the normalised copy of the rows, a (c, v, h) pass
    read and written, is never made. Takes `visual_inputs_chunk`'s arguments. hidden, row_rstd: `projector_hidden`
    and `rows_rstd`, or their compiled forms; row_rstd None: the 1 / RMS buffer is returned unfilled, for the
    caller to fill layer by layer (skinny.rows_rstd)."""
    if features.shape[0] != 1 or slots.shape != (1, 1) or w1.shape[0] != layers:
        raise ValueError(f"visual_rows_chunk serves one image in one sample's one slot with one MLP per layer; got "
                         f"{features.shape[0]} images, slots {tuple(slots.shape)}, {w1.shape[0]} MLPs for {layers} "
                         "layers (use visual_inputs_chunk)")
    a = hidden(features, w1, b1)  # (c, v, h)
    c, v, h = a.shape
    rows = a.new_empty(c, 1, v + text_len, h)
    torch.bmm(a, w2.transpose(1, 2), out=rows[:, 0, :v])  # cuBLAS writes the strided rows in place
    if row_rstd is None:
        return rows, rows.new_empty(c, 1, v, dtype=torch.float32)
    return rows, row_rstd(rows[:, 0, :v], b2, eps).unsqueeze(1)


def _placed_unit_rows(x: torch.Tensor, slots: torch.Tensor, n_img: int, v: int, layers: int, eps: float,
                      text_len: int) -> torch.Tensor:
    """visual_inputs_chunk's end: the MLPs' output (c, N*v, h) in the samples' image slots, unit RMS, with room."""
    x = x.view(x.shape[0], n_img, v, -1)[:, slots].flatten(2, 3)  # (c|1, B, Sv, h)
    x = rms_norm(x, None, eps).expand(layers, -1, -1, -1)  # a shared MLP: one result for all layers
    if text_len:  # a buffer per layer (each gets its own text rows)
        x = torch.cat([x, x.new_zeros(layers, x.shape[1], text_len, x.shape[3])], dim=2)
    return x


def visual_kv_chunk(
    features: torch.Tensor,  # (N, v, d)
    slots: torch.Tensor,  # (B, I)
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    wkv: torch.Tensor,  # (c, 2k, h) folded k/v projections of the chunk's layers
    bkv: torch.Tensor | None,
    cos: torch.Tensor,  # (B, Sv, D)
    sin: torch.Tensor,
    layers: int,
    eps: float,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated visual K/V of `layers` layers, each (c, B, Sv, Hkv, D): `visual_inputs_chunk`, then one bmm with
    the folded k/v weights and RoPE (for the cache path, where text rows come later, in other forwards)."""
    x = visual_inputs_chunk(features, slots, w1, b1, w2, b2, layers, eps)
    c, batch, sv, h = x.shape
    kv = torch.bmm(x.reshape(c, batch * sv, h), wkv.transpose(1, 2))
    if bkv is not None:
        kv = kv + bkv.unsqueeze(1)
    return key_value(kv.view(c, batch, sv, -1), cos, sin, head_dim)
