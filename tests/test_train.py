"""Training loop and checkpoints on tiny models (CPU, fp32): loss falls, resume is bitwise, crashes are survivable."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN_ID, random_pixels, tiny_model

from saisa import SaisaForConditionalGeneration
from saisa.batch import MultimodalBatch
from saisa.train import checkpoint as ckpt
from saisa.train.config import load_recipe
from saisa.train.loop import BatchLayout, NonFiniteError, fit, sample_order

N_SAMPLES = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and much faster than two when the CPU is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinySet(torch.utils.data.Dataset):
    """[bos, <image>, prompt..., answer...]; loss on the answer, which depends on the sample (and its image)."""

    def __init__(self, n: int = N_SAMPLES, seed: int = 0, text_only_every: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for i in range(n):
            answer = torch.randint(3, 90, (3 + i % 3,), generator=g)
            with_image = not (text_only_every and i % text_only_every == 0)
            prompt = torch.tensor([1] + ([IMAGE_TOKEN_ID] if with_image else []) + [5, 6, 7])
            ids = torch.cat([prompt, answer])
            labels = torch.cat([torch.full_like(prompt, -100), answer])
            self.samples.append({"input_ids": ids, "labels": labels,
                                 "pixels": random_pixels(1, seed=100 + i) if with_image else None})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(s["input_ids"]) for s in self.samples]

    @property
    def is_multimodal(self) -> list[bool]:
        return [s["pixels"] is not None for s in self.samples]


def collate(samples: list[dict]) -> MultimodalBatch:
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), -100)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
    pixels = [s["pixels"] for s in samples if s["pixels"] is not None]
    return MultimodalBatch(input_ids=ids, attention_mask=mask, labels=labels,
                           pixel_values=torch.cat(pixels) if pixels else None)


def recipe(tmp_path: Path, *overrides: str, stage: int = 2):
    data = {
        "model": {"llm": "tiny", "vision": "tiny"},
        "data": {"json": "unused.json", "num_workers": 0},
        "stage": {"stage": stage},
        "optim": {"lr": 1e-2},
        "schedule": {"global_batch": 8, "micro_batch": 4, "max_steps": 20},
        "log": {"progress": False},
        "output_dir": str(tmp_path / "run"),
        "precision": "fp32",
        "seed": 3,
    }
    return load_recipe(data=data, overrides=list(overrides))


def model_for(arch: str, stage: int = 2) -> SaisaForConditionalGeneration:
    kw = {"projector_sharing": "shared"} if arch == "saisa" else {}
    return tiny_model(arch, **kw)


def params(model) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [n for n in a if not torch.equal(a[n], b[n])]
    assert not diff, f"{len(diff)} parameters differ, e.g. {diff[:3]}"


# ------------------------------------------------------------------------------------------------------ learning


def test_loss_falls(tmp_path, arch):
    r = recipe(tmp_path, "data.group_by=modality_length")
    result = fit(model_for(arch), TinySet(), collate, r, export=False)
    losses = [row["loss"] for row in result.metrics]
    assert len(losses) == 20 and result.state.step == 20
    assert losses[-1] < 0.75 * losses[0], losses
    row = result.metrics[-1]
    assert row["tokens_per_s"] > 0 and row["samples_per_s"] > 0 and row["grad_norm"] > 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 21))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_stage1_then_stage2_handoff(tmp_path):
    """Stage 1 trains only the shared MLP; its export is stage 2's init_from, expanded to per-layer MLPs."""
    r1 = recipe(tmp_path, "stage.stage=1", "schedule.max_steps=4", stage=1)
    model = model_for("saisa")
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if "projector" not in n}
    projector_before = model.multi_modal_projector.linear_1.weight.detach().clone()
    result = fit(model, TinySet(), collate, r1)
    trained = params(result.model)
    assert all(torch.equal(frozen_before[n], trained[n]) for n in frozen_before)  # nothing else moved
    assert not torch.equal(trained["multi_modal_projector.linear_1.weight"], projector_before)
    loaded = SaisaForConditionalGeneration.from_pretrained(result.export)
    assert loaded.config.projector_sharing == "shared" and loaded.multi_modal_projector.num_mlps == 1
    assert_bitwise(params(loaded), trained)

    r2 = recipe(tmp_path, "output_dir=" + str(tmp_path / "stage2"), "schedule.max_steps=2")
    result2 = fit(loaded, TinySet(), collate, r2)
    final = SaisaForConditionalGeneration.from_pretrained(result2.export)
    assert final.config.projector_sharing == "per_layer" and final.multi_modal_projector.num_mlps == 2


