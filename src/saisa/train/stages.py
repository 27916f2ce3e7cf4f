"""Training stages as data: which parameters train, with which default hyper-parameters (paper Sec. 4.3, 5.1).

Unusual here: a stage is a value, not a flag copied into several objects. `apply_stage` is the only place that sets
`requires_grad`, and `check_trainable` re-derives the expected trainable set from the stage and compares it with the
model, so a stage can never silently train the vision tower or forget the projector.

    stage 1 (pre-training)  saisa: ONE shared projector MLP for all layers (projector_sharing="shared");
                            llava/naavit: the single embedding-space projector. Everything else frozen.
    stage 2 (fine-tuning)   saisa: the shared MLP is replicated into one MLP per layer (`expand_shared_projector`),
                            then projector + LLM train; with `lora_r > 0`, LoRA adapters on the LLM's linear layers
                            train instead of the LLM (peft), the projector still fully.
The vision tower is frozen in both. Defaults are LLaVA-1.5's (the paper trains "following LLaVA-1.5").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PROJECTOR = "multi_modal_projector"
LANGUAGE_MODEL = "language_model"
VISION_TOWER = "vision_tower"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class StageDefaults:
    """LLaVA-1.5 hyper-parameters of a stage (scripts/v1_5/pretrain.sh and finetune.sh)."""

    lr: float
    global_batch: int
    epochs: float = 1.0
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Stage:
    number: int
    name: str
    trains_llm: bool  # full LLM (or LoRA adapters when lora_r > 0)
    projector_sharing: str  # what a saisa projector must be during this stage
    defaults: StageDefaults


STAGES = {
    1: Stage(number=1, name="pretrain", trains_llm=False, projector_sharing="shared",
             defaults=StageDefaults(lr=1e-3, global_batch=256)),
    2: Stage(number=2, name="finetune", trains_llm=True, projector_sharing="per_layer",
             defaults=StageDefaults(lr=2e-5, global_batch=128)),
}
# LLaVA-1.5's LoRA fine-tune (finetune_lora.sh): r 128, alpha 256, lr 2e-4, projector lr 2e-5.
LORA_DEFAULT_LR = 2e-4


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Which stage to run, and LoRA for stage 2."""

    stage: int = 1
    """1 = pre-training (projector only), 2 = fine-tuning (projector + LLM)."""
    lora_r: int = 0
    """Stage 2 only: LoRA rank on the LLM's linear layers (0 = full fine-tuning). LLaVA-1.5 LoRA uses 128."""
    lora_alpha: int | None = None
    """LoRA scale numerator; null = 2 x lora_r (LLaVA-1.5: r 128, alpha 256)."""
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Linear-layer names inside the LLM's decoder layers that get adapters."""
    projector_sharing: str | None = None
    """Stage 2 only, saisa: "shared" keeps the one stage-1 MLP for every layer instead of replicating it (the
    paper's shared-projector ablation); null = the stage's own (stage 1 shared, stage 2 per_layer)."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage.stage={self.stage!r}; choose one of {sorted(STAGES)}")
        if self.lora_r < 0 or (self.lora_r and self.stage != 2):
            raise ValueError(f"stage.lora_r={self.lora_r} is only valid (> 0) for stage 2; stage 1 trains the "
                             "projector only")
        if self.projector_sharing not in (None, "shared", "per_layer"):
            raise ValueError(f"stage.projector_sharing={self.projector_sharing!r}; choose shared, per_layer or null")
        if self.stage == 1 and self.projector_sharing == "per_layer":
            raise ValueError("stage.projector_sharing=per_layer is not valid for stage 1, which trains one shared "
                             "projector MLP (the paper's pre-training)")

    @property
    def spec(self) -> Stage:
        return STAGES[self.stage]

    @property
    def sharing(self) -> str:
        """The saisa projector this stage trains: "shared" (one MLP) or "per_layer"."""
        return self.projector_sharing or self.spec.projector_sharing


class StageError(ValueError):
    """The model's trainable set is not what the stage says (names the offending parameters)."""


