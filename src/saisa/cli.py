"""The `saisa` command: one argparse parser whose subcommands come from a registry.

Unusual here: `COMMANDS` maps a subcommand name to (help, add_arguments, run); adding `demo`, `train`, `chat` or
`data` is one entry, usually `from_module("saisa.x.cli", help)` for a module defining `add_arguments(parser)` and
`run(args) -> int`. Only the chosen subcommand's arguments are built and `run` imports what it needs inside, so
`saisa flops` never builds a model. Argument types parse and validate up front: a bad value is an argparse error
naming its flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


# ----------------------------------------------------------------------------------------------------- flops
FIGURE_TEXT_TOKENS = (64, 128, 256)  # t values of the paper's Figure 4


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _llm_arg(text: str):
    from saisa.flops import resolve_llm

    try:
        return resolve_llm(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _vision_arg(text: str):
    from saisa.flops import resolve_vision

    try:
        return resolve_vision(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _flops_arguments(parser: argparse.ArgumentParser) -> None:
    from saisa.flops import LLM_PRESETS, VISION_PRESETS

    parser.add_argument("--llm", type=_llm_arg, default="vicuna-7b",
                        help=f"LLM preset {sorted(LLM_PRESETS)} or an HF config directory (default vicuna-7b)")
    parser.add_argument("--vision", type=_vision_arg, default="clip-vit-l-336",
                        help=f"vision preset {sorted(VISION_PRESETS)} or an HF config directory "
                             f"(default clip-vit-l-336)")
    parser.add_argument("--text-tokens", type=_positive_int, default=64,
                        help="t, text tokens (default 64, as the paper)")
    parser.add_argument("--visual-tokens", type=_positive_int, help="v, overrides the vision encoder's token count")
    parser.add_argument("--vision-dim", type=_positive_int, help="d, overrides the vision feature width")
    parser.add_argument("--measured", action="store_true",
                        help="also count FLOPs of a real forward on the meta device (FlopCounterMode)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--plot", metavar="FILE", help="redraw the paper's Figure 4 for this LLM and d into FILE")
    parser.add_argument("--paper", action="store_true",
                        help="print every TFLOPs figure of the paper next to the formula (markdown) and exit")


def _paper_table() -> str:
    from saisa.flops import PAPER_ROWS, TERA, paper_row_flops, resolve_vision

    lines = ["| source | setting | arch | v | d | formula | LLM only | paper | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for row in PAPER_ROWS:
        vision = resolve_vision(row.vision, row.visual_tokens, row.vision_dim)
        b = paper_row_flops(row)
        lines.append(f"| {row.source} | {row.label} | {row.architecture} | {vision.num_tokens} | "
                     f"{vision.feature_dim} | {b.tflops:.3f} | {b.llm / TERA:.3f} | {row.paper_tflops:.2f} | "
                     f"{row.note} |")
    return "\n".join(lines)


def _plot_figure4(path: str, llm, vision) -> None:
    """Paper Figure 4: (a) TFLOPs vs visual tokens for llava/saisa at several t, (b) saisa/llava ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saisa.flops import llava_flops, saisa_flops

    tokens = list(range(32, max(2048, 2 * vision.num_tokens) + 1, 32))
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ("-", "--", ":", "-.")
    for i, t in enumerate(FIGURE_TEXT_TOKENS):
        llava = [llava_flops(llm, replace(vision, num_tokens=v), t).tflops for v in tokens]
        saisa = [saisa_flops(llm, replace(vision, num_tokens=v), t).tflops for v in tokens]
        style = styles[i % len(styles)]
        ax_a.plot(tokens, llava, style, color="gray", label=f"LLaVA-1.5, t={t}")
        ax_a.plot(tokens, saisa, style, color="tab:orange", label=f"SAISA, t={t}")
        ax_b.plot(tokens, [s / l for s, l in zip(saisa, llava)], style, color="tab:orange", label=f"t={t}")
    for ax in (ax_a, ax_b):
        ax.axvline(vision.num_tokens, color="black", lw=0.6, alpha=0.4)
        ax.set_xlabel("number of visual tokens v")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_a.set_ylabel("inference TFLOPs (LLM + projector)")
    ax_a.set_title("(a) TFLOPs with different numbers of tokens")
    ax_b.set_ylabel("FLOPs ratio SAISA / LLaVA-1.5")
    ax_b.set_ylim(0, 1)
    ax_b.set_title("(b) FLOPs ratio of SAISA and LLaVA-1.5")
    fig.suptitle(f"{llm.name}, d={vision.feature_dim} (paper Fig. 4; vertical line: v={vision.num_tokens})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _run_flops(args: argparse.Namespace) -> int:
    from saisa.flops import ARCHITECTURES, TERA, all_flops

    if args.paper:
        print(_paper_table())
        return 0
    llm, vision = args.llm, args.vision
    if args.visual_tokens is not None:
        vision = replace(vision, num_tokens=args.visual_tokens)
    if args.vision_dim is not None:
        vision = replace(vision, feature_dim=args.vision_dim)
    t = args.text_tokens
    formula = all_flops(llm, vision, t)
    measured = {}
    if args.measured:
        from saisa.bench.measured_flops import measure_all

        measured = measure_all(llm, vision, t)
    if args.plot:
        _plot_figure4(args.plot, llm, vision)
    llava_total = formula["llava"].total

    if args.json:
        out: dict[str, object] = {}
        for arch in ARCHITECTURES:
            b = formula[arch]
            entry = {"tflops": b.tflops, "llm_tflops": b.llm / TERA, "projector_tflops": b.projector / TERA}
            if arch in measured:
                entry["measured_tflops"] = measured[arch].tflops
                entry["measured_lm_head_tflops"] = measured[arch].lm_head / TERA
            out[arch] = entry
        out["saisa_over_llava"] = formula["saisa"].total / llava_total
        print(json.dumps(out))
        return 0

    print(f"LLM {llm.name}: n={llm.num_layers} h={llm.hidden_size} m={llm.intermediate_size} k={llm.kv_dim}; "
          f"vision {vision.name}: v={vision.num_tokens} d={vision.feature_dim}; t={t} text tokens")
    head = f"{'arch':<8}{'attn lin':>10}{'scores':>10}{'ffn':>10}{'proj':>10}{'TFLOPs':>10}{'/ llava':>9}"
    print(head + (f"{'measured':>10}{'meas/form':>11}" if measured else ""))
    for arch in ARCHITECTURES:
        b = formula[arch]
        parts = (b.attention_linear, b.attention_scores, b.ffn, b.projector)
        line = f"{arch:<8}" + "".join(f"{p / TERA:>10.3f}" for p in parts)
        line += f"{b.tflops:>10.3f}{b.total / llava_total:>9.3f}"
        if arch in measured:
            line += f"{measured[arch].tflops:>10.3f}{measured[arch].without_lm_head / b.total:>11.4f}"
        print(line)
    if measured:
        print(f"measured excludes the lm_head (not in the paper's formulas): "
              f"{measured['saisa'].lm_head / TERA:.4f} TFLOPs more per forward")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


# ----------------------------------------------------------------------------------------------------- registry
def from_module(module: str, help: str) -> Command:
    """A command whose `add_arguments(parser)` and `run(args) -> int` live in `module`, imported only when used."""
    import importlib

    return Command(
        help=help,
        add_arguments=lambda parser: importlib.import_module(module).add_arguments(parser),
        run=lambda args: importlib.import_module(module).run(args),
    )


COMMANDS: dict[str, Command] = {
    "flops": Command(
        help="inference FLOPs of llava / naavit / saisa (paper Sec. 4.4), optionally measured",
        add_arguments=_flops_arguments,
        run=_run_flops,
    ),
    "bench": from_module("saisa.bench.cli", "latency / throughput / memory suite and BENCHMARKS.md (saisa.bench)"),
    "demo": from_module("saisa.demo", "embedded-default demo: SmolLM2-135M + EfficientNet-Lite0, two stages, eval"),
    "train": from_module("saisa.train.cli", "train a recipe (stage 1 / stage 2), single process or accelerate launch"),
    "chat": from_module("saisa.chat", "multi-turn chat with a saved model: streamed tokens, /image FILE, /reset"),
    "data": from_module("saisa.data.cli", "dataset tools: `data synth` (synthetic shapes VQA), `data check`"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The `saisa` parser; with `selected`, only that subcommand's arguments are added (no other imports)."""
    parser = argparse.ArgumentParser(prog="saisa", description="SAISA, NAAViT and LLaVA-1.5 multimodal LLMs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.help, description=command.help)
        if selected in (None, name):
            command.add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, f"saisa: choose a command: {', '.join(COMMANDS)}\n")
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
