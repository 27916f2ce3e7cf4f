"""`saisa demo`: the embedded end-to-end run, under 10 minutes on a 2-core CPU, offline after the first download.

SmolLM2-135M-Instruct + EfficientNet-Lite0 (pinned PyPI wheels, `saisa.assets`) learn the synthetic shapes set
(`saisa.data.synth`, 1-3 shapes per scene): stage 1 (`recipes/demo-stage1.yaml`) trains the shared projector on
captions, stage 2 (`recipes/demo-stage2.yaml`) the per-layer projectors + the whole LLM on describe-then-answer
conversations. Both start from the shipped checkpoint assets/demo/ (`model.init_delta`): the same recipe trained at
~10-20x this budget on a GPU and packed as a 10 MB difference from the two pretrained parts (`saisa.train.delta`);
from the parts alone the CPU budget does not beat chance in every category. The model then answers the held-out
test split (scenes that neither the GPU run nor this one trained on) with batched greedy decoding (left padding):
by default it first describes the image, then answers in the same conversation, as it was trained. Answers are
scored by exact match after `normalize_answer` per category against two blind baselines; the loss of the test
answers with each image swapped for another shows whether the answers depend on the image at all; the FLOPs formula
(paper Sec. 4.4) compares this configuration with LLaVA-1.5 at the measured prompt length.

Unusual here: no training code. Both stages go through `saisa.train.loop.main` with the demo recipes plus dotted
overrides (paths under --out, the architecture, anything given with --stage1/--stage2), so the demo trains what
`saisa train recipes/demo-stage{1,2}.yaml` trains. A category "beats chance clearly" when its accuracy is at least
`MARGIN` (10 points) above the majority-answer baseline, which reads the test answers and so is the strongest
image-blind guess. The verdict is reported as measured, category by category; nothing is dropped.

Why describe first: asked directly after the image, the yes/no categories (relation, existence) stayed at chance
even at 10-20x the CPU budget on a GPU; a caption supervises every attribute of every object, and answering after
one's own description turns relation and existence into reading the description (benchmarks/results/demo-sweep).

Outputs under --out: synth/ (the data, reused by later runs when its size and seed match), stage1/ and stage2/
(metrics.jsonl, loss.png, final/), predictions.jsonl, results.json, accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARGIN = 0.10  # accuracy points over the majority-answer baseline that count as "clearly above chance"
STAGE_RECIPES = ("demo-stage1.yaml", "demo-stage2.yaml")
MAX_NEW_TOKENS = 6  # the longest answer, "bottom right", is 2 tokens + <|im_end|>
DESCRIPTION_TOKENS = 96  # a six-shape caption is ~70 tokens
ANSWER_MODES = ("direct", "describe-first")
DEPENDENCE_RECORDS = 120  # test answers scored with right and swapped images (two teacher-forced passes: ~25 s)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train and evaluate")
    parser.add_argument("--architecture", choices=("saisa", "naavit", "llava"), default="saisa")
    parser.add_argument("--recipes", default=None,
                        help="folder holding demo-stage1.yaml and demo-stage2.yaml (default: ./recipes, else the "
                             "source checkout's recipes/)")
    parser.add_argument("--test-scenes", type=int, default=300,
                        help="held-out questions, balanced over the six categories (default 300)")
    parser.add_argument("--eval-batch", type=int, default=32, help="prompts per generation batch (default 32)")
    parser.add_argument("--stage1", action="append", default=[], metavar="key.sub=value",
                        help="override for the stage-1 recipe (repeatable), e.g. --stage1 schedule.max_steps=10")
    parser.add_argument("--stage2", action="append", default=[], metavar="key.sub=value",
                        help="override for the stage-2 recipe (repeatable), e.g. --stage2 stage.lora_r=64")
    parser.add_argument("--answer-mode", choices=ANSWER_MODES, default="describe-first",
                        help="describe-first (default): the model first describes the image, then answers in the "
                             "same conversation (stage 2 trains on train_describe_qa.json for it); direct: the "
                             "question right after the image (train stage 2 on train_mix.json for it)")
    parser.add_argument("--data-only", action="store_true",
                        help="write the synthetic set and the stage-2 mix under OUT/synth, then stop (for running "
                             "`saisa train recipes/demo-stage{1,2}.yaml` by hand)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip training when OUT/stage2/final exists (only evaluate); by default the demo "
                             "re-trains, reusing only downloaded assets and the synthesized data")


def recipes_dir(explicit: str | None = None) -> Path:
    """The folder with the demo recipes: --recipes, ./recipes, or the source checkout's recipes/."""
    candidates = [Path(explicit)] if explicit else [Path("recipes"), Path(__file__).resolve().parents[2] / "recipes"]
    for folder in candidates:
        if all((folder / name).is_file() for name in STAGE_RECIPES):
            return folder
    raise FileNotFoundError(f"no {' and '.join(STAGE_RECIPES)} in {[str(c) for c in candidates]}; run from the "
                            "saisa checkout or pass --recipes DIR")


