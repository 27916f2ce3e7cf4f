"""How fast can the batch-1 text layers' pieces of a 7B prefill go: cuBLAS against Triton kernels, on an H100.

Unusual here: every candidate runs as a CUDA graph of n calls, one per layer's own tensors (n distinct weights, so
none is found in L2), and is timed per call; each candidate is checked against the reference before it is timed.
Sections: "gemms", every tiling of saisa.model.skinny's kernels at the text GEMMs' shapes against cuBLAS (and the
device-to-device copy bandwidth); "attention", q_proj + RoPE + attention, the compiled reference against
saisa.model.text_attention's kernels in several settings ("attention-ncu": a few launches of them, to run under
Nsight Compute); "prefetch", whether an L2 prefetch of W_q issued before the k/v GEMM
hides q_proj's weight reads. Prints tables; JSON to --out (rewritten after each part).

    PYTHONPATH=src python3 scripts/profile_skinny.py --out $OUT/skinny.json --sections gemms --quick
    PYTHONPATH=src python3 scripts/profile_skinny.py --out $OUT/attention.json --sections attention
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from saisa.model import skinny
from saisa.model import text_attention as text_attention_module
from saisa.model.decoder import apply_rope
from saisa.model.fused import attend, key_value
from saisa.model.text_attention import text_attention

SHAPES = {  # name -> (N, K, weights per call); Vicuna-7B: h 4096, FFN 11008
    "q_proj / o_proj": (4096, 4096, 1),
    "gate_proj + up_proj, SiLU * up": (11008, 4096, 2),
    "down_proj": (4096, 11008, 1),
    "k/v folded, text rows": (8192, 4096, 1),
}


def graph_us(calls, reps: int = 30) -> float:
    """Median microseconds per call of `calls` (a list of thunks) replayed as one CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / len(calls))
    del g
    return statistics.median(times)


