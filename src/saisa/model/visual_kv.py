"""SAISA's visual path: every layer's visual keys/values from Z, up front, in batched form (paper Eq. 6-7).

Unusual here: visual work does not depend on the text, so it is done before any text layer runs, a chunk of layers
at a time: one bmm per projector linear for the chunk, then the keys/values. For inference, `fold_kv_weights` stacks
each layer's k_proj/v_proj with its input-norm weight folded in, so a chunk's K/V is one more bmm and the RMS scale,
RoPE and the copies are done once for all the chunk's layers (fused.visual_kv_chunk) instead of per layer. The
compiled prefill stops earlier (`saisa_visual_inputs`): each layer's normalised visual inputs, which its text step
projects together with the text rows. On CUDA the chunks can run on a side stream with one event per chunk, so the
compute-bound visual path can overlap the memory-bound text layers (each GEMM fills the SMs, so little of it does on
an H100: modeling.set_prefill_schedule). In training with per-layer projectors (stage 2),
visual_grad.VisualKeyValue computes all layers' K/V in one autograd Function that keeps little more than Z and
recomputes the MLPs in its own backward; `recomputed_key_value` (per-layer checkpoints) is the slower alternative,
for what that Function does not cover (LoRA on k/v, Qwen3).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .decoder import apply_rope
from .fused import visual_inputs_chunk, visual_kv_chunk
from .naavit import SequenceLayout
from .visual_grad import supports_visual_function, visual_key_value


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
    attn = layers[0].self_attn
    return FoldedKV(
        weight=torch.stack(weights),
        bias=torch.stack(biases) if biases else None,
        eps=_eps(layers[0].input_layernorm),
        kv_dim=attn.k_proj.out_features,
        head_dim=attn.head_dim,
    )


def _place(projected: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """(c, N, v, h) per image -> (c, B, I*v, h) in each sample's image slots (empty slots read image 0, masked)."""
    return projected[:, layout.image_slots.clamp(min=0)].flatten(2, 3)


Chunks = int | tuple[int, ...] | None  # layers per visual chunk: see chunk_slices


