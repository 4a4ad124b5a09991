"""Tiny random transformers VLMs, built offline and saved as real safetensors checkpoints.

These are the independent reference for parity tests: jaxpref loads the same files and must
reproduce transformers' PyTorch forward and generate.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 300


def paligemma_config(*, kv_heads: int = 1, heads: int = 4, image_size: int = 32, patch: int = 8,
                     bidirectional: bool = True, vocab: int = VOCAB):
    vision = transformers.SiglipVisionConfig(
        image_size=image_size, patch_size=patch, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, vision_use_head=False)
    text = transformers.GemmaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=16, use_bidirectional_attention=bidirectional,
        pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return transformers.PaliGemmaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=vocab - 1,
        projection_dim=64, hidden_size=64, vocab_size=vocab)


def llava_config(*, tower: str = "clip", kv_heads: int = 2, heads: int = 4, image_size: int = 32,
                 patch: int = 8, vocab: int = VOCAB):
    if tower == "clip":
        vision = transformers.CLIPVisionConfig(
            image_size=image_size, patch_size=patch, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, projection_dim=32)
        layer, strategy = -2, "default"
    else:
        vision = transformers.SiglipVisionConfig(
            image_size=image_size, patch_size=patch, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, vision_use_head=False)
        layer, strategy = -1, "full"
    text = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    n = (image_size // patch) ** 2
    return transformers.LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=vocab - 1,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy, image_seq_length=n,
        projector_hidden_act="gelu", pad_token_id=0)


def build(config, out_dir=None, seed: int = 0, dtype=torch.float32):
    """A random model for `config` (eval mode), saved to out_dir as safetensors when given."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config, torch_dtype=dtype).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missed (1 + w) or bias shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model
