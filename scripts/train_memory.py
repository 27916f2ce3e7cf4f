"""Activation memory of one training step, saisa vs llava, stage 1 and stage 2, per loss / recompute variant, on the CPU.

The benchmark suite's models and stages (saisa.bench, paper preset) with `--layers` decoder layers: stage 1 at the
Vicuna-7B width (saisa: one shared projector MLP; LLM frozen), stage 2 at the Qwen2-1.5B width (saisa: per-layer MLPs;
everything but the vision tower trained); bf16, micro-batch 2, 192 text tokens and one 576-token image per sample.
Variants: `logits` (the loss through the full (B, L, vocab) logits, skip_logits=False), `chunked` (the default training
loss, saisa.model.loss; saisa's stage 2 through its one-Function visual path, model.fused_visual_kv) and, for saisa
in stage 2, `chunked+saved` (the visual path through autograd, which keeps its activations) and `chunked+recompute`
(per-layer checkpoints, model.visual_recompute). Per system it counts:
- saved: bytes autograd keeps for backward (a saved_tensors_hooks pack hook), deduplicated by storage, parameters
  left out; split into the visual path (saisa: projector + every layer's visual K/V, `saisa_visual_kv`; llava: the
  projector), the loss (after the final norm: lm_head + cross-entropy; the chunked loss keeps the lm_head weight's
  gradient, which backward would make anyway) and the rest, by the phase in which a storage was first saved;
- peak: the most bytes of tensors made during the forward that were alive at once (a TorchDispatchMode following
  each new storage until it is freed), so copies that live long without being saved count too; step_peak: the same
  over forward + backward (gradients included; no optimizer);
- visual ops: aten operators (views excluded) the visual path dispatched, a proxy for its forward kernel count;
and backward ops: the same count for the whole backward that follows.

Unusual here: features Z are given (the vision tower is frozen and saves nothing), and the phase split wraps the
model's visual-path and loss functions for the duration of the forward.

    PYTHONPATH=src python3 scripts/train_memory.py --layers 4 --out benchmarks/results/train-memory-cpu/after-l4.json
"""

from __future__ import annotations

import argparse
import json
import weakref
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from saisa.bench.setting import PRESETS, Setting, llm_spec, vision_spec
from saisa.bench.systems import build_ours, make_inputs
from saisa.model import modeling

MB = 1e6


