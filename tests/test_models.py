"""The Flax VLM against transformers' PyTorch models, built offline from tiny random configs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import hf_builders as hb
from jaxpref.models import CheckpointError, ConfigError, forward, load_pretrained, save_pretrained

CASES = {
    "paligemma-mqa": lambda: hb.paligemma_config(kv_heads=1),
    "paligemma-gqa": lambda: hb.paligemma_config(kv_heads=2),
    "llava-clip-gqa": lambda: hb.llava_config(tower="clip", kv_heads=2),
    "llava-siglip-mha": lambda: hb.llava_config(tower="siglip", kv_heads=4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, make in CASES.items():
        d = str(root / name)
        out[name] = (d, hb.build(make(), d))
    return out


def _batch(cfg, seed=0, batch=3, text=10, pad=(0, 3, 5)):
    """Right-padded batch: image tokens, bos, text; row r has pad[r] trailing pads.
    token_type_ids: prefix (0) for image + first 4 text tokens, suffix (1) after."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    t = n + text
    ids = rng.integers(3, hb.VOCAB - 2, (batch, t))
    ids[:, :n] = cfg.image_token_index
    ids[:, n] = cfg.bos_token_id
    mask = np.ones((batch, t), np.int64)
    for r, p in enumerate(pad):
        if p:
            mask[r, -p:] = 0
            ids[r, -p:] = cfg.pad_token_id
    tt = np.zeros((batch, t), np.int64)
    tt[:, n + 5:] = 1
    px = rng.standard_normal((batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return px, ids, mask, tt


def _torch_logits(tm, px, ids, mask, tt, dtype=torch.float32):
    kw = {"token_type_ids": torch.tensor(tt)} if tt is not None else {}
    with torch.no_grad():
        out = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(px).permute(0, 3, 1, 2).to(dtype), **kw)
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers(checkpoints, name):
    d, tm = checkpoints[name]
    model, params = load_pretrained(d, dtype="float32")
    px, ids, mask, tt = _batch(model.config)
    tt = tt if model.config.family == "paligemma" else None
    ref = _torch_logits(tm, px, ids, mask, tt)
    fwd = jax.jit(forward, static_argnums=0)
    out = np.asarray(fwd(model, params, pixel_values=px, input_ids=ids, attention_mask=mask, token_type_ids=tt))
    assert out.shape == ref.shape == (*ids.shape, hb.VOCAB)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= 1e-4


@pytest.mark.parametrize("name", ["paligemma-mqa", "llava-clip-gqa"])
def test_bfloat16_logits_match_transformers(checkpoints, name):
    d, _ = checkpoints[name]
    tm = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.bfloat16).eval()
    model, params = load_pretrained(d, dtype="bfloat16")
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    px, ids, mask, tt = _batch(model.config, seed=1)
    tt = tt if model.config.family == "paligemma" else None
    ref = _torch_logits(tm, px, ids, mask, tt, dtype=torch.bfloat16)
    out = np.asarray(forward(model, params, pixel_values=px, input_ids=ids, attention_mask=mask,
                             token_type_ids=tt)).astype(np.float32)
    valid = mask.astype(bool)
    rel = np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()
    assert rel <= 2e-2


def test_paligemma_prefix_lm_mask(checkpoints):
    """Prefix tokens see later prefix tokens; suffix tokens never see the future."""
    d, tm = checkpoints["paligemma-mqa"]
    model, params = load_pretrained(d)
    px, ids, mask, tt = _batch(model.config, pad=(0, 0, 0))
    n = model.config.num_image_tokens
    base = np.asarray(forward(model, params, pixel_values=px, input_ids=ids, attention_mask=mask, token_type_ids=tt))
    ids2 = ids.copy()
    ids2[:, n + 3] = (ids2[:, n + 3] + 7) % 250 + 3  # change a prefix token
    changed = np.asarray(forward(model, params, pixel_values=px, input_ids=ids2, attention_mask=mask, token_type_ids=tt))
    assert np.abs(changed[:, n + 1] - base[:, n + 1]).max() > 1e-3  # an earlier prefix position sees it
    ids3 = ids.copy()
    ids3[:, -1] = (ids3[:, -1] + 7) % 250 + 3  # change the last suffix token
    later = np.asarray(forward(model, params, pixel_values=px, input_ids=ids3, attention_mask=mask, token_type_ids=tt))
    np.testing.assert_array_equal(later[:, :-1], base[:, :-1])
    # and the causal path without token types agrees with transformers run causally
    cfg = hb.paligemma_config(kv_heads=1, bidirectional=False)
    tm_causal = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    tm_causal.load_state_dict(tm.state_dict())
    ref = _torch_logits(tm_causal, px, ids, mask, None)
    out = np.asarray(forward(model, params, pixel_values=px, input_ids=ids, attention_mask=mask))
    assert np.abs(out - ref).max() <= 1e-4


