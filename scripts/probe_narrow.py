"""Can the batch-1 text GEMMs reach HBM bandwidth from part of an H100's SMs, so the visual GEMMs can use the rest?

Unusual here: the text GEMMs are a persistent kernel of G programs (G < the SM count) that stream their weight by
TMA loads in one flattened loop over (output tile, K step), so each program keeps its pipeline full across tiles;
`skinny`'s kernels (one program per output tile, pointer loads) need nearly every SM to reach their bandwidth
(benchmarks/results/skinny-partition-h100-t64.json: the text chain 173 us per layer on 132 SMs, 223 on 66). Two
green contexts on disjoint SMs come from the driver API (`Partition`). Sections, all with 32 distinct weights per
shape (none found in L2): "narrow", every tiling of that kernel at each G for the text GEMMs' shapes (us per call,
TB/s; skinny's tiles on all SMs beside it); "overlap", the text GEMMs at G beside the visual GEMMs (W2, k/v) on two
plain streams, cuBLASLt told to leave G SMs free; "partition", the same on two green contexts of disjoint SMs;
"window", a t=64 prefill's GEMMs as the model schedules them (the projector for all layers, then per layer the k/v
GEMM and the text GEMMs) against per layer the k/v GEMM on all SMs, then the text GEMMs on n SMs while the next
layer's projector runs on the others; with --power each schedule is also replayed for 2 s under nvidia-smi (SM
clock, board power, temperature, clock-event reasons). JSON to --out.

    PYTHONPATH=src python3 scripts/probe_narrow.py --sections narrow,overlap,partition,window --power \
        --splits 56,64,72 --out $OUT/narrow.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from profile_skinny import copy_tbps, graph_us, on

from saisa.bench.power import PowerTrace
from saisa.model import skinny

SHAPES = {  # name -> (N, K): Vicuna-7B's text GEMMs at batch 1 (gate and up as one weight of 2 x 11008 rows)
    "q_proj / o_proj": (4096, 4096),
    "gate_proj + up_proj": (22016, 4096),
    "down_proj": (4096, 11008),
}
SMEM = 220_000


@functools.cache
def stream_kernel():
    """y = x W^T for few rows (all of x's rows in each program) by G persistent programs: program p takes output
    tiles p, p + G, ... and runs one loop over (tile, K step), the tile's product stored at its last K step."""
    triton, tl = skinny.triton_modules()
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def kernel(x_desc, w_desc, y_ptr, N, K, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        progs = tl.num_programs(0)
        k_steps = K // BLOCK_K
        mine = (N // BLOCK_N - pid + progs - 1) // progs
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.range(0, mine * k_steps, num_stages=STAGES):
            ki = i % k_steps
            n0 = (pid + (i // k_steps) * progs) * BLOCK_N
            acc = tl.dot(x_desc.load([0, ki * BLOCK_K]), w_desc.load([n0, ki * BLOCK_K]).T, acc)
            if ki == k_steps - 1:
                offs_n = n0 + tl.arange(0, BLOCK_N)
                tl.store(y_ptr + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty))
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    descs = {}

    def run(x, w, y, programs, bn, bk, stages, warps=4):
        key = (x.data_ptr(), w.data_ptr(), bn, bk)
        if key not in descs:  # made once per tensor and tiling: host work outside the timed graphs
            descs[key] = (TensorDescriptor.from_tensor(x, [x.shape[0], bk]), TensorDescriptor.from_tensor(w, [bn, bk]))
        xd, wd = descs[key]
        n, k = w.shape
        kernel[(min(programs, n // bn),)](xd, wd, y, n, k, y.stride(0), BLOCK_M=x.shape[0], BLOCK_N=bn, BLOCK_K=bk,
                                          STAGES=stages, num_warps=warps)
    return run


def tilings(k: int):
    for bn, bk, stages in itertools.product((32, 64, 128), (64, 128, 256), (3, 4, 6, 8)):
        if (64 + bn) * bk * 2 * stages <= SMEM and k % bk == 0:
            yield bn, bk, stages


def both(text_stream, text_fn, vis_stream, vis_fn):
    """A thunk: vis_fn on vis_stream and text_fn on text_stream at once, both joined to the current stream."""
    def go():
        cur = torch.cuda.current_stream()
        for s in (text_stream, vis_stream):
            s.wait_stream(cur)
        with torch.cuda.stream(vis_stream):
            vis_fn()
        with torch.cuda.stream(text_stream):
            text_fn()
        cur.wait_stream(text_stream)
        cur.wait_stream(vis_stream)
    return go


def visual_gemms(hv, w2, xv, kv_src, wkv, kv, carve: int = 0) -> None:
    """Each layer's visual GEMMs: xv = hv W2^T, then kv = kv_src W_kv^T (kv_src: xv, or a buffer of xv's shape plus
    text rows), with cuBLASLt told to leave `carve` SMs free (0: none)."""
    torch._C._set_sm_carveout_experimental(carve or None)
    try:
        for w2_i, wkv_i in zip(w2, wkv):
            torch.mm(hv, w2_i.t(), out=xv)
            torch.mm(kv_src, wkv_i.t(), out=kv)
    finally:
        torch._C._set_sm_carveout_experimental(None)


def fastest_tiling(run, x, ws, y, g: int, stream, errors: dict | None = None) -> tuple[float, list[int]]:
    """(us per call, [bn, bk, stages]) of the stream kernel's fastest tiling at G = g programs for x W^T over the
    weights `ws`, timed on `stream`; only tilings whose shared memory keeps one program per SM. Failures go to
    `errors` (None: raised)."""
    n, k = ws[0].shape
    timed = []
    for bn, bk, stages in tilings(k):
        if n // bn < g or (64 + bn) * bk * 2 * stages < 114_000:
            continue
        try:
            timed.append((graph_us([on(stream, lambda w=w, t=(g, bn, bk, stages): run(x, w, y, *t)) for w in ws]),
                          [bn, bk, stages]))
        except Exception as e:
            if errors is None:
                raise
            errors[f"{bn},{bk},{stages}"] = f"{type(e).__name__}: {str(e)[:160]}"
            torch.cuda.synchronize()
    return min(timed)


def narrow_section(dev, rows: int, layers: int, programs: list[int]) -> dict:
    run = stream_kernel()
    out = {}

    def shape(name, n, k):
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5 for _ in range(layers)]
        y = torch.empty(rows, n, device=dev, dtype=torch.bfloat16)
        ref = (x.float() @ ws[0].float().t())
        gb = n * k * 2 / 1e9
        tiles = skinny.GATE_UP if name.startswith("gate") else skinny.RESIDUAL
        us = graph_us([lambda w=w: skinny.linear(x, w, tiles) for w in ws])
        row = {"gb": gb, "skinny, all SMs": {"us": round(us, 2), "tb_per_s": round(gb / us * 1e3, 3)}, "stream": {}}
        for g in programs:
            found = []
            for bn, bk, stages in tilings(k):
                if (n // bn) < g:
                    continue
                try:
                    run(x, ws[0], y, g, bn, bk, stages)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        found.append({"tiles": [bn, bk, stages], "error": f"rel_err {err:.3g}"})
                        continue
                    tus = graph_us([lambda w=w, t=(g, bn, bk, stages): run(x, w, y, *t) for w in ws])
                    found.append({"tiles": [bn, bk, stages], "us": round(tus, 2), "tb_per_s": round(gb / tus * 1e3, 3)})
                except Exception as e:  # noqa: BLE001 (out of resources, a compile error: record and go on)
                    found.append({"tiles": [bn, bk, stages], "error": f"{type(e).__name__}: {str(e)[:160]}"})
            best = sorted((f for f in found if "us" in f), key=lambda f: f["us"])
            row["stream"][str(g)] = {"best": best[:4], "errors": [f for f in found if "error" in f][:3]}
            print(name, g, best[:2], flush=True)
        print(name, row["skinny, all SMs"], flush=True)
        return row

    for name, (n, k) in SHAPES.items():
        out[name] = shape(name, n, k)
        torch.cuda.empty_cache()
    return out


def layer_tensors(dev, rows: int, layers: int, shapes: dict, sv: int, kv_rows: int) -> SimpleNamespace:
    """`layers` layers' distinct text weights of `shapes` ({name: (N, K)}) and visual W2 and k/v weights, the text
    GEMMs' inputs and outputs by name, the visual rows (hv), W2's output (xv), and a k/v output of kv_rows rows with
    an input (kv_in) of as many."""
    h = 4096
    bf = {"device": dev, "dtype": torch.bfloat16}
    mk = lambda n, k: torch.randn(n, k, **bf) * k**-0.5
    return SimpleNamespace(
        text=[{name: mk(*shape) for name, shape in shapes.items()} for _ in range(layers)],
        w2=[mk(h, h) for _ in range(layers)], wkv=[mk(2 * h, h) for _ in range(layers)],
        xs={name: torch.randn(rows, k, **bf) for name, (_, k) in shapes.items()},
        ys={name: torch.empty(rows, n, **bf) for name, (n, _) in shapes.items()},
        hv=torch.randn(sv, h, **bf), xv=torch.empty(sv, h, **bf), kv=torch.empty(kv_rows, 2 * h, **bf),
        kv_in=torch.randn(kv_rows, h, **bf))


def overlap_section(dev, rows: int, layers: int, best: dict, programs: list[int], sv: int = 576) -> dict:
    """best: {shape name: {str(G): [bn, bk, stages]}} from the narrow section."""
    run = stream_kernel()
    t = layer_tensors(dev, rows, layers, SHAPES, sv, sv + rows)
    text, xs, ys = t.text, t.xs, t.ys
    high = torch.cuda.Stream(dev, priority=-5)
    low = torch.cuda.Stream(dev, priority=0)
    order = ["q_proj / o_proj", "q_proj / o_proj", "gate_proj + up_proj", "down_proj"]

    def text_chain(g):
        for w in text:
            for name in order:
                if g is None:
                    tiles = skinny.GATE_UP if name.startswith("gate") else skinny.RESIDUAL
                    skinny.linear(xs[name], w[name], tiles, out=ys[name])
                else:
                    run(xs[name], w[name], ys[name], g, *best[name][str(g)])

    def visual_chain(carve):
        visual_gemms(t.hv, t.w2, t.xv, t.kv_in, t.wkv, t.kv, carve)

    out = {"us_per_layer": {}, "errors": {}}
    runs = {"text, skinny, all SMs": on(high, lambda: text_chain(None)),
            "visual, all SMs": on(low, lambda: visual_chain(0)),
            "both, skinny text": both(high, lambda: text_chain(None), low, lambda: visual_chain(0))}
    for g in programs:
        if not all(str(g) in best[name] for name in SHAPES):
            continue
        runs[f"text, G {g}"] = on(high, lambda g=g: text_chain(g))
        runs[f"visual, carveout {g}"] = on(low, lambda g=g: visual_chain(g))
        runs[f"serial, G {g}"] = lambda g=g: (visual_chain(0), text_chain(g))
        runs[f"both, G {g}, carveout {g}"] = both(high, lambda g=g: text_chain(g), low, lambda g=g: visual_chain(g))
        runs[f"both, G {g}, no carveout"] = both(high, lambda g=g: text_chain(g), low, lambda: visual_chain(0))
    for name, fn in runs.items():
        try:
            vals = [graph_us([fn], reps=10) / layers for _ in range(3)]
            out["us_per_layer"][name] = [round(v, 1) for v in vals]
        except Exception as e:  # noqa: BLE001 (a setting that cannot be captured: record it, time the rest)
            out["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            torch.cuda.synchronize()
        print(name, out["us_per_layer"].get(name), out["errors"].get(name, ""), flush=True)
    return out


class Partition:
    """Two CUDA green contexts on disjoint SMs of one device (the driver API through ctypes: torch's GreenContext
    gives each context the first n SMs, so two of them overlap): `n` SMs (rounded up by the driver) and the rest,
    with a stream in each as torch.cuda.ExternalStream."""

    SIZE = 1024  # bytes per CUdevResource: larger than the struct in any CUDA 12/13 header

    def __init__(self, n: int, device: int = 0):
        import ctypes

        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{device}")  # the primary context, current
        cu = ctypes.CDLL("libcuda.so.1")
        self._cu, self._ct = cu, ctypes

        def call(name, *args):
            rc = getattr(cu, name)(*args)
            if rc != 0:
                raise RuntimeError(f"{name} returned CUresult {rc}")

        dev = ctypes.c_int()
        call("cuDeviceGet", ctypes.byref(dev), device)
        whole, group, rest = (ctypes.create_string_buffer(self.SIZE) for _ in range(3))
        call("cuDeviceGetDevResource", dev, whole, 1)  # CU_DEV_RESOURCE_TYPE_SM
        groups = ctypes.c_uint(1)
        call("cuDevSmResourceSplitByCount", group, ctypes.byref(groups), whole, rest, 0, n)
        sms = lambda buf: int.from_bytes(buf.raw[96:100], "little")  # after the 4-byte type and 92 bytes of padding
        self.sms = (sms(group), sms(rest))
        self.streams, self._keep = [], [whole, group, rest]
        for res in (group, rest):
            desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
            call("cuDevResourceGenerateDesc", ctypes.byref(desc), res, 1)
            call("cuGreenCtxCreate", ctypes.byref(ctx), desc, dev, 1)  # CU_GREEN_CTX_DEFAULT_STREAM
            call("cuGreenCtxStreamCreate", ctypes.byref(stream), ctx, 1, 0)  # CU_STREAM_NON_BLOCKING
            self._keep.append(ctx)
            self.streams.append(torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device)))


def partition_section(dev, rows: int, layers: int, splits: list[int], sv: int = 576) -> dict:
    """The text GEMMs (q + the text rows' k/v as one weight, o, gate + up, down) on a green context of n SMs, by the
    stream kernel at G = n programs with the fastest tiling there, beside each layer's visual GEMMs (W2, then k/v
    over the visual rows; cuBLASLt, with or without a carveout of n SMs) on a green context of the other SMs."""
    run = stream_kernel()
    h = 4096
    shapes = {"q + text k/v": (3 * h, h), "o_proj": (h, h), "gate_proj + up_proj": (22016, h),
              "down_proj": (h, 11008)}
    t = layer_tensors(dev, rows, layers, shapes, sv, sv)
    text, xs, ys = t.text, t.xs, t.ys
    out = {}

    def visual_chain(carve):  # the k/v GEMM reads W2's output, as in the model
        visual_gemms(t.hv, t.w2, t.xv, t.xv, t.wkv, t.kv, carve)

    def split(n):
        part = Partition(n, dev.index or 0)
        a, b = part.streams
        g = part.sms[0]
        row = {"sms": list(part.sms), "tiles": {}, "us_per_layer": {}, "errors": {}}
        for name, (nn, k) in shapes.items():  # the fastest tiling at G = g, timed on the text side alone
            us, tiles = fastest_tiling(run, xs[name], [w[name] for w in text], ys[name], g, a,
                                       row["errors"].setdefault(name, {}))
            row["tiles"][name] = {"tiles": tiles, "us": round(us, 2), "tb_per_s": round(nn * k * 2 / us / 1e3, 3)}

        def text_chain():
            for w in text:
                for name in shapes:
                    run(xs[name], w[name], ys[name], g, *row["tiles"][name]["tiles"])

        runs = {"text alone (its SMs)": on(a, text_chain), "visual alone (the rest)": on(b, lambda: visual_chain(0)),
                "visual alone (the rest, carveout)": on(b, lambda: visual_chain(g)),
                "visual alone (all SMs)": lambda: visual_chain(0), "serial (all SMs)": lambda: (
                    visual_chain(0), text_chain()),
                "both": both(a, text_chain, b, lambda: visual_chain(0)),
                "both, carveout": both(a, text_chain, b, lambda: visual_chain(g))}
        for name, fn in runs.items():
            try:
                row["us_per_layer"][name] = [round(graph_us([fn], reps=10) / layers, 1) for _ in range(3)]
            except Exception as e:  # noqa: BLE001 (a setting that cannot be captured: record it, time the rest)
                row["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.synchronize()
        print(n, json.dumps(row), flush=True)
        return row

    for n in splits:
        out[str(n)] = split(n)
    return out


def sustained(fn, seconds: float = 2.0) -> dict:
    """fn as a CUDA graph replayed back to back for `seconds` under saisa.bench.power's trace: the replays' median
    (and first and last) time in us, and the SM clock, power and clock-event reasons after the first quarter."""
    import statistics

    g = torch.cuda.CUDAGraph()
    fn()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        fn()
    times = []
    with PowerTrace(torch.cuda.current_device()) as trace:
        t0 = time.time()
        while time.time() - t0 < seconds:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000 / 20)
        t1 = time.time()
    return {"us": round(statistics.median(times), 1), "us_first": round(times[0], 1), "us_last": round(times[-1], 1),
            "power": trace.window(t0 + (t1 - t0) / 4, t1)}


def window_section(dev, rows: int, layers: int, splits: list[int], sv: int = 576, d: int = 1024,
                   power: bool = False) -> dict:
    """A t=64 prefill's GEMMs in two schedules, us for all layers. "serial" (as the model runs them now): the
    projectors' W1 (+ bias, GELU) for all layers and W2 as one bmm, then per layer the k/v GEMM over visual + text
    rows and the text GEMMs (o, gate + up, down, the next q) by skinny's kernels on all SMs. "window": per layer,
    the k/v GEMM on all SMs, then the text GEMMs by the stream kernel on a green context of n SMs while the next
    layer's projector (W1, GELU, W2) runs on a green context of the other SMs (it waits for this layer's k/v GEMM,
    and the next k/v GEMM waits for it and for the text GEMMs)."""
    import torch.nn.functional as F

    run = stream_kernel()
    h = 4096
    bf = {"device": dev, "dtype": torch.bfloat16}
    mk = lambda *shape: torch.randn(*shape, **bf) * shape[-1] ** -0.5
    shapes = {"o_proj": (h, h), "gate_proj + up_proj": (22016, h), "down_proj": (h, 11008), "q_proj": (h, h)}
    text = [{name: mk(*shape) for name, shape in shapes.items()} for _ in range(layers)]
    w1, b1, w2, wkv = mk(layers * h, d), torch.randn(layers * h, **bf) * 0.1, mk(layers, h, h), mk(layers, 2 * h, h)
    z = torch.randn(sv, d, **bf)
    xs = {name: torch.randn(rows, k, **bf) for name, (_, k) in shapes.items()}
    ys = {name: torch.empty(rows, n, **bf) for name, (n, _) in shapes.items()}
    kv_in = torch.randn(layers, sv + rows, h, **bf)  # each layer's k/v input: the projector's rows, then text rows
    kv = torch.empty(sv + rows, 2 * h, **bf)
    hid = torch.empty(sv, layers * h, **bf)

    def projector(i=None):
        if i is None:  # all layers: W1 as one GEMM, W2 as one bmm
            hidden = F.gelu(torch.addmm(b1, z, w1.t(), out=hid))
            torch.bmm(hidden.view(sv, layers, h).transpose(0, 1), w2.transpose(1, 2))
            return
        sl = slice(i * h, (i + 1) * h)
        torch.mm(F.gelu(torch.addmm(b1[sl], z, w1[sl].t())), w2[i].t(), out=kv_in[i, :sv])

    def kv_gemm(i):
        torch.mm(kv_in[i], wkv[i].t(), out=kv)

    def skinny_text(i):
        for name in shapes:
            tiles = skinny.GATE_UP if name.startswith("gate") else skinny.RESIDUAL
            skinny.linear(xs[name], text[i][name], tiles, out=ys[name])

    def serial():
        projector()
        for i in range(layers):
            kv_gemm(i)
            skinny_text(i)

    out = {"serial": [round(graph_us([serial], reps=10), 1) for _ in range(3)],
           "serial, power": sustained(serial) if power else None,
           "serial, k/v GEMMs only": [round(graph_us([lambda: [kv_gemm(i) for i in range(layers)]], reps=10), 1)
                                      for _ in range(3)],
           "serial, no projector": [round(graph_us([lambda: [(kv_gemm(i), skinny_text(i)) for i in range(layers)]],
                                                   reps=10), 1) for _ in range(3)],
           "projector, all layers at once": [round(graph_us([projector], reps=10), 1) for _ in range(3)],
           "projector, per layer": [round(graph_us([lambda: [projector(i) for i in range(layers)]], reps=10), 1)
                                    for _ in range(3)]}
    print(out, flush=True)
    def split(n):
        part = Partition(n, dev.index or 0)
        a, b = part.streams
        g = part.sms[0]
        tiles = {}
        tiles = {name: fastest_tiling(run, xs[name], [w[name] for w in text], ys[name], g, a)[1]
                 for name in shapes}  # the fastest tiling at G = g on the text side alone
        ev_v = [torch.cuda.Event() for _ in range(layers)]
        ev_kv = [torch.cuda.Event() for _ in range(layers)]
        ev_t = [torch.cuda.Event() for _ in range(layers)]

        def window(first_all=True, vis=True, txt=True):
            cur = torch.cuda.current_stream()
            a.wait_stream(cur)
            b.wait_stream(cur)
            if first_all:
                projector(0)
            else:
                with torch.cuda.stream(b):
                    projector(0)
                    ev_v[0].record()
                cur.wait_event(ev_v[0])
            for i in range(layers):
                if i:
                    cur.wait_event(ev_v[i])
                    cur.wait_event(ev_t[i - 1])
                kv_gemm(i)
                ev_kv[i].record()
                if i + 1 < layers:
                    b.wait_event(ev_kv[i])
                    with torch.cuda.stream(b):
                        if vis:
                            projector(i + 1)
                        ev_v[i + 1].record()
                a.wait_event(ev_kv[i])
                with torch.cuda.stream(a):
                    for name in shapes if txt else ():
                        run(xs[name], text[i][name], ys[name], g, *tiles[name])
                    ev_t[i].record()
            cur.wait_event(ev_t[layers - 1])

        row = {"sms": list(part.sms), "tiles": tiles}
        variants = {"window": window, "window, projector 0 on its SMs": lambda: window(False),
                    "window, no projector": lambda: window(vis=False), "window, no text": lambda: window(txt=False),
                    "window, k/v GEMMs only": lambda: window(vis=False, txt=False),
                    "projector per layer, its SMs alone": on(b, lambda: [projector(i) for i in range(layers)]),
                    "text GEMMs, its SMs alone": on(a, lambda: [
                        run(xs[name], text[i][name], ys[name], g, *tiles[name]) for i in range(layers)
                        for name in shapes])}
        for name, fn in variants.items():
            try:
                row[name] = [round(graph_us([fn], reps=10), 1) for _ in range(3)]
                if power:
                    row[name + ", power"] = sustained(fn)
            except Exception as e:  # noqa: BLE001 (record and go on)
                row[name] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.synchronize()
        print(n, json.dumps(row), flush=True)
        return row

    for n in splits:
        out[str(n)] = split(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--programs", default="32,44,64,88,128")
    ap.add_argument("--sections", default="narrow,overlap")
    ap.add_argument("--splits", default="48,56,64,72")
    ap.add_argument("--power", action="store_true", help="window: also replay each schedule for 2 s under nvidia-smi")
    args = ap.parse_args()
    dev = torch.device("cuda")
    programs = [int(p) for p in args.programs.split(",")]
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "sms": torch.cuda.get_device_properties(dev).multi_processor_count, "rows": args.rows,
           "layers": args.layers, "copy_tb_per_s": round(copy_tbps(), 3)}
    print(res, flush=True)

    def save():
        res["wall_s"] = round(time.time() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))

    sections = args.sections.split(",")
    if "narrow" in sections:
        res["narrow"] = narrow_section(dev, args.rows, args.layers, programs)
        save()
    if "overlap" in sections and "narrow" in res:
        best = {name: {g: v["best"][0]["tiles"] for g, v in row["stream"].items() if v["best"]}
                for name, row in res["narrow"].items()}
        res["overlap"] = overlap_section(dev, args.rows, args.layers, best, programs)
        save()
    if "window" in sections:
        res["window"] = window_section(dev, args.rows, args.layers, [int(n) for n in args.splits.split(",")],
                                       power=args.power)
        save()
    if "partition" in sections:
        res["partition"] = partition_section(dev, args.rows, args.layers, [int(n) for n in args.splits.split(",")])
        save()


if __name__ == "__main__":
    main()
