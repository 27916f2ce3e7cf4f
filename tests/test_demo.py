"""`saisa demo` plumbing on a tiny random LLM + tiny CLIP tower (the full demo is the README's first command, not CI's),
the `random:<config dir>` LLM that scripts/train_gpu.sh trains, and that script's loss-curve comparison."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_text_config, tiny_vision_config

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = ROOT / "assets" / "smollm2-135m-config"
CATEGORIES = ("colour", "shape", "count", "position", "relation", "existence")


def tiny_llm_dir(path: Path) -> Path:
    """A 2-layer Llama config beside SmolLM2's tokenizer and chat template (the committed ones)."""
    path.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SMOLLM2_CONFIG / name, path / name)
    cfg = tiny_text_config(vocab_size=49152, pad_token_id=2, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=True)
    from transformers import AutoConfig

    AutoConfig.for_model(**cfg).save_pretrained(path)
    return path


def tiny_tower_dir(path: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in tiny_vision_config().items() if k != "model_type"})
                    ).save_pretrained(path)
    return path


def test_demo_end_to_end_tiny(tmp_path, capsys):
    from saisa.demo import main

    llm, tower = tiny_llm_dir(tmp_path / "llm"), tiny_tower_dir(tmp_path / "tower")
    out = tmp_path / "demo"
    small = ["schedule.max_steps=2", "schedule.global_batch=4", "schedule.micro_batch=4", "log.progress=false"]
    argv = ["--out", str(out), "--test-scenes", "12", "--eval-batch", "5",
            *[x for o in [f"model.llm=random:{llm}", f"model.vision={tower}", "model.init_delta=null",
                          "data.synthesize=16", *small]
              for x in ("--stage1", o)],
            *[x for o in small for x in ("--stage2", o)]]
    t0 = time.perf_counter()
    assert main(argv) == 0
    assert time.perf_counter() - t0 < 60

    results = json.loads((out / "results.json").read_text())
    for key in ("architecture", "accuracy", "chance", "train_seconds", "steps", "checkpoint", "eval_seconds",
                "total_seconds", "flops", "config", "example", "beats_chance"):
        assert key in results, key
    assert results["architecture"] == "saisa" and results["steps"] == 4
    assert set(results["accuracy"]) == {"overall", *CATEGORIES} == set(results["chance"])
    assert all(0.0 <= v <= 1.0 for v in results["accuracy"].values())
    assert 0.0 < results["flops"]["saisa_over_llava"] < 1.0
    assert (Path(results["checkpoint"]) / "config.json").is_file()
    assert (out / "accuracy.png").stat().st_size > 1000
    assert len((out / "predictions.jsonl").read_text().splitlines()) == results["test_questions"] == 12
    printed = capsys.readouterr().out
    assert "Q: " + results["example"]["question"] in printed and "saisa/llava" in printed

    # --reuse evaluates the saved model without training; the synthetic set is reused as it is
    images = sorted((out / "synth" / "images" / "train").iterdir())
    before = images[0].stat().st_mtime_ns
    assert main([*argv, "--reuse"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["stages"] == results["stages"] and again["accuracy"] == results["accuracy"]
    assert images[0].stat().st_mtime_ns == before

    # describe-first answering: each prediction comes with the model's description of its image
    assert main([*argv, "--reuse", "--answer-mode", "describe-first"]) == 0
    described = json.loads((out / "results.json").read_text())
    assert described["answer_mode"] == "describe-first" and "description" in described["example"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(isinstance(r["description"], str) and r["reference_caption"] for r in rows)


def test_demo_recipes_start_from_the_shipped_checkpoint(tmp_path, monkeypatch):
    """The demo's stage 1 resolves assets/demo/ from any working directory, packed against the parts it builds; the
    synthetic set is the one the checkpoint trained on (so the test split holds scenes it never saw)."""
    import argparse

    from saisa.demo import add_arguments, load_stage_recipes
    from saisa.train.delta import read_metadata

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.chdir(tmp_path)
    first, second = load_stage_recipes(parser.parse_args(["--recipes", str(ROOT / "recipes")]))
    meta = read_metadata(first.model.init_delta)
    assert (meta["llm"], meta["vision"]) == (first.model.llm, first.model.vision)
    assert meta["projector_sharing"] == "shared" and first.stage.sharing == "shared"
    assert (first.data.synthesize, first.data.synth_max_objects, first.data.synth_questions, first.seed) == (
        4000, 3, 6, 0)
    assert Path(second.data.json).name == "train_describe_qa.json"
    assert parser.parse_args([]).answer_mode == "describe-first"
    off, _ = load_stage_recipes(parser.parse_args(["--recipes", str(ROOT / "recipes"), "--stage1",
                                                   "model.init_delta=null"]))
    assert off.model.init_delta is None


def test_describe_first_prompts_are_the_training_conversations(tmp_path):
    """The describe-first evaluation asks exactly what stage 2 trained on (SmolLM2's chat template): the caption
    request's prompt is the prefix of train_describe_qa.json's tokens before the caption, and the question's prompt
    (with the description as the assistant turn) is the prefix before the answer."""
    from transformers import AutoTokenizer

    from saisa import SaisaConfig
    from saisa.data.datasets import ConversationDataset
    from saisa.data.processor import SaisaProcessor
    from saisa.data.synth import generate
    from saisa.data.templates import ensure_image_token
    from saisa.demo import _describe_request, _messages, describe_first_record
    from saisa.model.vision import image_processor_for

    generate(tmp_path, n=6, seed=1, n_test=6, image_size=32)
    tok = AutoTokenizer.from_pretrained(SMOLLM2_CONFIG)
    ensure_image_token(tok)
    processor = SaisaProcessor(image_processor_for(SaisaConfig(vision_config=tiny_vision_config()).vision_config), tok)
    test = json.loads((tmp_path / "test_qa.json").read_text())
    for record in test[:3]:
        ds = ConversationDataset([describe_first_record(record)], tok, "chat_template", image_folder=tmp_path,
                                 image_processor=processor.image_processor)
        ids, labels = ds[0]["input_ids"].tolist(), ds[0]["labels"].tolist()
        starts = [i for i in range(1, len(labels)) if labels[i] != -100 and labels[i - 1] == -100]
        assert len(starts) == 2  # the caption, then the answer
        for start, conversation in zip(starts, (_describe_request(record, tmp_path),
                                                _messages(record, tmp_path, record["caption"]))):
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)["input_ids"][0].tolist()
            assert ids[:start] == prompt


def test_random_llm_is_smollm2_shaped_and_seeded():
    from saisa.train.build import load_llm

    torch.manual_seed(123)
    a, tok = load_llm(f"random:{SMOLLM2_CONFIG}")
    after = torch.rand(1)
    b, _ = load_llm(f"random:{SMOLLM2_CONFIG}")
    assert sum(p.numel() for p in a.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    torch.manual_seed(123)
    torch.rand(1)  # the build drew nothing from the caller's RNG stream
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))
    assert tok.chat_template and len(tok) == a.config.vocab_size


def _metrics(path: Path, losses: list[float]) -> Path:
    path.write_text("".join(json.dumps({"step": i + 1, "loss": x, "lr": 1e-3}) + "\n" for i, x in enumerate(losses)))
    return path


def test_train_gpu_compare(tmp_path):
    a = _metrics(tmp_path / "a.jsonl", [4.0 - 0.1 * i for i in range(20)])
    b = _metrics(tmp_path / "b.jsonl", [4.0 - 0.1 * i + 0.05 for i in range(20)])
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "train_gpu.sh"), "compare", str(a), str(b),
                           str(tmp_path / "c.png")], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["common_steps"] == 20
    assert report["mean_abs_diff_smoothed_last_half"] == pytest.approx(0.05)
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_build_model_initialises_the_projector_the_same_every_time(tmp_path):
    from saisa.train.build import build_model
    from saisa.train.config import ModelConfig

    cfg = ModelConfig(llm=f"random:{tiny_llm_dir(tmp_path / 'llm')}", vision=str(tiny_tower_dir(tmp_path / 'tower')))
    torch.manual_seed(1)
    a = build_model(cfg, projector_sharing="shared")[0].multi_modal_projector.state_dict()
    torch.manual_seed(2)
    b = build_model(cfg, projector_sharing="shared")[0].multi_modal_projector.state_dict()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
