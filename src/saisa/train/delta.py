"""A trained model stored as its difference from the model built from its pretrained parts: small enough to ship.

Unusual here: nothing is stored that the parts (the LLM and vision tower a recipe names) already hold. A tensor equal
to the base's is left out; an LLM weight changed by a merged LoRA is stored as the exact low-rank factors of its
change, W = W_base + B @ A (found by SVD; the rank is checked, not assumed); a large tensor the base does not
determine (the projectors, which start from random weights) is stored as int8 with one fp32 scale per output row;
small ones (norms, biases) as they are. The file is one safetensors file whose metadata says what it holds; `apply`
rebuilds the model in place and `pack` reports the reconstruction error of every tensor, so a shipped delta is
evaluated after packing, not assumed lossless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "saisa-delta/1"
LOW_RANK_TOLERANCE = 1e-2  # relative error under which a weight change counts as rank <= r (bf16 factors: ~4e-3)
QUANTIZE_MIN_NUMEL = 1 << 16  # tensors at least this large are stored as int8 rows; smaller ones as they are


class DeltaError(ValueError):
    """A delta file that does not fit the model it is applied to."""


def pack(trained: nn.Module, base: nn.Module, out: str | Path, *, rank: int, metadata: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """Write `trained` as a delta from `base` (same architecture; `base` is e.g. `build_model` of the recipe's
    parts) to `out` (.safetensors). Returns a report: bytes, and per stored tensor its kind and relative error."""
    ref = base.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"tensors": {}}
    for key, value in trained.state_dict().items():
        value = value.detach().float().cpu()
        old = ref.get(key)
        if old is not None and old.shape == value.shape and torch.equal(old.float().cpu(), value):
            continue
        if old is not None and old.shape == value.shape and value.dim() == 2 and rank > 0:
            a, b, err = _low_rank(value - old.float().cpu(), rank)
            if err <= LOW_RANK_TOLERANCE:
                tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"] = a, b
                report["tensors"][key] = {"kind": "low_rank", "rank": a.shape[0], "rel_error": err}
                continue
        if value.numel() >= QUANTIZE_MIN_NUMEL and value.dim() >= 2:
            q, scale = _quantize(value)
            tensors[f"{key}.int8"], tensors[f"{key}.scale"] = q, scale
            err = float((_dequantize(q, scale) - value).norm() / value.norm().clamp_min(1e-12))
            report["tensors"][key] = {"kind": "int8", "rel_error": err}
        else:
            tensors[key] = value.clone()
            report["tensors"][key] = {"kind": "full", "rel_error": 0.0}
    config = getattr(trained, "config", None)
    meta = {"format": FORMAT, "projector_sharing": str(getattr(config, "projector_sharing", "")),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(out)
    report["bytes"] = out.stat().st_size
    report["max_rel_error"] = max((t["rel_error"] for t in report["tensors"].values()), default=0.0)
    return report


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise DeltaError(f"{path} is not a {FORMAT} file (metadata format={meta.get('format')!r}); write one with "
                         "saisa.train.delta.pack")
    return meta


@torch.no_grad()
def apply(model: nn.Module, path: str | Path) -> nn.Module:
    """Turn `model` (built from the delta's base parts, or a model saved from them with the LLM unchanged, such as
    a stage-1 export) into the packed model, in place. A shared saisa projector is expanded first when the delta
    holds per-layer projectors."""
    meta = read_metadata(path)
    if meta.get("projector_sharing") == "per_layer" and getattr(model.config, "projector_sharing", "") == "shared":
        model.expand_shared_projector()
    stored = load_file(str(path))
    state = model.state_dict()
    done: set[str] = set()
    for name in stored:
        key, _, kind = name.rpartition(".")
        if kind in ("lora_A", "lora_B", "int8", "scale"):
            if key in done:
                continue
            done.add(key)
            target = _target(state, key, path)
            if kind in ("lora_A", "lora_B"):
                update = stored[f"{key}.lora_B"].float() @ stored[f"{key}.lora_A"].float()
                _check_shape(target, update, key, path)
                target.add_(update.to(target.dtype))
            else:
                value = _dequantize(stored[f"{key}.int8"], stored[f"{key}.scale"])
                _check_shape(target, value, key, path)
                target.copy_(value)
        else:
            target = _target(state, name, path)
            _check_shape(target, stored[name], name, path)
            target.copy_(stored[name])
    return model


def _target(state: dict[str, torch.Tensor], key: str, path: str | Path) -> torch.Tensor:
    if key not in state:
        raise DeltaError(f"{path} holds {key!r}, which this model does not have: the delta belongs to another "
                         "architecture or LLM")
    return state[key]


def _check_shape(target: torch.Tensor, value: torch.Tensor, key: str, path: str | Path) -> None:
    if target.shape != value.shape:
        raise DeltaError(f"{path}: {key!r} is {tuple(value.shape)} there but {tuple(target.shape)} in the model: "
                         "the delta belongs to another configuration")


def _low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, in), B (out, r), relative error) in bf16, B @ A the best rank-`rank` approximation of diff (the
    singular values split evenly between the factors; the error is measured after the bf16 rounding)."""
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = (u[:, :r] * root).to(torch.bfloat16), (vh[:r] * root[:, None]).to(torch.bfloat16)
    err = float((diff - b.float() @ a.float()).norm() / diff.norm().clamp_min(1e-12))
    return a.contiguous(), b.contiguous(), err


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of the last dimension: x ~ q * scale[..., None]."""
    scale = x.abs().amax(-1).clamp_min(1e-12) / 127
    q = torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(-1)


__all__ = ["FORMAT", "DeltaError", "apply", "pack", "read_metadata"]
