"""Building blocks shared by the vision encoders and the decoders.

Every parameter is created with logical axis names (see jaxpref/sharding.py for the table
that maps them onto the mesh). Weight names: `embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, `layers` (the scanned layer stack), `norm`, `patch`, `position`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
NEG_INF = -1e30  # added to masked attention logits (finite: fully masked pad rows stay finite)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACT: dict[str, Callable] = {
    "gelu": _gelu_exact,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def logical(init: Callable, *names: str | None):
    return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
    """A linear layer over the last `len(axis)` input dims: nn.DenseGeneral's parameters (`kernel`
    [*in, *features], `bias` [*features]) and result, computed as one 2-D matmul [N, in] @ [in, out].

    Why not nn.DenseGeneral: on XLA:CPU the backward pass of its dot_general over [B, T, ...] (the
    kernel's gradient contracts two dims, B and T) transposes the larger operand inside an elementwise
    loop fusion; flattened, both passes are plain matmuls and a `small` training step takes less than
    half the time (docs/BENCHMARKS.md). Merging B with T and heads with head_dim keeps every
    sharding (the merged dims' major one carries it), so the mesh sees the same layer.

    LoRA: when the variables hold a "lora" collection entry for this layer (`lora_a` [in, r], `lora_b`
    [r, out] over the flattened dims, B already scaled by alpha / r), the layer adds (x A) B: the
    adapter's two thin matmuls, never a merged copy of the kernel. Without one (adapters off, or a
    layer not targeted) it is the plain layer.
    """

    features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1  # the contracted input dims: the last len(axis) ones
    use_bias: bool = False
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    lora_dropout: float = 0.0  # dropout on a LoRA adapter's input, while a "dropout" rng is given

    @nn.compact
    def __call__(self, x):
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        n_in = len(axes)
        if sorted(a % x.ndim for a in axes) != list(range(x.ndim - n_in, x.ndim)):
            raise ValueError(f"Dense contracts the last dims of its input; got axis={self.axis} for shape {x.shape}")
        lead, inner = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
        kernel = self.param("kernel", self.kernel_init, inner + features, self.param_dtype)
        fan_in, fan_out = math.prod(inner), math.prod(features)
        x2 = jnp.asarray(x, self.dtype).reshape(-1, fan_in)
        y = x2 @ jnp.asarray(kernel, self.dtype).reshape(fan_in, fan_out)
        if self.has_variable("lora", "lora_a"):  # a LoRA adapter (jaxpref.models.lora): y + B(A(dropout(x)))
            if self.lora_dropout > 0 and self.has_rng("dropout"):
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora_dropout, x2.shape)
                x2 = jnp.where(keep, x2 / (1.0 - self.lora_dropout), 0).astype(x2.dtype)
            a, b = self.get_variable("lora", "lora_a"), self.get_variable("lora", "lora_b")  # [in, r], [r, out]
            y = y + (x2 @ jnp.asarray(a, self.dtype)) @ jnp.asarray(b, self.dtype)
        y = y.reshape(lead + features)
        if self.use_bias:
            y = y + jnp.asarray(self.param("bias", self.bias_init, features, self.param_dtype), self.dtype)
        return y


def dense(features, axes: tuple[str | None, ...], *, axis=-1, use_bias=False, bias_axes=None, dtype, name,
          init_std=0.02, lora_dropout: float = 0.0):
    """A Dense layer whose kernel (and bias) carry logical axis names."""
    kernel_init = logical(nn.initializers.normal(init_std), *axes)
    kw = {}
    if use_bias:
        nb = len(features) if isinstance(features, tuple) else 1
        kw["bias_init"] = logical(nn.initializers.zeros_init(), *(bias_axes or axes[-nb:]))
    return Dense(features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=dtype,
                 kernel_init=kernel_init, name=name, lora_dropout=lora_dropout, **kw)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. Gemma scales by (1 + w) and casts after; Llama by w after the cast."""

    eps: float
    plus_one: bool  # Gemma
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
        w = self.param("scale", logical(init, "norm"), (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w * y.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (as PyTorch does for bf16 inputs)."""

    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones_init(), "norm"), (d,), self.dtype)
        bias = self.param("bias", logical(nn.initializers.zeros_init(), "norm"), (d,), self.dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_sin_cos(positions, head_dim: int, theta: float):
    """positions int32[B, T] -> (sin, cos) float32[B, T, head_dim] (HF's rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.sin(emb), jnp.cos(emb)


def apply_rope(x, sin, cos):
    """x [B, T, H, D]; sin/cos float32[B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    y = x.astype(jnp.float32) * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return y.astype(x.dtype)


def attention(q, k, v, mask, scale: float):
    """Grouped-query attention.

    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; mask: bool[B, T, S]
    (True = may attend). Logits and softmax in float32. Returns [B, T, H, D].
    """
    b, t, h, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, h // kh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
