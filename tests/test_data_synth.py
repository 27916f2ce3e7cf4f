"""Synthetic shapes set: determinism, held-out split, answer correctness and balance, scoring helpers."""

from __future__ import annotations

import json

import pytest
from test_data_helpers import make_tokenizer

from saisa.data.datasets import ConversationDataset
from saisa.data.synth import (
    ANSWER_VOCAB,
    CATEGORIES,
    CELLS,
    WHERE,
    chance_accuracy,
    evaluate,
    normalize_answer,
    synth_main,
)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert synth_main(out, 40, seed=3, n_test=360, image_size=64) == 0
    return out


def _load(out, name):
    return json.loads((out / name).read_text())


def _layout(record):
    return tuple(sorted(tuple(sorted(o.items())) for o in record["objects"]))


def test_deterministic_per_seed(tmp_path):
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    for out, seed in ((first, 3), (again, 3), (other, 4)):
        assert synth_main(out, 8, seed=seed, n_test=12, image_size=48) == 0
    for name in ("train_caption.json", "train_qa.json", "test_qa.json", "images/train/000007.png",
                 "images/test/000011.png"):
        assert (again / name).read_bytes() == (first / name).read_bytes()
    assert (other / "test_qa.json").read_bytes() != (first / "test_qa.json").read_bytes()


def test_files_and_held_out_split(synth_dir):
    captions, train, test = (_load(synth_dir, n) for n in ("train_caption.json", "train_qa.json", "test_qa.json"))
    assert len(captions) == len(train) == 40 and len(test) == 360
    assert _load(synth_dir, "train_mix.json") == captions + train  # stage 2's captions + QA, written with the set
    assert all((synth_dir / r["image"]).exists() for r in captions + test)
    assert not {_layout(r) for r in train} & {_layout(r) for r in test}  # no scene shared
    assert len({_layout(r) for r in test}) == len(test)
    assert captions[0]["conversations"][0]["value"].startswith("<image>\n")
    assert train[0]["conversations"][0]["value"].startswith("<image>\n")
    assert all("<image>" not in t["value"] for r in train for t in r["conversations"][1:])
    # describe first: the caption record's two turns, then the same QA turns without the image placeholder
    describe = _load(synth_dir, "train_describe_qa.json")
    assert len(describe) == len(train)
    for c, q, d in zip(captions, train, describe):
        assert d["image"] == c["image"] == q["image"] and d["categories"] == q["categories"]
        assert d["conversations"][:2] == c["conversations"]
        assert [t["value"] for t in d["conversations"][2:]] == [t["value"].removeprefix("<image>\n")
                                                                for t in q["conversations"]]
        assert sum(t["value"].count("<image>") for t in d["conversations"]) == 1
    for r in test:  # each test record carries its scene's reference caption (the describe-first evaluation's)
        assert all(f"{o['size']} {o['colour']} {o['shape']} {WHERE[o['cell']]}" in r["caption"] for o in r["objects"])
        assert r["caption"].count(" shape") == 1 and r["caption"].count(", ") + r["caption"].count(" and ") >= len(
            r["objects"]) - 1


def _check_answer(record):
    """Recompute the answer of a test question from the scene's objects."""
    objs, q = record["objects"], record["question"]

    def named(o):
        return f"{o['colour']} {o['shape']}"

    cat = record["category"]
    if cat == "position":
        return next(o["cell"] for o in objs if f"Where is the {named(o)}?" == q)
    if cat == "existence":
        return "yes" if any(f"Is there a {named(o)} in" in q for o in objs) else "no"
    if cat == "count":
        if q == "How many shapes are there?":
            return str(len(objs))
        word = q.split()[2]
        return str(sum(o["shape"] + ("es" if o["shape"] == "cross" else "s") == word or o["colour"] == word
                       for o in objs))
    if cat == "relation":
        (a_o,) = [o for o in objs if q.startswith(f"Is the {named(o)} ")]
        (b_o,) = [o for o in objs if q.endswith(f"the {named(o)}?")]
        ra, ca = divmod(CELLS.index(a_o["cell"]), 3)
        rb, cb = divmod(CELLS.index(b_o["cell"]), 3)
        holds = {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}
        rel = next(r for r in holds if f" {r} " in q.replace("to the ", "").replace(" of", ""))
        return "yes" if holds[rel] else "no"
    # colour / shape: the description must fit exactly one object, whose attribute is the answer
    asked, named_by = ("colour", "shape") if cat == "colour" else ("shape", "colour")
    desc = q.split(" is the ", 1)[1].rstrip("?")
    fits = [o for o in objs if desc in (f"{o[named_by]}", f"{o['size']} {o[named_by]}",
                                        f"{o[named_by]} {WHERE[o['cell']]}")
            or desc in (f"{o[named_by]} object", f"{o['size']} {o[named_by]} object",
                        f"{o[named_by]} object {WHERE[o['cell']]}")]
    assert len(fits) == 1, (q, objs)
    return fits[0][asked]


