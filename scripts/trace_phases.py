"""Per-layer phases of one graphed prefill replay, from the Chrome trace scripts/profile_prefill.py writes.

Layers are cut at each k/v GEMM (cuBLASLt's 320x128 nvjet kernel); within a layer each kernel is charged the time
from the later of its start and the end of the kernel that ended before it, to its own end (so a programmatic
dependent launch's wait for the kernel before is not counted twice). Prints the medians over the middle layers (the
first and last are left out) and what ran on the GPU and the host before the graph's first kernel.

    PYTHONPATH=src python3 scripts/profile_prefill.py --variants serial-auto --timelines serial-auto \
        --trace-dir $OUT/tr --no-pieces --rounds 0 --out $OUT/p.json
    python3 scripts/trace_phases.py $OUT/tr/trace-serial-auto.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path


def phases(trace: dict) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    host = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")), key=lambda e: e["ts"])
    t0 = gpu[0]["ts"]
    first_kernel = next(e for e in gpu if e.get("cat") == "kernel")
    out = {
        "first_gpu_events": [(e["name"][:60], round(e["ts"] - t0, 1), round(e["dur"], 1)) for e in gpu[:4]],
        "host_calls_before_first_kernel": [(e["name"], round(e["ts"] - t0, 1), round(e["dur"], 1)) for e in host
                                           if t0 - 500 < e["ts"] < first_kernel["ts"]],
    }
    cuts = [i for i, e in enumerate(gpu) if e["name"].startswith("nvjet") and "320x128" in e["name"]]
    spent = defaultdict(list)
    for a, b in itertools.pairwise(cuts[1:-1]):  # the first and last layers left out
        layer = sorted(gpu[a:b], key=lambda e: e["ts"] + e["dur"])
        prev_end = layer[0]["ts"]
        for j, e in enumerate(layer):
            end = e["ts"] + e["dur"]
            spent[f"{j}:{e['name'][:24]}"].append(end - max(prev_end, e["ts"]))
            prev_end = max(prev_end, end)
        spent["layer"].append(gpu[b]["ts"] - gpu[a]["ts"])
    out["layers"] = len(spent["layer"])
    out["layer_phases_median_us"] = {k: round(statistics.median(v), 2) for k, v in spent.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="a Chrome trace of profile_prefill.py's timeline (--trace-dir)")
    print(json.dumps(phases(json.loads(Path(ap.parse_args().trace).read_text())), indent=1))


if __name__ == "__main__":
    main()