def chunk_slices(n: int, chunk: Chunks) -> list[slice]:
    """The layer ranges of the visual chunks of n layers. chunk: None, all layers in one chunk; an int c, chunks of c
    layers (the last may be shorter); a tuple, the sizes of the first chunks, the remaining layers (if any) in one
    last chunk. E.g. n = 32, (4,): layers 0-3, then 4-31 in one batched step, which a side stream can run while the
    text layers 0-3 run (prefill schedules: saisa.bench.systems.SAISA_SCHEDULES)."""
    if chunk is None:
        return [slice(0, n)]
    if isinstance(chunk, int):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 layer, got {chunk}")
        return [slice(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    sizes = [int(c) for c in chunk]
    if not sizes or min(sizes) < 1 or sum(sizes) > n:
        raise ValueError(f"chunk sizes {tuple(chunk)} must be >= 1 layer each and cover at most the {n} layers")
    if sum(sizes) < n:
        sizes.append(n - sum(sizes))
    bounds = [0, *accumulate(sizes)]
    return [slice(a, b) for a, b in pairwise(bounds)]


def _by_chunks(
    n: int,
    chunk: Chunks,
    layout: SequenceLayout,
    stream: torch.cuda.Stream | None,
    compute: Callable[[slice, torch.Tensor], list],
) -> tuple[list, list[torch.cuda.Event | None]]:
    """compute(layers, slots) for each chunk (`chunk_slices`), on `stream` when given: the per-layer results
    (tensors or tuples of tensors) and per-layer events the text layer must wait on (None when computed on the
    current stream)."""
    main = torch.cuda.current_stream() if stream is not None else None
    # Made on the main stream BEFORE the side stream's wait, and kept alive for it: the side stream reads it
    # (computed after the wait, or freed on return, it could be read before it is written or after it is reused).
    slots = layout.image_slots.clamp(min=0)
    if stream is not None:
        stream.wait_stream(main)
        slots.record_stream(stream)
    out: list = []
    events: list[torch.cuda.Event | None] = []
    for sl in chunk_slices(n, chunk):
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            part = compute(sl, slots)
            event = None
            if stream is not None:
                for item in part:  # allocated on the side stream, used on the main one
                    for t in item if isinstance(item, tuple) else (item,):
                        t.record_stream(main)
                event = torch.cuda.Event()
                event.record(stream)
        out.extend(part)
        events.extend([event] * len(part))
    return out, events


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
    recompute: bool = False,
    function: bool = False,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.cuda.Event | None]]:
    """Per-layer visual (K, V) rotated at the images' positions, (B, Hkv, I*v, D), and per-layer events (see
    `_by_chunks`). With `folded`, each chunk is fused.visual_kv_chunk; without, the reference: each layer's own
    input norm, k_proj/v_proj and RoPE. Training with per-layer projectors: recompute, `recomputed_key_value`;
    else function, visual_grad.visual_key_value where it applies (`supports_visual_function`)."""
    if recompute and folded is None and projector.num_mlps > 1:
        return recomputed_key_value(layers, projector, features, layout, cos, sin), [None] * len(layers)
    if function and folded is None and stream is None and supports_visual_function(layers, projector):
        return visual_key_value(layers, projector, features, layout, cos, sin, chunk), [None] * len(layers)

    def compute(sl: slice, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if folded is None:
            visual = _place(projector(features, layers=sl, expand=False), layout)  # (c, B, Sv, h), c = 1 if shared
            return stacked_key_value(layers[sl], visual, cos, sin)
        keys, values = visual_kv_chunk(
            features, slots, *projector_weights(projector, sl), folded.weight[sl],
            None if folded.bias is None else folded.bias[sl], cos, sin, sl.stop - sl.start, folded.eps,
            folded.head_dim,
        )  # (c, B, Sv, Hkv, D)
        return list(zip(keys.transpose(2, 3).unbind(0), values.transpose(2, 3).unbind(0)))

    return _by_chunks(len(layers), chunk, layout, stream, compute)


def saisa_visual_inputs(
    num_layers: int,
    projector: nn.Module,
    features: torch.Tensor,
    layout: SequenceLayout,
    eps: float,
    text_len: int,
    chunk: Chunks = None,
    stream: torch.cuda.Stream | None = None,
    fn: Callable = visual_inputs_chunk,
) -> tuple[list[torch.Tensor], list[torch.cuda.Event | None]]:
    """Per-layer unit-RMS visual inputs of the k/v projections, (B, I*v + text_len, h) with `text_len` rows of room
    for fused.text_layer_step, and per-layer events (see `_by_chunks`); each chunk is `fn`
    (fused.visual_inputs_chunk, or its compiled version). An `fn` returning a tuple of (c, ...) tensors (the
    skinny step's rows and their 1 / RMS, modeling's use of fused.visual_rows_chunk) gives a tuple per layer."""

    def compute(sl: slice, slots: torch.Tensor) -> list:
        n = sl.stop - sl.start
        out = fn(features, slots, *projector_weights(projector, sl), n, eps, text_len)
        if isinstance(out, tuple):  # per-layer tensors of each: a tuple per layer
            return list(zip(*(o.unbind(0) for o in out), strict=True))
        return list(out.unbind(0))

    return _by_chunks(num_layers, chunk, layout, stream, compute)


def recomputed_key_value(layers: nn.ModuleList, projector: nn.Module, features: torch.Tensor, layout: SequenceLayout,
                         cos: torch.Tensor, sin: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stage 2's visual (K, V) per layer, each under its own activation checkpoint: layer i's MLP_i(Z), placement,
    input norm, k_proj/v_proj and RoPE are recomputed from Z when backward reaches layer i, so autograd keeps only
    Z (shared by all layers) and the outputs, instead of four (B, I*v, h) activations per layer (3.2 GB at the
    bench's Qwen2-1.5B stage 2, micro-batch 16), at the cost of running the visual path's forward twice. One layer at
    a time, so backward holds one layer's activations; the MLP weights enter as `layer_weights` views."""
    slots = layout.image_slots.clamp(min=0)
    weights = projector.layer_weights()

    def one_layer(layer: nn.Module, features: torch.Tensor, *mlp: torch.Tensor | None):
        visual = projector(features, weights=mlp)[:, slots].flatten(2, 3)  # (1, B, Sv, h)
        return stacked_key_value([layer], visual, cos, sin)[0]

    return [checkpoint(one_layer, layer, features, *weights[i], use_reentrant=False, preserve_rng_state=False)
            for i, layer in enumerate(layers)]


def stacked_key_value(layers: nn.ModuleList | list, visual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's input norm, k_proj/v_proj (+ Qwen3's k norm) and RoPE on its visual tokens: (K, V)
    (B, Hkv, Sv, D) per layer. visual: (c, B, Sv, h), one input per layer, or (1, B, Sv, h) shared by the c layers
    (a stage-1 shared projector); cos/sin (B, Sv, D).

    The same function as `query_key_value(layer, layer.input_layernorm(visual[j]), ...)` layer by layer, shaped for
    training memory: the input norm is one batched op over the c layers that keeps for backward only its input and
    the fp32 rstd (`_RMSNorm`), and a shared input is normalised once (only the weights gamma_j differ per layer).
    k_proj/v_proj are each layer's own modules, called per layer: a stacked copy of their weights would be made every
    step (2 GB at 7B) and kept for backward; called as modules, adapters on them (LoRA) apply. Each layer's K and V
    are tensors of their own, so the caller can free them layer by layer.
    """
    gammas = torch.stack([layer.input_layernorm.weight for layer in layers])[:, None, None]  # (c, 1, 1, h)
    normed = _RMSNorm.apply(visual, gammas, _eps(layers[0].input_layernorm))  # (c, B, Sv, h)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, Sv, D)
    kv = []
    for layer, x in zip(layers, normed.unbind(0)):
        attn = layer.self_attn
        key = attn.k_proj(x).unflatten(-1, (-1, attn.head_dim))  # (B, Sv, Hkv, D)
        if getattr(attn, "k_norm", None) is not None:  # Qwen3: RMSNorm over each head's D, then RoPE
            key = _RMSNorm.apply(key, attn.k_norm.weight, _eps(attn.k_norm))
        value = attn.v_proj(x).unflatten(-1, (-1, attn.head_dim))
        kv.append((apply_rope(key.transpose(1, 2), cos, sin), value.transpose(1, 2)))
    return kv


class _RMSNorm(torch.autograd.Function):
    """transformers' LlamaRMSNorm, weight * (x32 * rstd).to(x.dtype), keeping for backward only x (in its own dtype)
    and the fp32 rstd per row; the normalised rows are recomputed in backward (as plain ops, autograd would keep an
    fp32 copy of x and the normalised rows). x broadcasts against weight: a (1, B, S, h) input with (c, 1, 1, h)
    weights is normalised once for all c layers, and its gradient is the sum over them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        y = x.float() * rstd  # the normalised rows, in fp32
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * y.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).sum_to_size(x.shape).float()  # d loss / d y, summed over the weights sharing x
            grad_x = (rstd * (g - y * (g * y).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


def projector_weights(projector: nn.Module, layers: slice) -> tuple[torch.Tensor | None, ...]:
    """(w1, b1, w2, b2) of the projector MLPs of `layers` (the one shared MLP when it is shared)."""
    pick = (lambda p: p if p is None or projector.num_mlps == 1 else p[layers])
    lin2 = getattr(projector, "linear_2", None)
    return (pick(projector.linear_1.weight), pick(projector.linear_1.bias),
            pick(None if lin2 is None else lin2.weight), pick(None if lin2 is None else lin2.bias))
