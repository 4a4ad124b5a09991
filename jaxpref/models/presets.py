"""Named model configurations.

- `tiny`: a few thousand parameters, for unit tests.
- `small`: the built-in `shapes` task on a CPU (64x64 images, the shipped shapes tokenizer).
- `paligemma-3b-224`, `llava-1.5-7b`: the real sizes, for AOT compiles and memory planning.

The `tiny` and `small` presets use the shapes tokenizer's ids: pad 0, eos 1, bos 2,
unk 3, `<image>` 4 (see jaxpref/data/tokenizer.py).
"""

from __future__ import annotations

from .config import ConfigError, TextConfig, VisionConfig, VLMConfig

SHAPES_VOCAB = 1024
SHAPES_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2, image_token_index=4)

_PRESETS: dict[str, VLMConfig] = {
    "tiny": VLMConfig(
        family="paligemma",
        vision=VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4),
        text=TextConfig(kind="gemma", vocab_size=SHAPES_VOCAB, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8),
        projector="linear", position_offset=1, prefix_lm=True, **SHAPES_IDS),
    "small": VLMConfig(
        family="paligemma",
        vision=VisionConfig(kind="siglip", image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                            num_hidden_layers=4, num_attention_heads=4),
        text=TextConfig(kind="gemma", vocab_size=SHAPES_VOCAB, hidden_size=256, intermediate_size=1024,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=64),
        projector="linear", position_offset=1, prefix_lm=True, **SHAPES_IDS),
    # google/paligemma-3b-pt-224: SigLIP-So400m/14 at 224 + Gemma-2B.
    "paligemma-3b-224": VLMConfig(
        family="paligemma",
        vision=VisionConfig(kind="siglip", image_size=224, patch_size=14, hidden_size=1152, intermediate_size=4304,
                            num_hidden_layers=27, num_attention_heads=16),
        text=TextConfig(kind="gemma", vocab_size=257216, hidden_size=2048, intermediate_size=16384,
                        num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256),
        projector="linear", image_token_index=257152, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        position_offset=1, prefix_lm=True),
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 + Vicuna-7B (Llama).
    "llava-1.5-7b": VLMConfig(
        family="llava",
        vision=VisionConfig(kind="clip", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                            num_hidden_layers=24, num_attention_heads=16, layer_norm_eps=1e-5,
                            hidden_act="quick_gelu"),
        text=TextConfig(kind="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                        max_position_embeddings=4096),
        projector="mlp", projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_token_index=32000, pad_token_id=32001,
        bos_token_id=1, eos_token_id=2, position_offset=0, prefix_lm=False),
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> VLMConfig:
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {preset_names()}")
    return _PRESETS[name].validate()
