"""Where a stage-2 training step (forward + backward + fused AdamW) spends its time, saisa vs llava, on the GPU.

The benchmark suite's stage-2 setting (Qwen2-1.5B shape + CLIP-L/336, bf16 weights, micro-batch 8, 192 text
tokens, everything but the vision tower trained). Prints per system: the step's wall time, the GPU kernel time
and the top kernels and CPU-side operators of one profiled step; writes JSON to --out.

    PYTHONPATH=src python3 scripts/profile_train.py --out $OUT/profile-train.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from saisa.bench.setting import PRESETS
from saisa.bench.suite import prepare_training, train_step
from saisa.bench.systems import build_ours, make_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    setting, device = PRESETS["paper"], torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "systems": {}}
    for arch in ("saisa", "llava"):
        results["systems"][arch] = profile_one(arch, setting, device, args.top)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


def profile_one(arch: str, setting, device: torch.device, top_n: int) -> dict:
    model = build_ours(setting, arch, device, text_config=setting.train_text_config, seed=2)
    opt = torch.optim.AdamW(prepare_training(model, 2), lr=1e-5, fused=True)
    one = make_inputs(replace(setting, text_config=setting.train_text_config), setting.train_batch,
                      setting.train_text_tokens, device, seed=2)[:1]
    step = functools.partial(train_step(model, opt, one), 0)  # the same input set every step

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type.name == "CUDA":
            row = kernels[evt.name[:100]]
            row[0] += evt.device_time_total / 1e3
            row[1] += 1
    gpu_ms = sum(v[0] for v in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top_n]
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top_n)
    print(f"== {arch}: step {wall:.1f} ms wall, {gpu_ms:.1f} ms of GPU kernels")
    for n, (ms, c) in top:
        print(f"{ms:9.3f} ms {c:6d}x  {n}")
    print(cpu, flush=True)
    return {"step_ms": wall, "gpu_kernel_ms": gpu_ms, "kernels": len(kernels),
            "top_kernels": [(n, round(ms, 3), c) for n, (ms, c) in top], "cpu_table": cpu}


if __name__ == "__main__":
    main()
