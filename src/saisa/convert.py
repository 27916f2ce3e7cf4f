"""Conversion from Hugging Face `LlavaForConditionalGeneration` to our llava-architecture model.

Unusual here: only key prefixes change. Our `language_model` is the backbone's whole causal-LM module, so HF LLaVA's
`model.language_model.*` becomes `language_model.model.*` and its top-level `lm_head` becomes `language_model.lm_head`.
"""

from __future__ import annotations

import torch
from torch import nn

from saisa.config import SaisaConfig

from saisa.model.modeling import SaisaForConditionalGeneration

# HF LLaVA (transformers 5.x, and the 4.x layout) -> ours; the first matching prefix wins.
_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.", "language_model."),
)


def _map_key(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"unexpected key {key!r} in the HF LLaVA state dict")


def from_hf_llava(hf_model: nn.Module) -> SaisaForConditionalGeneration:
    """Our llava-architecture model with exactly the weights of an HF `LlavaForConditionalGeneration`."""
    hc = hf_model.config
    if not isinstance(hc.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer={hc.vision_feature_layer!r}: only a single layer index is supported")
    config = SaisaConfig(
        vision_config=hc.vision_config.to_dict(),
        text_config=hc.text_config.to_dict(),
        architecture="llava",
        projector_type="mlp2x_gelu",
        image_token_id=hc.image_token_id,
        vision_feature_layer=hc.vision_feature_layer,
        vision_feature_select_strategy=hc.vision_feature_select_strategy,
        projector_hidden_act=hc.projector_hidden_act,
    )
    dtype = next(hf_model.parameters()).dtype
    model = SaisaForConditionalGeneration(config).to(dtype)
    state = {_map_key(k): v for k, v in hf_model.state_dict().items()}
    if getattr(config.text_config, "tie_word_embeddings", False):
        state.setdefault("language_model.lm_head.weight", state["language_model.model.embed_tokens.weight"])
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"HF LLaVA weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval() if not hf_model.training else model
