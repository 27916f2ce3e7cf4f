"""Deltas (saisa.train.delta): a trained model rebuilt from its base + the packed file, within the stated error."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, random_pixels, tiny_model

from saisa.train import delta


def _trained_from(base, *, rank: int, seed: int = 5, full_change: str | None = None):
    """base after a 'stage 2': per-layer projectors replaced, LLM linears moved by rank-`rank` updates (a merged
    LoRA), one norm changed; optionally one LLM weight changed at full rank."""
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base)
    if model.config.projector_sharing == "shared":
        model.expand_shared_projector()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("multi_modal_projector"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("proj.weight") and name.startswith("language_model"):
                out_f, in_f = p.shape
                p.add_(0.01 * torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g))
        model.language_model.model.norm.weight.add_(0.1)
        if full_change:
            dict(model.named_parameters())[full_change].add_(0.01 * torch.randn(
                dict(model.named_parameters())[full_change].shape, generator=g))
    return model


@pytest.mark.parametrize("sharing,quantize_from", [("shared", 1 << 16), ("per_layer", 64)])
def test_pack_apply_rebuilds_the_model(tmp_path, monkeypatch, sharing, quantize_from):
    monkeypatch.setattr(delta, "QUANTIZE_MIN_NUMEL", quantize_from)  # 64: the tiny projectors go through int8
    base = tiny_model("saisa", projector_sharing=sharing)
    trained = _trained_from(base, rank=3)
    path = tmp_path / "d.safetensors"
    report = delta.pack(trained, base, path, rank=3, metadata={"recipe": "test"})
    kinds = {k: v["kind"] for k, v in report["tensors"].items()}
    assert not any(k.startswith("vision_tower") for k in kinds)  # unchanged: not stored
    assert all(v == "low_rank" for k, v in kinds.items() if k.endswith("proj.weight") and "language" in k)
    assert kinds["language_model.model.norm.weight"] == "full"
    projector = {v for k, v in kinds.items() if k.startswith("multi_modal_projector") and k.endswith("weight")}
    assert projector == ({"int8"} if quantize_from == 64 else {"full"})
    assert report["max_rel_error"] < 1e-2
    assert delta.read_metadata(path)["recipe"] == "test"

    rebuilt = delta.apply(copy.deepcopy(base), path)  # a shared base is expanded to per-layer first
    assert rebuilt.config.projector_sharing == "per_layer"
    want, got = trained.state_dict(), rebuilt.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        err = float((got[key] - want[key]).norm() / want[key].norm().clamp_min(1e-12))
        assert err < 1e-2, (key, err)
    ids = random_ids(12, seed=2)[None]
    ids[0, 3] = trained.config.image_token_id
    pixels = random_pixels(1)
    with torch.no_grad():
        a, b = trained(input_ids=ids, pixel_values=pixels).logits, rebuilt(input_ids=ids, pixel_values=pixels).logits
    assert float((a - b).norm() / a.norm()) < 2e-2


def test_full_rank_change_falls_back_to_stored_values(tmp_path):
    base = tiny_model("saisa", projector_sharing="per_layer")
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    trained = _trained_from(base, rank=2, full_change=key)
    report = delta.pack(trained, base, tmp_path / "d.safetensors", rank=2)
    assert report["tensors"][key]["kind"] in ("full", "int8")  # not claimed low-rank
    rebuilt = delta.apply(copy.deepcopy(base), tmp_path / "d.safetensors")
    w, r = trained.state_dict()[key], rebuilt.state_dict()[key]
    assert float((w - r).norm() / w.norm()) < 1e-2


def test_bad_delta_files(tmp_path):
    from safetensors.torch import save_file

    base = tiny_model("saisa", projector_sharing="per_layer")
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(delta.DeltaError, match="not a saisa-delta/1 file"):
        delta.apply(base, tmp_path / "plain.safetensors")
    save_file({"nope.weight": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"format": delta.FORMAT})
    with pytest.raises(delta.DeltaError, match="does not have"):
        delta.apply(base, tmp_path / "other.safetensors")
    save_file({"language_model.model.norm.weight": torch.zeros(3)}, tmp_path / "shape.safetensors",
              metadata={"format": delta.FORMAT})
    with pytest.raises(delta.DeltaError, match="another configuration"):
        delta.apply(base, tmp_path / "shape.safetensors")


def test_init_delta_checks_its_parts(tmp_path, monkeypatch):
    """model.init_delta: applied by build_model when packed against the recipe's parts, refused otherwise."""
    from saisa.train import build
    from saisa.train.build import build_model
    from saisa.train.config import ModelConfig

    base = tiny_model("saisa", projector_sharing="shared")
    monkeypatch.setattr(build, "_build", lambda cfg, sharing, seed: (copy.deepcopy(base), None, None))
    trained = _trained_from(base, rank=2)
    for parts, name in (({"llm": "tiny", "vision": "tiny"}, "ok"), ({"llm": "smollm2", "vision": "tiny"}, "bad")):
        delta.pack(trained, base, tmp_path / f"{name}.safetensors", rank=2, metadata=parts)
    built, _, _ = build_model(ModelConfig(llm="tiny", vision="tiny", init_delta=str(tmp_path / "ok.safetensors")),
                              projector_sharing="shared")
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(built.state_dict()[key], trained.state_dict()[key], rtol=0, atol=1e-3)
    with pytest.raises(delta.DeltaError, match="packed against"):
        build_model(ModelConfig(llm="tiny", vision="tiny", init_delta=str(tmp_path / "bad.safetensors")))