def test_multi_image_rows_fill_their_own_tokens(checkpoints):
    """pixel_values [B, n, H, W, 3]: row b's images fill row b's image tokens, in order."""
    d, _ = checkpoints["llava-siglip-mha"]
    model, params = load_pretrained(d)
    cfg = model.config
    n = cfg.num_image_tokens
    rng = np.random.default_rng(3)
    px = rng.standard_normal((2, 2, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(3, 250, (2, 2 * n + 6))
    ids[:, 1:1 + n] = cfg.image_token_index
    ids[:, 3 + n:3 + 2 * n] = cfg.image_token_index
    mask = np.ones_like(ids)
    per_row = np.asarray(forward(model, params, pixel_values=px, input_ids=ids, attention_mask=mask))
    flat = np.asarray(forward(model, params, pixel_values=px.reshape(4, 32, 32, 3), input_ids=ids, attention_mask=mask))
    np.testing.assert_allclose(per_row, flat, atol=1e-5)


def test_round_trip_through_transformers(checkpoints, tmp_path):
    for name in ("paligemma-mqa", "llava-clip-gqa"):
        d, tm = checkpoints[name]
        model, params = load_pretrained(d)
        out = tmp_path / name
        save_pretrained(model, params, str(out), max_shard_bytes=60_000)  # forces a sharded checkpoint
        assert (out / "model.safetensors.index.json").exists()
        back = transformers.AutoModelForImageTextToText.from_pretrained(str(out)).eval()
        want, got = tm.state_dict(), back.state_dict()
        assert set(want) == set(got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
        # and jaxpref reads its own sharded output back to the same params
        _, params2 = load_pretrained(str(out))
        jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_accepts_every_name_layout(checkpoints, tmp_path):
    """In-memory names (model.language_model.*) and hub names (vision_tower.vision_model.*)."""
    d, _ = checkpoints["paligemma-mqa"]
    _, ref = load_pretrained(d)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("vision_tower."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        renamed[k] = v
    out = tmp_path / "renamed"
    out.mkdir()
    save_file(renamed, str(out / "model.safetensors"))
    (out / "config.json").write_text(open(os.path.join(d, "config.json")).read())
    _, params = load_pretrained(str(out))
    jax.tree.map(np.testing.assert_array_equal, ref, params)


def test_clear_errors(checkpoints, tmp_path):
    d, _ = checkpoints["paligemma-mqa"]
    model, params = load_pretrained(d)
    px, ids, mask, tt = _batch(model.config)
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 32, 32, 3\]"):
        forward(model, params, pixel_values=px[:, :16, :16], input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="image tokens and image features do not match: 47 image tokens"):
        bad = ids.copy()
        bad[0, 0] = 5
        forward(model, params, pixel_values=px, input_ids=bad, attention_mask=mask)

    tensors = load_file(os.path.join(d, "model.safetensors"))
    cfg_text = open(os.path.join(d, "config.json")).read()

    def write(name, ts, cfg=cfg_text):
        p = tmp_path / name
        p.mkdir()
        save_file(ts, str(p / "model.safetensors"))
        (p / "config.json").write_text(cfg)
        return str(p)

    missing = {k: v for k, v in tensors.items() if k != "language_model.model.layers.1.self_attn.q_proj.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): language_model.model.layers.1.self_attn.q_proj.weight"):
        load_pretrained(write("missing", missing))
    wrong = dict(tensors)
    wrong["multi_modal_projector.linear.weight"] = wrong["multi_modal_projector.linear.weight"][:, :10]
    with pytest.raises(CheckpointError, match=r"multi_modal_projector.linear.weight: expected \(64, 48\), found \(64, 10\)"):
        load_pretrained(write("wrong", wrong))
    other = json.loads(cfg_text)
    other["model_type"] = "idefics3"
    with pytest.raises(ConfigError, match="unsupported model_type 'idefics3'"):
        load_pretrained(write("arch", tensors, json.dumps(other)))
    other = json.loads(cfg_text)
    other["jaxpref_score_pooling"] = "max"
    with pytest.raises(ConfigError, match=r"config\.json.*jaxpref_score_pooling must be one of \('last', 'mean'\)"):
        load_pretrained(write("pool", tensors, json.dumps(other)), head="scalar")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        p = tmp_path / "empty"
        p.mkdir()
        (p / "config.json").write_text(cfg_text)
        load_pretrained(str(p))


def test_scalar_head_shares_the_backbone(checkpoints, tmp_path):
    d, _ = checkpoints["llava-clip-gqa"]
    lm, lm_params = load_pretrained(d)
    rm, rm_params = load_pretrained(d, head="scalar", rng=jax.random.key(1))
    assert "lm_head" not in rm_params and rm_params["score"]["kernel"].shape == (64, 1)
    px, ids, mask, _ = _batch(lm.config)
    scores = np.asarray(forward(rm, rm_params, pixel_values=px, input_ids=ids, attention_mask=mask))
    hidden = lm.apply({"params": lm_params}, px, ids, mask).hidden
    np.testing.assert_allclose(scores, np.asarray(hidden @ rm_params["score"]["kernel"])[..., 0], atol=1e-5)
    save_pretrained(rm, rm_params, str(tmp_path / "rm"))
    _, back = load_pretrained(str(tmp_path / "rm"), head="scalar")
    np.testing.assert_array_equal(back["score"]["kernel"], rm_params["score"]["kernel"])


@pytest.mark.parametrize("features,axis,bias", [(24, -1, False), ((3, 8), -1, True), (16, (-2, -1), True)])
def test_dense_equals_flax_dense_general(features, axis, bias):
    """layers.Dense (one flattened matmul) keeps nn.DenseGeneral's parameters, values and gradients."""
    import flax.linen as nn

    from jaxpref.models.layers import Dense

    x = jax.random.normal(jax.random.key(1), (2, 5, 4, 6) if axis == (-2, -1) else (2, 5, 12))
    kw = dict(features=features, axis=axis, use_bias=bias, kernel_init=nn.initializers.normal(0.5),
              bias_init=nn.initializers.normal(0.5))
    ours, theirs = Dense(**kw), nn.DenseGeneral(**kw)
    params = ours.init(jax.random.key(0), x)
    ref_params = theirs.init(jax.random.key(0), x)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref_params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    ours_grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    ref_grads = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last dims"):
        Dense(features=3, axis=0).init(jax.random.key(0), x)
