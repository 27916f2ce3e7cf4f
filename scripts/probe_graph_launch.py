"""Probe: what does launching a CUDA graph cost, from the call to its first node running?

The t=64 prefill's replay showed ~0.05-0.1 ms between the bench's start event and the graph's first node
(scripts/probe_w2_gap.py --prefill, variant "edges"), and cutting the graph in two after the visual path did not
shorten it. This replays graphs of n small kernels (plain aten kernels, or Triton kernels launched as programmatic
dependents, as the prefill's text layers are) and reports per graph the host time of `replay()` and the GPU time
from an event recorded just before it to an event captured as the graph's first node (medians of 50 replays, each
after a synchronize, as the bench times a call).

    PYTHONPATH=src python3 scripts/probe_graph_launch.py --out $OUT/graph-launch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe_w2_gap import _marked

from saisa.model import skinny
from saisa.model.graphs import preferred_blas


def graph_of(body, n: int):
    """A graph: an external event as its first node, then `body` n times; (graph, that event)."""
    first = torch.cuda.Event(enable_timing=True, external=True)
    for _ in range(2):
        body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        first.record()
        for _ in range(n):
            body()
    return g, first


def launch_cost(call, first, reps: int = 50) -> dict:
    """Medians over `reps` calls (after 3), each after a synchronize as the bench times: the host time of `call()`
    and the GPU time from an event recorded just before it to `first` (an event captured as a graph's first node)."""
    start = torch.cuda.Event(enable_timing=True)
    host, delay = [], []
    for _ in range(reps + 3):
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e6)
        delay.append(start.elapsed_time(first) * 1e3)
    return {"host_us": round(statistics.median(host[3:]), 1), "to_first_node_us": round(statistics.median(delay[3:]), 1)}


def host_us(call, reps: int = 50) -> float:
    """Median host time of `call()` over `reps` calls (after 3), each after a synchronize."""
    times = []
    for _ in range(reps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e6)
    return round(statistics.median(times[3:]), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prefill", action="store_true", help="also the graphed t=64 prefill (7B shapes)")
    args = ap.parse_args()
    x = torch.zeros(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    y = torch.zeros_like(x)
    bodies = {"aten add_": lambda: x.add_(1.0), "skinny.linear": lambda: skinny.linear(x, w, skinny.RESIDUAL)}
    if skinny.pdl_supported(x.device):
        bodies["skinny.linear, pdl"] = lambda: skinny.linear(x, w, skinny.RESIDUAL._replace(prefetch=4), pdl=True)
    # Other node kinds among the kernels: a memset (zero_ of a contiguous tensor) or a device-to-device memcpy
    # (copy_ between contiguous tensors) after every 8th kernel.
    count = [0]

    def every(kind):
        def body():
            x.add_(1.0)
            count[0] += 1
            if count[0] % 8 == 0:
                y.zero_() if kind == "memset" else y.copy_(x)
        return body

    bodies["aten add_, a memset per 8"] = every("memset")
    bodies["aten add_, a memcpy per 8"] = every("memcpy")
    # The prefill's compute-bound GEMMs (cuBLASLt's nvjet kernels, launched with thread-block clusters).
    kv_in = torch.randn(640, 4096, device="cuda", dtype=torch.bfloat16)
    wkv = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    bodies["cuBLASLt k/v GEMM 640x4096x8192"] = lambda: torch.nn.functional.linear(kv_in, wkv)

    def kv_and_adds():
        for _ in range(6):
            x.add_(1.0)
        torch.nn.functional.linear(kv_in, wkv)
    bodies["cuBLASLt k/v GEMM + 6 aten add_"] = kv_and_adds
    sizes = {"cuBLASLt k/v GEMM 640x4096x8192": (1, 32), "cuBLASLt k/v GEMM + 6 aten add_": (1, 32)}
    with preferred_blas("cublaslt"):
        rows = {}
        for name, body in bodies.items():
            for n in sizes.get(name, (1, 16, 64, 240)):
                g, first = graph_of(body, n)
                rows[f"{name} x{n}"] = row = launch_cost(g.replay, first)
                print(f"{name:<34} x{n:<4} host {row['host_us']:7.1f} us  to first node "
                      f"{row['to_first_node_us']:7.1f} us", flush=True)
                del g
    out["graphs"] = rows
    if args.prefill:
        out["prefill"] = prefill()
    Path(args.out).write_text(json.dumps(out, indent=1))


def prefill() -> dict:
    """The graphed t=64 prefill (bench setting): host time of replay() alone and of the bench's call (since session
    17 the call writes the features' address into the graph's pinned slot, before it copied them into the static
    buffer), and the GPU time from an event before it to an event captured as the forward's first node; then a copy
    into the static buffer (the old call) and other forms of it before the replay."""
    from saisa.bench.setting import PRESETS
    from saisa.bench.systems import SAISA_SCHEDULES, build_ours, make_inputs
    from saisa.model.graphs import GraphedForward

    setting = PRESETS["paper"]
    model = build_ours(setting, "saisa", torch.device("cuda"))
    s = make_inputs(setting, 1, 64, torch.device("cuda"))[0]
    model.optimize_for_inference(compile=True, dynamic=False, **SAISA_SCHEDULES["serial"])
    marks = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(2)]  # the forward's first, last
    model.forward_with_layout = _marked(type(model).forward_with_layout.__get__(model), marks, 0, 1)
    with torch.no_grad():
        graphed = GraphedForward(model, s.ids, None, s.features, logits_to_keep=1)
    model.__dict__.pop("forward_with_layout")
    graph, first = graphed.graph, marks[0]
    static_shape = graphed.image_features.shape
    res = {"replay": launch_cost(graph.replay, first), "bench_call": launch_cost(lambda: graphed(s.features), first)}
    # The call's steps before the replay, each alone (host us): where its time over replay() goes.
    feats, read = s.features, graphed._read
    res["call_steps_host_us"] = {
        "read event synchronize": host_us(read.synchronize),
        "read event query": host_us(read.query),
        "shape/dtype/device checks": host_us(lambda: (feats.shape != static_shape, feats.dtype != graphed.image_features.dtype,
                                                    feats.device != graphed.image_features.device)),
        "contiguous + data_ptr + slot write": host_us(lambda: graphed._slot_word.__setitem__(0, feats.contiguous().data_ptr())),
    }
    graphed._read = _NoWait()
    res["bench_call_without_the_event_wait"] = launch_cost(lambda: graphed(s.features), first)
    graphed._read = read
    # The input copy before the replay, alone and in other forms (same bytes into the static buffer). The committed
    # graph-launch-h100.json labels the flat-view copy_ "clone-free index_copy_".
    src, static = s.features, graphed.image_features
    copies = {
        "copy_ (GraphedForward's)": lambda: static.copy_(src, non_blocking=True),
        "copy_ blocking": lambda: static.copy_(src),
        "mul.out (an elementwise kernel)": lambda: torch.mul(src, 1, out=static),
        "copy_ of flat views": lambda: static.view(-1).copy_(src.view(-1), non_blocking=True),
    }
    for name, copy in copies.items():
        both = launch_cost(lambda c=copy: (c(), graph.replay()), first)
        res[name] = {"copy_host_us": host_us(copy), "with_replay_host_us": both["host_us"],
                     "to_first_node_us": both["to_first_node_us"]}
    print("prefill", json.dumps(res, indent=1), flush=True)
    return res


class _NoWait:
    """Stands in for GraphedForward's read event: a call that does not wait for the last replay's read."""

    def synchronize(self) -> None:
        pass


if __name__ == "__main__":
    main()
