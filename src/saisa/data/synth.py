"""Synthetic shapes scenes: a LLaVA-format caption set (stage 1), a QA set (stage 2) and a held-out QA test split.

Unusual here: every answer comes from a small closed vocabulary per category (`ANSWER_VOCAB`), so accuracy is exact
match after `normalize_answer()` and the blind baselines are computable (`chance_accuracy`). Scenes are 1-6 shapes
on a 3x3 grid, one per cell, with no two sharing both colour and shape, so "the red circle" always names one object.
Yes/no questions are drawn with P(yes) = 1/2; the absent objects of existence questions are confusable (an object of
the scene with its colour or its shape changed), as in POPE's adversarial split. Everything is a function of
`seed` through numpy Generators (no global RNG); train and test use separate streams, and a test scene whose layout
(shape, colour, size, cell of every object) occurs in train is redrawn.

Files under OUT: images/{train,test}/NNNNNN.png, train_caption.json (plain-template captions), train_qa.json (one
multi-turn record per train scene), train_mix.json (both, for a stage 2 on captions and QA), train_describe_qa.json
(per scene one conversation that asks for the caption first, then the questions: for the demo's "describe first"
answering), test_qa.json (one question per record, with "category", "answer" and the scene's
reference "caption"), synth_meta.json (vocabulary, counts, chance accuracies).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "diamond": "diamonds",
           "cross": "crosses"}
COLOURS = {"red": (220, 38, 38), "green": (22, 163, 74), "blue": (37, 99, 235), "yellow": (234, 179, 8),
           "purple": (147, 51, 234), "orange": (249, 115, 22)}
SIZES = ("small", "large")
# grid cells in row-major order (index = 3 * row + col)
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WHERE = {"top left": "in the top left", "top": "at the top", "top right": "in the top right", "left": "on the left",
         "center": "in the center", "right": "on the right", "bottom left": "in the bottom left",
         "bottom": "at the bottom", "bottom right": "in the bottom right"}
MAX_OBJECTS = 6
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}

CATEGORIES = ("colour", "shape", "count", "position", "relation", "existence")
ANSWER_VOCAB: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(k) for k in range(MAX_OBJECTS + 1)),
    "position": CELLS,
    "relation": ("yes", "no"),
    "existence": ("yes", "no"),
}
MIX_FILE = "train_mix.json"  # captions + QA records of the train scenes, for a stage 2 on both
DESCRIBE_FILE = "train_describe_qa.json"  # per scene: caption turn, then the QA turns, in one conversation
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer instruction
CAPTION_PROMPT = "Describe the image briefly."


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major
    jitter: tuple[float, float]  # offset of the centre within its cell, in units of the free margin, in [-1, 1]

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # reading order
    background: tuple[int, int, int]

    @property
    def layout(self) -> tuple:
        return tuple((o.cell, o.shape, o.colour, o.size) for o in self.objects)


# --------------------------------------------------------------------------------------------------------------------
# scenes and pictures


def random_scene(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> Scene:
    n = int(rng.integers(1, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)  # distinct (colour, shape) pairs
    colours = list(COLOURS)
    objects = tuple(
        Obj(shape=SHAPES[int(k) % len(SHAPES)], colour=colours[int(k) // len(SHAPES)],
            size=SIZES[int(rng.integers(2))], cell=c, jitter=(float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))))
        for c, k in zip(cells, kinds)
    )
    background = tuple(int(v) for v in rng.integers(232, 256, size=3))
    return Scene(objects=objects, background=background)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, apex up, centroid lowered a little so it looks centred
        return [(cx + r * math.cos(a), cy + 0.15 * r + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6,
                                                                                  5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "cross":
        w = 0.32 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int = 224, supersample: int = 2) -> Image.Image:
    """Draw the scene (antialiased by drawing `supersample` times larger and downscaling)."""
    s = image_size * supersample
    img = Image.new("RGB", (s, s), scene.background)
    draw = ImageDraw.Draw(img)
    cell = s / 3
    for o in scene.objects:
        r = (0.40 if o.size == "large" else 0.22) * cell
        free = cell / 2 - r - 0.04 * cell
        cx = (o.col + 0.5) * cell + o.jitter[0] * free
        cy = (o.row + 0.5) * cell + o.jitter[1] * free
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[o.colour])
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=COLOURS[o.colour])
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS) if supersample > 1 else img


def caption(scene: Scene) -> str:
    parts = [f"a {o.size} {o.colour} {o.shape} {WHERE[CELLS[o.cell]]}" for o in scene.objects]
    n = len(parts)
    listed = parts[0] if n == 1 else (" and ".join(parts) if n == 2 else ", ".join(parts[:-1]) + ", and " + parts[-1])
    return (f"There is one shape: {listed}." if n == 1
            else f"There are {NUMBER_WORDS[n]} shapes: {listed}.")


# --------------------------------------------------------------------------------------------------------------------
# questions


def _refer(o: Obj, scene: Scene, options: Sequence[tuple[str, ...]], noun: str) -> str:
    """The shortest description of `o` from `options` (attribute tuples) that no other object of the scene fits."""
    for attrs in options:
        if sum(all(getattr(p, a) == getattr(o, a) for a in attrs) for p in scene.objects) == 1:
            words = [getattr(o, a) for a in attrs if a != "shape"]
            return " ".join(["the", *words, o.shape if "shape" in attrs else noun])
    attrs = options[0]
    words = [getattr(o, a) for a in attrs if a != "shape"]
    return " ".join(["the", *words, o.shape if "shape" in attrs else noun, WHERE[CELLS[o.cell]]])


def _holds(a: Obj, rel: str, b: Obj) -> bool:
    return {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[rel]


def ask(category: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of `category` about `scene`, or None when the scene cannot pose it."""
    objs = scene.objects
    o = objs[int(rng.integers(len(objs)))]
    if category == "colour":
        return f"What colour is {_refer(o, scene, [('shape',), ('size', 'shape')], 'object')}?", o.colour
    if category == "shape":
        return f"What shape is {_refer(o, scene, [('colour',), ('size', 'colour')], 'object')}?", o.shape
    if category == "position":
        return f"Where is the {o.name}?", CELLS[o.cell]
    if category == "count":
        u = rng.random()
        if u < 0.4:
            return "How many shapes are there?", str(len(objs))
        if u < 0.7:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            return f"How many {PLURALS[shape]} are there?", str(sum(p.shape == shape for p in objs))
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        return f"How many {colour} shapes are there?", str(sum(p.colour == colour for p in objs))
    if category == "relation":
        if len(objs) < 2:
            return None
        want = bool(rng.random() < 0.5)
        triples = [(a, rel, b) for a in objs for b in objs if a is not b for rel in RELATIONS
                   if _holds(a, rel, b) == want]
        a, rel, b = triples[int(rng.integers(len(triples)))]
        return f"Is the {a.name} {RELATIONS[rel]} the {b.name}?", "yes" if want else "no"
    if category == "existence":
        if rng.random() < 0.5:
            return f"Is there a {o.name} in the image?", "yes"
        present = {(p.colour, p.shape) for p in objs}
        same_shape = {(c, p.shape) for p in objs for c in COLOURS}
        same_colour = {(p.colour, s) for p in objs for s in SHAPES}
        confusable = sorted((same_shape | same_colour) - present)
        colour, shape = confusable[int(rng.integers(len(confusable)))]
        return f"Is there a {colour} {shape} in the image?", "no"
    raise ValueError(f"unknown category {category!r}; choose one of {CATEGORIES}")


