"""Model configuration: one frozen dataclass tree for a VLM, and its mapping to and from
Hugging Face `config.json` (PaliGemma and LLaVA families).

A VLM is a vision encoder (SigLIP or CLIP), a projector (PaliGemma's linear or LLaVA's
2-layer MLP) and a decoder (Gemma or Llama). Field names follow transformers' configs
where one exists, so a reader can hold them side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SCORE_POOLINGS = ("last", "mean")  # how a scalar head's per-position values become one score


FAMILIES = ("paligemma", "llava")
VISION_KINDS = ("siglip", "clip")
DECODER_KINDS = ("gemma", "llama")
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu", "relu")


class ConfigError(ValueError):
    """A configuration jaxpref cannot use: a config file, key or value (jaxpref.config), a model's
    config.json, LoRA settings. jaxpref.config.ConfigError is this class."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str = "siglip"  # "siglip" (PaliGemma, no class token) or "clip" (LLaVA-1.5)
    image_size: int = 224  # square input side in pixels
    patch_size: int = 14  # patch side in pixels
    hidden_size: int = 1152  # encoder width
    intermediate_size: int = 4304  # MLP width
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Learned position embeddings: one per patch, plus CLIP's class token."""
        return self.num_patches + (1 if self.kind == "clip" else 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    kind: str = "gemma"  # "gemma" (RMSNorm 1+w, GeGLU, sqrt(hidden) embed scale) or "llama"
    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1  # 1 = MQA, < heads = GQA
    head_dim: int = 256  # independent of hidden_size (Gemma)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    family: str = "paligemma"  # "paligemma" or "llava"
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    projector: str = "linear"  # "linear" (PaliGemma) or "mlp" (LLaVA: linear, GELU, linear)
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1  # LLaVA: which encoder hidden state feeds the projector
    vision_feature_select_strategy: str = "full"  # "default" drops CLIP's class token
    image_token_index: int = 257152
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1
    # PaliGemma numbers positions from 1, LLaVA from 0.
    position_offset: int = 0
    # Image + prefix attend bidirectionally when token_type_ids are given (PaliGemma).
    prefix_lm: bool = False
    # How a scalar head's per-position values become one score (reward models): "last" (TRL's: the
    # last non-pad token) or "mean" (over the completion's tokens). Stored in config.json as
    # "jaxpref_score_pooling" when not "last", as HF keeps pad_token_id there for its classifiers.
    score_pooling: str = "last"
    # The config.json this came from (kept so save_pretrained writes back what it read).
    hf_config: dict | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    @property
    def num_image_tokens(self) -> int:
        """Image features one image contributes to the sequence (= image tokens per image)."""
        n = self.vision.num_patches
        if self.family == "llava" and self.vision_feature_select_strategy == "full" and self.vision.kind == "clip":
            n += 1
        return n

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.text.hidden_size) if self.text.kind == "gemma" else 1.0

    def validate(self) -> "VLMConfig":
        def check(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        check(self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}")
        check(self.vision.kind in VISION_KINDS, f"vision.kind must be one of {VISION_KINDS}, got {self.vision.kind!r}")
        check(self.text.kind in DECODER_KINDS, f"text.kind must be one of {DECODER_KINDS}, got {self.text.kind!r}")
        check(self.score_pooling in SCORE_POOLINGS,
              f"jaxpref_score_pooling must be one of {SCORE_POOLINGS}, got {self.score_pooling!r}")
        check(self.projector in ("linear", "mlp"), f"projector must be 'linear' or 'mlp', got {self.projector!r}")
        for name, act in (("vision.hidden_act", self.vision.hidden_act), ("text.hidden_act", self.text.hidden_act),
                          ("projector_hidden_act", self.projector_hidden_act)):
            check(act in ACTIVATIONS, f"{name} must be one of {ACTIVATIONS}, got {act!r}")
        check(self.vision.image_size % self.vision.patch_size == 0,
              f"vision.image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}")
        check(self.vision.hidden_size % self.vision.num_attention_heads == 0,
              "vision.hidden_size must be divisible by vision.num_attention_heads")
        t = self.text
        check(t.num_attention_heads % t.num_key_value_heads == 0,
              f"text.num_attention_heads {t.num_attention_heads} must be a multiple of "
              f"num_key_value_heads {t.num_key_value_heads}")
        check(self.vision_feature_select_strategy in ("default", "full"),
              f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}")
        n = self.vision.num_hidden_layers
        check(-n - 1 <= self.vision_feature_layer <= n,
              f"vision_feature_layer {self.vision_feature_layer} out of range for {n} vision layers")
        return self

    def replace(self, **kw) -> "VLMConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("hf_config")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        d = dict(d)
        vision = VisionConfig(**d.pop("vision", {}))
        text = TextConfig(**d.pop("text", {}))
        d.pop("hf_config", None)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown VLMConfig fields: {sorted(unknown)}")
        return cls(vision=vision, text=text, **d).validate()


# ---------------------------------------------------------------------------
# Hugging Face config.json <-> VLMConfig


def _rope_theta(tc: dict) -> float:
    rp = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    if rp and rp.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"rope_type {rp.get('rope_type')!r} is not supported (only default RoPE)")
    return float(rp.get("rope_theta", tc.get("rope_theta", 10000.0)))


