"""The Flax VLM wrapper: PaliGemma (SigLIP + Gemma) and LLaVA (CLIP/SigLIP + Llama).

    from jaxpref.models import load_pretrained, save_pretrained, forward
    model, params = load_pretrained(hf_dir, dtype="float32")
    logits = forward(model, params, pixel_values=px, input_ids=ids, attention_mask=mask, token_type_ids=tt)
    save_pretrained(model, params, out_dir)
"""

from .config import ConfigError, TextConfig, VisionConfig, VLMConfig
from .hf import CheckpointError, load_pretrained, save_pretrained
from .lora import Adapted, variables
from .presets import get_preset, preset_names
from .vlm import VLM, VLMOutput, default_positions, dummy_inputs, init_cache


def forward(model: VLM, params, *, pixel_values, input_ids, attention_mask, token_type_ids=None,
            position_ids=None):
    """logits float[B, T, V] (or float32[B, T] for a scalar-head model). Jittable (model static).
    `params`: the model's params, or jaxpref.models.lora.Adapted (a base with LoRA adapters)."""
    return model.apply(variables(params), pixel_values, input_ids, attention_mask, token_type_ids,
                       position_ids).logits


def init_params(model: VLM, rng, batch: int = 1):
    """Random parameters (unboxed); see jaxpref.sharding.init_sharded for direct-to-mesh init."""
    import flax.linen as nn

    px, ids, mask = dummy_inputs(model.config, batch)
    return nn.meta.unbox(model.init(rng, px, ids, mask)["params"])


__all__ = ["Adapted", "VLM", "VLMConfig", "VisionConfig", "TextConfig", "VLMOutput", "ConfigError", "CheckpointError",
           "load_pretrained", "save_pretrained", "forward", "init_params", "init_cache", "get_preset",
           "preset_names", "default_positions", "dummy_inputs"]
