"""Build a saisa model for training from pretrained parts (an LLM + a vision tower) or from a saved saisa folder.

Unusual here: the parts are loaded with their own classes, a `SaisaConfig` is made from their configs, and their
weights are COPIED into the new model (`load_state_dict`, strict), so a mismatch fails loudly instead of leaving
random weights. `<image>` becomes one special token of the tokenizer and `config.image_token_id`; the embedding table
is not resized, since the model never looks the placeholder id up (it stands for a whole image).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from saisa import SaisaConfig, SaisaForConditionalGeneration
from saisa.train.config import ModelConfig

logger = logging.getLogger(__name__)

EMBEDDED_LLMS = ("smollm2",)
EMBEDDED_TOWERS = ("efficientnet_lite0",)


RANDOM_PREFIX = "random:"
RANDOM_INIT_SEED = 0


def load_llm(name: str) -> tuple[nn.Module, Any]:
    """(causal LM, tokenizer) in float32: `smollm2` (embedded SmolLM2-135M-Instruct), an HF folder / hub id, or
    `random:<folder>` (the folder's config.json, randomly initialised, and its tokenizer files)."""
    if name == "smollm2":
        from saisa.assets import load_smollm2

        return load_smollm2(torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.startswith(RANDOM_PREFIX):
        return _random_llm(name.removeprefix(RANDOM_PREFIX))

    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)


def _random_llm(folder: str) -> tuple[nn.Module, Any]:
    """A causal LM built from `folder`'s config.json with HF's own initialisation, under a fixed seed so that every
    process (and every run) starts from the same weights; for machines that cannot hold the pretrained weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream as it was
        torch.manual_seed(RANDOM_INIT_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    logger.warning("model.llm=%s%s: %s with RANDOM weights (seed %d), not a pretrained LLM", RANDOM_PREFIX, folder,
                   type(model).__name__, RANDOM_INIT_SEED)
    return model, AutoTokenizer.from_pretrained(folder)


def load_vision_tower(name: str) -> nn.Module:
    """`efficientnet_lite0` (embedded ImageNet weights) or an HF folder of a CLIP/SigLIP (vision) model."""
    if name == "efficientnet_lite0":
        from saisa.model.vision import load_efficientnet_lite0

        return load_efficientnet_lite0()
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    model_type = AutoConfig.from_pretrained(name).model_type
    classes = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel, "siglip": SiglipVisionModel,
               "siglip_vision_model": SiglipVisionModel}
    if model_type not in classes:
        raise ValueError(f"model.vision={name!r} is a {model_type!r} checkpoint; expected CLIP or SigLIP "
                         f"({sorted(classes)}) or 'efficientnet_lite0'")
    return classes[model_type].from_pretrained(name, dtype=torch.float32)


def prepare_tokenizer(tokenizer: Any) -> int:
    """Add `<image>` as a special token and make sure a pad token exists; return the image token id."""
    from saisa.data.templates import ensure_image_token

    if tokenizer.pad_token is None:  # LLaVA-1.5 pads Vicuna with unk; padding is masked, any id works
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return ensure_image_token(tokenizer)


def build_model(cfg: ModelConfig, *, projector_sharing: str = "per_layer", seed: int = 0
                ) -> tuple[nn.Module, Any, Any]:
    """(SaisaForConditionalGeneration, tokenizer, image_processor) in float32 on CPU.

    `projector_sharing` applies to saisa built from parts: "shared" for stage 1 (one MLP), "per_layer" otherwise.
    The new projector is initialised under `seed` (torch seeds each process randomly, so without it two runs, or two
    ranks of one run, would start from different projectors). With `cfg.init_from`, the saved model, tokenizer and
    image processor are loaded as they are. `cfg.init_delta` is then applied (`saisa.train.delta.apply`).
    """
    if cfg.init_delta is not None:
        from saisa.train.delta import DeltaError, read_metadata

        meta = read_metadata(cfg.init_delta)
        theirs = {k: meta[k] for k in ("llm", "vision") if meta.get(k)}
        ours = {"llm": cfg.llm, "vision": cfg.vision}
        if cfg.init_from is None and any(ours[k] != v for k, v in theirs.items()):
            raise DeltaError(f"model.init_delta={cfg.init_delta} was packed against {theirs}, but the recipe builds "
                             f"{ours}; set model.llm / model.vision to the delta's parts")
    model, tokenizer, image_processor = _build(cfg, projector_sharing, seed)
    if cfg.init_delta is not None:
        from saisa.train.delta import apply

        apply(model, cfg.init_delta)
        logger.info("applied the delta %s", cfg.init_delta)
    return model, tokenizer, image_processor


def _build(cfg: ModelConfig, projector_sharing: str, seed: int) -> tuple[nn.Module, Any, Any]:
    from saisa.model.vision import image_processor_for

    if cfg.init_from is not None:
        model, tokenizer, image_processor = _load_saved(cfg.init_from)
        if model.config.architecture != cfg.architecture:
            raise ValueError(f"model.architecture={cfg.architecture!r} but {cfg.init_from} holds a "
                             f"{model.config.architecture!r} model; set model.architecture to match")
        return model, tokenizer, image_processor
    llm, tokenizer = load_llm(cfg.llm)
    tower = load_vision_tower(cfg.vision)
    image_token_id = prepare_tokenizer(tokenizer)
    config = SaisaConfig(
        vision_config=tower.config.to_dict(),
        text_config=llm.config.to_dict(),
        architecture=cfg.architecture,
        projector_type=cfg.projector_type,
        projector_sharing=projector_sharing if cfg.architecture == "saisa" else "per_layer",
        image_token_id=image_token_id,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream as it was
        torch.manual_seed(seed)
        model = SaisaForConditionalGeneration(config)
    model.language_model.load_state_dict(llm.state_dict())
    model.vision_tower.load_state_dict(tower.state_dict())
    model.vision_tower.requires_grad_(False)
    logger.info("built %s from %s + %s (image token id %d)", cfg.architecture, cfg.llm, cfg.vision, image_token_id)
    return model, tokenizer, image_processor_for(config.vision_config)


def _load_saved(path: str) -> tuple[nn.Module, Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer

    from saisa.model.vision import image_processor_for

    model = SaisaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.vision_tower.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_token_id = prepare_tokenizer(tokenizer)
    if image_token_id != model.config.image_token_id:
        raise ValueError(f"{path}: tokenizer's <image> id {image_token_id} != config.image_token_id "
                         f"{model.config.image_token_id}; the folder's tokenizer does not belong to its model")
    try:
        image_processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        image_processor = image_processor_for(model.config.vision_config)
    return model, tokenizer, image_processor
