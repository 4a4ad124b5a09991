"""Jitted sampler with a KV cache: one prefill over image + prompt, then one token per step.

    out = generate(model, params, pixel_values=px, input_ids=ids, attention_mask=mask,
                   max_new_tokens=32, temperature=0.7, eos_token_id=1, pad_token_id=0,
                   rng=jax.random.key(0))
    out.tokens    # int32[B, N]: pad after the first stop token (the stop token is kept)
    out.logprobs  # float32[B, N]: log_softmax(logits / (temperature + 1e-7)) at each token, 0 on pad
    out.lengths   # int32[B]: generated tokens per row, the stop token included

Prompts are LEFT-padded ([B, Tp], image tokens included). The cache holds Tp + N - 1 slots
(the last token is never fed back): the prefill writes slots 0..Tp-1, generated token t goes to
slot Tp + t. Positions come from the mask (cumsum - 1, + the family's offset), so each row
continues its own numbering whatever its padding, as transformers' `generate` does. PaliGemma's
prompt is the prefix (token type 0, bidirectional) unless `token_type_ids` say otherwise;
generated tokens are suffix (type 1, causal).

Prefill and decode are ONE jitted program, compiled per (batch, prompt length, N, sampling mode:
greedy, top_k, nucleus on/off); temperature, top_p, stop and pad ids, the RNG and row ids are
traced. The cache is created inside it, filled by the prefill and updated in place by the decode
`lax.while_loop`, which exits when every row has emitted a stop token: the cache is never copied
between programs or held twice (what donating it from a prefill program to a decode program
would buy). Only the last prompt position goes through the LM head.

Sampling follows transformers' warpers in order: temperature, top-k, top-p; the image token is
never sampled (a later forward over prompt + completion would take it for an image slot;
transformers does not suppress it, so greedy parity holds unless it would pick it). The log-probs
returned are those TRL's PPO recomputes for the old policy: temperature-scaled and NOT
filtered by top-k / top-p (so they equal a cache-free forward's log_softmax(logits / (T + 1e-7))).
Row r's key at step t is fold_in(fold_in(rng, row_ids[r]), t): a row's sample does not depend
on the batch it is in or on how the batch is split across devices.

With params on a mesh (NamedSharding), the batch goes over (data, fsdp) and the cache's
kv_heads over tensor when they divide, per jaxpref.sharding's rules.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from .models.lora import variables
from .models.vlm import VLM, default_positions
from .sharding import activation_sharding, logical_to_spec

TEMPERATURE_EPS = 1e-7  # TRL: logits / (temperature + 1e-7)


@flax.struct.dataclass
class GenerateOutput:
    tokens: Any  # int32[B, N]
    logprobs: Any  # float32[B, N]
    lengths: Any  # int32[B]


# ---------------------------------------------------------------------------
# sampling


def filter_logits(logits, *, top_k: int = 0, top_p=None):
    """float[..., V] -> same, with tokens outside the top-k and then the nucleus set to -inf.

    top_k: keep the k largest (0 = off; ties with the k-th are kept, as transformers does).
    top_p: keep the smallest set of most likely tokens whose probability sums to >= top_p
    (a token stays when the mass of the tokens ranked above it is < top_p; the most likely
    token always stays). None = off.
    """
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ranked = jax.lax.top_k(logits, top_k)[0] if top_k else -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(ranked, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs
        keep = (above < top_p).at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits, keys, temperature, *, top_k: int = 0, top_p=None, greedy: bool = False,
                  never: tuple[int, ...] = ()):
    """One token per row: logits float[B, V], keys [B] (one PRNG key per row).

    never: token ids that are never chosen (the image token). Returns (tokens int32[B],
    logprobs float32[B]) where logprobs are the unfiltered log_softmax(logits / (temperature + 1e-7))
    at the chosen tokens: neither top-k / top-p nor `never` change them.
    """
    scaled = logits.astype(jnp.float32) / (temperature + TEMPERATURE_EPS)
    allowed = scaled.at[:, list(never)].set(-jnp.inf) if never else scaled
    if greedy:
        tokens = jnp.argmax(allowed, axis=-1)
    else:
        tokens = jax.vmap(jax.random.categorical)(keys, filter_logits(allowed, top_k=top_k, top_p=top_p))
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def row_keys(rng, row_ids, step):
    """PRNG keys [B]: fold_in(fold_in(rng, row_id), step) for each row."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(rng, r), step))(row_ids)


# ---------------------------------------------------------------------------
# prefill and decode


