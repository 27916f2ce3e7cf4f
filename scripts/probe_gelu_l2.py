"""Probe: can the projector's bias + GELU pass read linear_1's output from L2 instead of HBM?

Unusual here: the t=64 prefill's visual path runs all 32 layers' linear_1 as one bmm (230 us, 151 MB out), then
one compiled bias + GELU pass over that output (about 120 us: 302 MB through HBM), then linear_2's bmm
(projector-w1-gelu-h100.json, prefill-ab-h100/third). Here linear_1 runs in chunks of k layers, each followed at
once by its bias + GELU in place (a chunk of 4 layers' output is 18.9 MB, so it may still be in the 50 MB L2), then
linear_2 over all layers as before. Each variant is captured as a CUDA graph and timed in interleaved rounds
(profile_prefill.interleaved: the median of the rounds' medians), linear_1 + GELU alone and with linear_2, with the
largest difference of each variant's output from the committed path's.

    PYTHONPATH=src python3 scripts/probe_gelu_l2.py --out $OUT/gelu-l2.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from probe_w2_gap import C, H, V, projector_tensors
from profile_prefill import interleaved

from saisa.model.fused import projector_hidden
from saisa.model.graphs import capture_graph, preferred_blas


@torch.compile(dynamic=False)
def bias_gelu_(x: torch.Tensor, b: torch.Tensor) -> None:
    """GELU(x + b) written over x, (k, v, h) + (k, h), the committed compiled pass's arithmetic."""
    x.copy_(F.gelu(x + b.unsqueeze(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", default="2,4,8")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    z, w1, b1, w2 = projector_tensors(dev)
    hidden = torch.compile(functools.partial(projector_hidden, gelu="exact"), dynamic=False)
    a = torch.empty(C, V, H, device=dev, dtype=dt)
    rows = torch.empty(C, V, H, device=dev, dtype=dt)

    def committed(w2_too: bool):
        x = hidden(z, w1, b1)
        if w2_too:
            torch.bmm(x, w2.transpose(1, 2), out=rows)
        return x

    def chunked(k: int, w2_too: bool):
        for s in range(0, C, k):
            torch.bmm(z.expand(k, -1, -1), w1[s:s + k].transpose(1, 2), out=a[s:s + k])
            bias_gelu_(a[s:s + k], b1[s:s + k])
        if w2_too:
            torch.bmm(a, w2.transpose(1, 2), out=rows)
        return a

    variants = {"committed": committed, **{f"chunks of {k}": functools.partial(chunked, k)
                                           for k in map(int, args.chunks.split(","))}}
    graphs, outs = {}, {}
    with preferred_blas("cublaslt"), torch.no_grad():
        for name, fn in variants.items():
            for w2_too in (False, True):
                key = f"{name}{', then linear_2' if w2_too else ''}"
                graphs[key], out = capture_graph(functools.partial(fn, w2_too))
                graphs[key].replay()
                torch.cuda.synchronize()
                outs[key] = (rows if w2_too else out).clone()
    ref = {False: outs["committed"], True: outs["committed, then linear_2"]}
    timed = interleaved({k: (lambda i=0, g=graph: g.replay()) for k, graph in graphs.items()}, dev, args.rounds, 10)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "us": {}, "round_us": {},
                 "max_abs_diff": {}}
    for key, row in timed.items():
        res["us"][key] = round(row["ms"] * 1e3, 1)
        res["round_us"][key] = [round(x * 1e3, 1) for x in row["round_ms"]]
        res["max_abs_diff"][key] = float((outs[key].float() - ref[key.endswith("linear_2")].float()).abs().max())
        print(f"{key:<34} {res['us'][key]:8.1f} us  max |diff| {res['max_abs_diff'][key]:.3g}", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