def load_stage_recipes(args: argparse.Namespace) -> tuple[Any, Any]:
    """(stage 1, stage 2) TrainRecipes: the demo YAMLs with data and outputs under --out, then the user's overrides."""
    import yaml

    from saisa.train.config import load_recipe

    folder, out = recipes_dir(args.recipes), Path(args.out)
    recipes = []
    for i, (name, extra) in enumerate(zip(STAGE_RECIPES, (args.stage1, args.stage2))):
        raw = yaml.safe_load((folder / name).read_text(encoding="utf-8"))
        data_file = Path(raw["data"]["json"]).name  # train_caption.json / train_describe_qa.json, under OUT/synth
        paths = [f"data.json={out / 'synth' / data_file}", f"output_dir={out / f'stage{i + 1}'}"]
        delta = (raw.get("model") or {}).get("init_delta")
        if delta and not Path(delta).is_absolute() and not Path(delta).exists():  # the checkout's assets/
            paths.append(f"model.init_delta={folder.resolve().parent / delta}")
        if i == 1:
            paths.append(f"model.init_from={out / 'stage1' / 'final'}")
        recipes.append(load_recipe(folder / name, [f"model.architecture={args.architecture}", *paths, *extra]))
    return recipes[0], recipes[1]


# ------------------------------------------------------------------------------------------------------ data
def prepare_data(folder: Path, n: int, seed: int, n_test: int, max_objects: int = 6, questions: int = 3
                 ) -> dict[str, Any]:
    """The shapes set in `folder` (reused when synth_meta.json says it has this size, seed, test size, object range
    and questions per scene), with train_mix.json (every scene's caption record and QA record, for stage 2) and
    train_describe_qa.json."""
    from saisa.data.synth import DESCRIBE_FILE, MIX_FILE, generate

    meta_path, meta = folder / "synth_meta.json", None
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        have = (meta.get("n_train"), meta.get("seed"), meta.get("n_test"), meta.get("max_objects", 6),
                meta.get("questions_per_scene", 3))
        if have == (n, seed, n_test, max_objects, questions):
            logger.info("reusing the synthetic set in %s", folder)
        else:
            shutil.rmtree(folder)
            meta = None
    if meta is None:
        meta = generate(folder, n=n, seed=seed, n_test=n_test, max_objects=max_objects,
                        questions_per_scene=questions)
    if not all((folder / f).is_file() for f in (MIX_FILE, DESCRIBE_FILE)):  # written by an older synth
        shutil.rmtree(folder)
        meta = generate(folder, n=n, seed=seed, n_test=n_test, max_objects=max_objects,
                        questions_per_scene=questions)
    return meta


# ------------------------------------------------------------------------------------------------------ evaluation
def _messages(record: dict[str, Any], folder: Path, description: str | None = None) -> list[dict[str, Any]]:
    """The test question as the training data asks it: image, question, short-answer instruction. With a
    `description` (describe-first answering), the conversation of train_describe_qa.json: the image with the caption
    request, the description as the assistant's turn, then the question."""
    from saisa.data.synth import SHORT_ANSWER_PROMPT

    question = {"type": "text", "text": f"{record['question']}\n{SHORT_ANSWER_PROMPT}"}
    if description is None:
        return [{"role": "user", "content": [{"type": "image", "path": str(folder / record["image"])}, question]}]
    return [*_describe_request(record, folder), {"role": "assistant", "content": description},
            {"role": "user", "content": [question]}]


def describe_first_record(record: dict[str, Any]) -> dict[str, Any]:
    """A test_qa.json record as train_describe_qa.json asks it: the caption request with the image, the reference
    caption, then the question without the image placeholder."""
    from saisa.data.synth import CAPTION_PROMPT

    human, *rest = record["conversations"]
    return {**record, "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                                        {"from": "gpt", "value": record["caption"]},
                                        {**human, "value": human["value"].removeprefix("<image>\n")}, *rest]}