def kernel_us(calls) -> dict[str, float]:
    """Device microseconds per call of each kernel that `calls` launch (torch.profiler over eager launches)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for c in calls:
            c()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name[:90]] = totals.get(e.name[:90], 0.0) + e.device_time / len(calls)
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def reference(x, per):
    if per == 2:
        return lambda w: F.silu(F.linear(x, w[0])) * F.linear(x, w[1])
    return lambda w: F.linear(x, w[0])


def candidate(x, per):
    if per == 2:
        return lambda w, t: skinny.gate_up(x, w[0], w[1], t)
    return lambda w, t: skinny.linear(x, w[0], t)


def copy_tbps() -> float:
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    us = graph_us([lambda: dst.copy_(src)] * 4)
    return 2 * src.numel() * 2 / (us * 1e-6) / 1e12


def candidates(quick: bool):
    for bn, bk, stages, warps in itertools.product((16, 32, 64, 128), (64, 128, 256), (3, 4, 5, 6), (4, 8)):
        smem = (64 + bn) * bk * 2 * stages
        if smem > 200_000 or (warps == 8 and bn < 64) or (quick and stages == 5):
            continue
        yield skinny.Tiles(bn, bk, stages, warps)
    for bn, split in ((64, 2), (128, 2), (128, 4)):
        yield skinny.Tiles(bn, 128, 4, 4, split)


def rope_tables(b: int, s: int, d: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 10000.0 ** (-torch.arange(0, d, 2, device=dev).float() / d)
    ang = torch.arange(s, device=dev).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1).expand(b, s, d)
    return ang.cos().to(torch.bfloat16).contiguous(), ang.sin().to(torch.bfloat16).contiguous()


def attention_section(layers: int, dev) -> dict:
    """q_proj + RoPE + attention over [visual; text] keys: the compiled reference (what fused.text_layer_step runs
    with attention="eager") against q_proj + saisa.model.text_attention in several settings; correctness at several
    layouts, then timing at the paper's shapes (all n layers' tensors in turn), the kernels' registers and spills,
    and each kernel's device time."""
    def reference(unit, ln1, wq, kv, cos, sin, bias, hq, hkv, d):
        b, t, _ = unit.shape
        q = F.linear(ln1 * unit, wq).view(b, t, hq, d)
        q = apply_rope(q, cos[:, -t:].unsqueeze(2), sin[:, -t:].unsqueeze(2)).transpose(1, 2)
        k, v = key_value(kv, cos, sin, d)
        return attend(q, k.transpose(1, 2), v.transpose(1, 2), bias, d**-0.5, "eager").transpose(1, 2).reshape(b, t, -1)

    q_proj = torch.compile(lambda unit, ln1, wq: F.linear(ln1 * unit, wq), dynamic=False)

    def ours(setting):
        def run(unit, ln1, wq, kv, cos, sin, bias, hq, hkv, d):
            return text_attention(q_proj(unit, ln1, wq), kv, cos, sin, bias, d, **setting)
        return run

    def inputs(b, t, sv, hq, hkv, d, text_first=False):
        h = hq * d
        unit = torch.randn(b, t, h, device=dev, dtype=torch.bfloat16)
        ln1 = 1 + 0.1 * torch.randn(h, device=dev, dtype=torch.bfloat16)
        wq = torch.randn(h, h, device=dev, dtype=torch.bfloat16) * h**-0.5
        kv = torch.randn(b, sv + t, 2 * hkv * d, device=dev, dtype=torch.bfloat16)
        cos, sin = rope_tables(b, sv + t, d, dev)
        allowed = torch.ones(b, 1, t, sv + t, dtype=torch.bool, device=dev)
        allowed[..., sv:] = torch.tril(allowed[0, 0, :, sv:])
        if text_first:  # the first 5 text tokens come before the image: they see no visual key
            allowed[..., :5, :sv] = False
        if b > 1:  # the second sample padded: its first 3 key rows are padding
            allowed[1, ..., sv:sv + 3] = False
            allowed[1, ..., :3, sv:sv + 3] = torch.eye(3, dtype=torch.bool, device=dev)
        bias = torch.zeros(allowed.shape, dtype=torch.bfloat16, device=dev).masked_fill(~allowed, float("-inf"))
        return unit, ln1, wq, kv, cos, sin, bias, hq, hkv, d

    settings = {
        "default": {},
        "half table": {"half_table": True},
        "split 1": {"split": 1},
        "split 2": {"split": 2},
        "split 3, half table": {"split": 3, "half_table": True},
        "split 10, half table": {"split": 10, "half_table": True},
        "half table, 3 stages": {"half_table": True, "stages": 3},
        "half table, 1 stage": {"half_table": True, "stages": 1},
        "half table, 8 warps": {"half_table": True, "warps": 8},
        "half table, block_n 32": {"half_table": True, "block_n": 32},
        "half table, block_n 32, split 10": {"half_table": True, "block_n": 32, "split": 10},
        "half table, block_n 128": {"half_table": True, "block_n": 128, "warps": 8},
    }
    out = {"checks": [], "us_per_layer": {}}
    for b, t, sv, hq, hkv, d, first in ((1, 64, 576, 32, 32, 128, False), (2, 37, 100, 8, 2, 64, True),
                                        (1, 128, 576, 32, 32, 128, True), (3, 16, 40, 4, 4, 128, False)):
        args = inputs(b, t, sv, hq, hkv, d, first)
        ref = reference(*args).float()
        for name in ("default", "half table", "split 1", "split 10, half table", "half table, block_n 32"):
            got = ours(settings[name])(*args).float()
            err = float((got - ref).norm() / ref.norm())
            out["checks"].append({"setting": name, "b": b, "t": t, "sv": sv, "hq": hq, "hkv": hkv, "d": d,
                                  "text_first": first, "rel_err": round(err, 5), "finite": bool(got.isfinite().all())})
            print(f"check {out['checks'][-1]}")
    compiled = torch.compile(reference, dynamic=False)
    sets = [inputs(1, 64, 576, 32, 32, 128) for _ in range(layers)]
    times = out["us_per_layer"]
    times["compiled reference"] = round(graph_us([lambda a=a: compiled(*a) for a in sets]), 2)
    times["q_proj alone"] = round(graph_us([lambda a=a: q_proj(*a[:3]) for a in sets]), 2)
    for name, setting in settings.items():
        try:
            fn = ours(setting)
            times[name] = round(graph_us([lambda a=a, f=fn: f(*a) for a in sets]), 2)
        except Exception as e:  # noqa: BLE001 (out of resources: record and go on)
            times[name] = f"{type(e).__name__}: {str(e)[:120]}"
    for name, us in times.items():
        print(f"  {name}: {us} us per layer")
    out["compiled_kernels"] = compiled_kernel_stats()
    print("  registers/spills:", out["compiled_kernels"])
    # Where the time goes: each kernel's device time (eager launches, so launch gaps are not in these figures).
    out["kernels_us_per_layer"] = {"compiled reference": kernel_us([lambda a=a: compiled(*a) for a in sets])}
    for name in ("default", "half table", "split 1", "half table, block_n 32, split 10"):
        fn = ours(settings[name])
        out["kernels_us_per_layer"][name] = kernel_us([lambda a=a, f=fn: f(*a) for a in sets])
    for name, kernels in out["kernels_us_per_layer"].items():
        print(f"  kernels, {name}: {kernels}")
    return out


