"""Benchmark output: a console table then one JSON line, the results file, and BENCHMARKS.md rendered from results files.

Unusual here: nothing is measured or imported from torch. Every number in BENCHMARKS.md comes from a committed
`benchmarks/results/<name>.json`, so the markdown (and its plot) can be regenerated on any machine.

Results schema (`schema: "saisa.bench/1"`):

    name, created, command, quick, wall_s, sections
    environment  {device, device_type, dtype, torch, transformers, cuda, cudnn, capability, memory_gib, ...}
    setting      the resolved Setting (text/vision/train configs, token counts, batches, recipe sizes)
    ceilings     {copy_gb_per_s (read + written), matmul_tflops, copy_bytes, matmul_n, dtype, copy, matmul}
    systems      {name: {status (built | skipped), source (saisa | hf), arch, variant, method (what ran), note,
                  params_mb, [compile_s], [schedule]}}
    entries      [{section (prefill | ttft | throughput | decode | train), system, arch, batch, text_tokens,
                   [context | stage, llm], status (ok | oom | error | n/a | skipped), [error], [method],
                   [schedule, schedule_settings, [schedule_trials_ms]] (saisa_graphs: the prefill schedule run),
                   median_ms, p10_ms, p90_ms, min_ms, spread, repeats, warmup, clock,
                   flops, bytes, floor_ms, bound (compute | memory), over_floor,
                   peak_mb (the system's weights + peak allocation above them), peak_extra_mb,
                   samples_per_s | tokens_per_s}]
    checks       {system: {reference, rel_err, pass}}: last-position prefill logits of systems computing the same function
    projection   {note, saisa/llava: {stage1_gpu_hours, stage2_gpu_hours, total_gpu_hours}, saisa_over_llava}
    notes        [how each figure was taken]

median_ms is one call's latency: a prefill, a TTFT, a batched prefill (throughput), one decode step (ms per output
token at batch 1) or one training step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA = "saisa.bench/1"
# Paper Table 6: LLM prefill latency (ms), Vicuna-7B + CLIP-L/336, 576 visual tokens, by text tokens.
PAPER_TABLE6 = {"llava": {64: 56.0, 128: 64.4, 256: 75.6}, "saisa": {64: 33.0, 128: 37.1, 256: 45.9}}
# Paper Sec. 5.1 and Fig. 1: training budget on 8 A800 (80G), 7B; SAISA 1.5 h + 8.5 h, LLaVA-1.5 108 GPU-hours.
PAPER_GPU_HOURS = {"saisa": {"stage1": 12.0, "stage2": 68.0, "total": 80.0}, "llava": {"total": 108.0}}
SYSTEM_ORDER = ("saisa", "naavit", "llava", "hf_llava", "saisa_opt", "saisa_graphs", "llava_graphs",
                "hf_llava_graphs", "hf_llava_compile")
SECTION_TITLES = {
    "prefill": "Prefill latency, batch 1 (ms): projector + LLM + last-position logits, vision features given",
    "ttft": "Time to first token, batch 1 (ms): vision tower + prefill + first token",
    "throughput": "Prefill throughput (samples/s)",
    "decode": "Decode (ms per output token)",
    "train": "Training step: forward + backward + AdamW",
}


# ----------------------------------------------------------------------------------------------------- lookups
def _ok(results: dict[str, Any], section: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in results.get("entries", []) if e["section"] == section and e["status"] == "ok"
            and all(e.get(k) == v for k, v in match.items())]


def _one(results, section, system, **match) -> dict[str, Any] | None:
    found = _ok(results, section, system=system, **match)
    return found[0] if found else None


def _variant(results, system: str) -> str:
    return results.get("systems", {}).get(system, {}).get("variant", "eager")


def _source(results, system: str) -> str:
    return results.get("systems", {}).get(system, {}).get("source", "saisa")


def _best(results, section, key: str, pick=min, **match) -> dict[str, Any] | None:
    """The entry with the best `key` among those matching (`arch`, `source`, `fast` = not eager...)."""
    fast = match.pop("fast", None)
    source = match.pop("source", None)
    cands = [e for e in _ok(results, section, **match)
             if (source is None or _source(results, e["system"]) == source)
             and (fast is None or (_variant(results, e["system"]) != "eager") == fast)]
    return pick(cands, key=lambda e: e[key]) if cands else None


def _systems(results) -> list[str]:
    seen = {e["system"] for e in results.get("entries", []) if e["section"] != "train"}
    return [s for s in SYSTEM_ORDER if s in seen] + sorted(seen - set(SYSTEM_ORDER))


# ----------------------------------------------------------------------------------------------------- targets
def _target(name: str, value: float | None, op: str, threshold: float, detail: str) -> dict[str, Any]:
    passed = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
    return {"target": name, "value": value, "op": op, "threshold": threshold, "pass": passed, "detail": detail}


def _ratio(a: dict | None, b: dict | None, key: str) -> tuple[float | None, str]:
    if a is None or b is None:
        return None, "missing: " + ", ".join(n for n, e in (("saisa", a), ("baseline", b)) if e is None)
    return a[key] / b[key], f"{a['system']} {a[key]:.4g} vs {b['system']} {b[key]:.4g}"


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's performance targets, each with its measured value and pass / fail (None: not measured)."""
    setting = results.get("setting", {})
    out = []
    ts = setting.get("text_tokens", [64, 128, 256])
    for i, t in enumerate(ts):
        saisa = _best(results, "prefill", "median_ms", arch="saisa", batch=1, text_tokens=t)
        hf_fast = _best(results, "prefill", "median_ms", source="hf", fast=True, batch=1, text_tokens=t)
        if i == 0:
            value = saisa["median_ms"] if saisa else None
            out.append(_target(f"prefill b1 t={t}: saisa ms", value, "<=", 8.0,
                               f"{saisa['system']}" if saisa else "missing"))
        value, detail = _ratio(saisa, hf_fast, "median_ms")
        out.append(_target(f"prefill b1 t={t}: saisa / HF LLaVA (graphs)", value, "<=", 0.40 if i == 0 else 0.45,
                           detail))
    b = max(setting.get("throughput_batches", [16]))
    value, detail = _ratio(_best(results, "throughput", "samples_per_s", max, arch="saisa", batch=b),
                           _best(results, "throughput", "samples_per_s", max, source="hf", batch=b), "samples_per_s")
    out.append(_target(f"prefill throughput b{b}: saisa / HF LLaVA", value, ">=", 3.0, detail))
    value, detail = _ratio(_one(results, "decode", "saisa"), _one(results, "decode", "llava"), "median_ms")
    out.append(_target("decode ms/token: saisa / our llava", value, "<=", 1.05, detail))
    for stage in (1, 2):
        # Each architecture at its fastest training method (eager, or the step replayed as a CUDA graph).
        saisa, llava = (_best(results, "train", "samples_per_s", max, system=arch, stage=stage)
                        for arch in ("saisa", "llava"))
        value, detail = _ratio(saisa, llava, "samples_per_s")
        if saisa and llava:
            detail += f" ({saisa.get('method', 'eager')} vs {llava.get('method', 'eager')})"
        out.append(_target(f"train stage {stage}: saisa / llava samples/s", value, ">=", 2.0, detail))
        if saisa and llava and "peak_mb" in saisa and "peak_mb" in llava:
            value, detail = _ratio(saisa, llava, "peak_mb")
        else:
            value, detail = None, "peak memory not measured (CPU)" if saisa and llava else detail
        out.append(_target(f"train stage {stage}: saisa / llava peak memory", value, "<=", 0.5, detail))
    return out