# --------------------------------------------------------------------------------------------------------------------
# scoring


_NUMBERS = {w: str(k) for k, w in enumerate(NUMBER_WORDS)}
_SYNONYMS = {"centre": "center", "middle": "center", "colour": "color", **_NUMBERS}


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space, drop articles (a, an, the), number words -> digits, single spaces."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return " ".join(_SYNONYMS.get(w, w) for w in words if w not in ("a", "an", "the"))


def evaluate(predictions: Mapping[str, str] | Sequence[str], references: Sequence[Mapping[str, Any]]
             ) -> dict[str, float]:
    """Exact-match accuracy after `normalize_answer`: `{"overall": acc, <category>: acc, ...}` (fractions in 0..1).

    `predictions`: `{id: text}` or a list aligned with `references` (records of test_qa.json: id, category, answer).
    """
    if isinstance(predictions, Mapping):
        missing = [r["id"] for r in references if r["id"] not in predictions]
        if missing:
            raise KeyError(f"no prediction for {len(missing)} of {len(references)} references, e.g. {missing[:5]}")
        texts = [predictions[r["id"]] for r in references]
    else:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        texts = list(predictions)
    right, total = Counter(), Counter()
    for text, ref in zip(texts, references):
        total[ref["category"]] += 1
        right[ref["category"]] += normalize_answer(text) == normalize_answer(ref["answer"])
    out = {"overall": sum(right.values()) / max(1, sum(total.values()))}
    out.update({c: right[c] / total[c] for c in CATEGORIES if total[c]})
    return out


