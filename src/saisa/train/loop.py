"""Training loop: `setup` (model, data, accelerator) -> `main` -> `fit` (the steps), under `accelerate launch` or not.

Unusual here:
- We own the data order. `sample_order` is a pure function of (seed, epoch) (random, length-grouped, or LLaVA's
  group_by_modality_length), each process takes its slice of every global micro-batch, and resuming skips whole
  optimizer steps by index without loading a sample. The data loader is not handed to accelerate (its scheduler and
  loader wrappers would step/skip differently on resume); only the model and optimizer are prepared.
- Every epoch drops its last partial global batch, so an epoch is a whole number of optimizer steps.
- Loss per micro-batch is the model's mean over its supervised tokens, divided by the accumulation steps (HF Trainer's
  convention, which LLaVA-1.5 trained with).
- A micro-batch with no supervised token (all labels -100, which the model would turn into a NaN mean) is SKIPPED
  and COUNTED: it still runs forward/backward with a zero loss so that DDP/FSDP collectives stay in step, adds no
  gradient, and is reported as `skipped_batches` in the metrics. A step whose micro-batches were all skipped on every
  process does not call the optimizer (Adam's momentum would otherwise move the weights).
- A non-finite loss (all processes agree through one all-reduce) or gradient norm raises `NonFiniteError` BEFORE
  the optimizer step, naming the step; under DeepSpeed, whose engine steps inside `backward`, the loss is checked
  before `backward`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saisa.train import checkpoint as ckpt
from saisa.train.config import TrainRecipe, dump_recipe
from saisa.train.parallel import (
    configure_accelerator,
    ddp_kwargs,
    mixed_precision,
    parallelize,
)
from saisa.train.stages import apply_stage, is_lora, param_groups, trainable_summary

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm became NaN/inf; raised before the optimizer step that would have used it."""


# ------------------------------------------------------------------------------------------------------ sampling


def sample_order(n: int, *, seed: int, epoch: int, group_by: str = "none", lengths: Sequence[int] | None = None,
                 multimodal: Sequence[bool] | None = None, megabatch: int = 1) -> list[int]:
    """Sample indices of one epoch, a pure function of (seed, epoch).

    "length": shuffle, cut into megabatches of `megabatch` (= micro batch x processes) and sort each by length,
    longest first, so a global micro-batch holds similar lengths (less padding); megabatch order is shuffled again.
    "modality_length": the same within image samples and within text-only samples separately, so a micro-batch is
    one modality (LLaVA's group_by_modality_length); the leftover partial megabatches go last.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    if group_by == "none":
        return torch.randperm(n, generator=g).tolist()
    if lengths is None or len(lengths) != n:
        raise ValueError(f"data.group_by={group_by!r} needs the dataset's `lengths` (one per sample)")
    if group_by == "modality_length":
        if multimodal is None or len(multimodal) != n:
            raise ValueError("data.group_by='modality_length' needs the dataset's `is_multimodal` (one per sample)")
        pools = [[i for i in range(n) if multimodal[i]], [i for i in range(n) if not multimodal[i]]]
    elif group_by == "length":
        pools = [list(range(n))]
    else:
        raise ValueError(f"unknown group_by {group_by!r}; choose none, length or modality_length")
    full, partial = [], []
    for pool in pools:
        perm = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        for k in range(0, len(perm), megabatch):
            chunk = sorted(perm[k: k + megabatch], key=lambda i: -lengths[i])  # stable: ties keep shuffled order
            (full if len(chunk) == megabatch else partial).append(chunk)
    full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
    return [i for chunk in full + partial for i in chunk]


@dataclass(frozen=True)
class BatchLayout:
    """How samples map to processes, micro-batches and optimizer steps."""

    num_samples: int
    global_batch: int
    micro_batch: int
    world_size: int

    @property
    def accumulation(self) -> int:
        per_step = self.micro_batch * self.world_size
        if self.global_batch % per_step:
            raise ValueError(f"schedule.global_batch={self.global_batch} is not a multiple of micro_batch x processes "
                             f"= {self.micro_batch} x {self.world_size}; change micro_batch or global_batch")
        return self.global_batch // per_step

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_samples // self.global_batch
        if steps == 0:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                             f"{self.global_batch}; lower schedule.global_batch")
        return steps

    def rank_batches(self, order: Sequence[int], rank: int, start_step: int = 0) -> list[list[int]]:
        """This process's micro-batches of the epoch from optimizer step `start_step` on."""
        span = self.micro_batch * self.world_size
        first, last = start_step * self.accumulation, self.steps_per_epoch * self.accumulation
        return [list(order[j * span + rank * self.micro_batch: j * span + (rank + 1) * self.micro_batch])
                for j in range(first, last)]


