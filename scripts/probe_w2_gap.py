"""Probe: the idle stretch before the projector's linear_2 GEMM in the graphed t=64 prefill.

Traces of the graphed prefill (benchmarks/results/prefill-ab-h100/third/profile-rows-timeline.json) show a memset
node right before the W2 bmm (32 x 576 x 4096 x 4096, cuBLASLt's nvjet kernel) and then 91-323 us with no kernel
running, the largest idle stretch of the prefill. This script captures the visual path before the first layer
(W1 bmm, bias + GELU, W2 bmm into the strided k/v input rows, as fused.visual_rows_chunk does) as a CUDA graph under
each BLAS library and output layout (and W2 alone, and W2 as one GEMM per layer), and reports per variant the replay's median time (CUDA events, rounds
interleaved) and one profiled replay's kernels, memsets and idle gaps.

    PYTHONPATH=src python3 scripts/probe_w2_gap.py --out $OUT/w2-gap.json
    PYTHONPATH=src python3 scripts/probe_w2_gap.py --prefill --out $OUT/w2-gap-prefill.json

--prefill: the whole graphed t=64 prefill (the bench's default settings) with timing events captured inside the
graph (torch.cuda.Event(external=True)) around the projector's parts, so each replay, unprofiled, gives the time of
W1 + bias + GELU, of the W2 GEMM (any wait before it included), and of the rows' 1 / RMS; variants: the markers
alone, W2 as two GEMMs of 16 layers each, and "edges": events at the captured forward's first and after its last
node, so the bench's latency (events around the input copy and the replay) splits into the time to the graph's
first node, the graph's body and what follows it; and the host time of each call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_prefill import interleaved, timeline

from saisa.bench.timing import summarize
from saisa.model.fused import projector_hidden
from saisa.model.graphs import capture_graph, preferred_blas

C, V, D, H, T = 32, 576, 1024, 4096, 64  # layers, visual tokens, CLIP width, LLM width, text rows


def build(blas: str, layout: str, features, w1, b1, w2):
    """A graph of the visual path under `blas`. layout "strided": W2 writes into (C, 1, V + T, H) rows as the
    prefill does; "contiguous": into a fresh (C, V, H) tensor; "w2-only": the W2 bmm alone (its input made before
    capture); "per-layer": W2 as C separate GEMMs (torch.mm) into the strided rows."""
    a0 = projector_hidden(features, w1, b1)

    def run():
        a = a0 if layout == "w2-only" else projector_hidden(features, w1, b1)  # W1, + b1, GELU: three kernels
        if layout == "contiguous":
            return torch.bmm(a, w2.transpose(1, 2))
        rows = a.new_empty(C, 1, V + T, H)
        if layout == "per-layer":
            for i in range(C):
                torch.mm(a[i], w2[i].t(), out=rows[i, 0, :V])
        else:
            torch.bmm(a, w2.transpose(1, 2), out=rows[:, 0, :V])
        return rows

    with preferred_blas(blas), torch.no_grad():
        graph, _ = capture_graph(run)
    return graph


def _marked(fn, marks: list, before: int, after: int):
    """`fn` with timing events marks[before] / marks[after] recorded around it (captured into a graph)."""
    def call(*args, **kwargs):
        marks[before].record()
        out = fn(*args, **kwargs)
        marks[after].record()
        return out
    return call


def split_rows(features, slots, w1, b1, w2, b2, layers, eps, text_len=0, hidden=None, row_rstd=None):
    """fused.visual_rows_chunk with the W2 GEMM as two bmm's of half the layers each."""
    a = hidden(features, w1, b1)
    c, v, h = a.shape
    rows = a.new_empty(c, 1, v + text_len, h)
    for part in (slice(0, c // 2), slice(c // 2, c)):
        torch.bmm(a[part], w2[part].transpose(1, 2), out=rows[part, 0, :v])
    return rows, row_rstd(rows[:, 0, :v], b2, eps).unsqueeze(1)


def prefill(args) -> None:
    import functools

    from saisa.bench.setting import PRESETS
    from saisa.bench.systems import SAISA_SCHEDULES, build_ours, make_inputs
    from saisa.model import fused
    from saisa.model.graphs import GraphedForward

    dev = torch.device("cuda")
    setting = PRESETS["paper"]
    model = build_ours(setting, "saisa", dev)
    s = make_inputs(setting, 1, T, dev)[0]
    model.optimize_for_inference(compile=True, dynamic=False, **SAISA_SCHEDULES["serial"])
    base = model._fused.rows
    hidden, rstd = base.keywords["hidden"], base.keywords["row_rstd"]
    if rstd is None:  # since 9507a47 the rows' 1 / RMS is made per layer beside the k/v GEMMs: an unfilled buffer
        def rstd(rows, b2, eps):  # here, between markers 2 and 3 (the "rstd" phase is then about nothing)
            return rows.new_empty(rows.shape[:2], dtype=torch.float32)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    graphs, marks = {}, {}
    for name in ("plain", "marked", "marked-split-w2", "edges"):
        m = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(4)]
        if name in ("plain", "edges"):
            model._fused.rows = base
        else:
            rows_fn = fused.visual_rows_chunk if name == "marked" else split_rows
            model._fused.rows = functools.partial(rows_fn, hidden=_marked(hidden, m, 0, 1),
                                                  row_rstd=_marked(rstd, m, 2, 3))
        if name == "edges":  # events at the first and after the last node of the captured forward
            model.forward_with_layout = _marked(type(model).forward_with_layout.__get__(model), m, 0, 1)
        with torch.no_grad():
            graphs[name] = GraphedForward(model, s.ids, None, s.features, logits_to_keep=1)
        marks[name] = m
        model.__dict__.pop("forward_with_layout", None)
    model._fused.rows = base
    phases: dict[str, dict[str, list[float]]] = {
        n: {"total": [], "w1_gelu": [], "w2": [], "rstd": [], "to_first_node": [], "graph_body": [],
            "after_last_node": [], "host_call": []} for n in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, graph in graphs.items():
                for i in range(23):
                    torch.cuda.synchronize()
                    start.record()
                    t0 = time.perf_counter()
                    graph(s.features)
                    t1 = time.perf_counter()
                    end.record()
                    torch.cuda.synchronize()
                    if i < 3:
                        continue
                    ph, m = phases[name], marks[name]
                    ph["total"].append(start.elapsed_time(end))
                    ph["host_call"].append((t1 - t0) * 1e3)
                    if name == "edges":
                        ph["to_first_node"].append(start.elapsed_time(m[0]))
                        ph["graph_body"].append(m[0].elapsed_time(m[1]))
                        ph["after_last_node"].append(m[1].elapsed_time(end))
                    elif name.startswith("marked"):
                        ph["w1_gelu"].append(m[0].elapsed_time(m[1]))
                        ph["w2"].append(m[1].elapsed_time(m[2]))
                        ph["rstd"].append(m[2].elapsed_time(m[3]))
    for name, ph in phases.items():
        timings = {k: summarize(v, 3, "cuda_event") for k, v in ph.items() if v}
        row = {k: round(t.median_ms, 4) for k, t in timings.items()}
        row.update({f"{k}_p10_p90": [round(t.p10_ms, 4), round(t.p90_ms, 4)] for k, t in timings.items()})
        results["variants"][name] = row
        print(f"{name:<18} " + "  ".join(f"{k} {v:.4f} ms" for k, v in row.items() if not k.endswith("p90")))
    Path(args.out).write_text(json.dumps(results, indent=1))


def projector_tensors(dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Vicuna-7B-shaped per-layer projector inputs (seed 0): features (1, V, D), W1 (C, H, D), b1 (C, H),
    W2 (C, H, H), bf16."""
    dt = torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    features = torch.randn(1, V, D, device=dev, dtype=dt, generator=g)
    w1 = torch.randn(C, H, D, device=dev, dtype=dt, generator=g) * D ** -0.5
    b1 = torch.randn(C, H, device=dev, dtype=dt, generator=g) * 0.02
    w2 = torch.randn(C, H, H, device=dev, dtype=dt, generator=g) * H ** -0.5
    return features, w1, b1, w2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill", action="store_true", help="the whole graphed prefill, events around W2")
    args = ap.parse_args()
    if args.prefill:
        prefill(args)
        return
    dev = torch.device("cuda")
    features, w1, b1, w2 = projector_tensors(dev)
    variants = {f"{blas} {layout}": (blas, layout) for blas in ("cublaslt", "cublas")
                for layout in ("strided", "contiguous", "w2-only", "per-layer")}
    graphs = {name: build(*kw, features, w1, b1, w2) for name, kw in variants.items()}
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    rounds = interleaved({name: (lambda i=0, g=graph: g.replay()) for name, graph in graphs.items()}, dev,
                         args.rounds, repeats=20)
    for name, graph in graphs.items():
        line = timeline(graph.replay, None, top=8)
        results["variants"][name] = {"ms": rounds[name]["ms"], "round_ms": rounds[name]["round_ms"],
                                     "idle_gaps": line.get("idle_gaps"), "top": line.get("top"),
                                     "span_ms": line.get("span_ms")}
        print(f"{name:<22} {rounds[name]['ms']:8.3f} ms  rounds {rounds[name]['round_ms']}  "
              f"idle {line.get('idle_gaps', {}).get('total_ms')} ms, max gap {line.get('idle_gaps', {}).get('max_us')} us")
    # Back to back (no synchronisation between replays): the steady kernel time, host out of the way.
    for name, graph in graphs.items():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        results["variants"][name]["back_to_back_ms"] = round(start.elapsed_time(end) / 20, 3)
        print(f"{name:<22} back to back {results['variants'][name]['back_to_back_ms']:.3f} ms per replay")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
