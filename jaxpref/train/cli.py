"""`jaxpref sft|reward|dpo|ppo --config F [key=value ...]`: the trainers' commands."""

from __future__ import annotations

import logging
import sys

import jax

from jaxpref.config import ConfigError, load_config
from jaxpref.train.dpo import run_dpo
from jaxpref.train.loop import NonFiniteError, RunError
from jaxpref.train.ppo import run_ppo
from jaxpref.train.reward import run_reward
from jaxpref.train.sft import run_sft

TRAINERS = {"sft": "supervised fine-tuning on prompt-completion data (loss on the completion)",
            "reward": "a reward model (scalar head) on preference pairs",
            "dpo": "the policy with DPO on preference pairs, against a frozen reference",
            "ppo": "the policy with PPO against a reward model, with a value model and a KL leash to a reference"}


RUNNERS = {"sft": run_sft, "reward": run_reward, "dpo": run_dpo, "ppo": run_ppo}


def add_train_parsers(subparsers):
    """Registers `sft`, `reward`, `dpo` and `ppo`: `--config F` (YAML) and `key=value` overrides (dotted for
    the model/data/mesh sections)."""
    for name, help_text in TRAINERS.items():
        p = subparsers.add_parser(name, help=f"train {help_text}",
                                  description=f"Train {help_text}. Fields use TRL's names; see docs/TRAINING.md.")
        p.add_argument("--config", default=None, help="YAML config file (e.g. jaxpref/tasks/shapes/configs/%s.yaml)" % name)
        p.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first: one process per host of a TPU pod slice "
                            "(coordinator and process ids come from the TPU environment)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="field overrides applied after the file, e.g. learning_rate=1e-4 mesh.fsdp=2")
        p.set_defaults(func=_main, trainer=name)


def _main(args) -> int:
    try:
        cfg = load_config(args.trainer, args.config, args.overrides)
    except ConfigError as e:
        print(f"jaxpref {args.trainer}: {e}", file=sys.stderr)
        return 2
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    if args.distributed:
        jax.distributed.initialize()
    try:
        metrics = RUNNERS[args.trainer](cfg)
    except (NonFiniteError, RunError, ConfigError) as e:
        print(f"jaxpref {args.trainer}: {e}", file=sys.stderr)
        return 1
    for k, v in metrics.items():
        print(f"{k} = {v:.6g}")
    print(f"model, tokenizer and config.yaml written to {cfg.output_dir}")
    return 0
