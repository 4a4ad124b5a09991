"""DPO and its variants, as in TRL's DPOTrainer (shared/trl-semantics.md "DPO").

Inputs are per-example sums of completion log-probs (float32[B]) under the policy and the
frozen reference, and completion lengths (number of completion tokens, int[B]):

    s_c = logp(chosen) - logp_ref(chosen),  s_r = logp(rejected) - logp_ref(rejected),  d = s_c - s_r

Each loss type is a short function of those terms, registered by name; `dpo_loss` combines
one or several (TRL's `loss_type` list with `loss_weights`) into a per-example loss [B].
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid


class Terms(NamedTuple):
    s_c: jax.Array  # chosen log-ratio, policy minus reference, float[B]
    s_r: jax.Array  # rejected log-ratio, float[B]
    chosen_logps: jax.Array  # policy log-prob sums, float[B]
    chosen_lengths: jax.Array  # completion tokens, float[B]
    rejected_lengths: jax.Array
    beta: float
    label_smoothing: float

    @property
    def d(self):
        return self.s_c - self.s_r


LOSSES: dict[str, Callable[[Terms], jax.Array]] = {}


def register(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn

    return deco


@register("sigmoid")
def sigmoid_loss(t: Terms):
    return -log_sigmoid(t.beta * t.d)


@register("hinge")
def hinge_loss(t: Terms):
    return jax.nn.relu(1 - t.beta * t.d)


@register("ipo")
def ipo_loss(t: Terms):
    """Length-normalised, as TRL does (confirmed with the IPO authors)."""
    avg = t.s_c / jnp.maximum(t.chosen_lengths, 1) - t.s_r / jnp.maximum(t.rejected_lengths, 1)
    return (avg - 1 / (2 * t.beta)) ** 2


@register("robust")
def robust_loss(t: Terms):
    eps = t.label_smoothing
    return (-(1 - eps) * log_sigmoid(t.beta * t.d) + eps * log_sigmoid(-t.beta * t.d)) / (1 - 2 * eps)


@register("bco_pair")
def bco_pair_loss(t: Terms):
    return -log_sigmoid(t.beta * t.s_c) - log_sigmoid(-t.beta * t.s_r)


@register("sppo_hard")
def sppo_hard_loss(t: Terms):
    return (t.s_c - 0.5 / t.beta) ** 2 + (t.s_r + 0.5 / t.beta) ** 2


@register("nca_pair")
def nca_pair_loss(t: Terms):
    return -log_sigmoid(t.beta * t.s_c) - 0.5 * log_sigmoid(-t.beta * t.s_c) - 0.5 * log_sigmoid(-t.beta * t.s_r)


@register("apo_zero")
def apo_zero_loss(t: Terms):
    return (1 - sigmoid(t.beta * t.s_c)) + sigmoid(t.beta * t.s_r)


@register("apo_down")
def apo_down_loss(t: Terms):
    return sigmoid(t.beta * t.s_c) + (1 - sigmoid(t.beta * t.d))


@register("sft")
def sft_loss(t: Terms):
    """Mean token NLL of the chosen completions over the batch, broadcast per example (as TRL)."""
    nll = -jnp.sum(t.chosen_logps) / jnp.maximum(jnp.sum(t.chosen_lengths), 1)
    return jnp.broadcast_to(nll, t.s_c.shape)


def check_loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None) -> tuple[tuple, tuple]:
    """Normalises TRL's loss_type / loss_weights; errors name the valid choices."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    unknown = [t for t in types if t not in LOSSES]
    if not types or unknown:
        raise ValueError(f"loss_type {unknown or types!r}: choose from {sorted(LOSSES)}")
    weights = tuple(float(w) for w in loss_weights) if loss_weights is not None else (1.0,) * len(types)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(types)}")
    return types, weights


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
             rejected_lengths, *, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
             loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
    """Per-example loss float32[B] (the weighted sum over loss types) and the rewards.

    Returns (loss [B], chosen_rewards [B], rejected_rewards [B]) with rewards = beta * s.
    """
    types, weights = check_loss_types(loss_type, loss_weights)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    t = Terms(f32(chosen_logps) - f32(ref_chosen_logps), f32(rejected_logps) - f32(ref_rejected_logps),
              f32(chosen_logps), f32(chosen_lengths), f32(rejected_lengths), beta, label_smoothing)
    loss = sum(w * LOSSES[name](t) for name, w in zip(types, weights))
    return loss, beta * jax.lax.stop_gradient(t.s_c), beta * jax.lax.stop_gradient(t.s_r)


