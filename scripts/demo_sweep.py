"""Run `saisa demo` variants side by side (one process each, several at once on one GPU) and tabulate them.

Unusual here: it only orchestrates the real CLI. Each variant is `saisa demo --out OUT/<name> <args>`; the synthetic
sets are written once per (scenes, test size) and copied into each variant's folder (the demo reuses a set whose
synth_meta.json matches). Results: OUT/sweep.json (per variant: accuracy, chance, verdicts, image dependence, stage
steps/seconds/final loss, exit code), OUT/sweep.md (the table), OUT/logs.tar.gz (each variant's log, metrics.jsonl
of both stages and results.json).

    python scripts/demo_sweep.py scripts/demo_sweeps/sweep2.json --out $OUT --device cuda --jobs 8 --timeout 520

A variants file maps name -> [training scenes, extra `saisa demo` arguments]; "@synth/" in an argument stands for
the variant's own synth folder. The CPU demo's budget at the time of sweep 1 was 30 stage-1 + 70 stage-2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SYNTH_KEYS = ("data.synth_max_objects", "data.synth_questions")  # recipe keys that change the synthesized set


def synth_set(root: Path, scenes: int, test_scenes: int, key: tuple[str, ...], env: dict[str, str]) -> Path:
    """OUT/_synth_<scenes>_<test>_<max objects>_<questions>/synth, written once by `saisa demo --data-only`."""
    base = root / "_".join(["_synth", str(scenes), str(test_scenes), *(v or "d" for v in key)])
    if not (base / "synth" / "synth_meta.json").is_file():
        overrides = [a for k, v in zip(SYNTH_KEYS, key) if v for a in ("--stage1", f"{k}={v}")]
        subprocess.run([sys.executable, "-m", "saisa", "demo", "--data-only", "--out", str(base),
                        "--test-scenes", str(test_scenes), "--stage1", f"data.synthesize={scenes}", *overrides],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    return base / "synth"


def synth_key(extra: list[str]) -> tuple[str, ...]:
    """The variant's overrides of SYNTH_KEYS ("" where it keeps the recipe's value)."""
    return tuple(next((a.split("=", 1)[1] for a in extra if a.startswith(k + "=")), "") for k in SYNTH_KEYS)


def run_variant(name: str, scenes: int, extra: list[str], args: argparse.Namespace, env: dict[str, str]
                ) -> dict:
    out = Path(args.out) / name
    synth = synth_set(Path(args.out), scenes, args.test_scenes, synth_key(extra), env)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(synth, out / "synth")
    extra = [a.replace("@synth/", str(out / "synth") + "/") for a in extra]
    cmd = [sys.executable, "-m", "saisa", "demo", "--out", str(out), "--device", args.device,
           "--test-scenes", str(args.test_scenes), "--eval-batch", str(args.eval_batch),
           "--stage1", f"data.synthesize={scenes}", "--stage2", f"data.synthesize={scenes}",
           "--stage1", f"data.num_workers={args.workers}", "--stage2", f"data.num_workers={args.workers}",
           "--stage1", "log.progress=false", "--stage2", "log.progress=false", *extra]
    t0 = time.perf_counter()
    with (out / "log.txt").open("w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout,
                                check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    row = {"name": name, "scenes": scenes, "args": extra, "rc": rc, "wall_s": time.perf_counter() - t0}
    res = out / "results.json"
    if res.is_file():
        r = json.loads(res.read_text())
        row.update({k: r[k] for k in ("accuracy", "chance", "beats_chance", "all_beat_chance", "image_dependence",
                                      "train_seconds", "steps", "eval_seconds")})
        row["stages"] = {k: {kk: v[kk] for kk in ("steps", "seconds", "final_loss")} for k, v in r["stages"].items()}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: rc={rc} {row.get('accuracy')}", flush=True)
    return row


def table(rows: list[dict]) -> str:
    cats = ["overall", "colour", "shape", "count", "position", "relation", "existence"]
    head = "| variant | rc | train s | " + " | ".join(cats) + " | loss true/swapped |"
    lines = [head, "|" + "---|" * (len(cats) + 4)]
    for r in rows:
        if "accuracy" not in r:
            lines.append(f"| {r['name']} | {r['rc']} |" + " |" * (len(cats) + 2))
            continue
        acc, ch, dep = r["accuracy"], r["chance"], r["image_dependence"]
        cells = [f"{acc[c]:.2f}/{ch[c]:.2f}" for c in cats]
        lines.append(f"| {r['name']} | {r['rc']} | {r['train_seconds']:.0f} | " + " | ".join(cells)
                     + f" | {dep['answer_loss_true_images']:.3f}/{dep['answer_loss_swapped_images']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", help="JSON file: {name: [scenes, [saisa demo args...]]}")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--timeout", type=float, default=520)
    p.add_argument("--only", default="")
    p.add_argument("--test-scenes", type=int, default=600)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    variants = {n: (int(v[0]), list(v[1])) for n, v in json.loads(Path(args.variants).read_text()).items()}
    names = [n for n in variants if not args.only or n in args.only.split(",")]
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for scenes, key in sorted({(variants[n][0], synth_key(variants[n][1])) for n in names}):
        synth_set(root, scenes, args.test_scenes, key, env)  # sets first, so variants do not race to write them
    done: list[dict] = []

    def one(name: str) -> dict:
        row = run_variant(name, *variants[name], args, env)
        done.append(row)  # list.append is atomic; a call killed at its time limit keeps what finished
        (root / "sweep.json").write_text(json.dumps(done, indent=1) + "\n")
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(one, names))
    (root / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = table(rows)
    (root / "sweep.md").write_text(md + "\n")
    print(md)
    with tarfile.open(root / "logs.tar.gz", "w:gz") as tar:
        for n in names:
            for rel in ("log.txt", "results.json", "predictions.jsonl", "stage1/metrics.jsonl",
                        "stage2/metrics.jsonl"):
                f = root / n / rel
                if f.is_file():
                    tar.add(f, arcname=f"{n}/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
