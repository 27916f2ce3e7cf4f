"""SaisaConfig: one transformers config for three architectures that differ only in how an image enters the LLM.

Unusual here: `architecture` selects saisa / naavit / llava over the same nested `vision_config` and `text_config`, so
the three can be built, trained and benchmarked from one code path; the config stays importable without building any
model (sub-configs are resolved by `model_type` through `AutoConfig`).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

ARCHITECTURES = ("saisa", "naavit", "llava")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
PROJECTOR_SHARING = ("shared", "per_layer")
SELECT_STRATEGIES = ("default", "full")
# Backbones whose decoder layers have the Llama module layout (input_layernorm, self_attn.{q,k,v,o}_proj, mlp,
# post_attention_layernorm; rotate-half RoPE). SmolLM2 and Vicuna are `llama`.
SUPPORTED_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _as_config(cfg: Any, default_type: str) -> PretrainedConfig:
    if cfg is None:
        return AutoConfig.for_model(default_type)
    if isinstance(cfg, PretrainedConfig):
        return cfg
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        model_type = cfg.pop("model_type", default_type)
        if model_type == "efficientnet_lite0":  # our own tower; registered by saisa.model.vision on import
            import saisa.model.vision  # noqa: F401  (registers the config class)
        return AutoConfig.for_model(model_type, **cfg)
    raise TypeError(f"expected a PretrainedConfig or a dict, got {type(cfg).__name__}")


class SaisaConfig(PretrainedConfig):
    r"""Configuration of [`SaisaForConditionalGeneration`].

    Args:
        vision_config: config of the vision tower (CLIP or SigLIP vision, or `efficientnet_lite0`).
        text_config: config of the Llama-family LLM (`llama`, `mistral`, `qwen2`, `qwen3`).
        architecture: `"saisa"` (NAAViT attention, per-layer projector into each layer's self-attention input, FFN on
            text only), `"naavit"` (LLaVA-1.5 with NAAViT attention: the paper's Table 1 pilot) or `"llava"`.
        projector_type: `"mlp2x_gelu"` (Linear d->h, GELU, Linear h->h) or `"linear"`.
        projector_sharing: saisa only: `"shared"` (stage 1, one MLP for every layer) or `"per_layer"` (stage 2).
        image_token_id: id of the single placeholder token that stands for one whole image in `input_ids`.
        vision_feature_layer: hidden-state index of the vision tower whose output is used (LLaVA-1.5: -2).
        vision_feature_select_strategy: `"default"` drops the CLS token, `"full"` keeps it.
    """

    model_type = "saisa"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config: Any = None,
        text_config: Any = None,
        architecture: str = "saisa",
        projector_type: str = "mlp2x_gelu",
        projector_sharing: str = "per_layer",
        image_token_id: int = 32000,
        vision_feature_layer: int = -2,
        vision_feature_select_strategy: str = "default",
        projector_hidden_act: str = "gelu",
        **kwargs: Any,
    ) -> None:
        self.vision_config = _as_config(vision_config, "clip_vision_model")
        self.text_config = _as_config(text_config, "llama")
        self.architecture = architecture
        self.projector_type = projector_type
        self.projector_sharing = projector_sharing
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.projector_hidden_act = projector_hidden_act
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_saisa()

    def validate_saisa(self) -> None:
        """Raise a ValueError naming the bad field and its allowed values."""
        checks = (
            ("architecture", self.architecture, ARCHITECTURES),
            ("projector_type", self.projector_type, PROJECTOR_TYPES),
            ("projector_sharing", self.projector_sharing, PROJECTOR_SHARING),
            ("vision_feature_select_strategy", self.vision_feature_select_strategy, SELECT_STRATEGIES),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"SaisaConfig.{name}={value!r} is not supported; choose one of {allowed}")
        if self.architecture != "saisa" and self.projector_sharing == "shared":
            raise ValueError(
                "projector_sharing='shared' only applies to architecture='saisa' (llava/naavit have one "
                "embedding-space projector); leave it at 'per_layer'"
            )
        text_type = getattr(self.text_config, "model_type", None)
        if text_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"unsupported LLM backbone model_type={text_type!r}: saisa supports the Llama module layout "
                f"{SUPPORTED_TEXT_MODEL_TYPES} (Llama/Vicuna, Mistral, Qwen2/2.5, Qwen3, SmolLM2)"
            )

    @property
    def num_projector_layers(self) -> int:
        """How many projector MLPs the model holds: n for per-layer saisa, else 1."""
        if self.architecture == "saisa" and self.projector_sharing == "per_layer":
            return self.text_config.num_hidden_layers
        return 1

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out
