"""Pairwise reward-model loss, as TRL's RewardTrainer computes it (shared/trl-semantics.md).

    loss = mean_i[ -log sigmoid(r_c,i - r_r,i - margin_i) ] + c * mean_i[ (r_c,i + r_r,i)^2 ]

r_c, r_r: the scalar head's value at the last non-pad token of prompt + chosen / rejected (TRL's
reading; jaxpref's option score_pooling="mean" reads the mean over the completion's tokens instead);
margin: the dataset's optional `margin` column; c: center_rewards_coefficient (None: no term).
Metrics (TRL's names): accuracy = mean(r_c > r_r), margin = mean(r_c - r_r), and min_reward,
mean_reward, max_reward over all 2B rewards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpref.models.config import SCORE_POOLINGS

from . import Stats, masked_max, masked_min, masked_sum


def last_token_values(values, attention_mask):
    """values float32[B, T] (one per position) -> float32[B] at each row's last attended position."""
    t = values.shape[-1]
    last = jnp.max(jnp.where(attention_mask > 0, jnp.arange(t), 0), axis=-1)
    return jnp.take_along_axis(values, last[:, None], axis=-1)[:, 0]


def completion_mean_values(values, completion_mask):
    """values float32[B, T] -> float32[B]: the mean over each row's completion tokens (0 if it has none)."""
    m = completion_mask.astype(jnp.float32)
    return jnp.sum(values * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def pooled_scores(values, seq: dict, pooling: str):
    """One score per row from per-position values float32[B, T] of `seq` (concat_prompt_completion's
    attention_mask and completion_mask): "last" -> the last attended position (TRL), "mean" -> the
    mean over completion tokens, so every answer token's value counts, not only the final one's."""
    if pooling == "last":
        return last_token_values(values, seq["attention_mask"])
    if pooling == "mean":
        return completion_mean_values(values, seq["completion_mask"])
    raise ValueError(f"score pooling must be one of {SCORE_POOLINGS}, got {pooling!r}")


def reward_loss(rewards_chosen, rewards_rejected, valid, *, margin=None, center_rewards_coefficient=None):
    """rewards_chosen, rewards_rejected float32[B]; valid float32[B] (0 on padding rows);
    margin float32[B] or None -> (loss_sum float32[], Stats: loss, accuracy, margin, mean_reward,
    min_reward, max_reward)."""
    d = rewards_chosen - rewards_rejected
    per_pair = -jax.nn.log_sigmoid(d if margin is None else d - margin)
    if center_rewards_coefficient is not None:
        per_pair = per_pair + center_rewards_coefficient * (rewards_chosen + rewards_rejected) ** 2
    n = jnp.sum(valid)
    loss_sum = masked_sum(per_pair, valid)
    stats = Stats(
        means={"loss": (loss_sum, n), "accuracy": (masked_sum(d > 0, valid), n), "margin": (masked_sum(d, valid), n),
               "mean_reward": (masked_sum(rewards_chosen + rewards_rejected, valid), 2 * n)},
        mins={"min_reward": jnp.minimum(masked_min(rewards_chosen, valid), masked_min(rewards_rejected, valid))},
        maxs={"max_reward": jnp.maximum(masked_max(rewards_chosen, valid), masked_max(rewards_rejected, valid))})
    return loss_sum, stats
