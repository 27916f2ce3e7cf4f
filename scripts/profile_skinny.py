"""How fast can the batch-1 text layers' pieces of a 7B prefill go: cuBLAS against Triton kernels, on an H100.

Unusual here: every candidate runs as a CUDA graph of n calls, one per layer's own tensors (n distinct weights, so
none is found in L2), and is timed per call; each candidate is checked against the reference before it is timed.
Sections: "gemms", every tiling of saisa.model.skinny's kernels at the text GEMMs' shapes against cuBLAS (and the
device-to-device copy bandwidth); "attention", q_proj + RoPE + attention, the compiled reference against
saisa.model.text_attention's kernels in several settings ("attention-ncu": a few launches of them, to run under
Nsight Compute; "skinny-ncu": one of each text GEMM kernel, likewise); "residual", o_proj and down_proj as
skinny.linear_residual in every tiling against cuBLAS plus the residual add and norm it replaces; "grouped", q_proj
in the k/v GEMM's launch (torch._grouped_mm); "coresident", the visual GEMMs on a side stream inside the FFN
kernel's SMs; "overlap", the per-layer projector MLPs on a low-priority side stream beside a whole text layer's
GEMMs; "carveout", q_proj on a side stream beside the k/v GEMM, which cuBLASLt is told to leave SMs free for;
"prefetch", whether an L2 prefetch of W_q issued before the k/v GEMM hides q_proj's weight reads; "pdl", whole
skinny text layers with their kernels launched in turn against programmatic dependent launches that prefetch weight
lines before waiting; "partition", the visual path (projector and visual k/v GEMMs) beside a text chain with no
compute-bound GEMM, on plain streams or CUDA green contexts; "hold", W_q or W_o bulk-prefetched to L2 (evict_last)
on a side stream during the k/v GEMM; "tma", skinny's GEMMs with TMA descriptor loads; "w1", the projectors' first
GEMM with its bias and exact GELU as one Triton GEMM ("w1-persistent": also persistent, with and without warp
specialisation); "tunable", torch's TunableOp on the compute-bound GEMMs. Prints tables; JSON to --out (rewritten
after each part). (A "gate-up-stream" section, skinny.gate_up as persistent TMA programs, is in commit 14e868b with
the kernel; its results are skinny-gate-up-stream-h100-t64.json.)

    PYTHONPATH=src python3 scripts/profile_skinny.py --out $OUT/skinny.json --sections gemms --quick
    PYTHONPATH=src python3 scripts/profile_skinny.py --out $OUT/attention.json --sections attention
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from saisa.bench.timing import time_fn
from saisa.model import skinny
from saisa.model import text_attention as text_attention_module
from saisa.model.decoder import apply_rope
from saisa.model.fused import attend, key_value
from saisa.model.graphs import preferred_blas as graphs_preferred_blas
from saisa.model.text_attention import text_attention

SHAPES = {  # name -> (N, K, weights per call); Vicuna-7B: h 4096, FFN 11008
    "q_proj / o_proj": (4096, 4096, 1),
    "gate_proj + up_proj, SiLU * up": (11008, 4096, 2),
    "down_proj": (4096, 11008, 1),
    "k/v folded, text rows": (8192, 4096, 1),
}


def graph_us(calls, reps: int = 30, stream: torch.cuda.Stream | None = None) -> float:
    """Median microseconds per call of `calls` (a list of thunks) replayed as one CUDA graph (captured on
    `stream`: its priority is the graph's)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
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


def on(stream, fn):
    """A thunk: fn's work on `stream`, joined to the current stream before and after."""
    def go():
        cur = torch.cuda.current_stream()
        stream.wait_stream(cur)
        with torch.cuda.stream(stream):
            fn()
        cur.wait_stream(stream)
    return go


@functools.cache
def plain_mm():
    """A plain Triton GEMM C = A B^T (bf16 out; gelu: exact GELU on the way out) with no pipelining tricks: blocks
    of little shared memory, for the co-residency probes."""
    triton, tl = skinny.triton_modules()

    @triton.jit
    def mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GELU: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a = a_ptr + offs_m[:, None] * K + offs_k[None, :]
        b = b_ptr + offs_n[:, None] * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for _ in range(0, K, BLOCK_K):
            acc = tl.dot(tl.load(a, mask=offs_m[:, None] < M, other=0.0), tl.trans(tl.load(b)), acc)
            a += BLOCK_K
            b += BLOCK_K
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16), mask=offs_m[:, None] < M)

    def run(a, b, c, bm=128, bn=128, bk=64, stages=3, warps=8, gelu=False):
        m, k = a.shape
        n = b.shape[0]
        mm_kernel[(triton.cdiv(m, bm), n // bn)](a, b, c, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GELU=gelu,
                                                 num_stages=stages, num_warps=warps)
    return run


def fork_join(main_calls, side_calls, side: torch.cuda.Stream):
    """A thunk: `side_calls` on the side stream (after what the current stream has queued), `main_calls` on the
    current one, which then waits for the side stream."""
    def run():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in side_calls:
                c()
        for c in main_calls:
            c()
        torch.cuda.current_stream().wait_stream(side)
    return run


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
        "half table, block_m 32": {"half_table": True, "block_m": 32},
        "half table, block_m 32, split 2": {"half_table": True, "block_m": 32, "split": 2},
        "half table, block_m 16": {"half_table": True, "block_m": 16},
        "half table, block_m 16, split 1": {"half_table": True, "block_m": 16, "split": 1},
        "half table, block_m 16, block_n 32": {"half_table": True, "block_m": 16, "block_n": 32},
    }
    out = {"checks": [], "us_per_layer": {}}
    for b, t, sv, hq, hkv, d, first in ((1, 64, 576, 32, 32, 128, False), (2, 37, 100, 8, 2, 64, True),
                                        (1, 128, 576, 32, 32, 128, True), (3, 16, 40, 4, 4, 128, False)):
        args = inputs(b, t, sv, hq, hkv, d, first)
        ref = reference(*args).float()
        for name in ("default", "half table", "split 1", "split 10, half table", "half table, block_n 32",
                     "half table, block_m 32", "half table, block_m 16, split 1"):
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


