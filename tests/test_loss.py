"""The chunked training loss (model/loss.py) against the logits path: same loss and gradients for every architecture,
with padding, ignored labels and placeholders, across chunk and slab boundaries, in fp32, bf16 and under autocast;
what `logits` holds in each mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    IMAGE_TOKEN_ID,
    random_ids,
    random_pixels,
    tiny_model,
    tiny_text_config,
)
from torch import nn
from torch.testing import assert_close

from saisa.model import loss as loss_module
from saisa.model.loss import IGNORE_INDEX, fusable, linear_cross_entropy, split_rows


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples, right- and left-padded, two images each; some labels ignored (a prompt), padding ignored."""
    ids = torch.stack([random_ids(14, 40), random_ids(14, 41)])
    mask = torch.ones_like(ids)
    mask[0, 11:], mask[1, :2] = 0, 0
    ids[0, [1, 6]] = IMAGE_TOKEN_ID
    ids[1, [3, 9]] = IMAGE_TOKEN_ID
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    return ids, mask, labels


def loss_and_grads(model, skip_logits: bool):
    model.zero_grad(set_to_none=True)
    ids, mask, labels = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(4), labels=labels,
                skip_logits=skip_logits)
    (2.5 * out.loss).backward()  # an upstream gradient other than 1 (as under gradient accumulation)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backbone,tied", [("llama", False), ("qwen2", True)])
def test_chunked_loss_equals_the_logits_path(arch, backbone, tied, monkeypatch):
    # 26 rows of 100 logits: two slabs of 13 rows, each in chunks of 7 and 6
    monkeypatch.setattr(loss_module, "SLAB_ELEMENTS", 13 * 100)
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 7 * 100)
    text = tiny_text_config(backbone, tie_word_embeddings=tied)
    model = tiny_model(arch, text=text).train()
    model.vision_tower.requires_grad_(False)
    ref, ref_grads = loss_and_grads(model, skip_logits=False)
    out, grads = loss_and_grads(model, skip_logits=True)
    assert out.logits is None and ref.logits is not None
    assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ("language_model.lm_head.weight", "language_model.model.norm.weight",
                 "language_model.model.layers.1.mlp.down_proj.weight", "language_model.model.layers.0.self_attn.k_proj.weight",
                 "language_model.model.embed_tokens.weight", "multi_modal_projector.linear_1.weight"):
        if name in ref_grads:
            assert_close(grads[name], ref_grads[name], atol=1e-6 * ref_grads[name].abs().max().item(), rtol=1e-5,
                         msg=name)
    for name, ref_grad in ref_grads.items():
        assert_close(grads[name], ref_grad, atol=1e-6 * ref_grad.abs().max().item(), rtol=1e-4, msg=name)


def test_logits_by_mode():
    """Training with labels: no logits by default (chunked loss); eval, no labels or skip_logits=False: logits."""
    model = tiny_model("saisa")
    ids, mask, labels = padded_batch()
    kw = {"input_ids": ids, "attention_mask": mask, "pixel_values": random_pixels(4)}
    assert model(**kw, labels=labels).logits is not None  # eval
    model.train()
    out = model(**kw, labels=labels)
    assert out.logits is None and out.loss is not None
    assert model(**kw).logits is not None
    assert model(**kw, labels=labels, skip_logits=False).logits.shape == (*ids.shape, model.config.text_config.vocab_size)
    with pytest.raises(ValueError, match="labels"):
        model(**kw, skip_logits=True)


def test_unfusable_lm_head_takes_the_logits_path():
    """An lm_head the chunked loss cannot read directly (here wrapped, as an adapter would) gives the same loss."""
    model = tiny_model("llava").train()
    ids, mask, labels = padded_batch()
    kw = {"input_ids": ids, "attention_mask": mask, "pixel_values": random_pixels(4), "labels": labels}
    ref = model(**kw).loss
    model.language_model.lm_head = nn.Sequential(model.language_model.lm_head)
    assert not fusable(model.language_model.lm_head)
    out = model(**kw)
    assert out.logits is None
    assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_elements,slab_elements", [
    (7 * 50, 2**29),  # one slab, chunks of 6, 6, 6, 5
    (4 * 50, 8 * 50),  # slabs of 8, 8, 7, each in chunks of 4 (and 4, 3)
    (2**27, 2**29),  # one chunk
])
def test_linear_cross_entropy_matches_cross_entropy(bias, chunk_elements, slab_elements):
    g = torch.Generator().manual_seed(0)
    n, h, vocab = 23, 16, 50
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    head = nn.Linear(h, vocab, bias=bias)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[[0, 5, 7, 8, 22]] = IGNORE_INDEX  # first and last rows, both sides of a slab boundary
    sizes = {"chunk_elements": chunk_elements, "slab_elements": slab_elements}
    loss = linear_cross_entropy(hidden, head, target, **sizes)
    ref = F.cross_entropy(head(hidden).float(), target, ignore_index=IGNORE_INDEX)
    assert_close(loss, ref)
    params = (hidden, *head.parameters())
    assert_close(torch.autograd.grad(3 * loss, params), torch.autograd.grad(3 * ref, params))
    with torch.no_grad():  # loss only
        assert_close(linear_cross_entropy(hidden, head, target, **sizes), ref.detach())


