"""`saisa bench [run] [--quick] [--only SECTIONS] [--out FILE]` and `saisa bench report`.

Unusual here: `add_arguments` / `run` plug into the `saisa` command registry (src/saisa/cli.py), and
`python -m saisa.bench.cli` runs the same parser alone, which is how the GPU script calls it (PYTHONPATH=src, no
install). Torch and the models are imported only when a run starts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from pathlib import Path

DEFAULT_RESULTS = Path("benchmarks/results")
# Mirrors of saisa.bench.suite's and .setting's names, so that building the parser imports no torch (tests keep them equal).
SECTIONS = ("prefill", "ttft", "throughput", "decode", "train")
SYSTEMS = ("saisa", "naavit", "llava", "hf_llava", "saisa_opt", "hf_llava_graphs", "saisa_graphs", "llava_graphs")
PRESETS = ("paper", "tiny")
ATTENTION = ("auto", "eager", "sdpa", "flex", "triton")  # "auto" and saisa.model.fused.ATTENTION
SCHEDULES = ("auto", "serial", "overlap", "head4", "head8")  # "auto" and saisa.bench.systems.SAISA_SCHEDULES


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("run", "report"), default="run",
                        help="run the suite (default) or regenerate BENCHMARKS.md from the results files")
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not figures to quote")
    parser.add_argument("--only", type=_csv, default=SECTIONS, metavar="SECTIONS",
                        help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--systems", type=_csv, default=SYSTEMS, metavar="NAMES",
                        help=f"comma-separated inference systems (default: {','.join(SYSTEMS)})")
    parser.add_argument("--compile", action="store_true",
                        help="also time HF LLaVA under torch.compile(mode='reduce-overhead') (prefill, first t only)")
    parser.add_argument("--saisa-attention", choices=ATTENTION, default="auto",
                        help="attention of the compiled saisa text layers (optimize_for_inference(attention=...); "
                             "default auto: text_attention's Triton kernels on CUDA)")
    parser.add_argument("--saisa-schedule", choices=SCHEDULES, default="auto",
                        help="prefill schedule of saisa_graphs (saisa.bench.systems.SAISA_SCHEDULES); auto (default): "
                             "time each per shape and keep the fastest")
    parser.add_argument("--preset", choices=PRESETS, default="paper",
                        help="model shapes: 'paper' (Vicuna-7B + CLIP-L/336, stage 2 at Qwen2-1.5B) or 'tiny'")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="entries that start after this many seconds are recorded as skipped")
    parser.add_argument("--name", help="results name (default: <preset>-<device>)")
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/<name>.json)")
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS), help="report: where the results files are")
    parser.add_argument("--md", default="BENCHMARKS.md", help="report: the markdown file to write")


def _device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; CPUs -> 'cpu'."""
    for word in device_name.lower().replace("-", " ").split():
        if word[:1] in "abhlv" and any(ch.isdigit() for ch in word):
            return word
    return "cpu" if "nvidia" not in device_name.lower() else "gpu"


def run(args: argparse.Namespace) -> int:
    from saisa.bench import report

    if args.action == "report":
        text = report.render_benchmarks_md(args.results_dir, md_dir=Path(args.md).resolve().parent)
        Path(args.md).write_text(text)
        print(f"wrote {args.md} from {args.results_dir}")
        return 0

    from saisa.bench.setting import PRESETS
    from saisa.bench.suite import run_suite

    results = run_suite(PRESETS[args.preset], device=args.device, sections=args.only, systems=args.systems,
                        quick=args.quick, compile_hf=args.compile, budget_s=args.budget_s,
                        saisa_attention=args.saisa_attention, saisa_schedule=args.saisa_schedule,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    env = results["environment"]
    name = args.name or f"{args.preset}-{_device_slug(env['device'])}" + ("-quick" if args.quick else "")
    results = {"name": name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "command": getattr(args, "command_line", None) or shlex.join(["saisa", *sys.argv[1:]]), **results}
    path = report.write_results(results, args.out or DEFAULT_RESULTS / f"{name}.json")
    report.print_report(results, path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saisa bench", description="saisa benchmarks (see BENCHMARKS.md)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "saisa.bench.cli", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
