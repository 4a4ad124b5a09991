"""The VLM: vision encoder + projector + decoder, with an LM head or a scalar head.

One backbone class serves every role: the policy and the reference (head="lm", logits),
the reward and value models (head="scalar", one number per position).

    model = VLM(config, head="lm", dtype=jnp.float32)
    out = model.apply({"params": params}, pixel_values, input_ids, attention_mask, token_type_ids)
    out.logits  # float[B, T, V]

Image features are scattered, in order, into the positions where input_ids equals
`config.image_token_index` (as transformers' masked_scatter does).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.sharding import constrain

from .config import VLMConfig
from .decoder import Decoder
from .layers import ACT, Dtype, dense
from .vision import VisionEncoder

HEADS = ("lm", "scalar")


@flax.struct.dataclass
class VLMOutput:
    logits: Any  # float[B, T, V] (head="lm") or float32[B, T] (head="scalar")
    hidden: Any  # [B, T, E] last hidden state (after the final norm)
    cache: Any = None  # updated KV cache, when one was given


def default_positions(attention_mask, offset: int):
    """Positions from the mask: cumsum(mask) - 1, pads at 0, plus the family's offset
    (1 for PaliGemma). Equals arange(T) + offset on right-padded rows; right for left-padded ones."""
    pos = jnp.cumsum(attention_mask, axis=-1) - 1
    return jnp.where(attention_mask > 0, pos, 0).astype(jnp.int32) + offset


def attention_mask_4d(attention_mask, token_type_ids, *, q_len: int, cache_index, prefix_lm: bool):
    """bool[B, T, S]: query t (slot cache_index + t) may attend key slot s.

    attention_mask int[B, S]: 1 on valid key slots. Causal, plus (PaliGemma, when token_type_ids
    int[B, T] are given) bidirectional among prefix tokens (type 0), as transformers builds it:
    allowed = (s <= q or (type[q] == 0 and type[s] == 0)) and attention_mask[s].
    """
    s_len = attention_mask.shape[-1]
    q_slot = cache_index + jnp.arange(q_len)
    allowed = jnp.arange(s_len)[None, :] <= q_slot[:, None]  # [T, S]
    allowed = allowed[None]
    if prefix_lm and token_type_ids is not None:
        token_type_ids = jnp.asarray(token_type_ids, jnp.int32)
        q_prefix = token_type_ids == 0  # [B, T]
        k_type = jnp.ones((token_type_ids.shape[0], s_len), jnp.int32)  # slots outside this chunk: suffix
        k_type = jax.lax.dynamic_update_slice(k_type, token_type_ids, (0, cache_index))
        allowed = allowed | (q_prefix[:, :, None] & (k_type == 0)[:, None, :])
    return allowed & (attention_mask > 0)[:, None, :]


def _check_image_tokens(input_ids, image_token_index: int, num_features: int, per_row: bool):
    """Eager check (skipped under jit): image-token count must equal the image-feature count."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    counts = (ids == image_token_index).sum(axis=-1)
    if per_row:
        bad = np.nonzero(counts != num_features)[0]
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"image tokens and image features do not match: row {r} has {int(counts[r])} image "
                             f"tokens (id {image_token_index}) but its images give {num_features} features")
    elif int(counts.sum()) != num_features:
        raise ValueError(f"image tokens and image features do not match: {int(counts.sum())} image tokens "
                         f"(id {image_token_index}) in the batch, {num_features} image features")


