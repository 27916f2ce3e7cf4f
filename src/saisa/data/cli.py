"""`saisa data synth` and `saisa data check`: argument parsing only; the work is in synth.py and check.py."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{synth,check}", required=True)
    synth = sub.add_parser("synth", help="write the synthetic shapes VQA set (LLaVA JSON + PNG scenes)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n", type=int, required=True, help="number of training scenes")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--n-test", type=int, help="held-out test questions (default max(6, n // 5))")
    synth.add_argument("--image-size", type=int, default=224)
    synth.add_argument("--max-objects", type=int, default=6, help="shapes per scene are 1..this (default 6)")
    synth.add_argument("--questions", type=int, default=3,
                       help="questions per training scene, each of another category (1-6, default 3)")
    check = sub.add_parser("check", help="report missing/corrupt images, fully-masked and over-long samples")
    check.add_argument("data", help="LLaVA-format JSON / JSONL file")
    check.add_argument("--image-folder", help="folder the JSON's image paths are relative to")
    check.add_argument("--tokenizer", help="local tokenizer folder (token-level checks are skipped without it)")
    check.add_argument("--template", default="vicuna_v1", help="conversation template (default vicuna_v1)")
    check.add_argument("--max-length", type=int, default=2048)
    check.add_argument("--strict", action="store_true", help="count over-long samples as problems too")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from saisa.data.synth import synth_main

        return synth_main(args.out, args.n, args.seed, n_test=args.n_test, image_size=args.image_size,
                          max_objects=args.max_objects, questions_per_scene=args.questions)
    from saisa.data.check import check_main

    return check_main(args.data, args.image_folder, args.tokenizer, args.template, args.max_length,
                      strict=args.strict)
