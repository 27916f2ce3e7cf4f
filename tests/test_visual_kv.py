"""saisa's training visual path (visual_kv.stacked_key_value) against a naive per-layer one built from the HF modules:
same loss and same gradients for shared (stage 1) and per-layer (stage 2) projectors, and lean autograd memory; the
per-layer checkpoints and the one-Function path of stage 2 (visual_grad.VisualKeyValue) against it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import (
    IMAGE_TOKEN_ID,
    random_ids,
    random_pixels,
    tiny_model,
    tiny_text_config,
)
from torch.func import functional_call
from torch.testing import assert_close
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from saisa.model import visual_grad, visual_kv
from saisa.model.decoder import query_key_value
from saisa.train.stages import StageConfig, apply_stage


def naive_key_value(layers, visual, cos, sin):
    """The definition, layer by layer with the HF modules: K_j, V_j from input_layernorm_j(V_j) (visual (c|1, ...))."""
    kv = []
    for j, layer in enumerate(layers):
        x = visual[j if visual.shape[0] > 1 else 0]
        _, key, value = query_key_value(layer, layer.input_layernorm(x), cos, sin, with_query=False)
        kv.append((key, value))
    return kv


def loss_and_grads(model, ids, pixels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch(seed: int) -> torch.Tensor:
    rows = []
    for k, at in enumerate(([2, 7], [4, 9])):  # two images per sample, at different places
        ids = random_ids(12, seed + k)
        ids[at] = IMAGE_TOKEN_ID
        rows.append(ids)
    return torch.stack(rows)


@pytest.mark.parametrize("sharing", ["shared", "per_layer"])
@pytest.mark.parametrize("backbone", ["llama", "qwen2", "qwen3"])  # plain; k/v biases; per-head k norms
@pytest.mark.parametrize("trains_llm", [False, True])
def test_loss_and_gradients_match_the_naive_per_layer_path(sharing, backbone, trains_llm, monkeypatch):
    model = tiny_model("saisa", text=tiny_text_config(backbone, num_hidden_layers=3), projector_sharing=sharing)
    model = model.double().train()
    model.fused_visual_kv = False  # the path under test here; the one-Function path is checked against it below
    model.requires_grad_(trains_llm)
    model.multi_modal_projector.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    ids, pixels = batch(seed=30), random_pixels(4).double()

    loss, grads = loss_and_grads(model, ids, pixels)
    monkeypatch.setattr(visual_kv, "stacked_key_value", naive_key_value)
    ref_loss, ref_grads = loss_and_grads(model, ids, pixels)

    assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():  # the norms compute in fp32, as transformers' do: fp32 rounding only
        assert_close(grads[name], ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-6, msg=name)
    want = {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias"}
    if trains_llm:
        layer = "language_model.model.layers.1."
        want |= {layer + "input_layernorm.weight", layer + "self_attn.k_proj.weight", layer + "self_attn.v_proj.weight"}
        want |= {layer + "self_attn.k_proj.bias"} if backbone == "qwen2" else set()
        want |= {layer + "self_attn.k_norm.weight"} if backbone == "qwen3" else set()
    assert want <= grads.keys()


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm with `weight`: one norm per row of a (c, 1, 1, h) weight on x[j] (x[0] when x is
    shared, (1, ...)), or one (h,) weight on all of x."""
    norm = LlamaRMSNorm(x.shape[-1], eps=1e-6)
    if weight.dim() == 1:
        return functional_call(norm, {"weight": weight}, (x,))
    rows = weight.reshape(-1, x.shape[-1])
    return torch.stack([functional_call(norm, {"weight": w}, (x[j if x.shape[0] > 1 else 0],))
                        for j, w in enumerate(rows)])


@pytest.mark.parametrize("shape,weight_shape", [((3, 2, 5, 16), (3, 1, 1, 16)),  # one input per layer
                                                ((1, 2, 5, 16), (3, 1, 1, 16)),  # shared by 3 layers
                                                ((2, 5, 4, 8), (8,))])  # Qwen3's per-head k norm
def test_rms_norm_matches_transformers(shape, weight_shape):
    """visual_kv._RMSNorm: LlamaRMSNorm's values (bf16 bit for bit) and gradients, summed over a shared input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, requires_grad=True)
    w = (1 + 0.3 * torch.randn(weight_shape, generator=g)).requires_grad_()
    out, ref = visual_kv._RMSNorm.apply(x, w, 1e-6), hf_rms_norm(x, w)
    assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g)
    assert_close(torch.autograd.grad(out, (x, w), grad), torch.autograd.grad(ref, (x, w), grad))
    xb, wb = x.detach().bfloat16(), w.detach().bfloat16()
    assert torch.equal(visual_kv._RMSNorm.apply(xb, wb, 1e-6), hf_rms_norm(xb, wb))


@contextmanager
def saved_bytes(model):
    """Yields {storage: bytes} of the tensors autograd saves for backward inside the block, the model's own
    parameters not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def test_shared_input_is_kept_once_for_backward():
    """Stage 1 (LLM frozen, one shared projector input): autograd keeps the input (once) and an fp32 rstd per row,
    nothing per layer, and no weight copies."""
    model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=4)).train()
    model.requires_grad_(False)
    layers = model.language_model.model.layers
    b, sv, h = 2, 16, model.config.text_config.hidden_size
    visual = torch.randn(1, b, sv, h, requires_grad=True)
    cos, sin = model.language_model.model.rotary_emb(visual, torch.arange(sv).expand(b, -1))
    with saved_bytes(model) as saved:
        kv = visual_kv.stacked_key_value(layers, visual, cos, sin)
    rope_tables = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()
    gammas = len(layers) * h * 4
    assert sum(saved.values()) <= visual.untyped_storage().nbytes() + b * sv * 4 + gammas + rope_tables
    sum(k.sum() + v.sum() for k, v in kv).backward()
    assert visual.grad is not None


def test_lora_adapters_on_k_and_v_reach_the_visual_keys():
    """Visual K/V go through k_proj/v_proj as modules, so LoRA adapters apply to them as to the text rows: the
    adapted model equals its merged export."""
    model = apply_stage(tiny_model("saisa", projector_sharing="shared"), StageConfig(stage=2, lora_r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    ids, pixels = batch(seed=31), random_pixels(4)
    with torch.no_grad():
        adapted = model(input_ids=ids, pixel_values=pixels).logits
        merged = model.merge_and_unload()(input_ids=ids, pixel_values=pixels).logits
    rows = ids != IMAGE_TOKEN_ID
    assert_close(adapted[rows], merged[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("trains_llm", [False, True])
def test_recomputed_visual_path_gives_the_same_loss_and_gradients(backbone, trains_llm, monkeypatch):
    """Stage 2 with `visual_recompute`: each layer's visual K/V under its own checkpoint; nothing changes but memory."""
    calls = []
    checkpoint = visual_kv.checkpoint
    monkeypatch.setattr(visual_kv, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    model = tiny_model("saisa", text=tiny_text_config(backbone, num_hidden_layers=3)).double().train()
    model.fused_visual_kv = False  # the reference: autograd keeps everything
    model.requires_grad_(trains_llm)
    model.multi_modal_projector.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    ids, pixels = batch(seed=32), random_pixels(4).double()
    ref_loss, ref_grads = loss_and_grads(model, ids, pixels)
    model.visual_recompute = True
    loss, grads = loss_and_grads(model, ids, pixels)
    assert len(calls) == 3  # one checkpoint per layer
    assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, atol=1e-12, rtol=1e-10, msg=name)


def visual_inputs(model, features, ids):
    """The arguments of saisa_visual_kv for `model` on Z = `features` and the batch `ids`: (layers, projector,
    features, layout, cos, sin)."""
    layout = model.layout(ids, torch.ones_like(ids), features.shape[0], features.shape[1])
    pos, _ = layout.visual_positions(features.shape[1])
    cos, sin = model.language_model.model.rotary_emb(features, pos)
    return model.language_model.model.layers, model.multi_modal_projector, features, layout, cos, sin


def test_recomputed_visual_path_keeps_only_the_features():
    """What autograd keeps of the recomputed visual path: Z (once, for all layers) and the RoPE tables, no
    per-layer activation."""
    model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=4)).train()
    layers, projector, features, layout, cos, sin = visual_inputs(
        model, model.encode_images(random_pixels(4)).detach(), batch(seed=33))
    with saved_bytes(model) as saved:
        kv, _ = visual_kv.saisa_visual_kv(layers, projector, features, layout, cos, sin, recompute=True)
    small = sum(t.untyped_storage().nbytes() for t in (cos, sin, layout.image_slots))
    assert sum(saved.values()) <= features.untyped_storage().nbytes() + small
    sum(k.sum() + v.sum() for k, v in kv).backward()
    assert projector.linear_1.weight.grad is not None and projector.linear_2.bias.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ one Function (stage 2)
def ragged_batch(seed: int) -> torch.Tensor:
    """Two images in sample 0, one in sample 1: an empty image slot (it reads image 0, masked)."""
    rows = [random_ids(12, seed), random_ids(12, seed + 1)]
    rows[0][[2, 7]] = IMAGE_TOKEN_ID
    rows[1][4] = IMAGE_TOKEN_ID
    return torch.stack(rows)


def count_function_calls(monkeypatch) -> list:
    calls: list = []
    apply = visual_grad.VisualKeyValue.apply
    monkeypatch.setattr(visual_grad.VisualKeyValue, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def stage2_model(backbone: str, trains_llm: bool = True, dtype=torch.float64, layers: int = 3, **kw):
    model = tiny_model("saisa", text=tiny_text_config(backbone, num_hidden_layers=layers), **kw).to(dtype).train()
    model.requires_grad_(trains_llm)
    model.multi_modal_projector.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    return model


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])  # plain; k/v biases
@pytest.mark.parametrize("trains_llm", [False, True])
@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "linear"])
@pytest.mark.parametrize("ragged", [False, True])
def test_visual_function_gives_the_same_loss_and_gradients(backbone, trains_llm, projector_type, ragged, monkeypatch):
    """Stage 2 by default (model.fused_visual_kv): one Function for all layers' visual K/V, same loss and gradients
    as autograd through the modules, up to the norm's fp32 rounding (transformers normalises in fp32)."""
    model = stage2_model(backbone, trains_llm, projector_type=projector_type)
    ids = ragged_batch(seed=34) if ragged else batch(seed=34)
    pixels = random_pixels(3 if ragged else 4).double()
    calls = count_function_calls(monkeypatch)
    model.fused_visual_kv = False
    ref_loss, ref_grads = loss_and_grads(model, ids, pixels)
    assert not calls
    model.fused_visual_kv = True
    loss, grads = loss_and_grads(model, ids, pixels)
    assert len(calls) == 1  # all three layers in one call
    assert_close(loss, ref_loss, atol=0, rtol=1e-9)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-6, msg=name)
    if trains_llm:
        layer = "language_model.model.layers.2."
        want = {layer + "input_layernorm.weight", layer + "self_attn.k_proj.weight", layer + "self_attn.v_proj.weight"}
        want |= {layer + "self_attn.k_proj.bias", layer + "self_attn.v_proj.bias"} if backbone == "qwen2" else set()
        assert want <= grads.keys()


def visual_kv_and_grads(model, features, ids, function: bool, chunk: int | None = None):
    """Every layer's visual (K, V) from saisa_visual_kv, and the gradients of a fixed random function of them with
    respect to Z and every parameter."""
    layers, projector, features, layout, cos, sin = visual_inputs(model, features.detach().requires_grad_(), ids)
    model.zero_grad(set_to_none=True)
    kv, _ = visual_kv.saisa_visual_kv(layers, projector, features, layout, cos, sin, chunk=chunk, function=function)
    g = torch.Generator().manual_seed(5)
    sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for pair in kv for t in pair).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for pair in kv for t in pair], features.grad, grads


