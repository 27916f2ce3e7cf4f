"""The training loss: shifted cross-entropy over text positions, with or without the full-vocabulary logits.

Unusual here: `linear_cross_entropy` never holds fp32 logits of all rows, and makes the gradients in the forward
pass, as fused-loss kernels do; backward only scales them by the incoming gradient. Per slab of rows (at stage 2's
shape all n = 16 x 191 = 3056 rows; Qwen2's vocabulary V = 151936, h = 1536; slabs bound the memory of more rows,
e.g. LLaVA's 16 x 767):
  1. per chunk of ~437 rows: logits = rows W^T in the compute dtype (bf16), written into the slab's buffer;
     log_softmax in fp32 (its fp32 copy and output are the only fp32 (chunk, V) tensors); the target's
     log-probability gathered (the loss); exp(log-probs) written back over the logits, rounded to bf16;
  2. the target column set to expm1(log p_target) = p_target - 1 (from fp32, not from the rounded p);
  3. two GEMMs over the whole slab: d rows = dz W and d W = dz^T rows, with ignored rows zeroed in `rows` (n x h)
     rather than in dz; the 1 / n_counted of the mean scales the small d rows now, d W with the incoming gradient.
Cost at stage 2's shape (N = n V = 464M logits): three GEMMs of 2 N h = 1.43 TFLOP (forward and both gradients,
as the logits path), each at full size (K = n for d W, M = n for d rows), and 34 bytes per logit = 15.8 GB: GEMM
write 2, fp32 copy 6, log_softmax's three reads and one write 16, exp to bf16 6, the gradient GEMMs' reads 4. The
logits path moves ~60 (fp32 copy, log_softmax, nll backward's zero fill, log_softmax backward, bf16 cast, the slice
backward's zero fill and copy); neither synchronises with the host. Memory: the slab's bf16 buffer 2 N = 0.93 GB
+ 8 bytes per chunk logit 0.53 GB, then d W 0.47 GB (which backward would make anyway): ~1.5 GB at most, against
4.7 GB for the logits path's bf16 logits, fp32 copy and log-probs (measured on an H100: 1.4 vs 5.3 GB above the
hidden states, scripts/train_variants.py). Values: the loss is that of `cross_entropy(logits.float())` over the
same rows; the gradients are rounded to bf16 before the 1 / n_counted scale (the logits path rounds after), so in
bf16 they differ from it by about one rounding; in fp32 the two agree to rounding (tests/test_loss.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .naavit import SequenceLayout

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # logits per log-softmax chunk: 8 bytes each in fp32 (its copy and output), 0.5 GB
SLAB_ELEMENTS = 2**29  # logits per gradient GEMM: the bf16 buffer of d loss / d logits, 1 GB; one slab at stage 2


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


def split_rows(rows: int, per_row: int, budget: int) -> int:
    """Rows per part when `rows` rows of `per_row` elements are cut into as few equal parts as keep each within
    `budget` elements (at least one row)."""
    parts = max(1, math.ceil(rows * per_row / budget))
    return max(1, math.ceil(rows / parts))


def linear_cross_entropy(hidden: torch.Tensor, lm_head: nn.Linear, target: torch.Tensor,
                         chunk_elements: int | None = None, slab_elements: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of lm_head(hidden) against target without the full logits.

    hidden (..., h) final-norm hidden states, target (...) long with IGNORE_INDEX rows left out; returns the fp32
    mean over the counted rows (NaN when none counts, as `F.cross_entropy`, with zero gradients). Gradients reach
    hidden, lm_head.weight and its bias when they require grad and grad mode is on. The GEMMs run in the autocast
    dtype when autocast is on, else in the weight's. chunk_elements: logits per fp32 log-softmax chunk
    (CHUNK_ELEMENTS); slab_elements: logits per gradient buffer and GEMM (SLAB_ELEMENTS).
    """
    rows, vocab = hidden.reshape(-1, hidden.shape[-1]), lm_head.out_features
    target = target.reshape(-1)
    if target.shape[0] != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} hidden rows but {target.shape[0]} targets")
    weight, bias = lm_head.weight, lm_head.bias
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (rows, weight, bias))
    kind = rows.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    slab_rows = split_rows(rows.shape[0], vocab, slab_elements or SLAB_ELEMENTS)
    chunk_rows = split_rows(slab_rows, vocab, chunk_elements or CHUNK_ELEMENTS)
    return _LinearCrossEntropy.apply(rows, weight, bias, target, dtype, (slab_rows, chunk_rows), needs)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean over counted rows of -log softmax(z)[target], z = rows W^T + b; gradients made in forward."""

    @staticmethod
    def forward(ctx, rows, weight, bias, target, dtype, sizes: tuple[int, int], needs: tuple[bool, bool, bool]):
        need_rows, need_weight, need_bias = needs
        grad = any(needs)
        slab_rows, chunk_rows = sizes
        n, vocab = rows.shape[0], weight.shape[0]
        counted = target != IGNORE_INDEX  # (n,)
        count = counted.sum()
        index = target.clamp(min=0).unsqueeze(1)  # (n, 1): ignored rows read column 0, masked out below
        x, w = rows.to(dtype), weight.to(dtype)  # no copies unless autocast runs fp32 weights in bf16
        b = None if bias is None else bias.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # softmax precision: fp32, or fp64 for fp64 inputs
        picked = rows.new_empty(n, 1, dtype=acc)  # log p(target) of each row
        # softmax - onehot (d loss / d logits before the 1 / count of the mean) in the compute dtype, one slab of
        # rows at a time; without gradients, one chunk's logits.
        buffer = rows.new_empty(slab_rows if grad else chunk_rows, vocab, dtype=dtype)
        # Ignored rows zeroed in the GEMM's other operand, so that their softmax rows need no masking pass.
        kept = torch.where(counted.unsqueeze(1), x, 0) if need_weight or need_bias else None  # (n, h)
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = grad_bias = None
        for s0 in range(0, n, slab_rows):
            s1 = min(s0 + slab_rows, n)
            for c0 in range(s0, s1, chunk_rows):
                c1 = min(c0 + chunk_rows, s1)
                z = buffer[c0 - s0:c1 - s0] if grad else buffer[:c1 - c0]  # (r, V) in dtype
                if b is None:
                    torch.mm(x[c0:c1], w.t(), out=z)
                else:
                    torch.addmm(b, x[c0:c1], w.t(), out=z)
                logp = torch.log_softmax(z, dim=-1, dtype=acc)  # (r, V), as cross_entropy(z.float())
                torch.gather(logp, 1, index[c0:c1], out=picked[c0:c1])
                if grad:
                    torch.exp(logp, out=z)  # softmax over the logits, rounded once to the compute dtype
                del logp
            if not grad:
                continue
            dz = buffer[:s1 - s0]  # (r, V)
            dz.scatter_(1, index[s0:s1], torch.expm1(picked[s0:s1]).to(dtype))  # p_target - 1, from fp32
            if need_rows:
                grad_rows[s0:s1] = dz @ w
            if need_weight:
                if grad_weight is None:
                    grad_weight = (dz.mT @ kept[s0:s1]).to(weight.dtype)
                elif grad_weight.dtype == dtype:
                    grad_weight.addmm_(dz.mT, kept[s0:s1])
                else:  # fp32 weights under autocast: each slab's GEMM in bf16, summed in fp32
                    grad_weight += dz.mT @ kept[s0:s1]
            if need_bias:
                part = (counted[s0:s1].to(dtype) @ dz).float()  # (V,): the sum of the counted rows
                grad_bias = part if grad_bias is None else grad_bias + part
        del buffer
        if grad_rows is not None:
            grad_rows.mul_((counted / count.clamp(min=1)).unsqueeze(1))  # 1 / count on counted rows, 0 on others
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias, count)
        return -torch.where(counted, picked.squeeze(1), 0.0).sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # Scaled in place: the stored gradients serve one backward (a second one fails on their version counter).
        grad_rows, grad_weight, grad_bias, count = ctx.saved_tensors
        per_row = grad_loss / count.clamp(min=1)  # d W and d b still lack the 1 / count of the mean
        return (None if grad_rows is None else grad_rows.mul_(grad_loss),
                None if grad_weight is None else grad_weight.mul_(per_row),
                None if grad_bias is None else grad_bias.mul_(per_row), None, None, None, None)
