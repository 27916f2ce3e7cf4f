"""Shared tiny random configs (HF's ModelTester sizes: hidden 32, 2 layers) for CPU tests in fp32."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

IMAGE_TOKEN_ID = 99
VOCAB = 100


def tiny_text_config(model_type: str = "llama", num_kv_heads: int = 2, **overrides) -> dict:
    cfg = dict(
        model_type=model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if model_type == "qwen3":
        cfg["head_dim"] = 8
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    cfg.update(overrides)
    return cfg


def tiny_vision_config(model_type: str = "clip_vision_model", **overrides) -> dict:
    cfg = dict(
        model_type=model_type,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    cfg.update(overrides)
    return cfg


def tiny_config(architecture: str = "saisa", text: dict | None = None, vision: dict | None = None, **kw):
    from saisa import SaisaConfig

    return SaisaConfig(
        vision_config=vision or tiny_vision_config(),
        text_config=text or tiny_text_config(),
        architecture=architecture,
        image_token_id=IMAGE_TOKEN_ID,
        **kw,
    )


def tiny_model(architecture: str = "saisa", seed: int = 0, **kw):
    from saisa import SaisaForConditionalGeneration

    torch.manual_seed(seed)
    model = SaisaForConditionalGeneration(tiny_config(architecture, **kw)).eval()
    # Non-trivial norms so that a norm applied to the wrong tokens shows up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_pixels(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def random_ids(length: int, seed: int, low: int = 3, high: int = VOCAB - 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (length,), generator=g)


ARCHS = ("saisa", "naavit", "llava")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test that trains in bf16 must not fix it for the next ones."""
    yield
    if "accelerate.state" in __import__("sys").modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
