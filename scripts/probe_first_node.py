"""Probe: from the bench's call to the t=64 prefill's first kernel, where do the 40-75 us go?

Unusual here: in session 17, GraphedForward's first node, graphs.read_from_slot, read the features' address from
pinned host memory in every one of its 288 programs (a `.cv` load through unified addressing), and that session's
probe put the forward's first kernel 39-49 us after the call's start event against 21 us with the old copy
(graph-launch-h100-s17-*.json). Since session 18 one program fetches the word and the copy reads it on the device.
Section `slot` captures the prefill (bench setting, serial schedule) with events as the graph's first node, after
the read and after the forward, for the committed read and other forms of it, and times calls as the bench does
(synchronize, start event, call, end event) in interleaved rounds. Section `fork` asks whether side-stream branches
(the rows' 1 / RMS beside each k/v GEMM: 32 fork/join pairs on a priority-0 stream inside a priority -1 capture)
slow a graph's launch, with small graphs.

    PYTHONPATH=src python3 scripts/probe_first_node.py --sections slot,fork --out $OUT/first-node.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe_graph_launch import launch_cost
from probe_w2_gap import _marked

from saisa.bench.timing import summarize
from saisa.model import graphs, skinny


@functools.cache
def _kernels():
    triton, tl = skinny.triton_modules()

    @triton.jit
    def per_program_kernel(slot_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        src = tl.load(slot_ptr, cache_modifier=".cv").to(tl.pointer_type(dst_ptr.dtype.element_ty))
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        tl.store(dst_ptr + offs, tl.load(src + offs, mask=keep), mask=keep)

    _, fetch, copy = graphs._slot_kernels()
    return triton, per_program_kernel, fetch, copy


def per_program_read(slot, dst, done, word=None, block: int = 4096) -> None:
    """Session 17's read_from_slot: each of the copy's programs reads the host word itself."""
    triton, per_program, _, _ = _kernels()
    per_program[(triton.cdiv(dst.numel(), block),)](slot, dst, dst.numel(), BLOCK=block, num_warps=4)
    done.record()


def memcpy_then_copy(slot, dst, done, word, block: int = 4096) -> None:
    """The host word copied to the device by a memcpy node (pinned source), then the copy kernel."""
    triton, _, _, copy = _kernels()
    word.copy_(slot, non_blocking=True)
    copy[(triton.cdiv(dst.numel(), block),)](word, dst, dst.numel(), BLOCK=block, num_warps=4)
    done.record()


READS = {
    "host word per program, 288 programs (session 17)": per_program_read,
    "host word per program, 18 programs": functools.partial(per_program_read, block=65536),
    "one program fetches the word, then the copy (graphs.read_from_slot)": graphs.read_from_slot,
    "memcpy node fetches the word, then the copy": memcpy_then_copy,
    "no slot: copy_ into the static buffer before the replay": None,
}


def slot_section(rounds: int) -> dict:
    from saisa.bench.setting import PRESETS
    from saisa.bench.systems import SAISA_SCHEDULES, build_ours, make_inputs

    setting = PRESETS["paper"]
    dev = torch.device("cuda")
    model = build_ours(setting, "saisa", dev)
    sets = make_inputs(setting, 1, 64, dev)
    model.optimize_for_inference(compile=True, dynamic=False, **SAISA_SCHEDULES["serial"])
    forward = type(model).forward_with_layout.__get__(model)
    built, marks = {}, {}
    committed_read, committed_available = graphs.read_from_slot, skinny.available
    for name, read in READS.items():
        m = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(3)]
        model.forward_with_layout = _marked(forward, m, 1, 2)  # after the read, after the forward
        if read is None:
            skinny.available = lambda: False  # GraphedForward's test for the slot (read at construction only)
        else:
            def marked_read(slot, dst, done, word, read=read, first=m[0]):
                first.record()  # the graph's first node
                read(slot, dst, done, word)
            graphs.read_from_slot = marked_read
        try:
            with torch.no_grad():
                built[name] = graphs.GraphedForward(model, sets[0].ids, None, sets[0].features, logits_to_keep=1)
        finally:
            graphs.read_from_slot, skinny.available = committed_read, committed_available
            model.__dict__.pop("forward_with_layout", None)
        marks[name] = m
    keys = ("total", "to_first_node", "read", "forward", "after_forward", "host_call")
    got = {n: {k: [] for k in keys} for n in built}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.no_grad():
        for _ in range(rounds):
            for name, graphed in built.items():
                m, g = marks[name], got[name]
                for i in range(23):
                    s = sets[i % len(sets)]
                    torch.cuda.synchronize()
                    start.record()
                    t0 = time.perf_counter()
                    graphed(s.features)
                    t1 = time.perf_counter()
                    end.record()
                    torch.cuda.synchronize()
                    if i < 3:
                        continue
                    g["total"].append(start.elapsed_time(end))
                    g["host_call"].append((t1 - t0) * 1e3)
                    first = m[0] if READS[name] is not None else m[1]
                    g["to_first_node"].append(start.elapsed_time(first))
                    g["read"].append(first.elapsed_time(m[1]))
                    g["forward"].append(m[1].elapsed_time(m[2]))
                    g["after_forward"].append(m[2].elapsed_time(end))
    # Correctness of each form: the logits of the last set, against the committed read's.
    ref = None
    out: dict = {}
    with torch.no_grad():
        for name, graphed in built.items():
            logits = graphed(sets[-1].features).float().clone()
            torch.cuda.synchronize()
            ref = logits if ref is None else ref
            row = {k: round(summarize(v, 3, "cuda_event").median_ms * 1e3, 1) for k, v in got[name].items()}
            row["total_ms"] = round(statistics.median(got[name]["total"]), 4)
            row["total_p10_p90_ms"] = [round(summarize(got[name]["total"], 3, "cuda_event").p10_ms, 4),
                                       round(summarize(got[name]["total"], 3, "cuda_event").p90_ms, 4)]
            # The forward is not bitwise repeatable (fp32 atomics for the rows' sums of squares): a relative
            # difference to the first form's logits, not equality (session 18's file has `equal_to_committed`).
            row["rel_diff_to_first"] = round(float((logits - ref).norm() / ref.norm()), 5)
            out[name] = row
            print(f"{name:<58} total {row['total_ms']:.4f} ms  to first node {row['to_first_node']:6.1f} us  "
                  f"read {row['read']:6.1f} us  forward {row['forward']:8.1f} us  after {row['after_forward']:5.1f} us"
                  f"  host {row['host_call']:5.1f} us  rel diff {row['rel_diff_to_first']}", flush=True)
    return {"us_medians_except_total_ms": out}


def fork_section() -> dict:
    """32 x (a Triton kernel as a programmatic dependent on the capture stream; then, on a side stream or inline, an
    aten add_), captured on a priority -1 stream: the side stream's priority 0 (as modeling's rstd_stream), -1, or
    no side stream at all."""
    x = torch.zeros(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(16, 4096, device="cuda", dtype=torch.bfloat16)
    tiles = skinny.RESIDUAL._replace(prefetch=4)
    res = {}
    for name, side_priority in (("inline", None), ("side stream, priority 0", 0), ("side stream, priority -1", -1)):
        side = None if side_priority is None else torch.cuda.Stream(priority=side_priority)

        def body(side=side):
            skinny.linear(x, w, tiles, pdl=True)
            if side is None:
                y.add_(1.0)
                return
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                y.add_(1.0)
            torch.cuda.current_stream().wait_stream(side)

        first = torch.cuda.Event(enable_timing=True, external=True)
        body()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with graphs.capturing(g, torch.cuda.Stream(priority=-1)):
            first.record()
            for _ in range(32):
                body()
        res[name] = launch_cost(g.replay, first)
        print(f"fork: {name:<28} host {res[name]['host_us']:6.1f} us  to first node {res[name]['to_first_node_us']:6.1f}"
              " us", flush=True)
        del g
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="slot,fork")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for section in args.sections.split(","):
        out[section] = slot_section(args.rounds) if section == "slot" else fork_section()
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
