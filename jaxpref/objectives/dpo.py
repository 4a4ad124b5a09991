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
