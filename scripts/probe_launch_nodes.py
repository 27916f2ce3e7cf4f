"""Probe: does the t=64 prefill graph's launch cost grow with its layers, and which nodes does it hold?

Unusual here: small graphs of 240 kernels launch in 4-8 us from the call to their first node on an H100
(graph-launch-h100*.json), the prefill's graph in 19-50 us (first-node-h100*.json). This builds the bench's saisa
prefill (7B shapes, serial schedule, t=64) with 1, 8 and 32 text layers, captures each as GraphedForward does
(keeping the CUDA graph), and reports per depth: `replay()`'s host time and the GPU time from an event before it
to the graph's first node (launch_cost, medians of 50), the same for the bench's call, and the graph's nodes by
kind and kernel (CUDA's driver API through cuda.bindings), and the launch cost of its own instantiations of the same
graph (flags 0, and with node priorities) launched with cuGraphLaunch.

    PYTHONPATH=src python3 scripts/probe_launch_nodes.py --out $OUT/launch-nodes.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe_graph_launch import launch_cost

from saisa.bench.timing import free_memory
from saisa.model import graphs


def census(graph: torch.cuda.CUDAGraph) -> dict:
    """The graph's nodes by type and its kernels by name, through CUDA's driver API (cuda.bindings)."""
    from cuda.bindings import driver

    raw = driver.CUgraph(init_value=graph.raw_cuda_graph())
    _, _, n = driver.cuGraphGetNodes(raw, 0)
    _, nodes, n = driver.cuGraphGetNodes(raw, n)
    n_edges = driver.cuGraphGetEdges(raw, 0)[-1]
    kinds: collections.Counter = collections.Counter()
    kernels: collections.Counter = collections.Counter()
    for node in nodes:
        _, kind = driver.cuGraphNodeGetType(node)
        kinds[kind.name.removeprefix("CU_GRAPH_NODE_TYPE_")] += 1
        if kind == driver.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
            err, params = driver.cuGraphKernelNodeGetParams(node)
            if err == driver.CUresult.CUDA_SUCCESS:
                err, name = driver.cuFuncGetName(params.func)
            kernels[(name.decode() if err == driver.CUresult.CUDA_SUCCESS else err.name)[:70]] += 1
    return {"nodes": n, "edges": n_edges, "kinds": dict(kinds), "kernels": dict(kernels.most_common(40))}


def own_exec(graph: torch.cuda.CUDAGraph, flags: int):
    """(launch, destroy) of our own instantiation of the graph with `flags` (uploaded), launched by cuGraphLaunch on
    the current stream; None where instantiation fails."""
    from cuda.bindings import driver

    raw = driver.CUgraph(init_value=graph.raw_cuda_graph())
    err, exe = driver.cuGraphInstantiate(raw, flags)
    if err != driver.CUresult.CUDA_SUCCESS:
        return None
    stream = driver.CUstream(init_value=torch.cuda.current_stream().cuda_stream)
    driver.cuGraphUpload(exe, stream)
    return (lambda: driver.cuGraphLaunch(exe, stream)), (lambda: driver.cuGraphExecDestroy(exe))


def own_exec_launch(graph: torch.cuda.CUDAGraph, first: torch.cuda.Event, flags: int) -> dict:
    """launch_cost of cuGraphLaunch on our own instantiation of the graph with `flags`."""
    made = own_exec(graph, flags)
    if made is None:
        return {"error": "instantiation failed"}
    row = launch_cost(made[0], first)
    torch.cuda.synchronize()
    made[1]()
    return row


def launchers(graph: torch.cuda.CUDAGraph, first: torch.cuda.Event, rounds: int) -> dict:
    """torch's replay() against cuGraphLaunch of our own instantiations (flags 0, auto-free-on-launch as torch
    instantiates, node priorities), launch_cost in interleaved rounds: the median of the rounds' medians."""
    from cuda.bindings import driver

    flags = driver.CUgraphInstantiate_flags
    calls = {"torch replay()": (graph.replay, None)}
    for name in ("0", "CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH", "CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY"):
        made = own_exec(graph, 0 if name == "0" else int(getattr(flags, name)))
        if made is not None:
            calls[f"cuGraphLaunch, flags {name}"] = made
    got: dict = {n: {"host_us": [], "to_first_node_us": []} for n in calls}
    for _ in range(rounds):
        for name, (launch, _) in calls.items():
            for k, v in launch_cost(launch, first).items():
                got[name][k].append(v)
    torch.cuda.synchronize()
    for _, destroy in calls.values():
        if destroy is not None:
            destroy()
    out = {n: {k: round(statistics.median(v), 1) for k, v in row.items()} | {"rounds": row} for n, row in got.items()}
    for n, row in out.items():
        print(f"  {n:<58} host {row['host_us']:6.1f} us  to first node {row['to_first_node_us']:6.1f} us", flush=True)
    return out


