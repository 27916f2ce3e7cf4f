"""Measured FLOPs: torch's FlopCounterMode over one forward of the full-size model on the meta device.

Unusual here: nothing is allocated or computed. The model is built under `torch.device("meta")`, so a 65B LLM costs no
memory, and FlopCounterMode counts FLOPs from shapes alone (matmuls: mm, addmm, bmm, baddbmm; SDPA, which on meta
runs the math path as two bmm). Norms, activations, RoPE elementwise ops and softmax are not counted, as in the paper.
The vision tower is bypassed (precomputed features Z of shape (1, v, d) go in), so what is counted is the LLM plus
the projector, which is what the paper's Sec. 4.4 formulas cover. The lm_head is counted separately and reported on
its own: the formulas leave it out, and with a 128k vocabulary (Llama-3) it is 3 % of a SAISA forward.
The input_ids stay on CPU: the model builds its sequence layout (where the placeholder sits, a data-dependent step
that meta tensors cannot do) where the ids live and moves it to the model's device. The model keeps the placeholder's
own row in the text stream, so it computes t + 1 text rows: measured = formula(t + 1), exactly up to RoPE's table
matmul that transformers 5.17 (not 5.23) runs as a counted bmm (2 * head_dim/2 * positions, ~1e-8 of the total).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from saisa.config import SaisaConfig
from saisa.flops import ARCHITECTURES, TERA, LLMSpec, VisionSpec


@dataclass(frozen=True, kw_only=True)
class MeasuredFlops:
    """FlopCounterMode totals of one forward (FLOPs, not TFLOPs)."""

    total: int  # everything counted: LLM + projector + lm_head
    lm_head: int  # the output layer alone

    @property
    def without_lm_head(self) -> int:
        """What the paper's formulas cover: LLM + projector."""
        return self.total - self.lm_head

    @property
    def tflops(self) -> float:
        return self.without_lm_head / TERA


# ----------------------------------------------------------------------------------------------------- configs
def _vision_config(vision: VisionSpec, patch_size: int = 14) -> dict[str, Any]:
    """A CLIP vision config whose hidden size is d and whose patch grid holds at least v tokens.

    Only d matters for FLOPs (the tower is bypassed); image_size is the smallest grid >= v, so a non-square v (e.g.
    32 tokens of a Q-Former) still yields a valid config, and the feature tensor fed in carries the exact v.
    """
    d = vision.feature_dim
    side = max(1, math.isqrt(max(vision.num_tokens, 1) - 1) + 1)
    heads = d // 64 if d % 64 == 0 else 1
    return {
        "model_type": "clip_vision_model", "hidden_size": d, "intermediate_size": 4 * d,
        "num_attention_heads": heads, "num_hidden_layers": 2, "image_size": side * patch_size,
        "patch_size": patch_size,
    }


def _text_config(llm: LLMSpec) -> dict[str, Any]:
    """An HF Llama/Mistral config dict with the spec's sizes (weights never exist: meta device)."""
    cfg = {
        "model_type": llm.model_type, "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "head_dim": llm.head_dim, "vocab_size": llm.vocab_size or 32000,
    }
    if llm.model_type in ("mistral", "qwen2", "qwen3"):
        cfg["sliding_window"] = None  # full attention everywhere, as the decoder requires
    return cfg


def build_config(llm: LLMSpec, vision: VisionSpec, architecture: str) -> SaisaConfig:
    """A full-size SaisaConfig for `architecture` with a per-layer projector (stage 2, as at inference)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; choose one of {ARCHITECTURES}")
    text = _text_config(llm)
    return SaisaConfig(
        vision_config=_vision_config(vision), text_config=text, architecture=architecture,
        projector_type="mlp2x_gelu", projector_sharing="per_layer",
        image_token_id=text["vocab_size"],  # outside the vocabulary: never a real token
    )


# ----------------------------------------------------------------------------------------------------- measure
def _lm_head_flops(counts: dict[str, dict[Any, int]]) -> int:
    """FLOPs of the shallowest module named `lm_head` (nested names repeat the same count)."""
    names = [name for name in counts if name.split(".")[-1] == "lm_head"]
    if not names:
        raise RuntimeError(f"no lm_head module among the counted modules {sorted(counts)[:8]}...")
    return sum(counts[min(names, key=lambda n: n.count("."))].values())


def measure(config: SaisaConfig, text_tokens: int, visual_tokens: int | None = None) -> MeasuredFlops:
    """Count one forward over `text_tokens` text tokens and one image of `visual_tokens` (default: the config's v).

    input_ids (1, t + 1): a BOS-like token, the image placeholder, then text; features Z (1, v, d).
    """
    from saisa.model.modeling import SaisaForConditionalGeneration

    if text_tokens < 1:
        raise ValueError(f"text_tokens must be >= 1, got {text_tokens}")
    with torch.device("meta"):
        model = SaisaForConditionalGeneration(config).eval()
    v = visual_tokens if visual_tokens is not None else model.num_visual_tokens
    d = config.vision_config.hidden_size
    # ids stay on CPU: the model builds the layout (a data-dependent step) where the ids live, then moves it to meta.
    ids = torch.ones(1, text_tokens + 1, dtype=torch.long)  # (1, t + 1)
    ids[0, 1] = config.image_token_id
    features = torch.empty(1, v, d, device="meta")  # (1, v, d)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, image_features=features)
    return MeasuredFlops(total=counter.get_total_flops(), lm_head=_lm_head_flops(counter.get_flop_counts()))


def measure_tflops(config: SaisaConfig, text_tokens: int, visual_tokens: int | None = None) -> float:
    """Measured TFLOPs of LLM + projector (lm_head excluded), comparable to saisa.flops."""
    return measure(config, text_tokens, visual_tokens).tflops


def measure_all(llm: LLMSpec, vision: VisionSpec, text_tokens: int) -> dict[str, MeasuredFlops]:
    """Measured FLOPs of every architecture at the given sizes."""
    return {
        arch: measure(build_config(llm, vision, arch), text_tokens, vision.num_tokens) for arch in ARCHITECTURES
    }
