"""AdamW and learning-rate schedules with transformers' names and semantics.

The schedule is a multiplier of learning_rate as a function of the optimizer step (0 for the
first update, as transformers' LambdaLR): linear warmup over `warmup` steps, then

  linear                 (total - step) / (total - warmup), down to 0 at `total`
  cosine                 0.5 * (1 + cos(pi * progress)), progress = (step - warmup) / (total - warmup)
  constant               1 (no warmup, as transformers' get_constant_schedule)
  constant_with_warmup   1
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def _warmup(step, warmup):
    return step / max(1, warmup)


def _linear(step, total, warmup):
    return jnp.where(step < warmup, _warmup(step, warmup), jnp.maximum(0.0, (total - step) / max(1, total - warmup)))


def _cosine(step, total, warmup):
    progress = (step - warmup) / max(1, total - warmup)
    return jnp.where(step < warmup, _warmup(step, warmup), jnp.maximum(0.0, 0.5 * (1 + jnp.cos(jnp.pi * progress))))


def _constant(step, total, warmup):
    return jnp.ones_like(step)


def _constant_with_warmup(step, total, warmup):
    return jnp.where(step < warmup, _warmup(step, warmup), 1.0)


SCHEDULES: dict[str, Callable] = {"linear": _linear, "cosine": _cosine, "constant": _constant,
                                  "constant_with_warmup": _constant_with_warmup}


def warmup_steps(cfg, total_steps: int) -> int:
    """cfg.warmup_steps if set, else ceil(warmup_ratio * total_steps) (transformers' rule)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def make_schedule(cfg, total_steps: int) -> Callable:
    """step int[] -> learning rate float32[]."""
    fn, warmup = SCHEDULES[cfg.lr_scheduler_type], warmup_steps(cfg, total_steps)
    return lambda step: cfg.learning_rate * fn(jnp.asarray(step, jnp.float32), total_steps, warmup)


def decay_mask(params):
    """True where weight decay applies: not on biases and norm scales (transformers excludes both)."""
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name == "scale" or name.endswith("bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def frozen_labels(params):
    """"frozen" for the vision tower's leaves (any path through a "vision" key: the VLM's, or each PPO
    role's), "trained" elsewhere."""
    def label(path, _):
        return "frozen" if any(getattr(k, "key", None) == "vision" for k in path) else "trained"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg, total_steps: int, updates_per_step: int = 1) -> optax.GradientTransformation:
    """Global-norm clipping (max_grad_norm > 0), then AdamW (torch's: eps outside the root,
    decoupled weight decay lr * wd * p) on the schedule. With updates_per_step > 1 (PPO's epochs x
    mini-batches) the schedule advances once per training step, as TRL steps its scheduler once
    per PPO iteration. With model.freeze_vision the tower's leaves get zero updates (no decay either)
    and no optimizer state; clipping sees the trained leaves only."""
    tx = _adamw(cfg, total_steps, updates_per_step)
    if cfg.model.freeze_vision:
        return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, frozen_labels)
    return tx


def _adamw(cfg, total_steps: int, updates_per_step: int) -> optax.GradientTransformation:
    schedule = make_schedule(cfg, total_steps)
    if updates_per_step > 1:
        schedule = (lambda sched: lambda count: sched(count // updates_per_step))(schedule)
    adamw = optax.adamw(schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                        eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw
