"""Core model tests: saisa/naavit against a naive reference of the paper's definition, llava against HF LLaVA."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import (
    IMAGE_TOKEN_ID,
    random_ids,
    random_pixels,
    tiny_config,
    tiny_model,
    tiny_text_config,
    tiny_vision_config,
)
from torch.testing import assert_close
from transformers import AutoModelForImageTextToText
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from saisa import SaisaForConditionalGeneration


# ----------------------------------------------------------------------------- naive reference
def _mlp(x: torch.Tensor, proj, index: int) -> torch.Tensor:
    """One projector MLP written out: phi(Z W1^T + b1) W2^T + b2, for slice `index` of a stacked projector."""
    def lin(module, inp):
        w = module.weight if module.weight.dim() == 2 else module.weight[index]
        b = module.bias if module.bias.dim() == 1 else module.bias[index]
        return inp @ w.T + b

    x = lin(proj.linear_1, x)
    if proj.projector_type == "mlp2x_gelu":
        x = lin(proj.linear_2, torch.nn.functional.gelu(x))
    return x


def naive_logits(model: SaisaForConditionalGeneration, ids: torch.Tensor, pixels: torch.Tensor | None):
    """Build the full sequence in positional order (each placeholder -> v visual tokens) and apply the definition:
    causal attention over the whole sequence, with only text rows updated (saisa/naavit) or all rows (llava);
    saisa sets the visual rows of layer i's input to MLP_i(Z); naavit sends visual rows through every FFN."""
    arch = model.config.architecture
    lm = model.language_model.model
    layers = lm.layers
    feats = model.encode_images(pixels) if pixels is not None else None
    v = feats.shape[1] if feats is not None else 0
    rows, is_text, img = [], [], 0
    for tok in ids.tolist():
        if tok == IMAGE_TOKEN_ID:
            rows += [("vis", img, r) for r in range(v)]
            is_text += [False] * v
            img += 1
        else:
            rows.append(("text", tok, 0))
            is_text.append(True)
    is_text = torch.tensor(is_text)
    P = len(rows)
    x = torch.zeros(P, lm.config.hidden_size)
    proj = model.multi_modal_projector
    n_mlps = proj.num_mlps if arch == "saisa" else 1

    def visual_rows(layer_idx: int) -> torch.Tensor:
        mlp_idx = layer_idx if n_mlps > 1 else 0
        return torch.stack([_mlp(feats[i, r], proj, mlp_idx) for kind, i, r in rows if kind == "vis"])

    for p, (kind, tok, _) in enumerate(rows):
        if kind == "text":
            x[p] = lm.embed_tokens.weight[tok]
    if v and arch != "saisa":
        x[~is_text] = visual_rows(0)
    pos = torch.arange(P)[None]
    cos, sin = lm.rotary_emb(x[None], pos)
    causal = torch.tril(torch.ones(P, P, dtype=torch.bool))
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if v and arch == "saisa":
            x[~is_text] = visual_rows(i)
        h = layer.input_layernorm(x)[None]
        q = attn.q_proj(h).view(1, P, -1, attn.head_dim)
        k = attn.k_proj(h).view(1, P, -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        val = attn.v_proj(h).view(1, P, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, val = k.repeat_interleave(rep, 1), val.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
        scores = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = attn.o_proj((scores @ val).transpose(1, 2).reshape(1, P, -1))[0]
        upd = torch.ones(P, dtype=torch.bool) if arch == "llava" else is_text
        x = x.clone()
        x[upd] = x[upd] + out[upd]
        ffn_rows = upd if arch != "naavit" else torch.ones(P, dtype=torch.bool)
        x[ffn_rows] = x[ffn_rows] + layer.mlp(layer.post_attention_layernorm(x[ffn_rows]))
    return model.language_model.lm_head(lm.norm(x[is_text]))


def text_rows(ids: torch.Tensor) -> torch.Tensor:
    return ids != IMAGE_TOKEN_ID


def with_images(seed: int, length: int, image_at: list[int]) -> torch.Tensor:
    ids = random_ids(length, seed)
    for p in image_at:
        ids[p] = IMAGE_TOKEN_ID
    return ids


BACKBONES = [
    ("llama", 2),  # GQA
    ("llama", 4),  # MHA
    ("mistral", 2),
    ("qwen2", 2),  # q/k/v biases
    ("qwen3", 2),  # q/k norms
]


@pytest.mark.parametrize("arch", ["saisa", "naavit", "llava"])
@pytest.mark.parametrize("backbone,kv", BACKBONES)
def test_matches_naive_reference(arch, backbone, kv):
    model = tiny_model(arch, text=tiny_text_config(backbone, num_kv_heads=kv))
    ids = with_images(seed=3, length=12, image_at=[2, 7])  # text before, between and after two images
    pixels = random_pixels(2)
    with torch.no_grad():
        ours = model(input_ids=ids[None], pixel_values=pixels).logits[0]
        ref = naive_logits(model, ids, pixels)
    assert_close(ours[text_rows(ids)], ref, atol=1e-5, rtol=1e-5)


def test_saisa_per_layer_projectors_are_used():
    model = tiny_model("saisa")
    assert model.multi_modal_projector.num_mlps == model.config.text_config.num_hidden_layers
    ids = with_images(seed=4, length=8, image_at=[1])
    pixels = random_pixels(1)
    with torch.no_grad():
        before = model(input_ids=ids[None], pixel_values=pixels).logits
        model.multi_modal_projector.linear_2.weight[1].mul_(2.0)  # only layer 1's MLP
        after = model(input_ids=ids[None], pixel_values=pixels).logits
        ref = naive_logits(model, ids, pixels)
    assert not torch.allclose(before, after)
    assert_close(after[0][text_rows(ids)], ref, atol=1e-5, rtol=1e-5)


def test_llava_matches_transformers_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from saisa.convert import from_hf_llava

    torch.manual_seed(0)
    hf_cfg = LlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    ours = from_hf_llava(hf)
    v = ours.num_visual_tokens
    ids = with_images(seed=5, length=10, image_at=[1, 6])
    pixels = random_pixels(2)
    expanded = torch.cat([torch.full((v,), IMAGE_TOKEN_ID) if t == IMAGE_TOKEN_ID else t[None] for t in ids])
    with torch.no_grad():
        ref = hf(input_ids=expanded[None], pixel_values=pixels).logits[0]
        got = ours(input_ids=ids[None], pixel_values=pixels).logits[0]
    assert_close(got[text_rows(ids)], ref[expanded != IMAGE_TOKEN_ID], atol=1e-4, rtol=1e-4)


def test_no_image_equals_bare_llm(arch):
    model = tiny_model(arch)
    ids = random_ids(9, seed=6)[None]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        bare = model.language_model(input_ids=ids).logits
    assert_close(ours, bare, atol=1e-5, rtol=1e-5)


def test_text_before_image_is_unaffected_by_the_image(arch):
    model = tiny_model(arch)
    ids = with_images(seed=7, length=10, image_at=[5])[None]
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=random_pixels(1, seed=1)).logits[0]
        b = model(input_ids=ids, pixel_values=random_pixels(1, seed=2)).logits[0]
    assert_close(a[:5], b[:5], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[6:], b[6:], atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(arch, side):
    model = tiny_model(arch)
    samples = [
        (with_images(seed=8, length=11, image_at=[2, 8]), random_pixels(2, seed=3)),
        (random_ids(6, seed=9), None),
        (with_images(seed=10, length=7, image_at=[0]), random_pixels(1, seed=4)),
    ]
    width = max(len(s) for s, _ in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (s, _) in enumerate(samples):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    pixels = torch.cat([p for _, p in samples if p is not None])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for b, (s, p) in enumerate(samples):
            alone = model(input_ids=s[None], pixel_values=p).logits[0]
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            rows = text_rows(s)
            assert_close(batched[b, sl][rows], alone[rows], atol=1e-5, rtol=1e-5)


def test_loss_is_shifted_cross_entropy_over_text():
    model = tiny_model("saisa")
    ids = with_images(seed=11, length=10, image_at=[3])[None]
    labels = ids.clone()
    labels[0, :2] = -100
    out = model(input_ids=ids, pixel_values=random_pixels(1), labels=labels)
    logits = out.logits[0]
    # Targets predicted from a placeholder row (position 3 -> 4) are excluded; so are -100 labels.
    pairs = [(t - 1, labels[0, t]) for t in range(1, 10) if labels[0, t] != -100 and ids[0, t - 1] != IMAGE_TOKEN_ID
             and ids[0, t] != IMAGE_TOKEN_ID]
    expected = torch.stack([torch.nn.functional.cross_entropy(logits[r], y) for r, y in pairs]).mean()
    assert_close(out.loss, expected)


def test_forward_takes_a_prebuilt_layout():
    """A layout built beforehand (as the graphed training step builds it, from host ids) gives the same loss; one
    built for other ids is refused."""
    model = tiny_model("saisa").train()
    ids = torch.stack([with_images(seed=s, length=10, image_at=[a]) for s, a in ((13, 2), (14, 6))])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    pixels = random_pixels(2)
    layout = model.layout(ids, mask, 2)
    expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids).loss
    given = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids, layout=layout).loss
    assert_close(given, expected)
    moved = torch.stack([with_images(seed=s, length=10, image_at=[a]) for s, a in ((13, 4), (14, 8))])
    elsewhere = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids,
                      layout=model.layout(moved, mask, 2)).loss  # the images' positions taken from the layout
    assert not torch.allclose(elsewhere, expected)
    other = model.layout(ids[:, :-1], mask[:, :-1], 2)
    with pytest.raises(ValueError, match="layout given is for input_ids of shape"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids, layout=other)


