"""Parallelism and speed-ups applied to a single-device model from outside, before `accelerator.prepare`.

Unusual here: the model drives each HF decoder layer piecewise (see saisa/model/decoder.py) and never calls a decoder
layer's `forward`. FSDP2 gathers a unit's parameters in a forward pre-hook, so wrapping `LlamaDecoderLayer` (what
`_no_split_modules` and most FSDP recipes name) would leave q/k/v/o as shards when the model calls them. We therefore
wrap the modules whose `forward` does run once per layer: the FFN (`LlamaMLP`, about 2/3 of a layer's weights) and
the vision tower's encoder layers; attention projections and norms stay in the root unit (gathered once per step).
For the same reason `torch.compile` is applied to those modules (and the projector), not to whole layers.
DeepSpeed ZeRO hooks every submodule, so it needs no such care; it only needs the micro-batch size written into its
config, since we do not hand our data loader to accelerate.

Order (as in torchtitan): activation checkpointing -> compile -> sharding (by accelerate.prepare).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


def core_model(model: nn.Module) -> nn.Module:
    """SaisaForConditionalGeneration inside a peft wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """Class names for FSDP2 auto-wrap: modules whose forward the model calls (see the module docstring)."""
    core = core_model(model)
    names = [type(core.layers[0].mlp).__name__]
    encoder = getattr(getattr(core.vision_tower, "vision_model", core.vision_tower), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is not None and len(layers):
        names.append(type(layers[0]).__name__)
    return names


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (the model checkpoints per layer itself when enabled)."""
    core_model(model).gradient_checkpointing_enable()


def apply_compile(model: nn.Module) -> None:
    """torch.compile the FFNs and the projector in place (`nn.Module.compile`: parameter names unchanged)."""
    core = core_model(model)
    for layer in core.layers:
        layer.mlp.compile(dynamic=True)
    core.multi_modal_projector.compile(dynamic=True)


def configure_accelerator(accelerator: Any, model: nn.Module, *, micro_batch: int, accumulation: int,
                          max_grad_norm: float | None, lora: bool) -> None:
    """Fill in what accelerate's config files cannot know: FSDP2 wrap classes; DeepSpeed's micro batch,
    accumulation and clipping (the recipe's, overriding whatever the DeepSpeed config says)."""
    kind = str(accelerator.distributed_type)
    if kind.endswith("FSDP"):
        plugin = accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError("saisa trains with FSDP2 only (fsdp_version: 2 in the accelerate config); FSDP1 "
                             "flattens parameters, which the piecewise decoder cannot use")
        if lora:
            raise ValueError("LoRA under FSDP is not supported (the export merges adapters on one process); use "
                             "configs/accelerate/ddp.yaml or zero2.yaml for LoRA")
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        wanted = fsdp_wrap_classes(model)
        if plugin.transformer_cls_names_to_wrap and list(plugin.transformer_cls_names_to_wrap) != wanted:
            logger.warning("FSDP2: wrapping %s instead of the configured %s (the model never calls a decoder "
                           "layer's forward)", wanted, plugin.transformer_cls_names_to_wrap)
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
        plugin.transformer_cls_names_to_wrap = wanted
        if accelerator.mixed_precision == "bf16":
            # accelerate's default also reduces gradients and returns outputs in bf16; as torchtitan, reduce in fp32
            # and leave outputs as computed (the model's loss is fp32, logits stay bf16).
            import torch
            from torch.distributed.fsdp import MixedPrecisionPolicy

            plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.float32)
    elif kind.endswith("DEEPSPEED"):
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch
        ds["gradient_accumulation_steps"] = accumulation
        ds["train_batch_size"] = micro_batch * accumulation * accelerator.num_processes
        ds["gradient_clipping"] = max_grad_norm if max_grad_norm is not None else 0.0


def ddp_kwargs(has_text_only_samples: bool) -> list[Any]:
    """DDP must tolerate an unused projector when a micro-batch holds no image (text-only samples in the mix)."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=has_text_only_samples)]


def mixed_precision(precision: str) -> str:
    """accelerate's name for the recipe's precision: bf16 autocast over fp32 master weights, or plain fp32."""
    return {"bf16": "bf16", "fp32": "no"}[precision]


def parallelize(model: nn.Module, *, gradient_checkpointing: bool, compile: bool,
                visual_recompute: bool = False, fused_visual_kv: bool = True) -> nn.Module:
    """Apply activation checkpointing (decoder layers; the saisa visual path with `visual_recompute`, or its one
    autograd Function with `fused_visual_kv`) and compile (in that order); sharding happens in
    `accelerator.prepare`."""
    if gradient_checkpointing:
        apply_activation_checkpointing(model)
    if visual_recompute:
        core_model(model).visual_recompute = True
    core_model(model).fused_visual_kv = fused_visual_kv
    if compile:
        apply_compile(model)
    return model