def lm_logits(module: VLM, hidden):
    """The LM head on hidden states [..., E] -> logits [..., V] (tied embeddings or lm_head), as
    VLM.__call__ applies it: `model.apply(variables(params), hidden, method=lm_logits)`. Used on the
    last position only, so the prefill never materialises [B, Tp, V] logits."""
    if module.config.text.tie_word_embeddings:
        return module.decoder.attend(hidden)
    return module.lm_head(hidden)


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _prefill(model: VLM, params, pixel_values, input_ids, prompt_mask, token_type_ids, *, cache_len: int,
             cache_sharding):
    """Writes image + prompt into slots 0..Tp-1 of a fresh cache; returns (cache, logits float32[B, V]
    at the last prompt position). Only the last position goes through the LM head."""
    cfg = model.config
    b, tp = input_ids.shape
    t = cfg.text
    shape = (t.num_hidden_layers, b, cache_len, t.num_key_value_heads, t.head_dim)
    cache = {k: _constrain(jnp.zeros(shape, model.dtype), cache_sharding) for k in ("k", "v")}
    mask = jnp.pad(prompt_mask, ((0, 0), (0, cache_len - tp)))
    out = model.apply(variables(params), pixel_values, input_ids, mask, token_type_ids,
                      default_positions(prompt_mask, cfg.position_offset), cache, 0)
    logits = model.apply(variables(params), out.hidden[:, -1], method=lm_logits)
    return jax.tree.map(lambda c: _constrain(c, cache_sharding), out.cache), logits.astype(jnp.float32)


def generate_tokens(model: VLM, params, pixel_values, input_ids, prompt_mask, token_type_ids, rng, row_ids,
                    temperature, top_p, eos, pad, *, max_new_tokens: int, top_k: int, greedy: bool, cache_sharding):
    """The sampler as a traceable function, for callers that run it inside their own jit (PPO's
    iteration); `generate` is the checked, jitted entry point. Prefill, sample token 0 from its
    logits, then feed token t-1 and sample token t in a while_loop until N tokens or every row has
    stopped. Returns GenerateOutput. With a `cache_sharding`, activations are sharded on its mesh."""
    on_mesh = contextlib.nullcontext() if cache_sharding is None else activation_sharding(cache_sharding.mesh)
    with on_mesh:
        return _sample(model, params, pixel_values, input_ids, prompt_mask, token_type_ids, rng, row_ids, temperature,
                       top_p, eos, pad, max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy,
                       cache_sharding=cache_sharding)


def _sample(model: VLM, params, pixel_values, input_ids, prompt_mask, token_type_ids, rng, row_ids,
            temperature, top_p, eos, pad, *, max_new_tokens: int, top_k: int, greedy: bool, cache_sharding):
    cfg = model.config
    b, tp = prompt_mask.shape
    n = max_new_tokens
    cache, logits = _prefill(model, params, pixel_values, input_ids, prompt_mask, token_type_ids,
                             cache_len=tp + n - 1, cache_sharding=cache_sharding)
    pos0 = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32) + cfg.position_offset  # position of token 0
    token_type = jnp.ones((b, 1), jnp.int32) if cfg.prefix_lm else None
    # a sampled image token would be taken for an image slot by any later forward over the completion
    never = (cfg.image_token_index,) if cfg.image_token_index < cfg.text.vocab_size else ()

    def emit(step, logits, tokens, logprobs, done):
        keys = None if greedy else row_keys(rng, row_ids, step)
        tok, lp = sample_tokens(logits, keys, temperature, top_k=top_k, top_p=top_p, greedy=greedy, never=never)
        tok = jnp.where(done, pad, tok)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, step))
        return tokens, logprobs, done | jnp.isin(tok, eos)

    def cond(state):
        step, _, _, _, done = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, cache, tokens, logprobs, done = state
        prev = jax.lax.dynamic_slice(tokens, (0, step - 1), (b, 1))
        slot_mask = jnp.broadcast_to(jnp.arange(n - 1) < step, (b, n - 1)).astype(prompt_mask.dtype)
        out = model.apply(variables(params), None, prev, jnp.concatenate([prompt_mask, slot_mask], axis=1),
                          token_type, (pos0 + step - 1)[:, None], cache, tp + step - 1)
        logits = model.apply(variables(params), out.hidden[:, 0], method=lm_logits)
        cache = jax.tree.map(lambda c: _constrain(c, cache_sharding), out.cache)
        tokens, logprobs, done = emit(step, logits.astype(jnp.float32), tokens, logprobs, done)
        return step + 1, cache, tokens, logprobs, done

    tokens = jnp.full((b, n), pad, jnp.int32)
    logprobs = jnp.zeros((b, n), jnp.float32)
    tokens, logprobs, done = emit(0, logits, tokens, logprobs, jnp.zeros((b,), bool))
    _, _, tokens, logprobs, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tokens, logprobs, done))
    is_stop = jnp.isin(tokens, eos).astype(jnp.int32)
    lengths = jnp.sum(jnp.cumsum(is_stop, axis=1) - is_stop == 0, axis=1).astype(jnp.int32)  # up to the 1st stop
    return GenerateOutput(tokens=tokens, logprobs=logprobs, lengths=lengths)