def from_hf_config(hf: dict, where: str = "config.json") -> VLMConfig:
    """Builds a VLMConfig from a transformers config dict (PaliGemma or LLaVA)."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        archs = hf.get("architectures")
        raise ConfigError(
            f"{where}: unsupported model_type {mt!r} (architectures {archs}); jaxpref loads "
            f"{' and '.join(FAMILIES)} checkpoints")
    vc, tc = dict(hf.get("vision_config") or {}), dict(hf.get("text_config") or {})
    vmt = vc.get("model_type", "siglip_vision_model" if mt == "paligemma" else "clip_vision_model")
    if vmt not in ("siglip_vision_model", "clip_vision_model"):
        raise ConfigError(f"{where}: unsupported vision tower {vmt!r} (jaxpref has SigLIP and CLIP)")
    vkind = "siglip" if vmt.startswith("siglip") else "clip"
    if vkind == "siglip" and vc.get("vision_use_head", False) and mt == "llava":
        pass  # LLaVA reads hidden states; the pooling head is unused.
    tmt = tc.get("model_type", "gemma" if mt == "paligemma" else "llama")
    if tmt not in DECODER_KINDS:
        raise ConfigError(f"{where}: unsupported text model {tmt!r} (jaxpref has {DECODER_KINDS})")
    if tc.get("attention_bias") or tc.get("mlp_bias"):
        raise ConfigError(f"{where}: decoders with attention_bias/mlp_bias are not supported")
    vdefaults = VisionConfig() if vkind == "siglip" else VisionConfig(
        kind="clip", image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    vision = VisionConfig(
        kind=vkind,
        image_size=int(vc.get("image_size", vdefaults.image_size)),
        patch_size=int(vc.get("patch_size", vdefaults.patch_size)),
        hidden_size=int(vc.get("hidden_size", vdefaults.hidden_size)),
        intermediate_size=int(vc.get("intermediate_size", vdefaults.intermediate_size)),
        num_hidden_layers=int(vc.get("num_hidden_layers", vdefaults.num_hidden_layers)),
        num_attention_heads=int(vc.get("num_attention_heads", vdefaults.num_attention_heads)),
        layer_norm_eps=float(vc.get("layer_norm_eps", vdefaults.layer_norm_eps)),
        hidden_act=vc.get("hidden_act", vdefaults.hidden_act),
    )
    hidden = int(tc.get("hidden_size", 2048 if tmt == "gemma" else 4096))
    heads = int(tc.get("num_attention_heads", 8 if tmt == "gemma" else 32))
    act = tc.get("hidden_activation") or tc.get("hidden_act") or ("gelu_pytorch_tanh" if tmt == "gemma" else "silu")
    if tmt == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers' Gemma maps legacy "gelu" to the tanh approximation
    text = TextConfig(
        kind=tmt,
        vocab_size=int(tc.get("vocab_size", hf.get("vocab_size", 257216 if tmt == "gemma" else 32000))),
        hidden_size=hidden,
        intermediate_size=int(tc.get("intermediate_size", 16384 if tmt == "gemma" else 11008)),
        num_hidden_layers=int(tc.get("num_hidden_layers", 18 if tmt == "gemma" else 32)),
        num_attention_heads=heads,
        num_key_value_heads=int(tc.get("num_key_value_heads") or heads),
        head_dim=int(tc.get("head_dim") or hidden // heads),
        rope_theta=_rope_theta(tc),
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        hidden_act=act,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", tmt == "gemma"))),
        max_position_embeddings=int(tc.get("max_position_embeddings", 8192)),
    )
    pooling = hf.get("jaxpref_score_pooling", "last")
    if mt == "paligemma":
        cfg = VLMConfig(
            family="paligemma", vision=vision, text=text, projector="linear",
            vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_token_index=int(hf.get("image_token_index", hf.get("image_token_id", 257152))),
            pad_token_id=int(tc.get("pad_token_id", hf.get("pad_token_id", 0)) or 0),
            bos_token_id=int(tc.get("bos_token_id", 2) or 2), eos_token_id=int(tc.get("eos_token_id", 1) or 1),
            position_offset=1, prefix_lm=True, score_pooling=pooling, hf_config=hf)
    else:
        layer = hf.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ConfigError(f"{where}: vision_feature_layer {layer!r}: only a single layer is supported")
        pad = hf.get("pad_token_id", tc.get("pad_token_id"))
        cfg = VLMConfig(
            family="llava", vision=vision, text=text, projector="mlp",
            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
            vision_feature_layer=int(layer),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            image_token_index=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
            pad_token_id=int(pad) if pad is not None else 0,
            bos_token_id=int(tc.get("bos_token_id", 1) or 1), eos_token_id=int(tc.get("eos_token_id", 2) or 2),
            position_offset=0, prefix_lm=False, score_pooling=pooling, hf_config=hf)
    try:
        return cfg.validate()
    except ConfigError as e:  # name the file the bad value came from
        raise ConfigError(f"{where}: {e}") from None


def to_hf_config(cfg: VLMConfig, dtype: str = "float32") -> dict:
    """A transformers config.json dict for `cfg` (the one it was loaded from, if any, updated)."""
    v, t = cfg.vision, cfg.text
    if cfg.vision.kind == "siglip":
        vision = {"model_type": "siglip_vision_model", "vision_use_head": False}
    else:
        vision = {"model_type": "clip_vision_model", "projection_dim": 768}
    vision.update(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                  intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, layer_norm_eps=v.layer_norm_eps,
                  hidden_act=v.hidden_act, num_channels=3)
    text = {"model_type": t.kind, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings, "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    text["hidden_activation" if t.kind == "gemma" else "hidden_act"] = t.hidden_act
    if cfg.family == "paligemma":
        out = {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
               "image_token_index": cfg.image_token_index, "projection_dim": t.hidden_size,
               "hidden_size": t.hidden_size, "vocab_size": t.vocab_size, "tie_word_embeddings": True}
        vision["projection_dim"] = t.hidden_size
        text["use_bidirectional_attention"] = (cfg.hf_config or {}).get("text_config", {}).get(
            "use_bidirectional_attention", True)
    else:
        out = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
               "image_token_index": cfg.image_token_index, "projector_hidden_act": cfg.projector_hidden_act,
               "vision_feature_layer": cfg.vision_feature_layer,
               "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
               "image_seq_length": cfg.num_image_tokens, "tie_word_embeddings": t.tie_word_embeddings,
               "pad_token_id": cfg.pad_token_id}
    out.update(vision_config=vision, text_config=text, dtype=dtype, torch_dtype=dtype)
    if cfg.score_pooling != "last":
        out["jaxpref_score_pooling"] = cfg.score_pooling
    return out


def read_hf_config(path: str) -> VLMConfig:
    p = os.path.join(path, "config.json")
    if not os.path.exists(p):
        raise ConfigError(f"{path}: no config.json (expected a Hugging Face model directory)")
    with open(p) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
    return from_hf_config(hf, where=p)


def as_jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {k: as_jsonable(v) for k, v in dataclasses.asdict(x).items() if k != "hf_config"}
    return x
