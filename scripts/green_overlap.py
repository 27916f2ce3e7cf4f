"""Does confining SAISA's visual path to part of the GPU let it overlap the memory-bound text layers?

Batch-1 prefill at the paper's shapes (Vicuna-7B + CLIP-L/336, bf16, t text tokens): the visual K/V (compute-bound)
run on the model's side stream; here that stream is a CUDA green context's stream limited to N SMs, so the text
layers' GEMMs (memory-bound) keep the other SMs. Times the CUDA-graph prefill and the compiled eager forward for
several N against the ordinary side stream, and checks every output against the first. Prints a table, writes JSON.

    PYTHONPATH=src python3 scripts/green_overlap.py --out $OUT/green.json [--t 64] [--sms 32,48,64,80,96]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saisa.bench.setting import PRESETS
from saisa.bench.systems import build_ours, make_inputs
from saisa.bench.timing import time_fn
from saisa.model.graphs import GraphedForward

_CONTEXTS = []  # a green context must outlive its stream ("context is destroyed" otherwise)


def green_stream(num_sms: int) -> torch.cuda.Stream:
    from torch.cuda.green_contexts import GreenContext

    ctx = GreenContext.create(num_sms=num_sms, device_id=torch.cuda.current_device())
    _CONTEXTS.append(ctx)
    return ctx.Stream()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--t", type=int, default=64)
    ap.add_argument("--sms", default="32,48,64,80,96")
    ap.add_argument("--chunks", default="1,2")
    args = ap.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    model = build_ours(PRESETS["paper"], "saisa", device)
    s = make_inputs(PRESETS["paper"], 1, args.t, device)[0]
    results = {"device": props.name, "sms": props.multi_processor_count, "t": args.t, "torch": torch.__version__,
               "rows": []}
    reference = None
    for chunk in [int(c) for c in args.chunks.split(",")]:
        for sms in [None, *[int(n) for n in args.sms.split(",")]]:
            row = {"chunk": chunk, "visual_sms": sms or "all (plain side stream)"}
            try:
                model.optimize_for_inference(fold=True, chunk=chunk, overlap=True, compile=True)
                if sms is not None:
                    model._visual_stream = green_stream(sms)
                with torch.no_grad():
                    row["compiled_eager_ms"] = time_fn(
                        lambda i: model(input_ids=s.ids, image_features=s.features, logits_to_keep=1), device,
                        warmup=5, repeats=20).median_ms
                    t0 = time.perf_counter()
                    graphed = GraphedForward(model, s.ids, None, s.features, logits_to_keep=1)
                    row["build_s"] = time.perf_counter() - t0
                    row["graph_ms"] = time_fn(lambda i, g=graphed: g(s.features), device, warmup=5,
                                              repeats=50).median_ms
                    out = graphed(s.features).float().clone()
                if reference is None:
                    reference = out
                row["rel_err_vs_first"] = float((out - reference).norm() / reference.norm())
                del graphed
            except Exception as err:  # noqa: BLE001 - a setting that cannot run is reported, not fatal
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            torch.cuda.empty_cache()
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
