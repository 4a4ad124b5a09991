"""The `jaxpref` command.

    jaxpref demo [--quick] [--out DIR]             the whole pipeline on the built-in task, with a report
    jaxpref profile --config F [key=value ...] [--topology v5e-16]   a recipe's real step: time, FLOPs, memory
    jaxpref data shapes --out DIR                  write the built-in task's datasets
    jaxpref data inspect PATH                      schema, counts and a few rows of a dataset
    jaxpref generate --model DIR --image P --prompt T
    jaxpref tower --out DIR                        pretrain a vision tower on the built-in task
    jaxpref sft --config F [key=value ...]         (and reward, dpo, ppo)
    jaxpref export --merge ADAPTER_DIR --out DIR   a LoRA adapter folded into its base (full HF directory)
    jaxpref eval --policy DIR --reference DIR --data DIR [--judge NAME]   judge / reward-model win-rate
    jaxpref comparisons --policy DIR --data DIR --out DIR --judge NAME    preference pairs of its own answers
    jaxpref reads --policy DIR                     what a model reads off the image (built-in task)

Each subcommand lives beside the code it drives; this file only dispatches. It is the one module of
the library that knows the built-in task: it mounts the task's commands (jaxpref.tasks.shapes.cli).
"""

from __future__ import annotations

import argparse
import logging
import sys


from jaxpref.data.cli import add_data_parser
from jaxpref.eval.comparisons import add_comparisons_parser
from jaxpref.eval.evaluate import add_eval_parser
from jaxpref.export_cli import add_export_parser
from jaxpref.generate_cli import add_generate_parser
from jaxpref.profile_cli import add_profile_parser
from jaxpref.tasks.shapes.cli import add_parsers as add_task_parsers
from jaxpref.train.cli import add_train_parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpref", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add_profile_parser(sub)
    data_sub = add_data_parser(sub)
    add_generate_parser(sub)
    add_train_parsers(sub)
    add_export_parser(sub)
    add_eval_parser(sub)
    add_comparisons_parser(sub)
    add_task_parsers(sub, data_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # key=value overrides may come after a flag too (`--topology v5e-8 mesh.fsdp=8`), which argparse
    # alone refuses once the first run of positionals has been read
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no libtpu" notice on CPU hosts
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
