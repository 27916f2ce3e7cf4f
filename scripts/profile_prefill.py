"""Where SAISA's batch-1 prefill spends its time on the GPU (Vicuna-7B + CLIP-L/336 shapes, bf16, random weights).

Unusual here: one call answers three questions, cheapest first, and rewrites its JSON after each step (a run cut
short keeps what it measured). (1) variants: the CUDA-graph prefill (`optimize_for_inference` + GraphedForward)
under each setting, against the uncompiled reference path, then every kept graph again in --rounds interleaved
rounds (A B C A B C ...), so a drift of the GPU's clocks falls on all variants alike; (2) timelines: one graph
replay under the profiler, the time with none, one or several kernels running, the idle gaps between kernels and
what ran before them, kernel time by kind and name (plus a Chrome trace); (3) pieces: each GEMM / attention /
visual step alone, all n layers' weights in turn in one graph (none found in L2), in us per layer with TFLOP/s and
GB/s, the terms of a per-layer budget (optionally the text GEMMs through cuBLASLt and Triton autotuned as well).
Prints tables; JSON to --out.

    PYTHONPATH=src python3 scripts/profile_prefill.py --out $OUT/profile.json --trace-dir $OUT
    PYTHONPATH=src python3 scripts/profile_prefill.py --variants eager,serial --no-pieces --out $OUT/p.json
    PYTHONPATH=src python3 scripts/profile_prefill.py --smoke --out /tmp/p.json      # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from saisa.bench.setting import PRESETS
from saisa.bench.systems import SAISA_SCHEDULES, build_ours, make_inputs
from saisa.bench.timing import free_memory, time_fn
from saisa.model.fused import ATTENTION, attend
from saisa.model.graphs import BLAS, GraphedForward, preferred_blas

# name -> optimize_for_inference arguments (compile=True, fold=True throughout; "blas": torch's preferred BLAS
# library while the graph is captured, default graphs.BLAS). The bench's saisa_graphs runs one of saisa.bench.systems.SAISA_SCHEDULES
# (eager attention), the fastest per shape; until 2026-11-22 it ran "eager" (= its "overlap"). Tried in order;
# LATE ones (minutes of compile) run only when named, after the timelines and pieces.
VARIANTS = {
    "sdpa": {"chunk": 1, "overlap": True, "attention": "sdpa"},
    "eager": {"chunk": 1, "overlap": True, "attention": "eager"},
    **{name: {**kw, "attention": "eager"} for name, kw in SAISA_SCHEDULES.items() if name != "overlap"},  # = eager
    "ramp": {"chunk": (2, 6), "overlap": True, "attention": "eager"},  # chunks of 2, 6, then the rest
    "eager-chunk2": {"chunk": 2, "overlap": True, "attention": "eager"},
    "eager-serial": {"chunk": 1, "overlap": False, "attention": "eager"},
    "serial-cublaslt": {**SAISA_SCHEDULES["serial"], "attention": "eager", "blas": "cublaslt"},
    # The FFN's first half as aten's two GEMMs and SiLU * up (every variant above: skinny.gate_up where Triton is).
    "serial-aten": {**SAISA_SCHEDULES["serial"], "attention": "eager", "ffn": "aten"},
    # Without inductor's combo kernels (on CUDA every variant above launches a layer's independent elementwise
    # kernels, the q and k RoPEs, as one; until 2026-11-22 this was "serial", and "serial-combo" the default).
    "serial-no-combo": {**SAISA_SCHEDULES["serial"], "attention": "eager", "compile_options": {}},
    # text_attention's kernels (RoPE, scores, softmax and values over key spans, a merge) for the eager form's.
    "serial-triton-attn": {**SAISA_SCHEDULES["serial"], "attention": "triton", "step": "compiled"},
    "serial-auto": {**SAISA_SCHEDULES["serial"]},  # optimize_for_inference's defaults (the bench's engine)
    "serial-auto-cublas": {**SAISA_SCHEDULES["serial"], "blas": "cublas"},  # its GEMMs captured through cuBLAS
    # The visual inputs in chunks of 2, 4, 8 layers on the main stream: each chunk's GELU and norm passes read what
    # its GEMM has just written, some of it still in L2.
    **{f"chunk{c}-auto": {"chunk": c, "overlap": False} for c in (2, 4, 8)},
    "serial-triton-attn-cublas": {**SAISA_SCHEDULES["serial"], "attention": "triton", "step": "compiled",
                                  "blas": "cublas"},
    "overlap-triton-attn": {**SAISA_SCHEDULES["overlap"], "attention": "triton", "step": "compiled"},
    # fused.skinny_layer_step (no norm kernels: the RMS division deferred into the kernels that read the norms),
    # its kernels launched in turn.
    "serial-skinny": {**SAISA_SCHEDULES["serial"], "attention": "triton", "step": "skinny", "pdl": False},
    "overlap-skinny": {**SAISA_SCHEDULES["overlap"], "attention": "triton", "step": "skinny", "pdl": False},
    "head8-skinny": {**SAISA_SCHEDULES["head8"], "attention": "triton", "step": "skinny", "pdl": False},
    # The skinny step with every kernel but the k/v GEMM a programmatic dependent launch (q_proj a Triton GEMM).
    "serial-skinny-pdl": {**SAISA_SCHEDULES["serial"], "attention": "triton", "step": "skinny", "pdl": True},
    # The projector's GELU in its tanh form, in the first GEMM's cuBLASLt epilogue (not LLaVA's erf form).
    "serial-triton-attn-tanh": {**SAISA_SCHEDULES["serial"], "attention": "triton", "step": "compiled",
                                "gelu": "tanh"},
    "serial-skinny-pdl-tanh": {**SAISA_SCHEDULES["serial"], "attention": "triton", "step": "skinny", "pdl": True,
                               "gelu": "tanh"},
    # The layout's tensors (masks, RoPE tables) made again in every replay, as before 2026-11-22 (probe only).
    "serial-triton-attn-no-tables": {**SAISA_SCHEDULES["serial"], "attention": "triton", "step": "compiled",
                                     "tables": False},
    "flex": {"chunk": 1, "overlap": True, "attention": "flex"},  # newest kernels last: a fault spoils what follows
    "eager-autotune": {"chunk": 1, "overlap": True, "attention": "eager",
                       "compile_mode": "max-autotune-no-cudagraphs"},
    "serial-autotune": {**SAISA_SCHEDULES["serial"], "attention": "eager",
                        "compile_mode": "max-autotune-no-cudagraphs"},
}
ALIASES = {"eager-all-layers-serial": "serial", "serial-combo": "serial"}  # names in results before 2026-11-22
LATE = ("eager-autotune", "serial-autotune")


def save(results: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# ----------------------------------------------------------------------------------------------------- (1) variants
def run_variant(model, s, kw: dict, ref: torch.Tensor, device, smoke: bool) -> tuple[dict, Callable]:
    """Time the prefill under `kw`: a CUDA-graph replay on the GPU, the compiled forward on the CPU (smoke)."""
    row: dict = {"settings": {k: v for k, v in kw.items()}}
    kw = dict(kw)
    blas = kw.pop("blas", BLAS)  # the GEMMs' library is fixed when the graph is captured
    keep_tables = kw.pop("tables", True)
    t0 = time.perf_counter()
    model.optimize_for_inference(compile=True, compile_backend="eager" if smoke else "inductor", dynamic=False, **kw)
    if not keep_tables:  # a cache that forgets: every call (and so the graph) makes the layout's tensors again
        model._fused.tables = _Forgetful()
    with torch.no_grad():
        if device.type == "cuda":
            graph = GraphedForward(model, s.ids, None, s.features, logits_to_keep=1, blas=blas)
            run = lambda i=0: graph(s.features)
        else:
            run = lambda i=0: model(input_ids=s.ids, image_features=s.features, logits_to_keep=1).logits
            run()
    row["build_s"] = round(time.perf_counter() - t0, 1)
    with torch.no_grad():
        timing = time_fn(run, device, warmup=5, repeats=5 if smoke else 50)
        row.update(ms=round(timing.median_ms, 3), p10_ms=round(timing.p10_ms, 3), p90_ms=round(timing.p90_ms, 3))
        row["rel_err_vs_reference"] = rel_err(run(), ref)
    return row, run


class _Forgetful(dict):
    def __setitem__(self, key, value) -> None:
        pass


def interleaved(runs: dict[str, Callable], device, rounds: int, repeats: int) -> dict[str, dict]:
    """Every kept graph timed again in `rounds` rounds, one timing of each in turn per round: per variant the
    median of its round medians and those medians, and its ratio to the first variant's."""
    medians: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(rounds):
            for name, run in runs.items():
                medians[name].append(time_fn(run, device, warmup=2, repeats=repeats).median_ms)
    out = {name: {"ms": round(statistics.median(m), 3), "round_ms": [round(x, 3) for x in m]}
           for name, m in medians.items()}
    first = next(iter(out.values()), None)
    for row in out.values():
        row["vs_first"] = round(row["ms"] / first["ms"], 4)
    return out