def test_gradients_reach_exactly_the_trainable_parameters(arch):
    model = tiny_model(arch).train()
    model.language_model.requires_grad_(False)
    model.language_model.model.layers[1].mlp.requires_grad_(True)
    ids = with_images(seed=12, length=9, image_at=[2])[None]
    model(input_ids=ids, pixel_values=random_pixels(1), labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not any(p.requires_grad for p in model.vision_tower.parameters()), "vision tower must be frozen"


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = with_images(seed=13, length=9, image_at=[2])[None]
    grads = []
    for ckpt in (False, True):
        model = tiny_model("saisa").train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, pixel_values=random_pixels(1), labels=ids).loss.backward()
        grads.append(model.multi_modal_projector.linear_1.weight.grad.clone())
    assert_close(grads[0], grads[1])


def test_save_load_round_trip(arch, tmp_path):
    model = tiny_model(arch, projector_sharing="shared") if arch == "saisa" else tiny_model(arch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SaisaForConditionalGeneration)
    assert loaded.config.architecture == arch
    ids = with_images(seed=14, length=8, image_at=[1])[None]
    with torch.no_grad():
        assert_close(
            loaded(input_ids=ids, pixel_values=random_pixels(1)).logits,
            model(input_ids=ids, pixel_values=random_pixels(1)).logits,
        )


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_model("saisa", text=tiny_text_config(tie_word_embeddings=True))
    assert model.language_model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.language_model.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert_close(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_expand_shared_projector_keeps_outputs(tmp_path):
    model = tiny_model("saisa", projector_sharing="shared")
    assert model.multi_modal_projector.num_mlps == 1
    ids = with_images(seed=15, length=9, image_at=[4])[None]
    pixels = random_pixels(1)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixels).logits
        model.expand_shared_projector()
        after = model(input_ids=ids, pixel_values=pixels).logits
    assert model.multi_modal_projector.num_mlps == 2 and model.config.projector_sharing == "per_layer"
    assert_close(before, after, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    assert SaisaForConditionalGeneration.from_pretrained(tmp_path).multi_modal_projector.num_mlps == 2


def test_encode_and_project_shapes(arch):
    model = tiny_model(arch)
    z = model.encode_images(random_pixels(3))
    assert z.shape == (3, model.num_visual_tokens, 24)
    v = model.project_images(z)
    n = model.config.text_config.num_hidden_layers
    assert v.shape == ((n, 3, model.num_visual_tokens, 32) if arch == "saisa" else (3, model.num_visual_tokens, 32))


def test_placeholder_count_mismatch_is_a_clear_error():
    model = tiny_model("saisa")
    ids = with_images(seed=16, length=8, image_at=[1, 4])[None]
    with pytest.raises(ValueError, match="2 image placeholder.*1 image"):
        model(input_ids=ids, pixel_values=random_pixels(1))
    with pytest.raises(ValueError, match="0 image"):
        model(input_ids=ids)


def test_wrong_image_shape_is_a_clear_error():
    model = tiny_model("saisa")
    ids = with_images(seed=17, length=8, image_at=[1])[None]
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(input_ids=ids, pixel_values=torch.randn(3, 32, 32))


def test_unsupported_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported LLM backbone.*gpt2"):
        tiny_config(text={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4})
    with pytest.raises(ValueError, match="architecture"):
        tiny_config("flamingo")
    with pytest.raises(ValueError, match="sliding"):
        SaisaForConditionalGeneration(
            tiny_config(text=tiny_text_config("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0))
        )


def test_visual_path_never_runs_visual_ffn_or_visual_queries():
    """saisa: FFNs and q_proj see text rows only; k_proj sees the v visual rows (all layers' visual K/V are made up
    front, saisa.model.visual_kv.stacked_key_value), then the text rows."""
    model = tiny_model("saisa")
    ids = with_images(seed=18, length=10, image_at=[3])[None]
    seen = {}

    def hook(name):
        def fn(module, inputs, output):
            seen.setdefault(name, []).append(inputs[0].shape[-2])
        return fn

    layer = model.language_model.model.layers[0]
    handles = [layer.mlp.register_forward_hook(hook("mlp")), layer.self_attn.q_proj.register_forward_hook(hook("q")),
               layer.self_attn.k_proj.register_forward_hook(hook("k"))]
    with torch.no_grad():
        model(input_ids=ids, pixel_values=random_pixels(1))
    for h in handles:
        h.remove()
    assert seen["mlp"] == [10] and seen["q"] == [10] and seen["k"] == [model.num_visual_tokens, 10]


@pytest.mark.parametrize("fold,chunk", [(True, None), (True, 1), (False, 1), (True, 3)])
def test_inference_fast_path_computes_the_same_function(fold, chunk):
    model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=4))
    ids = with_images(seed=19, length=12, image_at=[2, 7])[None]
    pixels = random_pixels(2)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        model.optimize_for_inference(fold=fold, chunk=chunk)
        fast = model(input_ids=ids, pixel_values=pixels).logits
    assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    model.train()
    assert model._folded_kv is None, "training must drop folded (stale-able) weights"


def test_shared_projector_chunks_match():
    model = tiny_model("saisa", projector_sharing="shared", text=tiny_text_config(num_hidden_layers=3))
    ids = with_images(seed=20, length=9, image_at=[4])[None]
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=random_pixels(1)).logits
        model.optimize_for_inference(fold=True, chunk=2)
        assert_close(model(input_ids=ids, pixel_values=random_pixels(1)).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone,sharing,attention", [
    *[(backbone, sharing, "eager") for backbone in ("llama", "qwen2", "qwen3") for sharing in ("per_layer", "shared")],
    ("llama", "per_layer", "sdpa"),
    ("llama", "per_layer", "flex"),
    ("llama", "per_layer", "triton"),  # on the CPU: no kernels, the eager form serves
])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_compiled_fused_path_computes_the_same_function(backbone, sharing, attention):
    """The pure-function path of fused.py (traced by dynamo; inductor is used on GPU) equals the reference, with
    each form of attention (fused.attend; all three also in test_attention_forms_agree)."""
    model = tiny_model("saisa", text=tiny_text_config(backbone, num_hidden_layers=3), projector_sharing=sharing)
    ids = with_images(seed=21, length=11, image_at=[3, 8])[None]
    pixels = random_pixels(2)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        with pytest.raises(ValueError, match="unknown ffn"):
            model.optimize_for_inference(compile=True, compile_backend="eager", ffn="cutlass")
        with pytest.raises(ValueError, match="unknown attention"):
            model.optimize_for_inference(compile=True, compile_backend="eager", attention="flash")
        with pytest.raises(ValueError, match="unknown step"):
            model.optimize_for_inference(compile=True, compile_backend="eager", step="fast")
        with pytest.raises(ValueError, match="pdl must be"):
            model.optimize_for_inference(compile=True, compile_backend="eager", pdl="yes")
        with pytest.raises(ValueError, match="needs step='skinny'"):
            model.optimize_for_inference(compile=True, compile_backend="eager", step="compiled", pdl=True)
        with pytest.raises(ValueError, match="needs attention and ffn 'triton'"):
            model.optimize_for_inference(compile=True, compile_backend="eager", attention="eager", step="skinny")
        with pytest.raises(ValueError, match="tile must be"):
            model.optimize_for_inference(compile=True, compile_backend="eager", tile="yes")
        with pytest.raises(ValueError, match="tile=True .* needs step='skinny'"):
            model.optimize_for_inference(compile=True, compile_backend="eager", step="compiled", tile=True)
        model.optimize_for_inference(compile=True, compile_backend="eager")
        assert model._fused is None or model._fused.step == "compiled"
        assert model._fused is None or model._fused.attention == "eager", "auto on the CPU: the eager form"
        assert model._fused is None or model._fused.rope_half, "transformers' RoPE tables repeat their first half"
        skinny = {"ffn": "triton", "step": "skinny"} if attention == "triton" else {}  # on the CPU: compiled serves
        model.optimize_for_inference(chunk=2, compile=True, compile_backend="eager", attention=attention, **skinny)
        assert (model._fused is None) == (backbone == "qwen3"), "Qwen3 (k norms) keeps the reference path"
        assert model._fused is None or model._fused.ffn == ("triton" if skinny else "aten"), "aten by default on CPU"
        fast = model(input_ids=ids, pixel_values=pixels).logits
        rows = text_rows(ids[0])
        assert_close(fast[0, rows], ref[0, rows], atol=1e-5, rtol=1e-5)
        # Rows differing in image count cannot drop their placeholders together: the path keeps them.
        mixed = torch.stack([ids[0], with_images(seed=22, length=11, image_at=[5])])
        mask = torch.ones_like(mixed)
        both = model(input_ids=mixed, attention_mask=mask, pixel_values=random_pixels(3)).logits
        model.train().eval()  # drops the fast path
        ref_both = model(input_ids=mixed, attention_mask=mask, pixel_values=random_pixels(3)).logits
    assert_close(both, ref_both, atol=1e-5, rtol=1e-5)