def compiled_kernel_stats() -> list[dict]:
    """Registers per thread, spills and shared memory of every compiled text_attention kernel (Triton's caches)."""
    _, span_kernel, merge_kernel = text_attention_module._triton()
    stats = []
    for fn in (span_kernel, merge_kernel):
        for caches in getattr(fn, "device_caches", {}).values():
            for k in caches[0].values():
                try:
                    k._init_handles()
                    stats.append({"name": k.name, "regs": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared,
                                  "warps": k.metadata.num_warps, "stages": k.metadata.num_stages,
                                  "constants": str(getattr(k, "src", None) and k.src.constants)[:200]})
                except Exception as e:  # noqa: BLE001 (Triton internals differ by version: record it)
                    stats.append({"error": f"{type(e).__name__}: {str(e)[:120]}"})
    return stats


def attention_ncu(dev) -> None:
    """A few launches of text_attention at the paper's shapes, to run under Nsight Compute."""
    hq, d, sv, t = 32, 128, 576, 64
    q = torch.randn(1, t, hq * d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, sv + t, 2 * hq * d, device=dev, dtype=torch.bfloat16)
    cos, sin = rope_tables(1, sv + t, d, dev)
    bias = torch.zeros(1, 1, t, sv + t, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        text_attention(q, kv, cos, sin, bias, d, half_table=True)
    torch.cuda.synchronize()


def prefetch_section(layers: int, dev) -> dict:
    """Can a compute-bound GEMM hide the next memory-bound one's weight reads? Per layer: the folded k/v GEMM over
    640 rows, then q_proj over 64, with and without an L2 prefetch of W_q issued just before the k/v GEMM."""
    import triton
    import triton.language as tl

    @triton.jit
    def l2_prefetch(ptr, CHUNK: tl.constexpr, LANES: tl.constexpr):
        idx = tl.program_id(0) * LANES + tl.arange(0, LANES)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 16384;\n\tmov.u32 $0, 0;", "=r,l",
                                  [ptr + idx.to(tl.int64) * CHUNK], dtype=tl.int32, is_pure=False, pack=1)

    h = 4096
    inp = torch.randn(640, h, device=dev, dtype=torch.bfloat16)
    x = inp[-64:]
    wkv = [torch.randn(2 * h, h, device=dev, dtype=torch.bfloat16) * h**-0.5 for _ in range(layers)]
    wq = [torch.randn(h, h, device=dev, dtype=torch.bfloat16) * h**-0.5 for _ in range(layers)]
    chunks = wq[0].numel() * 2 // 16384

    def prefetch(w):
        l2_prefetch[(chunks // 128,)](w, CHUNK=8192, LANES=128, num_warps=4)

    out = {}
    out["kv_us"] = graph_us([lambda i=i: F.linear(inp, wkv[i]) for i in range(layers)])
    out["q_us"] = graph_us([lambda i=i: F.linear(x, wq[i]) for i in range(layers)])
    out["kv_then_q_us"] = graph_us([lambda i=i: (F.linear(inp, wkv[i]), F.linear(x, wq[i])) for i in range(layers)])
    try:
        out["prefetch_kv_then_q_us"] = graph_us(
            [lambda i=i: (prefetch(wq[i]), F.linear(inp, wkv[i]), F.linear(x, wq[i])) for i in range(layers)])
        out["prefetch_alone_us"] = graph_us([lambda i=i: prefetch(wq[i]) for i in range(layers)])
    except Exception as e:  # noqa: BLE001 (the inline PTX may not assemble: record it)
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print("prefetch:", {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()})
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--sections", default="gemms,attention")
    args = ap.parse_args()
    start = time.time()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows,
               "layers": args.layers, "copy_tb_per_s": round(copy_tbps(), 3), "shapes": {}}
    print(f"copy {results['copy_tb_per_s']} TB/s")
    sections = args.sections.split(",")
    if "attention-ncu" in sections:
        attention_ncu(dev)
        return
    if "attention" in sections:
        results["attention"] = attention_section(args.layers, dev)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if "prefetch" in sections:
        results["prefetch"] = prefetch_section(args.layers, dev)
        Path(args.out).write_text(json.dumps(results, indent=1))
    for name, (n, k, per) in SHAPES.items() if "gemms" in sections else ():
        x = torch.randn(args.rows, k, device=dev, dtype=torch.bfloat16)
        ws = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(per)]
              for _ in range(args.layers)]
        gb = per * n * k * 2 / 1e9
        ref_fn, ours = reference(x, per), candidate(x, per)
        ref = ref_fn(ws[0]).float()
        us = graph_us([lambda w=w, f=ref_fn: f(w) for w in ws])
        row = {"cublas": {"us": round(us, 2), "tb_per_s": round(gb / us * 1e3, 3)}, "triton": []}
        print(f"\n{name}: N={n} K={k} x{per}, {gb * 1e3:.1f} MB per call; cuBLAS {us:.2f} us "
              f"({row['cublas']['tb_per_s']} TB/s)")
        for t in candidates(args.quick):
            if time.time() - start > args.budget_s:
                row["cut_short"] = True
                break
            if per == 2 and t.split_k > 1 or not skinny.supported(x, *ws[0], tiles=t):
                continue
            try:
                err = ((ours(ws[0], t).float() - ref).norm() / ref.norm()).item()
                tus = graph_us([lambda w=w, f=ours, t=t: f(w, t) for w in ws]) if err < 1e-2 else None
            except Exception as e:  # noqa: BLE001 (out of resources, a compile error: record and go on)
                row["triton"].append({"tiles": t._asdict(), "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            entry = {"tiles": t._asdict(), "rel_err": round(err, 5)}
            if tus is not None:
                entry |= {"us": round(tus, 2), "tb_per_s": round(gb / tus * 1e3, 3)}
            row["triton"].append(entry)
        timed = sorted((e for e in row["triton"] if "us" in e), key=lambda e: e["us"])
        row["best"] = timed[0] if timed else None
        for e in timed[:6]:
            print(f"  {e['tiles']} {e['us']:.2f} us {e['tb_per_s']} TB/s err {e['rel_err']}")
        bad = [e for e in row["triton"] if "us" not in e]
        print(f"  ({len(timed)} timed, {len(bad)} failed or wrong)")
        results["shapes"][name] = row
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        del ws
        torch.cuda.empty_cache()
    results["wall_s"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