def chance_accuracy(references: Sequence[Mapping[str, Any]], kind: str = "majority") -> dict[str, float]:
    """Accuracy of a blind answerer per category and overall, on these references.

    kind="majority": always give the category's most frequent answer in `references` (the prior baseline; it reads
    the test answers, so it is an upper bound for image-blind guessing per category). kind="uniform": a uniform guess
    over the category's `ANSWER_VOCAB`.
    """
    if kind not in ("majority", "uniform"):
        raise ValueError(f"kind must be 'majority' or 'uniform', got {kind!r}")
    by_cat: dict[str, Counter] = {}
    for r in references:
        by_cat.setdefault(r["category"], Counter())[normalize_answer(r["answer"])] += 1
    hits = {c: (max(cnt.values()) if kind == "majority" else sum(cnt.values()) / len(ANSWER_VOCAB[c]))
            for c, cnt in by_cat.items()}
    n = sum(sum(cnt.values()) for cnt in by_cat.values())
    out = {"overall": sum(hits.values()) / max(1, n)}
    out.update({c: hits[c] / sum(by_cat[c].values()) for c in CATEGORIES if c in by_cat})
    return out


# --------------------------------------------------------------------------------------------------------------------
# writing the set


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _objects(scene: Scene) -> list[dict[str, str]]:
    return [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": CELLS[o.cell]} for o in scene.objects]


def _human(question: str, with_image: bool) -> dict[str, str]:
    return {"from": "human", "value": ("<image>\n" if with_image else "") + f"{question}\n{SHORT_ANSWER_PROMPT}"}


def generate(out: str | Path, n: int, seed: int, *, n_test: int | None = None, image_size: int = 224,
             questions_per_scene: int = 3, max_objects: int = MAX_OBJECTS) -> dict[str, Any]:
    """Write the set under `out` (see the module docstring); return its metadata (also in synth_meta.json).
    `max_objects` < 6 draws easier scenes (1..max_objects shapes); the answer vocabulary stays the same."""
    if n < 1:
        raise ValueError(f"n (train scenes) must be >= 1, got {n}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    n_test = max(len(CATEGORIES), n // 5) if n_test is None else n_test
    if n_test < 0 or not 1 <= questions_per_scene <= len(CATEGORIES):
        raise ValueError(f"need n_test >= 0 and 1 <= questions_per_scene <= {len(CATEGORIES)}")
    out = Path(out)
    for split in ("train", "test"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)

    rng, train_layouts = _rng(seed, 0), set()
    captions, train_qa, describe_qa = [], [], []
    for i in range(n):
        scene = random_scene(rng, max_objects)
        while scene.layout in train_layouts:
            scene = random_scene(rng, max_objects)
        train_layouts.add(scene.layout)
        image = f"images/train/{i:06d}.png"
        render(scene, image_size).save(out / image)
        captions.append({"id": f"train-{i:06d}-caption", "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}, {"from": "gpt", "value": caption(scene)}]})
        usable = [c for c in CATEGORIES if not (c == "relation" and len(scene.objects) < 2)]
        chosen = [usable[int(k)] for k in rng.choice(len(usable), size=min(questions_per_scene, len(usable)),
                                                     replace=False)]
        conversations, cats = [], []
        for k, cat in enumerate(chosen):
            question, answer = ask(cat, scene, rng)
            conversations += [_human(question, k == 0), {"from": "gpt", "value": answer}]
            cats.append(cat)
        train_qa.append({"id": f"train-{i:06d}-qa", "image": image, "categories": cats, "objects": _objects(scene),
                         "conversations": conversations})
        turns = [{**t, "value": t["value"].removeprefix("<image>\n")} for t in conversations]
        describe_qa.append({"id": f"train-{i:06d}-describe-qa", "image": image, "categories": cats,
                            "conversations": captions[-1]["conversations"] + turns})

    rng, test_layouts, test_qa = _rng(seed, 1), set(), []
    for i in range(n_test):
        cat = CATEGORIES[i % len(CATEGORIES)]  # categories balanced in the test split
        while True:
            scene = random_scene(rng, max_objects)
            if scene.layout in train_layouts or scene.layout in test_layouts:
                continue
            qa = ask(cat, scene, rng)
            if qa is not None:
                break
        test_layouts.add(scene.layout)
        image = f"images/test/{i:06d}.png"
        render(scene, image_size).save(out / image)
        question, answer = qa
        test_qa.append({"id": f"test-{i:06d}", "image": image, "category": cat, "question": question,
                        "answer": answer, "objects": _objects(scene), "caption": caption(scene),
                        "conversations": [_human(question, True), {"from": "gpt", "value": answer}]})

    files = (("train_caption.json", captions), ("train_qa.json", train_qa), (MIX_FILE, captions + train_qa),
             (DESCRIBE_FILE, describe_qa), ("test_qa.json", test_qa))
    for name, records in files:
        (out / name).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    meta = {
        "seed": seed, "n_train": n, "n_test": n_test, "image_size": image_size, "max_objects": max_objects,
        "questions_per_scene": questions_per_scene, "answer_vocab": {c: list(v) for c, v in ANSWER_VOCAB.items()},
        "test_category_counts": dict(Counter(r["category"] for r in test_qa)),
        "chance_majority": chance_accuracy(test_qa, "majority") if test_qa else {},
        "chance_uniform": chance_accuracy(test_qa, "uniform") if test_qa else {},
    }
    (out / "synth_meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def synth_main(out: str | Path, n: int, seed: int = 0, *, n_test: int | None = None, image_size: int = 224,
               questions_per_scene: int = 3, max_objects: int = MAX_OBJECTS) -> int:
    """`saisa data synth` backend: write the set, print a summary; exit code 0, or 2 for bad arguments."""
    try:
        meta = generate(out, n, seed, n_test=n_test, image_size=image_size, questions_per_scene=questions_per_scene,
                        max_objects=max_objects)
    except ValueError as e:
        print(f"saisa data synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {meta['n_train']} train scenes ({meta['n_train']} captions, {meta['n_train']} QA conversations) "
          f"and {meta['n_test']} test questions to {out}")
    if meta["chance_majority"]:
        print("test chance accuracy (majority answer per category): "
              + ", ".join(f"{k} {v:.3f}" for k, v in meta["chance_majority"].items()))
    return 0
