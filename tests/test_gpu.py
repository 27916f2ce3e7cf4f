"""GPU-only checks (run through the device tool): the bf16 fast path computes the reference path's function."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE_TOKEN_ID, random_ids, tiny_config, tiny_text_config
from torch.testing import assert_close

from saisa import SaisaForConditionalGeneration
from saisa.model import skinny, text_attention
from saisa.model.decoder import apply_rope
from saisa.model.fused import attend, key_value, skinny_supported
from saisa.model.graphs import GraphedForward, capturing

pytestmark = pytest.mark.gpu


def _model(arch: str) -> SaisaForConditionalGeneration:
    torch.manual_seed(0)
    text = tiny_text_config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=1000)
    return SaisaForConditionalGeneration(tiny_config(arch, text=text)).to("cuda", torch.bfloat16).eval()


def _loss_and_grads(model, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one forward and every parameter's gradient after its backward."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _prompt(model, seed: int, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` copies of a 40-token prompt with one image at position 5, and random image features per sample."""
    ids = random_ids(40, seed=seed).repeat(batch, 1)
    ids[:, 5] = IMAGE_TOKEN_ID
    return ids.cuda(), torch.randn(batch, model.num_visual_tokens, 24, device="cuda", dtype=torch.bfloat16)


def _rope(b: int, s: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 RoPE tables (b, s, d) of positions 0..s-1, halves repeated as transformers makes them."""
    ang = torch.arange(s, device="cuda").float()[:, None] * 10000.0 ** (-torch.arange(0, d, 2, device="cuda") / d)
    return tuple(f(torch.cat([ang, ang], -1)).expand(b, -1, -1).to(torch.bfloat16).contiguous()
                 for f in (torch.cos, torch.sin))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("arch,compile,attention", [
    ("saisa", False, "eager"), ("saisa", True, "eager"), ("saisa", True, "sdpa"), ("saisa", True, "flex"),
    ("saisa", True, "triton"), ("naavit", False, "eager"), ("llava", False, "eager"),
])
def test_graphed_fast_path_matches_reference(arch, compile, attention):
    """compile=True: the inductor-compiled path (fused.py: visual inputs on the side stream, one k/v GEMM over each
    layer's visual and text rows, attention in each form of fused.attend), captured in the CUDA graph."""
    model = _model(arch)
    ids, feats = _prompt(model, seed=1)
    with torch.no_grad():
        ref = model(input_ids=ids, image_features=feats).logits[:, -1:].float()
        model.optimize_for_inference(fold=True, chunk=2, overlap=True, compile=compile, attention=attention)
        assert (model._fused is not None) == compile
        if compile:
            assert model._fused.attention == attention and model._fused.rope_half
            w = model._fused.layers[0]
            text_rows = torch.empty(1, ids.shape[1] - 1, 256, device="cuda", dtype=torch.bfloat16)
            assert attention != "triton" or text_attention.supported(text_rows, w.wkv, 32), "the kernels must serve"
        eager_fast = model(input_ids=ids, image_features=feats).logits[:, -1:].float()
        graphed = GraphedForward(model, ids, image_features=feats)
        out = graphed(feats).float()
        feats2 = torch.randn_like(feats)
        out2 = graphed(feats2).float().clone()
        ref2 = model(input_ids=ids, image_features=feats2).logits[:, -1:].float()
    assert torch.isfinite(out).all()
    assert _rel(eager_fast, ref) < 2e-2
    assert _rel(out, ref) < 2e-2
    assert _rel(out2, ref2) < 2e-2
    assert _rel(out2, out) > 1e-3, "replay must see the new image features"


def test_graphed_forward_reads_the_features_where_they_are():
    """The graph's first kernel reads the features from the address the call writes into a pinned word: calls queued
    without a synchronize each see their own features (the last one's logits are left), the caller's tensor may go
    at once, a non-contiguous one is read as its contiguous copy, and other shapes are refused."""
    model = _model("saisa")
    ids, feats = _prompt(model, seed=7)
    others = [torch.randn_like(feats) for _ in range(3)]
    strided = torch.randn(feats.shape[2], feats.shape[1], device="cuda", dtype=feats.dtype).t()[None]
    with torch.no_grad():
        refs = [model(input_ids=ids, image_features=f.contiguous()).logits[:, -1:].float() for f in [*others, strided]]
        model.optimize_for_inference(compile=True)
        graphed = GraphedForward(model, ids, image_features=feats)
        assert graphed._slot is not None
        for f in others:
            graphed(f.clone())  # the clone may be freed and its memory reused once the call returns
        out = graphed.logits.float().clone()
        out_strided = graphed(strided).float().clone()
        with pytest.raises(ValueError, match="do not match the captured ones"):
            graphed(feats[:, :-1])
    assert _rel(out, refs[2]) < 2e-2 and _rel(out, refs[1]) > 1e-3
    assert _rel(out_strided, refs[3]) < 2e-2


@pytest.mark.parametrize("chunk,overlap", [(None, False), (None, True), (1, True), ((1,), True), ((1, 2), True),
                                           ((4,), False)])
def test_graphed_prefill_schedules_match_reference(chunk, overlap):
    """Every prefill schedule of the compiled path (set_prefill_schedule: visual chunks, side stream or not; the
    bench's SAISA_SCHEDULES among them), captured in the CUDA graph, against the reference path; switching schedule
    keeps the compiled functions."""
    model = _model("saisa")
    ids, feats = _prompt(model, seed=4)
    feats2 = torch.randn_like(feats)
    with torch.no_grad():
        ref = model(input_ids=ids, image_features=feats).logits[:, -1:].float()
        ref2 = model(input_ids=ids, image_features=feats2).logits[:, -1:].float()
        model.optimize_for_inference(compile=True)
        fused = model._fused
        model.set_prefill_schedule(chunk, overlap)
        assert model._fused is fused and fused.chunks == chunk and (model._visual_stream is not None) == overlap
        graphed = GraphedForward(model, ids, image_features=feats)
        out = graphed(feats).float().clone()
        out2 = graphed(feats2).float()
    assert _rel(out, ref) < 2e-2
    assert _rel(out2, ref2) < 2e-2


def test_graphed_compiled_path_on_a_padded_batch():
    """The compiled merged-k/v path at batch 2 (left padding, one image per row at different places), eager and
    captured, against the reference path."""
    model = _model("saisa")
    rows = [random_ids(30, seed=2), random_ids(22, seed=3)]
    rows[0][4], rows[1][10] = IMAGE_TOKEN_ID, IMAGE_TOKEN_ID
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, 30 - len(r):], mask[b, 30 - len(r):] = r, 1
    ids, mask = ids.cuda(), mask.cuda()
    feats = torch.randn(2, model.num_visual_tokens, 24, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, image_features=feats).logits[:, -1:].float()
        model.optimize_for_inference(fold=True, chunk=1, overlap=True, compile=True)
        eager_fast = model(input_ids=ids, attention_mask=mask, image_features=feats).logits[:, -1:].float()
        graphed = GraphedForward(model, ids, mask, image_features=feats)
        out = graphed(feats).float()
    assert _rel(eager_fast, ref) < 2e-2
    assert _rel(out, ref) < 2e-2


@pytest.mark.parametrize("arch", ["saisa", "llava"])
def test_chunked_loss_in_bf16_matches_the_logits_path(arch):
    """bf16 on CUDA: the chunked training loss (several chunks) against the full-logits loss, within bf16 rounding;
    with the visual recompute for saisa's per-layer projectors."""
    from saisa.model import loss as loss_module

    model = _model(arch).train()
    model.visual_recompute = True
    ids, feats = _prompt(model, seed=2, batch=4)
    results = []
    for skip in (False, True):
        old = loss_module.CHUNK_ELEMENTS
        loss_module.CHUNK_ELEMENTS = 50 * 1000  # 4 x 40 rows of 1000 logits: chunks of 50 rows
        try:
            results.append(_loss_and_grads(model, input_ids=ids, image_features=feats, labels=ids, skip_logits=skip))
        finally:
            loss_module.CHUNK_ELEMENTS = old
    (ref, ref_grads), (out, grads) = results
    assert_close(out, ref, atol=1e-3, rtol=1e-3)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert _rel(grads[name], g) < 2e-2, name


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_visual_kv_in_bf16_matches_autograd(autocast):
    """saisa stage 2's one-Function visual path (model.fused_visual_kv) against autograd through the modules, in
    bf16 weights, or fp32 weights under bf16 autocast (the trainer's mixed precision): loss and every gradient within
    bf16 rounding."""
    model = _model("saisa").train()
    if autocast:
        model.float()
    ids, feats = _prompt(model, seed=3, batch=4)
    results = []
    for fused in (False, True):
        model.fused_visual_kv = fused
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            results.append(_loss_and_grads(model, input_ids=ids, image_features=feats, labels=ids))
    (ref, ref_grads), (out, grads) = results
    assert_close(out, ref, atol=1e-2, rtol=1e-2)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert grads[name].dtype == g.dtype
        assert _rel(grads[name], g) < 3e-2, name


@pytest.mark.parametrize("rows", [1, 17, 64])
@pytest.mark.parametrize("n,k", [(256, 512), (4096, 1024), (1024, 4096)])
def test_skinny_kernels_match_aten(rows, n, k):
    """skinny.linear (one program per block of W's rows; split-K through fp32 atomics) and skinny.gate_up equal
    aten's GEMMs within bf16 rounding, for row counts that fill the tile, part of it, or one row of it."""
    torch.manual_seed(rows + n)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    wg, wu = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(2))
    for tiles in (skinny.DEFAULT, skinny.GATE_UP, skinny.Tiles(64, 128, 4, 4, split_k=2)):
        assert skinny.supported(x, wg, tiles=tiles)
        out = skinny.linear(x[None], wg, tiles)
        assert out.shape == (1, rows, n) and out.dtype == torch.bfloat16
        assert _rel(out[0], x.float() @ wg.float().T) < 1e-2
    buffer = torch.full((rows + 3, n), 7.0, device="cuda", dtype=torch.bfloat16)  # out: the last rows of a buffer
    got = skinny.linear(x, wg, skinny.DEFAULT, out=buffer[3:])
    assert got.data_ptr() == buffer[3:].data_ptr() and _rel(buffer[3:], x.float() @ wg.float().T) < 1e-2
    assert (buffer[:3] == 7.0).all(), "rows before out are left alone"
    with pytest.raises(ValueError, match="out must be"):
        skinny.linear(x, wg, skinny.DEFAULT, out=buffer[:, : n // 2])
    ref = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)
    out = torch.ops.saisa.gate_up(x, wg, wu)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-2
    assert not skinny.supported(x[:, :-8], wg[:, :-8]), "K must tile by block_k"
    assert not skinny.supported(torch.randn(65, k, device="cuda", dtype=torch.bfloat16), wg)


def test_graphed_prefill_with_the_triton_ffn_matches_aten():
    """The compiled text layers with skinny.gate_up (ffn="triton", the default where Triton is installed) compute
    the reference's function, as the aten FFN does, in the CUDA graph too."""
    model = _model("saisa")
    ids, feats = _prompt(model, seed=3)
    outs = {}
    with torch.no_grad():
        ref = model(input_ids=ids, image_features=feats).logits[:, -1:].float()
        text_rows = torch.empty(1, ids.shape[1] - 1, model.config.text_config.hidden_size, device="cuda",
                                dtype=torch.bfloat16)  # the image placeholder's row is dropped on this path
        for ffn in ("aten", "triton"):
            model.optimize_for_inference(compile=True, ffn=ffn)
            assert model._fused.ffn == ffn
            w = model._fused.layers[0]
            assert skinny.supported(text_rows, w.wg, w.wu, tiles=skinny.GATE_UP), "the kernel must serve these rows"
            outs[ffn] = GraphedForward(model, ids, image_features=feats)(feats).float().clone()
        model.optimize_for_inference(compile=True)
        assert model._fused.ffn == "triton"
    assert _rel(outs["triton"], ref) < 2e-2
    assert _rel(outs["triton"], outs["aten"]) < 2e-2


@pytest.mark.parametrize("b,t,sv,hq,hkv,d,text_first", [
    (1, 64, 576, 32, 32, 128, False),  # the paper's shapes at t=64
    (2, 37, 100, 8, 2, 64, True),  # GQA, padding, text before the image, a partial query block
    (1, 128, 576, 8, 8, 128, True),  # two query blocks
    (3, 5, 40, 4, 4, 32, False),  # fewer keys than a key block per span
])
def test_text_attention_matches_the_reference(b, t, sv, hq, hkv, d, text_first):
    """text_attention's kernels (RoPE as loaded, online softmax per key span, log-sum-exp merge) against RoPE and
    attention in fp32 (fused.key_value, apply_rope, attend), for each way of splitting the keys and both tables."""
    torch.manual_seed(b * t + sv)
    q = torch.randn(b, t, hq * d, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(b, sv + t, 2 * hkv * d, device="cuda", dtype=torch.bfloat16)
    inv = 10000.0 ** (-torch.arange(0, d, 2, device="cuda").float() / d)
    ang = torch.arange(sv + t, device="cuda").float()[:, None] * inv
    cos, sin = (f(torch.cat([ang, ang], -1)).expand(b, -1, -1).to(torch.bfloat16).contiguous() for f in (torch.cos,
                                                                                                         torch.sin))
    allowed = torch.ones(b, 1, t, sv + t, dtype=torch.bool, device="cuda")
    allowed[..., sv:] = torch.tril(allowed[0, 0, :, sv:])
    if text_first:  # the first 3 text tokens come before the image: they see no visual key
        allowed[..., :3, :sv] = False
    if b > 1:  # the second sample left-padded: its first 2 text rows are padding, which sees only itself
        allowed[1, ..., sv:sv + 2] = False
        allowed[1, ..., :2, sv:sv + 2] = torch.eye(2, dtype=torch.bool, device="cuda")
    bias = torch.zeros(allowed.shape, dtype=torch.bfloat16, device="cuda").masked_fill(~allowed, float("-inf"))
    k, v = key_value(kv.float(), cos.float(), sin.float(), d)
    rq = apply_rope(q.float().view(b, t, hq, d), cos[:, -t:, None].float(), sin[:, -t:, None].float())
    ref = attend(rq.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias.float(), d**-0.5, "sdpa")
    ref = ref.transpose(1, 2).reshape(b, t, -1)
    assert text_attention.supported(q, kv, d) and text_attention.halves_equal(cos, sin)
    for setting in ({}, {"split": 1}, {"split": 3, "half_table": True}, {"split": 100}, {"block_n": 32},
                    {"block_m": 16}, {"block_m": 32, "split": 1}):
        out = text_attention.text_attention(q, kv, cos, sin, bias, d, **setting)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all(), setting
        assert _rel(out, ref) < 1e-2, setting
    assert _rel(torch.ops.saisa.text_attention(q, kv, cos, sin, bias, d, True), ref) < 1e-2
    with pytest.raises(ValueError, match="block_m"):
        text_attention.text_attention(q, kv, cos, sin, bias, d, block_m=24)


def test_tiled_weights_give_the_same_bits():
    """skinny's kernels reading weights laid out by skinny.tile (each program's blocks contiguous) compute bit for
    bit what they compute from the (N, K) weights: the same blocks in the same order. linear (split-K too, and as
    a programmatic dependent that prefetches), gate_up and linear_residual; a weight tiled for other blocks is
    refused."""
    torch.manual_seed(11)
    b, t, h, f = 1, 37, 256, 512
    x = torch.randn(b, t, h, device="cuda", dtype=torch.bfloat16)
    wq = torch.randn(h, h, device="cuda", dtype=torch.bfloat16) * h**-0.5
    wg, wu = (torch.randn(f, h, device="cuda", dtype=torch.bfloat16) * h**-0.5 for _ in range(2))
    wd = torch.randn(h, f, device="cuda", dtype=torch.bfloat16) * f**-0.5
    ln = torch.rand(h, device="cuda", dtype=torch.bfloat16) + 0.5
    res = skinny.RESIDUAL
    forms = [res, res._replace(split_k=2)]
    if skinny.pdl_supported(x.device):
        forms.append(res._replace(prefetch=4))
    for tiles in forms:
        pdl = tiles.prefetch > 0
        tiled = skinny.tile(wq, tiles)
        assert skinny.supported(x, tiled, tiles=tiles)
        assert torch.equal(skinny.linear(x, tiled, tiles, pdl=pdl), skinny.linear(x, wq, tiles, pdl=pdl))
    out, x_ln, ss = skinny.linear_residual(x, wq, x, ln, tiles=res)
    out_t, x_ln_t, ss_t = skinny.linear_residual(x, skinny.tile(wq, res), x, ln, tiles=res)
    assert torch.equal(out_t, out) and torch.equal(x_ln_t, x_ln)
    assert_close(ss_t, ss, rtol=1e-5, atol=1e-4)  # fp32 atomics: the order programs finish in
    inner = skinny.gate_up(x_ln, wg, wu, skinny.GATE_UP, ss=ss, eps=1e-5)
    gate_up = skinny.GATE_UP
    assert torch.equal(skinny.gate_up(x_ln, skinny.tile(wg, gate_up), skinny.tile(wu, gate_up), gate_up, ss=ss,
                                      eps=1e-5), inner)
    down, _, _ = skinny.linear_residual(inner, wd, out, tiles=res)
    assert torch.equal(skinny.linear_residual(inner, skinny.tile(wd, res), out, tiles=res)[0], down)
    with pytest.raises(ValueError, match="not \\(64, 128\\)"):
        skinny.linear(x, skinny.tile(wq, res), res._replace(block_n=64))
    with pytest.raises(ValueError, match="both be tiled"):
        skinny.gate_up(x_ln, skinny.tile(wg, gate_up), wu, gate_up)


def test_lm_head_runs_as_a_skinny_linear_after_the_skinny_step():
    """With the skinny step chosen (Hopper), a few rows' logits come from skinny.linear on the lm_head's weight:
    the reference's within bf16 rounding; with autograd on, the module itself runs."""
    if not skinny.pdl_supported(torch.device("cuda")):
        pytest.skip("the skinny step is chosen where programmatic dependent launch runs (Hopper and later)")
    torch.manual_seed(0)
    text = tiny_text_config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=1024)
    model = SaisaForConditionalGeneration(tiny_config("saisa", text=text)).to("cuda", torch.bfloat16).eval()
    head = model.language_model.lm_head
    hidden = torch.randn(1, 3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = head(hidden)
        model.optimize_for_inference(compile=True)
        assert model._fused.step == "skinny"
        got = model._lm_head(hidden)
        assert torch.equal(got, skinny.linear(hidden, head.weight, skinny.RESIDUAL))
        assert _rel(got, ref) < 1e-2
    assert torch.equal(model._lm_head(hidden), ref), "with autograd on, the module runs"


def test_linear_residual_and_the_deferred_norm_match_aten():
    """skinny.linear_residual's epilogue (residual add, the rows times the next norm's weight, a copy into strided
    rows, partial sums of squares) and skinny.gate_up dividing by the RMS from those sums equal the reference:
    h = residual + x W^T, then SiLU(RMSNorm(h) W_g^T) * (RMSNorm(h) W_u^T)."""
    torch.manual_seed(5)
    b, t, k, n, inner, eps = 2, 23, 512, 256, 1024, 1e-5
    x = torch.randn(b, t, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    residual = torch.randn(b, t + 7, n, device="cuda", dtype=torch.bfloat16)[:, 7:]  # strided rows
    ln = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    room = torch.zeros(b, 40 + t, n, device="cuda", dtype=torch.bfloat16)
    out, x_ln, ss = skinny.linear_residual(x, w, residual, ln, rows_out=room[:, 40:], tiles=skinny.RESIDUAL)
    ref = residual + (x @ w.T)
    assert out.shape == (b, t, n) and ss.shape == (b * t,)
    assert_close(out, ref, atol=2e-2, rtol=1e-2)
    assert torch.equal(room[:, 40:], out) and not room[:, :40].any(), "rows_out gets h, nothing else is touched"
    assert_close(x_ln, out * ln, atol=2e-2, rtol=1e-2)
    assert_close(ss, out.float().pow(2).sum(-1).flatten(), rtol=1e-4, atol=1e-3)
    wg, wu = (torch.randn(inner, n, device="cuda", dtype=torch.bfloat16) * n**-0.5 for _ in range(2))
    normed = ln * (out.float() * torch.rsqrt(out.float().pow(2).mean(-1, keepdim=True) + eps)).to(out.dtype)
    expect = torch.nn.functional.silu(normed @ wg.T) * (normed @ wu.T)
    got = skinny.gate_up(x_ln, wg, wu, skinny.GATE_UP, ss=ss, eps=eps)
    assert _rel(got, expect) < 1e-2
    last, none, _ = skinny.linear_residual(x, w, residual)
    assert none is None and torch.equal(last, out)
    # dead: the programs drop a dead tensor's whole L2 lines first; the result is the same, bit for bit, and the
    # partial line it shares with a live neighbour keeps the neighbour's data
    buf = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    start = next(o for o in range(64) if buf[o:].data_ptr() % 128 == 0)
    keep = buf[start + 650:].clone()
    for pdl in (False, skinny.pdl_supported(x.device)):
        got, _, _ = skinny.linear_residual(x, w, residual, ln, tiles=skinny.RESIDUAL, pdl=pdl,
                                           dead=buf[start:start + 650])
        assert torch.equal(got, out), pdl
        assert torch.equal(buf[start + 650:], keep), "the neighbour keeps its data"
    with pytest.raises(ValueError, match="16-bit"):
        skinny.linear_residual(x, w, residual, dead=buf.float())
    with pytest.raises(ValueError, match="sums of squares"):
        skinny.gate_up(x_ln, wg, wu, skinny.GATE_UP, ss=ss[:-1], eps=eps)


def test_merges_says_whether_a_merge_kernel_follows_the_spans():
    """fused.skinny_layer_step lets o_proj drop kv early only when a merge kernel runs between it and the span
    kernel (kv's last reader): text_attention.merges must say so exactly when the keys are split into spans."""
    def qkv(b, t, s, hq, d=32):
        return (torch.empty(b, t, hq * d, device="cuda", dtype=torch.bfloat16),
                torch.empty(b, s, 2 * hq * d, device="cuda", dtype=torch.bfloat16))
    assert text_attention.merges(*qkv(1, 64, 640, 32), 32)  # t=64 at 7B: 5 spans
    assert not text_attention.merges(*qkv(1, 8, 640, 1024), 32)  # a program per (head, query block) fills the GPU
    assert not text_attention.merges(*qkv(1, 8, 64, 4), 32)  # the keys fit one span


@pytest.mark.parametrize("b,t,sv", [(1, 64, 576), (2, 37, 100)])
def test_text_attention_divides_text_rows_by_their_rms(b, t, sv):
    """text_attention(row_sums=...) on queries and text keys/values projected from rows not yet divided by their
    RMS equals attention on the divided ones (the visual rows are left as they are)."""
    torch.manual_seed(t)
    hq, d, h, eps = 8, 64, 512, 1e-6
    rows = torch.randn(b, t, h, device="cuda") * 3
    rstd = torch.rsqrt(rows.pow(2).mean(-1) + eps)  # (B, T)
    sums = rows.pow(2).sum(-1).flatten()
    q = torch.randn(b, t, hq * d, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(b, sv + t, 2 * hq * d, device="cuda", dtype=torch.bfloat16)
    cos, sin = _rope(b, sv + t, d)
    allowed = torch.ones(b, 1, t, sv + t, dtype=torch.bool, device="cuda")
    allowed[..., sv:] = torch.tril(allowed[0, 0, :, sv:])
    bias = torch.zeros(allowed.shape, dtype=torch.bfloat16, device="cuda").masked_fill(~allowed, float("-inf"))
    divided_q = (q.float() * rstd[..., None]).to(q.dtype)
    divided_kv = kv.clone()
    divided_kv[:, sv:] = (kv[:, sv:].float() * rstd[..., None]).to(kv.dtype)
    ref = text_attention.text_attention(divided_q, divided_kv, cos, sin, bias, d, half_table=True)
    out = text_attention.text_attention(q, kv, cos, sin, bias, d, half_table=True, row_sums=sums, row_dim=h,
                                        eps=eps)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-2
    with pytest.raises(ValueError, match="row_dim"):
        text_attention.text_attention(q, kv, cos, sin, bias, d, row_sums=sums)


@pytest.mark.parametrize("b,t,sv,row_sums,scaled", [(1, 64, 576, True, True), (2, 37, 100, False, True),
                                                    (2, 37, 100, False, False)])
def test_text_attention_adds_bias_and_divides_visual_rows(b, t, sv, row_sums, scaled):
    """text_attention(vis_rstd=..., kv_bias=...) on visual k/v rows projected before their bias and their norm's
    division (fused.visual_rows_chunk) equals attention on the finished rows; with or without the text rows'
    deferred division (row_sums) beside it, and the bias alone (not scaled)."""
    torch.manual_seed(sv)
    hq, d, h, eps = 8, 64, 512, 1e-6
    q = torch.randn(b, t, hq * d, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(b, sv + t, 2 * hq * d, device="cuda", dtype=torch.bfloat16) * 4
    kv_bias = torch.randn(2 * hq * d, device="cuda")
    vis_rstd = torch.rand(b, sv, device="cuda") + 0.1 if scaled else None
    cos, sin = _rope(b, sv + t, d)
    allowed = torch.ones(b, 1, t, sv + t, dtype=torch.bool, device="cuda")
    allowed[..., sv:] = torch.tril(allowed[0, 0, :, sv:])
    bias = torch.zeros(allowed.shape, dtype=torch.bfloat16, device="cuda").masked_fill(~allowed, float("-inf"))
    rows = torch.randn(b, t, h, device="cuda") * 3
    sums = rows.pow(2).sum(-1).flatten() if row_sums else None
    finished = kv.clone()  # the text rows stay as they are: with row_sums both calls divide them
    finished[:, :sv] = ((kv[:, :sv].float() + kv_bias) * (vis_rstd[..., None] if scaled else 1)).to(kv.dtype)
    ref = text_attention.text_attention(q, finished, cos, sin, bias, d, half_table=True, row_sums=sums, row_dim=h,
                                        eps=eps)
    out = text_attention.text_attention(q, kv, cos, sin, bias, d, half_table=True, row_sums=sums, row_dim=h, eps=eps,
                                        vis_rstd=vis_rstd, kv_bias=kv_bias)
    assert torch.isfinite(out).all() and _rel(out, ref) < 1e-2
    with pytest.raises(ValueError, match="vis_rstd"):
        text_attention.text_attention(q, kv, cos, sin, bias, d, vis_rstd=torch.ones(b, sv - 1, device="cuda"))
    with pytest.raises(ValueError, match="kv_bias"):
        text_attention.text_attention(q, kv, cos, sin, bias, d, kv_bias=kv_bias.half())


@pytest.mark.parametrize("chunk,overlap", [(None, False), (1, True)])
def test_graphed_skinny_step_matches_compiled_and_reference(chunk, overlap):
    """step="skinny" (fused.skinny_layer_step: norms deferred into the kernels that read them) computes the
    reference's function, as the compiled step does, in the CUDA graph and with the visual chunks on a side stream
    (each layer's last kernel writes the next layer's k/v input rows, after that layer's chunk); so does it with
    pdl (each kernel but the k/v GEMM launched while the one before still runs, waiting for its writes)."""
    model = _model("saisa")
    ids, feats = _prompt(model, seed=4)
    outs = {}
    with torch.no_grad():
        ref = model(input_ids=ids, image_features=feats).logits[:, -1:].float()
        text_rows = torch.empty(1, ids.shape[1] - 1, 256, device="cuda", dtype=torch.bfloat16)
        forms = {"compiled": {"step": "compiled"}, "skinny": {"step": "skinny", "pdl": False},
                 "skinny-untiled": {"step": "skinny", "pdl": False, "tile": False}}
        if skinny.pdl_supported(torch.device("cuda")):  # programmatic dependent launches: Hopper and later
            forms["skinny-pdl"] = {"step": "skinny", "pdl": True}
        for name, form in forms.items():
            model.optimize_for_inference(compile=True, chunk=chunk, overlap=overlap, **form)
            assert model._fused.step == form["step"] and model._fused.pdl == form.get("pdl", False)
            tiled = form["step"] == "skinny" and form.get("tile", True)
            assert (model._fused.skinny_layers is not None) == tiled, "auto: weights tiled for the skinny step"
            if tiled:
                assert model._fused.skinny_layers[0].wq.dim() == 4
                assert skinny_supported(text_rows, model._fused.skinny_layers[0], 32), "the skinny step must serve"
            assert skinny_supported(text_rows, model._fused.layers[0], 32), "the skinny step must serve these rows"
            graphed = GraphedForward(model, ids, image_features=feats)
            outs[name] = graphed(feats).float().clone()
            eager = model(input_ids=ids, image_features=feats).logits[:, -1:].float()
            assert _rel(eager, outs[name]) < 1e-2
        model.optimize_for_inference(compile=True)
        auto = "skinny" if skinny.pdl_supported(torch.device("cuda")) else "compiled"
        assert model._fused.step == auto and model._fused.pdl == (auto == "skinny"), "auto: skinny with pdl on Hopper"
        model.optimize_for_inference(compile=True, pdl=False)
        assert model._fused.step == "compiled" and not model._fused.pdl
        with pytest.raises(ValueError, match="needs attention and ffn"):
            model.optimize_for_inference(compile=True, ffn="aten", step="skinny")
    for name in forms:
        assert _rel(outs[name], ref) < 2e-2
        assert _rel(outs[name], outs["compiled"]) < 2e-2
    assert _rel(outs["skinny"], outs["skinny-untiled"]) < 5e-3, "tiling changes the layout, not the arithmetic"


def test_rows_rstd_matches_the_compiled_one():
    """skinny.rows_rstd (a few programs of whole rows, to run beside the k/v GEMM) equals fused.rows_rstd on one
    layer's strided visual rows in bf16, and refuses a width that is not a power of two."""
    from saisa.model.fused import rows_rstd

    torch.manual_seed(7)
    v, t, h = 37, 5, 512
    rows = torch.randn(1, v + t, h, device="cuda", dtype=torch.bfloat16) * 3
    b2 = torch.randn(h, device="cuda", dtype=torch.bfloat16)
    out = torch.full((v,), -1.0, device="cuda")
    got = skinny.rows_rstd(rows[0, :v], b2, 1e-5, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(got, rows_rstd(rows[:, :v], b2[None], 1e-5)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two width"):
        skinny.rows_rstd(rows[0, :v, :384], b2[:384], 1e-5, out=out)


def test_pdl_kernels_match_serial_launches():
    """skinny's GEMMs and text_attention launched as programmatic dependents (weight lines prefetched before the
    wait) compute what they compute launched in turn, back to back in one CUDA graph where each reads the one
    before's output."""
    if not skinny.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper or later GPU")
    torch.manual_seed(3)
    h, f, t = 256, 512, 24
    x = torch.randn(1, t, h, device="cuda", dtype=torch.bfloat16)
    wq, wo = (torch.randn(h, h, device="cuda", dtype=torch.bfloat16) * h**-0.5 for _ in range(2))
    wg, wu = (torch.randn(f, h, device="cuda", dtype=torch.bfloat16) * h**-0.5 for _ in range(2))
    wd = torch.randn(h, f, device="cuda", dtype=torch.bfloat16) * f**-0.5
    tiles = skinny.RESIDUAL._replace(prefetch=4)

    def chain(pdl):
        q = skinny.linear(x, wq, tiles, pdl=pdl)
        hidden, x_ln, ss = skinny.linear_residual(q, wo, x, torch.ones(h, device="cuda", dtype=torch.bfloat16),
                                                  tiles=tiles, pdl=pdl)
        inner = skinny.gate_up(x_ln, wg, wu, skinny.GATE_UP._replace(prefetch=4), ss=ss, eps=1e-5, pdl=pdl)
        return skinny.linear_residual(inner, wd, hidden, tiles=tiles, pdl=pdl)[0]

    outs = {}
    for pdl in (False, True):
        chain(pdl)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(pdl)
        graph.replay()
        outs[pdl] = out.float().clone()
    assert _rel(outs[True], outs[False]) < 1e-3
    with pytest.raises(ValueError, match="power of two"):
        skinny.linear(x, wq, tiles._replace(prefetch=3), pdl=True)


def test_linear_gelu_tanh_epilogue():
    """fused.linear_gelu_tanh on CUDA (cuBLASLt's bias + GELU epilogue) is the tanh form of GELU, within bf16
    rounding, and differs from the erf form."""
    from saisa.model.fused import linear_gelu_tanh

    torch.manual_seed(5)
    x = torch.randn(96, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16) * 128**-0.5
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16) * 0.1
    out = linear_gelu_tanh(x, w, b).float()
    pre = F.linear(x.float(), w.float(), b.float())
    assert _rel(out, F.gelu(pre, approximate="tanh")) < 4e-3
    # In fp32 the forms part (by up to 5e-4, near |x| = 2.7): the epilogue's is the tanh one.
    x32 = torch.linspace(-4, 4, 4096, device="cuda").view(32, 128)
    eye = torch.eye(128, device="cuda")
    out32 = linear_gelu_tanh(x32, eye, torch.zeros(128, device="cuda"))
    assert (out32 - F.gelu(x32, approximate="tanh")).abs().max() < 2e-5
    assert (out32 - F.gelu(x32)).abs().max() > 1e-4


def _trainable_copy(seed: int) -> SaisaForConditionalGeneration:
    """A tiny fp32 saisa model on CUDA in the bench's stage-2 state (everything but the vision tower trained)."""
    torch.manual_seed(seed)
    model = SaisaForConditionalGeneration(tiny_config("saisa")).to("cuda").train()
    model.vision_tower.requires_grad_(False)
    return model


def test_graphed_train_step_matches_eager_steps():
    """Each call is one real step on its own batch: the image moves and padding changes between batches (new layout
    values, same shapes), the learning rate changes, and the replayed graph follows, loss by loss and weight by
    weight."""
    from saisa.train.graphed import GraphedTrainStep

    eager, graphed = _trainable_copy(0), _trainable_copy(0)
    params = [[p for p in m.parameters() if p.requires_grad] for m in (eager, graphed)]
    opts = [torch.optim.AdamW(ps, lr=1e-3, fused=True, capturable=True) for ps in params]
    step = GraphedTrainStep(graphed, opts[1], warmup=1, max_grad_norm=1.0)
    # A schedule that changes the rate every step: the replays must read the new rate, not the captured one.
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1.0 / (1 + 3 * i)) for o in opts]
    for i, (at, pad) in enumerate(((2, 0), (6, 3), (9, 0), (4, 1))):
        ids = torch.stack([random_ids(16, seed=10 * i + b) for b in range(2)])
        ids[:, at] = IMAGE_TOKEN_ID
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        labels = ids.masked_fill(mask == 0, -100)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))
        batch = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda(),
                 "pixel_values": pixels.cuda()}
        opts[0].zero_grad(set_to_none=True)
        loss = eager(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params[0], 1.0, foreach=True)
        opts[0].step()
        assert_close(step(**batch), loss.detach(), rtol=1e-4, atol=1e-5)
        for schedule in schedules:
            schedule.step()
    assert step.graph is not None, "the last steps were to be replayed from the graph"
    for a, b in zip(*params):
        assert_close(b, a, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        step(input_ids=batch["input_ids"][:, :-1], labels=batch["labels"][:, :-1],
             attention_mask=batch["attention_mask"][:, :-1], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainStep(eager, torch.optim.AdamW(params[0], fused=True))


def test_garbage_collection_during_a_capture_leaves_it_valid():
    """A graph held only by a dead reference cycle is not destroyed while another graph is captured: destroying a
    graph is not permitted during a capture and invalidates it (test_suite_on_cuda_tiny failed so, at random, when a
    collection fell inside one). Here the collector is made to run at every allocation inside the capture; with
    torch.cuda.graph alone (no paused collector) the capture fails."""
    x = torch.ones(8, device="cuda")
    old = torch.cuda.CUDAGraph()
    with capturing(old):
        y = x * 2
    old.replay()
    holder = [old]
    holder.append(holder)  # a cycle: only the cyclic collector frees it, and the graph with it
    del old
    graph = torch.cuda.CUDAGraph()
    thresholds = gc.get_threshold()
    try:
        with capturing(graph):
            z = x + 1
            del holder  # now garbage, for the collector to find
            gc.set_threshold(1, 1, 1)
            junk = [[[]] for _ in range(1000)]  # allocations: with the collector on, collections run here
            z = z + len(junk)
    finally:
        gc.set_threshold(*thresholds)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(z, torch.full_like(x, 1002.0)) and torch.equal(y, x * 2)
    gc.collect()  # the old graph goes now, outside any capture
