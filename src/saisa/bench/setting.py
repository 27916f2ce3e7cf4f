"""Benchmark settings: the model shapes of each preset (the paper's 7B + CLIP-L/336, a tiny CPU one), the repeat
counts, and the FLOPs / bytes of the pieces a floor needs (vision tower, decode, KV cache).

Unusual here: shapes are plain config dicts, so a preset builds its models on the meta device and the FLOPs
functions of `saisa.flops` read the same numbers the models are built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from saisa.flops import LLMSpec, VisionSpec, lm_head_flops


# ----------------------------------------------------------------------------------------------------- settings
def _llama(n: int, h: int, m: int, heads: int, kv_heads: int, vocab: int, **extra: Any) -> dict[str, Any]:
    return dict(model_type="llama", num_hidden_layers=n, hidden_size=h, intermediate_size=m,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                max_position_embeddings=4096, tie_word_embeddings=False, **extra)


def _qwen2(n: int, h: int, m: int, heads: int, kv_heads: int, vocab: int, positions: int) -> dict[str, Any]:
    return {"model_type": "qwen2", "num_hidden_layers": n, "hidden_size": h, "intermediate_size": m,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": positions, "tie_word_embeddings": True, "use_sliding_window": False}


def _clip(layers: int, d: int, mlp: int, heads: int, image: int, patch: int) -> dict[str, Any]:
    return {"model_type": "clip_vision_model", "num_hidden_layers": layers, "hidden_size": d,
            "intermediate_size": mlp, "num_attention_heads": heads, "image_size": image, "patch_size": patch}


@dataclass(frozen=True, kw_only=True)
class Setting:
    """What the suite measures. `text_config` / `vision_config` are HF config dicts (model_type included)."""

    name: str
    text_config: dict[str, Any]  # the inference LLM (and stage 1)
    vision_config: dict[str, Any]
    train_text_config: dict[str, Any]  # the stage-2 (full finetune) LLM
    dtype: str = "bfloat16"
    text_tokens: tuple[int, ...] = (64, 128, 256)  # prefill / TTFT sweep at batch 1 (paper Table 6)
    throughput_batches: tuple[int, ...] = (4, 16)
    throughput_text_tokens: int = 64
    decode_text_tokens: int = 64  # the cache holds v + this many positions (640 with CLIP-L/336)
    decode_batch: int = 1
    train_text_tokens: int = 192
    # The same micro-batch for both architectures and both stages: LLaVA-1.5's per-device batch in stage 2 (128 over
    # 8 GPUs; its stage 1 uses 32 per device, with gradient checkpointing, which the suite does not use).
    train_batch: int = 16
    # Stage 2, saisa: recompute each layer's visual K/V in backward (model.visual_recompute). Off: it saves ~3 GB of
    # activations for a second forward of the visual path (scripts/train_variants.py measures both).
    train_visual_recompute: bool = False
    # Stage 2, saisa: all layers' visual K/V in one autograd Function (model.fused_visual_kv, visual_grad.py), which
    # keeps Z instead of the visual activations; off: autograd keeps them (the default before it).
    train_fused_visual_kv: bool = True
    # How the training step runs: eagerly, and replayed as one CUDA graph (saisa.train.graphed; CUDA only).
    train_methods: tuple[str, ...] = ("eager", "cuda_graph")
    stage1_samples: int = 558_000  # LLaVA-1.5 recipe: LCS-558K pretraining
    stage2_samples: int = 665_000  # LLaVA-1.5 recipe: llava_v1_5_mix665k instruction tuning
    image_at: int = 35  # text tokens before the image (LLaVA-1.5's system prompt is about that long)
    input_sets: int = 3  # inputs rotated between repeats

    @property
    def image_token_id(self) -> int:
        return self.text_config["vocab_size"] - 1  # inside HF LLaVA's embedding table; never drawn as text


PRESETS: dict[str, Setting] = {
    # Vicuna-7B + CLIP-ViT-L/14-336 (paper Table 6); stage 2 at the Qwen2-1.5B shape (7B full finetuning with
    # AdamW does not fit one GPU without sharding).
    "paper": Setting(
        name="paper",
        text_config=_llama(32, 4096, 11008, 32, 32, 32000),
        vision_config=_clip(24, 1024, 4096, 16, 336, 14),
        train_text_config=_qwen2(28, 1536, 8960, 12, 2, 151936, 4096),
    ),
    # CPU tests: every code path in seconds.
    "tiny": Setting(
        name="tiny",
        text_config=_llama(2, 64, 128, 4, 2, 128),
        vision_config=_clip(2, 32, 64, 4, 32, 8),
        train_text_config=_qwen2(2, 48, 96, 4, 2, 160, 512),
        dtype="float32", text_tokens=(8, 16), throughput_batches=(2, 4), throughput_text_tokens=8,
        decode_text_tokens=8, train_text_tokens=12, train_batch=2, image_at=3, input_sets=2,
    ),
}


@dataclass(frozen=True)
class Repeats:
    warmup: int = 3
    repeats: int = 20
    throughput_repeats: int = 10
    decode_repeats: int = 100  # eager decode is launch-bound and jittery (p90 up to 2x the median)
    train_warmup: int = 3
    train_repeats: int = 15  # stage-2 steps on an H100 spread 160-250 ms over 5 repeats (train-variants-h100)

    @classmethod
    def quick(cls) -> Repeats:
        return cls(warmup=1, repeats=3, throughput_repeats=3, decode_repeats=5, train_warmup=1, train_repeats=2)


# ----------------------------------------------------------------------------------------------------- shapes
def llm_spec(text_config: dict[str, Any], name: str = "bench") -> LLMSpec:
    heads = text_config["num_attention_heads"]
    return LLMSpec(
        name=name, num_layers=text_config["num_hidden_layers"], hidden_size=text_config["hidden_size"],
        intermediate_size=text_config["intermediate_size"], num_heads=heads,
        num_kv_heads=text_config.get("num_key_value_heads") or heads,
        head_dim=text_config.get("head_dim") or text_config["hidden_size"] // heads,
        vocab_size=text_config["vocab_size"], model_type=text_config["model_type"],
    )


def vision_spec(vision_config: dict[str, Any]) -> VisionSpec:
    """CLIP with the CLS token dropped (LLaVA-1.5's "default" strategy)."""
    v = (vision_config["image_size"] // vision_config["patch_size"]) ** 2
    return VisionSpec(name="bench", num_tokens=v, feature_dim=vision_config["hidden_size"])


def vision_tower_flops(vision_config: dict[str, Any], images: int, feature_layer: int = -2) -> int:
    """Forward FLOPs of a CLIP ViT up to the selected layer (the layers after it are not needed; HF and we run all
    of them, so this is a lower bound). Patch embedding + per layer 2S(4d^2 + 2dm) + 4S^2 d, S = patches + CLS."""
    d, m, p = vision_config["hidden_size"], vision_config["intermediate_size"], vision_config["patch_size"]
    patches = (vision_config["image_size"] // p) ** 2
    s = patches + 1
    layers = vision_config["num_hidden_layers"] + 1 + feature_layer if feature_layer < 0 else feature_layer
    per_layer = 2 * s * (4 * d * d + 2 * d * m) + 4 * s * s * d
    return images * (2 * patches * 3 * p * p * d + layers * per_layer)


def decode_flops(spec: LLMSpec, context: int, batch: int) -> int:
    """One new token per sample over a cache of `context` keys: the paper's formula at t = 1 plus the lm_head."""
    n, h, m, k, q = spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.kv_dim, spec.q_dim
    per_token = 2 * n * h * (2 * q + 2 * k) + 6 * n * h * m + 4 * n * (context + 1) * q
    return batch * per_token + lm_head_flops(spec, batch)


def kv_bytes(spec: LLMSpec, positions: int, batch: int, element: int) -> int:
    return 2 * spec.num_layers * positions * spec.kv_dim * batch * element