class DebugGraph(torch.cuda.CUDAGraph):
    """A CUDAGraph that keeps its CUDA graph (instantiated at its first replay), for `census`."""

    def __new__(cls, keep_graph: bool = True):
        return super().__new__(cls, True)

    def __init__(self, keep_graph: bool = True):
        super().__init__(True)


def call_steps(graphed, features: torch.Tensor, first: torch.Event) -> dict:
    """launch_cost of GraphedForward's call and of its steps before the replay, one by one and together."""
    word = graphed._slot_word

    def write():
        word[0] = features.data_ptr()

    variants = {
        "replay": graphed.graph.replay,
        "read event synchronize, replay": lambda: (graphed._read.synchronize(), graphed.graph.replay()),
        "read event query, replay": lambda: (graphed._read.query(), graphed.graph.replay()),
        "slot write, replay": lambda: (write(), graphed.graph.replay()),
        "synchronize, slot write, replay": lambda: (graphed._read.synchronize(), write(), graphed.graph.replay()),
        "the call": functools.partial(graphed, features),
    }
    rows = {}
    for _ in range(2):  # the second pass is kept: the first warms every path
        for name, call in variants.items():
            rows[name] = launch_cost(call, first)
    for name, row in rows.items():
        print(f"  {name:<36} host {row['host_us']:6.1f} us  to first node {row['to_first_node_us']:6.1f} us", flush=True)
    return rows


def depth_row(layers: int, steps: bool = False, rounds: int = 0, **optimize) -> dict:
    from saisa.bench.setting import PRESETS
    from saisa.bench.systems import SAISA_SCHEDULES, build_ours, make_inputs

    base = PRESETS["paper"]
    setting = dataclasses.replace(base, text_config={**base.text_config, "num_hidden_layers": layers})
    dev = torch.device("cuda")
    model = build_ours(setting, "saisa", dev)
    sets = make_inputs(setting, 1, 64, dev)
    model.optimize_for_inference(compile=True, dynamic=False, **SAISA_SCHEDULES["serial"], **optimize)
    first = torch.cuda.Event(enable_timing=True, external=True)
    committed = graphs.read_from_slot

    def marked_read(slot, dst, done, word):
        first.record()  # the graph's first node
        committed(slot, dst, done, word)

    graphs.read_from_slot, plain = marked_read, torch.cuda.CUDAGraph
    torch.cuda.CUDAGraph = DebugGraph
    try:
        with torch.no_grad():
            graphed = graphs.GraphedForward(model, sets[0].ids, None, sets[0].features, logits_to_keep=1)
    finally:
        graphs.read_from_slot, torch.cuda.CUDAGraph = committed, plain
    row: dict = {"layers": layers, "optimize": optimize}
    with torch.no_grad():
        row["replay"] = launch_cost(graphed.graph.replay, first)
        row["bench_call"] = launch_cost(functools.partial(graphed, sets[1].features), first)
    if steps:
        with torch.no_grad():
            row["call_steps"] = call_steps(graphed, sets[1].features, first)
    if rounds:
        with torch.no_grad():
            row["launchers"] = launchers(graphed.graph, first, rounds)
    row["graph"] = census(graphed.graph)
    from cuda.bindings import driver

    flags = driver.CUgraphInstantiate_flags
    with torch.no_grad():
        for name in ("0", "CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY"):
            row[f"own exec, flags {name}"] = own_exec_launch(
                graphed.graph, first, 0 if name == "0" else int(getattr(flags, name)))
    print(f"{layers:>2} layers {optimize}: replay host {row['replay']['host_us']:6.1f} us, to first node "
          f"{row['replay']['to_first_node_us']:6.1f} us; bench call {row['bench_call']['host_us']:6.1f} / "
          f"{row['bench_call']['to_first_node_us']:6.1f} us; nodes {row['graph']['nodes']} "
          f"{row['graph']['kinds']} edges {row['graph']['edges']}", flush=True)
    print({k: v for k, v in row.items() if k.startswith("own")}, flush=True)
    del graphed, model
    free_memory(dev)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="1,8,32")
    ap.add_argument("--launcher-rounds", type=int, default=0,
                    help="for the deepest graph, torch's replay against our own instantiations, in this many rounds")
    ap.add_argument("--no-variants", action="store_true", help="skip the deepest graph without pdl and without tiles")
    args = ap.parse_args()
    depths = [int(n) for n in args.layers.split(",")]
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "depths": []}
    for n in depths:
        deepest = n == max(depths)
        res["depths"].append(depth_row(n, steps=deepest, rounds=args.launcher_rounds if deepest else 0))
        Path(args.out).write_text(json.dumps(res, indent=1))
    for optimize in () if args.no_variants else ({"pdl": False, "step": "skinny"}, {"tile": False}):
        res["depths"].append(depth_row(max(depths), **optimize))
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