def _core(model: nn.Module) -> nn.Module:
    """The SaisaForConditionalGeneration inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_lora(model: nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None))


def prepare_projector(model: nn.Module, stage: StageConfig) -> None:
    """Bring a saisa projector into the stage's sharing: stage 2 replicates a shared (stage-1) MLP per layer.

    Stage 1 (and a stage 2 with `projector_sharing="shared"`) needs a shared projector from the start (build the
    model with projector_sharing="shared"); a per-layer projector is not averaged back into one, since that would
    not be the paper's recipe.
    """
    core = _core(model)
    if core.config.architecture != "saisa":
        return
    want = stage.sharing
    have = core.config.projector_sharing
    if have == want:
        return
    if want == "per_layer":
        core.expand_shared_projector()  # paper Sec. 4.3: "replicate the pre-trained shared MLP N times"
        return
    raise StageError(
        f"stage {stage.stage} trains one shared projector MLP, but this saisa model has per-layer projectors; build "
        "it with projector_sharing='shared' (saisa.train.build does so for stage 1)"
    )


def _add_lora(model: nn.Module, stage: StageConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    # Adapters only inside the LLM's decoder layers; the projector has StackedLinear (no nn.Linear) or nn.Linear that
    # must train in full, and the vision tower stays frozen.
    pattern = rf"^{LANGUAGE_MODEL}\.model\.layers\.\d+\..*\.({'|'.join(stage.lora_targets)})$"
    alpha = stage.lora_alpha if stage.lora_alpha is not None else 2 * stage.lora_r
    config = LoraConfig(r=stage.lora_r, lora_alpha=alpha, lora_dropout=stage.lora_dropout,
                        target_modules=pattern, bias="none")
    return get_peft_model(model, config)


def expected_trainable(name: str, stage: StageConfig, lora: bool) -> bool:
    """Whether parameter `name` (named inside SaisaForConditionalGeneration, peft prefixes removed) trains."""
    if name.startswith(VISION_TOWER + "."):
        return False
    if name.startswith(PROJECTOR + "."):
        return True
    if name.startswith(LANGUAGE_MODEL + ".") and stage.spec.trains_llm:
        return ".lora_" in name if lora else True
    return False


def _strip_peft(name: str) -> str:
    return name.removeprefix("base_model.model.")  # peft's wrapper prefix


def apply_stage(model: nn.Module, stage: StageConfig) -> nn.Module:
    """Set `requires_grad` for `stage` (expanding the saisa projector for stage 2, adding LoRA if asked).

    Returns the model to train: the same object, or a peft wrapper when `stage.lora_r > 0`.
    """
    prepare_projector(model, stage)
    if stage.lora_r and not is_lora(model):
        model = _add_lora(model, stage)
    lora = is_lora(model)
    for name, p in model.named_parameters():
        p.requires_grad_(expected_trainable(_strip_peft(name), stage, lora))
    check_trainable(model, stage)
    return model


def check_trainable(model: nn.Module, stage: StageConfig) -> None:
    """Raise StageError unless exactly the stage's parameters require grad."""
    lora = is_lora(model)
    if stage.lora_r and not lora:
        raise StageError(f"stage asks for LoRA (r={stage.lora_r}) but the model carries no adapters")
    wrong_on, wrong_off = [], []
    for name, p in model.named_parameters():
        want = expected_trainable(_strip_peft(name), stage, lora)
        if p.requires_grad and not want:
            wrong_on.append(name)
        elif want and not p.requires_grad:
            wrong_off.append(name)
    core = _core(model)
    if core.config.architecture == "saisa" and core.config.projector_sharing != stage.sharing:
        raise StageError(f"stage {stage.stage} needs a {stage.sharing!r} saisa projector, the model "
                         f"has {core.config.projector_sharing!r}")
    if wrong_on or wrong_off:
        raise StageError(
            f"stage {stage.stage} ({stage.spec.name}): {len(wrong_on)} parameter(s) train that should be frozen "
            f"{wrong_on[:5]}, {len(wrong_off)} frozen that should train {wrong_off[:5]}"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise StageError(f"stage {stage.stage}: nothing to train")


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, projector_lr: float | None = None
                 ) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: projector / rest, each split into decay / no-decay.

    No weight decay on biases and norm weights (1-D, or named `.bias`: the stacked projector's bias is (n, h)), as
    in HF Trainer, which LLaVA-1.5 trains with. Empty groups are dropped; each group carries a `name`.
    """
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "projector" if _strip_peft(name).startswith(PROJECTOR + ".") else "llm"
        decay = p.ndim >= 2 and not name.endswith(".bias")
        buckets.setdefault((part, decay), []).append(p)
    groups = []
    for (part, decay), params in sorted(buckets.items()):
        group_lr = projector_lr if (part == "projector" and projector_lr is not None) else lr
        groups.append({"name": f"{part}{'' if decay else '_no_decay'}", "params": params, "lr": group_lr,
                       "weight_decay": weight_decay if decay else 0.0})
    return groups


def trainable_summary(model: nn.Module) -> str:
    """'trainable 1.2M / 7.1B params (projector 1.2M)' for logs."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    proj = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and PROJECTOR in n)
    return f"trainable {_fmt(train)} / {_fmt(total)} params (projector {_fmt(proj)})"


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
