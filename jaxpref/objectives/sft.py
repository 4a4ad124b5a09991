"""Supervised fine-tuning loss, as TRL's SFTTrainer computes it on prompt-completion data.

Position t predicts token t + 1; only completion tokens are scored (TRL's completion_only_loss
for prompt-completion datasets). The loss is the mean negative log-likelihood over every scored
token of the global batch (transformers divides by the batch's total token count under
gradient accumulation), so this returns its sum and count.

Metrics (TRL's names): mean_token_accuracy (argmax == target, scored tokens) and entropy (of the
predicted distribution at every attended position, as TRL averages it over attention_mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import Stats, masked_sum


def sft_loss(logits, input_ids, attention_mask, completion_mask, valid):
    """logits float[B, T, V]; input_ids, attention_mask, completion_mask int[B, T]; valid float32[B]
    (0 on padding rows) -> (loss_sum float32[], Stats: loss, mean_token_accuracy, entropy)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    targets = input_ids[:, 1:]
    scored = completion_mask[:, 1:] * valid[:, None]  # [B, T-1]
    nll = -jnp.take_along_axis(logp[:, :-1], targets[..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logp[:, :-1], axis=-1) == targets
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, T]
    attended = attention_mask * valid[:, None]
    n, n_att = jnp.sum(scored).astype(jnp.float32), jnp.sum(attended).astype(jnp.float32)
    loss_sum = masked_sum(nll, scored)
    stats = Stats(means={"loss": (loss_sum, n), "mean_token_accuracy": (masked_sum(correct, scored), n),
                         "entropy": (masked_sum(entropy, attended), n_att)})
    return loss_sum, stats
