"""Training: the shared core (state, optimizer, loop, checkpoints, logging) and one trainer per
algorithm.

    from jaxpref.config import load_config
    from jaxpref.train import run_reward
    metrics = run_reward(load_config("reward", "configs/shapes/reward.yaml", ["max_steps=100"]))

CLI: `jaxpref sft|reward|dpo|ppo --config F [key=value ...]`.
"""

from __future__ import annotations

import sys

TRAINERS = {"sft": "supervised fine-tuning on prompt-completion data (loss on the completion)",
            "reward": "a reward model (scalar head) on preference pairs",
            "dpo": "the policy with DPO on preference pairs, against a frozen reference",
            "ppo": "the policy with PPO against a reward model, with a value model and a KL leash to a reference"}


def run_sft(cfg):
    """See jaxpref.train.sft.run_sft."""
    from jaxpref.train.sft import run_sft as run

    return run(cfg)


def run_reward(cfg):
    """See jaxpref.train.reward.run_reward."""
    from jaxpref.train.reward import run_reward as run

    return run(cfg)


def run_dpo(cfg):
    """See jaxpref.train.dpo.run_dpo."""
    from jaxpref.train.dpo import run_dpo as run

    return run(cfg)


def run_ppo(cfg):
    """See jaxpref.train.ppo.run_ppo."""
    from jaxpref.train.ppo import run_ppo as run

    return run(cfg)


RUNNERS = {"sft": run_sft, "reward": run_reward, "dpo": run_dpo, "ppo": run_ppo}


def add_train_parsers(subparsers):
    """Registers `sft`, `reward`, `dpo` and `ppo`: `--config F` (YAML) and `key=value` overrides (dotted for
    the model/data/mesh sections)."""
    for name, help_text in TRAINERS.items():
        p = subparsers.add_parser(name, help=f"train {help_text}",
                                  description=f"Train {help_text}. Fields use TRL's names; see docs/TRAINING.md.")
        p.add_argument("--config", default=None, help="YAML config file (e.g. configs/shapes/%s.yaml)" % name)
        p.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first: one process per host of a TPU pod slice "
                            "(coordinator and process ids come from the TPU environment)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="field overrides applied after the file, e.g. learning_rate=1e-4 mesh.fsdp=2")
        p.set_defaults(func=_main, trainer=name)


def _main(args) -> int:
    import logging

    from jaxpref.config import ConfigError, load_config
    from jaxpref.train.loop import NonFiniteError, RunError

    try:
        cfg = load_config(args.trainer, args.config, args.overrides)
    except ConfigError as e:
        print(f"jaxpref {args.trainer}: {e}", file=sys.stderr)
        return 2
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    if args.distributed:
        import jax

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