def test_visual_rows_before_bias_and_norm_give_the_unit_rows():
    """fused.visual_rows_chunk (the skinny step's visual rows: linear_2's output before its bias, and the rows'
    1 / RMS with it) holds the same function as visual_inputs_chunk's unit-RMS rows: (rows + b2) * rstd equals
    them, and so does what attention makes of their projection, (rows W^T + W b2) * rstd."""
    from saisa.model.fused import visual_inputs_chunk, visual_rows_chunk

    torch.manual_seed(0)
    c, v, d, h, t, eps = 3, 5, 8, 16, 4, 1e-6
    feats, w1, b1 = torch.randn(1, v, d), torch.randn(c, h, d), torch.randn(c, h)
    w2, b2, wkv = torch.randn(c, h, h), torch.randn(c, h), torch.randn(c, 2 * h, h)
    slots = torch.zeros(1, 1, dtype=torch.long)
    ref = visual_inputs_chunk(feats, slots, w1, b1, w2, b2, c, eps, text_len=t)
    rows, rstd = visual_rows_chunk(feats, slots, w1, b1, w2, b2, c, eps, text_len=t)
    assert rows.shape == ref.shape == (c, 1, v + t, h) and rstd.shape == (c, 1, v) and rstd.dtype == torch.float32
    assert_close((rows[:, :, :v] + b2[:, None, None]) * rstd[..., None], ref[:, :, :v], atol=1e-5, rtol=1e-5)
    projected = (rows[:, 0, :v] @ wkv.transpose(1, 2) + (wkv @ b2[..., None]).transpose(1, 2)) * rstd[:, 0, :, None]
    assert_close(projected, ref[:, 0, :v] @ wkv.transpose(1, 2), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one image in one sample"):
        visual_rows_chunk(feats.expand(2, -1, -1), torch.zeros(1, 2, dtype=torch.long), w1, b1, w2, b2, c, eps)
    # row_rstd None: the same rows, and a buffer for the 1 / RMS that the caller fills layer by layer.
    later, room = visual_rows_chunk(feats, slots, w1, b1, w2, b2, c, eps, text_len=t, row_rstd=None)
    assert torch.equal(later[:, :, :v], rows[:, :, :v]) and room.shape == rstd.shape and room.dtype == torch.float32


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, ids.shape[1] - len(r):], mask[b, ids.shape[1] - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("backbone,kv", [("llama", 2), ("llama", 4), ("qwen2", 2)])
@pytest.mark.parametrize("chunk", [None, 1, (1,)])
def test_merged_kv_gemm_on_a_padded_batch(backbone, kv, chunk):
    """fused.text_layer_step projects each layer's visual and text rows in ONE GEMM with the folded k/v weights
    (GQA, MHA, k/v biases): on a left-padded batch whose rows hold two images each (placeholder rows dropped), its
    text rows equal the reference path's."""
    model = tiny_model("saisa", text=tiny_text_config(backbone, num_kv_heads=kv, num_hidden_layers=3))
    ids, mask = _left_padded([with_images(seed=23, length=12, image_at=[1, 6]),
                              with_images(seed=24, length=8, image_at=[0, 5])])
    pixels = random_pixels(4)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        model.optimize_for_inference(chunk=chunk, compile=True, compile_backend="eager")
        steps = []
        text = model._fused.text
        model._fused.text = lambda *a: steps.append(a[2].shape) or text(*a)
        fast = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert model.layout(ids, mask, 4).text_columns is not None, "rows with equal image counts drop placeholders"
    v = model.num_visual_tokens
    assert steps == [torch.Size([2, 2 * v + 10, 32])] * 3, "each layer's buffer: Sv visual rows, then T text rows"
    keep = mask.bool() & (ids != IMAGE_TOKEN_ID)
    assert_close(fast[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_chunk_slices():
    from saisa.model.visual_kv import chunk_slices

    ranges = lambda chunk: [(sl.start, sl.stop) for sl in chunk_slices(7, chunk)]
    assert ranges(None) == [(0, 7)]
    assert ranges(3) == [(0, 3), (3, 6), (6, 7)]
    assert ranges((2,)) == [(0, 2), (2, 7)], "a tuple: the first chunks' sizes, then the rest in one"
    assert ranges((1, 2)) == [(0, 1), (1, 3), (3, 7)]
    assert ranges((3, 4)) == [(0, 3), (3, 7)], "no empty last chunk"
    for bad in (0, (0, 2), (4, 4), ()):
        with pytest.raises(ValueError):
            chunk_slices(7, bad)


def test_prefill_schedule_changes_without_recompiling():
    """set_prefill_schedule reorders the compiled path's visual chunks (all at once, one per layer, the first layer
    then the rest) on the same compiled functions; every order computes the reference's function, and a schedule
    that does not fit the layers fails before anything is folded or compiled."""
    model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=3))
    ids = with_images(seed=27, length=11, image_at=[2, 6])[None]
    pixels = random_pixels(2)
    with pytest.raises(ValueError, match="cover at most the 3 layers"):
        model.optimize_for_inference(chunk=(2, 2), compile=True, compile_backend="eager")
    assert model._folded_kv is None and model._fused is None
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        model.optimize_for_inference(compile=True, compile_backend="eager")
        fused = model._fused
        assert fused.chunks is None and model._visual_stream is None, "default: all layers at once, one stream"
        rows = text_rows(ids[0])
        sizes, visual = [], fused.visual
        fused.visual = lambda *a: sizes.append(a[-3]) or visual(*a)  # (..., layers, eps, text_len)
        for chunk, overlap in [(None, False), (1, True), ((1,), True), ((1, 1), False)]:
            model.set_prefill_schedule(chunk, overlap)
            assert model._fused is fused and fused.chunks == chunk
            sizes.clear()
            out = model(input_ids=ids, pixel_values=pixels).logits
            assert sizes == {None: [3], 1: [1, 1, 1], (1,): [1, 2], (1, 1): [1, 1, 1]}[chunk]
            assert_close(out[0, rows], ref[0, rows], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError):
            model.set_prefill_schedule((4,))


@pytest.mark.parametrize("kind", ["eager", "flex"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_forms_agree(kind, heads, kv_heads, dtype):
    """fused.attend's eager (grouped GQA) and flex forms equal SDPA with the same float mask: MHA, GQA, MQA, a
    batch of 2, non-contiguous K/V views (as text_layer_step passes them), rows that see a single key."""
    from saisa.model.fused import attend

    g = torch.Generator().manual_seed(0)
    b, t, s, d = 2, 5, 13, 8
    q = torch.randn(b, t, heads, d, generator=g).to(dtype).transpose(1, 2)
    kv = torch.randn(b, s, 2, kv_heads, d, generator=g).to(dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, Hkv, S, D) views
    allowed = torch.rand(b, 1, t, s, generator=g) > 0.5
    allowed[..., -t:] |= torch.eye(t, dtype=torch.bool)  # each query sees itself
    allowed[1, 0, 0] = False
    allowed[1, 0, 0, s - t] = True  # a row with one key
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    ref = attend(q.float(), k.float(), v.float(), bias.float(), d**-0.5, "sdpa")
    out = attend(q, k, v, bias, d**-0.5, kind)
    assert out.shape == (b, heads, t, d) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(out.float(), ref, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="unknown attention"):
        attend(q, k, v, bias, d**-0.5, "flash")


def test_text_attention_rejects_what_it_cannot_run():
    from saisa.model import text_attention

    q, kv = torch.randn(1, 4, 64), torch.randn(1, 10, 128)
    cos = torch.ones(1, 10, 32)
    bias = torch.zeros(1, 1, 4, 10)
    assert not text_attention.supported(q, kv, 32), "no kernels on the CPU"
    with pytest.raises(ValueError, match="check supported"):
        text_attention.text_attention(q, kv, cos, cos, bias, 32)
    with pytest.raises(ValueError, match="do not fit head_dim 32"):
        text_attention.text_attention(q, kv, cos, cos, bias[..., :9], 32)
    assert text_attention.halves_equal(torch.cat([cos, cos], -1), torch.zeros(1, 10, 64))
    assert not text_attention.halves_equal(torch.arange(4.0), torch.zeros(4))


def test_tiled_weights_hold_each_programs_blocks_in_turn():
    """skinny.tile lays W (N, K) out as (N / bn, K / bk, bn, bk): block (i, j) is W's rows i*bn.. and columns
    j*bk.., contiguous, in K order within each row block; weight_shape reads (N, K) back; sizes that do not tile
    are refused."""
    from saisa.model import skinny

    tiles = skinny.Tiles(block_n=4, block_k=8)
    w = torch.arange(12 * 32, dtype=torch.float32).view(12, 32)
    t = skinny.tile(w, tiles)
    assert t.shape == (3, 4, 4, 8) and t.is_contiguous() and skinny.weight_shape(t) == (12, 32)
    assert skinny.weight_shape(w) == (12, 32)
    for i in range(3):
        for j in range(4):
            assert torch.equal(t[i, j], w[i * 4:(i + 1) * 4, j * 8:(j + 1) * 8])
    assert torch.equal(t.flatten()[:64], torch.cat([w[:4, :8].flatten(), w[:4, 8:16].flatten()]))
    assert skinny.tiles_evenly(w, tiles) and not skinny.tiles_evenly(w[:, :30], tiles)
    with pytest.raises(ValueError, match="does not tile"):
        skinny.tile(w[:, :30], tiles)


def test_only_whole_lines_of_a_dead_tensor_are_discarded():
    """skinny.linear_residual's `dead` drops whole 128-byte L2 lines only: none of a tensor that does not start on
    a line or is not contiguous (a line shared with a live neighbour must keep its data)."""
    from saisa.model.skinny import whole_lines as _whole_lines

    buf = torch.empty(4096, dtype=torch.bfloat16)
    start = next(o for o in range(64) if buf[o:].data_ptr() % 128 == 0)
    assert _whole_lines(buf[start:start + 640]) == 10
    assert _whole_lines(buf[start:start + 650]) == 10, "the partial last line stays"
    assert _whole_lines(buf[start + 1:start + 641]) == 0
    assert _whole_lines(buf[start:start + 1280].view(64, 20)[:, :10]) == 0


def test_text_step_needs_room_for_the_text_rows():
    from saisa.model.fused import text_layer_step, text_layer_tensors
    from saisa.model.visual_kv import fold_kv_weights

    model = tiny_model("saisa")
    layer = model.layers[0]
    folded = fold_kv_weights(model.layers)
    hidden = torch.randn(1, 5, 32)
    cos = torch.ones(1, 9, 8)
    with pytest.raises(ValueError, match="expected Sv \\+ T = 9"):
        text_layer_step(hidden, torch.zeros_like(hidden), torch.zeros(1, 4, 32), torch.zeros(1, 1, 5, 9), cos,
                        cos, text_layer_tensors(layer, folded.weight[0], None), folded.eps, folded.head_dim)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["eager", "flex"])
def test_inductor_compiled_merged_path_on_cpu(attention):
    """The same path through inductor (CPU kernels): the in-place write of the text rows into each layer's buffer
    and the merged k/v GEMM lower to the function the eager trace computes; flex: inductor's own attention kernel
    (it read the strided V view wrongly until fused.attend made V contiguous)."""
    import shutil

    if shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=3))
    ids, mask = _left_padded([with_images(seed=25, length=10, image_at=[2]),
                              with_images(seed=26, length=7, image_at=[4])])
    pixels = random_pixels(2)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        model.optimize_for_inference(chunk=2, compile=True, compile_backend="inductor", attention=attention)
        fast = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        again = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    keep = mask.bool() & (ids != IMAGE_TOKEN_ID)
    assert_close(fast[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert_close(again, fast, atol=0, rtol=0)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_compiled_visual_step_uses_the_projector_activation_and_tanh_on_request(act):
    """The compiled visual step applies the projector's own GELU (erf or tanh form; the reference path's), and
    gelu="tanh" the tanh form for an erf-GELU projector as well: equal to a model whose projector uses it."""
    model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=2), projector_hidden_act=act)
    ids = with_images(seed=31, length=11, image_at=[3])[None]
    pixels = random_pixels(1)
    rows = text_rows(ids[0])
    tanh_model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=2), projector_hidden_act="gelu_new")
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        ref_tanh = tanh_model(input_ids=ids, pixel_values=pixels).logits
        model.optimize_for_inference(compile=True, compile_backend="eager")
        assert_close(model(input_ids=ids, pixel_values=pixels).logits[0, rows], ref[0, rows], atol=1e-5, rtol=1e-5)
        model.optimize_for_inference(compile=True, compile_backend="eager", gelu="tanh")
        tanh = model(input_ids=ids, pixel_values=pixels).logits
        with pytest.raises(ValueError, match="unknown gelu"):
            model.optimize_for_inference(compile=True, compile_backend="eager", gelu="erf")
    assert_close(tanh[0, rows], ref_tanh[0, rows], atol=1e-5, rtol=1e-5)
    if act == "gelu":  # the two forms differ (by little): the option changes what runs
        assert not torch.allclose(tanh[0, rows], ref[0, rows], atol=1e-7, rtol=0)
    other = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=2), projector_hidden_act="relu")
    other.optimize_for_inference(compile=True, compile_backend="eager")
    assert other._fused is None, "an activation the compiled step does not know keeps the reference path"


def test_prefill_tables_are_made_once_per_layout():
    """The fused prefill's mask and RoPE tables depend on the layout alone: made once for a layout used again (as
    GraphedForward's is, so its graph holds none of their kernels), and made anew for another layout."""
    model = tiny_model("saisa", text=tiny_text_config(num_hidden_layers=2))
    pixels = random_pixels(1)
    with torch.no_grad():
        model.optimize_for_inference(compile=True, compile_backend="eager")
        made = []
        original = model._mask_and_rope
        model._mask_and_rope = lambda *a: made.append(1) or original(*a)
        outs = {}
        for at in (3, 7):
            ids = with_images(seed=33, length=11, image_at=[at])[None]
            layout = model.layout(ids, torch.ones_like(ids), 1)
            feats = model.encode_images(pixels)
            first = model.forward_with_layout(ids, layout, feats)
            again = model.forward_with_layout(ids, layout, feats)
            assert torch.equal(first, again)
            outs[at] = (ids, first)
        assert len(made) == 2, "one set of tables per layout"
        # Tables live as long as their layout (a graph holds its layout): six layouts alive, six sets kept.
        ids = with_images(seed=33, length=11, image_at=[3])[None]
        layouts = [model.layout(ids, torch.ones_like(ids), 1) for _ in range(6)]
        for layout in layouts:
            model.forward_with_layout(ids, layout, feats)
        kept = [model._fused.tables[(id(lay), feats.shape[1], torch.float32, ids.device)] for lay in layouts]
        assert len(made) == 8 and all(entry[0]() is lay for entry, lay in zip(kept, layouts, strict=True))
        model.forward_with_layout(ids, layouts[0], feats)
        assert len(made) == 8, "the first layout's tables were kept beside five others"
        del layouts, layout, kept
        gc.collect()
        assert not model._fused.tables, "a layout's tables go with it"
        model.train().eval()  # the reference path
        for ids, fast in outs.values():
            ref = model(input_ids=ids, pixel_values=pixels).logits
            rows = text_rows(ids[0])
            assert_close(fast[0, rows], ref[0, rows], atol=1e-5, rtol=1e-5)


def test_gc_paused_turns_the_cyclic_collector_off_inside_and_back_after():
    """graphs.gc_paused (every CUDA-graph capture runs in it): no automatic collection inside, the collector's
    state as it was after, also when the block raises."""
    from saisa.model.graphs import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="inside"), gc_paused():
        raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled(), "a collector that was off stays off"
    finally:
        gc.enable()