def test_split_rows():
    assert split_rows(26, 100, 700) == 7  # 4 parts: 7, 7, 7, 5
    assert split_rows(5, 100, 10**6) == 5  # one part
    assert split_rows(3, 100, 10) == 1  # at least one row
    # Stage 2 (16 x 191 rows, Qwen2's vocabulary): one slab, 7 chunks; llava's 16 x 767 rows: 4 slabs.
    assert split_rows(3056, 151936, loss_module.SLAB_ELEMENTS) == 3056
    assert split_rows(3056, 151936, loss_module.CHUNK_ELEMENTS) == 437
    assert split_rows(12272, 151936, loss_module.SLAB_ELEMENTS) == 3068


def test_bf16_matches_the_logits_path():
    """bf16 weights and hidden states (the trainer's pure-bf16 mode): the loss is the logits path's to fp32
    rounding (same bf16 logits, same fp32 log-softmax); gradients agree to bf16 rounding, and are no further from
    the exact gradient (float64 from the same bf16 logits) than the logits path's own."""
    g = torch.Generator().manual_seed(3)
    n, h, vocab = 96, 32, 300
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    head = nn.Linear(h, vocab, bias=False).bfloat16()
    with torch.no_grad():
        head.weight.mul_(8)  # logits of a few units, a peaked softmax
    target = torch.randint(0, vocab, (n,), generator=g)
    target[::9] = IGNORE_INDEX
    params = (hidden, head.weight)
    loss = linear_cross_entropy(hidden, head, target, chunk_elements=20 * vocab, slab_elements=50 * vocab)
    ref = F.cross_entropy(head(hidden).float(), target, ignore_index=IGNORE_INDEX)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    grads, ref_grads = torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)
    logits = head(hidden).detach().double().requires_grad_()
    F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX).backward()
    exact = (logits.grad @ head.weight.double(), logits.grad.T @ hidden.double())
    for gr, rg, ex in zip(grads, ref_grads, exact):
        assert gr.dtype == torch.bfloat16
        assert_close(gr.float(), rg.float(), atol=2**-7 * rg.abs().max().item(), rtol=2**-6)
        assert (gr.double() - ex).norm() <= 2 * (rg.double() - ex).norm() + 1e-3 * ex.norm()


def test_no_counted_row():
    """Every target ignored: NaN loss and zero gradients, as F.cross_entropy."""
    hidden = torch.randn(5, 8, requires_grad=True)
    head = nn.Linear(8, 12)
    target = torch.full((5,), IGNORE_INDEX)
    loss = linear_cross_entropy(hidden, head, target, chunk_elements=24)
    ref = F.cross_entropy(head(hidden), target, ignore_index=IGNORE_INDEX)
    assert loss.isnan() and ref.isnan()
    params = (hidden, *head.parameters())
    for gr, rg in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        assert_close(gr, rg)
        assert not gr.any()


def test_frozen_lm_head_gets_no_gradient():
    """Stage 1: the LLM (lm_head included) is frozen; the hidden rows still get their gradient."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    head = nn.Linear(8, 30, bias=False).requires_grad_(False)
    target = torch.randint(0, 30, (2, 6), generator=g)
    linear_cross_entropy(hidden, head, target, chunk_elements=60).backward()
    ref = torch.autograd.grad(F.cross_entropy(head(hidden).flatten(0, 1), target.flatten()), hidden)[0]
    assert head.weight.grad is None
    assert_close(hidden.grad, ref)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("slab_rows", [40, 16])  # one slab; three (the fp32 sum of bf16 slab GEMMs)
def test_fp32_weights_under_bf16_autocast(bias, slab_rows):
    """The trainer's bf16 mode (autocast over fp32 weights): bf16 GEMMs, fp32 loss and fp32 gradients, close to
    autograd through the same autocast logits."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, 32, generator=g, requires_grad=True)
    head = nn.Linear(32, 64, bias=bias)
    target = torch.randint(0, 64, (40,), generator=g)
    target[[3, 16]] = IGNORE_INDEX
    params = (hidden, *head.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, head, target, chunk_elements=64 * 6, slab_elements=64 * slab_rows)
        ref = F.cross_entropy(head(hidden).float(), target, ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref, params)
    assert loss.dtype == torch.float32 and all(gr.dtype == torch.float32 for gr in grads)
    assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for gr, rg in zip(grads, ref_grads):
        assert_close(gr, rg, atol=2e-2 * rg.abs().max().item(), rtol=2e-2)


def test_second_backward_fails_loudly():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, nn.Linear(8, 10), torch.arange(4))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


@pytest.mark.gpu
def test_cuda_bf16_without_host_sync():
    """On the GPU, bf16: the same loss and gradients as the logits path, and no host synchronisation in forward or
    backward (CUDA's sync debug mode turns one into an error)."""
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(4)
    hidden = torch.randn(4, 65, 256, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    head = nn.Linear(256, 5000, bias=False, device=device, dtype=torch.bfloat16)
    target = torch.randint(0, 5000, (4, 64), device=device, generator=g)
    target[:, :10] = IGNORE_INDEX
    params = (hidden, head.weight)
    ref = F.cross_entropy(head(hidden[:, :-1]).float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, params)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(hidden[:, :-1], head, target, chunk_elements=50 * 5000,
                                    slab_elements=120 * 5000)
        grads = torch.autograd.grad(loss, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for gr, rg in zip(grads, ref_grads):
        assert_close(gr.float(), rg.float(), atol=2**-7 * rg.abs().max().item(), rtol=2**-6)
