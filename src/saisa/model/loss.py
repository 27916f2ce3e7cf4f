"""The training loss: shifted cross-entropy over text positions, with or without the full-vocabulary logits.

Unusual here: `linear_cross_entropy` never holds the (rows, vocab) logits. It works a chunk of rows at a time (about
2^27 logits, 0.5 GB in fp32) and computes the gradients in the forward pass, as fused-loss kernels do: for a chunk the
logits are made in the lm_head's compute dtype, upcast to fp32, and turned into the chunk's loss and
d loss / d logits = (softmax - onehot) / n_targets, which two GEMMs carry at once to d hidden and d weight. Backward
only scales the stored gradients by the incoming one, so no GEMM is recomputed. What stays alive for backward is the
lm_head weight's gradient (which backward would make anyway) and the hidden rows' gradient, instead of the fp32
log-softmax of every row (1.9 GB at micro-batch 16 x 192 tokens with Qwen2's 151936-token vocabulary) and the
copies made around it. The values are those of `cross_entropy(logits.float())` over the same rows; in fp32 the two
agree to rounding (tests/test_loss.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .naavit import SequenceLayout

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**27  # logits per chunk: fp32 upcast 0.5 GB, +0.25 GB each for the bf16 logits and gradient


def shifted_targets(labels: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """Targets (B, L - 1) for the rows 0..L-2: labels[:, 1:], IGNORE_INDEX wherever a placeholder or padding is on
    either side (text predicts text; a placeholder row carries no meaning)."""
    if labels.shape != layout.text_is_key.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(layout.text_is_key.shape)}")
    keep = layout.text_is_key[:, :-1] & layout.text_is_key[:, 1:]
    return labels[:, 1:].to(keep.device).masked_fill(~keep, IGNORE_INDEX)


def logits_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, L, V) rows 0..L-2 against target (B, L - 1), in fp32 (the full-logits path)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)


def fusable(lm_head: nn.Module) -> bool:
    """Whether `linear_cross_entropy` may read the lm_head's weight directly: a plain Linear (not wrapped by an
    adapter) whose weight is not partitioned by DeepSpeed ZeRO-3 (which gathers it only inside the module's call)."""
    return type(lm_head) is nn.Linear and not hasattr(lm_head.weight, "ds_id")


def linear_cross_entropy(hidden: torch.Tensor, lm_head: nn.Linear, target: torch.Tensor,
                         chunk_elements: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of lm_head(hidden) against target without the full logits.

    hidden (..., h) final-norm hidden states, target (...) long with IGNORE_INDEX rows left out; returns the fp32
    mean over the counted rows (NaN when none counts, as `F.cross_entropy`). Gradients reach hidden, lm_head.weight
    and its bias when they require grad and grad mode is on. chunk_elements: logits per chunk (CHUNK_ELEMENTS).
    """
    rows, vocab = hidden.reshape(-1, hidden.shape[-1]), lm_head.out_features
    target = target.reshape(-1)
    if target.shape[0] != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} hidden rows but {target.shape[0]} targets")
    weight, bias = lm_head.weight, lm_head.bias
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (rows, weight, bias))
    chunks = max(1, math.ceil(rows.shape[0] * vocab / (chunk_elements or CHUNK_ELEMENTS)))
    chunk_rows = max(1, math.ceil(rows.shape[0] / chunks))
    return _LinearCrossEntropy.apply(rows, weight, bias, target, chunk_rows, needs)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over counted rows of logsumexp(z) - z[target], z = rows W^T + b; gradients made in forward."""

    @staticmethod
    def forward(ctx, rows, weight, bias, target, chunk_rows: int, needs: tuple[bool, bool, bool]):
        need_rows, need_weight, need_bias = needs
        counted = target != IGNORE_INDEX
        count = counted.sum()
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        w = None  # the weight in the compute dtype
        for start in range(0, rows.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            x, t, ok = rows[part], target[part], counted[part]
            logits = F.linear(x, weight, bias)  # (r, V) in the compute dtype (bf16 under autocast)
            dtype = logits.dtype
            z = logits.float()
            del logits
            # In place in z (no other full-size temporary): z - max, then exp, then d loss / d z.
            z.sub_(z.amax(dim=-1, keepdim=True))
            index = t.clamp(min=0).unsqueeze(1)  # (r, 1): ignored rows read column 0, masked out
            picked = z.gather(1, index).squeeze(1)  # target logit - max
            sums = z.exp_().sum(dim=-1)  # (r,)
            total += torch.where(ok, sums.log() - picked, 0.0).sum()  # logsumexp(z) - z[target]
            if not any(needs):
                continue
            # d loss / d z = (softmax(z) - onehot(target)) / count on counted rows, 0 on the others.
            scale = ok / count  # (r,) fp32
            z.mul_((scale / sums).unsqueeze(1))
            z.scatter_add_(1, index, -scale.unsqueeze(1))
            dz = z.to(dtype)  # (r, V), rounded as autograd rounds the gradient of `logits.float()`
            del z
            if need_bias:
                grad_bias += dz.sum(0, dtype=torch.float32)
            if w is None:
                w = weight if weight.dtype == dtype else weight.to(dtype)
            if need_rows:
                grad_rows[part] = dz @ w
            if need_weight:
                x = x.to(dtype)
                if grad_weight.dtype == dtype:
                    grad_weight.addmm_(dz.mT, x)
                else:  # fp32 weights under autocast: each chunk's GEMM in bf16, summed in fp32
                    grad_weight += dz.mT @ x
        ctx.save_for_backward(grad_rows, grad_weight, None if grad_bias is None else grad_bias.to(bias.dtype))
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # Scaled in place: the stored gradients serve one backward (a second one fails on their version counter).
        grads = [None if g is None else g.mul_(grad_loss) for g in ctx.saved_tensors]
        return *grads, None, None, None
