"""Pack a demo stage-2 export as a delta from SmolLM2 + EfficientNet-Lite0, rebuild it, and evaluate the rebuilt model.

Unusual here: the number that matters is the accuracy of the model rebuilt from the packed file (what `saisa demo`
starts from), so the script measures it on the held-out split instead of trusting the reconstruction error alone.
Writes OUT/stage2.safetensors (saisa.train.delta format) and OUT/pack.json (per-tensor kinds and errors summarised,
accuracy of the rebuilt model, and the export's own results.json numbers when given).

    PYTHONPATH=src python3 scripts/pack_demo_checkpoint.py --model RUN/stage2/final --synth RUN/synth \
        --rank 16 --out OUT [--results RUN/results.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from saisa import SaisaForConditionalGeneration
from saisa.demo import evaluate_folder
from saisa.train import delta
from saisa.train.build import build_model
from saisa.train.config import ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the stage-2 export (a from_pretrained folder)")
    ap.add_argument("--synth", required=True, help="the synthetic set it was trained on (test_qa.json)")
    ap.add_argument("--rank", type=int, required=True, help="the LoRA rank it was trained with")
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", default=None, help="the run's results.json (copied into pack.json)")
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--vision", default="efficientnet_lite0")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--describe-first", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    trained = SaisaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    cfg = ModelConfig(llm=args.llm, vision=args.vision, architecture=trained.config.architecture,
                      projector_type=trained.config.projector_type,
                      vision_feature_layer=trained.config.vision_feature_layer)
    base, _, _ = build_model(cfg, projector_sharing=trained.config.projector_sharing)
    file = out / "stage2.safetensors"
    report = delta.pack(trained, base, file, rank=args.rank,
                        metadata={"llm": args.llm, "vision": args.vision, "made_by": "scripts/pack_demo_checkpoint.py",
                                  "source": str(args.model)})
    rebuilt = delta.apply(copy.deepcopy(base), file)
    del trained
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "rebuilt"
        rebuilt.save_pretrained(folder)
        for f in Path(args.model).iterdir():  # tokenizer, image processor, recipe: everything but the weights
            if f.is_file() and not f.name.endswith(".safetensors") and not (folder / f.name).exists():
                shutil.copy(f, folder / f.name)
        ev = evaluate_folder(folder, Path(args.synth), batch_size=64, device=args.device, precision="bf16",
                             describe_first=args.describe_first)
    summary = {
        "file": file.name, "bytes": report["bytes"], "max_rel_error": report["max_rel_error"],
        "kinds": dict(Counter(t["kind"] for t in report["tensors"].values())),
        "worst": sorted(((t["rel_error"], k) for k, t in report["tensors"].items()), reverse=True)[:5],
        "rebuilt_accuracy": ev["accuracy"], "chance": ev["chance"]["majority"],
        "rebuilt_image_dependence": ev["image_dependence"], "describe_first": args.describe_first,
    }
    if args.results:
        r = json.loads(Path(args.results).read_text())
        summary["export_accuracy"] = r["accuracy"]
        summary["export_stages"] = r["stages"]
        summary["config"] = r["config"]
    (out / "pack.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("bytes", "max_rel_error", "kinds", "rebuilt_accuracy")}, indent=1))


if __name__ == "__main__":
    main()
