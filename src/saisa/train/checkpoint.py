"""Atomic training checkpoints with exact resume, and the final `from_pretrained` export.

Unusual here: a checkpoint is written into `<run>/checkpoints/tmp-step-N`, every file fsynced, a `manifest.json`
(file names and sizes) written last, and only then renamed to `step-N` with `os.replace`; the `latest` pointer file
is replaced the same way afterwards. A crash at any point leaves either the previous checkpoint or the new complete
one; `tmp-*` folders and any `step-N` whose manifest does not match its files are never resumed from.

A checkpoint holds what resuming needs to reproduce the uninterrupted run bit for bit on one device: the trainable
weights (safetensors; frozen weights come back from the recipe), optimizer state keyed by parameter name and the LR
scheduler state (torch.save, read back with `weights_only=True`), every process's RNG states (python, numpy, torch
CPU and CUDA), and the data position (epoch, optimizer step within it, sampler seed). FSDP2's sharded parameters and
optimizer states are gathered into full tensors on save and re-sharded on load. DeepSpeed is not handled here (its
engine owns the optimizer); `check_checkpointing` refuses it up front.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
STATE = "trainer_state.json"
RECIPE = "recipe.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit the run it should resume."""


@dataclass(kw_only=True)
class TrainState:
    """Where training stands; saved as trainer_state.json. Mutable: the loop advances it."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done within `epoch`
    sampler_seed: int = 0
    skipped_batches: int = 0  # micro-batches with no supervised token (see loop.py)
    world_size: int = 1
    global_batch: int = 1
    micro_batch: int = 1
    total_steps: int = 0
    elapsed_s: float = 0.0  # wall time of the run so far, across resumes

    def advance(self, steps_per_epoch: int, *, skipped_batches: int = 0) -> None:
        """One optimizer step done; roll over to the next epoch at its end."""
        self.step += 1
        self.step_in_epoch += 1
        self.skipped_batches += skipped_batches
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def check_compatible(self, other: TrainState) -> None:
        """Resume only into a run with the same batch layout and schedule length (the data order depends on them)."""
        for name in ("world_size", "global_batch", "micro_batch", "total_steps", "sampler_seed"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise CheckpointError(
                    f"cannot resume: the checkpoint was written with {name}={theirs}, this run has {name}={mine}; "
                    "resume with the same recipe and number of processes (or start a new output_dir)"
                )


# -------------------------------------------------------------------------------------------- file primitives


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms/filesystems cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def _load_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    _fsync_file(path)


def _replace_file_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------ model state


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full tensor from an FSDP2 DTensor shard (collective: every process must call it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters by name, each once (tied weights appear under one name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights as full CPU tensors. `model` is the unwrapped model (no DDP/compile wrapper)."""
    return {n: _full(p.detach()).cpu().contiguous() for n, p in named_trainable(model)}


@torch.no_grad()
def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the trainable parameters in place (re-sharding for FSDP2); names must match exactly."""
    params = dict(named_trainable(model))
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not match the trainable parameters of this model: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); was it written by another stage?"
        )
    for name, p in params.items():
        src = state[name]
        if tuple(src.shape) != tuple(p.shape):
            raise CheckpointError(f"checkpoint {name} has shape {tuple(src.shape)}, the model {tuple(p.shape)}")
        if hasattr(p, "device_mesh"):  # FSDP2 DTensor: shard the full tensor the way the parameter is sharded
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src.to(p.to_local().device, p.dtype), p.device_mesh, p.placements)
        p.copy_(src)


def _dcp_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name (gathered from FSDP2 shards onto process 0's CPU)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_dcp_options(cpu_offload=True))


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              distributed: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_dcp_options(broadcast_from_rank0=distributed))


# ------------------------------------------------------------------------------------------------------ RNG


def rng_state() -> dict[str, Any]:
    """RNG states of this process in types that `torch.load(weights_only=True)` accepts."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["cuda"]):
            raise CheckpointError(f"checkpoint holds CUDA RNG states of {len(state['cuda'])} device(s); this "
                                  f"process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ save / find / load


def check_checkpointing(accelerator: Any) -> None:
    """Refuse strategies whose state this module cannot save faithfully."""
    if str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED"):
        raise CheckpointError(
            "checkpoint/resume under DeepSpeed is not implemented (its engine owns the optimizer state); train with "
            "save_every=null (the final export still works), or use the ddp / fsdp2 accelerate configs"
        )


def _manifest(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def is_complete(folder: Path) -> bool:
    """A step folder whose manifest lists exactly its files, with their sizes."""
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        return _manifest(folder) == listed
    except OSError:
        return False


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete step folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(root: Path) -> Path | None:
    """The checkpoint to resume from: `latest` if it names a complete folder, else the newest complete one."""
    root = Path(root)
    complete = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if STEP_RE.match(target.name) and target.is_dir() and is_complete(target):
            if complete and complete[-1][1] != target:
                # Crash between renaming step-N into place and updating the pointer: step-N is complete, use it.
                logger.warning("%s names %s but %s is newer and complete; resuming from the newer one", pointer,
                               target.name, complete[-1][1].name)
                return complete[-1][1]
            return target
        logger.warning("%s names %r, which is missing or incomplete; falling back to the newest complete checkpoint",
                       pointer, target.name)
    return complete[-1][1] if complete else None


def save_checkpoint(root: Path, state: TrainState, *, accelerator: Any, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, write_recipe: Callable[[Path], None],
                    keep_last: int | None = None) -> Path:
    """Write `root/step-{state.step}` atomically (all processes call this). Returns the folder."""
    root = Path(root)
    main = accelerator.is_main_process
    tmp, final = root / f"tmp-step-{state.step}", root / f"step-{state.step}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("tmp-step-*"):  # leftovers of a crash: never resumed from, safe to drop
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    unwrapped = accelerator.unwrap_model(model)
    weights = trainable_state_dict(unwrapped)  # collective under FSDP2
    optim_state = optimizer_state_dict(model, _torch_optimizer(optimizer))  # collective under FSDP2
    _save_torch(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if main:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(state.step)})
        _fsync_file(tmp / WEIGHTS)
        _save_torch(optim_state, tmp / OPTIMIZER)
        _save_torch(scheduler.state_dict(), tmp / SCHEDULER)
        _write_text(tmp / STATE, json.dumps(dataclasses.asdict(state), indent=1) + "\n")
        write_recipe(tmp / RECIPE)
        _fsync_file(tmp / RECIPE)
    accelerator.wait_for_everyone()
    if main:
        expected = {f"rng-{i}.pt" for i in range(accelerator.num_processes)}
        if not expected <= set(_manifest(tmp)):
            raise CheckpointError(f"{tmp}: missing RNG files {sorted(expected - set(_manifest(tmp)))}; the "
                                  "checkpoint folder must be on a filesystem shared by all processes")
        _write_text(tmp / MANIFEST, json.dumps({"step": state.step, "files": _manifest(tmp)}, indent=1) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. after resuming from an older checkpoint)
            trash = root / f"trash-step-{state.step}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        _replace_file_atomically(root / LATEST, final.name + "\n")
        if keep_last:
            for _, old in list_checkpoints(root)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, *, accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, expect: TrainState) -> TrainState:
    """Restore weights, optimizer, scheduler and this process's RNG from `folder`; return the saved TrainState."""
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete checkpoint (its manifest does not match its files)")
    state = TrainState(**json.loads((folder / STATE).read_text(encoding="utf-8")))
    expect.check_compatible(state)
    rng_file = folder / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{folder} has no RNG state for process {accelerator.process_index}")
    load_trainable_state_dict(accelerator.unwrap_model(model), load_file(str(folder / WEIGHTS)))
    distributed = accelerator.num_processes > 1
    optim_state = _load_torch(folder / OPTIMIZER) if (accelerator.is_main_process or not distributed) else {}
    load_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state, distributed)
    scheduler.load_state_dict(_load_torch(folder / SCHEDULER))
    set_rng_state(_load_torch(rng_file))
    return state


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


# ------------------------------------------------------------------------------------------------------ export


def export_model(out: Path, *, accelerator: Any, model: nn.Module, tokenizer: Any = None,
                 image_processor: Any = None, write_recipe: Callable[[Path], None] | None = None) -> Path:
    """Save a `SaisaForConditionalGeneration.from_pretrained`-loadable folder (LoRA adapters merged first).

    Written to `out.tmp` and renamed into place, like checkpoints. All processes call this (gathering is collective).
    """
    from saisa.train.stages import is_lora

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    unwrapped = accelerator.unwrap_model(model)
    if is_lora(unwrapped):
        if accelerator.num_processes > 1 and not str(accelerator.distributed_type).endswith("MULTI_GPU"):
            raise CheckpointError("exporting a LoRA model is supported single-process or under DDP only")
        core = unwrapped.merge_and_unload()  # LoRA deltas folded into the LLM's weights; adapters removed
        state = core.state_dict()
    else:
        core = unwrapped
        state = accelerator.get_state_dict(model)  # gathers FSDP2 / ZeRO-3 shards onto the main process
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        core.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        if write_recipe is not None:
            write_recipe(tmp / RECIPE)
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    accelerator.wait_for_everyone()
    return out