def test_stage2_can_keep_the_shared_projector(tmp_path):
    """stage.projector_sharing=shared: stage 2 trains the one stage-1 MLP and the LLM, without replicating it."""
    model = model_for("saisa")
    r = recipe(tmp_path, "stage.projector_sharing=shared", "schedule.max_steps=2")
    projector_before = model.multi_modal_projector.linear_1.weight.detach().clone()
    llm_before = model.language_model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = fit(model, TinySet(), collate, r)
    trained = params(result.model)
    assert not torch.equal(trained["multi_modal_projector.linear_1.weight"], projector_before)
    assert not torch.equal(trained["language_model.model.layers.0.mlp.up_proj.weight"], llm_before)
    final = SaisaForConditionalGeneration.from_pretrained(result.export)
    assert final.config.projector_sharing == "shared" and final.multi_modal_projector.num_mlps == 1
    with pytest.raises(ValueError, match="not valid for stage 1"):
        recipe(tmp_path, "stage.stage=1", "stage.projector_sharing=per_layer", stage=1)
    with pytest.raises(ValueError, match="choose shared, per_layer or null"):
        recipe(tmp_path, "stage.projector_sharing=both")


def test_lora_export_merges(tmp_path):
    r = recipe(tmp_path, "stage.lora_r=4", "stage.lora_alpha=8", "optim.lr=1e-2", "schedule.max_steps=3")
    result = fit(model_for("llava"), TinySet(), collate, r)
    assert r.optim.projector_lr == 2e-5  # LLaVA-1.5 LoRA: projector at 2e-5 while the adapters take optim.lr
    loaded = SaisaForConditionalGeneration.from_pretrained(result.export)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    batch = collate([TinySet()[i] for i in range(4)])
    merged = result.model.eval()(**batch.model_inputs()).logits
    torch.testing.assert_close(loaded.eval()(**batch.model_inputs()).logits, merged)


# ------------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("arch_", ["saisa", "llava"])
def test_resume_is_bitwise(tmp_path, arch_):
    straight = fit(model_for(arch_), TinySet(), collate, recipe(tmp_path / "a"), export=False)
    r = recipe(tmp_path / "b", "save_every=3")
    first = fit(model_for(arch_), TinySet(), collate, r, stop_after=7, export=False)
    assert first.state.step == 7 and first.checkpoint.name == "step-7"
    resumed = fit(model_for(arch_), TinySet(), collate, r, resume=True, export=False)
    assert resumed.state.step == 20
    assert_bitwise(params(resumed.model), params(straight.model))
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_crash_during_checkpoint_write_resumes_from_last_complete(tmp_path, monkeypatch):
    straight = fit(model_for("saisa"), TinySet(), collate, recipe(tmp_path / "a", "schedule.max_steps=8"),
                   export=False)
    r = recipe(tmp_path / "b", "schedule.max_steps=8", "save_every=3")
    real_save = ckpt._save_torch

    def dying_save(obj, path):
        if Path(path).parent.name == "tmp-step-6" and Path(path).name == ckpt.SCHEDULER:
            raise KeyboardInterrupt("killed while writing step 6")
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_save_torch", dying_save)
    with pytest.raises(KeyboardInterrupt):
        fit(model_for("saisa"), TinySet(), collate, r, export=False)
    monkeypatch.setattr(ckpt, "_save_torch", real_save)
    root = tmp_path / "b" / "run" / "checkpoints"
    assert (root / "tmp-step-6").is_dir() and not (root / "step-6").exists()
    assert (root / ckpt.LATEST).read_text().strip() == "step-3"
    # A step folder without a valid manifest (e.g. copied half-way) is ignored as well.
    shutil.copytree(root / "step-3", root / "step-7")
    (root / "step-7" / ckpt.OPTIMIZER).write_bytes(b"truncated")
    assert ckpt.find_latest(root).name == "step-3"

    resumed = fit(model_for("saisa"), TinySet(), collate, r, resume=True, export=False)
    assert resumed.state.step == 8
    assert_bitwise(params(resumed.model), params(straight.model))
    assert not (root / "tmp-step-6").exists()  # stale tmp cleaned on the next save


def test_resume_refuses_other_batch_layout(tmp_path):
    r = recipe(tmp_path, "save_every=2")
    fit(model_for("llava"), TinySet(), collate, r, stop_after=2, export=False)
    other = recipe(tmp_path, "save_every=2", "schedule.micro_batch=2")
    with pytest.raises(ckpt.CheckpointError, match="micro_batch"):
        fit(model_for("llava"), TinySet(), collate, other, resume=True, export=False)


# ------------------------------------------------------------------------------------------------------ failures


def test_nonfinite_loss_stops_before_step(tmp_path):
    model = model_for("llava")
    r = recipe(tmp_path, "schedule.max_steps=5")
    calls = {"n": 0}

    def poison(module, args, output):  # a NaN loss from the 7th forward on (step 4, micro-batch 1)
        calls["n"] += 1
        if calls["n"] >= 7:
            if output.logits is not None:  # None when the loss skips the logits (training with targets)
                output.logits.fill_(float("nan"))
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    snapshot = {}

    def remember(module, args, output):
        if calls["n"] == 7:  # first forward of step 4: the weights after step 3
            snapshot.update(params(module))

    model.register_forward_hook(remember)
    with pytest.raises(NonFiniteError, match=r"step 4: the loss is nan .*BEFORE the optimizer step"):
        fit(model, TinySet(), collate, r, export=False)
    assert_bitwise(params(model), snapshot)  # weights after step 3: step 4 never applied


def test_fully_masked_batches_are_skipped_and_counted(tmp_path):
    data = TinySet()
    for s in data.samples[:14]:
        s["labels"] = torch.full_like(s["labels"], -100)
    r = recipe(tmp_path, "schedule.max_steps=6")
    model = model_for("naavit")
    result = fit(model, data, collate, r, export=False)
    losses = [row["loss"] for row in result.metrics]
    assert all(x is None or not math.isnan(x) for x in losses)  # never NaN
    assert result.metrics[-1]["skipped_batches"] == result.state.skipped_batches > 0
    assert None in losses and any(x is not None for x in losses)  # some steps had nothing to learn


# ------------------------------------------------------------------------------------------------------ sampling


def test_grouped_sampling_is_deterministic_and_grouped():
    lengths = [5, 9, 3, 7, 8, 2, 6, 4] * 4
    mm = [i % 3 != 0 for i in range(32)]
    a = sample_order(32, seed=1, epoch=0, group_by="modality_length", lengths=lengths, multimodal=mm, megabatch=4)
    b = sample_order(32, seed=1, epoch=0, group_by="modality_length", lengths=lengths, multimodal=mm, megabatch=4)
    c = sample_order(32, seed=1, epoch=1, group_by="modality_length", lengths=lengths, multimodal=mm, megabatch=4)
    assert a == b and a != c and sorted(a) == list(range(32))
    full = [a[k: k + 4] for k in range(0, 32, 4)][:-2]  # the last megabatches hold the partial leftovers
    for chunk in full:
        assert len({mm[i] for i in chunk}) == 1  # one modality per megabatch
        assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)


def test_batch_layout_shards_processes():
    layout = BatchLayout(num_samples=20, global_batch=8, micro_batch=2, world_size=2)
    assert layout.accumulation == 2 and layout.steps_per_epoch == 2
    order = list(range(20))
    r0, r1 = layout.rank_batches(order, 0), layout.rank_batches(order, 1)
    assert r0 == [[0, 1], [4, 5], [8, 9], [12, 13]] and r1 == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert layout.rank_batches(order, 0, start_step=1) == [[8, 9], [12, 13]]
    with pytest.raises(ValueError, match="not a multiple"):
        _ = BatchLayout(num_samples=20, global_batch=8, micro_batch=3, world_size=1).accumulation


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    plain = fit(model_for("saisa"), TinySet(), collate, recipe(tmp_path / "a", "schedule.max_steps=3"), export=False)
    ckpt_run = fit(model_for("saisa"), TinySet(), collate,
                   recipe(tmp_path / "b", "schedule.max_steps=3", "gradient_checkpointing=true"), export=False)
    assert ckpt_run.model.gradient_checkpointing
    a, b = params(plain.model), params(ckpt_run.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_visual_recompute_gives_the_same_weights(tmp_path):
    plain = fit(model_for("saisa"), TinySet(), collate, recipe(tmp_path / "a", "schedule.max_steps=3"), export=False)
    run = fit(model_for("saisa"), TinySet(), collate,
              recipe(tmp_path / "b", "schedule.max_steps=3", "visual_recompute=true"), export=False)
    assert run.model.visual_recompute and run.model.multi_modal_projector.num_mlps > 1  # stage 2: per-layer MLPs
    a, b = params(plain.model), params(run.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_fresh_run_refuses_a_used_output_dir(tmp_path):
    r = recipe(tmp_path, "save_every=2", "schedule.max_steps=2")
    fit(model_for("llava"), TinySet(), collate, r, export=False)
    with pytest.raises(ckpt.CheckpointError, match="checkpoints of an earlier run; pass --resume"):
        fit(model_for("llava"), TinySet(), collate, r, export=False)
