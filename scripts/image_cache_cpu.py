"""How much of a second question's prefill the image K/V cache removes, on CPU, for a small random saisa/naavit model.

Unusual here: the second question repeats the first one's image at the same place, so with `ImageKVCache` its
prefill skips the vision tower, the projector and every layer's visual K/V and pays only a pixel hash, a splice
and the text forward. Times are medians of `--runs` prefills (`Engine.prefill`, where the cache acts), run
alternately with and without the cache after a warm-up, so a shared CPU's background load falls on both alike; the
per-phase split comes from the engine's own clock. Prints a table, then one JSON line, and writes the same JSON to
benchmarks/results/image_cache_cpu.json.

    PYTHONPATH=src python scripts/image_cache_cpu.py [--runs 21] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from saisa import SaisaConfig, SaisaForConditionalGeneration
from saisa.generate import Engine
from saisa.image_cache import ImageKVCache

ROOT = Path(__file__).resolve().parents[1]
VISION = dict(model_type="clip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
              num_attention_heads=6, image_size=224, patch_size=16)  # 196 visual tokens
TEXT = dict(model_type="llama", vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=0)
IMAGE_TOKEN_ID = 7999


def build(architecture: str) -> SaisaForConditionalGeneration:
    torch.manual_seed(0)
    config = SaisaConfig(vision_config=VISION, text_config=TEXT, architecture=architecture,
                         image_token_id=IMAGE_TOKEN_ID)
    return SaisaForConditionalGeneration(config).eval()


def question(prefix: int, length: int, seed: int) -> torch.Tensor:
    """[system-like prefix] <image> [question]: the image sits at the same offset in every question."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 7000, (prefix,), generator=torch.Generator().manual_seed(0))
    tail = torch.randint(1, 7000, (length,), generator=g)
    return torch.cat([head, torch.tensor([IMAGE_TOKEN_ID]), tail])[None]


def timed_prefill(engine: Engine, ids: torch.Tensor, pixels: torch.Tensor) -> dict:
    engine.timings = type(engine.timings)()
    t0 = time.perf_counter()
    engine.prefill(ids, pixel_values=pixels)
    total = time.perf_counter() - t0
    t = engine.timings
    return {"total_ms": 1e3 * total, "vision_ms": 1e3 * t.vision_s, "visual_kv_ms": 1e3 * t.visual_kv_s,
            "text_ms": 1e3 * t.text_prefill_s}


def summary(samples: list[dict]) -> dict:
    out = {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}
    out["min_total_ms"] = round(min(s["total_ms"] for s in samples), 2)
    return out


def measure(architecture: str, runs: int, prefix: int, q_len: int) -> dict:
    model = build(architecture)
    pixels = torch.randn(1, 3, VISION["image_size"], VISION["image_size"], generator=torch.Generator().manual_seed(1))
    q1, q2 = question(prefix, q_len, seed=1), question(prefix, q_len, seed=2)
    plain = Engine(model)
    cache = ImageKVCache()
    cached = Engine(model, image_cache=cache)
    without, with_hit = [], []
    with torch.no_grad():
        plain.prefill(q1, pixel_values=pixels)  # warm-up (allocator, kernels)
        cached.prefill(q1, pixel_values=pixels)  # first question: a miss that fills the cache
        for run in range(runs):  # interleaved, alternating order, so background load hits both alike
            pair = [(plain, without), (cached, with_hit)]
            for engine, samples in pair if run % 2 == 0 else pair[::-1]:
                samples.append(timed_prefill(engine, q2, pixels))
    a, b = summary(without), summary(with_hit)
    return {
        "architecture": architecture,
        "prefill_ms_without_cache": a["total_ms"],
        "prefill_ms_with_cache_hit": b["total_ms"],
        "removed_fraction": round(1 - b["total_ms"] / a["total_ms"], 3),
        "removed_fraction_of_minima": round(1 - b["min_total_ms"] / a["min_total_ms"], 3),
        "speedup": round(a["total_ms"] / b["total_ms"], 2),
        "without_cache": a,
        "with_cache_hit": b,
        "cache": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in cache.stats().items()},
        "visual_tokens": model.num_visual_tokens,
        "text_tokens": int(q2.shape[1]) - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps medians stable on a shared CPU")
    parser.add_argument("--prefix", type=int, default=24, help="text tokens before the image")
    parser.add_argument("--question", type=int, default=24, help="text tokens after the image")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/image_cache_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(arch, args.runs, args.prefix, args.question) for arch in ("saisa", "naavit")]

    print(f"second question's prefill, CPU, {args.threads} threads, median of {args.runs} (phases: without -> with)")
    print(f"{'arch':<7} {'without':>9} {'with hit':>9} {'removed':>8} {'vision':>15} {'visual K/V':>15} {'text':>15} "
          f"{'hits':>5} {'misses':>6} {'entry MiB':>9}")
    for r in rows:
        a, b, c = r["without_cache"], r["with_cache_hit"], r["cache"]
        phase = {k: f"{a[k]:.1f}->{b[k]:.1f}" for k in ("vision_ms", "visual_kv_ms", "text_ms")}
        print(f"{r['architecture']:<7} {a['total_ms']:>7.1f}ms {b['total_ms']:>7.1f}ms "
              f"{100 * r['removed_fraction']:>7.1f}% {phase['vision_ms']:>15} {phase['visual_kv_ms']:>15} "
              f"{phase['text_ms']:>15} {c['hits']:>5} {c['misses']:>6} {c['bytes'] / 2**20:>9.2f}")
    result = {
        "benchmark": "image_cache_cpu",
        "config": {"vision": VISION, "text": TEXT, "runs": args.runs, "threads": args.threads,
                   "prefix_tokens": args.prefix, "question_tokens": args.question},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