_generate_jit = jax.jit(generate_tokens,
                        static_argnames=("model", "max_new_tokens", "top_k", "greedy", "cache_sharding"))


# ---------------------------------------------------------------------------
# the entry point


def params_mesh(params):
    """The Mesh the params live on (None when they are not NamedSharding-placed arrays)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _check_inputs(model: VLM, pixel_values, input_ids, attention_mask, token_type_ids, max_new_tokens, temperature,
                  top_k, top_p, greedy):
    if model.head != "lm":
        raise ValueError(f"generate needs an LM-head model, got head={model.head!r}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids int[B, Tp] and attention_mask int[B, Tp] must match, got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise ValueError(f"token_type_ids {tuple(token_type_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
    if pixel_values is not None and (pixel_values.ndim not in (4, 5) or pixel_values.shape[0] != input_ids.shape[0]):
        raise ValueError(f"pixel_values must be [B, H, W, 3] or [B, n, H, W, 3] with B = {input_ids.shape[0]}, "
                         f"got {tuple(pixel_values.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= top_k <= model.config.text.vocab_size:
        raise ValueError(f"top_k must be in [0, vocab size {model.config.text.vocab_size}] (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if getattr(attention_mask, "is_fully_addressable", True):  # a multi-host global array cannot be read here
        last = np.asarray(attention_mask[:, -1])
        bad = np.nonzero(last == 0)[0]
        if bad.size:
            raise ValueError(f"prompts must be left-padded: row {int(bad[0])} of attention_mask ends with padding")


def generate(model: VLM, params, *, pixel_values, input_ids, attention_mask, token_type_ids=None,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, eos_token_id: int | Sequence[int], pad_token_id: int, rng,
             row_ids=None) -> GenerateOutput:
    """Samples up to `max_new_tokens` tokens after each left-padded prompt.

    pixel_values: float32[B, H, W, 3] or [B, n, H, W, 3] (or None: text only); input_ids,
    attention_mask: int[B, Tp], left-padded, image tokens included; token_type_ids: int[B, Tp]
    (PaliGemma; default all 0 = the prompt is the prefix). eos_token_id: one id or several
    (empty: never stop early). greedy: argmax (rng unused; log-probs still use `temperature`).
    rng: a PRNG key; row_ids int[B]: global row ids keying each row's randomness (default
    arange(B)): give a row the same id in any batch and it draws the same sample.
    """
    input_ids, attention_mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    if token_type_ids is not None:
        token_type_ids = jnp.asarray(token_type_ids, jnp.int32)
    _check_inputs(model, pixel_values, input_ids, attention_mask, token_type_ids, max_new_tokens, temperature,
                  top_k, top_p, greedy)
    b, tp = input_ids.shape
    if token_type_ids is None and model.config.prefix_lm:
        token_type_ids = jnp.zeros((b, tp), jnp.int32)
    if pixel_values is not None:
        pixel_values = jnp.asarray(pixel_values, model.dtype)
    row_ids = jnp.arange(b, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    if row_ids.shape != (b,):
        raise ValueError(f"row_ids must be int[{b}], got shape {tuple(row_ids.shape)}")
    eos = jnp.asarray([eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id), jnp.int32)
    mesh = params_mesh(params)
    cache_sharding = None
    if mesh is not None:
        def place(x, names):
            return None if x is None else jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh)))

        t = model.config.text
        cache_shape = (t.num_hidden_layers, b, tp + max_new_tokens - 1, t.num_key_value_heads, t.head_dim)
        cache_sharding = NamedSharding(mesh, logical_to_spec(("layers", "batch", "length", "kv_heads", "head_dim"),
                                                             cache_shape, mesh))
        input_ids, attention_mask, token_type_ids = (place(x, ("batch", "length"))
                                                     for x in (input_ids, attention_mask, token_type_ids))
        row_ids = place(row_ids, ("batch",))
        if pixel_values is not None:
            pixel_values = place(pixel_values, ("batch",) + (None,) * (pixel_values.ndim - 1))

    return _generate_jit(model, params, pixel_values, input_ids, attention_mask, token_type_ids, rng, row_ids,
                         jnp.float32(temperature), None if top_p >= 1.0 else jnp.float32(top_p), eos,
                         jnp.int32(pad_token_id), max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy,
                         cache_sharding=cache_sharding)


__all__ = ["GenerateOutput", "generate", "filter_logits", "sample_tokens", "row_keys", "params_mesh", "lm_logits"]
