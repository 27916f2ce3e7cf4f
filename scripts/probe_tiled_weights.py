"""Probe: do the batch-1 text GEMMs stream faster from a weight laid out in the order the kernel reads it?

Unusual here: skinny's kernels give each program 32 rows of W and step along K 128 columns at a time, so every step
reads 32 pieces of 256 bytes, each from a different 8 KB row (q/o_proj: 2.2-2.5 TB/s of a 3.0 TB/s copy). Here the
same loop reads W pre-tiled as (N / BN, K / BK, BN, BK), so each step is one contiguous BN x BK block; and, on the
usual layout, with the weight loads marked evict_first (the 64 text rows, read by every program, stay in L2). Each
variant runs as a CUDA graph of 32 calls on 32 distinct weights (none found in L2), in interleaved rounds, and is
checked against x @ W^T first.

    PYTHONPATH=src python3 scripts/probe_tiled_weights.py --out $OUT/tiled.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_skinny import copy_tbps, graph_us

from saisa.model import skinny

SHAPES = {"q_proj / o_proj": (4096, 4096, 64), "down_proj": (4096, 11008, 64),
          "lm_head (last row)": (32000, 4096, 1)}  # (N, K, rows)


@functools.cache
def _kernel():
    triton, tl = skinny.triton_modules()

    @triton.jit
    def kernel(x_ptr, w_ptr, y_ptr, M, K, stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, TILED: tl.constexpr, EVICT: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows = offs_m[:, None] < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        if TILED:  # this program's (K / BK) blocks of (BN, BK), one after the other
            w_ptrs = w_ptr + pid.to(tl.int64) * BLOCK_N * K + tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + offs_k[None, :]
            step = BLOCK_N * BLOCK_K
        else:
            w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
            step = BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            if EVICT:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs)
            acc = tl.dot(tl.load(x_ptrs, mask=rows, other=0.0), tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += step
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=rows)

    return triton, kernel


def tiled(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = w.shape
    return w.view(n // bn, bn, k // bk, bk).permute(0, 2, 1, 3).contiguous()


def run(x, w, y, bn, bk, stages, warps, is_tiled, evict):
    triton, kernel = _kernel()
    m, k = x.shape
    n = y.shape[1]
    kernel[(n // bn,)](x, w, y, m, k, x.stride(0), y.stride(0), BLOCK_M=max(16, triton.next_power_of_2(m)),
                       BLOCK_N=bn, BLOCK_K=bk, TILED=is_tiled, EVICT=evict, num_stages=stages, num_warps=warps)
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    dev = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "copy_tb_per_s": round(copy_tbps(), 3), "layers": args.layers, "shapes": {}}
    print(f"copy {out['copy_tb_per_s']} TB/s", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    t = skinny.RESIDUAL
    variants = {  # name -> (block_n, block_k, stages, warps, tiled, evict_first)
        "cuBLAS (torch.mm)": "aten",
        "skinny.linear (RESIDUAL tiles)": None,
        "skinny.linear, tiled (skinny.tile)": "tiled",
        "same loop, usual layout": (t.block_n, t.block_k, t.stages, t.warps, False, False),
        "usual layout, W evict_first": (t.block_n, t.block_k, t.stages, t.warps, False, True),
        "tiled 32x128": (32, 128, t.stages, t.warps, True, False),
        "tiled 32x128, evict_first": (32, 128, t.stages, t.warps, True, True),
        "tiled 32x256, 4 stages": (32, 256, 4, 4, True, False),
        "tiled 32x64, 8 stages": (32, 64, 8, 4, True, False),
    }
    for shape in args.shapes.split(","):
        n, k, m = SHAPES[shape]
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * k ** -0.5
              for _ in range(args.layers)]
        y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        ref = (x.float() @ ws[0].float().T)
        laid: dict = {}
        calls: dict = {}
        checks: dict = {}
        for name, v in variants.items():
            if v == "aten":
                calls[name] = [functools.partial(torch.mm, x, w.t(), out=y) for w in ws]
            elif v == "tiled":
                if "skinny" not in laid:
                    laid["skinny"] = [skinny.tile(w, t) for w in ws]
                calls[name] = [functools.partial(skinny.linear, x, w, t, out=y) for w in laid["skinny"]]
            elif v is None:
                calls[name] = [functools.partial(skinny.linear, x, w, t, out=y) for w in ws]
            else:
                bn, bk, stages, warps, is_tiled, evict = v
                if is_tiled and (bn, bk) not in laid:
                    laid[(bn, bk)] = [tiled(w, bn, bk) for w in ws]
                src = laid[(bn, bk)] if is_tiled else ws
                calls[name] = [functools.partial(run, x, w, y, bn, bk, stages, warps, is_tiled, evict) for w in src]
            calls[name][0]()
            torch.cuda.synchronize()
            checks[name] = round(float((y.float() - ref).norm() / ref.norm()), 5)
        times: dict = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, c in calls.items():
                times[name].append(graph_us(c))
        weight_bytes = n * k * 2
        res = {}
        for name in calls:
            us = statistics.median(times[name])
            res[name] = {"us": round(us, 2), "tb_per_s": round(weight_bytes / (us * 1e-6) / 1e12, 3),
                         "rounds_us": [round(u, 2) for u in times[name]], "rel_err": checks[name]}
            print(f"{shape:<18} {name:<34} {us:7.2f} us  {res[name]['tb_per_s']:.3f} TB/s  rel_err {checks[name]}",
                  flush=True)
        out["shapes"][shape] = res
        Path(args.out).write_text(json.dumps(out, indent=1))
        del laid, ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
