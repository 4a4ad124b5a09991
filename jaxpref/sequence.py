"""The model over a prompt and a response: one home for what every trainer and evaluator computes.

    seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], responses, response_mask)
    logps = response_logps(model, params, batch, responses, response_mask)       # float32[B]
    r = response_scores(reward_model, rm_params, batch, responses, response_mask)  # float32[B]
    r = implicit_reward(logps, ref_logps, beta)                                  # DPO's implicit reward

`batch` is a collated prompt batch (jaxpref.data.processing): prompt_ids / prompt_mask int32[B, Lp]
(left-padded), pixel_values float32[B, n, H, W, 3] (n = 0: text-only rows). A response is
right-padded: responses / response_mask int32[B, T]. The model sees [pad.. prompt response ..pad];
position t of its output predicts token t + 1, so the response's T tokens are predicted at positions
Lp-1 .. Lp+T-2. Params (a params tree, or jaxpref.models.lora.Adapted) are cast to the model's compute
dtype here (`jaxpref.models.lora.variables`), once.

Used by SFT, the reward model, DPO, PPO, `jaxpref eval` and `jaxpref comparisons`; nothing here
depends on the trainers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.generate import TEMPERATURE_EPS
from jaxpref.models import VLM
from jaxpref.models.lora import rngs, variables
from jaxpref.objectives.reward import pooled_scores


def cast_floats(tree, dtype):
    """Floating leaves of `tree` as `dtype` (bf16 compute from f32 master params)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def images(batch: dict):
    """pixel_values float32[B, n, H, W, 3], or None for text-only rows (n = 0)."""
    px = batch["pixel_values"]
    return px if px.shape[1] else None


def concat_prompt_completion(prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_token_type=None):
    """A left-padded prompt [B, Lp] and a right-padded completion [B, Lc] -> the sequence the model
    sees, [pad.. prompt completion ..pad], as a dict of int32[B, Lp + Lc]:

    input_ids, attention_mask; token_type_ids: prompt_token_type (default 0) on the prompt, 1 on
    completion tokens, 0 on completion pads (PaliGemma's processor pads token types with 0);
    completion_mask: 1 on completion tokens. Works on numpy and jax arrays alike.
    """
    xp = np if isinstance(prompt_ids, np.ndarray) else jnp
    if prompt_token_type is None:
        prompt_token_type = xp.zeros_like(prompt_mask)
    cat = lambda a, b: xp.concatenate([xp.asarray(a, xp.int32), xp.asarray(b, xp.int32)], axis=1)  # noqa: E731
    return {
        "input_ids": cat(prompt_ids, completion_ids),
        "attention_mask": cat(prompt_mask, completion_mask),
        "token_type_ids": cat(prompt_token_type, completion_mask),
        "completion_mask": cat(xp.zeros_like(prompt_mask), completion_mask),
    }


def forward(model: VLM, params, batch: dict, completion_ids, completion_mask, image_features=None,
            head_window: tuple[int, int] | None = None):
    """(the head's output over prompt + completion: logits float[B, Lp+Lc, V] or values float32[B, Lp+Lc],
    the sequence dict of concat_prompt_completion). `image_features` (VLM.encode_images' output) stand in
    for the batch's images when given (encoded once for several sequences); `head_window` (start,
    length): the head's output at those positions only (VLM.__call__)."""
    seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], completion_ids, completion_mask)
    px = None if image_features is not None else images(batch)
    out = model.apply(variables(params, model.dtype), px, seq["input_ids"], seq["attention_mask"],
                      seq["token_type_ids"], image_features=image_features, head_window=head_window,
                      rngs=rngs(params)).logits
    return out, seq