# ----------------------------------------------------------------------------------------------------- console
def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.0f}"


def format_table(results: dict[str, Any]) -> str:
    """Every entry on one line: the console view."""
    head = (f"{'section':<10} {'system':<17} {'b':>3} {'t':>4} {'median ms':>10} {'p10-p90':>15} {'floor ms':>9} "
            f"{'bound':<7} {'x floor':>7} {'peak MiB':>9}  {'rate':>12}  status")
    lines = [head, "-" * len(head)]
    for e in results.get("entries", []):
        rate = e.get("samples_per_s") or e.get("tokens_per_s")
        unit = "tok/s" if "tokens_per_s" in e else "smp/s"
        spread = f"{_fmt(e.get('p10_ms'))}-{_fmt(e.get('p90_ms'))}" if "p10_ms" in e else "-"
        label = e["system"] + (f" s{e['stage']}" if "stage" in e else "")
        label += " graph" if e.get("method") == "cuda_graph" and e["section"] == "train" else ""
        status = e["status"] + (f" ({e['error'][:60]})" if e.get("error") else "")
        lines.append(
            f"{e['section']:<10} {label:<17} {e.get('batch', ''):>3} {e.get('text_tokens', ''):>4} "
            f"{_fmt(e.get('median_ms')):>10} {spread:>15} {_fmt(e.get('floor_ms')):>9} {e.get('bound', '-'):<7} "
            f"{_fmt(e.get('over_floor'), 1):>7} {_fmt(e.get('peak_mb'), 0):>9}  "
            f"{(_fmt(rate, 1) + ' ' + unit) if rate else '-':>12}  {status}")
    c = results.get("ceilings")
    if c:
        lines.append(f"ceilings: copy {c['copy_gb_per_s']:.4g} GB/s (read + write), matmul {c['matmul_tflops']:.4g} "
                     f"TFLOP/s ({c['dtype']}, n={c['matmul_n']})")
    proj = results.get("projection") or {}
    for arch in ("saisa", "llava"):
        if arch in proj:
            p = proj[arch]
            lines.append(f"projected LLaVA-1.5 recipe, {arch}: {p['total_gpu_hours']:.1f} GPU-hours "
                         f"(stage 1 {p['stage1_gpu_hours']:.1f} + stage 2 {p['stage2_gpu_hours']:.1f}); a projection")
    for name, c in (results.get("checks") or {}).items():
        lines.append(f"check {'ok  ' if c['pass'] else 'FAIL'} {name} vs {c['reference']}: rel err {c['rel_err']:.2e}")
    for t in evaluate_targets(results):
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        lines.append(f"target {mark} {t['target']}: {_fmt(t['value'], 3)} {t['op']} {t['threshold']} ({t['detail']})")
    return "\n".join(lines)


