"""The `jaxpref` command.

    jaxpref demo [--quick] [--out DIR]             the whole pipeline on the built-in task, with a report
    jaxpref profile --model small [--batch 8]      compile + time a jitted forward pass
    jaxpref data shapes --out DIR                  write the built-in task's datasets
    jaxpref data inspect PATH                      schema, counts and a few rows of a dataset
    jaxpref generate --model DIR --image P --prompt T
    jaxpref tower --out DIR                        pretrain a vision tower on the built-in task
    jaxpref sft --config F [key=value ...]         (and reward, dpo, ppo)
    jaxpref eval --policy DIR --reference DIR --data DIR [--judge NAME]   judge / reward-model win-rate
    jaxpref comparisons --policy DIR --data DIR --out DIR --judge NAME    preference pairs of its own answers
    jaxpref reads --policy DIR                     what a model reads off the image (built-in task)

Each subcommand lives beside the code it drives; this file only dispatches. It is the one module of
the library that knows the built-in task: it mounts the task's commands (jaxpref.tasks.shapes.cli).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jax
import jax.numpy as jnp

from jaxpref.data.cli import add_data_parser
from jaxpref.eval.comparisons import add_comparisons_parser
from jaxpref.eval.evaluate import add_eval_parser
from jaxpref.generate_cli import add_generate_parser
from jaxpref.models import VLM, get_preset, load_pretrained, preset_names
from jaxpref.models.config import read_hf_config
from jaxpref.profile import aot_forward, count_params, format_aot, format_report, profile_forward
from jaxpref.sharding import init_sharded, make_mesh
from jaxpref.tasks.shapes.cli import add_parsers as add_task_parsers
from jaxpref.train.cli import add_train_parsers


def _add_profile_parser(sub):
    p = sub.add_parser("profile", help="compile and time a jitted forward pass of a model")
    p.add_argument("--model", default="small", help="preset name or Hugging Face model directory (default: small)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: image tokens + 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=5, help="timed calls after warm-up (default: 5)")
    p.add_argument("--topology", default=None,
                   help="compile ahead of time for a TPU topology instead of running, e.g. v5p:4x4x4 "
                        "(needs libtpu: pip install 'jaxpref[tpu]'); uses --mesh-* sizes")
    p.add_argument("--mesh-data", type=int, default=-1, help="data axis size for --topology (default -1: the rest)")
    p.add_argument("--mesh-fsdp", type=int, default=1, help="fsdp axis size for --topology (default 1)")
    p.add_argument("--mesh-tensor", type=int, default=1, help="tensor axis size for --topology (default 1)")
    p.set_defaults(func=_run_profile)


def _run_profile(args) -> int:
    if args.topology:  # nothing is allocated: the config is enough, and the host CPU compiles
        jax.config.update("jax_platforms", "cpu")
        cfg = read_hf_config(args.model) if os.path.isdir(args.model) else get_preset(args.model)
        r = aot_forward(VLM(cfg, dtype=jnp.dtype(args.dtype)), args.topology, data=args.mesh_data,
                        fsdp=args.mesh_fsdp, tensor=args.mesh_tensor, batch=args.batch, seq=args.seq)
        print(format_aot(r))
        return 0
    if os.path.isdir(args.model):
        model, params = load_pretrained(args.model, dtype=args.dtype)
    elif args.model in preset_names():
        model = VLM(get_preset(args.model), dtype=jnp.dtype(args.dtype))
        params = init_sharded(model, jax.random.key(0), make_mesh(data=1, fsdp=-1, tensor=1))
    else:
        print(f"jaxpref profile: --model {args.model!r} is neither a directory nor a preset "
              f"({', '.join(preset_names())})", file=sys.stderr)
        return 2
    print(f"{args.model}: {count_params(params) / 1e6:.2f} M parameters ({args.dtype})")
    print(format_report(profile_forward(model, params, batch=args.batch, seq=args.seq, iters=args.iters)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxpref", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_profile_parser(sub)
    data_sub = add_data_parser(sub)
    add_generate_parser(sub)
    add_train_parsers(sub)
    add_eval_parser(sub)
    add_comparisons_parser(sub)
    add_task_parsers(sub, data_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no libtpu" notice on CPU hosts
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
