"""Training recipe: frozen keyword-only dataclasses, loaded from YAML with dotted `key.sub=value` overrides.

Unusual here: nothing is looked up by `getattr(config, name, default)`. Every key of the YAML and of every override
must name a field, or loading fails listing the valid ones; values are checked against the field's type (YAML 1.1
reads `1e-3` as a string, so numeric strings are accepted for float fields and converted). Hyper-parameters left
`null` take the stage's LLaVA-1.5 default (`saisa.train.stages.STAGES`), and `resolve()` writes them in, so the
`recipe.yaml` saved beside every checkpoint is complete.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from saisa.train.stages import LORA_DEFAULT_LR, StageConfig


class RecipeError(ValueError):
    """A recipe or override names an unknown key or holds a value of the wrong type."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What to build: an LLM + vision tower from pretrained parts, or a saved saisa model (`init_from`)."""

    llm: str | None = None
    """Local HF folder (or hub id) of a Llama-family causal LM, `smollm2` for the embedded SmolLM2-135M-Instruct, or
    `random:<folder>`: that folder's config and tokenizer with randomly initialised weights (fixed seed)."""
    vision: str | None = None
    """Local HF folder of a CLIP/SigLIP vision model, or `efficientnet_lite0` for the embedded tower."""
    architecture: Literal["saisa", "naavit", "llava"] = "saisa"
    projector_type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    init_from: str | None = None
    """A `from_pretrained` folder (e.g. stage 1's `final/`) to start from instead of llm + vision."""
    init_delta: str | None = None
    """A `saisa.train.delta` file applied to the model built from llm + vision (or loaded from `init_from`): start
    from a shipped trained model without shipping its pretrained parts (e.g. assets/demo/, which the demo uses)."""

    def __post_init__(self) -> None:
        if self.init_from is None and (self.llm is None or self.vision is None):
            raise ValueError("set both `llm` and `vision`, or `init_from` (a saved saisa model folder)")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    json: str
    """LLaVA-format JSON/JSONL (LLaVA-558k for stage 1, llava_v1_5_mix665k for stage 2)."""
    image_folder: str | None = None
    """Root of relative image paths (default: the JSON's folder)."""
    template: str = "plain"
    """Conversation template: plain (stage 1), vicuna_v1 (LLaVA-1.5 stage 2), chat_template, ..."""
    max_length: int = 2048
    image_aspect_ratio: Literal["pad", "square"] = "pad"
    group_by: Literal["none", "length", "modality_length"] = "none"
    """Sampling order: random, length-grouped, or LLaVA's group_by_modality_length."""
    num_workers: int = 2
    synthesize: int | None = None
    """If set and `json` does not exist: write the synthetic shapes set (saisa.data.synth, this many training
    scenes, seeded by `seed`) into the JSON's folder first; it holds train_caption.json and train_qa.json."""
    synth_max_objects: int = 6
    """Shapes per synthesized scene are 1..this (the set's full range is 1-6)."""
    synth_questions: int = 3
    """Questions per synthesized training scene, each of a different category (1-6; 6 asks every category the
    scene can pose)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float | None = None
    """Peak learning rate; null = the stage's default (1e-3 stage 1, 2e-5 stage 2, 2e-4 stage 2 with LoRA)."""
    projector_lr: float | None = None
    """Learning rate of the projector if different (LLaVA's mm_projector_lr; LoRA recipes use 2e-5)."""
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping; the norm is still logged and checked)."""


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    global_batch: int | None = None
    """Samples per optimizer step over all processes; null = the stage's default (256 / 128)."""
    micro_batch: int = 16
    """Samples per forward on one process; accumulation = global_batch / (micro_batch * processes)."""
    epochs: float | None = None
    max_steps: int | None = None
    """Override: stop after this many optimizer steps (the LR schedule spans them), looping over the data."""
    warmup_ratio: float | None = None
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] | None = None


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    every: int = 1
    """Write a metrics line (and update the progress bar) every N optimizer steps."""
    tensorboard: bool = False
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    model: ModelConfig
    data: DataConfig
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str = "runs/default"
    seed: int = 42
    precision: Literal["bf16", "fp32"] = "bf16"
    gradient_checkpointing: bool = False
    visual_recompute: bool = False
    """saisa with per-layer projectors (stage 2): recompute each layer's visual K/V in backward under its own
    checkpoint, keeping only the vision features (slower than `fused_visual_kv`, which it overrides; for LoRA on
    k/v and Qwen3, which that does not cover)."""
    fused_visual_kv: bool = True
    """saisa with per-layer projectors (stage 2): all layers' visual K/V in one autograd Function that keeps Z, the
    pre-RoPE K/V and the RMS scales and recomputes the projector MLPs in backward (saisa.model.visual_grad); false:
    autograd keeps every layer's visual activations."""
    compile: bool = False
    save_every: int | None = None
    """Checkpoint every N optimizer steps and at the last one (null: no checkpoints, only the final export)."""
    keep_last: int | None = 2
    """Checkpoints kept on disk (null: all)."""


