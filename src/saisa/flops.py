"""Inference FLOPs of LLaVA-1.5, NAAViT and SAISA for one image and t text tokens (paper Sec. 4.4).

Unusual here: pure arithmetic on integers, no torch. The three architectures share one notation and one breakdown
(attention linear layers, attention scores, FFN, projector), so every term can be checked against the paper by hand
and against a FlopCounterMode measurement (`saisa.bench.measured_flops`) term by term. A multiply-add counts as 2
FLOPs; causal masking is NOT subtracted (the paper's formulas, like FlopCounterMode, count full score matrices).

Notation (paper Sec. 4.4): n layers, h hidden size, m FFN intermediate size, k key/value output width
(n_kv_heads * head_dim, = h without GQA), t text tokens, v visual tokens, d vision feature width. We add q, the query
width (n_heads * head_dim); the paper assumes q = h, which holds for every preset (not for e.g. Qwen3-0.6B).

    LLaVA-1.5  2n(t+v)h(2q+2k) + 6n(t+v)hm + 4n(t+v)^2 q           + 2vhd + 2vh^2
    NAAViT     2nth(2q+2k) + 4nvhk + 6n(t+v)hm + 4nt(t+v)q         + 2vhd + 2vh^2      (derived here, see below)
    SAISA      2nth(2q+2k) + 4nvhk + 6nthm     + 4nt(t+v)q         + 2nvhd + 2nvh^2

With q = h, 2(2h+2k) + 6m = 2(2h+3m+2k), which is the paper's grouping.

NAAViT (paper Sec. 3.2-3.3: LLaVA-1.5 with NAAViT attention): queries are text only, keys/values are [visual; text].
Per layer, visual tokens get K and V projections (4vhk) but no Q or O (the attention never updates them), yet they
still pass through the FFN (6vhm) because the pilot keeps LLaVA's single token stream; text tokens get Q, K, V, O
(2th(2q+2k)) and the FFN (6thm); the scores QK^T and AV cost 2t(t+v)q each. The projector is LLaVA's single
embedding-space MLP. So NAAViT = SAISA's LLM + 6nvhm (visual FFNs) with LLaVA's projector.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

TERA = 1e12
ARCHITECTURES = ("llava", "naavit", "saisa")  # the order tables and JSON use


# ----------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True, kw_only=True)
class LLMSpec:
    """The LLM sizes the FLOPs depend on (a Llama-family decoder)."""

    name: str
    num_layers: int  # n
    hidden_size: int  # h
    intermediate_size: int  # m
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 0  # only for lm_head_flops; not in the paper's formulas
    model_type: str = "llama"

    @property
    def kv_dim(self) -> int:
        """k: output width of W_K and W_V."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        """q: output width of W_Q (= h in the paper)."""
        return self.num_heads * self.head_dim


@dataclass(frozen=True, kw_only=True)
class VisionSpec:
    """What the LLM side sees of a vision encoder: v tokens of width d per image."""

    name: str
    num_tokens: int  # v
    feature_dim: int  # d


def _llm(name: str, n: int, h: int, m: int, heads: int, kv_heads: int, vocab: int, model_type: str) -> LLMSpec:
    return LLMSpec(name=name, num_layers=n, hidden_size=h, intermediate_size=m, num_heads=heads,
                   num_kv_heads=kv_heads, head_dim=h // heads, vocab_size=vocab, model_type=model_type)


LLM_PRESETS: dict[str, LLMSpec] = {
    "vicuna-7b": _llm("vicuna-7b", 32, 4096, 11008, 32, 32, 32000, "llama"),  # k = 4096
    "mistral-7b": _llm("mistral-7b", 32, 4096, 14336, 32, 8, 32000, "mistral"),  # k = 1024 (GQA)
    "llama3-8b": _llm("llama3-8b", 32, 4096, 14336, 32, 8, 128256, "llama"),  # k = 1024 (GQA)
    "llama-65b": _llm("llama-65b", 80, 8192, 22016, 64, 64, 32000, "llama"),  # k = 8192
}

VISION_PRESETS: dict[str, VisionSpec] = {
    # CLIP-ViT-L/14-336: (336/14)^2 = 576 patch tokens, CLS dropped (LLaVA-1.5 "default" strategy).
    "clip-vit-l-336": VisionSpec(name="clip-vit-l-336", num_tokens=576, feature_dim=1024),
    # SigLIP-SO400M/14-384: floor(384/14)^2 = 729 tokens, no CLS, width 1152.
    "siglip-so400m-384": VisionSpec(name="siglip-so400m-384", num_tokens=729, feature_dim=1152),
    # OpenCLIP ConvNeXt-XXL at 1024 px: stride 32 -> 32x32 = 1024 tokens. Its last stage is 3072 wide, but only
    # d = 1024 reproduces the paper's 14.76 / 4.44 (d = 3072 gives 14.77 / 4.99); see docs/flops.md.
    "convnext-xxl-1024": VisionSpec(name="convnext-xxl-1024", num_tokens=1024, feature_dim=1024),
}


# ----------------------------------------------------------------------------------------------------- breakdown
@dataclass(frozen=True, kw_only=True)
class FlopsBreakdown:
    """FLOPs of one forward over one image and `text_tokens` text tokens, by kind of work."""

    architecture: str
    text_tokens: int  # t
    visual_tokens: int  # v
    attention_linear: int  # W_Q, W_K, W_V, W_O over the tokens each architecture feeds them
    attention_scores: int  # QK^T and AV
    ffn: int  # gate, up, down
    projector: int  # vision features -> LLM space (n MLPs for SAISA)

    @property
    def llm(self) -> int:
        return self.attention_linear + self.attention_scores + self.ffn

    @property
    def total(self) -> int:
        return self.llm + self.projector

    @property
    def tflops(self) -> float:
        return self.total / TERA


def _check_tokens(text_tokens: int, vision: VisionSpec) -> None:
    if text_tokens < 0 or vision.num_tokens < 0 or vision.feature_dim < 0:
        raise ValueError(
            f"token counts and widths must be >= 0, got t={text_tokens}, v={vision.num_tokens}, "
            f"d={vision.feature_dim}"
        )


def _mlp2x(tokens: int, d: int, h: int) -> int:
    """LLaVA-1.5 projector, Linear(d, h) -> GELU -> Linear(h, h), over `tokens` rows: 2vhd + 2vh^2."""
    return 2 * tokens * h * d + 2 * tokens * h * h


def llava_flops(llm: LLMSpec, vision: VisionSpec, text_tokens: int) -> FlopsBreakdown:
    """LLaVA-1.5 (paper Sec. 4.4): all t+v tokens are queries, keys and FFN inputs; one projector."""
    _check_tokens(text_tokens, vision)
    n, h, m, k, q = llm.num_layers, llm.hidden_size, llm.intermediate_size, llm.kv_dim, llm.q_dim
    t, v, d = text_tokens, vision.num_tokens, vision.feature_dim
    s = t + v
    return FlopsBreakdown(
        architecture="llava", text_tokens=t, visual_tokens=v,
        attention_linear=2 * n * s * h * (2 * q + 2 * k),
        attention_scores=4 * n * s * s * q,
        ffn=6 * n * s * h * m,
        projector=_mlp2x(v, d, h),
    )


def naavit_flops(llm: LLMSpec, vision: VisionSpec, text_tokens: int) -> FlopsBreakdown:
    """NAAViT pilot (paper Sec. 3.3): text queries over [visual; text]; visual tokens still go through every FFN."""
    _check_tokens(text_tokens, vision)
    n, h, m, k, q = llm.num_layers, llm.hidden_size, llm.intermediate_size, llm.kv_dim, llm.q_dim
    t, v, d = text_tokens, vision.num_tokens, vision.feature_dim
    return FlopsBreakdown(
        architecture="naavit", text_tokens=t, visual_tokens=v,
        attention_linear=2 * n * t * h * (2 * q + 2 * k) + 4 * n * v * h * k,  # text QKVO + visual KV
        attention_scores=4 * n * t * (t + v) * q,
        ffn=6 * n * (t + v) * h * m,
        projector=_mlp2x(v, d, h),
    )


def saisa_flops(llm: LLMSpec, vision: VisionSpec, text_tokens: int) -> FlopsBreakdown:
    """SAISA (paper Sec. 4.4): NAAViT attention, no FFN on visual tokens, one projector MLP per layer (Eq. 9)."""
    _check_tokens(text_tokens, vision)
    n, h, m, k, q = llm.num_layers, llm.hidden_size, llm.intermediate_size, llm.kv_dim, llm.q_dim
    t, v, d = text_tokens, vision.num_tokens, vision.feature_dim
    return FlopsBreakdown(
        architecture="saisa", text_tokens=t, visual_tokens=v,
        attention_linear=2 * n * t * h * (2 * q + 2 * k) + 4 * n * v * h * k,
        attention_scores=4 * n * t * (t + v) * q,
        ffn=6 * n * t * h * m,
        projector=n * _mlp2x(v, d, h),  # per-layer projectors; a shared (stage-1) MLP would cost 1/n of this
    )


FLOPS_FUNCTIONS = {"llava": llava_flops, "naavit": naavit_flops, "saisa": saisa_flops}


def all_flops(llm: LLMSpec, vision: VisionSpec, text_tokens: int) -> dict[str, FlopsBreakdown]:
    """Breakdowns of every architecture, in ARCHITECTURES order."""
    return {arch: FLOPS_FUNCTIONS[arch](llm, vision, text_tokens) for arch in ARCHITECTURES}


def lm_head_flops(llm: LLMSpec, rows: int) -> int:
    """2 * rows * h * vocab: the output layer, which the paper's formulas leave out."""
    return 2 * rows * llm.hidden_size * llm.vocab_size


# ----------------------------------------------------------------------------------------------------- HF configs
def _read_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"{path!r} is neither a preset nor a directory holding config.json (nor a .json file)")
    try:
        return json.loads(file.read_text()), file
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err


def _hf_defaults(model_type: str) -> dict[str, Any]:
    """Defaults of a transformers config class: hub configs omit fields equal to them. Imported lazily."""
    # transformers only when a config file leaves fields out
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type).to_dict()
    except ValueError as err:
        raise ValueError(f"unknown model_type {model_type!r}: {err}") from err


def _fill(cfg: dict[str, Any], model_type: str, keys: tuple[str, ...], file: Path) -> dict[str, Any]:
    missing = [key for key in keys if cfg.get(key) is None]
    if not missing:
        return cfg
    defaults = _hf_defaults(model_type)
    unknown = [key for key in missing if defaults.get(key) is None]
    if unknown:
        raise ValueError(f"{file}: model_type {model_type!r} has no {unknown}; cannot compute FLOPs")
    return {**{key: defaults[key] for key in missing}, **{k: v for k, v in cfg.items() if v is not None}}


def llm_spec_from_hf(path: str | Path) -> LLMSpec:
    """LLMSpec from a Llama-family config.json, or the `text_config` of a LLaVA/SAISA config."""
    cfg, file = _read_config(path)
    cfg = cfg.get("text_config") or cfg
    model_type = cfg.get("model_type", "llama")
    if "num_local_experts" in cfg or "num_experts" in cfg:
        raise ValueError(f"{file}: mixture-of-experts LLMs ({model_type}) are not covered by these formulas")
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
    cfg = _fill(cfg, model_type, keys, file)
    heads = cfg["num_attention_heads"]
    return LLMSpec(
        name=str(path),
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg.get("vocab_size") or 0,
        model_type=model_type,
    )


