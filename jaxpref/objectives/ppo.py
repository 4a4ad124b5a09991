"""PPO for language responses, as TRL's PPOTrainer computes it (shared/trl-semantics.md "PPO").

Glossary (shapes: B responses, T = response_length):
  logprobs, ref_logprobs  float[B, T]  per-token log-probs of the sampled response under the
                                       rollout policy / frozen reference (logits / (temperature + 1e-7))
  values                  float[B, T]  value-model predictions at positions ctx-1 .. end-1
  seq_len                 int[B]       index of the first pad in the response, minus 1
  padding_mask            bool[B, T]   t > seq_len       (policy positions that do not count)
  padding_mask_p1         bool[B, T]   t > seq_len + 1   (value positions that do not count)

Recurrences (GAE, computed backwards in one reverse `lax.scan`):
  delta_t = r_t + gamma * V_{t+1} - V_t          (V_T = 0)
  A_t     = delta_t + gamma * lam * A_{t+1}      (A_T = 0)
  R_t     = A_t + V_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INVALID_LOGPROB = 1.0  # TRL fills padded log-probs with this
KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x, mask, axis=None):
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.sum(mask, axis=axis)


def masked_var(x, mask, unbiased: bool = True):
    """Masked variance, Bessel-corrected by default (TRL's masked_var)."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask.astype(x.dtype))
        var = var * n / (n - 1)
    return var


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x - mean) * rsqrt(var + 1e-8) over masked entries; without shift_mean the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return white if shift_mean else white + mean


def first_true_index(b, axis: int = -1):
    """Index of the first True along `axis`, or the axis length when there is none."""
    n = b.shape[axis]
    idx = jnp.arange(n).reshape([-1 if a == axis % b.ndim else 1 for a in range(b.ndim)])
    return jnp.min(jnp.where(b, idx, n), axis=axis)


def truncate_after_stop(tokens, stop_token_id: int, pad_token_id: int):
    """Every token after the first stop token becomes pad (the stop token is kept). int[B, T]."""
    stop = first_true_index(tokens == stop_token_id)
    return jnp.where(jnp.arange(tokens.shape[1])[None] > stop[:, None], pad_token_id, tokens)


def response_masks(responses, pad_token_id: int):
    """(seq_len int[B], padding_mask bool[B, T], padding_mask_p1 bool[B, T])."""
    seq_len = first_true_index(responses == pad_token_id) - 1
    pos = jnp.arange(responses.shape[1])[None]
    return seq_len, pos > seq_len[:, None], pos > (seq_len + 1)[:, None]


def kl_per_token(logprobs, ref_logprobs, estimator: str = "k1"):
    """k1: logp - ref; k3: (exp(ref - logp) - 1) - (ref - logp). float[B, T]."""
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k3":
        return jnp.expm1(logr) - logr
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def per_token_rewards(scores, kl, seq_len, kl_coef: float):
    """-kl_coef * kl everywhere, plus the scalar score at seq_len + 1 (or seq_len at the end).

    Returns (rewards float[B, T], non_score_reward float[B, T])."""
    non_score = -kl_coef * kl
    t = kl.shape[1]
    end = jnp.where(seq_len + 1 < t, seq_len + 1, seq_len)
    at_end = jnp.arange(t)[None] == end[:, None]
    return non_score + jnp.where(at_end, scores[:, None], 0.0), non_score


def gae(rewards, values, gamma: float, lam: float):
    """Generalised advantage estimation; returns (advantages, returns), float[B, T]."""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(carry, delta_t):
        adv = delta_t + gamma * lam * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    adv = adv.T
    return adv, adv + values


def advantages_and_returns(scores, logprobs, ref_logprobs, values, responses, *, pad_token_id: int,
                           kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                           whiten_rewards: bool = False):
    """Everything TRL computes between the rollout and the update, as one pure function."""
    seq_len, pad, pad_p1 = response_masks(responses, pad_token_id)
    logprobs = jnp.where(pad, INVALID_LOGPROB, logprobs)
    ref_logprobs = jnp.where(pad, INVALID_LOGPROB, ref_logprobs)
    values = jnp.where(pad_p1, 0.0, values)
    kl = kl_per_token(logprobs, ref_logprobs, kl_estimator)
    rewards, non_score = per_token_rewards(scores, kl, seq_len, kl_coef)
    if whiten_rewards:
        rewards = jnp.where(pad_p1, 0.0, masked_whiten(rewards, ~pad_p1, shift_mean=False))
    adv, returns = gae(rewards, values, gamma, lam)
    adv = jnp.where(pad, 0.0, masked_whiten(adv, ~pad))
    return dict(advantages=adv, returns=returns, rewards=rewards, kl=kl, non_score_reward=non_score,
                logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, seq_len=seq_len,
                padding_mask=pad, padding_mask_p1=pad_p1)


def ppo_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, padding_mask,
               padding_mask_p1, *, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1):
    """Clipped policy loss + vf_coef * clipped value loss, and the per-minibatch statistics."""
    new_logprobs = jnp.where(padding_mask, INVALID_LOGPROB, new_logprobs)
    vpred = jnp.where(padding_mask_p1, 0.0, vpred)
    vpred_clipped = jnp.clip(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = jnp.square(vpred - returns)
    vf_losses2 = jnp.square(vpred_clipped - returns)
    vf_loss = 0.5 * masked_mean(jnp.maximum(vf_losses1, vf_losses2), ~padding_mask_p1)
    logratio = new_logprobs - old_logprobs
    ratio = jnp.exp(logratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(jnp.maximum(pg_losses1, pg_losses2), ~padding_mask)
    stats = dict(
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        pg_clipfrac=masked_mean((pg_losses2 > pg_losses1).astype(jnp.float32), ~padding_mask),
        vf_clipfrac=masked_mean((vf_losses2 > vf_losses1).astype(jnp.float32), ~padding_mask_p1),
        approxkl=0.5 * jnp.mean(jnp.square(logratio)),
        ratio=jnp.mean(ratio),
    )
    return pg_loss + vf_coef * vf_loss, stats