def test_answers_are_correct_and_in_vocabulary(synth_dir):
    test = _load(synth_dir, "test_qa.json")
    for r in test:
        assert r["answer"] in ANSWER_VOCAB[r["category"]]
        assert r["answer"] == _check_answer(r), r
        assert r["conversations"][1]["value"] == r["answer"]
    for r in _load(synth_dir, "train_qa.json"):
        assert len(r["categories"]) == len(r["conversations"]) // 2
        for cat, turn in zip(r["categories"], r["conversations"][1::2]):
            assert turn["value"] in ANSWER_VOCAB[cat]


def test_category_balance_and_confusable_negatives(synth_dir):
    test = _load(synth_dir, "test_qa.json")
    counts = {c: sum(r["category"] == c for r in test) for c in CATEGORIES}
    assert set(counts.values()) == {60}
    for cat in ("existence", "relation"):
        no = sum(r["answer"] == "no" for r in test if r["category"] == cat) / counts[cat]
        assert 0.3 < no < 0.7, (cat, no)
    for r in test:
        if r["category"] == "existence" and r["answer"] == "no":
            colour, shape = r["question"].split()[3:5]
            # POPE-style adversarial negative: shares colour or shape with an object that is there
            assert any(o["colour"] == colour or o["shape"] == shape for o in r["objects"])


def test_normalize_and_evaluate():
    assert normalize_answer("  The Red.") == "red"
    assert normalize_answer("Top-left!") == "top left"
    assert normalize_answer("three") == "3" and normalize_answer("Centre") == "center"
    refs = [{"id": "1", "category": "colour", "answer": "red"}, {"id": "2", "category": "count", "answer": "3"},
            {"id": "3", "category": "count", "answer": "2"}]
    assert evaluate({"1": "Red.", "2": "three", "3": "4"}, refs) == {"overall": 2 / 3, "colour": 1.0, "count": 0.5}
    assert evaluate(["red", "3", "2"], refs)["overall"] == 1.0
    with pytest.raises(KeyError, match="no prediction for 1"):
        evaluate({"1": "red", "2": "3"}, refs)


def test_chance_accuracy(synth_dir):
    refs = [{"category": "existence", "answer": a} for a in ("yes", "no", "no", "no")]
    assert chance_accuracy(refs) == {"overall": 0.75, "existence": 0.75}
    assert chance_accuracy(refs, "uniform")["existence"] == 0.5
    test = _load(synth_dir, "test_qa.json")
    chance = chance_accuracy(test)
    assert set(chance) == {"overall", *CATEGORIES} and all(0 < v < 0.8 for v in chance.values())
    assert chance_accuracy(test, "uniform")["position"] == pytest.approx(1 / 9)
    meta = _load(synth_dir, "synth_meta.json")
    assert meta["chance_majority"] == pytest.approx(chance)


@pytest.mark.parametrize("name,template", [("train_caption.json", "plain"), ("train_qa.json", "vicuna_v1"),
                                           ("test_qa.json", "chat_template"),
                                           ("train_describe_qa.json", "chat_template")])
def test_synth_files_feed_the_dataset(synth_dir, name, template):
    ds = ConversationDataset.from_json(synth_dir / name, tokenizer=make_tokenizer(), template=template,
                                       background=(0, 0, 0))
    item = ds[0]
    assert len(item["images"]) == 1 and item["images"][0].size == (64, 64)
    assert (item["labels"] != -100).any()


def test_bad_arguments_exit_code(tmp_path, capsys):
    assert synth_main(tmp_path, 0, seed=0) == 2
    assert "n (train scenes) must be >= 1" in capsys.readouterr().err


def test_max_objects_bounds_the_scenes(tmp_path, capsys):
    assert synth_main(tmp_path / "easy", 30, seed=5, n_test=60, image_size=48, max_objects=2) == 0
    records = _load(tmp_path / "easy", "train_qa.json") + _load(tmp_path / "easy", "test_qa.json")
    sizes = {len(r["objects"]) for r in records}
    assert sizes == {1, 2}  # both sizes drawn, never more than 2
    assert json.loads((tmp_path / "easy" / "synth_meta.json").read_text())["max_objects"] == 2
    for record in _load(tmp_path / "easy", "test_qa.json"):
        assert _check_answer(record) == record["answer"]
    assert synth_main(tmp_path / "bad", 4, seed=0, max_objects=7) == 2
    assert "max_objects must be in 1..6" in capsys.readouterr().err


def test_questions_per_scene(tmp_path):
    """--questions 6 asks every category a scene can pose (relation needs two shapes), each once."""
    assert synth_main(tmp_path, 20, seed=2, n_test=12, image_size=48, questions_per_scene=6) == 0
    records = _load(tmp_path, "train_qa.json")
    for r in records:
        usable = [c for c in CATEGORIES if not (c == "relation" and len(r["objects"]) < 2)]
        assert sorted(r["categories"]) == sorted(usable)
    describe = {r["image"]: r for r in _load(tmp_path, "train_describe_qa.json")}
    for r in records:  # the describe-first record asks the same questions after the caption turn
        turns = describe[r["image"]]["conversations"]
        assert len(turns) == 2 + len(r["conversations"])
    assert json.loads((tmp_path / "synth_meta.json").read_text())["questions_per_scene"] == 6
