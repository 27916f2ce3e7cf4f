"""Where SAISA's batch-1 prefill spends its time on the GPU (Vicuna-7B + CLIP-L/336 shapes, bf16, random weights).

Times the CUDA-graph prefill for several fast-path settings and profiles one forward by kernel. Prints a table and
writes JSON to --out. Run on the device machine: PYTHONPATH=src python3 scripts/profile_prefill.py --out $OUT/p.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from saisa.bench.setting import PRESETS
from saisa.bench.systems import build_ours, make_inputs
from saisa.bench.timing import time_fn
from saisa.model.graphs import GraphedForward


def kernel_table(model, ids, feats, top=25):
    with torch.no_grad():
        model(input_ids=ids, image_features=feats, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, image_features=feats, logits_to_keep=1)
            torch.cuda.synchronize()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type.name == "CUDA":
            row = by_name[evt.name[:90]]
            row[0] += evt.device_time_total / 1000 if hasattr(evt, "device_time_total") else evt.cuda_time_total / 1000
            row[1] += 1
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    total = sum(v[0] for _, v in rows)
    return total, sum(v[1] for _, v in rows), [(n, round(v[0], 3), v[1]) for n, v in rows[:top]]


def sdpa_backends(t: int, v: int, heads: int = 32, dim: int = 128) -> dict[str, float]:
    """One layer's NAAViT attention (t text queries over v + t keys, boolean mask) under each SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, t, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, v + t, dim, device="cuda", dtype=torch.bfloat16)
    val = torch.randn_like(k)
    kpos = torch.cat([torch.arange(35, 35 + v), torch.arange(35), torch.arange(35 + v, v + t)]).cuda()
    qpos = torch.cat([torch.arange(35), torch.arange(35 + v, v + t)]).cuda()
    mask = (kpos[None, :] <= qpos[:, None])[None, None]
    out = {}
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, val, attn_mask=mask)  # noqa
                for _ in range(3):
                    fn()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(32):
                        fn()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(20):
                    start.record()
                    g.replay()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end) / 32 * 1000)
                out[name] = sorted(times)[10]
        except Exception as err:  # noqa: BLE001 - a backend that refuses this input is reported, not fatal
            out[name] = f"{type(err).__name__}: {str(err)[:80]}"
        print(f"sdpa {name:20s} {out[name]} us per layer", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--t", type=int, default=64)
    args = ap.parse_args()
    setting = PRESETS["paper"]
    device = torch.device("cuda")
    model = build_ours(setting, "saisa", device)
    s = make_inputs(setting, 1, args.t, device)[0]
    results = {"t": args.t, "variants": {}, "device": torch.cuda.get_device_name()}
    variants = {
        "reference (no fold, all layers, no overlap)": dict(fold=False, chunk=None, overlap=False),
        "fold, all layers": dict(fold=True, chunk=None, overlap=False),
        "compile, all layers": dict(fold=True, chunk=None, overlap=False, compile=True),
        "compile, chunk 4, overlap": dict(fold=True, chunk=4, overlap=True, compile=True),
        "compile, chunk 1, overlap": dict(fold=True, chunk=1, overlap=True, compile=True),
    }
    import time

    for name, kw in variants.items():
        model.optimize_for_inference(**kw)
        t0 = time.perf_counter()
        with torch.no_grad():
            g = GraphedForward(model, s.ids, None, s.features, logits_to_keep=1)
            build_s = time.perf_counter() - t0
            ms = time_fn(lambda i, g=g: g(s.features), "cuda", warmup=5, repeats=50).median_ms
            out = g(s.features).float()
            model.optimize_for_inference(fold=False, chunk=None, overlap=False)
            ref = model(input_ids=s.ids, image_features=s.features, logits_to_keep=1).logits.float()
            rel = float((out - ref).norm() / ref.norm())
        del g
        torch.cuda.empty_cache()
        results["variants"][name] = {"ms": ms, "build_s": build_s, "rel_err_vs_reference": rel}
        print(f"{name:45s} {ms:8.2f} ms (graph)  build {build_s:5.1f} s  rel err {rel:.2e}", flush=True)
    results["sdpa"] = sdpa_backends(args.t + 1, 576)
    model.optimize_for_inference(fold=True, chunk=None, overlap=False, compile=True)
    total, count, rows = kernel_table(model, s.ids, s.features)
    results["profile"] = {"kernel_ms_total": total, "kernels": count, "top": rows}
    print(f"\nprofile of one forward (compiled, all layers): {count} kernels, {total:.2f} ms of kernel time")
    for name, ms, n in rows:
        print(f"{ms:8.3f} ms {n:5d}x  {name}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