# ----------------------------------------------------------------------------------------------------- parsing


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to `tp` where unambiguous (int -> float, numeric str -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping of {sorted(f.name for f in fields(tp))}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise RecipeError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "recipe") -> Any:
    """Build dataclass `cls` from a nested mapping; unknown keys raise RecipeError listing the valid ones."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise RecipeError(f"{where}: missing required key(s) {missing}") from e
    except ValueError as e:
        raise RecipeError(f"{where}: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"optim.lr=2e-5"` -> (["optim", "lr"], 2e-5); the value is parsed with yaml.safe_load."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} is not of the form key.sub=value (e.g. optim.lr=2e-5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Set each dotted override in the nested mapping `data`, checking every key against the dataclass fields."""
    cls = cls or TrainRecipe
    data = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node, node_cls = data, cls
        for depth, key in enumerate(path):
            valid = {f.name: f for f in fields(node_cls)}
            where = ".".join(path[:depth]) or "recipe"
            if key not in valid:
                raise RecipeError(f"override {text!r}: {where} has no key {key!r}; valid keys: {list(valid)}")
            if depth == len(path) - 1:
                node[key] = value
                break
            sub_cls = typing.get_type_hints(node_cls)[key]
            if not _is_dataclass_type(sub_cls):
                raise RecipeError(f"override {text!r}: {'.'.join(path[:depth + 1])} is a value, not a section")
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(path[:depth + 1])} is not a mapping in the recipe")
            node_cls = sub_cls
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def resolve(recipe: TrainRecipe) -> TrainRecipe:
    """Fill `null` hyper-parameters with the stage's defaults (LoRA: LLaVA-1.5's 2e-4 LR, 2e-5 projector LR)."""
    d = recipe.stage.spec.defaults
    lora = recipe.stage.lora_r > 0
    optim = dataclasses.replace(
        recipe.optim,
        lr=recipe.optim.lr if recipe.optim.lr is not None else (LORA_DEFAULT_LR if lora else d.lr),
        projector_lr=recipe.optim.projector_lr if recipe.optim.projector_lr is not None else (d.lr if lora else None),
        weight_decay=recipe.optim.weight_decay if recipe.optim.weight_decay is not None else d.weight_decay,
    )
    s = recipe.schedule
    schedule = dataclasses.replace(
        s,
        global_batch=s.global_batch if s.global_batch is not None else d.global_batch,
        epochs=s.epochs if s.epochs is not None else d.epochs,
        warmup_ratio=s.warmup_ratio if s.warmup_ratio is not None else d.warmup_ratio,
        lr_schedule=s.lr_schedule if s.lr_schedule is not None else d.lr_schedule,
    )
    return dataclasses.replace(recipe, optim=optim, schedule=schedule)


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict[str, Any] | None = None) -> TrainRecipe:
    """Read a YAML recipe (or take `data`), apply `key.sub=value` overrides, check, resolve stage defaults."""
    if data is None:
        if path is None:
            raise RecipeError("load_recipe needs a YAML path or a mapping")
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    return resolve(from_dict(TrainRecipe, data))


def to_dict(recipe: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: TrainRecipe, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved recipe as YAML (plus an `extra` section, e.g. world size and accumulation)."""
    data = to_dict(recipe)
    text = yaml.safe_dump(data, sort_keys=False)
    if extra:
        text += "# runtime facts (not a recipe key):\n" + "".join(
            f"# {line}\n" for line in yaml.safe_dump(extra, sort_keys=False).splitlines())
    Path(path).write_text(text, encoding="utf-8")