# ---------------------------------------------------------------------------
# from logits to the loss and TRL's metrics


def token_logps(logits, input_ids):
    """logits float[N, T, V], input_ids int[N, T] -> (logp float32[N, T-1] of each next token,
    log_softmax float32[N, T-1, V]); position t predicts token t + 1."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0], logp


def completion_logps(logits, input_ids, completion_mask):
    """Per-sequence sums of the completion tokens' log-probs: float32[N] (logits float[N, T, V],
    input_ids, completion_mask int[N, T], the mask being 1 on completion tokens)."""
    logp, _ = token_logps(logits, input_ids)
    return jnp.sum(logp * completion_mask[:, 1:], axis=-1)


def dpo_objective(logits, input_ids, completion_mask, ref_chosen_logps, ref_rejected_logps, valid, *,
                  beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
                  loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
    """The DPO loss of one micro-batch and TRL's metrics, from the policy's logits.

    logits float[2B, T, V], input_ids, completion_mask int[2B, T]: pairs interleaved on the batch
    axis (row 2i chosen, 2i + 1 rejected of pair i); ref_*_logps float32[B] (the reference's
    completion log-prob sums); valid float32[B] (0 on padding pairs).
    Returns (loss_sum float32[], Stats): loss, rewards/{chosen,rejected,accuracies,margins},
    logps/{chosen,rejected} (per-sequence sums, averaged over pairs), logits/{chosen,rejected}
    (the vocabulary-mean logit averaged over completion tokens), entropy (over completion tokens of
    both), mean_token_accuracy (argmax = next token, over the chosen completions), as TRL logs them.
    """
    from . import Stats, masked_sum

    tok, logp = token_logps(logits, input_ids)
    mask = completion_mask[:, 1:].astype(jnp.float32) * jnp.repeat(valid, 2)[:, None]  # [2B, T-1]
    sums = jnp.sum(tok * mask, axis=-1).reshape(-1, 2)  # [B, 2]
    lengths = jnp.sum(mask, axis=-1).reshape(-1, 2)
    loss, r_c, r_r = dpo_loss(sums[:, 0], sums[:, 1], ref_chosen_logps * valid, ref_rejected_logps * valid,
                              lengths[:, 0], lengths[:, 1], beta=beta, loss_type=loss_type,
                              loss_weights=loss_weights, label_smoothing=label_smoothing)
    n = jnp.sum(valid)
    per_tok = lambda x: jnp.sum((x * mask).reshape(-1, 2, mask.shape[-1]), axis=(0, 2))  # [2]: chosen, rejected
    tokens = per_tok(jnp.ones_like(mask))
    mean_logit = per_tok(jax.lax.stop_gradient(jnp.mean(logits[:, :-1].astype(jnp.float32), axis=-1)))
    entropy = jax.lax.stop_gradient(-jnp.sum(jnp.exp(logp) * logp, axis=-1))
    correct = (jnp.argmax(logp, axis=-1) == input_ids[:, 1:]).astype(jnp.float32)
    loss_sum = masked_sum(loss, valid)
    stats = Stats(means={
        "loss": (loss_sum, n),
        "rewards/chosen": (masked_sum(r_c, valid), n),
        "rewards/rejected": (masked_sum(r_r, valid), n),
        "rewards/accuracies": (masked_sum(r_c > r_r, valid), n),
        "rewards/margins": (masked_sum(r_c - r_r, valid), n),
        "logps/chosen": (masked_sum(jax.lax.stop_gradient(sums[:, 0]), valid), n),
        "logps/rejected": (masked_sum(jax.lax.stop_gradient(sums[:, 1]), valid), n),
        "logits/chosen": (mean_logit[0], tokens[0]),
        "logits/rejected": (mean_logit[1], tokens[1]),
        "entropy": (jnp.sum(entropy * mask), jnp.sum(mask)),
        "mean_token_accuracy": (per_tok(correct)[0], tokens[0]),
    })
    return loss_sum, stats
