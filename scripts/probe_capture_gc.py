"""Does a garbage collection during a CUDA-graph capture invalidate it? (The cause of test_suite_on_cuda_tiny's
occasional failure.)

Unusual here: the body provokes what happened by chance in the GPU suite: a graph held only by a dead reference cycle
(as a GraphedForward was, through a lambda that closed over it) is freed by a collection that runs inside another
graph's capture. `plain`: torch.cuda.graph alone; `capturing`: saisa.model.graphs.capturing, which pauses the cyclic
collector. Run each in its own process (a failed capture leaves the process's CUDA state behind):

    PYTHONPATH=src python3 scripts/probe_capture_gc.py plain
    PYTHONPATH=src python3 scripts/probe_capture_gc.py capturing
"""

from __future__ import annotations

import argparse
import gc

import torch

from saisa.model.graphs import capturing

CAPTURES = {"plain": lambda g: torch.cuda.graph(g), "capturing": capturing}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("capture", choices=sorted(CAPTURES))
    capture = CAPTURES[ap.parse_args().capture]
    x = torch.ones(8, device="cuda")
    old = torch.cuda.CUDAGraph()
    with capture(old):
        x * 2
    holder = [old]
    holder.append(holder)  # only the cyclic collector can free it, and the graph with it
    del old
    graph = torch.cuda.CUDAGraph()
    thresholds = gc.get_threshold()
    try:
        with capture(graph):
            z = x + 1
            del holder
            gc.set_threshold(1, 1, 1)  # a collection at (nearly) every allocation below
            z = z + len([[[]] for _ in range(1000)])
        graph.replay()
        torch.cuda.synchronize()
        print("ok" if torch.equal(z, torch.full_like(x, 1002.0)) else "wrong result")
    except Exception as err:  # noqa: BLE001 - the failure is the finding
        print(f"FAILED: {type(err).__name__}: {str(err).splitlines()[0]}")
    finally:
        gc.set_threshold(*thresholds)


if __name__ == "__main__":
    main()