def interleave(a, b):
    """[B, ...] and [B, ...] -> [2B, ...] with rows a0, b0, a1, b1, ..."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def pair_forward(model: VLM, params, batch: dict, completions_only: bool = False):
    """The head's output over both sequences of every preference pair in ONE forward pass, each pair's
    images encoded once: (out [2B, T, ...], seq dict int32[2B, T]), rows interleaved (2i chosen,
    2i + 1 rejected of pair i, so each device keeps its own pairs). batch: prompt_ids/prompt_mask
    int32[B, Lp], chosen_/rejected_ids and _mask int32[B, Lc], pixel_values float32[B, n, H, W, 3].

    completions_only: the head reads positions Lp-1 .. T-1 only (the last prompt token, which predicts
    the first completion token, and the completion), and `seq` is cut to the same window, so a loss
    over completion tokens (position t predicts token t + 1) reads them as it would the whole."""
    v, r = variables(params, model.dtype), rngs(params)
    px = images(batch)
    features = None if px is None else model.apply(v, px, method=VLM.encode_images, rngs=r)  # [B, n, N, E]
    chosen, rejected = (concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], batch[f"{c}_ids"],
                                                 batch[f"{c}_mask"]) for c in ("chosen", "rejected"))
    seq = {k: interleave(chosen[k], rejected[k]) for k in chosen}
    lp, t = batch["prompt_ids"].shape[1], seq["input_ids"].shape[1]
    window = (lp - 1, t - lp + 1) if completions_only else None
    out = model.apply(v, None, seq["input_ids"], seq["attention_mask"], seq["token_type_ids"],
                      image_features=None if features is None else jnp.repeat(features, 2, axis=0),
                      head_window=window, rngs=r).logits
    if completions_only:
        seq = {k: v[:, lp - 1:] for k, v in seq.items()}
    return out, seq


def pair_scores(model: VLM, params, batch: dict):
    """(r_chosen float32[B], r_rejected float32[B]): a scalar-head model's scores of both sequences of
    every preference pair (pair_forward), read as its config.score_pooling says."""
    values, seq = pair_forward(model, params, batch)
    r = pooled_scores(values.astype(jnp.float32), seq, model.config.score_pooling).reshape(-1, 2)
    return r[:, 0], r[:, 1]


def response_logits(model: VLM, params, batch: dict, responses, response_mask):
    """The head's output at the positions predicting each response token: [B, T, ...] (logits
    for an LM head, values for a scalar head), i.e. sequence positions Lp-1 .. Lp+T-2 (the head
    reads only those)."""
    lp = batch["prompt_ids"].shape[1]
    out, _ = forward(model, params, batch, responses, response_mask, head_window=(lp - 1, responses.shape[1]))
    return out


def token_logprobs(logits, responses, temperature: float | None):
    """(log-probs float32[B, T] of the response tokens under logits / (temperature + 1e-7), or the
    logits as they are when temperature is None; entropy float32[B, T] of that distribution)."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits if temperature is None else logits / (temperature + TEMPERATURE_EPS), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.take_along_axis(logp, responses[..., None], axis=-1)[..., 0], entropy


def response_logprobs(model: VLM, params, batch: dict, responses, response_mask, temperature: float | None):
    """token_logprobs of the response under `model` at `temperature` (None: the logits as they are)."""
    return token_logprobs(response_logits(model, params, batch, responses, response_mask), responses, temperature)


def response_logps(model: VLM, params, batch: dict, responses, response_mask):
    """log pi(y|x): the sum of the response tokens' log-probs at temperature 1, float32[B] (DPO's
    logps, eval's KL terms)."""
    logp, _ = response_logprobs(model, params, batch, responses, response_mask, None)
    return jnp.sum(logp * response_mask, axis=1)


def response_scores(model: VLM, params, batch: dict, responses, response_mask):
    """A scalar-head model's score float32[B] of prompt + response, read as its config.score_pooling
    says (TRL: the value at the last non-pad token)."""
    values, seq = forward(model, params, batch, responses, response_mask)
    return pooled_scores(values.astype(jnp.float32), seq, model.config.score_pooling)


def implicit_reward(policy_logps, ref_logps, beta: float):
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)): a DPO policy read as a reward
    model (the rewards/chosen `jaxpref dpo` logs)."""
    return beta * (policy_logps - ref_logps)


@dataclasses.dataclass(frozen=True)
class ImplicitReward:
    """A DPO policy read as a reward model (implicit_reward of its log-probs against `ref_model`'s,
    the reference it was trained against)."""

    model: VLM
    params: Any
    ref_model: VLM
    ref_params: Any
    beta: float


_response_logps = jax.jit(response_logps, static_argnames="model")
_response_scores = jax.jit(response_scores, static_argnames="model")


def reward_scores(reward_model, batch: dict, responses, response_mask) -> np.ndarray:
    """float[B] scores of the responses on the host: `reward_model` is a (VLM, params) pair with a
    scalar head, or an ImplicitReward. Each call is one jitted forward per model."""
    if isinstance(reward_model, ImplicitReward):
        r = reward_model
        return np.asarray(implicit_reward(_response_logps(r.model, r.params, batch, responses, response_mask),
                                          _response_logps(r.ref_model, r.ref_params, batch, responses,
                                                          response_mask), r.beta))
    model, params = reward_model
    return np.asarray(_response_scores(model, params, batch, responses, response_mask))


def log_ratio(policy, reference, batch: dict, responses, response_mask) -> np.ndarray:
    """sum_t log pi(y_t) - log pi_ref(y_t) per row on the host (float[B]): the k1 estimate of
    KL(pi || pi_ref) on the policy's own samples; `policy`, `reference` are (VLM, params) pairs."""
    return np.asarray(_response_logps(*policy, batch, responses, response_mask)
                      - _response_logps(*reference, batch, responses, response_mask))
