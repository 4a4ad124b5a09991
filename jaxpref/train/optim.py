"""AdamW and learning-rate schedules with transformers' names, parameters and semantics.

The schedule is a multiplier of learning_rate as a function of the optimizer step (0 for the
first update, as transformers' LambdaLR). All but `constant` warm up over `warmup` steps (linearly,
unless warmup_stable_decay's warmup_type says otherwise), then (progress = (step - warmup) / (total -
warmup)):

  linear                 1 - progress, down to 0 at `total`
  cosine                 0.5 * (1 + cos(2 pi num_cycles progress)), num_cycles 0.5: one half-wave to 0
  cosine_with_restarts   0.5 * (1 + cos(pi * ((num_cycles * progress) % 1))): num_cycles (1) hard restarts
  cosine_with_min_lr     cosine, floored: f * (1 - min_lr_rate) + min_lr_rate (min_lr or min_lr_rate required)
  polynomial             ((lr - lr_end) * (1 - progress) ** power + lr_end) / lr; lr_end 1e-7, power 1
  inverse_sqrt           1 / sqrt((step + timescale - warmup) / timescale); timescale: warmup (or 10 000)
  warmup_stable_decay    warmup (linear / cosine / 1-sqrt, from min_lr_ratio), 1 for num_stable_steps
                         (default: total - warmup - num_decay_steps), then num_decay_steps (required) of
                         linear / cosine (num_cycles) / 1-sqrt decay to min_lr_ratio, which it then keeps
  constant               1 (no warmup, as transformers' get_constant_schedule)
  constant_with_warmup   1

The parameters come from the config's `lr_scheduler_kwargs` section (transformers'
`TrainingArguments.lr_scheduler_kwargs`); a parameter the schedule does not take is a ConfigError,
as it is a TypeError in transformers.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def _warmup(step, warmup):
    return step / max(1, warmup)


def _progress(step, total, warmup):
    return (step - warmup) / max(1, total - warmup)


def _linear(step, total, warmup, lr):
    return jnp.where(step < warmup, _warmup(step, warmup), jnp.maximum(0.0, (total - step) / max(1, total - warmup)))


def _half_cosine(progress, num_cycles):
    return 0.5 * (1 + jnp.cos(jnp.pi * num_cycles * 2.0 * progress))


def _cosine(step, total, warmup, lr, num_cycles=0.5):
    return jnp.where(step < warmup, _warmup(step, warmup),
                     jnp.maximum(0.0, _half_cosine(_progress(step, total, warmup), num_cycles)))


def _cosine_with_min_lr(step, total, warmup, lr, num_cycles=0.5, min_lr=None, min_lr_rate=None):
    rate = min_lr / lr if min_lr is not None else min_lr_rate
    factor = _half_cosine(_progress(step, total, warmup), num_cycles) * (1 - rate) + rate
    return jnp.where(step < warmup, _warmup(step, warmup), jnp.maximum(0.0, factor))


def _cosine_with_restarts(step, total, warmup, lr, num_cycles=1):
    progress = _progress(step, total, warmup)
    wave = jnp.maximum(0.0, 0.5 * (1 + jnp.cos(jnp.pi * jnp.mod(num_cycles * progress, 1.0))))
    return jnp.where(step < warmup, _warmup(step, warmup), jnp.where(progress >= 1.0, 0.0, wave))


def _polynomial(step, total, warmup, lr, lr_end=1e-7, power=1.0):
    remaining = jnp.maximum(1 - _progress(step, total, warmup), 0.0)
    decay = ((lr - lr_end) * remaining ** power + lr_end) / lr
    return jnp.where(step < warmup, _warmup(step, warmup), jnp.where(step > total, lr_end / lr, decay))


def _inverse_sqrt(step, total, warmup, lr, timescale=None):
    timescale = timescale if timescale is not None else (warmup or 10_000)
    decay = 1.0 / jnp.sqrt((step + timescale - warmup) / timescale)
    return jnp.where(step < warmup, _warmup(step, warmup), decay)


_SHAPES = {"linear": lambda p: p, "cosine": lambda p: 0.5 * (1.0 - jnp.cos(jnp.pi * p)),
           "1-sqrt": lambda p: 1.0 - jnp.sqrt(jnp.maximum(1.0 - p, 0.0))}
WSD_SHAPES = tuple(_SHAPES)  # warmup_type and decay_type values


def _warmup_stable_decay(step, total, warmup, lr, num_decay_steps=None, num_stable_steps=None,
                         warmup_type="linear", decay_type="cosine", min_lr_ratio=0.0, num_cycles=0.5):
    stable = num_stable_steps if num_stable_steps is not None else total - warmup - num_decay_steps
    up = _SHAPES[warmup_type](step / max(1, warmup)) * (1.0 - min_lr_ratio) + min_lr_ratio
    p = (step - warmup - stable) / max(1, num_decay_steps)
    down = {"linear": lambda: 1.0 - p, "cosine": lambda: _half_cosine(p, num_cycles),
            "1-sqrt": lambda: 1.0 - jnp.sqrt(jnp.maximum(p, 0.0))}[decay_type]()
    down = down * (1.0 - min_lr_ratio) + min_lr_ratio
    return jnp.where(step < warmup, jnp.maximum(0.0, up),
                     jnp.where(step < warmup + stable, 1.0,
                               jnp.where(step < warmup + stable + num_decay_steps, jnp.maximum(0.0, down),
                                         min_lr_ratio)))


def _constant(step, total, warmup, lr):
    return jnp.ones_like(step)


def _constant_with_warmup(step, total, warmup, lr):
    return jnp.where(step < warmup, _warmup(step, warmup), 1.0)


# name -> (multiplier fn(step, total, warmup, learning_rate, **kwargs), the lr_scheduler_kwargs it takes)
SCHEDULES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "linear": (_linear, ()),
    "cosine": (_cosine, ("num_cycles",)),
    "cosine_with_restarts": (_cosine_with_restarts, ("num_cycles",)),
    "cosine_with_min_lr": (_cosine_with_min_lr, ("num_cycles", "min_lr", "min_lr_rate")),
    "polynomial": (_polynomial, ("lr_end", "power")),
    "inverse_sqrt": (_inverse_sqrt, ("timescale",)),
    "warmup_stable_decay": (_warmup_stable_decay, ("num_decay_steps", "num_stable_steps", "warmup_type",
                                                   "decay_type", "min_lr_ratio", "num_cycles")),
    "constant": (_constant, ()),
    "constant_with_warmup": (_constant_with_warmup, ()),
}


def schedule_kwargs(cfg) -> dict:
    """The lr_scheduler_kwargs cfg sets (the rest keep transformers' defaults); ValueError when one is not
    a parameter of cfg.lr_scheduler_type, or a required one is missing (messages name the key)."""
    name = cfg.lr_scheduler_type
    takes = SCHEDULES[name][1]
    given = {k: v for k, v in vars(cfg.lr_scheduler_kwargs).items() if v is not None}
    for key in given:
        if key not in takes:
            raise ValueError(f"lr_scheduler_kwargs.{key}: not a parameter of lr_scheduler_type {name!r} "
                             f"(it takes {', '.join(takes) or 'none'})")
    if name == "cosine_with_min_lr" and ("min_lr" in given) == ("min_lr_rate" in given):
        raise ValueError("lr_scheduler_kwargs: cosine_with_min_lr needs exactly one of min_lr and min_lr_rate")
    if name == "warmup_stable_decay" and "num_decay_steps" not in given:
        raise ValueError("lr_scheduler_kwargs.num_decay_steps: required by warmup_stable_decay")
    if name == "polynomial" and not cfg.learning_rate > given.get("lr_end", 1e-7):
        raise ValueError(f"lr_scheduler_kwargs.lr_end: must be below learning_rate ({cfg.learning_rate})")
    for key in ("warmup_type", "decay_type"):
        if key in given and given[key] not in WSD_SHAPES:
            raise ValueError(f"lr_scheduler_kwargs.{key}: {given[key]!r} is not one of {list(WSD_SHAPES)}")
    for key, low in (("num_decay_steps", 0), ("num_stable_steps", 0), ("timescale", 1)):
        if given.get(key, low) < low:
            raise ValueError(f"lr_scheduler_kwargs.{key}: must be >= {low}")
    return given


def warmup_steps(cfg, total_steps: int) -> int:
    """cfg.warmup_steps if set, else ceil(warmup_ratio * total_steps) (transformers' rule)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def make_schedule(cfg, total_steps: int) -> Callable:
    """step int[] -> learning rate float32[]. warmup_stable_decay without num_stable_steps needs its warmup
    and decay to fit in `total_steps` (ValueError naming both)."""
    fn, warmup, kwargs = SCHEDULES[cfg.lr_scheduler_type][0], warmup_steps(cfg, total_steps), schedule_kwargs(cfg)
    if cfg.lr_scheduler_type == "warmup_stable_decay" and "num_stable_steps" not in kwargs:
        if warmup + kwargs["num_decay_steps"] > total_steps:
            raise ValueError(f"lr_scheduler_kwargs.num_decay_steps: {kwargs['num_decay_steps']} decay steps after "
                             f"{warmup} warmup steps do not fit in the run's {total_steps} steps")
    lr = cfg.learning_rate
    return lambda step: lr * fn(jnp.asarray(step, jnp.float32), total_steps, warmup, lr, **kwargs)


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
