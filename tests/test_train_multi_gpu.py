"""GPU training through accelerate: bf16, DDP and FSDP2 (2 processes), resume and export.

Run on a GPU machine: `pytest -m "gpu or multi_gpu" tests/test_train_multi_gpu.py`. Each multi-GPU case launches this
file as an `accelerate launch` worker that trains a tiny saisa model straight for 10 steps, then again stopped at
step 4 and resumed, and prints one JSON line comparing the two (and the exported folder) parameter by parameter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # accelerate config, text-only samples in the mix, activation checkpointing
    "ddp": ("ddp", True, False),
    "fsdp2": ("fsdp2", False, True),
    "fsdp2-text-only": ("fsdp2", True, False),
}


def _launch(case: str, out: Path) -> dict:
    config, text_only, checkpointing = CASES[case]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2", __file__, str(out),
           str(int(text_only)), str(int(checkpointing))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                           f"{proc.stderr[-6000:]}"
    return json.loads(lines[-1])


@pytest.mark.multi_gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gpus_resume_bitwise_and_export(tmp_path, case):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    report = _launch(case, tmp_path)
    print(case, json.dumps(report))
    assert report["losses_fall"], report
    assert report["resume_bitwise"], report
    assert report["export_matches"], report


@pytest.mark.gpu
def test_one_gpu_bf16_resume_bitwise(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    report = _worker(tmp_path, text_only=False, checkpointing=False)
    print("one-gpu", json.dumps(report))
    assert report["losses_fall"] and report["resume_bitwise"] and report["export_matches"], report


def _worker(out: Path, text_only: bool, checkpointing: bool) -> dict:
    from test_train import TinySet, collate, model_for, recipe

    from saisa import SaisaForConditionalGeneration
    from saisa.train.checkpoint import _full
    from saisa.train.loop import fit, make_accelerator

    def run(sub: str, stop_after: int | None = None, resume: bool = False):
        r = recipe(out / sub, "precision=bf16", "save_every=4", "schedule.max_steps=10",
                   f"gradient_checkpointing={str(checkpointing).lower()}")
        accelerator = make_accelerator(r, text_only_samples=text_only)
        result = fit(model_for("saisa"), TinySet(text_only_every=4 if text_only else 0), collate, r,
                     accelerator=accelerator, stop_after=stop_after, resume=resume, export=stop_after is None)
        model = accelerator.unwrap_model(result.model)
        full = {n: _full(p.detach()).float().cpu() for n, p in model.named_parameters()}
        return result, full, accelerator

    straight, a, accelerator = run("a")
    run("b", stop_after=4)
    _, b, _ = run("b", resume=True)
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    report = {
        "processes": accelerator.num_processes, "distributed": str(accelerator.distributed_type),
        "losses": [round(r["loss"], 4) if r["loss"] is not None else None for r in straight.metrics],
        "resume_bitwise": not differ, "differing": differ[:5],
        "max_abs_diff": max((float((a[n] - b[n]).abs().max()) for n in differ), default=0.0),
        "skipped_batches": straight.state.skipped_batches,
    }
    losses = [x for x in report["losses"] if x is not None]
    report["losses_fall"] = losses[-1] < losses[0]
    if accelerator.is_main_process:
        loaded = SaisaForConditionalGeneration.from_pretrained(straight.export)
        exported = {n: p.detach().float() for n, p in loaded.named_parameters()}
        report["export_matches"] = exported.keys() == a.keys() and all(torch.equal(exported[n], a[n]) for n in a)
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":  # accelerate launch worker: OUT TEXT_ONLY CHECKPOINTING
    out_dir, text_only_flag, checkpointing_flag = sys.argv[1:4]
    result = _worker(Path(out_dir), text_only=bool(int(text_only_flag)), checkpointing=bool(int(checkpointing_flag)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