def test_visual_function_in_chunks_with_feature_gradients(monkeypatch):
    """Chunks of layers (3 layers, 2 per call), and Z's gradient (a trained vision tower): as autograd's."""
    model = stage2_model("qwen2")
    features = model.encode_images(random_pixels(3).double())
    ids = ragged_batch(seed=35)
    ref_kv, ref_dz, ref_grads = visual_kv_and_grads(model, features, ids, function=False)
    calls = count_function_calls(monkeypatch)
    kv, dz, grads = visual_kv_and_grads(model, features, ids, function=True, chunk=2)
    assert len(calls) == 2
    for out, ref in zip(kv, ref_kv):
        assert out.shape == ref.shape and out.stride(-1) == 1
        assert_close(out, ref, atol=1e-7 * ref.abs().max().item(), rtol=1e-7)
    assert_close(dz, ref_dz, atol=1e-6 * ref_dz.abs().max().item(), rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-6, msg=name)


def test_visual_function_in_bf16():
    """bf16 (the GPU training dtype; mixed fp32 scales in place on bf16 rows): loss and gradients within bf16
    rounding of autograd's."""
    model = stage2_model("qwen2", dtype=torch.bfloat16)
    ids, pixels = batch(seed=36), random_pixels(4).bfloat16()
    model.fused_visual_kv = False
    ref_loss, ref_grads = loss_and_grads(model, ids, pixels)
    model.fused_visual_kv = True
    loss, grads = loss_and_grads(model, ids, pixels)
    assert_close(loss, ref_loss, atol=0, rtol=1e-2)
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.bfloat16
        err = (grads[name].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)
        assert err < 3e-2, name


def test_visual_function_keeps_only_the_features_and_the_kv():
    """What autograd keeps of the one-Function path: Z, the pre-RoPE K/V and fp32 RMS scales of every layer, the
    stacked k/v and norm weights of the layers, the RoPE tables and slots; no (B, Sv, h) activation."""
    model = stage2_model("qwen2", dtype=torch.float32, layers=4)
    layers, projector, features, layout, cos, sin = visual_inputs(
        model, model.encode_images(random_pixels(4)).detach(), batch(seed=37))
    attn = layers[0].self_attn
    n, rows, h = len(layers), layout.image_slots.numel() * features.shape[1], projector.linear_1.out_features
    kv_cols = attn.k_proj.out_features + attn.v_proj.out_features
    kept = {}
    for function in (True, False):
        with saved_bytes(model) as saved:
            kv, _ = visual_kv.saisa_visual_kv(layers, projector, features, layout, cos, sin, function=function)
        kept[function] = sum(saved.values())
        sum(k.sum() + v.sum() for k, v in kv).backward()
    element = 4
    weights = n * (h + kv_cols * h + kv_cols) * element  # stacked norm weights, k/v weights and biases
    small = sum(t.untyped_storage().nbytes() for t in (features, cos, sin, layout.image_slots)) + weights
    assert kept[True] <= small + n * rows * (kv_cols + 1) * element
    assert kept[False] - kept[True] >= 2 * n * rows * h * element  # activations autograd keeps, the Function not


def test_visual_function_falls_back_where_it_does_not_apply():
    """Qwen3's per-head k norm, a shared (stage-1) projector and LoRA on k/v take the module path."""
    projector = lambda m: m.multi_modal_projector
    layers = lambda m: m.language_model.model.layers
    model = stage2_model("llama")
    assert visual_grad.supports_visual_function(layers(model), projector(model))
    qwen3 = stage2_model("qwen3")
    assert not visual_grad.supports_visual_function(layers(qwen3), projector(qwen3))
    shared = stage2_model("llama", projector_sharing="shared")
    assert not visual_grad.supports_visual_function(layers(shared), projector(shared))
    lora = apply_stage(tiny_model("saisa"), StageConfig(stage=2, lora_r=4))
    base = lora.get_base_model()
    assert not visual_grad.supports_visual_function(layers(base), projector(base))