def summary(results: dict[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """The one-line JSON: headline figures and target verdicts; the full results are in the file."""
    prefill: dict[str, dict[str, float]] = {}
    for e in _ok(results, "prefill", batch=1):
        prefill.setdefault(e["system"], {})[str(e["text_tokens"])] = round(e["median_ms"], 3)
    env = results.get("environment", {})
    return {
        "bench": results.get("name"), "device": env.get("device"), "torch": env.get("torch"),
        "transformers": env.get("transformers"), "file": str(path) if path else None, "wall_s": results.get("wall_s"),
        "prefill_b1_ms": prefill,
        "failed_entries": sum(e["status"] in ("oom", "error") for e in results.get("entries", [])),
        "targets": {t["target"]: {"value": t["value"], "pass": t["pass"]} for t in evaluate_targets(results)},
    }


def print_report(results: dict[str, Any], path: str | Path | None = None) -> None:
    print(format_table(results))
    print(json.dumps(summary(results, path), separators=(",", ":")))


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, **results}, indent=1, default=str) + "\n")
    return path


def load_results(results_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(Path(results_dir).glob("*.json"))
    loaded = [(f, json.loads(f.read_text())) for f in files]
    return [(f, r) for f, r in loaded if r.get("schema") == SCHEMA]


# ----------------------------------------------------------------------------------------------------- markdown
def _md_table(header: list[str], rows: Iterable[list[str]], text_columns: int = 1) -> list[str]:
    """A markdown table: the first `text_columns` columns left-aligned, numbers right-aligned."""
    rule = "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)]


def _cell(e: dict[str, Any] | None, key: str = "median_ms", digits: int = 2) -> str:
    if e is None:
        return "-"
    if e["status"] != "ok":
        return e["status"]
    floor = f" / {_fmt(e['floor_ms'])} {e['bound'][:3]}" if key == "median_ms" and "floor_ms" in e else ""
    return f"{_fmt(e[key], digits)}{floor}"


def _any(results, section, system, **match) -> dict[str, Any] | None:
    """The entry whatever its status (to show oom / error / n/a in a cell)."""
    for e in results.get("entries", []):
        if e["section"] == section and e["system"] == system and all(e.get(k) == v for k, v in match.items()):
            return e
    return None


def _latency_section(results, section: str, shapes: list[tuple[int, int]], label) -> list[str]:
    systems = [s for s in _systems(results) if any(_any(results, section, s, batch=b, text_tokens=t)
                                                     for b, t in shapes)]
    if not systems:
        return []
    header = ["system", "method"] + [label(b, t) for b, t in shapes] + ["peak MiB (last)"]
    rows = []
    for s in systems:
        cells = [_any(results, section, s, batch=b, text_tokens=t) for b, t in shapes]
        method = next((c.get("method") for c in cells if c and c.get("method")), _variant(results, s))
        last = next((c for c in reversed(cells) if c and "peak_mb" in c), None)
        rows.append([s, method, *(_cell(c) for c in cells), _fmt(last["peak_mb"], 0) if last else "-"])
    ratio_rows = []
    for base in ("hf_llava", "llava", "hf_llava_graphs"):
        for num in ("saisa", "saisa_graphs"):
            vals = []
            for b, t in shapes:
                a, c = _one(results, section, num, batch=b, text_tokens=t), _one(results, section, base, batch=b,
                                                                                   text_tokens=t)
                vals.append(_fmt(a["median_ms"] / c["median_ms"], 3) if a and c else "-")
            if any(v != "-" for v in vals):
                ratio_rows.append([f"ratio {num} / {base}", "", *vals, ""])
    lines = [f"### {SECTION_TITLES[section]}", "",
             ("Each cell: median / floor (the larger of FLOPs over the measured matmul rate and bytes over the "
              "measured copy bandwidth; com = compute-bound, mem = memory-bound)."), ""]
    return lines + _md_table(header, rows + ratio_rows, text_columns=2) + [""] + _schedules(results, section, shapes)


def _schedules(results, section: str, shapes: list[tuple[int, int]]) -> list[str]:
    """One line per system whose entries record a prefill schedule: the one run at each shape, with the trials."""
    lines = []
    for s in _systems(results):
        parts = []
        for b, t in shapes:
            e = _one(results, section, s, batch=b, text_tokens=t)
            if e and e.get("schedule"):
                trials = e.get("schedule_trials_ms") or {}
                timed = ", ".join(f"{n} {_fmt(ms, 2)}" for n, ms in trials.items() if isinstance(ms, (int, float)))
                shape = f"t={t}" if b == 1 else f"b={b} t={t}"
                parts.append(f"{shape} {e['schedule']}" + (f" ({timed} ms)" if timed else ""))
        if parts:
            lines.append(f"{s} prefill schedule: " + "; ".join(parts) + ".")
    return [*lines, ""] if lines else []


def _paper_section(results) -> list[str]:
    ts = [t for t in results.get("setting", {}).get("text_tokens", []) if t in PAPER_TABLE6["llava"]]
    if not ts:
        return []
    header = ["t", "paper LLaVA", "paper SAISA", "paper ratio"]
    pairs = [("hf_llava", "saisa", "eager"), ("hf_llava_graphs", "saisa_graphs", "graphs")]
    for hf, ours, tag in pairs:
        header += [f"HF LLaVA {tag}", f"saisa {tag}", f"ratio {tag}", f"HF / paper LLaVA ({tag})",
                   f"saisa / paper SAISA ({tag})"]
    rows = []
    for t in ts:
        pl, ps = PAPER_TABLE6["llava"][t], PAPER_TABLE6["saisa"][t]
        row = [str(t), _fmt(pl, 1), _fmt(ps, 1), _fmt(ps / pl, 3)]
        for hf, ours, _ in pairs:
            a, b = _one(results, "prefill", hf, batch=1, text_tokens=t), _one(results, "prefill", ours, batch=1,
                                                                               text_tokens=t)
            ma, mb = (a or {}).get("median_ms"), (b or {}).get("median_ms")
            row += [_fmt(ma), _fmt(mb), _fmt(mb / ma, 3) if ma and mb else "-", _fmt(ma / pl, 3) if ma else "-",
                    _fmt(mb / ps, 3) if mb else "-"]
        rows.append(row)
    return ["### Compared with the paper's Table 6 (prefill latency, ms)", "",
            ("The paper does not state the GPU or software of Table 6 (it trains on A800 80G); compare the ratios, "
             "not the milliseconds."),
            ""] + _md_table(header, rows) + [""]


def _train_notes(entries: list[dict[str, Any]]) -> str:
    """How the step was run, where the entries say (results before the chunked loss carry no `loss` key)."""
    notes = ""
    if any(e.get("loss") == "chunked" for e in entries):
        notes += " Loss chunked through the lm_head, without the full-vocabulary logits (saisa.model.loss)."
    if any(e.get("visual_recompute") for e in entries):
        notes += " saisa stage 2 recomputes its visual K/V in backward (model.visual_recompute)."
    if any(e.get("fused_visual_kv") for e in entries):
        notes += (" saisa stage 2 computes its visual K/V in one autograd Function that recomputes the projector MLPs"
                  " in backward (model.fused_visual_kv).")
    if any(e.get("method") == "cuda_graph" for e in entries):
        notes += (" (cuda_graph): the whole step, AdamW with capturable=True, captured once and replayed as one CUDA graph"
                  " (saisa.train.graphed.GraphedTrainStep); the targets take each system's faster method.")
    return notes


def _train_section(results) -> list[str]:
    entries = [e for e in results.get("entries", []) if e["section"] == "train"]
    if not entries:
        return []
    rows = []
    for e in entries:
        method = "" if e.get("method", "eager") == "eager" else f" ({e['method']})"
        rows.append([f"stage {e['stage']} {e['system']}{method}", e.get("llm", "-"), str(e.get("batch", "-")),
                     _cell(e), _fmt(e.get("samples_per_s"), 2), _fmt(e.get("peak_mb"), 0),
                     _fmt(e.get("trainable_params", 0) / 1e6, 1) if e["status"] == "ok" else "-"])
    lines = [f"### {SECTION_TITLES['train']}", "",
             "Vision tower frozen and run each step; stage 1: LLM frozen, projector trained (saisa: one shared MLP); "
             "stage 2: LLM and projector trained. Peak memory = the model's weights + the peak allocated above "
             "them (gradients, AdamW state, activations)." + _train_notes(entries), ""]
    lines += _md_table(["run", "LLM (layers x h)", "micro-batch", "step ms / floor", "samples/s", "peak MiB",
                        "trainable M"], rows, text_columns=2) + [""]
    proj = results.get("projection") or {}
    if any(a in proj for a in ("saisa", "llava")):
        lines += ["#### Projected GPU-hours of the LLaVA-1.5 recipe", "",
                  f"A projection, not a measured run: {proj['note']}.", ""]
        prow = [[a, _fmt(proj[a]["stage1_gpu_hours"], 1), _fmt(proj[a]["stage2_gpu_hours"], 1),
                 _fmt(proj[a]["total_gpu_hours"], 1)] for a in ("saisa", "llava") if a in proj]
        lines += _md_table(["arch", "stage 1 GPU-h", "stage 2 GPU-h", "total GPU-h"], prow)
        if "saisa_over_llava" in proj:
            paper = PAPER_GPU_HOURS["saisa"]["total"] / PAPER_GPU_HOURS["llava"]["total"]
            lines += ["", (f"saisa / llava: {proj['saisa_over_llava']:.3f} (paper, 7B on A800: "
                           f"{PAPER_GPU_HOURS['saisa']['total']:.0f} / {PAPER_GPU_HOURS['llava']['total']:.0f} "
                           f"GPU-hours = {paper:.3f}; our stage 2 runs at a smaller LLM, so compare ratios only)")]
        lines.append("")
    return lines


def _power_section(results) -> list[str]:
    """The SM clock and board power nvidia-smi sampled while each batch-1 prefill was timed (suite's `power`)."""
    rows = [[e["system"], str(e["text_tokens"]), _fmt(e["median_ms"], 3), f"{p['sm_mhz']:.0f}",
             "-".join(f"{v:.0f}" for v in p["sm_mhz_range"]), f"{p['watts']:.0f}", ", ".join(p["clock_reasons"]) or "-",
             str(p["samples"])]
            for e in _ok(results, "prefill", batch=1) if (p := e.get("power"))]
    if not rows:
        return []
    return ["### SM clock and board power while timed (prefill, batch 1)", "",
            ("nvidia-smi sampled every 50 ms during each entry's timed calls (medians; its power reading trails short "
             "windows). An H100 SXM lowers its SM clock at the 700 W board limit (\"sw power cap\")."), "",
            *_md_table(["system", "t", "median ms", "SM MHz", "SM MHz range", "W", "clock reasons", "samples"], rows,
                       text_columns=1), ""]


def plot_prefill(results: dict[str, Any], path: str | Path) -> Path | None:
    """Prefill latency vs text tokens for every system, with the paper's Table 6 points (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for s in _systems(results):
        pts = sorted((e["text_tokens"], e["median_ms"]) for e in _ok(results, "prefill", system=s, batch=1))
        if pts:
            style = "-" if _variant(results, s) == "eager" else "--"
            ax.plot(*zip(*pts), style, marker="o", label=s)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    setting = results.get("setting", {})
    if set(setting.get("text_tokens", [])) & set(PAPER_TABLE6["llava"]):
        for arch, marker in (("llava", "s"), ("saisa", "^")):
            ts = sorted(PAPER_TABLE6[arch])
            ax.plot(ts, [PAPER_TABLE6[arch][t] for t in ts], ":", marker=marker, color="gray", label=f"paper {arch}")
    env, vc = results.get("environment", {}), setting.get("vision_config", {})
    visual = (vc.get("image_size", 0) // vc.get("patch_size", 1)) ** 2
    ax.set_xlabel(f"text tokens (+ {visual} visual)")
    ax.set_ylabel("prefill latency, batch 1 (ms)")
    ax.set_title(f"{results.get('name', '')}: {env.get('device', '')}, {env.get('dtype', '')}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_results(results: dict[str, Any], plot: str | None = None) -> list[str]:
    """The markdown of one results file (`plot`: the plot's path relative to the markdown file)."""
    env, setting = results.get("environment", {}), results.get("setting", {})
    name = results.get("name", "?")
    lines = [f"## {name}: {env.get('device', '?')}", "",
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, CUDA {env.get('cuda')}, "
             f"dtype {env.get('dtype')}; {results.get('created', '')}; wall {results.get('wall_s')} s"
             + ("; **quick run** (few repeats)" if results.get("quick") else ""),
             "", f"Command: `{results.get('command', '?')}`", ""]
    c = results.get("ceilings")
    if c:
        lines += [(f"Measured ceilings: device-to-device copy {c['copy_gb_per_s']:.4g} GB/s (bytes read + written, "
                   f"{c['copy_bytes'] / 2**20:.0f} MiB), matmul {c['matmul_tflops']:.4g} TFLOP/s ({c['dtype']}, "
                   f"{c['matmul_n']}^3, random data)."), ""]
    lines += ["### Targets", ""]
    lines += _md_table(["target", "measured", "required", "result", "detail"], [
        [t["target"], _fmt(t["value"], 3), f"{t['op']} {t['threshold']}",
         {True: "pass", False: "**fail**", None: "not measured"}[t["pass"]], t["detail"]]
        for t in evaluate_targets(results)], text_columns=1) + [""]
    ts = setting.get("text_tokens", [])
    lines += _latency_section(results, "prefill", [(1, t) for t in ts], lambda b, t: f"t={t}")
    lines += _paper_section(results)
    lines += _power_section(results)
    if plot:
        lines += [f"![prefill latency vs text tokens]({plot})", ""]
    lines += _latency_section(results, "ttft", [(1, t) for t in ts], lambda b, t: f"t={t}")
    tput = [(b, setting.get("throughput_text_tokens")) for b in setting.get("throughput_batches", [])]
    tput_lines = _latency_section(results, "throughput", tput, lambda b, t: f"b={b} t={t} ms")
    if tput_lines:
        rows = []
        for s in _systems(results):
            vals = [_one(results, "throughput", s, batch=b, text_tokens=t) for b, t in tput]
            if any(vals):
                rows.append([s, *(_fmt(v["samples_per_s"], 1) if v else "-" for v in vals)])
        tput_lines += ["Samples per second:", ""] + _md_table(["system", *(f"b={b}" for b, _ in tput)], rows) + [""]
    lines += tput_lines
    dec = [(setting.get("decode_batch", 1), setting.get("decode_text_tokens"))]
    ctx = next((e.get("context") for e in results.get("entries", []) if e["section"] == "decode"), None)
    lines += _latency_section(results, "decode", dec, lambda b, t: f"b={b}, context {ctx}")
    lines += _train_section(results)
    checks = results.get("checks") or {}
    if checks:
        lines += ["### Same function, same weights: last-position prefill logits", "",
                  "||system - reference|| / ||reference|| on identical inputs (first shape, first input set).", ""]
        lines += _md_table(["system", "reference", "relative error", "result"], [
            [n, c["reference"], f"{c['rel_err']:.2e}", "ok" if c["pass"] else "**fail**"] for n, c in checks.items()],
            text_columns=2)
        lines.append("")
    notes = [f"- {n}: {s.get('note')}" for n, s in results.get("systems", {}).items() if s.get("note")]
    notes += [f"- {n}" for n in results.get("notes", [])]
    if notes:
        lines += ["### Notes", "", *notes, ""]
    return lines


def render_benchmarks_md(results_dir: str | Path, md_dir: str | Path | None = None) -> str:
    """BENCHMARKS.md from every results file in `results_dir`; writes one plot per file under results_dir's parent.

    `md_dir` is where the markdown will live (default: two levels above results_dir, the repository root), for the
    plots' relative links.
    """
    results_dir = Path(results_dir)
    plots_dir = results_dir.parent
    md_dir = Path(md_dir) if md_dir is not None else results_dir.parent.parent
    lines = ["# Benchmarks", "",
             "Generated by `saisa bench report` from `" + _rel(results_dir, md_dir) + "/*.json`; do not edit by hand. "
             "Random weights at full size (latency does not depend on weight values), batch 1 unless stated. "
             "Every figure is a median of repeated timings (CUDA events on a GPU) and stands next to its floor.", ""]
    loaded = load_results(results_dir)
    if not loaded:
        lines.append("No results yet: run `scripts/bench_gpu.sh` on a GPU and commit its JSON here.")
    for path, results in loaded:
        png = plot_prefill(results, plots_dir / f"prefill_latency_{path.stem}.png")
        lines += render_results(results, _rel(png, md_dir) if png else None)
    return "\n".join(lines).rstrip() + "\n"


def _rel(path: Path, start: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(start).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()