def merge_image_features(text_embeds, input_ids, image_token_index: int, features):
    """Scatter features into image-token positions, in order.

    features [B, F, E] (per row: row b's F features go to row b's image tokens) or [F, E]
    (flattened across the batch, transformers' masked_scatter order).
    """
    is_img = input_ids == image_token_index
    if features.ndim == 3:
        idx = jnp.cumsum(is_img, axis=-1) - 1
        gathered = jnp.take_along_axis(features, jnp.clip(idx, 0, features.shape[1] - 1)[..., None], axis=1)
    else:
        b, t = input_ids.shape
        idx = jnp.cumsum(is_img.reshape(-1)) - 1
        gathered = features[jnp.clip(idx, 0, features.shape[0] - 1)].reshape(b, t, -1)
    return jnp.where(is_img[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class VLM(nn.Module):
    config: VLMConfig
    head: str = "lm"  # "lm" -> logits; "scalar" -> one value per position (reward / value models)
    dtype: Dtype = jnp.float32  # parameter and compute dtype
    remat: bool = False  # rematerialise each layer in the backward pass
    freeze_vision: bool = False  # no gradient into the vision tower (its features are stop_gradient)
    lora_dropout: float = 0.0  # dropout on LoRA adapters' inputs (jaxpref.models.lora) when a "dropout" rng is given

    @nn.nowrap
    def example_inputs(self, batch: int = 1, seq: int | None = None):
        """dummy_inputs(self.config, batch, seq): what init, eval_shape and jaxpref.sharding call."""
        return dummy_inputs(self.config, batch, seq)

    def setup(self):
        c = self.config
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        feature_layer = None if c.family == "paligemma" else c.vision_feature_layer
        self.vision = VisionEncoder(c.vision, self.dtype, feature_layer=feature_layer, remat=self.remat,
                                    lora_dropout=self.lora_dropout)
        e = c.text.hidden_size
        if c.projector == "linear":
            self.proj_1 = dense(e, ("embed", "mlp"), use_bias=True, bias_axes=("mlp",), dtype=self.dtype, lora_dropout=self.lora_dropout,
                                name="projector")
        else:
            self.proj_1 = dense(e, ("embed", "mlp"), use_bias=True, bias_axes=("mlp",), dtype=self.dtype, lora_dropout=self.lora_dropout,
                                name="projector_1")
            self.proj_2 = dense(e, ("mlp", "embed"), use_bias=True, bias_axes=("embed",), dtype=self.dtype, lora_dropout=self.lora_dropout,
                                name="projector_2")
        self.decoder = Decoder(c.text, self.dtype, remat=self.remat, lora_dropout=self.lora_dropout)
        if self.head == "lm" and not c.text.tie_word_embeddings:
            self.lm_head = dense(c.text.vocab_size, ("embed", "vocab"), dtype=self.dtype, name="lm_head")
        if self.head == "scalar":
            self.score = dense(1, ("embed", "score"), dtype=self.dtype, name="score")

    def encode_images(self, pixel_values):
        """pixel_values float[..., H, W, 3] -> projected features [..., N_img_tokens, E]."""
        lead = pixel_values.shape[:-3]
        x = self.vision(constrain(pixel_values.reshape((-1,) + pixel_values.shape[-3:]), ("batch", None, None, None)))
        if self.freeze_vision:  # the tower's backward pass is never built
            x = jax.lax.stop_gradient(x)
        if self.config.family == "llava" and self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        x = self.proj_1(x)
        if self.config.projector == "mlp":
            x = self.proj_2(ACT[self.config.projector_hidden_act](x))
        x = constrain(x, ("batch", "length", "act_embed"))
        return x.reshape(lead + x.shape[1:])

    def __call__(self, pixel_values, input_ids, attention_mask, token_type_ids=None, position_ids=None,
                 cache=None, cache_index=0, image_features=None, head_window: tuple[int, int] | None = None):
        """Forward pass.

        pixel_values: float32[B, H, W, 3], [B, n, H, W, 3] (n images per row) or None (text only,
          or `image_features` given, e.g. encoded once and reused for chosen and rejected).
        input_ids: int32[B, T]; attention_mask: int[B, T], or int[B, S] over the cache slots when a
          cache is given; token_type_ids: int[B, T] or None (PaliGemma: 0 prefix, 1 suffix);
        position_ids: int32[B, T] (default from the mask; required with a cache);
        cache: {"k", "v"}: [L, B, S, K, D] or None; cache_index: first slot the T tokens go to;
        head_window: (start, length): the head reads only positions start .. start + length - 1, so
          `logits` is [B, length, ...] (a loss over the response never materialises the prompt's
          [B, T, V] logits); None: every position. `hidden` is always [B, T, E].
        """
        c = self.config
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        text = self.decoder.embed_tokens(jnp.where(input_ids == c.image_token_index, 0, input_ids), c.embed_scale)
        if image_features is not None:
            # [B, n, N, E] (pixel_values [B, n, H, W, 3]): row b's images fill row b's image tokens.
            # [N_img, N, E]: flattened across the batch in order, as transformers does.
            per_row = image_features.ndim == 4
            shape = (image_features.shape[0], -1, image_features.shape[-1]) if per_row else (-1, image_features.shape[-1])
            feats = image_features.reshape(shape)
            _check_image_tokens(input_ids, c.image_token_index, feats.shape[-2], per_row)
            text = merge_image_features(text, input_ids, c.image_token_index, feats)
        text = constrain(text, ("batch", "length", "act_embed"))
        t = input_ids.shape[1]
        if position_ids is None:
            if cache is not None:
                raise ValueError("position_ids are required when decoding with a cache")
            position_ids = default_positions(attention_mask, c.position_offset)
        mask = attention_mask_4d(attention_mask, token_type_ids, q_len=t, cache_index=cache_index,
                                 prefix_lm=c.prefix_lm)
        hidden, cache = self.decoder(text, mask, position_ids, cache, cache_index)
        read = hidden if head_window is None else jax.lax.slice_in_dim(hidden, head_window[0],
                                                                       head_window[0] + head_window[1], axis=1)
        if self.head == "scalar":
            out = constrain(self.score(read)[..., 0].astype(jnp.float32), ("batch", "length"))
        elif c.text.tie_word_embeddings:
            out = constrain(self.decoder.attend(read), ("batch", "length", "act_vocab"))
        else:
            out = constrain(self.lm_head(read), ("batch", "length", "act_vocab"))
        return VLMOutput(logits=out, hidden=hidden, cache=cache)


def init_cache(config: VLMConfig, batch: int, length: int, dtype=jnp.float32):
    """An empty KV cache: {"k", "v"} of zeros [L, B, S, K, D]."""
    t = config.text
    shape = (t.num_hidden_layers, batch, length, t.num_key_value_heads, t.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def dummy_inputs(config: VLMConfig, batch: int = 1, seq: int | None = None):
    """Shape-correct inputs (one image per row) for init / eval_shape / AOT lowering."""
    n = config.num_image_tokens
    seq = seq or n + 8
    ids = np.full((batch, seq), config.bos_token_id, np.int32)
    ids[:, :n] = config.image_token_index
    px = np.zeros((batch, config.vision.image_size, config.vision.image_size, 3), np.float32)
    return px, ids, np.ones((batch, seq), np.int32)