def _describe_request(record: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    from saisa.data.synth import CAPTION_PROMPT

    return [{"role": "user", "content": [{"type": "image", "path": str(folder / record["image"])},
                                         {"type": "text", "text": CAPTION_PROMPT}]}]


def _generate(model, processor, conversations: list, *, max_new_tokens: int, device: str) -> tuple[list[str], int]:
    """Greedy continuations of a batch of conversations (left padded); also their prompt text tokens (the image
    placeholders not counted)."""
    import torch

    enc = processor.apply_chat_template(conversations, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             pixel_values=enc["pixel_values"].to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=processor.tokenizer.eos_token_id,
                             pad_token_id=processor.tokenizer.pad_token_id)
    texts = [a.strip() for a in processor.batch_decode(out[:, enc["input_ids"].shape[1]:])]
    return texts, int(enc["attention_mask"].sum()) - len(conversations)


def answer_questions(model, processor, records: Sequence[dict[str, Any]], folder: Path, *, batch_size: int,
                     device: str, describe_first: bool = False) -> tuple[list[str], int, list[str] | None]:
    """Greedy answers to `records` (test_qa.json) in left-padded batches; the mean prompt length in text tokens
    (the image placeholder not counted) of the answering pass; with `describe_first`, the model first describes
    each image and then answers in the same conversation, and its descriptions are returned too."""
    answers, descriptions, text_tokens = [], [] if describe_first else None, 0
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        said = None
        if describe_first:
            said, _ = _generate(model, processor, [_describe_request(r, folder) for r in chunk],
                                max_new_tokens=DESCRIPTION_TOKENS, device=device)
            descriptions += said
        texts, n = _generate(model, processor,
                             [_messages(r, folder, said[i] if said else None) for i, r in enumerate(chunk)],
                             max_new_tokens=MAX_NEW_TOKENS, device=device)
        answers += texts
        text_tokens += n
    return answers, round(text_tokens / max(1, len(records))), descriptions


def image_dependence(model, processor, records: Sequence[dict[str, Any]], folder: Path, *, template: str,
                     batch_size: int, device: str, describe_first: bool = False) -> dict[str, float]:
    """Mean loss of the reference answers (teacher forcing) with the right images, and with each image replaced by
    the next record's: equal losses mean the answers ignore the image. With `describe_first` the records are asked
    as in train_describe_qa.json and the loss covers the reference caption and the answer."""
    import torch

    from saisa.data.collate import Collator
    from saisa.data.datasets import ConversationDataset
    if describe_first:
        records = [describe_first_record(r) for r in records]

    data = ConversationDataset(records, processor.tokenizer, template, image_folder=folder, max_length=256,
                               image_aspect_ratio="square", image_processor=processor.image_processor)
    collate = Collator(processor.tokenizer.pad_token_id, image_token_id=model.config.image_token_id)
    sums, n = torch.zeros(2, dtype=torch.float64), 0
    for start in range(0, len(records), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(records)))]).to(device)
        rows = batch.input_ids.shape[0]
        if rows < 2:  # nothing to swap with
            break
        inputs = batch.model_inputs()
        with torch.no_grad():
            for k, shift in enumerate((0, 1)):  # one image per record, so rolling the images mismatches each one
                pixels = torch.roll(batch.pixel_values, shift, dims=0)
                sums[k] += float(model(**{**inputs, "pixel_values": pixels}).loss) * rows
        n += rows
    return {"answer_loss_true_images": float(sums[0]) / max(n, 1), "answer_loss_swapped_images": float(sums[1]) / max(n, 1),
            "records": n}


def flops_vs_llava(model, model_dir: Path, text_tokens: int) -> dict[str, Any]:
    """Formula FLOPs (paper Sec. 4.4) of LLM + projector for one image and `text_tokens`, for all three
    architectures on this model's text config (read from its folder) and its tower's v and d."""
    from saisa.flops import TERA, VisionSpec, all_flops, llm_spec_from_hf
    from saisa.model.vision import vision_feature_dim

    config = model.config
    llm = llm_spec_from_hf(model_dir)  # the saved config's text_config
    vision = VisionSpec(name=config.vision_config.model_type, num_tokens=model.num_visual_tokens,
                        feature_dim=vision_feature_dim(config.vision_config, config.vision_feature_layer))
    formula = all_flops(llm, vision, text_tokens)
    out: dict[str, Any] = {"text_tokens": text_tokens, "visual_tokens": vision.num_tokens,
                           "vision_feature_dim": vision.feature_dim}
    out.update({f"{arch}_gflops": b.total / TERA * 1e3 for arch, b in formula.items()})
    out["saisa_over_llava"] = formula["saisa"].total / formula["llava"].total
    out["this_over_llava"] = formula[config.architecture].total / formula["llava"].total
    return out