_NESTED_VISION_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def vision_spec_from_hf(path: str | Path) -> VisionSpec:
    """VisionSpec from a CLIP/SigLIP vision config.json, or the `vision_config` of a CLIP/SigLIP/LLaVA config.

    v = (image_size // patch_size)^2: CLIP's CLS token is dropped as in LLaVA-1.5 (kept, +1, when the outer config
    says vision_feature_select_strategy="full"); SigLIP has none.
    """
    outer, file = _read_config(path)
    cfg = outer.get("vision_config") or outer
    model_type = cfg.get("model_type") or _NESTED_VISION_TYPES.get(outer.get("model_type", ""), "clip_vision_model")
    if model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(
            f"{file}: vision model_type {model_type!r} is not a ViT config saisa can count tokens for; "
            f"pass --visual-tokens and --vision-dim with a preset instead"
        )
    cfg = _fill(cfg, model_type, ("hidden_size", "image_size", "patch_size"), file)
    v = (cfg["image_size"] // cfg["patch_size"]) ** 2
    if model_type == "clip_vision_model" and outer.get("vision_feature_select_strategy") == "full":
        v += 1
    return VisionSpec(name=str(path), num_tokens=v, feature_dim=cfg["hidden_size"])


def resolve_llm(name_or_path: str) -> LLMSpec:
    """A preset name or an HF config directory/file; ValueError listing the presets otherwise."""
    if name_or_path in LLM_PRESETS:
        return LLM_PRESETS[name_or_path]
    if not Path(name_or_path).exists():
        raise ValueError(f"unknown LLM {name_or_path!r}: use one of {sorted(LLM_PRESETS)} or an HF config directory")
    return llm_spec_from_hf(name_or_path)


def resolve_vision(name_or_path: str, visual_tokens: int | None = None, vision_dim: int | None = None) -> VisionSpec:
    """A preset name or an HF config directory/file, with v and d overrides."""
    if name_or_path in VISION_PRESETS:
        spec = VISION_PRESETS[name_or_path]
    elif not Path(name_or_path).exists():
        raise ValueError(
            f"unknown vision encoder {name_or_path!r}: use one of {sorted(VISION_PRESETS)} or an HF config directory"
        )
    else:
        spec = vision_spec_from_hf(name_or_path)
    if visual_tokens is not None:
        spec = replace(spec, num_tokens=visual_tokens)
    if vision_dim is not None:
        spec = replace(spec, feature_dim=vision_dim)
    return spec


# ----------------------------------------------------------------------------------------------------- paper rows
@dataclass(frozen=True, kw_only=True)
class PaperRow:
    """One inference-TFLOPs figure printed in the paper (t = 64 text tokens throughout)."""

    source: str  # where it is printed
    label: str
    architecture: str
    llm: str
    vision: str
    paper_tflops: float
    visual_tokens: int | None = None
    vision_dim: int | None = None
    note: str = ""


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow(source="Tab. 2-5", label="LLaVA-1.5 Vicuna-7B CLIP", architecture="llava", llm="vicuna-7b",
             vision="clip-vit-l-336", paper_tflops=8.53),
    PaperRow(source="Tab. 2-5", label="SAISA Vicuna-7B CLIP", architecture="saisa", llm="vicuna-7b",
             vision="clip-vit-l-336", paper_tflops=2.86),
    PaperRow(source="Tab. 2", label="BLIP-2 / InstructBLIP / MiniGPT-4", architecture="llava", llm="vicuna-7b",
             vision="clip-vit-l-336", visual_tokens=32, paper_tflops=1.25),
    PaperRow(source="Tab. 2-3", label="Otter / IDEFICS Llama-7B", architecture="llava", llm="vicuna-7b",
             vision="clip-vit-l-336", visual_tokens=64, paper_tflops=1.67),
    PaperRow(source="Tab. 2-3", label="MiniGPT-v2 / Shikra / Qwen-VL", architecture="llava", llm="vicuna-7b",
             vision="clip-vit-l-336", visual_tokens=256, paper_tflops=4.20, note="LLM only: 4.20"),
    PaperRow(source="Tab. 2-3", label="IDEFICS Llama-65B", architecture="llava", llm="llama-65b",
             vision="clip-vit-l-336", visual_tokens=64, paper_tflops=16.62, note="LLM only: 16.62"),
    PaperRow(source="Tab. 4", label="LLaVA-1.5 Vicuna SigLIP", architecture="llava", llm="vicuna-7b",
             vision="siglip-so400m-384", paper_tflops=10.63),
    PaperRow(source="Tab. 4", label="SAISA Vicuna SigLIP", architecture="saisa", llm="vicuna-7b",
             vision="siglip-so400m-384", paper_tflops=3.40, note="real d=1152 gives 3.42"),
    PaperRow(source="Tab. 4", label="SAISA Vicuna SigLIP, d=1024", architecture="saisa", llm="vicuna-7b",
             vision="siglip-so400m-384", vision_dim=1024, paper_tflops=3.40, note="what the paper used"),
    PaperRow(source="Tab. 4", label="LLaVA-1.5 Vicuna ConvNeXt", architecture="llava", llm="vicuna-7b",
             vision="convnext-xxl-1024", paper_tflops=14.76),
    PaperRow(source="Tab. 4", label="SAISA Vicuna ConvNeXt", architecture="saisa", llm="vicuna-7b",
             vision="convnext-xxl-1024", paper_tflops=4.44),
    PaperRow(source="Tab. 4", label="LLaVA-1.5 Mistral/Llama3 CLIP", architecture="llava", llm="mistral-7b",
             vision="clip-vit-l-336", paper_tflops=9.17),
    PaperRow(source="Tab. 4", label="SAISA Mistral/Llama3 CLIP", architecture="saisa", llm="mistral-7b",
             vision="clip-vit-l-336", paper_tflops=2.10, note="paper: k=h in the text term, see docs"),
)


def paper_row_flops(row: PaperRow, text_tokens: int = 64) -> FlopsBreakdown:
    """Our formula for one paper row."""
    vision = resolve_vision(row.vision, row.visual_tokens, row.vision_dim)
    return FLOPS_FUNCTIONS[row.architecture](LLM_PRESETS[row.llm], vision, text_tokens)