# ----------------------------------------------------------------------------------------------------- counting
class Meter(TorchDispatchMode):
    """Saved bytes per phase (pack hook), peak live bytes and non-view ops per phase (dispatch mode)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing = existing  # storages made before the forward (weights, inputs): never counted
        self.phase = "rest"
        self.saved: dict[int, tuple[str, int]] = {}
        self.live = self.peak = 0
        self.alive: dict[int, int] = {}
        self.ops: Counter[str] = Counter()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.existing and s.data_ptr() not in self.saved:
            self.saved[s.data_ptr()] = (self.phase, s.nbytes())
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops[self.phase] += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._follow(t.untyped_storage())
        return out

    def _follow(self, s: torch.UntypedStorage) -> None:
        key, n = s.data_ptr(), s.nbytes()
        if n == 0 or key in self.existing or key in self.alive:
            return
        self.alive[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(s, self._free, key)  # storages keep their Python object while alive: fires on free

    def _free(self, key: int) -> None:
        self.live -= self.alive.pop(key)

    def saved_bytes(self, phase: str | None = None) -> int:
        return sum(n for p, n in self.saved.values() if phase is None or p == phase)


@contextmanager
def phases(meter: Meter, model: torch.nn.Module):
    """Label what runs inside the model's visual path "visual" (saisa: saisa_visual_kv; llava: project_images) and
    inside its loss "loss" (lm_head + cross-entropy: modeling's linear_cross_entropy, or its forward_with_layout's
    lm_head call and logits_cross_entropy)."""

    def wrap(fn, phase):
        def inner(*args, **kwargs):
            meter.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                meter.phase = "rest"
        return inner

    lm_head = model.language_model.lm_head
    with ExitStack() as stack:
        if model.config.architecture == "saisa":
            stack.enter_context(mock.patch.object(modeling, "saisa_visual_kv", wrap(modeling.saisa_visual_kv, "visual")))
        else:
            stack.enter_context(mock.patch.object(model, "project_images", wrap(model.project_images, "visual")))
        for name in ("linear_cross_entropy", "logits_cross_entropy"):
            stack.enter_context(mock.patch.object(modeling, name, wrap(getattr(modeling, name), "loss")))
        stack.enter_context(mock.patch.object(lm_head, "forward", wrap(lm_head.forward, "loss")))
        yield


def measure(model: torch.nn.Module, ids: torch.Tensor, features: torch.Tensor, skip_logits: bool) -> dict:
    existing = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), ids, features]}
    meter = Meter(existing)
    with phases(meter, model), torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t), meter:
        out = model(input_ids=ids, image_features=features, labels=ids, skip_logits=skip_logits)
        loss = out.loss
        del out  # the logits, when made, are freed here, as a training step drops them
    peak = meter.peak
    meter.phase = "backward"
    with meter:
        loss.backward()
    del loss
    model.zero_grad(set_to_none=True)
    return {"saved_visual_mb": meter.saved_bytes("visual") / MB, "saved_loss_mb": meter.saved_bytes("loss") / MB,
            "saved_rest_mb": meter.saved_bytes("rest") / MB, "saved_mb": meter.saved_bytes() / MB,
            "peak_mb": peak / MB, "step_peak_mb": meter.peak / MB, "visual_ops": meter.ops["visual"],
            "backward_ops": meter.ops["backward"]}


# ----------------------------------------------------------------------------------------------------- systems
def stage_setting(setting: Setting, stage: int, layers: int) -> tuple[Setting, dict]:
    """The bench's stage shapes with `layers` decoder layers: stage 1 at the inference LLM (7B), stage 2 at the
    training LLM (Qwen2-1.5B). A 2-layer vision tower: features are given, so its depth does not matter."""
    text = dict(setting.text_config if stage == 1 else setting.train_text_config, num_hidden_layers=layers)
    vision = dict(setting.vision_config, num_hidden_layers=2)
    return replace(setting, text_config=text, vision_config=vision), text


VARIANTS = ("logits", "chunked", "chunked+saved", "chunked+recompute")


def run_stage(setting: Setting, stage: int, layers: int, batch: int, t: int) -> list[dict]:
    s, text = stage_setting(setting, stage, layers)
    cpu = torch.device("cpu")
    sharing = {"projector_sharing": "shared"} if stage == 1 else {}
    saisa = build_ours(s, "saisa", cpu, seed=stage, **sharing)
    llava = build_ours(s, "llava", cpu, donor=saisa, seed=stage)  # borrows the LLM, lm_head and tower
    x = make_inputs(replace(s, input_sets=1), batch, t, cpu, seed=stage)[0]
    spec, v = llm_spec(text), vision_spec(s.vision_config).num_tokens
    element = torch.finfo(getattr(torch, s.dtype)).bits // 8
    floor_kv = 2 * spec.num_layers * batch * v * spec.kv_dim * element  # each layer's visual K and V
    rows = []
    for arch, model in (("saisa", saisa), ("llava", llava)):
        model.requires_grad_(stage == 2)
        model.multi_modal_projector.requires_grad_(True)
        model.vision_tower.requires_grad_(False)
        model.train()
        for variant in VARIANTS:
            recompute = variant.endswith("+recompute")
            if "+" in variant and (arch != "saisa" or stage != 2):
                continue  # only per-layer projectors have these variants
            model.visual_recompute = recompute
            model.fused_visual_kv = variant == "chunked"
            row = {"stage": stage, "arch": arch, "variant": variant, "llm": f"{layers}x{spec.hidden_size}",
                   **measure(model, x.ids, x.features, skip_logits=variant != "logits")}
            if arch == "saisa":
                row["visual_kv_floor_mb"] = floor_kv / MB
            rows.append(row)
        model.visual_recompute, model.fused_visual_kv = False, True
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=192)
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.manual_seed(0)
    setting = PRESETS["paper"]
    rows = [r for stage in args.stages for r in run_stage(setting, stage, args.layers, args.batch, args.text_tokens)]

    cols = ("stage", "arch", "variant", "llm", "saved_visual_mb", "saved_loss_mb", "saved_rest_mb", "saved_mb",
            "peak_mb", "step_peak_mb", "visual_ops", "backward_ops")
    print(" ".join(f"{c:>17}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>17.1f}" if isinstance(r[c], float) else f"{r[c]:>17}" for c in cols))
    for stage in args.stages:
        ref = {r["variant"]: r for r in rows if r["stage"] == stage and r["arch"] == "llava"}
        for ours in (r for r in rows if r["stage"] == stage and r["arch"] == "saisa"):
            base = ref[ours["variant"] if ours["variant"] in ref else "chunked"]
            print(f"stage {stage} saisa {ours['variant']} / llava {base['variant']}: saved "
                  f"{ours['saved_mb'] / base['saved_mb']:.3f}, step peak {ours['step_peak_mb'] / base['step_peak_mb']:.3f}"
                  f"; saisa's visual K/V floor {ours['visual_kv_floor_mb']:.1f} MB")
    result = {"setting": setting.name, "dtype": setting.dtype, "layers": args.layers, "batch": args.batch,
              "text_tokens": args.text_tokens, "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