def evaluate_folder(model_dir: Path, synth: Path, *, batch_size: int = 32, device: str = "cpu",
                    precision: str = "fp32", template: str = "chat_template", describe_first: bool = False
                    ) -> dict[str, Any]:
    """Answer test_qa.json with the model in `model_dir` (under bf16 autocast if `precision="bf16"`, as it was
    trained; describing each image first if `describe_first`): accuracy per category, both blind baselines, answers
    (and descriptions), image dependence, FLOPs vs LLaVA (for the answering pass's prompt), seconds."""
    import torch

    from saisa import SaisaForConditionalGeneration
    from saisa.data.processor import load_processor
    from saisa.data.synth import chance_accuracy, evaluate

    t0 = time.perf_counter()
    model = SaisaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    processor = load_processor(model_dir, model.config)
    records = json.loads((synth / "test_qa.json").read_text(encoding="utf-8"))
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        answers, t, descriptions = answer_questions(model, processor, records, synth, batch_size=batch_size,
                                                    device=device, describe_first=describe_first)
        dependence = image_dependence(model, processor, records[:DEPENDENCE_RECORDS], synth, template=template,
                                      batch_size=batch_size, device=device, describe_first=describe_first)
    return {"accuracy": evaluate(answers, records), "descriptions": descriptions,
            "chance": {"majority": chance_accuracy(records, "majority"), "uniform": chance_accuracy(records, "uniform")},
            "answers": answers, "records": records, "image_dependence": dependence,
            "flops": flops_vs_llava(model, model_dir, t), "eval_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------------ run
def train_stages(first, second, *, device: str) -> dict[str, Any]:
    """Stage 1 then stage 2 through the train loop; returns steps, seconds and the export of each."""
    import torch
    from accelerate import PartialState

    from saisa.train.loop import main

    PartialState(cpu=device == "cpu")  # the shared state every Accelerator of this process then uses
    out: dict[str, Any] = {}
    for name, recipe in (("stage1", first), ("stage2", second)):
        shutil.rmtree(recipe.output_dir, ignore_errors=True)  # a demo re-trains; stale metrics would mislead
        t0 = time.perf_counter()
        result = main(recipe)
        out[name] = {"steps": result.state.step, "seconds": time.perf_counter() - t0, "export": str(result.export),
                     "final_loss": next((r["loss"] for r in reversed(result.metrics) if r.get("loss") is not None),
                                        None)}
        del result
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def plot_accuracy(accuracy: dict[str, float], chance: dict[str, float], uniform: dict[str, float], path: Path,
                  title: str) -> None:
    """Bars of accuracy per category, with the two blind baselines and the margin (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cats = [c for c in accuracy if c != "overall"] + ["overall"]
    x = list(range(len(cats)))
    fig = Figure(figsize=(8, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar([i - 0.2 for i in x], [accuracy[c] for c in cats], width=0.4, color="tab:orange", label="model")
    ax.bar([i + 0.2 for i in x], [chance[c] for c in cats], width=0.4, color="lightgray",
           label="chance (majority answer)")
    ax.scatter(x, [uniform[c] for c in cats], marker="_", s=400, color="black", label="chance (uniform guess)",
               zorder=3)
    ax.scatter([i + 0.2 for i in x], [chance[c] + MARGIN for c in cats], marker="v", s=30, color="tab:red",
               label=f"clearly above chance (majority + {MARGIN:.0%})", zorder=3)
    for i, c in enumerate(cats):
        ax.text(i - 0.2, accuracy[c] + 0.01, f"{accuracy[c]:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, cats)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    started = time.perf_counter()
    import torch

    from saisa.train.config import RecipeError, to_dict

    if args.device == "cuda" and not torch.cuda.is_available():
        print("saisa demo: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        first, second = load_stage_recipes(args)
    except (RecipeError, FileNotFoundError) as e:
        print(f"saisa demo: {e}", file=sys.stderr)
        return 2
    out, synth = Path(args.out), Path(first.data.json).parent
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepare_data(synth, n=first.data.synthesize or 96, seed=first.seed, n_test=args.test_scenes,
                 max_objects=first.data.synth_max_objects, questions=first.data.synth_questions)
    synth_seconds = time.perf_counter() - t0
    if args.data_only:
        print(f"saisa demo: data in {synth} ({first.data.json}, {second.data.json}, test_qa.json)")
        return 0

    final = Path(second.output_dir) / "final"
    previous = out / "results.json"
    if args.reuse and (final / "config.json").is_file() and previous.is_file():
        logger.info("--reuse: evaluating %s without training", final)
        stages = json.loads(previous.read_text(encoding="utf-8"))["stages"]
    else:
        stages = train_stages(first, second, device=args.device)
    train_seconds = sum(s["seconds"] for s in stages.values())

    describe_first = args.answer_mode == "describe-first"
    ev = evaluate_folder(final, synth, batch_size=args.eval_batch, device=args.device, precision=second.precision,
                         template=second.data.template, describe_first=describe_first)
    acc, chance, uniform = ev["accuracy"], ev["chance"]["majority"], ev["chance"]["uniform"]
    beats = {c: acc[c] >= chance[c] + MARGIN for c in acc}
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for i, (answer, r) in enumerate(zip(ev["answers"], ev["records"])):
            row = {"id": r["id"], "category": r["category"], "question": r["question"], "answer": r["answer"],
                   "prediction": answer}
            if ev["descriptions"] is not None:
                row.update(description=ev["descriptions"][i], reference_caption=r.get("caption"))
            f.write(json.dumps(row) + "\n")
    r = ev["records"][0]  # the first test question, whatever the answer: no cherry-picking
    example = {"image": str(synth / r["image"]), "category": r["category"], "question": r["question"],
               "prediction": ev["answers"][0], "reference": r["answer"]}
    if ev["descriptions"] is not None:
        example["description"] = ev["descriptions"][0]
    results = {
        "architecture": args.architecture,
        "answer_mode": args.answer_mode,
        "accuracy": acc,
        "chance": chance,
        "chance_kind": "majority answer per category on the test split (uniform guess in chance_uniform)",
        "chance_uniform": uniform,
        "margin": MARGIN,
        "beats_chance": beats,
        "all_beat_chance": all(beats.values()),
        "train_seconds": train_seconds,
        "steps": sum(s["steps"] for s in stages.values()),
        "stages": stages,
        "checkpoint": str(final),
        "started_from": first.model.init_delta,
        "eval_seconds": ev["eval_seconds"],
        "synth_seconds": synth_seconds,
        "test_questions": len(ev["records"]),
        "example": example,
        "image_dependence": ev["image_dependence"],
        "flops": ev["flops"],
        "device": args.device,
        "config": {"stage1": to_dict(first), "stage2": to_dict(second)},
    }
    plot_accuracy(acc, chance, uniform, out / "accuracy.png",
                  f"saisa demo ({args.architecture}): {len(ev['records'])} held-out questions, "
                  f"{results['steps']} training steps")
    results["total_seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(report(results, out))
    return 0


def report(results: dict[str, Any], out: Path) -> str:
    """The demo's printout: the example, accuracy vs chance per category, image dependence, FLOPs, times."""
    ex, acc, chance, f = results["example"], results["accuracy"], results["chance"], results["flops"]
    dep = results["image_dependence"]
    lines = []
    if results.get("started_from"):
        lines += [f"started from the shipped checkpoint {results['started_from']} (GPU-trained, see README)", ""]
    lines.append(f"example ({ex['category']}): {ex['image']}")
    if "description" in ex:
        lines.append(f"  model's description: {ex['description']!r}")
    lines += [f"  Q: {ex['question']}",
             f"  model: {ex['prediction']!r}   reference: {ex['reference']!r}", "",
             f"{'category':<11}{'accuracy':>9}{'chance':>8}{'uniform':>9}  beats chance by >= {MARGIN:.0%}"]
    for c in acc:
        verdict = "yes" if results["beats_chance"][c] else "NO"
        lines.append(f"{c:<11}{acc[c]:>9.3f}{chance[c]:>8.3f}{results['chance_uniform'][c]:>9.3f}  {verdict}")
    lines.append("")
    lines.append(f"test-answer loss: right images {dep['answer_loss_true_images']:.3f}, swapped images "
                 f"{dep['answer_loss_swapped_images']:.3f} (equal: the answers ignore the image)")
    lines.append(f"FLOPs per forward (LLM + projector, one image, v={f['visual_tokens']}, t={f['text_tokens']}): "
                 f"saisa {f['saisa_gflops']:.2f} GFLOPs, llava {f['llava_gflops']:.2f} GFLOPs -> saisa/llava = "
                 f"{f['saisa_over_llava']:.3f} ({1 - f['saisa_over_llava']:.0%} saved)")
    lines.append(f"train {results['train_seconds']:.0f} s ({results['steps']} steps), "
                 f"eval {results['eval_seconds']:.0f} s, total {results['total_seconds']:.0f} s")
    lines.append(f"wrote {out / 'results.json'}, {out / 'accuracy.png'}; loss curves in "
                 f"{out / 'stage1' / 'loss.png'} and {out / 'stage2' / 'loss.png'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saisa demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
