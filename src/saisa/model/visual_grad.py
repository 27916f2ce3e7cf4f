"""SAISA's visual path in training (stage 2, per-layer projectors): all layers' visual K/V as ONE autograd Function.

Unusual here: backward is written by hand, so autograd keeps of the whole visual path only the vision features Z
(shared by all layers), every layer's visual K/V before RoPE and bias (1/3 of an (n, B·Sv, h) activation at
Qwen2's 2 K/V heads) and the fp32 RMS scale of each row, instead of four (B, Sv, h) activations per layer (MLP_i's
hidden before and after its GELU, V_i = MLP_i(Z) and its normalised copy: 3.2 GB at the bench's Qwen2-1.5B stage 2,
micro-batch 16). Backward recomputes MLP_i(Z) (two batched GEMMs: ~2 TFLOPs there, ~3 ms on an H100) and needs no
elementwise pass over (B, Sv, h) tensors that a GEMM or a narrower tensor can take instead:
- the input norm's weight gamma_i is folded into [W_k; W_v] (as `visual_kv.fold_kv_weights` does for inference):
  K/V = rms(V_i) ([W_k; W_v] diag(gamma_i))^T, so the scaled rows are never made, and gamma's gradient comes from
  the (2k, h) weight gradient instead of a reduction over all B·Sv rows;
- the RMS norm's backward, rstd·g - rstd·<g, y>/h·y with y = rstd·x the normalised rows and g = dK/V·W their
  gradient, takes <g, y> = <dK/V, K/V> over 2k columns instead of h; rstd scales dK/V's 2k-wide rows, so neither y
  nor g is made again: the weight gradient is (rstd·dK/V)^T x and the GEMM giving rstd·g starts its accumulator
  from -rstd²·<g, y>/h·x, made in place of x (baddbmm);
- every step is batched over the layers (one bmm per linear for all n layers, one kernel per elementwise step):
  a few dozen operators for the whole visual path at any depth, where autograd through the modules adds ~20 per
  layer, forward and backward (~550 at 28 layers).
Numerics are the reference's (`visual_kv.stacked_key_value`: transformers' RMSNorm in fp32, cast, then the weight)
up to rounding: gamma multiplies the weights instead of the rows; in fp32/fp64 the two agree to the norm's fp32
rounding (tests/test_visual_kv.py). k_proj/v_proj must be plain Linear modules (no adapter, not ZeRO-3
partitioned) without Qwen3's per-head k norm; `supports_visual_function` says when, and the caller falls back.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .naavit import SequenceLayout
from .projector import _stacked

# Layers per Function call: as many as keep one (layers, B·Sv, h) activation under this many bytes (all 28 at the
# bench's stage 2; backward briefly holds about four such tensors).
CHUNK_BYTES = 2**30


def supports_visual_function(layers: nn.ModuleList, projector: nn.Module) -> bool:
    """Whether `visual_key_value` applies: per-layer projector MLPs, and every layer's k_proj/v_proj a plain Linear
    whose weights can be read directly, with no per-head k norm after it (Qwen3)."""
    if getattr(projector, "num_mlps", 1) < 2:
        return False  # a shared (stage-1) MLP: stacked_key_value already keeps its input once
    tensors = [p for p in projector.parameters()]
    for layer in layers:
        attn = layer.self_attn
        if getattr(attn, "k_norm", None) is not None:
            return False
        if type(attn.k_proj) is not nn.Linear or type(attn.v_proj) is not nn.Linear:
            return False  # an adapter (LoRA) must see the rows through its module
        tensors += [attn.k_proj.weight, attn.v_proj.weight, layer.input_layernorm.weight]
    return not any(hasattr(t, "ds_id") for t in tensors)  # ZeRO-3 gathers them only inside the module call


def visual_key_value(
    layers: nn.ModuleList,
    projector: nn.Module,
    features: torch.Tensor,
    layout: SequenceLayout,
    cos: torch.Tensor,
    sin: torch.Tensor,
    chunk: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer visual (K, V), (B, Hkv, I·v, D), rotated at the images' positions: the function of
    `visual_kv.saisa_visual_kv` without recompute, by `VisualKeyValue` over `chunk` layers at a time (default: by
    CHUNK_BYTES). features Z (N, v, d); cos/sin (B, I·v, D).

    The MLPs run per image slot (B·I·v rows), not per image: the same rows when every sample holds the same number
    of images (the usual training batch); an empty slot costs one image's rows (its keys are masked)."""
    n = len(layers)
    dtype = _compute_dtype(features, projector.linear_1.weight)
    slots = layout.image_slots.clamp(min=0)  # (B, I); an empty slot reads image 0 (masked)
    rows, h = slots.numel() * features.shape[1], projector.linear_1.out_features
    chunk = chunk or max(1, CHUNK_BYTES // max(1, rows * h * torch.finfo(dtype).bits // 8))
    starts = range(0, n, chunk)
    cast = lambda t: None if t is None else t.to(dtype)  # a no-op without autocast
    lin2 = getattr(projector, "linear_2", None)
    mlp = [projector.linear_1.weight, projector.linear_1.bias, None if lin2 is None else lin2.weight,
           None if lin2 is None else lin2.bias]
    # One split per stacked weight (one backward node joins the chunks' gradients once); no slice per chunk,
    # which would make a full-size zero gradient each.
    mlp = [[None] * len(starts) if t is None else (cast(t).split(chunk) if len(starts) > 1 else [cast(t)])
           for t in mlp]
    attn0 = layers[0].self_attn
    norm0 = layers[0].input_layernorm
    eps = getattr(norm0, "variance_epsilon", getattr(norm0, "eps", 1e-6))
    act = getattr(projector, "act", None) if lin2 is not None else None
    features, cos, sin = cast(features), cast(cos), cast(sin)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for j, start in enumerate(starts):
        attn = [layer.self_attn for layer in layers[start:start + chunk]]
        norms = [layer.input_layernorm.weight for layer in layers[start:start + chunk]]
        biases = [None, None]
        if attn0.k_proj.bias is not None:
            biases = [cast(torch.stack([a.k_proj.bias for a in attn])), cast(torch.stack([a.v_proj.bias for a in attn]))]
        key, value = VisualKeyValue.apply(
            features, slots, *(t[j] for t in mlp), cast(torch.stack(norms)),
            cast(torch.stack([a.k_proj.weight for a in attn])), cast(torch.stack([a.v_proj.weight for a in attn])),
            *biases, cos, sin, act, eps, attn0.head_dim,
        )  # each (c, B, I*v, Hkv, D)
        out.extend(zip(key.transpose(2, 3).unbind(0), value.transpose(2, 3).unbind(0)))
    return out


def _compute_dtype(features: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's where it is on (mixed precision over fp32 weights), else the weights'."""
    device = features.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class VisualKeyValue(torch.autograd.Function):
    """Z -> V_i = MLP_i(Z) placed in the image slots -> K_i, V_i = rms(V_i) ([W_k; W_v]_i diag(gamma_i))^T (+ bias)
    -> RoPE on K_i, for c layers at once. Saves Z, the pre-bias K/V (c, R, 2k) and rstd (c, R, 1) fp32;
    backward recomputes the MLPs. R = B·I·v rows."""

    @staticmethod
    def forward(ctx, features, slots, w1, b1, w2, b2, gamma, wk, wv, bk, bv, cos, sin, act, eps, head_dim):
        """features (N, v, d); slots (B, I); w1 (c, h, d), b1 (c, h), w2 (c, h, h) or None (linear projector), b2;
        gamma (c, h) input-norm weights; wk/wv (c, k, h), bk/bv (c, k) or None; cos/sin (B, I·v, D).
        Returns K (rotated) and V, each (c, B, I·v, Hkv, D)."""
        with torch.autocast(features.device.type, enabled=False):
            batch = slots.shape[0]
            c, k = wk.shape[0], wk.shape[1]
            x = _projected(features, slots, w1, b1, w2, b2, act)  # (c, R, h)
            # transformers' RMSNorm: rsqrt(mean(x^2) + eps) in fp32 (one reduction kernel for bf16 x), then
            # (x32·rstd) cast back to x's dtype, here in place; its weight is folded into the k/v weights.
            narrow = x if torch.finfo(x.dtype).bits <= 32 else x.float()  # vector_norm does not narrow fp64 itself
            rstd = torch.linalg.vector_norm(narrow, dim=-1, keepdim=True, dtype=torch.float32)
            rstd = rstd.square_().div_(x.shape[-1]).add_(eps).rsqrt_()  # (c, R, 1)
            unit = x.mul_(rstd)
            kv = torch.bmm(unit, _folded(wk, wv, gamma).transpose(1, 2))  # (c, R, 2k), no bias
            del x, unit
            key, value = kv[..., :k], kv[..., k:]
            if bk is not None:
                key, value = key + bk.unsqueeze(1), value + bv.unsqueeze(1)
            shape = (c, batch, -1, k // head_dim, head_dim)
            key = _rope(key.view(shape), cos, sin)
        ctx.save_for_backward(features, slots, w1, b1, w2, b2, gamma, wk, wv, cos, sin, rstd, kv)
        ctx.act = act
        return key, value.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dkey, dvalue):
        features, slots, w1, b1, w2, b2, gamma, wk, wv, cos, sin, rstd, kv = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 16
        with torch.autocast(features.device.type, enabled=False):
            c, k = kv.shape[0], kv.shape[2] // 2
            dkv = torch.empty_like(kv)  # d loss / d (pre-bias K | V), (c, R, 2k)
            _rope_backward(dkey, cos, sin, out=dkv[..., :k].view(dkey.shape))
            dkv[..., k:].view(dvalue.shape).copy_(dvalue)
            grads[9] = dkv[..., :k].sum(1) if need[9] else None
            grads[10] = dkv[..., k:].sum(1) if need[10] else None
            need_x = any(need[i] for i in (0, 2, 3, 4, 5))  # gradients upstream of the norm
            if not need_x and not any(need[i] for i in (6, 7, 8)):
                return tuple(grads)

            # Recompute the MLPs' output x (the rows y = rstd·x are never made again: rstd scales dkv's rows
            # instead), and their hidden with its activation's graph.
            x, hidden, activated = _projected(features, slots, w1, b1, w2, b2, ctx.act, keep=True)  # (c, R, h)
            # RMSNorm backward: dx = rstd·g - rstd·<g, y>/h·y with g = dkv·W (W = folded [W_k; W_v]) the gradient
            # of y; <g, y> = <dkv, y·W^T> = <dkv, kv> (the pre-bias K/V kept from forward): 2k columns, not h.
            dot = torch.sum(dkv * kv, -1, keepdim=True, dtype=torch.float32) if need_x else None  # (c, R, 1)
            dkv.mul_(rstd)  # rstd·dkv: d loss / d(folded weight) = (rstd·dkv)^T x, and rstd·g = (rstd·dkv)·W
            if need[6] or need[7] or need[8]:
                dfolded = torch.bmm(dkv.transpose(1, 2), x)  # (c, 2k, h): d loss / d ([W_k; W_v] diag(gamma))
                grads[7] = dfolded[:, :k] * gamma.unsqueeze(1) if need[7] else None
                grads[8] = dfolded[:, k:] * gamma.unsqueeze(1) if need[8] else None
                grads[6] = (dfolded * torch.cat((wk, wv), 1)).sum(1) if need[6] else None
                del dfolded
            if not need_x:
                return tuple(grads)
            dx = x.mul_(dot.mul_(rstd.square()).div_(-x.shape[-1]))  # -rstd·<g, y>/h·y = -rstd²·<g, y>/h·x
            dx.baddbmm_(dkv, _folded(wk, wv, gamma))  # + rstd·g; (c, R, h)
            del dkv, x
            if need[5] and b2 is not None:
                grads[5] = dx.sum(1)
            if w2 is not None:
                if need[4]:
                    grads[4] = torch.bmm(dx.transpose(1, 2), activated.detach())  # (c, h, h)
                dactivated = torch.bmm(dx, w2)
                del dx
                (dhidden,) = torch.autograd.grad(activated, hidden, dactivated)  # the activation's backward
                del dactivated, activated, hidden
            else:
                dhidden = dx
            if need[3] and b1 is not None:
                grads[3] = dhidden.sum(1)
            zp = features[slots].flatten(0, 2)  # (R, d)
            if need[2]:
                grads[2] = torch.bmm(dhidden.transpose(1, 2), zp.expand(c, -1, -1))  # (c, h, d)
            if need[0]:
                dzp = torch.bmm(dhidden, w1).sum(0).view(*slots.shape, *features.shape[1:])  # (B, I, v, d)
                grads[0] = torch.zeros_like(features).index_put_((slots,), dzp, accumulate=True)
        return tuple(grads)


def _projected(features, slots, w1, b1, w2, b2, act, keep=False):
    """x = MLP_i(Z) at the slots' rows, (c, R, h), rows (sample, slot, token). keep: also return the MLP's hidden
    (requiring grad) and its activation, for the activation's backward (None for a linear projector)."""
    z = features[slots].flatten(0, 2)  # (R, d)
    hidden = _stacked(z, w1, b1)  # (c, R, h)
    activated = None
    if w2 is not None:
        with torch.enable_grad() if keep else nullcontext():  # backward runs without grad mode
            activated = act(hidden.requires_grad_(keep))
        x = _stacked(activated.detach(), w2, b2)
    else:
        x = hidden
    return (x, hidden, activated) if keep else x


def _folded(wk: torch.Tensor, wv: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """[W_k; W_v] diag(gamma): (c, 2k, h); y·this^T == (gamma·y)·[W_k; W_v]^T."""
    return torch.cat((wk, wv), 1) * gamma.unsqueeze(1)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x)·sin == swap_halves(x)·this, exactly."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), -1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' x·cos + rotate_half(x)·sin (same roundings) for x (c, B, S, H, D), cos/sin (B, S, D)."""
    out = x * cos.unsqueeze(2)
    out += _swap_halves(x).mul_(_signed_sin(sin).unsqueeze(2))
    return out


def _rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """d loss / d x of `_rope` into `out`: grad·cos + swap_halves(grad·signed sin) (swapping is its own transpose)."""
    half = grad.shape[-1] // 2
    t = grad * _signed_sin(sin).unsqueeze(2)
    torch.mul(grad, cos.unsqueeze(2), out=out)
    out[..., :half] += t[..., half:]
    out[..., half:] += t[..., :half]