def skinny_ncu(dev, rows: int) -> None:
    """One launch of each of the skinny step's text GEMMs at Vicuna-7B's shapes, as the step runs them (q_proj
    skinny.linear, o_proj and down_proj skinny.linear_residual, gate_up dividing by the rows' RMS), to run under
    Nsight Compute."""
    bf = {"device": dev, "dtype": torch.bfloat16}
    h, f = 4096, 11008
    x, hidden, ln = torch.randn(1, rows, h, **bf), torch.randn(1, rows, h, **bf), torch.ones(h, **bf)
    wq, wo, wg, wu = (torch.randn(n, h, **bf) * h**-0.5 for n in (h, h, f, f))
    wd = torch.randn(h, f, **bf) * f**-0.5
    q = skinny.linear(x, wq, skinny.RESIDUAL)
    out, x_ln, ss = skinny.linear_residual(q, wo, hidden, ln, tiles=skinny.RESIDUAL)
    inner = skinny.gate_up(x_ln, wg, wu, skinny.GATE_UP, ss=ss, eps=1e-5)
    skinny.linear_residual(inner, wd, out, ln, tiles=skinny.RESIDUAL)
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


def text_layers(rows: int, layers: int, dev, sv: int = 576, h: int = 4096, f: int = 11008, hd: int = 128):
    """Random Vicuna-7B-shaped skinny text layers and what fused.skinny_layer_step's first call needs: (layers'
    TextLayers, each layer's (1, sv + rows, h) k/v input rows, RoPE cos and sin, the (1, 1, rows, sv + rows) causal
    bias over [visual; text] keys, the first hidden rows, them times ln1, their sums of squares, zeroed sums)."""
    from saisa.model.fused import TextLayer

    s_all = sv + rows
    mk = lambda *shape: torch.randn(*shape, device=dev, dtype=torch.bfloat16) * shape[-1] ** -0.5
    ln = lambda: 1 + 0.1 * torch.randn(h, device=dev, dtype=torch.bfloat16)
    ws = [TextLayer(ln1=ln(), wq=mk(h, h), bq=None, wkv=mk(2 * h, h), bkv=None, wo=mk(h, h), ln2=ln(),
                    wg=mk(f, h), wu=mk(f, h), wd=mk(h, f)) for _ in range(layers)]
    inputs = [torch.randn(1, s_all, h, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    cos, sin = rope_tables(1, s_all, hd, dev)
    bias = torch.zeros(1, 1, rows, s_all, device=dev, dtype=torch.bfloat16)
    bias[..., sv:] = torch.triu(torch.full((rows, rows), float("-inf"), device=dev), 1).to(torch.bfloat16)
    hidden0 = torch.randn(1, rows, h, device=dev, dtype=torch.bfloat16)
    return (ws, inputs, cos, sin, bias, hidden0, hidden0 * ws[0].ln1, hidden0.float().pow(2).sum(-1).flatten(),
            torch.zeros(layers, 2, rows, device=dev))


def pdl_section(rows: int, layers: int, dev, sv: int = 576, rounds: int = 5, tiles: bool = False) -> dict:
    """n text layers of fused.skinny_layer_step in one graph: kernels launched in turn, against programmatic
    dependent launches (pdl) with 0 to 32 lines of each weight row prefetched to L2 before the wait (tiles: with 4
    lines, other tilings of the GEMMs instead); checked against the serial chain's output, timed in interleaved
    rounds (median of the rounds' medians, us per layer)."""
    from saisa.model.fused import skinny_layer_step

    hd, eps = 128, 1e-5
    ws, inputs, cos, sin, bias, hidden0, x0, ss0, sums = text_layers(rows, layers, dev, sv)
    result: list[torch.Tensor] = []

    def chain(pdl: bool, prefetch: int):
        def run():
            sums.zero_()
            hidden, x_ln, ss = hidden0, x0, ss0
            for i, w in enumerate(ws):
                last = i + 1 == layers
                hidden, x_ln, ss = skinny_layer_step(
                    hidden, x_ln, ss, sums[i], inputs[i], None if last else inputs[i + 1][:, -rows:], bias, cos,
                    sin, w, None if last else ws[i + 1].ln1, eps, hd, True, pdl=pdl, prefetch=prefetch)
            result[:] = [hidden]
        return run

    # name -> (pdl, prefetch, (q/o/down_proj tiles, gate_up tiles) or None for skinny.RESIDUAL and GATE_UP)
    settings = {"serial": (False, 0, None), **{f"pdl, prefetch {p}": (True, p, None) for p in (0, 4, 8, 16, 32)}}
    if tiles:
        T = skinny.Tiles
        settings = {"serial": (False, 0, None), "pdl, prefetch 4": (True, 4, None)}
        for res, gu in ((T(16, 128, 4, 4), None), (T(16, 128, 6, 4), None), (T(64, 128, 3, 4), None),
                        (T(32, 128, 4, 4), None), (T(32, 256, 3, 4), None), (None, T(16, 128, 6, 4)),
                        (None, T(32, 128, 4, 4)), (None, T(32, 64, 8, 4)), (None, T(64, 128, 3, 8))):
            name = f"pdl, prefetch 4, {'residual ' + str(tuple(res)[:4]) if res else ''}" \
                   f"{'gate_up ' + str(tuple(gu)[:4]) if gu else ''}"
            settings[name] = (True, 4, (res, gu))
    out: dict = {"checks": {}, "us_per_layer": {}}
    default_tiles = (skinny.RESIDUAL, skinny.GATE_UP)
    chain(False, 0)()
    ref = result[0].float().clone()
    graphs = {}
    for name, (pdl, p, tried) in settings.items():
        skinny.RESIDUAL = (tried or (None, None))[0] or default_tiles[0]  # read by skinny_layer_step at capture
        skinny.GATE_UP = (tried or (None, None))[1] or default_tiles[1]
        try:
            run = chain(pdl, p)
            run()
            out["checks"][name] = round(((result[0].float() - ref).norm() / ref.norm()).item(), 6)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            g.replay()
            torch.cuda.synchronize()
            out["checks"][name + " (graph)"] = round(((result[0].float() - ref).norm() / ref.norm()).item(), 6)
            graphs[name] = g
        except Exception as e:  # noqa: BLE001 (a compile or launch error: record it, time the rest)
            out["checks"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    skinny.RESIDUAL, skinny.GATE_UP = default_tiles
    medians: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            replay = lambda i, g=g: g.replay()
            medians[name].append(time_fn(replay, dev, warmup=1, repeats=20).median_ms * 1000 / layers)
    out["us_per_layer"] = {name: round(statistics.median(m), 2) for name, m in medians.items()}
    out["round_us"] = {name: [round(x, 2) for x in m] for name, m in medians.items()}
    print("pdl:", out["checks"], out["us_per_layer"])
    return out


def residual_section(rows: int, layers: int, budget_s: float, quick: bool, dev) -> dict:
    """o_proj and down_proj as skinny.linear_residual (residual add, the next norm's weight, sums of squares in the
    epilogue) in each tiling, against what it replaces in the compiled step: cuBLAS's GEMM, then the residual add
    and the next RMSNorm (one inductor kernel)."""
    start = time.time()
    norm = torch.compile(lambda r, y, ln: _rms_norm(r + y, ln), dynamic=False)
    return {name: _residual_shape(name, n, k, rows, layers, norm, lambda: time.time() - start > budget_s, quick, dev)
            for name, (n, k) in {"o_proj": (4096, 4096), "down_proj": (4096, 11008)}.items()}


def _residual_shape(name, n, k, rows, layers, norm, over, quick, dev) -> dict:
    x = torch.randn(1, rows, k, device=dev, dtype=torch.bfloat16)
    res = torch.randn(1, rows, n, device=dev, dtype=torch.bfloat16)
    ln = torch.rand(n, device=dev, dtype=torch.bfloat16) + 0.5
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(layers)]
    sums = torch.zeros(rows, device=dev)
    ref = res + F.linear(x, ws[0])
    gemm = graph_us([lambda w=w: F.linear(x, w) for w in ws])
    with_norm = graph_us([lambda w=w: norm(res, F.linear(x, w), ln) for w in ws])
    row = {"cublas_us": round(gemm, 2), "cublas_add_norm_us": round(with_norm, 2), "triton": []}
    print(f"\n{name} + residual + norm: cuBLAS {gemm:.2f} us, with the add and norm {with_norm:.2f} us")
    for t in candidates(quick):
        if over():
            row["cut_short"] = True
            break
        if t.split_k > 1 or not skinny.supported(x, ws[0], tiles=t):
            continue
        try:
            got = skinny.linear_residual(x, ws[0], res, ln, tiles=t)[0]
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            us = graph_us([lambda w=w, t=t: skinny.linear_residual(x, w, res, ln, sums=sums, tiles=t)
                           for w in ws]) if err < 1e-2 else None
        except Exception as e:  # noqa: BLE001 (out of resources: record and go on)
            row["triton"].append({"tiles": t._asdict(), "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        row["triton"].append({"tiles": t._asdict(), "rel_err": round(err, 5)} | ({} if us is None else
                                                                                 {"us": round(us, 2)}))
    timed = sorted((e for e in row["triton"] if "us" in e), key=lambda e: e["us"])
    row["best"] = timed[0] if timed else None
    for e in timed[:5]:
        print(f"  {e['tiles']} {e['us']:.2f} us")
    return row


def grouped_section(rows: int, layers: int, dev, sv: int = 576) -> dict:
    """q_proj in the k/v GEMM's launch: torch._grouped_mm over row groups [visual + text] x W_k, the same rows
    x W_v, text x W_q (the visual rows given twice), against cuBLAS's k/v GEMM over the visual and text rows and
    the q GEMM after it (the compiled step's two launches). The k/v GEMM is compute-bound (640 rows) and q_proj
    memory-bound, so in one grouped launch the q tiles' weight reads could hide under the k/v tiles' math."""
    h = 4096
    s = sv + rows
    x = torch.randn(s, h, device=dev, dtype=torch.bfloat16)
    xq = torch.randn(rows, h, device=dev, dtype=torch.bfloat16)
    stacked = [torch.randn(3, h, h, device=dev, dtype=torch.bfloat16) * h**-0.5 for _ in range(layers)]  # k, v, q
    kv_w = [w[:2].reshape(2 * h, h) for w in stacked]
    a = torch.cat([x, x, xq])
    offs = torch.tensor([s, 2 * s, 2 * s + rows], device=dev, dtype=torch.int32)
    pair = torch.cat([x, x])
    offs2 = torch.tensor([s, 2 * s], device=dev, dtype=torch.int32)
    out = {}
    ref = torch.cat([F.linear(x, stacked[0][0]), F.linear(x, stacked[0][1]), F.linear(xq, stacked[0][2])])
    got = torch._grouped_mm(a, stacked[0].transpose(1, 2), offs=offs)
    out["rel_err"] = round(((got.float() - ref.float()).norm() / ref.float().norm()).item(), 5)
    out["cublas_kv_us"] = round(graph_us([lambda w=w: F.linear(x, w) for w in kv_w]), 2)
    out["cublas_kv_then_q_us"] = round(graph_us(
        [c for w, wkv in zip(stacked, kv_w) for c in (lambda w=wkv: F.linear(x, w), lambda w=w: F.linear(xq, w[2]))]
    ) * 2, 2)
    out["grouped_kv_us"] = round(graph_us([lambda w=w: torch._grouped_mm(pair, w[:2].transpose(1, 2), offs=offs2)
                                           for w in stacked]), 2)
    out["grouped_kv_q_us"] = round(graph_us([lambda w=w: torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
                                             for w in stacked]), 2)
    out["kernels_grouped_kv_q"] = kernel_us([lambda w=w: torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
                                             for w in stacked[:4]])
    print(f"grouped: {out}")
    return out


def coresident_section(rows: int, layers: int, dev, sv: int = 576) -> dict:
    """Can the compute-bound visual GEMMs run INSIDE the memory-bound text kernels' SMs? The FFN's gate_up kernel
    (tiles with little shared memory, so a GEMM block fits beside it on an SM) on the main stream, a Triton GEMM
    of the visual rows' shape (576 x 4096 x 4096) on a side stream, each alone and both in one CUDA graph (fork and
    join); cuBLAS's GEMM in the same place for comparison. Both at once in near max(alone) time means each SM
    shares its issue slots and tensor cores between the two; near their sum, that the blocks do not co-reside."""
    h, inner = 4096, 11008
    x = torch.randn(rows, h, device=dev, dtype=torch.bfloat16)
    ffn = [[torch.randn(inner, h, device=dev, dtype=torch.bfloat16) * h**-0.5 for _ in range(2)]
           for _ in range(layers)]
    vis = torch.randn(sv, h, device=dev, dtype=torch.bfloat16)
    vw = [torch.randn(h, h, device=dev, dtype=torch.bfloat16) * h**-0.5 for _ in range(layers)]
    vout = torch.empty(sv, h, device=dev, dtype=torch.bfloat16)
    out = {"copy_tb_per_s": round(copy_tbps(), 3)}

    def triton_mm(w):
        plain_mm()(vis, w, vout)

    ref = F.linear(vis, vw[0])
    triton_mm(vw[0])
    out["triton_mm_rel_err"] = round(((vout.float() - ref.float()).norm() / ref.float().norm()).item(), 5)
    side = torch.cuda.Stream(dev)

    def both(text_calls, vis_calls):
        return [fork_join(text_calls, vis_calls, side)]

    for name, tiles in {"gate_up 6 stages (192 KB)": skinny.GATE_UP,
                        "gate_up 3 stages (73 KB)": skinny.Tiles(32, 128, 3, 4),
                        "gate_up 2 stages (49 KB)": skinny.Tiles(32, 128, 2, 4)}.items():
        text = [lambda w=w, t=tiles: skinny.gate_up(x, w[0], w[1], t) for w in ffn]
        row = {"text_us": round(graph_us(text) * layers, 1)}
        for vname, vcall in {"triton_mm": triton_mm, "cublas": lambda w: F.linear(vis, w)}.items():
            visual = [lambda w=w, f=vcall: f(w) for w in vw]
            alone = graph_us(visual) * layers
            together = graph_us(both(text, visual), reps=20)
            row[vname] = {"visual_us": round(alone, 1), "both_us": round(together, 1),
                          "hidden_fraction": round((row["text_us"] + alone - together) / min(row["text_us"], alone),
                                                   3)}
        out[name] = row
        print(name, row)
    return out


def overlap_section(rows: int, layers: int, dev, sv: int = 576, d: int = 1024) -> dict:
    """Could SAISA's per-layer projector MLPs (compute-bound) run beside the text layers' kernels (memory-bound)?
    Main stream (high priority): each layer's k/v GEMM over its visual + text rows, q_proj, o_proj, the FFN (gate_up
    in the given tiles, cuBLAS down_proj). Side stream (low priority): each layer's projector, Z W1^T, GELU, then
    W2, as cuBLAS's GEMMs or a plain Triton GEMM in small tiles (short-lived blocks with little shared memory, which
    can slot in beside the text kernels' blocks). Each alone and both in one graph (fork and join, no other
    dependency: an upper bound for a schedule whose projector runs ahead of the layers); saved_us = main + side -
    both. Whether a side-stream schedule can beat the serial one at t=64 (profile-prefill: "overlap" was 0.28 ms
    slower with cuBLAS's GEMMs)."""
    h, inner = 4096, 11008
    bf = {"device": dev, "dtype": torch.bfloat16}
    x = torch.randn(rows, h, **bf)
    kv_in = torch.randn(sv + rows, h, **bf)
    z = torch.randn(sv, d, **bf)
    text = [{"wq": torch.randn(h, h, **bf) * h**-0.5, "wkv": torch.randn(2 * h, h, **bf) * h**-0.5,
             "wo": torch.randn(h, h, **bf) * h**-0.5, "wg": torch.randn(inner, h, **bf) * h**-0.5,
             "wu": torch.randn(inner, h, **bf) * h**-0.5, "wd": torch.randn(h, inner, **bf) * inner**-0.5}
            for _ in range(layers)]
    proj = [(torch.randn(h, d, **bf) * d**-0.5, torch.randn(h, h, **bf) * h**-0.5) for _ in range(layers)]
    hid = torch.empty(sv, h, **bf)
    pout = torch.empty(sv, h, **bf)
    out = {"copy_tb_per_s": round(copy_tbps(), 3)}

    def text_layer(w, tiles):
        F.linear(kv_in, w.wkv)
        F.linear(x, w.wq)
        F.linear(x, w.wo)
        F.linear(skinny.gate_up(x, w.wg, w.wu, tiles), w.wd)

    def cublas_proj(w):
        torch.mm(F.gelu(F.linear(z, w[0])), w[1].t(), out=pout)

    def triton_proj(w, *tiles):
        plain_mm()(z, w[0], hid, *tiles, gelu=True)
        plain_mm()(hid, w[1], pout, *tiles)

    ref = F.linear(F.gelu(F.linear(z, proj[0][0])), proj[0][1])
    sides = {"cublas": cublas_proj}
    for bm, bn, bk, stages, warps in ((128, 128, 64, 3, 8), (64, 128, 64, 3, 4), (128, 64, 64, 3, 4),
                                      (64, 64, 64, 4, 4)):
        name = f"triton {bm}x{bn}x{bk} s{stages} w{warps}"
        fn = lambda w, a=(bm, bn, bk, stages, warps): triton_proj(w, *a)
        fn(proj[0])
        out[f"{name} rel_err"] = round(((pout.float() - ref.float()).norm() / ref.float().norm()).item(), 5)
        sides[name] = fn
    high = torch.cuda.Stream(dev, priority=-5)  # clamped to the device's highest
    low = torch.cuda.Stream(dev, priority=0)

    def timed(calls_main, calls_side):
        return round(graph_us([fork_join(calls_main, calls_side, low)], reps=20, stream=high), 1)

    for tname, tiles in {"gate_up 6 stages": skinny.GATE_UP, "gate_up 3 stages": skinny.Tiles(32, 128, 3, 4)}.items():
        main = [lambda w=w, t=tiles: text_layer(w, t) for w in text]
        row = {"main_us": timed(main, [])}
        for sname, fn in sides.items():
            side = [lambda w=w, f=fn: f(w) for w in proj]
            alone = timed([], side)
            both = timed(main, side)
            row[sname] = {"side_us": alone, "both_us": both, "saved_us": round(row["main_us"] + alone - both, 1),
                          "vs_serial_cublas_us": None}
        serial = row["main_us"] + row["cublas"]["side_us"]
        for sname in sides:
            row[sname]["vs_serial_cublas_us"] = round(row[sname]["both_us"] - serial, 1)
        out[tname] = row
        print(tname, json.dumps(row))
    return out


def carveout_section(rows: int, layers: int, dev, sv: int = 576) -> dict:
    """Can q_proj (memory-bound) run beside the k/v GEMM over the visual + text rows (compute-bound), which at
    t=64 is 128 blocks on an H100's 132 SMs? Per layer, q_proj on a side stream forked and joined around the k/v
    GEMM, with cuBLASLt told to leave `carveout` SMs to other work (torch._C._set_sm_carveout_experimental, read
    when the GEMM is launched, so set around the k/v GEMM's capture only); q_proj as cuBLASLt's GEMM or skinny.linear.
    Each figure: us per layer of one CUDA graph over all layers (distinct weights)."""
    h = 4096
    bf = {"device": dev, "dtype": torch.bfloat16}
    x = torch.randn(rows, h, **bf)
    kv_in = torch.randn(sv + rows, h, **bf)
    wq = [torch.randn(h, h, **bf) * h**-0.5 for _ in range(layers)]
    wkv = [torch.randn(2 * h, h, **bf) * h**-0.5 for _ in range(layers)]
    side = torch.cuda.Stream(dev)
    out = {"copy_tb_per_s": round(copy_tbps(), 3)}

    def kv_gemm(i, carve):
        if carve:
            torch._C._set_sm_carveout_experimental(carve)
        try:
            return F.linear(kv_in, wkv[i])
        finally:
            if carve:
                torch._C._set_sm_carveout_experimental(None)

    def q_gemm(i, how):
        return skinny.linear(x, wq[i], skinny.Tiles(32, 128, 6, 4)) if how == "triton" else F.linear(x, wq[i])

    def layer(i, carve, how, parallel):
        if not parallel:
            kv_gemm(i, carve)
            q_gemm(i, how)
            return
        fork_join([lambda: kv_gemm(i, carve)], [lambda: q_gemm(i, how)], side)()

    with graphs_preferred_blas("cublaslt"):
        out["kv alone"] = round(graph_us([lambda i=i: kv_gemm(i, 0) for i in range(layers)]), 2)
        out["q alone (cublaslt)"] = round(graph_us([lambda i=i: q_gemm(i, "cublas") for i in range(layers)]), 2)
        out["q alone (triton)"] = round(graph_us([lambda i=i: q_gemm(i, "triton") for i in range(layers)]), 2)
        out["serial"] = round(graph_us([lambda i=i: layer(i, 0, "cublas", False) for i in range(layers)]), 2)
        for carve in (0, 4, 8, 12, 16, 24, 32):
            out[f"kv alone, carveout {carve}"] = round(graph_us([lambda i=i, c=carve: kv_gemm(i, c)
                                                                 for i in range(layers)]), 2)
            for how in ("cublas", "triton"):
                try:
                    out[f"parallel, carveout {carve}, q {how}"] = round(graph_us(
                        [lambda i=i, c=carve, w=how: layer(i, c, w, True) for i in range(layers)]), 2)
                except Exception as e:  # noqa: BLE001 (record and go on)
                    out[f"parallel, carveout {carve}, q {how}"] = f"{type(e).__name__}: {str(e)[:120]}"
            print({k: v for k, v in out.items() if f"carveout {carve}" in k}, flush=True)
    print(out)
    return out


def partition_section(rows: int, layers: int, dev, sv: int = 576, d: int = 1024) -> dict:
    """Can the visual path (compute-bound) run beside the text layers (memory-bound) if neither shares a GEMM?
    Text chain (pdl): q_proj, the text rows' k/v (skinny.linear into the layer's k/v buffer after its visual
    rows), text_attention, o_proj, gate_up, down_proj. Visual chain: each layer's projector MLP (Z W1^T, GELU,
    W2) and its visual rows' k/v GEMM (cuBLAS) into the same buffer; text layer i's attention waits for visual
    layer i. Each chain alone (on all SMs, or on a CUDA green context of n SMs), and both at once on two streams
    (plain streams with priorities, or one side on a green context). us per layer of one CUDA graph."""
    from torch.cuda.green_contexts import GreenContext

    h, hd, eps = 4096, 128, 1e-5
    bf = {"device": dev, "dtype": torch.bfloat16}
    text, _, cos, sin, bias, hidden0, x0, ss0, sums = text_layers(rows, layers, dev, sv)
    vis = [(torch.randn(h, d, **bf) * d**-0.5, torch.randn(h, h, **bf) * h**-0.5) for _ in range(layers)]
    z = torch.randn(sv, d, **bf)
    xv = torch.empty(sv, h, **bf)
    kvbuf = torch.randn(layers, 1, sv + rows, 2 * h, **bf)  # each layer's k/v: visual rows, then text rows
    residual, gate_up_tiles = (t._replace(prefetch=skinny.PREFETCH) for t in (skinny.RESIDUAL, skinny.GATE_UP))
    events = [torch.cuda.Event() for _ in range(layers)]

    def visual_layer(i):
        torch.mm(F.gelu(F.linear(z, vis[i][0]), approximate="none"), vis[i][1].t(), out=xv)
        torch.mm(xv, text[i].wkv.t(), out=kvbuf[i, 0, :sv])

    def text_chain(wait):
        sums.zero_()
        hidden, x_ln, ss = hidden0, x0, ss0
        for i, w in enumerate(text):
            q = skinny.linear(x_ln, w.wq, residual, pdl=True)
            skinny.linear(hidden, w.wkv, residual, pdl=True, out=kvbuf[i, 0, sv:])
            if wait:
                torch.cuda.current_stream().wait_event(events[i])
            attn = text_attention(q, kvbuf[i], cos, sin, bias, hd, half_table=True, row_sums=ss, row_dim=h, eps=eps,
                                  pdl=True)
            hidden, x_ln, ss = skinny.linear_residual(attn, w.wo, hidden, w.ln2, sums=sums[i, 0], tiles=residual,
                                                      pdl=True)
            inner = skinny.gate_up(x_ln, w.wg, w.wu, gate_up_tiles, ss=ss, eps=eps, pdl=True)
            nxt = text[i + 1].ln1 if i + 1 < layers else None
            hidden, x_ln, ss = skinny.linear_residual(inner, w.wd, hidden, nxt, sums=sums[i, 1], tiles=residual,
                                                      pdl=True)

    def visual_chain(record):
        for i in range(layers):
            visual_layer(i)
            if record:
                events[i].record()

    contexts = []

    def green(n):
        ctx = GreenContext.create(num_sms=n, device_id=dev.index or 0)
        contexts.append(ctx)
        return ctx.Stream()

    high = torch.cuda.Stream(dev, priority=-5)
    low = torch.cuda.Stream(dev, priority=0)

    def both(text_stream, vis_stream):
        def run():
            cur = torch.cuda.current_stream()
            for s in (text_stream, vis_stream):
                s.wait_stream(cur)
            with torch.cuda.stream(vis_stream):
                visual_chain(True)
            with torch.cuda.stream(text_stream):
                text_chain(True)
            cur.wait_stream(text_stream)
            cur.wait_stream(vis_stream)
        return run

    out = {"copy_tb_per_s": round(copy_tbps(), 3), "sms": torch.cuda.get_device_properties(dev).multi_processor_count,
           "us_per_layer": {}, "errors": {}}
    runs = {"text alone": on(high, lambda: text_chain(False)),
            "visual alone": on(low, lambda: visual_chain(False)),
            "serial (visual, then text)": lambda: (visual_chain(False), text_chain(False)),
            "both, plain streams (text high priority)": both(high, low)}
    for n in (44, 66, 88):
        g = green(n)
        runs[f"text alone, green {n}"] = on(g, lambda: text_chain(False))
        runs[f"visual alone, green {n}"] = on(g, lambda: visual_chain(False))
        runs[f"both, visual green {n}, text all SMs"] = both(high, g)
        runs[f"both, text green {n}, visual all SMs"] = both(g, low)
    for name, run in runs.items():
        try:
            out["us_per_layer"][name] = round(graph_us([run], reps=20) / layers, 1)
        except Exception as e:  # noqa: BLE001 (a setting that cannot be captured: record it, time the rest)
            out["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.synchronize()
        print(name, out["us_per_layer"].get(name), out["errors"].get(name, ""), flush=True)
    return out


@functools.cache
def l2_hold_kernels():
    """Two Triton kernels over a weight's 16 KB chunks: `hold` sends them to L2 by bulk prefetches (evict_last: with
    an L2 cache policy that keeps them ahead of ordinary lines; else no hint), from few programs, so it can run on
    the SMs a GEMM leaves free; `release` sets their lines back to the normal eviction priority."""
    triton, tl = skinny.triton_modules()

    @triton.jit
    def hold(ptr, chunks, LANES: tl.constexpr, LAST: tl.constexpr):
        for start in range(tl.program_id(0) * LANES, chunks, tl.num_programs(0) * LANES):
            idx = start + tl.arange(0, LANES)
            p = ptr + tl.where(idx < chunks, idx, 0).to(tl.int64) * 8192
            if LAST:
                tl.inline_asm_elementwise(
                    "{\n\t.reg .b64 pol;\n\tcreatepolicy.fractional.L2::evict_last.b64 pol, 1.0;\n\t"
                    "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], 16384, pol;\n\t}\n\tmov.u32 $0, 0;",
                    "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 16384;\n\tmov.u32 $0, 0;",
                                          "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def release(ptr, lines, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        p = ptr + tl.where(idx < lines, idx, 0).to(tl.int64) * 64
        tl.inline_asm_elementwise("applypriority.global.L2::evict_normal [$1], 128;\n\tmov.u32 $0, 0;", "=r,l",
                                  [p], dtype=tl.int32, is_pure=False, pack=1)

    def run_hold(w, last, programs=4):
        hold[(programs,)](w, w.numel() * 2 // 16384, LANES=128, LAST=last, num_warps=4)

    def run_release(w):
        lines = w.numel() * 2 // 128
        release[(triton.cdiv(lines, 1024),)](w, lines, BLOCK=1024, num_warps=4)
    return run_hold, run_release


def hold_section(rows: int, layers: int, dev, sv: int = 576, rounds: int = 5) -> dict:
    """Can the k/v GEMM (compute-bound, ~56 us, leaving HBM half idle) bring the next memory-bound GEMM's weights
    into L2? Whole skinny text layers (pdl) in one graph, the k/v GEMM before or after q_proj; on a side stream, forked
    just before the k/v GEMM, a 4-program kernel bulk-prefetches W_q (or W_o) to L2, without a hint or with an
    evict_last policy (so the k/v GEMM's own traffic does not evict it), optionally followed by a kernel that sets
    those lines back to normal priority once the GEMM that reads them is done. us per layer, interleaved rounds;
    each variant checked against the first."""
    hold, release = l2_hold_kernels()
    h, hd, eps = 4096, 128, 1e-5
    ws, inputs, cos, sin, bias, hidden0, x0, ss0, sums = text_layers(rows, layers, dev, sv)
    residual, gate_up_tiles = (t._replace(prefetch=skinny.PREFETCH) for t in (skinny.RESIDUAL, skinny.GATE_UP))
    side = torch.cuda.Stream(dev)
    result: list[torch.Tensor] = []

    def chain(kv_first: bool, target: str | None, last: bool, reset: bool, programs: int = 4):
        def run():
            cur = torch.cuda.current_stream()
            sums.zero_()
            hidden, x_ln, ss = hidden0, x0, ss0
            for i, w in enumerate(ws):
                held = {"q": w.wq, "o": w.wo, None: None}[target]
                if not kv_first:
                    q = skinny.linear(x_ln, w.wq, residual, pdl=True)
                if held is not None:
                    side.wait_stream(cur)
                    with torch.cuda.stream(side):
                        hold(held, last, programs)
                kv = F.linear(inputs[i], w.wkv)
                if kv_first:
                    q = skinny.linear(x_ln, w.wq, residual, pdl=True)
                    if reset and target == "q":
                        release(w.wq)
                attn = text_attention(q, kv, cos, sin, bias, hd, half_table=True, row_sums=ss, row_dim=h, eps=eps,
                                      pdl=True)
                hidden, x_ln, ss = skinny.linear_residual(attn, w.wo, hidden, w.ln2, sums=sums[i, 0], tiles=residual,
                                                          pdl=True)
                if reset and target == "o":
                    release(w.wo)
                inner = skinny.gate_up(x_ln, w.wg, w.wu, gate_up_tiles, ss=ss, eps=eps, pdl=True)
                nxt = ws[i + 1].ln1 if i + 1 < layers else None
                hidden, x_ln, ss = skinny.linear_residual(inner, w.wd, hidden, nxt, sums=sums[i, 1], tiles=residual,
                                                          pdl=True)
            if target is not None:
                cur.wait_stream(side)
            result[:] = [hidden]
        return run

    settings = {  # name -> (k/v GEMM first, weight held, evict_last, release after use[, programs])
        "q first (default)": (False, None, False, False),
        "kv first": (True, None, False, False),
        "kv first, W_q prefetched": (True, "q", False, False),
        "kv first, W_q held (evict_last)": (True, "q", True, False),
        "kv first, W_q held, released": (True, "q", True, True),
        "kv first, W_q held, 16 programs": (True, "q", True, False, 16),
        "kv first, W_q held, 64 programs": (True, "q", True, False, 64),
        "kv first, W_q prefetched, 64 programs": (True, "q", False, False, 64),
        "q first, W_o held, 64 programs": (False, "o", True, False, 64),
        "q first, W_o held (evict_last)": (False, "o", True, False),
        "q first, W_o held, released": (False, "o", True, True),
    }
    out: dict = {"copy_tb_per_s": round(copy_tbps(), 3), "checks": {}, "us_per_layer": {}}
    graphs = {}
    ref = None
    for name, args in settings.items():
        try:
            run = chain(*args)
            run()
            torch.cuda.synchronize()
            if ref is None:
                ref = result[0].float().clone()
            out["checks"][name] = round(((result[0].float() - ref).norm() / ref.norm()).item(), 6)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            g.replay()
            torch.cuda.synchronize()
            graphs[name] = g
        except Exception as e:  # noqa: BLE001 (a compile or launch error: record it, time the rest)
            out["checks"][name] = f"{type(e).__name__}: {str(e)[:300]}"
    medians: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            medians[name].append(time_fn(lambda i, g=g: g.replay(), dev, warmup=1, repeats=20).median_ms * 1000 / layers)
    out["us_per_layer"] = {name: round(statistics.median(m), 2) for name, m in medians.items()}
    out["round_us"] = {name: [round(x, 2) for x in m] for name, m in medians.items()}
    for name in settings:
        print(f"{name}: {out['us_per_layer'].get(name)} us/layer, check {out['checks'][name]}", flush=True)
    return out


@functools.cache
def tma_kernels():
    """skinny's gate_up and linear with their loads as TMA tensor-descriptor copies instead of pointer loads."""
    triton, tl = skinny.triton_modules()

    @triton.jit
    def tma_gate_up(x_desc, wg_desc, wu_desc, y_ptr, M, K, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        off_n = tl.program_id(0) * BLOCK_N
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            x = x_desc.load([0, k])
            gate = tl.dot(x, wg_desc.load([off_n, k]).T, gate)
            up = tl.dot(x, wu_desc.load([off_n, k]).T, up)
        dtype = y_ptr.dtype.element_ty
        g = gate.to(dtype).to(tl.float32)
        h = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], h.to(dtype), mask=offs_m[:, None] < M)

    @triton.jit
    def tma_linear(x_desc, w_desc, y_ptr, M, K, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        off_n = tl.program_id(0) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            acc = tl.dot(x_desc.load([0, k]), w_desc.load([off_n, k]).T, acc)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=offs_m[:, None] < M)

    from triton.tools.tensor_descriptor import TensorDescriptor

    def run(x, ws, y, bn, bk, stages, warps):
        m, k = x.shape
        xd = TensorDescriptor(x, [m, k], [k, 1], [64, bk])
        wds = [TensorDescriptor.from_tensor(w, [bn, bk]) for w in ws]
        kernel = tma_gate_up if len(ws) == 2 else tma_linear
        kernel[(ws[0].shape[0] // bn,)](xd, *wds, y, m, k, y.stride(0), BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk,
                                        STAGES=stages, num_warps=warps)
    return run


def tma_section(rows: int, layers: int, dev) -> dict:
    """skinny's kernels against the same GEMMs with TMA loads, at the text GEMMs' shapes (us per call over `layers`
    distinct weights, TB/s of weight read), each checked against cuBLAS."""
    run = tma_kernels()
    out = {"copy_tb_per_s": round(copy_tbps(), 3)}
    for name, (n, k, per) in SHAPES.items():
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        ws = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(per)]
              for _ in range(layers)]
        gb = per * n * k * 2 / 1e9
        ref = reference(x, per)(ws[0]).float()
        tiles = skinny.GATE_UP if per == 2 else skinny.RESIDUAL
        ours = candidate(x, per)
        us = graph_us([lambda w=w, t=tiles, f=ours: f(w, t) for w in ws])
        row = {"skinny": {"us": round(us, 2), "tb_per_s": round(gb / us * 1e3, 3)}, "tma": []}
        y = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)
        for bn, bk, stages, warps in itertools.product((16, 32, 64), (64, 128, 256), (3, 4, 6, 8), (4,)):
            if (64 + per * bn) * bk * 2 * stages > 220_000:
                continue
            try:
                run(x, ws[0], y, bn, bk, stages, warps)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                tus = graph_us([lambda w=w, a=(x, y, bn, bk, stages, warps): run(a[0], w, *a[1:]) for w in ws])
                row["tma"].append({"tiles": [bn, bk, stages, warps], "rel_err": round(err, 5), "us": round(tus, 2),
                                   "tb_per_s": round(gb / tus * 1e3, 3)})
            except Exception as e:  # noqa: BLE001 (out of resources, a compile error: record and go on)
                row["tma"].append({"tiles": [bn, bk, stages, warps], "error": f"{type(e).__name__}: {str(e)[:160]}"})
        best = sorted((e for e in row["tma"] if "us" in e), key=lambda e: e["us"])
        row["best"] = best[:5]
        print(name, row["skinny"], best[:3], flush=True)
        out[name] = row
        del ws
        torch.cuda.empty_cache()
    return out


@functools.cache
def gelu_gemm():
    """GELU(x W^T + b) in its exact (erf) form as one Triton GEMM with TMA loads, rounded as the reference rounds
    (the product to bf16, the bias add to bf16, GELU in fp32 to bf16): the projector's first GEMM and the GELU pass
    after it in one kernel. `run(..., persistent=P)`: P programs, each looping over output tiles (the m tiles of one
    n tile in a row, so W's tile is read from HBM once), with Triton's warp specialisation of that loop (ws: a
    producer warp issues the TMA loads while the others multiply and write the epilogue) or without."""
    triton, tl = skinny.triton_modules()
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def epilogue(acc, bias_ptr, c_desc, off_m, off_n, BLOCK_N: tl.constexpr):
        dtype = c_desc.dtype
        bias = tl.load(bias_ptr + off_n + tl.arange(0, BLOCK_N)).to(tl.float32)
        x = (acc.to(dtype).to(tl.float32) + bias[None, :]).to(dtype).to(tl.float32)
        c_desc.store([off_m, off_n], (0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))).to(dtype))

    @triton.jit
    def kernel(a_desc, b_desc, bias_ptr, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, STAGES: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = N // BLOCK_N
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([off_n, k]).T, acc)
        epilogue(acc, bias_ptr, c_desc, off_m, off_n, BLOCK_N)

    @triton.jit
    def persistent_kernel(a_desc, b_desc, bias_ptr, c_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, PROGRAMS: tl.constexpr, WS: tl.constexpr):
        num_m = tl.cdiv(M, BLOCK_M)
        for tile in tl.range(tl.program_id(0), num_m * (N // BLOCK_N), PROGRAMS, flatten=False, warp_specialize=WS):
            off_m, off_n = (tile % num_m) * BLOCK_M, (tile // num_m) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([off_n, k]).T, acc)
            epilogue(acc, bias_ptr, c_desc, off_m, off_n, BLOCK_N)

    descs = {}

    def run(a, w, b, out, bm, bn, bk, stages, warps, group=8, persistent=0, ws=False):
        m, k = a.shape
        n = w.shape[0]
        key = (a.data_ptr(), w.data_ptr(), out.data_ptr(), bm, bn, bk)
        if key not in descs:  # made once per tensor and tiling: host work outside the timed graphs
            descs[key] = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                          TensorDescriptor.from_tensor(out, [bm, bn]))
        ad, wd, cd = descs[key]
        if persistent:
            persistent_kernel[(persistent,)](ad, wd, b, cd, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                             PROGRAMS=persistent, WS=ws, num_stages=stages, num_warps=warps)
            return
        grid = (triton.cdiv(m, bm) * (n // bn),)
        kernel[grid](ad, wd, b, cd, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, GROUP_M=group,
                     num_warps=warps)
    return run


W1_TILINGS = ((128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 64, 5, 4),
              (64, 256, 64, 4, 4), (256, 128, 64, 3, 8), (128, 256, 128, 2, 8), (64, 128, 128, 4, 4))
W1_PERSISTENT = ((128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 64, 5, 4),
                 (64, 256, 64, 4, 4), (128, 128, 128, 3, 8), (64, 256, 128, 3, 4))


def w1_section(dev, layers: int = 32, sv: int = 576, d: int = 1024, h: int = 4096, persistent: bool = False
               ) -> dict:
    """The projectors' first GEMM for all layers (Z (sv, d) x W1 (layers*h, d)^T) with bias and exact GELU: cuBLAS
    and the fused pass (as the model runs it), against one Triton GEMM with the bias and GELU in its epilogue
    (persistent: also the persistent form, with and without warp specialisation, one program per SM).
    us per call (graphs of 8 calls), the fraction of outputs bit-equal to the reference, relative error."""
    run = gelu_gemm()
    bf = {"device": dev, "dtype": torch.bfloat16}
    z = torch.randn(sv, d, **bf)
    w1 = torch.randn(layers * h, d, **bf) * d**-0.5
    b1 = torch.randn(layers * h, **bf) * 0.1
    out = torch.empty(sv, layers * h, **bf)
    ref = F.gelu(F.linear(z, w1) + b1)
    fused = torch.compile(lambda x, b: F.gelu(x + b))
    res = {"cublas + gelu pass": round(graph_us([lambda: fused(F.linear(z, w1), b1)] * 8), 1),
           "cublas alone": round(graph_us([lambda: F.linear(z, w1)] * 8), 1), "triton": []}
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    kinds = [(t, {}) for t in W1_TILINGS]
    if persistent:
        kinds += [(t, {"persistent": sms, "ws": ws}) for ws in (False, True) for t in W1_PERSISTENT]
    for (bm, bn, bk, stages, warps), extra in kinds:
        row = {"tiles": [bm, bn, bk, stages, warps], **extra}
        try:
            out.zero_()
            run(z, w1, b1, out, bm, bn, bk, stages, warps, **extra)
            row["bit_equal"] = round((out == ref).float().mean().item(), 5)
            row["rel_err"] = round(((out.float() - ref.float()).norm() / ref.float().norm()).item(), 6)
            row["us"] = round(graph_us([lambda a=(bm, bn, bk, stages, warps), e=extra: run(z, w1, b1, out, *a, **e)]
                                       * 8), 1)
        except Exception as e:  # noqa: BLE001 (out of resources, a compile error: record and go on)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res["triton"].append(row)
        print(row, flush=True)
    print({k: v for k, v in res.items() if k != "triton"})
    return res


def tunable_section(dev) -> dict:
    """Does torch's TunableOp find faster cuBLAS/cuBLASLt algorithms than the default heuristics for the prefill's
    compute-bound GEMMs (the k/v GEMM over 640 rows, the W2 bmm over 32 layers) and lm_head? us per call, eager,
    CUDA events (median of 50), before and after tuning, in one process."""
    from torch.cuda import tunable

    bf = {"device": dev, "dtype": torch.bfloat16}
    h = 4096
    kv_in, wkv = torch.randn(640, h, **bf), torch.randn(2 * h, h, **bf) * h**-0.5
    g, w2 = torch.randn(32, 576, h, **bf), torch.randn(32, h, h, **bf) * h**-0.5
    last, head = torch.randn(1, h, **bf), torch.randn(32000, h, **bf) * h**-0.5
    ops = {"k/v GEMM 640x4096x8192": lambda: F.linear(kv_in, wkv),
           "W2 bmm 32x576x4096x4096": lambda: torch.bmm(g, w2.transpose(1, 2)),
           "lm_head 1x4096x32000": lambda: F.linear(last, head)}

    def timed(fn):
        return round(time_fn(lambda i: fn(), dev, warmup=5, repeats=50).median_ms * 1000, 1)

    res = {name: {"default_us": timed(fn)} for name, fn in ops.items()}
    tunable.enable(True)
    tunable.tuning_enable(True)
    tunable.set_filename("/tmp/tunableop_results.csv")
    for fn in ops.values():
        fn()
    torch.cuda.synchronize()
    tunable.tuning_enable(False)
    for name, fn in ops.items():
        res[name]["tuned_us"] = timed(fn)
    res["results"] = [list(map(str, r)) for r in tunable.get_results()]
    tunable.enable(False)
    print(res)
    return res


def _rms_norm(x, w, eps=1e-5):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


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
    if "skinny-ncu" in sections:
        skinny_ncu(dev, args.rows)
        return
    runs = {  # section -> what it measures, in the order they run; the JSON is rewritten after each
        "attention": lambda: attention_section(args.layers, dev),
        "residual": lambda: residual_section(args.rows, args.layers, args.budget_s, args.quick, dev),
        "grouped": lambda: grouped_section(args.rows, args.layers, dev),
        "carveout": lambda: carveout_section(args.rows, args.layers, dev),
        "overlap": lambda: overlap_section(args.rows, args.layers, dev),
        "coresident": lambda: coresident_section(args.rows, args.layers, dev),
        "prefetch": lambda: prefetch_section(args.layers, dev),
        "pdl": lambda: pdl_section(args.rows, args.layers, dev),
        "pdl-tiles": lambda: pdl_section(args.rows, args.layers, dev, tiles=True),
        "partition": lambda: partition_section(args.rows, args.layers, dev),
        "hold": lambda: hold_section(args.rows, args.layers, dev),
        "tma": lambda: tma_section(args.rows, args.layers, dev),
        "w1": lambda: w1_section(dev),
        "w1-persistent": lambda: w1_section(dev, persistent=True),
        "tunable": lambda: tunable_section(dev),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name, run in runs.items():
        if name in sections:
            results[name] = run()
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
        Path(args.out).write_text(json.dumps(results, indent=1))
        del ws
        torch.cuda.empty_cache()
    results["wall_s"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
