"""Decoders: Gemma (PaliGemma) and Llama (LLaVA), with RoPE, MQA/GQA and a KV cache.

Gemma: RMSNorm scaled by (1 + w), GeGLU (tanh GELU), embeddings scaled by sqrt(hidden),
head_dim independent of hidden size, LM head tied to the embeddings.
Llama: RMSNorm scaled by w, SwiGLU, untied LM head.

The layer stack is one `nn.scan` (parameters stacked on a leading `layers` axis), which keeps
compile time flat in depth. The KV cache is a dict {"k", "v"} of [L, B, S, K, D] arrays written
at a slot offset `cache_index`; see jaxpref/generate.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import TextConfig
from .layers import ACT, Dtype, RMSNorm, apply_rope, attention, dense, rope_sin_cos


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x, layer_cache, mask, sin, cos, cache_index):
        """x [B, T, E]; layer_cache None or {"k","v"}: [B, S, K, D]; mask bool[B, T, S or T]."""
        c = self.config
        gemma = c.kind == "gemma"
        h, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        y = RMSNorm(c.rms_norm_eps, gemma, self.dtype, name="input_norm")(x)
        q = dense((h, hd), ("embed", "heads", "head_dim"), dtype=self.dtype, name="q")(y)
        k = dense((kv, hd), ("embed", "kv_heads", "head_dim"), dtype=self.dtype, name="k")(y)
        v = dense((kv, hd), ("embed", "kv_heads", "head_dim"), dtype=self.dtype, name="v")(y)
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        new_cache = None
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": k, "v": v}
        a = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, hd**-0.5)
        a = dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), dtype=self.dtype, name="o")(a)
        x = x + a
        y = RMSNorm(c.rms_norm_eps, gemma, self.dtype, name="post_attn_norm")(x)
        gate = dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="gate")(y)
        up = dense(c.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="up")(y)
        y = dense(c.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="down")(ACT[c.hidden_act](gate) * up)
        return x + y, new_cache


class Decoder(nn.Module):
    """Token embedding, the scanned layer stack and the final norm (heads live in vlm.py)."""

    config: TextConfig
    dtype: Dtype
    remat: bool = False

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                              embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                          ("vocab", "embed")))
        layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                              length=c.num_hidden_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(c, self.dtype)
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
        x, cache = self.layers(x, cache, mask, sin, cos, cache_index)
        return self.final_norm(x), cache
