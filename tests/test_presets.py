"""Presets: real sizes match transformers' models built from the config jaxpref writes."""

import jax
import pytest
import torch
import transformers

from jaxpref.models import VLM, get_preset, preset_names
from jaxpref.models.config import ConfigError, VLMConfig, from_hf_config, to_hf_config
from jaxpref.models.hf import param_shapes


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["paligemma-3b-224", "llava-1.5-7b", "small", "tiny"])
def test_preset_parameter_count_equals_transformers(name):
    cfg = get_preset(name)
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(cfg))
    with torch.device("meta"):  # no memory for the 7B model
        tm = transformers.AutoModelForImageTextToText.from_config(hf_cfg)
    theirs = sum(p.numel() for p in tm.parameters())  # tied LM head counted once
    ours = _count(param_shapes(VLM(cfg)))
    assert ours == theirs
    assert from_hf_config(hf_cfg.to_dict()).replace(hf_config=None) == cfg.replace(hf_config=None)


def test_known_sizes():
    assert 2.9e9 < _count(param_shapes(VLM(get_preset("paligemma-3b-224")))) < 3.0e9
    assert 7.0e9 < _count(param_shapes(VLM(get_preset("llava-1.5-7b")))) < 7.1e9


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="num_attention_heads 4 must be a multiple of num_key_value_heads 3"):
        VLMConfig.from_dict({"text": {"num_attention_heads": 4, "num_key_value_heads": 3}})
    assert set(preset_names()) >= {"tiny", "small", "paligemma-3b-224", "llava-1.5-7b"}
