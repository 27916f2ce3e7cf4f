"""Recipes (YAML + dotted overrides), stages as data (trainable sets, expansion, LoRA), shipped recipe files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model

from saisa.train.config import RecipeError, load_recipe, parse_override, to_dict
from saisa.train.stages import StageConfig, StageError, apply_stage, check_trainable, param_groups

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"llm": "l", "vision": "v"}, "data": {"json": "d.json"}}


# ------------------------------------------------------------------------------------------------------ recipes


def test_overrides_and_stage_defaults():
    r = load_recipe(data=BASE, overrides=["optim.lr=2e-5", "schedule.micro_batch=4", "data.group_by=length",
                                          "stage.stage=2", "save_every=null"])
    assert r.optim.lr == 2e-5 and isinstance(r.optim.lr, float)  # YAML 1.1 reads 2e-5 as a string
    assert r.schedule.micro_batch == 4 and r.data.group_by == "length" and r.save_every is None
    assert r.schedule.global_batch == 128 and r.schedule.warmup_ratio == 0.03  # stage 2 defaults
    r1 = load_recipe(data=BASE)
    assert (r1.optim.lr, r1.schedule.global_batch, r1.schedule.lr_schedule) == (1e-3, 256, "cosine")
    assert load_recipe(data=BASE, overrides=["optim.betas=[0.9, 0.95]"]).optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"optim has no key 'lrr'; valid keys: \['lr', 'projector_lr'"),
    ("optimizer.lr=1", r"recipe has no key 'optimizer'; valid keys: \['model', 'data', 'stage'"),
    ("optim.lr", r"not of the form key.sub=value"),
    ("=3", r"not of the form key.sub=value"),
    ("optim..lr=3", r"not of the form key.sub=value"),
    ("seed.x=1", r"seed is a value, not a section"),
    ("optim.lr=fast", r"optim.lr: expected float, got 'fast'"),
    ("schedule.micro_batch=2.5", r"schedule.micro_batch: expected int, got 2.5"),
    ("precision=fp16", r"precision: 'fp16' is not one of \['bf16', 'fp32'\]"),
    ("stage.stage=3", r"stage.stage=3; choose one of \[1, 2\]"),
    ("stage.lora_r=8", r"lora_r=8 is only valid \(> 0\) for stage 2"),
    ("gradient_checkpointing=yes please", r"gradient_checkpointing: expected bool"),
    ("data.max_length=[1", r"value is not valid YAML"),
])
def test_override_errors_are_clear(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(data=BASE, overrides=[override])


def test_unknown_yaml_key_and_missing_parts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "optim": {"learning_rate": 1}}))
    with pytest.raises(RecipeError, match=r"recipe.optim: unknown key\(s\) \['learning_rate'\]; valid keys"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match=r"recipe: missing required key\(s\) \['data'\]"):
        load_recipe(data={"model": BASE["model"]})
    with pytest.raises(RecipeError, match="set both `llm` and `vision`, or `init_from`"):
        load_recipe(data={**BASE, "model": {"llm": "x"}})
    assert parse_override("a.b= 1e-3 ") == (["a", "b"], "1e-3")  # the string; typed when checked


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    again = load_recipe(data=to_dict(r))  # the resolved recipe saved beside checkpoints reloads unchanged
    assert again == r
    if "llava15" in path.name:
        want = {1: (1e-3, 256), 2: (2e-5, 128)}[r.stage.stage]
        assert (r.optim.lr, r.schedule.global_batch, r.schedule.epochs, r.schedule.warmup_ratio) == (*want, 1, 0.03)
        assert r.optim.weight_decay == 0 and r.schedule.lr_schedule == "cosine" and r.precision == "bf16"


def test_accelerate_configs_parse():
    for name in ("ddp", "fsdp2", "zero2", "zero3"):
        cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{name}.yaml").read_text())
        assert cfg["mixed_precision"] == "bf16"
    fsdp = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


# ------------------------------------------------------------------------------------------------------ stages


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_trains_only_the_shared_projector():
    model = apply_stage(tiny_model("saisa", projector_sharing="shared"), StageConfig(stage=1))
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.")}
    assert model.multi_modal_projector.num_mlps == 1
    with pytest.raises(StageError, match="per-layer projectors"):
        apply_stage(tiny_model("saisa"), StageConfig(stage=1))


@pytest.mark.parametrize("arch", ["llava", "naavit"])
def test_stage1_single_projector_for_llava_and_naavit(arch):
    model = apply_stage(tiny_model(arch), StageConfig(stage=1))
    assert trainable(model) == {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
                                "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"}


def test_stage2_expands_and_trains_projector_and_llm():
    model = tiny_model("saisa", projector_sharing="shared")
    apply_stage(model, StageConfig(stage=1))
    shared = model.multi_modal_projector.linear_1.weight.detach().clone()
    model = apply_stage(model, StageConfig(stage=2))
    proj = model.multi_modal_projector
    assert proj.num_mlps == 2 and model.config.projector_sharing == "per_layer"
    assert all(torch.equal(proj.linear_1.weight[i], shared[0]) for i in range(2))  # replicated, paper Sec. 4.3
    names = {n for n, _ in model.named_parameters()}
    assert trainable(model) == {n for n in names if not n.startswith("vision_tower.")}
    model.vision_tower.requires_grad_(True)
    with pytest.raises(StageError, match=r"train that should be frozen \['vision_tower"):
        check_trainable(model, StageConfig(stage=2))


def test_stage2_lora_adapters_and_full_projector():
    model = apply_stage(tiny_model("saisa", projector_sharing="shared"), StageConfig(stage=2, lora_r=4))
    names = trainable(model)
    assert names and all(".lora_" in n or ".multi_modal_projector." in n for n in names)
    assert any("self_attn.q_proj.lora_A" in n for n in names) and any("mlp.down_proj.lora_B" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    groups = param_groups(model, lr=2e-4, weight_decay=0.0, projector_lr=2e-5)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["llm"] == 2e-4 and lrs["projector"] == 2e-5 and lrs["projector_no_decay"] == 2e-5


def test_param_groups_no_decay_on_bias_and_norms():
    model = apply_stage(tiny_model("llava"), StageConfig(stage=2))
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    no_decay = {id(p) for g in groups.values() if g["weight_decay"] == 0.0 for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (id(p) in no_decay) == (p.ndim < 2 or name.endswith(".bias")), name
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(trainable(model))