def total_steps(recipe: TrainRecipe, layout: BatchLayout) -> int:
    s = recipe.schedule
    if s.max_steps is not None:
        return s.max_steps
    return max(1, math.ceil(s.epochs * layout.steps_per_epoch))


# ------------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """JSONL per optimizer step (main process), optional TensorBoard, loss-curve PNG at the end.

    Row: step, epoch, loss (mean over the step's supervised micro-batches, all processes; null if none), lr (of the
    first parameter group, used by this step), grad_norm (before clipping), tokens_per_s and samples_per_s (all
    processes, since the previous row; tokens = text tokens + v per image, LLaVA's spliced length, so the three
    architectures compare), elapsed_s (across resumes), skipped_batches (cumulative, see the module docstring).
    """

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, resume_step: int) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep what led to the checkpoint we resume from, drop steps that will be redone
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self.rows = [json.loads(line) for line in kept]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log.tensorboard=true needs the `tensorboard` package (pip install tensorboard)"
                                  ) from e
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self, plot: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.enabled and plot and self.rows:
            plot_loss(self.rows, self.path.with_name("loss.png"))


def plot_loss(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss per optimizer step (and the learning rate) as a PNG, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    lr = ax.twinx()
    lr.plot([r["step"] for r in rows], [r["lr"] for r in rows], lw=0.8, color="tab:orange")
    lr.set_ylabel("learning rate", color="tab:orange")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# ------------------------------------------------------------------------------------------------------ the loop


@dataclass
class FitResult:
    model: nn.Module  # the trained model (LoRA merged if exported)
    state: ckpt.TrainState
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None  # the last checkpoint written
    export: Path | None = None  # the from_pretrained folder, if exported


def make_accelerator(recipe: TrainRecipe, *, text_only_samples: bool = False):
    """An Accelerator for the recipe: precision, gradient accumulation from the batch sizes and process count."""
    from accelerate import Accelerator, PartialState

    world = PartialState().num_processes
    per_step = recipe.schedule.micro_batch * world
    if recipe.schedule.global_batch % per_step:
        raise ValueError(f"schedule.global_batch={recipe.schedule.global_batch} is not a multiple of micro_batch x "
                         f"processes = {recipe.schedule.micro_batch} x {world}")
    return Accelerator(mixed_precision=mixed_precision(recipe.precision),
                       gradient_accumulation_steps=recipe.schedule.global_batch // per_step,
                       kwargs_handlers=ddp_kwargs(text_only_samples), step_scheduler_with_optimizer=False)


def _make_scheduler(recipe: TrainRecipe, optimizer: torch.optim.Optimizer, steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(steps * recipe.schedule.warmup_ratio)
    return get_scheduler(recipe.schedule.lr_schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def _loader(dataset, collate_fn, batches: list[list[int]], recipe: TrainRecipe, epoch: int):
    # A private generator: creating the iterator must not draw from the global RNG (resume would shift dropout).
    g = torch.Generator().manual_seed(recipe.seed + epoch)
    workers = recipe.data.num_workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=workers,
                                       generator=g, persistent_workers=False,
                                       prefetch_factor=2 if workers else None)


def _nonfinite(step: int, what: str, value: float, *, state: ckpt.TrainState, last_checkpoint: Path | None) -> str:
    return (f"step {step}: {what} is {value} (non-finite); stopped BEFORE the optimizer step, so the weights are "
            f"those after step {step - 1}. Data position: epoch {state.epoch}, step {state.step_in_epoch} of it. "
            f"Last checkpoint: {last_checkpoint or 'none'}. Lower optim.lr, use precision=fp32, or check that data.")


def fit(model: nn.Module, dataset, collate_fn: Callable, recipe: TrainRecipe, *, accelerator=None,
        resume: bool = False, stop_after: int | None = None, tokenizer: Any = None, image_processor: Any = None,
        export: bool = True) -> FitResult:
    """Train `model` on `dataset` for `recipe` (the stage is applied here); checkpoint, export, return the result.

    dataset: indexable; `dataset.lengths` / `dataset.is_multimodal` are needed only for grouped sampling.
    collate_fn: list of samples -> MultimodalBatch (labels required).
    resume: continue from the newest complete checkpoint under `output_dir/checkpoints` (fresh start if none).
    stop_after: stop (with a checkpoint) after this many optimizer steps, as a preempted job would; the schedule
        still spans the whole run, so resuming later gives the uninterrupted result.
    """
    from accelerate.utils import set_seed

    out = Path(recipe.output_dir)
    accelerator = accelerator or make_accelerator(recipe)
    is_main = accelerator.is_main_process
    set_seed(recipe.seed)
    model = apply_stage(model, recipe.stage)
    if is_main:
        logger.info("stage %d: %s", recipe.stage.stage, trainable_summary(model))
    parallelize(model, gradient_checkpointing=recipe.gradient_checkpointing, compile=recipe.compile,
                visual_recompute=recipe.visual_recompute, fused_visual_kv=recipe.fused_visual_kv)
    sched = recipe.schedule
    layout = BatchLayout(len(dataset), sched.global_batch, sched.micro_batch, accelerator.num_processes)
    accum = layout.accumulation
    if accelerator.gradient_accumulation_steps != accum:
        raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, the "
                         f"recipe needs {accum}; build it with make_accelerator(recipe)")
    steps = total_steps(recipe, layout)
    configure_accelerator(accelerator, model, micro_batch=sched.micro_batch, accumulation=accum,
                          max_grad_norm=recipe.optim.max_grad_norm, lora=is_lora(model))
    if recipe.save_every or stop_after:
        ckpt.check_checkpointing(accelerator)
    o = recipe.optim
    optimizer = torch.optim.AdamW(param_groups(model, lr=o.lr, weight_decay=o.weight_decay,
                                               projector_lr=o.projector_lr), lr=o.lr, betas=o.betas, eps=o.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = _make_scheduler(recipe, ckpt._torch_optimizer(optimizer), steps)
    deepspeed = str(accelerator.distributed_type).endswith("DEEPSPEED")
    visual_tokens = getattr(accelerator.unwrap_model(model), "num_visual_tokens", None)
    if visual_tokens is None:  # a peft wrapper
        visual_tokens = accelerator.unwrap_model(model).get_base_model().num_visual_tokens

    state = ckpt.TrainState(sampler_seed=recipe.seed, world_size=accelerator.num_processes,
                            global_batch=sched.global_batch, micro_batch=sched.micro_batch, total_steps=steps)
    ckpt_root = out / "checkpoints"
    last_checkpoint = None
    if not resume and ckpt.list_checkpoints(ckpt_root):
        raise ckpt.CheckpointError(f"{ckpt_root} holds checkpoints of an earlier run; pass --resume (resume=True) to "
                                   "continue it, or choose another output_dir")
    if resume:
        last_checkpoint = ckpt.find_latest(ckpt_root)
        if last_checkpoint is None:
            if is_main:
                logger.warning("resume: no complete checkpoint under %s; starting from step 0", ckpt_root)
        else:
            state = ckpt.load_checkpoint(last_checkpoint, accelerator=accelerator, model=model, optimizer=optimizer,
                                         scheduler=scheduler, expect=state)
            if is_main:
                logger.info("resumed from %s (step %d, epoch %d)", last_checkpoint, state.step, state.epoch)

    def write_recipe(path: Path) -> None:
        dump_recipe(recipe, path, extra={"world_size": accelerator.num_processes, "accumulation": accum,
                                         "total_steps": steps, "steps_per_epoch": layout.steps_per_epoch})

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(out / "recipe.yaml")
        logger.info("%d samples, %d steps/epoch, %d steps, global batch %d = %d micro x %d processes x %d accumulation",
                    len(dataset), layout.steps_per_epoch, steps, sched.global_batch, sched.micro_batch,
                    accelerator.num_processes, accum)
    metrics = Metrics(out, enabled=is_main, tensorboard=recipe.log.tensorboard, resume_step=state.step)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=state.step, disable=not (is_main and recipe.log.progress), desc="train",
               dynamic_ncols=True)
    group_by, megabatch = recipe.data.group_by, sched.micro_batch * layout.world_size
    lengths = getattr(dataset, "lengths", None) if group_by != "none" else None
    multimodal = getattr(dataset, "is_multimodal", None) if group_by == "modality_length" else None
    model.train()
    started, window_start = time.perf_counter() - state.elapsed_s, time.perf_counter()
    window = torch.zeros(2, dtype=torch.float64)  # tokens, samples since the last metrics line
    stop_at = min(steps, stop_after) if stop_after else steps
    try:
        while state.step < stop_at:
            order = sample_order(len(dataset), seed=state.sampler_seed, epoch=state.epoch, group_by=group_by,
                                 lengths=lengths, multimodal=multimodal, megabatch=megabatch)
            batches = layout.rank_batches(order, accelerator.process_index, state.step_in_epoch)
            micro_batches = iter(_loader(dataset, collate_fn, batches, recipe, state.epoch))
            for _ in range(state.step_in_epoch, layout.steps_per_epoch):
                fail = partial(_nonfinite, state.step + 1, state=state, last_checkpoint=last_checkpoint)
                stats = _forward_backward(model, micro_batches, accum, accelerator, visual_tokens, deepspeed, fail)
                _, n_real, n_skipped, tokens, samples = stats.tolist()
                loss, grad_norm, lr = _update(model, optimizer, scheduler, accelerator, stats, o.max_grad_norm, fail)
                if not n_real and is_main:
                    logger.warning("step %d: no micro-batch had a supervised token; optimizer step skipped",
                                   state.step + 1)
                state.advance(layout.steps_per_epoch, skipped_batches=int(n_skipped))
                now = time.perf_counter()
                state.elapsed_s = now - started
                window += torch.tensor([tokens, samples], dtype=torch.float64)
                if state.step % recipe.log.every == 0 or state.step == stop_at:
                    span = max(now - window_start, 1e-9)
                    row = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": float(window[0]) / span, "samples_per_s": float(window[1]) / span,
                           "elapsed_s": state.elapsed_s, "skipped_batches": state.skipped_batches}
                    metrics.log(row)
                    bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "-", lr=f"{lr:.2e}")
                    window.zero_()
                    window_start = now
                bar.update(1)
                if (recipe.save_every or stop_after) and not deepspeed and (
                        state.step == stop_at or (recipe.save_every and state.step % recipe.save_every == 0)):
                    last_checkpoint = ckpt.save_checkpoint(
                        ckpt_root, state, accelerator=accelerator, model=model, optimizer=optimizer,
                        scheduler=scheduler, write_recipe=write_recipe, keep_last=recipe.keep_last)
                if state.step >= stop_at:
                    break
    finally:
        bar.close()
        metrics.close(plot=state.step > 0)

    result = FitResult(model=model, state=state, metrics=metrics.rows, checkpoint=last_checkpoint)
    if export and state.step >= steps:
        result.export = ckpt.export_model(out / "final", accelerator=accelerator, model=model, tokenizer=tokenizer,
                                          image_processor=image_processor, write_recipe=write_recipe)
        if is_main:
            logger.info("exported %s", result.export)
    return result


def _update(model, optimizer, scheduler, accelerator, stats: torch.Tensor, max_grad_norm: float | None,
            fail: Callable[[str, float], str]) -> tuple[float | None, float | None, float]:
    """Check the loss and gradient norm, clip, step (unless nothing was supervised); return loss, norm, LR used."""
    loss_sum, n_real = float(stats[0]), int(stats[1])
    loss = loss_sum / n_real if n_real else None
    if loss is not None and not math.isfinite(loss):
        raise NonFiniteError(fail("the loss", loss))
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm is not None else math.inf)
    norm = float(norm) if norm is not None else None  # None under DeepSpeed before its step
    if norm is not None and not math.isfinite(norm):
        raise NonFiniteError(fail("the gradient norm", norm))
    lr = optimizer.param_groups[0]["lr"]
    if n_real:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, lr


def _forward_backward(model, micro_batches, accum: int, accelerator, visual_tokens: int, deepspeed: bool,
                      message: Callable[[str, float], str]) -> torch.Tensor:
    """Run `accum` micro-batches; return [loss_sum, n_real, n_skipped, tokens, samples] summed over processes."""
    local = torch.zeros(5, dtype=torch.float64, device=accelerator.device)
    for _ in range(accum):
        batch = next(micro_batches)
        if batch.labels is None:
            raise ValueError("training batches need labels; the collator produced none")
        has_targets = bool((batch.labels[:, 1:] != IGNORE_INDEX).any())
        batch = batch.to(accelerator.device)
        with accelerator.accumulate(model):
            # With targets the loss skips the logits (saisa.model.loss); without, the logits make the zero below.
            out = model(**batch.model_inputs(), skip_logits=has_targets)
            if has_targets:
                loss = out.loss
                local[0] += loss.detach().double()
                local[1] += 1
            else:  # skipped and counted; a zero that still touches every output keeps collectives in step
                loss = out.logits.sum() * 0.0
                local[2] += 1
            if deepspeed:  # DeepSpeed's engine steps inside backward: check before it
                bad = accelerator.reduce(torch.tensor([float(not torch.isfinite(loss.detach()))],
                                                      device=accelerator.device), "sum")
                if bad.item():
                    raise NonFiniteError(message("the loss of a micro-batch", float(loss.detach())))
            accelerator.backward(loss)
        local[3] += int(batch.attention_mask.sum()) + batch.num_images * visual_tokens
        local[4] += batch.input_ids.shape[0]
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, "sum")
    return local.cpu()


# ------------------------------------------------------------------------------------------------ setup / main


@dataclass
class TrainSetup:
    accelerator: Any
    model: nn.Module
    tokenizer: Any
    image_processor: Any
    dataset: Any
    collate_fn: Callable


def setup(recipe: TrainRecipe) -> TrainSetup:
    """Build model, tokenizer, image processor, dataset (synthesizing the demo set if asked) and accelerator."""
    from accelerate import PartialState

    from saisa.data.collate import Collator
    from saisa.data.datasets import ConversationDataset
    from saisa.train.build import build_model

    partial = PartialState()
    model, tokenizer, image_processor = build_model(recipe.model, projector_sharing=recipe.stage.sharing)
    data = recipe.data
    path = Path(data.json)
    if data.synthesize and not path.exists():
        with partial.main_process_first():
            if not path.exists():
                from saisa.data.synth import generate

                generate(path.parent, n=data.synthesize, seed=recipe.seed, max_objects=data.synth_max_objects,
                         questions_per_scene=data.synth_questions)
    if not path.exists():
        raise FileNotFoundError(f"data.json={str(path)!r} does not exist")
    dataset = ConversationDataset.from_json(
        path, image_folder=data.image_folder, tokenizer=tokenizer, template=data.template,
        max_length=data.max_length, image_aspect_ratio=data.image_aspect_ratio, image_processor=image_processor)
    collate_fn = Collator(tokenizer.pad_token_id, image_token_id=model.config.image_token_id)
    accelerator = make_accelerator(recipe, text_only_samples=not all(dataset.is_multimodal))
    return TrainSetup(accelerator=accelerator, model=model, tokenizer=tokenizer, image_processor=image_processor,
                      dataset=dataset, collate_fn=collate_fn)


def main(recipe: TrainRecipe, *, resume: bool = False, stop_after: int | None = None) -> FitResult:
    """Set up from the recipe and train; returns the FitResult (its `export` is the stage's output folder)."""
    s = setup(recipe)
    return fit(s.model, s.dataset, s.collate_fn, recipe, accelerator=s.accelerator, resume=resume,
               stop_after=stop_after, tokenizer=s.tokenizer, image_processor=s.image_processor)
