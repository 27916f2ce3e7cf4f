"""`saisa train RECIPE [key.sub=value ...] [--resume] [--stop-after N]`.

Unusual here: `add_arguments` / `run` plug into the `saisa` command registry (src/saisa/cli.py), and
`python -m saisa.train.cli` runs the same parser alone, which is what `accelerate launch -m saisa.train.cli` needs
for multi-process runs. Overrides are dotted recipe keys whose values are parsed as YAML (`optim.lr=2e-5`,
`data.group_by=length`, `save_every=null`); an unknown key fails listing the valid ones.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="recipe overrides, values parsed as YAML (e.g. optim.lr=2e-5 schedule.max_steps=100)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in output_dir/checkpoints")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop with a checkpoint after N optimizer steps (the schedule still spans the run)")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")


def run(args: argparse.Namespace) -> int:
    from saisa.train.config import RecipeError, load_recipe, to_dict

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (RecipeError, FileNotFoundError) as e:
        print(f"saisa train: {e}", file=sys.stderr)
        return 2
    if args.print_recipe:
        import yaml

        print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
        return 0
    from accelerate import PartialState

    from saisa.train.loop import NonFiniteError, main

    state = PartialState()
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = main(recipe, resume=args.resume, stop_after=args.stop_after)
    except NonFiniteError as e:
        print(f"saisa train: {e}", file=sys.stderr)
        return 3
    if state.is_main_process:
        where = result.export or result.checkpoint
        print(f"saisa train: {result.state.step} steps done; output {where}")
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saisa train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
