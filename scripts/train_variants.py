"""Training step time and peak memory, saisa vs llava, per loss / recompute / compile variant, on the GPU.

The benchmark suite's training entries (saisa.bench: paper preset, `Suite.train`'s step, timing and peak memory), run
under variants of the stage-2 step (Qwen2-1.5B shape, micro-batch 16, 192 text tokens, everything but the vision
tower trained):
- logits: the loss through the full (B, L, vocab) logits (forward with skip_logits=False);
- chunked: the defaults: the chunked training loss (saisa.model.loss, no full logits) and, for saisa, all layers'
  visual K/V in one autograd Function that keeps Z and recomputes the projector MLPs in backward
  (model.fused_visual_kv, saisa.model.visual_grad);
- chunked-small, chunked-big: saisa's chunked under other loss sizes (LOSS_SIZES: logits per fp32 log-softmax
  chunk and per gradient slab), against llava's chunked entry;
- saved: chunked, saisa's visual path through autograd, which keeps every layer's visual activations
  (fused_visual_kv off: the default before the Function; llava has no such path);
- recompute: chunked + saisa's per-layer visual K/V recomputed in backward under per-layer checkpoints
  (model.visual_recompute; llava has none);
- compile: chunked + the trainer's `torch.compile` (saisa.train.parallel.apply_compile: FFNs and projector);
  a failure is recorded as the entry's error, not raised.
Then stage 1 at the 7B shape (LLM frozen, projector trained) for the default variant; the loss alone (forward +
backward at stage 2's rows, hidden states given: the logits path and each chunked size, time and peak memory, for
saisa's text rows and llava's text + visual rows); and a torch.profiler table of one default stage-2 step per system
(scripts/profile_train.py), and of saisa's logits variant. Prints a table with the saisa / llava ratios of the
issue's targets (samples/s >= 2x, peak <= 0.5x; saisa's saved, recompute and loss-size variants against llava's
chunked one) and the loss-alone table; writes JSON.

Unusual here: one model per architecture serves all stage-2 variants (the logits variant shadows the instance's
forward; compile, which changes the modules, runs last), and the suite's time budget skips what would run past it.

    PYTHONPATH=src python3 scripts/train_variants.py --out $OUT/train-variants.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
from dataclasses import asdict, replace
from typing import Any

import profile_train  # scripts/: the torch.profiler table of one step
import torch
import torch._dynamo
from torch import nn

from saisa.bench.setting import PRESETS, Repeats, Setting
from saisa.bench.suite import Suite
from saisa.bench.systems import build_ours
from saisa.bench.timing import (
    PeakMemory,
    environment,
    free_memory,
    measure_ceilings,
    time_fn,
)
from saisa.model import loss as loss_module
from saisa.model.modeling import SaisaForConditionalGeneration
from saisa.train.parallel import apply_compile

VARIANTS = ("logits", "chunked", "chunked-small", "chunked-big", "saved", "recompute", "compile")
# (logits per fp32 log-softmax chunk, logits per gradient slab); None: loss.CHUNK_ELEMENTS / SLAB_ELEMENTS. At stage 2
# (3056 rows x 151936, one slab: a 0.93 GB bf16 buffer) the loss's peak is the buffer + 8 bytes per chunk logit:
# default 7 chunks of 437 rows (~1.45 GB); small: 14 of 219 (~1.2 GB, the previous version's); big: 4 of 764 (~1.9 GB).
LOSS_SIZES = {"chunked": (None, None), "chunked-small": (2**25, None), "chunked-big": (2**27, None)}
VISUAL_AUTOGRAD = {"saved", "recompute"}  # saisa's visual path outside the fused Function
SAISA_ONLY = VISUAL_AUTOGRAD | {"chunked-small", "chunked-big"}  # compared with llava's chunked entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per entry (median reported)")
    ap.add_argument("--top", type=int, default=12, help="kernels in each profiler table (0: no profile)")
    ap.add_argument("--no-stage1", action="store_true", help="skip stage 1 at the 7B shape")
    ap.add_argument("--no-loss", action="store_true", help="skip the loss-alone timings")
    ap.add_argument("--budget-s", type=float, default=300, help="entries starting after this many seconds are skipped")
    ap.add_argument("--preset", default="paper", help="bench preset ('tiny' + --device cpu: a smoke run)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")

    setting, device = PRESETS[args.preset], torch.device(args.device)
    dtype = getattr(torch, setting.dtype)
    ceilings = measure_ceilings(device, dtype, warmup=2, repeats=5)
    suite = Suite(setting, device, Repeats(train_warmup=2, train_repeats=args.repeats), ceilings,
                  budget_s=args.budget_s)
    results: dict[str, Any] = {"environment": environment(device, dtype), "setting": asdict(setting),
                               "ceilings": ceilings.as_dict(), "entries": suite.entries}

    # ------------------------------------------------------------------------------------------------- stage 2
    for arch in ("saisa", "llava"):
        model = build_ours(setting, arch, device, text_config=setting.train_text_config, seed=2)
        for variant in variants:
            if variant in SAISA_ONLY and arch != "saisa":
                continue
            run_variant(suite, setting, arch, model, variant)
        del model
        torch._dynamo.reset()
        free_memory(device)

    # ------------------------------------------------------------------------------------------------- stage 1
    if not args.no_stage1:
        suite.setting = setting
        saisa = build_ours(setting, "saisa", device, projector_sharing="shared")
        llava = build_ours(setting, "llava", device, donor=saisa)  # borrows the 7B LLM, lm_head and tower
        for arch, model in (("saisa", saisa), ("llava", llava)):
            suite.train(1, arch, model, setting.text_config)
            suite.entries[-1]["variant"] = "chunked"
        del saisa, llava, model
        free_memory(device)

    # ------------------------------------------------------------------------------------------------- loss alone
    results["loss_only"] = []
    if not args.no_loss and not suite.over_budget():
        try:
            results["loss_only"] = loss_only(setting, device, args.repeats)
        except Exception as err:  # noqa: BLE001 - the step timings above are what matter
            results["loss_only"] = [{"error": f"{type(err).__name__}: {str(err)[:300]}"}]
        free_memory(device)

    # ------------------------------------------------------------------------------------------------- profile
    results["profile"] = {}
    if args.top and device.type == "cuda" and not suite.over_budget():
        for name in ("saisa", "saisa-logits", "llava"):  # saisa-logits: where the logits path's step time goes
            print(f"-- profile: {name}", flush=True)
            try:
                with logits_loss(name.endswith("-logits")):
                    results["profile"][name] = profile_train.profile_one(name.split("-")[0], setting, device,
                                                                         args.top)
            except Exception as err:  # noqa: BLE001 - the timings above are what matter
                results["profile"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            free_memory(device)

    results["summary"] = summary(suite.entries)
    results["wall_s"] = round(time.perf_counter() - suite._t0, 1)
    print_table(suite.entries, results["summary"])
    print_loss_table(results["loss_only"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(json.dumps({"summary": results["summary"], "wall_s": results["wall_s"]}))


def run_variant(suite: Suite, setting: Setting, arch: str, model: torch.nn.Module, variant: str) -> None:
    """One stage-2 entry of `model` under `variant`, labelled with it; the model is left as it was (but compiled)."""
    s = suite.setting = replace(setting, train_visual_recompute=variant == "recompute",
                                train_fused_visual_kv=variant not in VISUAL_AUTOGRAD)
    reps, sizes = suite.reps, (loss_module.CHUNK_ELEMENTS, loss_module.SLAB_ELEMENTS)
    chunk, slab = LOSS_SIZES.get(variant, (None, None))
    loss_module.CHUNK_ELEMENTS, loss_module.SLAB_ELEMENTS = chunk or sizes[0], slab or sizes[1]
    if variant == "logits":
        model.forward = functools.partial(type(model).forward, model, skip_logits=False)
    if variant == "compile":
        suite.reps = replace(reps, train_warmup=3)  # the first steps compile (forward, then backward)
        try:
            apply_compile(model)
        except Exception as err:  # noqa: BLE001 - recorded as the entry's error below
            suite.record({"section": "train", "system": arch, "arch": arch, "stage": 2, "variant": variant,
                          "status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"})
            return
    try:
        suite.train(2, arch, model, s.train_text_config)
    finally:
        suite.reps = reps
        loss_module.CHUNK_ELEMENTS, loss_module.SLAB_ELEMENTS = sizes
        model.__dict__.pop("forward", None)
    suite.entries[-1]["variant"] = variant
    if variant != "logits":  # logits per log-softmax chunk and per gradient slab
        suite.entries[-1]["loss_sizes"] = [chunk or sizes[0], slab or sizes[1]]
    if variant == "logits" and "loss" in suite.entries[-1]:
        suite.entries[-1]["loss"] = "logits"


@contextlib.contextmanager
def logits_loss(on: bool):
    """While inside (when `on`), the model class's forward defaults to skip_logits=False: the loss through the full
    logits, for a step built outside this script (profile_train)."""
    forward = SaisaForConditionalGeneration.forward
    if on:
        SaisaForConditionalGeneration.forward = functools.partialmethod(forward, skip_logits=False)
    try:
        yield
    finally:
        SaisaForConditionalGeneration.forward = forward


def loss_only(setting: Setting, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Forward + backward of the loss alone at stage 2's shape (Qwen2-1.5B lm_head, micro-batch 16), hidden states
    given: the logits path (lm_head, then cross-entropy of the fp32 logits) and the chunked loss per LOSS_SIZES,
    over saisa's rows (the text: every target counted) and llava's (text + visual: the visual rows ignored)."""
    cfg, vision = setting.train_text_config, setting.vision_config
    h, vocab, batch, t = cfg["hidden_size"], cfg["vocab_size"], setting.train_batch, setting.train_text_tokens
    v = (vision["image_size"] // vision["patch_size"]) ** 2
    dtype = getattr(torch, setting.dtype)
    head = nn.Linear(h, vocab, bias=False, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict[str, Any]] = []
    for arch, length in (("saisa", t), ("llava", t + v)):
        hidden = torch.randn(batch, length, h, device=device, dtype=dtype, generator=gen).requires_grad_()
        target = torch.randint(0, vocab, (batch, length - 1), device=device, generator=gen)
        if arch == "llava":
            target[:, setting.image_at - 1:setting.image_at + v - 1] = loss_module.IGNORE_INDEX
        n = batch * (length - 1)
        for name, sizes in (("logits", None), *LOSS_SIZES.items()):
            timing, mem = time_loss(head, hidden, target, sizes, device, repeats)
            rows.append({"arch": arch, "loss": name, "rows": n, "counted": int((target >= 0).sum()),
                         "median_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                         "peak_extra_mb": None if mem.extra_mb is None else round(mem.extra_mb, 1),
                         "gemm_tflop": 3 * 2 * n * vocab * h / 1e12, "sizes": sizes})
    return rows


def time_loss(head: nn.Linear, hidden: torch.Tensor, target: torch.Tensor, sizes: tuple[int | None, int | None] | None,
              device: torch.device, repeats: int):
    """Timing and peak memory of one loss's forward + backward; sizes None: the logits path, else the chunked loss
    with (chunk_elements, slab_elements)."""
    def step(i):
        hidden.grad = head.weight.grad = None
        if sizes is None:
            loss = loss_module.logits_cross_entropy(head(hidden), target)
        else:
            loss = loss_module.linear_cross_entropy(hidden[:, :-1], head, target, *sizes)
        loss.backward()

    free_memory(device, collect=False)
    with PeakMemory(device) as mem:
        timing = time_fn(step, device, warmup=2, repeats=repeats)
    hidden.grad = head.weight.grad = None
    return timing, mem


def print_loss_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    print(f"\nloss alone: forward + backward, hidden states given\n{'arch':>6} {'loss':>14} {'rows':>6} "
          f"{'median ms':>10} {'p10-p90 ms':>14} {'peak extra MiB':>15}")
    for r in rows:
        if "error" in r:
            print(f"  error: {r['error']}")
            continue
        spread = f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}"
        peak = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        print(f"{r['arch']:>6} {r['loss']:>14} {r['rows']:>6} {r['median_ms']:>10.2f} {spread:>14} {peak:>15}")


def summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """saisa / llava per stage and variant: samples/s ratio (target >= 2) and peak-memory ratio (target <= 0.5)."""
    ok = {(e["stage"], e["arch"], e.get("variant")): e for e in entries if e.get("status") == "ok"}
    rows = []
    for (stage, arch, variant), ours in ok.items():
        if arch != "saisa":
            continue
        ref = ok.get((stage, "llava", "chunked" if variant in SAISA_ONLY else variant))
        if ref is None:
            continue
        speed = ours["samples_per_s"] / ref["samples_per_s"]
        memory = ours["peak_mb"] / ref["peak_mb"] if ours.get("peak_mb") and ref.get("peak_mb") else None  # CUDA only
        rows.append({"stage": stage, "variant": variant, "llava_variant": ref.get("variant"), "speed_ratio": speed,
                     "memory_ratio": memory, "speed_target_met": speed >= 2.0,
                     "memory_target_met": None if memory is None else memory <= 0.5})
    return rows


def print_table(entries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    print(f"\n{'stage':>5} {'variant':>10} {'arch':>6} {'status':>7} {'median ms':>10} {'p10-p90 ms':>14} "
          f"{'samples/s':>10} {'peak MiB':>9}")
    for e in entries:
        if e.get("section") != "train":
            continue
        spread = f"{e['p10_ms']:.1f}-{e['p90_ms']:.1f}" if "p10_ms" in e else "-"
        print(f"{e['stage']:>5} {e.get('variant', '-'):>10} {e['arch']:>6} {e['status']:>7} "
              f"{e.get('median_ms', float('nan')):>10.1f} {spread:>14} {e.get('samples_per_s', float('nan')):>10.2f} "
              f"{e.get('peak_mb', float('nan')):>9.0f}" + (f"  {e['error']}" if e.get("error") else ""))
    print(f"\n{'stage':>5} {'saisa':>10} {'llava':>10} {'speed x':>8} {'memory x':>9}  targets: speed >= 2, memory <= 0.5")
    for r in rows:
        mem = f"{r['memory_ratio']:.3f}" if r["memory_ratio"] is not None else "-"
        met = {True: "met", False: "missed", None: "-"}
        print(f"{r['stage']:>5} {r['variant']:>10} {r['llava_variant']:>10} {r['speed_ratio']:>8.3f} {mem:>9}"
              f"  {met[r['speed_target_met']]} / {met[r['memory_target_met']]}")


if __name__ == "__main__":
    main()
