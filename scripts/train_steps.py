"""Why does the stage-2 training step's median move run to run? Every step's time, with the caching allocator's and
the host-sync counters around it.

Unusual here: it is the bench's stage-2 step (saisa.bench: paper preset, Qwen2-1.5B shape, micro-batch 16, 192 text
tokens, everything but the vision tower trained, fused AdamW), timed one step at a time with CUDA events after a
synchronize (as time_fn does), so slow steps can be told apart from a slow median; per step it records how many
device allocations and frees the caching allocator made (cudaMalloc / cudaFree, which synchronize), its alloc
retries, and the wall time on the host. One step runs under torch.cuda.set_sync_debug_mode("warn") to count the
host synchronisations inside it. Writes JSON; prints a summary per system.

    PYTHONPATH=src python3 scripts/train_steps.py --out $OUT/train-steps.json [--steps 40]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import traceback
import warnings
from dataclasses import replace

import torch

from saisa.bench.setting import PRESETS
from saisa.bench.suite import prepare_training, train_step
from saisa.bench.systems import build_ours, make_inputs
from saisa.bench.timing import environment, free_memory, summarize

COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def run(arch: str, steps: int, device: torch.device) -> dict:
    s = PRESETS["paper"]
    model = build_ours(s, arch, device, text_config=s.train_text_config, seed=2)
    opt = torch.optim.AdamW(prepare_training(model, 2), lr=1e-5, fused=True)
    step = train_step(model, opt, make_inputs(replace(s, text_config=s.train_text_config), s.train_batch,
                                              s.train_text_tokens, device, seed=2))
    for i in range(3):
        step(i)
    torch.cuda.synchronize()
    syncs: list[str] = []

    def where(message, *args, **kwargs):  # the innermost saisa/torch-python frames of each synchronising call
        if "called a synchronizing" not in str(message):  # not the debug mode's own "prototype feature" warning
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/saisa/" in f.filename or "/torch/" in f.filename]
        syncs.append(" <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:3]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = where
        torch.cuda.set_sync_debug_mode("warn")
        step(3)
        torch.cuda.set_sync_debug_mode(0)
    rows = []
    for i in range(steps):
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        step(4 + i)
        b.record()
        host_launch_ms = (time.perf_counter() - t0) * 1e3
        b.synchronize()
        after = torch.cuda.memory_stats()
        rows.append({"ms": round(a.elapsed_time(b), 2), "host_ms": round(host_launch_ms, 2),
                     **{c: after.get(c, 0) - before.get(c, 0) for c in COUNTERS}})
    gaps = []  # per profiled step: GPU time with no kernel running, and the step's kernel span
    profiled = 8
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
        for i in range(profiled):
            torch.cuda.synchronize()
            time.sleep(0.02)  # a clear gap between steps: they are split at the largest gaps below
            step(100 + i)
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0)
    if kernels:
        between = sorted(range(1, len(kernels)), key=lambda j: kernels[j][0] - kernels[j - 1][1])[-(profiled - 1):]
        bounds = [0, *sorted(between), len(kernels)]
        for lo, hi in itertools.pairwise(bounds):
            inside = kernels[lo:hi]
            busy, end = 0.0, inside[0][0]
            for a, b in inside:
                busy += max(0.0, b - max(a, end))
                end = max(end, b)
            span = end - inside[0][0]
            gaps.append({"kernel_span_ms": round(span / 1e3, 2), "idle_ms": round((span - busy) / 1e3, 2),
                         "kernels": len(inside)})
    timing = summarize([r["ms"] for r in rows], 4, "cuda_event")
    return {"arch": arch, "median_ms": timing.median_ms, "min_ms": timing.min_ms, "p90_ms": timing.p90_ms,
            "max_ms": max(r["ms"] for r in rows), "syncs_in_one_step": len(syncs), "sync_sites": syncs[:20],
            "profiled_steps": gaps, "steps": rows, "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    device = torch.device("cuda")
    result = {"environment": environment(device, torch.bfloat16), "runs": []}
    for arch in ("saisa", "llava"):
        r = run(arch, args.steps, device)
        free_memory(device)  # the model and optimizer state went with run()'s frame
        result["runs"].append(r)
        slow = [x for x in r["steps"] if x["ms"] > 1.05 * r["min_ms"]]
        print(f"{arch}: median {r['median_ms']:.1f} min {r['min_ms']:.1f} p90 {r['p90_ms']:.1f} max {r['max_ms']:.1f} "
              f"ms; {len(slow)}/{len(r['steps'])} steps >5% over the fastest; syncs per step {r['syncs_in_one_step']}",
              flush=True)
        for x in slow[:12]:
            print("   slow:", x)
        print("   sync sites:", r["sync_sites"])
        print("   profiled steps:", r["profiled_steps"])
        print("   counters summed:", {c: sum(x[c] for x in r["steps"]) for c in COUNTERS})
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