# ----------------------------------------------------------------------------------------------------- (2) timelines
def _kind(name: str) -> str:
    low = name.lower()
    if any(w in low for w in ("flash", "fmha", "cudnn", "attention", "flex")):
        return "attention"
    if any(w in low for w in ("nvjet", "gemm", "cutlass", "xmma", "splitk", "gemv", "sm90_", "ampere_")):
        return "gemm"
    if low.startswith("triton"):
        return "triton (fused elementwise / reductions)"
    if "memset" in low or "memcpy" in low:
        return "memset/memcpy"
    return "other"


def concurrency(intervals: list[tuple[int, int]]) -> dict[int, int]:
    """ns spent with exactly k kernels running, for each k (0 = idle between the first start and the last end)."""
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    spent: dict[int, int] = defaultdict(int)
    active, last = 0, points[0][0]
    for at, step in points:
        spent[active] += at - last
        active, last = active + step, at
    return dict(spent)


def idle_gaps(kernels: list[tuple[int, int, str]], top: int = 8) -> dict:
    """The idle stretches between kernels (no kernel running) of one replay, kernels given as (start_ns, end_ns,
    name): how many, their median / p90 / max in us, and the idle time after each kind of kernel (the kernel that
    ended last before the gap), largest first. Many short gaps of about the same length, one per kernel, are the
    graph's launch latency between dependent kernels; a few long ones would be waits (events, host)."""
    gaps: list[tuple[int, str]] = []
    busy_until, last_name = None, ""
    for start, end, name in sorted(kernels):
        if busy_until is not None and start > busy_until:
            gaps.append((start - busy_until, last_name))
        if busy_until is None or end >= busy_until:
            busy_until, last_name = end, name
    if not gaps:
        return {"count": 0}
    lengths = sorted(g for g, _ in gaps)
    after: dict[str, float] = defaultdict(float)
    for g, name in gaps:
        after[name[:80]] += g / 1e3
    return {
        "count": len(gaps), "total_ms": round(sum(lengths) / 1e6, 3),
        "median_us": round(lengths[len(lengths) // 2] / 1e3, 2),
        "p90_us": round(lengths[int(0.9 * (len(lengths) - 1))] / 1e3, 2), "max_us": round(lengths[-1] / 1e3, 2),
        "kernels": len(kernels),
        "us_after": [(n, round(us, 1)) for n, us in sorted(after.items(), key=lambda kv: -kv[1])[:top]],
    }


def timeline(run: Callable, trace_path: str | None, top: int = 30) -> dict:
    """Profile one call of `run` (a graph replay): time with 0, 1, 2+ kernels running (kernels of a graph may all
    report the stream it was launched on, so concurrency is read from the intervals, not the stream ids), the idle
    gaps (`idle_gaps`), kernel time by kind and by name, kernels per stream id as reported."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    run()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        run()
        sync()
    if trace_path:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(trace_path)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU  # CPU: --smoke only
    kernels = [e for e in prof.profiler.kineto_results.events()
               if e.device_type() == kind and e.duration_ns() > 0 and (cuda or e.name().startswith("aten::"))]
    if not kernels:
        return {"error": "no kernels recorded (graph kernels not traced?)"}
    streams: dict[int, int] = defaultdict(int)
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    intervals, named = [], []
    for e in kernels:
        streams[e.device_resource_id()] += 1
        intervals.append((e.start_ns(), e.start_ns() + e.duration_ns()))
        named.append((*intervals[-1], e.name()))
        by_kind[_kind(e.name())] += e.duration_ns() / 1e6
        row = by_name[e.name()[:100]]
        row[0] += e.duration_ns() / 1e6
        row[1] += 1
    spent = concurrency(intervals)
    span = max(b for _, b in intervals) - min(a for a, _ in intervals)
    return {
        "kernels": len(kernels), "span_ms": span / 1e6, "kernel_ms_total": sum(by_kind.values()),
        "ms_with_0_1_2plus_kernels": [spent.get(0, 0) / 1e6, spent.get(1, 0) / 1e6,
                                      sum(v for k, v in spent.items() if k >= 2) / 1e6],
        "idle_gaps": idle_gaps(named),
        "kernels_per_stream_id": {str(k): v for k, v in streams.items()},
        "kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [(n, round(v[0], 3), v[1]) for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
    }


# ----------------------------------------------------------------------------------------------------- (3) pieces
def pieces(model, t: int, device, extra: tuple[str, ...] = ()) -> dict:
    """Each piece alone, layer i's weights at call i, n calls in one CUDA graph: us per layer, TFLOP/s, GB/s of
    weights (bf16, batch 1, t text rows, Sv = v visual rows). extra: also the text GEMMs through cuBLASLt
    ("cublaslt": torch's preferred BLAS library while capturing) and as Triton GEMMs autotuned against cuBLAS
    ("autotune": inductor max-autotune, about a minute of compile): how close to the copy bandwidth a t-row GEMM
    can get."""
    layers, proj = model.layers, model.multi_modal_projector
    n, h = len(layers), model.config.text_config.hidden_size
    folded = model._folded_kv
    kv2 = folded.weight.shape[1]
    inter = layers[0].mlp.gate_proj.out_features
    heads, head_dim = layers[0].self_attn.config.num_attention_heads, folded.head_dim
    kv_heads = kv2 // 2 // head_dim
    sv, d = model.num_visual_tokens, proj.linear_1.in_features
    dt = folded.weight.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dt, generator=gen)
    x_t, x_sv, x_all, x_ffn = rnd(1, t, h), rnd(1, sv, h), rnd(1, sv + t, h), rnd(1, t, inter)
    z = rnd(1, sv, d)
    w1, w2 = proj.linear_1.weight, proj.linear_2.weight  # (n, h, d), (n, h, h)
    q, k, v = rnd(1, heads, t, head_dim), rnd(1, kv_heads, sv + t, head_dim), rnd(1, kv_heads, sv + t, head_dim)
    allowed = torch.ones(1, 1, t, sv + t, dtype=torch.bool, device=device).tril(sv)
    allowed[:, :, :35, :sv] = False  # the bench's prompt: 35 text tokens before the image
    bias = torch.zeros(allowed.shape, dtype=dt, device=device).masked_fill(~allowed, float("-inf"))
    backend = "inductor" if device.type == "cuda" else "eager"
    attn = {kind: torch.compile(lambda q, k, v, b, kind=kind: attend(q, k, v, b, head_dim**-0.5, kind), dynamic=False,
                                backend=backend) for kind in ("sdpa", "eager", "flex")}
    gate_up = None
    try:  # [W_gate; W_up] as one weight: what fusing the two GEMMs would read (a temporary copy)
        gate_up = [torch.cat([ly.mlp.gate_proj.weight, ly.mlp.up_proj.weight]) for ly in layers]
    except torch.OutOfMemoryError:
        pass
    a = lambda i: layers[i].self_attn
    m = lambda i: layers[i].mlp
    wb = 2  # bytes per weight
    items: dict[str, tuple[Callable[[int], object], float, float]] = {  # per layer: fn(i), FLOPs, weight bytes
        "q_proj, t rows": (lambda i: F.linear(x_t, a(i).q_proj.weight), 2 * t * h * h, h * h * wb),
        "o_proj, t rows": (lambda i: F.linear(x_t, a(i).o_proj.weight), 2 * t * h * h, h * h * wb),
        "k/v folded, Sv + t rows (the compiled path)": (lambda i: F.linear(x_all, folded.weight[i]),
                                                        2 * (sv + t) * h * kv2, kv2 * h * wb),
        "k/v folded, t rows only": (lambda i: F.linear(x_t, folded.weight[i]), 2 * t * h * kv2, kv2 * h * wb),
        "k/v folded, Sv rows only": (lambda i: F.linear(x_sv, folded.weight[i]), 2 * sv * h * kv2, kv2 * h * wb),
        "gate_proj, t rows": (lambda i: F.linear(x_t, m(i).gate_proj.weight), 2 * t * h * inter, h * inter * wb),
        "up_proj, t rows": (lambda i: F.linear(x_t, m(i).up_proj.weight), 2 * t * h * inter, h * inter * wb),
        "down_proj, t rows": (lambda i: F.linear(x_ffn, m(i).down_proj.weight), 2 * t * h * inter, h * inter * wb),
        "projector linear_1, Sv rows": (lambda i: F.linear(z, w1[i]), 2 * sv * d * h, d * h * wb),
        "projector linear_2, Sv rows": (lambda i: F.linear(x_sv, w2[i]), 2 * sv * h * h, h * h * wb),
        "all layers batched: linear_1 (bmm)": (lambda i: torch.bmm(z.expand(n, -1, -1), w1.transpose(1, 2)) if i == 0
                                               else None, 2 * sv * d * h, d * h * wb),
        "all layers batched: linear_2 (bmm)": (
            lambda i: torch.bmm(x_sv.expand(n, -1, -1), w2.transpose(1, 2)) if i == 0 else None,
            2 * sv * h * h, h * h * wb),
        "all layers batched: k/v, Sv rows (bmm)": (
            lambda i: torch.bmm(x_sv.expand(n, -1, -1), folded.weight.transpose(1, 2)) if i == 0 else None,
            2 * sv * h * kv2, kv2 * h * wb),
    }
    if gate_up is not None:
        items["gate+up as one GEMM, t rows"] = (lambda i: F.linear(x_t, gate_up[i]), 4 * t * h * inter,
                                                2 * h * inter * wb)
    for kind, fn in attn.items():
        items[f"attention {kind} (compiled), t x (Sv + t)"] = (lambda i, fn=fn: fn(q, k, v, bias),
                                                               4 * t * (sv + t) * heads * head_dim, 0)
    text_gemms = ("q_proj, t rows", "o_proj, t rows", "k/v folded, t rows only", "gate_proj, t rows",
                  "up_proj, t rows", "down_proj, t rows", "k/v folded, Sv + t rows (the compiled path)")
    blas: dict[str, str] = {}  # piece -> BLAS library while capturing
    if "cublaslt" in extra:
        for name in text_gemms:
            items[f"{name} (cuBLASLt)"] = items[name]
            blas[f"{name} (cuBLASLt)"] = "cublaslt"
    if "autotune" in extra and device.type == "cuda":
        # One compiled F.linear; dynamo compiles it once per weight shape (q/o, k/v, gate/up, down).
        tuned = torch.compile(lambda x, w: F.linear(x, w), dynamic=False, mode="max-autotune-no-cudagraphs")
        inputs = {"q_proj, t rows": x_t, "o_proj, t rows": x_t, "k/v folded, t rows only": x_t,
                  "gate_proj, t rows": x_t, "up_proj, t rows": x_t, "down_proj, t rows": x_ffn,
                  "k/v folded, Sv + t rows (the compiled path)": x_all}
        weights = {"q_proj, t rows": lambda i: a(i).q_proj.weight, "o_proj, t rows": lambda i: a(i).o_proj.weight,
                   "k/v folded, t rows only": lambda i: folded.weight[i],
                   "gate_proj, t rows": lambda i: m(i).gate_proj.weight,
                   "up_proj, t rows": lambda i: m(i).up_proj.weight,
                   "down_proj, t rows": lambda i: m(i).down_proj.weight,
                   "k/v folded, Sv + t rows (the compiled path)": lambda i: folded.weight[i]}
        for name in text_gemms:
            _, flops, nbytes = items[name]
            items[f"{name} (Triton autotuned)"] = (
                lambda i, x=inputs[name], w=weights[name]: tuned(x, w(i)), flops, nbytes)
    out: dict[str, dict] = {}
    for name, (fn, flops, nbytes) in items.items():
        library = blas.get(name) if device.type == "cuda" else None
        try:
            with torch.no_grad(), preferred_blas(library):  # the library is fixed when the graph is captured
                for i in range(min(3, n)):  # warm-up (compiles the attention)
                    fn(i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for i in range(n):
                            fn(i)
                    replay = graph.replay
                else:  # --smoke
                    replay = lambda fn=fn: [fn(i) for i in range(n)]
                us = time_fn(lambda _, replay=replay: replay(), device, warmup=3, repeats=20).median_ms * 1e3 / n
            out[name] = {"us_per_layer": round(us, 2), "tflops": round(flops / us / 1e6, 1),
                         "weight_gb_per_s": round(nbytes / us / 1e3, 1)}
        except Exception as err:  # noqa: BLE001 - a piece that cannot run is reported, not fatal
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        print(f"  {name:48s} {json.dumps(out[name])}", flush=True)
    items.clear()
    gate_up = None  # the [W_gate; W_up] copies go before the caller goes on
    free_memory(device)
    return out


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--trace-dir", help="write Chrome traces of the timelines here (one file per timeline)")
    ap.add_argument("--t", type=int, default=64, help="text tokens")
    ap.add_argument("--variants", default=",".join(n for n in VARIANTS if n not in LATE),
                    help=f"comma-separated, from {','.join(VARIANTS)} (default: all but {','.join(LATE)}); the "
                         "first is the reference of the interleaved rounds")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the kept graphs (0: none)")
    ap.add_argument("--timelines", default="eager,best",
                    help="comma-separated variants to profile one replay of ('best': the fastest; '': none)")
    ap.add_argument("--budget-s", type=float, default=400, help="start no variant after this many seconds")
    ap.add_argument("--no-pieces", action="store_true")
    ap.add_argument("--pieces-extra", default="", help="comma-separated: cublaslt, autotune (see pieces())")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU: checks the script, times nothing")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    setting = PRESETS["tiny" if args.smoke else "paper"]
    if device.type == "cuda":
        import torch.profiler._utils as prof_utils

        prof_utils._init_for_cuda_graphs()  # CUPTI on before any capture, so graph kernels show in the timelines
    model = build_ours(setting, "saisa", device)
    s = make_inputs(setting, 1, args.t, device)[0]
    results: dict = {"t": args.t, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "variants": {}}
    with torch.no_grad():  # the reference path: no fold, no compile, no side stream
        ref = model(input_ids=s.ids, image_features=s.features, logits_to_keep=1).logits.float()
    # A graph replay reads weights at the addresses it captured: each kept graph's folded weights stay referenced
    # here (the next optimize_for_inference folds anew), or a later replay would read freed memory.
    runs: dict[str, tuple] = {}
    wanted = [ALIASES.get(n, n) for n in args.variants.split(",") if n]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")

    def variants(names: list[str]) -> None:
        for name in names:
            if time.perf_counter() - t_start > args.budget_s:
                results["variants"][name] = {"skipped": f"over the {args.budget_s} s budget"}
                continue
            try:
                row, run = run_variant(model, s, VARIANTS[name], ref, device, args.smoke)
                runs[name] = (run, model._folded_kv, model._fused)
            except Exception as err:  # noqa: BLE001 - a variant that fails is reported, not fatal
                row = {"settings": VARIANTS[name], "error": f"{type(err).__name__}: {str(err)[:400]}"}
            results["variants"][name] = row
            print(f"{name:26s} {json.dumps(row)}", flush=True)
            save(results, args.out)

    def rounds(key: str, names: list[str]) -> None:
        kept = {n: runs[n][0] for n in names if n in runs}
        if args.rounds > 0 and len(kept) > 1:
            results[key] = interleaved(kept, device, args.rounds, repeats=5 if args.smoke else 20)
            print(f"{key}: {json.dumps({n: (r['ms'], r['vs_first']) for n, r in results[key].items()})}", flush=True)
            save(results, args.out)

    def fastest() -> str | None:
        timed = {n: r["ms"] for n, r in results.get("interleaved", {}).items()}
        timed = timed or {n: r["ms"] for n, r in results["variants"].items() if "ms" in r}
        return min(timed, key=timed.get) if timed else None

    early = [n for n in wanted if n not in LATE]
    variants(early)
    rounds("interleaved", early)
    results["fastest"] = fastest()
    timed = {n: r["ms"] for n, r in results["variants"].items() if n in ATTENTION and "ms" in r}
    results["best_attention"] = min(timed, key=timed.get) if timed else None
    if device.type == "cuda" or args.smoke:  # the CPU (--smoke) runs through the code, its figures mean nothing
        names = [results["fastest"] if n == "best" else n for n in args.timelines.split(",") if n]
        for name in dict.fromkeys(ALIASES.get(n, n) for n in names):
            if name not in runs:
                continue
            trace = str(Path(args.trace_dir) / f"trace-{name}.json") if args.trace_dir else None
            try:
                results.setdefault("timelines", {})[name] = timeline(runs[name][0], trace)
            except Exception as err:  # noqa: BLE001
                results.setdefault("timelines", {})[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"timeline {name}: {json.dumps({k: v for k, v in results['timelines'][name].items() if k != 'top'})}",
                  flush=True)
            save(results, args.out)
        if not args.no_pieces:
            model.optimize_for_inference(compile=True, chunk=1, overlap=False)  # folded weights for the pieces
            print("pieces (us per layer):", flush=True)
            extra = tuple(x for x in args.pieces_extra.split(",") if x)
            results["pieces"] = pieces(model, args.t, device, extra)
            save(results, args.out)
    late = [n for n in wanted if n in LATE]
    if late:
        variants(late)
        # The late variants against the fastest early one and the bench's former setting, interleaved again.
        rounds("interleaved_late", list(dict.fromkeys([results["fastest"], "eager", *late])))
    runs.clear()
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    save(results, args.out)
    print(f"fastest: {results['fastest']} (best attention: {results['best_attention']}); wrote {args.out} "
          f"({results['wall_s']} s)")


if __name__ == "__main__":
    main()
