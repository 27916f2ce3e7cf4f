"""Do frozen EfficientNet-Lite0 features hold the synthetic scenes' colours and shapes? A linear probe per layer.

For every object of a synthetic set (`saisa data synth`), the feature token at the object's grid cell is taken from
the stage outputs -1 (1280 channels), -2 (320) and -3 (192) of the ImageNet tower, standardised, and a linear
classifier (softmax regression, L-BFGS, L2 1e-3) is fit on 80 % of the objects to predict the colour and the shape,
then scored on the other 20 %. Prints a table and writes JSON.

    PYTHONPATH=src python3 scripts/probe_features.py --scenes 600 --out benchmarks/results/probe-features.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from PIL import Image

from saisa.data.synth import CELLS, COLOURS, SHAPES, generate
from saisa.model.vision import image_processor_for, load_efficientnet_lite0

LAYERS = (-1, -2, -3)


def features(folder: Path, records: list[dict]) -> tuple[dict[int, torch.Tensor], list[str], list[str]]:
    tower = load_efficientnet_lite0()
    processor = image_processor_for(tower.config)
    feats: dict[int, list[torch.Tensor]] = {k: [] for k in LAYERS}
    colours, shapes = [], []
    for start in range(0, len(records), 50):
        chunk = records[start: start + 50]
        images = [Image.open(folder / r["image"]).convert("RGB") for r in chunk]
        with torch.no_grad():
            states = tower(processor(images, return_tensors="pt")["pixel_values"], output_hidden_states=True)
        for j, r in enumerate(chunk):
            for o in r["objects"]:
                row, col = divmod(CELLS.index(o["cell"]), 3)
                for k in LAYERS:
                    h = states.hidden_states[k][j]
                    side = round(h.shape[0] ** 0.5)
                    fr, fc = min(side - 1, int((row + 0.5) * side / 3)), min(side - 1, int((col + 0.5) * side / 3))
                    feats[k].append(h.view(side, side, -1)[fr, fc])
                colours.append(o["colour"])
                shapes.append(o["shape"])
    return {k: torch.stack(v) for k, v in feats.items()}, colours, shapes


def probe(x: torch.Tensor, labels: list[str], names: tuple[str, ...], cut: int) -> float:
    y = torch.tensor([names.index(n) for n in labels])
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], len(names), requires_grad=True)
    b = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[cut:] @ w + b).argmax(1) == y[cut:]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp, n=args.scenes, seed=args.seed, n_test=0)
        records = json.loads((Path(tmp) / "train_qa.json").read_text())
        feats, colours, shapes = features(Path(tmp), records)
    cut = int(0.8 * len(colours))
    rows = []
    for k in LAYERS:
        row = {"layer": k, "channels": feats[k].shape[1], "objects": len(colours), "train": cut,
               "colour_acc": probe(feats[k], colours, tuple(COLOURS), cut),
               "shape_acc": probe(feats[k], shapes, SHAPES, cut)}
        rows.append(row)
        print(f"layer {k:>2} ({row['channels']:>4} ch): colour {row['colour_acc']:.3f}  shape {row['shape_acc']:.3f}"
              f"  (chance 1/6; {len(colours) - cut} held-out objects)", flush=True)
    Path(args.out).write_text(json.dumps({"scenes": args.scenes, "seed": args.seed, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
