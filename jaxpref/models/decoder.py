"""Decoders: Gemma (PaliGemma) and Llama (LLaVA), with RoPE, MQA/GQA and a KV cache.

Gemma: RMSNorm scaled by (1 + w), GeGLU (tanh GELU), embeddings scaled by sqrt(hidden),
head_dim independent of hidden size, LM head tied to the embeddings.
Llama: RMSNorm scaled by w, SwiGLU, untied LM head.

The layer stack is one `nn.scan` (parameters stacked on a leading `layers` axis), which keeps
compile time flat in depth. The KV cache is a dict {"k", "v"} of [L, B, S, K, D] arrays written
at a slot offset `cache_index`; see jaxpref/generate.py. The whole cache rides in the scan's carry
and each layer writes its new keys and values into its own slice of it in place, so a decode step
writes B x T x K x D per layer, not a fresh copy of the cache (a cache scanned in and out as the
layers' input and output would be rebuilt by every decode step).

Activations carry logical axis names (jaxpref.sharding.constrain): the batch over the mesh's batch
axes, heads and the MLP width over tensor.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.sharding import constrain

from .config import TextConfig
from .layers import ACT, Dtype, RMSNorm, apply_rope, attention, dense, rope_sin_cos

HIDDEN = ("batch", "length", "act_embed")


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Dtype
    lora_dropout: float = 0.0  # LoRA adapters' input dropout (layers.Dense)

    @nn.compact
    def __call__(self, carry, layer_index, mask, sin, cos, cache_index):
        """carry (x [B, T, E], cache None or {"k","v"}: [L, B, S, K, D]); layer_index int32[];
        mask bool[B, T, S or T]. Returns ((x, cache), None): this layer's slots of the cache written."""
        x, cache = carry
        c = self.config
        gemma = c.kind == "gemma"
        h, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        x = constrain(x, HIDDEN)
        y = RMSNorm(c.rms_norm_eps, gemma, self.dtype, name="input_norm")(x)
        heads, kv_heads = ("batch", "length", "act_heads", None), ("batch", "length", "act_kv_heads", None)
        q = constrain(dense((h, hd), ("embed", "heads", "head_dim"), dtype=self.dtype, lora_dropout=self.lora_dropout, name="q")(y), heads)
        k = constrain(dense((kv, hd), ("embed", "kv_heads", "head_dim"), dtype=self.dtype, lora_dropout=self.lora_dropout, name="k")(y), kv_heads)
        v = constrain(dense((kv, hd), ("embed", "kv_heads", "head_dim"), dtype=self.dtype, lora_dropout=self.lora_dropout, name="v")(y), kv_heads)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        if cache is not None:
            at = (layer_index, 0, cache_index, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype)[None], at),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype)[None], at)}
            k, v = (jax.lax.dynamic_index_in_dim(cache[n], layer_index, 0, keepdims=False) for n in ("k", "v"))
        a = constrain(attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, hd**-0.5), heads)
        a = dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), dtype=self.dtype, lora_dropout=self.lora_dropout, name="o")(a)
        x = constrain(x + a, HIDDEN)
        y = RMSNorm(c.rms_norm_eps, gemma, self.dtype, name="post_attn_norm")(x)
        mlp = ("batch", "length", "act_mlp")
        gate = constrain(dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, lora_dropout=self.lora_dropout, name="gate")(y), mlp)
        up = constrain(dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, lora_dropout=self.lora_dropout, name="up")(y), mlp)
        y = dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, lora_dropout=self.lora_dropout, name="down")(ACT[c.hidden_act](gate) * up)
        return (constrain(x + y, HIDDEN), cache), None


class Decoder(nn.Module):
    """Token embedding, the scanned layer stack and the final norm (heads live in vlm.py)."""

    config: TextConfig
    dtype: Dtype
    remat: bool = False
    lora_dropout: float = 0.0

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          ("vocab", "embed")))
        layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        self.layers = nn.scan(layer, variable_axes={"params": 0, "lora": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                              length=c.num_hidden_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(c, self.dtype, self.lora_dropout)
        self.final_norm = RMSNorm(c.rms_norm_eps, c.kind == "gemma", self.dtype)

    def embed_tokens(self, ids, scale: float):
        """ids int32[B, T] -> [B, T, E], scaled as transformers does (scale cast to the param dtype)."""
        x = self.embed(ids)
        return x * jnp.asarray(scale, self.dtype) if scale != 1.0 else x

    def attend(self, x):
        """Tied LM head: [B, T, E] -> logits [B, T, V] (flattened to one matmul, as layers.Dense is)."""
        return self.embed.attend(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (self.config.vocab_size,))

    def __call__(self, x, mask, positions, cache=None, cache_index=0):
        """x [B, T, E] input embeddings; mask bool[B, T, S]; positions int32[B, T].

        Returns (hidden [B, T, E] after the final norm, updated cache or None).
        """
        sin, cos = rope_sin_cos(positions, self.config.head_dim, self.config.rope_theta)
        layers = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
        (x, cache), _ = self.layers((x, cache), layers, mask, sin, cos, cache_index)
        return self.final_norm(x), cache
