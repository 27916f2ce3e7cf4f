"""Probe: why the bench's timed t=64 prefill (8.23-8.26 ms) sits above its schedule trial (8.03-8.10 ms) in one process.

In benchmarks/results/paper-h100.json the saisa_graphs entry at t=64 records the serial schedule's trial, 10
replays right after its capture, at 8.03 ms, and the timed entry of a graph captured again after the other
schedules' trials at 8.26 ms. This captures the serial graph (as the bench does, `GraphedForward` after
`optimize_for_inference`) and times, with the bench's `time_fn` (20 replays unless noted): the first graph at once
(10 replays, as a trial), then (20); three more graphs captured and freed; a fifth kept, timed; the first graph again;
and both after 3 s idle. Same graph later vs a recaptured graph tells a clock drift from a placement effect.
--power: also three runs of 2 s of replays, and the SM clock, board power and clock-event reasons in every run's
window (saisa.bench.power).

    PYTHONPATH=src python3 scripts/probe_timing_drift.py --power --out $OUT/timing-drift.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from saisa.bench.power import PowerTrace
from saisa.bench.setting import PRESETS
from saisa.bench.systems import SAISA_SCHEDULES, build_ours, make_inputs
from saisa.bench.timing import free_memory, time_fn
from saisa.model.graphs import GraphedForward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--power", action="store_true", help="record the SM clock and board power in each run's window")
    args = ap.parse_args()
    dev = torch.device("cuda")
    setting = PRESETS["paper"]
    model = build_ours(setting, "saisa", dev)
    sets = make_inputs(setting, 1, 64, dev)
    model.optimize_for_inference(compile=True, dynamic=False, **SAISA_SCHEDULES["serial"])
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": {}}

    windows = {}

    def timed(name, graph, repeats=20):
        t0 = time.time()
        t = time_fn(lambda i: graph(sets[i % len(sets)].features), dev, warmup=3, repeats=repeats)
        windows[name] = (t0, time.time())
        out["ms"][name] = {"median": round(t.median_ms, 4), "p10": round(t.p10_ms, 4), "p90": round(t.p90_ms, 4),
                           "at_s": round(time.time() - start, 2)}
        print(f"{name:<40} {t.median_ms:.4f} ms (p10 {t.p10_ms:.4f}, p90 {t.p90_ms:.4f})", flush=True)

    with torch.no_grad(), PowerTrace(dev.index or 0) if args.power else contextlib.nullcontext() as trace:
        first = GraphedForward(model, sets[0].ids, None, sets[0].features, logits_to_keep=1)
        start = time.time()
        timed("first graph, 10 replays at once", first, 10)
        timed("first graph, 20 replays", first)
        for k in range(3):
            g = GraphedForward(model, sets[0].ids, None, sets[0].features, logits_to_keep=1)
            timed(f"trial graph {k + 2}, 10 replays", g, 10)
            del g
            free_memory(dev)
        fifth = GraphedForward(model, sets[0].ids, None, sets[0].features, logits_to_keep=1)
        timed("fifth graph (recaptured), 20 replays", fifth)
        timed("first graph again, 20 replays", first)
        time.sleep(3)
        timed("first graph after 3 s idle, 10 replays", first, 10)
        timed("fifth graph, 10 replays", fifth, 10)
        timed("first graph, 60 replays", first, 60)
        timed("fifth graph, 60 replays", fifth, 60)
        if args.power:
            for k in range(3):  # replays back to back for 2 s, three times
                timed(f"first graph, 2 s of replays ({k + 1})", first, int(2.0 / (out["ms"]["first graph, 60 replays"]
                                                                                ["median"] * 1e-3)))
    if args.power:
        for name, (t0, t1) in windows.items():
            out["ms"][name]["power"] = trace.window(t0, t1)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
