"""`saisa data check` backend: every kind of bad sample is found, counted and named; exit status follows."""

from __future__ import annotations

import json

from PIL import Image
from test_data_helpers import make_tokenizer

from saisa.data.check import check_dataset, check_main

GOOD = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]
LONG = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello world " * 40}]


def _write(tmp_path, records):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "ok.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "img" / "whole.png")
    data = (tmp_path / "img" / "whole.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(data[: len(data) // 2])
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_clean_data_passes(tmp_path, capsys):
    path = _write(tmp_path, [{"id": "a", "image": "img/ok.png", "conversations": GOOD},
                             {"id": "b", "conversations": GOOD[1:0] + [{"from": "human", "value": "Hi"},
                                                                       {"from": "gpt", "value": "Hello."}]}])
    report = check_dataset(path, tokenizer=make_tokenizer(), template="vicuna_v1", max_length=256)
    assert report.ok and report.num_samples == 2 and report.num_multimodal == 1 and report.num_images == 1
    assert check_main(path, tokenizer=make_tokenizer(), max_length=256) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_every_problem_is_counted_with_its_sample(tmp_path, capsys):
    records = [
        {"id": "ok", "image": "img/ok.png", "conversations": GOOD},
        {"id": "missing", "image": "img/nope.png", "conversations": GOOD},
        {"id": "cut", "image": "img/cut.png", "conversations": GOOD},
        {"id": "count", "conversations": GOOD},
        {"id": "masked", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "long", "conversations": LONG},
        {"id": "role", "conversations": [{"from": "bot", "value": "x"}]},
    ]
    path = _write(tmp_path, records)
    report = check_dataset(path, tokenizer=make_tokenizer(), template="vicuna_v1", max_length=64)
    assert {k: v for k, v in report.counts.items() if v} == {
        "missing_image": 1, "corrupt_image": 1, "image_count_mismatch": 1, "fully_masked": 1, "over_length": 1,
        "malformed": 1}
    assert "'missing'" in report.examples["missing_image"][0] and "nope.png" in report.examples["missing_image"][0]
    assert "cut.png" in report.examples["corrupt_image"][0] and "'cut'" in report.examples["corrupt_image"][0]
    assert "'count'" in report.examples["image_count_mismatch"][0]
    assert "'masked'" in report.examples["fully_masked"][0]
    assert "'role'" in report.examples["malformed"][0]
    assert not report.ok and "over_length" not in report.failing  # truncation is a warning unless strict
    assert check_main(path, tokenizer=make_tokenizer(), max_length=64) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "missing_image" in out and "nope.png" in out


def test_over_length_fails_only_when_strict(tmp_path):
    path = _write(tmp_path, [{"id": "long", "conversations": LONG}])
    assert check_dataset(path, tokenizer=make_tokenizer(), max_length=64).ok
    assert not check_dataset(path, tokenizer=make_tokenizer(), max_length=64, strict=True).ok


def test_without_tokenizer_images_and_counts_only(tmp_path, capsys):
    path = _write(tmp_path, [{"id": "missing", "image": "img/nope.png", "conversations": GOOD}])
    report = check_dataset(path)
    assert report.counts["missing_image"] == 1 and not report.tokenizer_checked
    assert "no tokenizer given" in report.summary()
    assert check_main(tmp_path / "absent.json") == 2
