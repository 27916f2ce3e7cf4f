"""Benchmark sweeps: saisa, naavit and our llava next to HF LLaVA, at the paper's 7B shape, each figure beside its floor.

Unusual here:
- The systems (`saisa.bench.systems`) share one set of 7B weights; the settings and the FLOPs / bytes of a floor are
  in `saisa.bench.setting`. This module runs the sections over them and records every entry.
- Every entry stores its floor, max(FLOPs / measured matmul rate, bytes / measured copy bandwidth), FLOPs from
  `saisa.flops` (LLM + projector) plus the lm_head rows and, where it runs, the vision tower.
- Each entry runs under its own OOM guard and frees its inputs, caches and graphs before the next; a time budget
  turns entries past it into "skipped", so a device call always ends with results. Decode times all systems in
  rounds, so a slow spell of the host falls on all of them alike.
- On CUDA nvidia-smi samples the GPU while the inference sections run, and each prefill, ttft and throughput entry
  gets the SM clock and board power of its timed window (`power`, saisa.bench.power): an H100 at its 700 W limit
  lowers the clock, so one graph times slower the longer the GPU has been busy.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from saisa.flops import FLOPS_FUNCTIONS, lm_head_flops
from saisa.model.loss import fusable
from saisa.model.visual_grad import supports_visual_function
from saisa.train.graphed import GraphedTrainStep

from .power import PowerTrace
from .setting import (
    Repeats,
    Setting,
    decode_flops,
    kv_bytes,
    llm_spec,
    vision_spec,
    vision_tower_flops,
)
from .systems import System, build_ours, make_inputs, make_systems
from .timing import (
    MIB,
    Ceilings,
    PeakMemory,
    environment,
    free_memory,
    is_cuda,
    measure_ceilings,
    summarize,
    tensor_bytes,
    time_fn,
)

SECTIONS = ("prefill", "ttft", "throughput", "decode", "train")


# ----------------------------------------------------------------------------------------------------- the suite
@dataclass
class Suite:
    setting: Setting
    device: torch.device
    reps: Repeats
    ceilings: Ceilings
    budget_s: float | None = None
    log: Callable[[str], None] = print
    entries: list[dict[str, Any]] = field(default_factory=list)
    systems: dict[str, System] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # last-position prefill logits, first shape
    windows: list[tuple[dict[str, Any], float, float]] = field(default_factory=list)  # (entry, time.time() span)
    _t0: float = field(default_factory=time.perf_counter)

    @property
    def element(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.setting.dtype)).element_size()

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self._t0 > self.budget_s

    def record(self, entry: dict[str, Any], timing=None, flops: float = 0, nbytes: float = 0,
               mem: PeakMemory | None = None, own_bytes: int = 0) -> dict[str, Any]:
        if timing is not None:
            entry.update(timing.as_dict())
            floor, bound = self.ceilings.floor_ms(flops, nbytes)
            entry.update(flops=flops, bytes=nbytes, floor_ms=floor, bound=bound,
                         over_floor=timing.median_ms / floor if floor else None)
        if mem is not None and mem.extra_mb is not None:
            entry.update(peak_extra_mb=round(mem.extra_mb, 1), peak_mb=round(own_bytes / MIB + mem.extra_mb, 1))
        self.entries.append(entry)
        shown = f"{entry['median_ms']:.2f} ms" if "median_ms" in entry else entry.get("error", "")
        label = entry["system"] + (f" {entry['method']}" if entry["section"] == "train" else "")
        self.log(f"[{time.perf_counter() - self._t0:6.1f}s] {entry['section']:<10} {label:<18} "
                 f"b={entry.get('batch')} t={entry.get('text_tokens')} {entry['status']}: {shown}")
        return entry

    def guarded(self, entry: dict[str, Any], body: Callable[[dict[str, Any]], None], cleanup: Callable[[], None]):
        """Run `body(entry)`; an OOM, a missing path or any error becomes the entry's status; always clean up."""
        if self.over_budget():
            self.record({**entry, "status": "skipped", "error": "time budget spent"})
            return
        failed = True
        try:
            body(entry)
            failed = False
        except NotImplementedError as err:
            self.record({**entry, "status": "n/a", "error": str(err)[:300]})
        except torch.OutOfMemoryError:
            self.record({**entry, "status": "oom"})
        except Exception as err:  # noqa: BLE001 - one failing configuration must not end the suite
            self.record({**entry, "status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"})
        finally:
            cleanup()
            free_memory(self.device, collect=failed)  # a traceback may hold tensors in cycles

    # -- inference sections
    def inference(self, section: str, system: System, batch: int, t: int) -> None:
        """prefill, ttft or throughput of one system (decode: `decode_interleaved`)."""
        if section not in ("prefill", "ttft", "throughput"):
            raise ValueError(f"Suite.inference times prefill, ttft and throughput, not {section!r}")
        s, spec, vspec = self.setting, llm_spec(self.setting.text_config), vision_spec(self.setting.vision_config)
        entry = {"section": section, "system": system.name, "arch": system.arch, "batch": batch, "text_tokens": t}

        def body(entry):
            sets = make_inputs(s, batch, t, self.device, seed=batch * 1000 + t)
            with PeakMemory(self.device) as mem, torch.no_grad():
                system.prepare(batch, t, sets)
                fn = system.ttft if section == "ttft" else system.prefill
                repeats = self.reps.throughput_repeats if section == "throughput" else self.reps.repeats
                started = time.time()
                timing = time_fn(lambda i: fn(), self.device, warmup=self.reps.warmup, repeats=repeats)
                self.windows.append((entry, started, time.time()))
                if section == "prefill" and (batch, t) == (1, s.text_tokens[0]):
                    system._k = 0  # the first input set, for the cross-system check
                    self.logits[system.name] = system.prefill()[:, -1].float().clone()
            entry.update(status="ok", method=system.method, **system.entry_info())
            f = FLOPS_FUNCTIONS[system.arch](spec, vspec, t)
            flops = batch * f.total + lm_head_flops(spec, batch)
            nbytes = (system.llm_bytes() + kv_bytes(spec, vspec.num_tokens + t, batch, self.element)
                      + sets[0].features.numel() * self.element)
            if section == "ttft":
                flops += vision_tower_flops(s.vision_config, batch)
                nbytes += tensor_bytes(system.tower().parameters()) + sets[0].pixels.numel() * self.element
            entry["samples_per_s"] = batch / (timing.median_ms * 1e-3)
            self.record(entry, timing, flops, nbytes, mem, system.own_bytes())

        self.guarded(entry, body, system.release)

    def decode_interleaved(self, systems: list[System], batch: int, t: int) -> None:
        """Decode time per token of every system, timed in rounds (one step of each system in turn) so that a slow
        spell of the host, which an eager, launch-bound decode feels at once, falls on all of them alike; the
        ratios between systems are what the targets read. Peak memory: each system's own start and warm-up."""
        s, spec, vspec = self.setting, llm_spec(self.setting.text_config), vision_spec(self.setting.vision_config)
        context = vspec.num_tokens + t
        started: list[tuple[System, dict[str, Any], PeakMemory]] = []
        for system in systems:
            entry = {"section": "decode", "system": system.name, "arch": system.arch, "batch": batch,
                     "text_tokens": t, "context": context}
            if self.over_budget():
                self.record({**entry, "status": "skipped", "error": "time budget spent"})
                continue
            try:
                with PeakMemory(self.device) as mem, torch.no_grad():
                    system.prepare(batch, t, make_inputs(s, batch, t, self.device, seed=batch * 1000 + t))
                    system.start_decode()
                    for _ in range(self.reps.warmup):
                        system.decode_step()
                started.append((system, entry, mem))
            except NotImplementedError as err:
                self.record({**entry, "status": "n/a", "error": str(err)[:300]})
                system.release()
            except Exception as err:  # noqa: BLE001 - one failing system must not end the suite
                self.record({**entry, "status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"})
                system.release()
        try:
            samples: dict[str, list[float]] = {sys_.name: [] for sys_, _, _ in started}
            cuda = is_cuda(self.device)
            with torch.no_grad():
                for _ in range(self.reps.decode_repeats):
                    for system, _, _ in started:
                        if cuda:
                            torch.cuda.synchronize(self.device)
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            system.decode_step()
                            end.record()
                            end.synchronize()
                            samples[system.name].append(start.elapsed_time(end))
                        else:
                            t0 = time.perf_counter()
                            system.decode_step()
                            samples[system.name].append((time.perf_counter() - t0) * 1e3)
            for system, entry, mem in started:
                timing = summarize(samples[system.name], self.reps.warmup, "cuda_event" if cuda else "perf_counter")
                entry.update(status="ok", method=system.method, tokens_per_s=batch / (timing.median_ms * 1e-3))
                nbytes = system.llm_bytes() + kv_bytes(spec, context + 1, batch, self.element)
                self.record(entry, timing, decode_flops(spec, context, batch), nbytes, mem, system.own_bytes())
        finally:
            for system, _, _ in started:
                system.release()
            free_memory(self.device)

    # -- training
    def train(self, stage: int, arch: str, model: nn.Module, text_config: dict[str, Any], method: str = "eager") -> None:
        """Time forward + backward + AdamW step (vision tower frozen and run every step, as in the recipe). The loss
        is the model's training loss, chunked through the lm_head without the full logits (saisa.model.loss).
        method: "eager" (fused AdamW) or "cuda_graph" (the whole step replayed, saisa.train.graphed; CUDA only)."""
        if method not in TRAIN_METHODS:
            raise ValueError(f"unknown training method {method!r}; choose from {TRAIN_METHODS}")
        s = self.setting
        batch, t = s.train_batch, s.train_text_tokens
        spec, vspec = llm_spec(text_config), vision_spec(s.vision_config)
        recompute = s.train_visual_recompute and stage == 2 and arch == "saisa"
        fused = (s.train_fused_visual_kv and not recompute and stage == 2 and arch == "saisa"
                 and supports_visual_function(model.layers, model.multi_modal_projector))
        entry = {"section": "train", "system": arch, "arch": arch, "stage": stage, "method": method, "batch": batch,
                 "text_tokens": t, "llm": f"{spec.num_layers}x{spec.hidden_size}", "visual_recompute": recompute,
                 "fused_visual_kv": fused}
        state: dict[str, Any] = {"fused_visual_kv": getattr(model, "fused_visual_kv", True)}

        def body(entry):
            trainable = prepare_training(model, stage)
            model.visual_recompute = recompute
            model.fused_visual_kv = s.train_fused_visual_kv
            sets = make_inputs(replace(s, text_config=text_config), batch, t, self.device, seed=stage)

            with PeakMemory(self.device) as mem:
                graphed = method == "cuda_graph"
                state["opt"] = torch.optim.AdamW(trainable, lr=1e-5, fused=is_cuda(self.device), capturable=graphed)
                step = train_step(model, state["opt"], sets, graphed)
                timing = time_fn(step, self.device, warmup=self.reps.train_warmup, repeats=self.reps.train_repeats)
            f = FLOPS_FUNCTIONS[arch](spec, vspec, t)
            projector = f.projector // spec.num_layers if arch == "saisa" and stage == 1 else f.projector
            # Stage 2: forward + both gradients (3x). Stage 1, LLM frozen: forward + input gradients (2x). Both
            # approximate the backward of attention scores, so the floor stays a lower bound.
            passes = 3 if stage == 2 else 2
            flops = batch * (passes * (f.llm + projector + lm_head_flops(spec, t))
                             + vision_tower_flops(s.vision_config, 1))
            params = tensor_bytes(model.parameters())
            nbytes = 2 * params + 16 * sum(p.numel() for p in trainable)  # weights read twice; grads + AdamW
            entry.update(status="ok", samples_per_s=batch / (timing.median_ms * 1e-3),
                         trainable_params=sum(p.numel() for p in trainable),
                         loss="chunked" if fusable(model.language_model.lm_head) else "logits")
            self.record(entry, timing, flops, nbytes, mem, params)

        def cleanup():
            model.fused_visual_kv = state["fused_visual_kv"]
            state.clear()
            for p in model.parameters():
                p.grad = None
            model.requires_grad_(False)
            model.eval()
            model.visual_recompute = False

        self.guarded(entry, body, cleanup)


