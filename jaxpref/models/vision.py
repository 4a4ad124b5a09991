"""Vision encoders: SigLIP (PaliGemma) and CLIP (LLaVA-1.5).

Both are pre-LN ViTs: patch embedding, learned position embeddings, a scanned stack of
(LN, attention, residual, LN, MLP, residual) blocks. CLIP adds a class token and a LayerNorm
before the blocks ("pre_layrnorm" in transformers); SigLIP has a LayerNorm after them.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxpref.sharding import constrain

from .config import VisionConfig
from .layers import ACT, Dtype, LayerNorm, attention, dense, logical


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Dtype
    lora_dropout: float = 0.0  # LoRA adapters' input dropout (layers.Dense)

    @nn.compact
    def __call__(self, x, layer_index, num_layers_to_run):
        """x [N, P, D] -> [N, P, D]. Layers at index >= num_layers_to_run leave x unchanged."""
        c = self.config
        h, hd = c.num_attention_heads, c.head_dim
        hidden, heads = ("batch", "length", "act_embed"), ("batch", "length", "act_heads", None)
        x = constrain(x, hidden)
        y = LayerNorm(c.layer_norm_eps, self.dtype, name="ln1")(x)
        q, k, v = (constrain(dense((h, hd), ("embed", "heads", "head_dim"), use_bias=True, dtype=self.dtype,
                                   lora_dropout=self.lora_dropout, name=n)(y), heads) for n in ("q", "k", "v"))
        full = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), bool)
        a = constrain(attention(q, k, v, full, hd**-0.5), heads)
        a = dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=True,
                  bias_axes=("embed",), dtype=self.dtype, lora_dropout=self.lora_dropout, name="o")(a)
        y = constrain(x + a, hidden)
        z = LayerNorm(c.layer_norm_eps, self.dtype, name="ln2")(y)
        z = dense(c.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, lora_dropout=self.lora_dropout, name="fc1")(z)
        z = constrain(ACT[c.hidden_act](z), ("batch", "length", "act_mlp"))
        z = dense(c.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, lora_dropout=self.lora_dropout, name="fc2")(z)
        out = constrain(y + z, hidden)
        return jnp.where(layer_index < num_layers_to_run, out, x), None


class VisionEncoder(nn.Module):
    """pixel_values float32[N, H, W, 3] (normalised, channels last) -> features [N, P', D].

    `feature_layer` picks the hidden state as transformers' `hidden_states[feature_layer]`
    does (index 0 = embeddings, i = after block i) without the final LayerNorm; None means
    SigLIP's `last_hidden_state` (all blocks, then post_layernorm), as PaliGemma uses.
    """

    config: VisionConfig
    dtype: Dtype
    feature_layer: int | None = None
    remat: bool = False
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        n, hgt, wid, ch = pixel_values.shape
        p = c.patch_size
        if (hgt, wid, ch) != (c.image_size, c.image_size, 3):
            raise ValueError(f"pixel_values must be [N, {c.image_size}, {c.image_size}, 3] (channels last) for "
                             f"this model, got {tuple(pixel_values.shape)}")
        g = c.image_size // p
        patches = pixel_values.astype(self.dtype).reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.param("patch_kernel", logical(nn.initializers.normal(0.02), "patch", "patch", "channels", "embed"),
                            (p, p, 3, c.hidden_size), self.dtype)
        x = jnp.einsum("nghpqc,pqce->nghe", patches, kernel).reshape(n, g * g, c.hidden_size)
        if c.kind == "siglip":
            x = x + self.param("patch_bias", logical(nn.initializers.zeros_init(), "embed"), (c.hidden_size,),
                               self.dtype)
        else:
            cls = self.param("class_embedding", logical(nn.initializers.normal(0.02), "embed"), (c.hidden_size,),
                             self.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c.hidden_size)), x], axis=1)
        x = x + self.param("pos_embedding", logical(nn.initializers.normal(0.02), "position", "embed"),
                           (c.num_positions, c.hidden_size), self.dtype)[None]
        if c.kind == "clip":
            x = LayerNorm(c.layer_norm_eps, self.dtype, name="pre_ln")(x)

        L = c.num_hidden_layers
        if self.feature_layer is None:
            run = L
        else:
            run = self.feature_layer if self.feature_layer >= 0 else L + 1 + self.feature_layer
        block = nn.remat(VisionBlock, prevent_cse=False) if self.remat else VisionBlock
        stack = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast), length=L, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(c, self.dtype, self.lora_dropout, name="layers")(x, jnp.arange(L), run)
        if self.feature_layer is None:
            x = LayerNorm(c.layer_norm_eps, self.dtype, name="post_ln")(x)
        else:
            # LLaVA reads a hidden state without post_layernorm, but the checkpoint holds its
            # weights: declare them (on a 1-token slice XLA drops) so a save writes them back.
            LayerNorm(c.layer_norm_eps, self.dtype, name="post_ln")(x[:, :1])
        return x