def prepare_training(model: nn.Module, stage: int) -> list[nn.Parameter]:
    """Put `model` in the bench's training state for `stage` (1: the projector alone trained; 2: everything but the
    vision tower) and return the trained parameters."""
    model.requires_grad_(stage == 2)
    model.multi_modal_projector.requires_grad_(True)
    model.vision_tower.requires_grad_(False)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sets: list, graphed: bool = False
               ) -> Callable[[int], None]:
    """The bench's training step on input set i mod len(sets): the model's loss, backward, optimizer step; graphed:
    the same step captured once and replayed (GraphedTrainStep; opt must be capturable)."""
    if graphed:
        replay = GraphedTrainStep(model, opt, warmup=2)

    def step(i: int) -> None:
        x = sets[i % len(sets)]
        if graphed:
            replay(input_ids=x.ids, labels=x.ids, pixel_values=x.pixels)
            return
        model(input_ids=x.ids, pixel_values=x.pixels, labels=x.ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _projection(setting: Setting, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """GPU-hours of the LLaVA-1.5 recipe from measured per-sample times (a projection, not a measured run)."""
    rate: dict[tuple[str, int], float] = {}  # each architecture's fastest training method
    for e in entries:
        if e["section"] == "train" and e["status"] == "ok":
            key = (e["arch"], e["stage"])
            rate[key] = max(rate.get(key, 0.0), e["samples_per_s"])
    out: dict[str, Any] = {
        "note": (f"projection from step times measured on this GPU: stage 1 = {setting.stage1_samples} samples at the "
                 f"stage-1 rate (7B shape, projector only), stage 2 = {setting.stage2_samples} samples at the stage-2 "
                 f"rate measured at the stage-2 shape (not 7B), micro-batch {setting.train_batch}, "
                 f"t = {setting.train_text_tokens} text tokens per sample; one GPU, no data loading"),
    }
    for arch in ("saisa", "llava"):
        if (arch, 1) in rate and (arch, 2) in rate:
            h1 = setting.stage1_samples / rate[(arch, 1)] / 3600
            h2 = setting.stage2_samples / rate[(arch, 2)] / 3600
            out[arch] = {"stage1_gpu_hours": h1, "stage2_gpu_hours": h2, "total_gpu_hours": h1 + h2}
    if "saisa" in out and "llava" in out:
        out["saisa_over_llava"] = out["saisa"]["total_gpu_hours"] / out["llava"]["total_gpu_hours"]
    return out


# Pairs that compute the same function on the same weights and inputs: (system, reference).
CHECK_PAIRS = (("hf_llava", "llava"), ("hf_llava_graphs", "hf_llava"), ("hf_llava_compile", "hf_llava"),
               ("saisa_opt", "saisa"), ("saisa_graphs", "saisa"), ("llava_graphs", "llava"))
# Relative error of bf16 last-position logits after 32 random layers: HF LLaVA vs our llava, two implementations of
# the same function, differed by 3.9e-2 on the H100 (2026-11-21); float32 lands near 1e-6 (tests/test_model.py).
CHECK_TOLERANCE = 1e-1


def _checks(logits: dict[str, torch.Tensor]) -> dict[str, Any]:
    """||a - b|| / ||b|| of the last-position prefill logits of each pair (first shape, first input set)."""
    out = {}
    for name, ref in CHECK_PAIRS:
        if name in logits and ref in logits:
            a, b = logits[name].double(), logits[ref].double()
            err = float((a - b).norm() / b.norm()) if b.norm() > 0 else float("nan")
            out[name] = {"reference": ref, "rel_err": err,
                         "pass": bool(math.isfinite(err) and err <= CHECK_TOLERANCE and torch.isfinite(a).all())}
    return out


# ----------------------------------------------------------------------------------------------------- entry point
NOTES = (
    ("prefill (paper Table 6 metric) = projector + LLM + lm_head on the last position (logits_to_keep=1, as HF "
     "generate does; HF LLaVA's forward defaults to all positions), vision features Z given; eager systems fill "
     "their KV cache (use_cache=True), graph systems keep what their method records"),
    ("HF LLaVA gets Z through its own projector and a masked_scatter splice into the sequence with the image token "
     "expanded to v positions, as LlavaModel.forward does after its vision tower"),
    "ttft = vision tower + prefill + argmax of the first token; graph systems run the tower eagerly",
    ("decode = one token per step at batch 1 over a cache filled by a prefill; the cache is cut back after each step "
     "so every step sees the same context; the systems are timed in rounds (one step of each in turn), so a slow "
     "spell of the host falls on all of them alike"),
    ("floors: FLOPs from saisa.flops (+ lm_head rows, + the vision tower up to its feature layer in ttft); bytes = "
     "weights read once (LLM layers, final norm, lm_head, projector; + tower in ttft) + KV written (prefill) or read "
     "(decode) + inputs"),
)
TRAIN_METHODS = ("eager", "cuda_graph")
INFERENCE_SYSTEMS = ("saisa", "naavit", "llava", "hf_llava", "saisa_opt", "hf_llava_graphs", "saisa_graphs",
                     "llava_graphs")


def run_suite(
    setting: Setting, *, device: str | torch.device | None = None, sections: tuple[str, ...] = SECTIONS,
    systems: tuple[str, ...] = INFERENCE_SYSTEMS, quick: bool = False, compile_hf: bool = False,
    budget_s: float | None = None, repeats: Repeats | None = None, log: Callable[[str], None] = print,
    saisa_attention: str = "auto", saisa_schedule: str = "auto",
) -> dict[str, Any]:
    """Run the sections; return the results dict (schema in saisa.bench.report). saisa_attention: the attention
    of the compiled saisa fast path (`optimize_for_inference(attention=...)`); saisa_schedule: its prefill schedule
    (systems.SAISA_SCHEDULES, or "auto": saisa_graphs times them all per shape and keeps the fastest)."""
    for kind, given, known in (("sections", sections, SECTIONS), ("systems", systems, INFERENCE_SYSTEMS)):
        if set(given) - set(known):
            raise ValueError(f"unknown {kind} {sorted(set(given) - set(known))}; choose from {known}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, setting.dtype)
    reps = repeats or (Repeats.quick() if quick else Repeats())
    t0 = time.perf_counter()
    log(f"measuring ceilings on {device} ...")
    ceilings = measure_ceilings(device, dtype, warmup=min(reps.warmup, 3), repeats=max(reps.repeats, 5))
    suite = Suite(setting, device, reps, ceilings, budget_s, log)
    results: dict[str, Any] = {
        "setting": asdict(setting), "environment": environment(device, dtype), "quick": quick,
        "sections": list(sections), "ceilings": ceilings.as_dict(), "systems": {}, "entries": suite.entries,
        "notes": NOTES,
    }
    inference = [sec for sec in sections if sec != "train"]
    log("building models ...")
    suite.systems, skipped, hf, ours = make_systems(setting, device, systems, compile_hf, saisa_attention,
                                                    saisa_schedule)
    results["systems"].update({n: {"status": "skipped", "note": why} for n, why in skipped.items()})
    shapes = {
        "prefill": [(1, t) for t in setting.text_tokens],
        "ttft": [(1, t) for t in setting.text_tokens],
        "throughput": [(b, setting.throughput_text_tokens) for b in setting.throughput_batches],
        "decode": [(setting.decode_batch, setting.decode_text_tokens)],
    }
    gpu = torch.cuda.current_device() if device.index is None and is_cuda(device) else device.index
    with PowerTrace(gpu) if is_cuda(device) else contextlib.nullcontext() as trace:
        for section in inference:
            if section == "decode":  # all systems in rounds, see Suite.decode_interleaved
                for batch, t in shapes[section]:
                    suite.decode_interleaved([sys_ for sys_ in suite.systems.values() if sys_.decodes], batch, t)
                continue
            for name, system in suite.systems.items():
                for batch, t in shapes[section]:
                    if name == "hf_llava_compile" and (section != "prefill" or t != setting.text_tokens[0]):
                        continue  # each shape is a fresh compile of minutes: one shape only
                    suite.inference(section, system, batch, t)
    if trace is not None:  # the SM clock and board power while each prefill, ttft and throughput entry was timed
        for entry, t_start, t_end in suite.windows:
            entry["power"] = trace.window(t_start, t_end)
    results["systems"].update({n: {"status": "built", **sys.info()} for n, sys in suite.systems.items()})
    results["checks"] = _checks(suite.logits)
    suite.logits.clear()
    if "train" in sections:
        # The inference systems' own memory (the fast path's folded and tiled weights, graph pools) goes first: with
        # saisa's tiled copies kept, llava's stage-1 step ran out of memory on an 80 GB H100 (session 18).
        suite.systems.clear()
        free_memory(device)
        # Stage 1 at the inference shape: LLM frozen, projector trained (saisa: one shared MLP, paper Sec. 4.3).
        stage1 = {"saisa": build_ours(setting, "saisa", device, donor=ours["saisa"], projector_sharing="shared"),
                  "llava": ours["llava"]}
        methods = [m for m in setting.train_methods if m == "eager" or is_cuda(device)]
        for arch, model in stage1.items():
            for method in methods:
                suite.train(1, arch, model, setting.text_config, method)
        del stage1
        hf = ours = None
        free_memory(device)
        # Stage 2 at the training shape: everything but the vision tower trained.
        for arch in ("saisa", "llava"):
            model = build_ours(setting, arch, device, text_config=setting.train_text_config, seed=2)
            for method in methods:
                suite.train(2, arch, model, setting.train_text_config, method)
            del model
            free_memory(device)
        results["projection"] = _projection(setting, suite.entries)
    del hf, ours
    suite.systems.clear()
    free_memory(device)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    return results
