"""The KV-cache sampler against transformers' generate, a cache-free forward, and itself across
devices, batch splits and seeds."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import hf_builders as hb
from jaxpref.generate import _generate_jit, filter_logits, generate, sample_tokens
from jaxpref.generate_cli import add_generate_parser
from jaxpref.models import VLM, forward, get_preset, init_params, load_pretrained, save_pretrained
from jaxpref.sharding import make_mesh

N = 10  # new tokens


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name, cfg in (("paligemma", hb.paligemma_config(kv_heads=1)), ("llava", hb.llava_config(kv_heads=2))):
        d = str(root / name)
        tm = hb.build(cfg)
        with torch.no_grad():  # larger decoder weights: varied greedy outputs instead of one repeated token
            for pname, p in tm.named_parameters():
                if "language_model" in pname and p.ndim == 2:
                    p.mul_(10.0)
        tm.save_pretrained(d)
        out[name] = (d, tm)
    return out


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {name: load_pretrained(d) for name, (d, _) in checkpoints.items()}


def _prompts(cfg, text_lens=(4, 9, 1), seed=0):
    """Left-padded prompts: image tokens, bos, text_lens[r] random text tokens; one image per row."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    tp = n + 1 + max(text_lens)
    ids = np.full((len(text_lens), tp), cfg.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for r, k in enumerate(text_lens):
        row = np.concatenate([[cfg.image_token_index] * n, [cfg.bos_token_id], rng.integers(5, hb.VOCAB - 2, k)])
        ids[r, tp - len(row):] = row
        mask[r, tp - len(row):] = 1
    px = rng.standard_normal((len(text_lens), cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return px, ids, mask


def _hf_generate(tm, cfg, px, ids, mask, eos):
    kw = {"token_type_ids": torch.zeros(ids.shape, dtype=torch.long)} if cfg.family == "paligemma" else {}
    with torch.no_grad():
        out = tm.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(px).permute(0, 3, 1, 2), do_sample=False, max_new_tokens=N,
                          min_new_tokens=0, pad_token_id=cfg.pad_token_id, eos_token_id=eos,
                          output_logits=True, return_dict_in_generate=True, **kw)
    tokens = out.sequences[:, ids.shape[1]:].numpy()
    logits = torch.stack(out.logits, 1).float()
    logp = torch.log_softmax(logits / (1.0 + 1e-7), -1).gather(-1, torch.tensor(tokens)[..., None])[..., 0].numpy()
    return tokens, logp


@pytest.mark.parametrize("name", ["paligemma", "llava"])
def test_greedy_matches_transformers(checkpoints, loaded, name):
    _, tm = checkpoints[name]
    model, params = loaded[name]
    cfg = model.config
    px, ids, mask = _prompts(cfg)
    free, _ = _hf_generate(tm, cfg, px, ids, mask, eos=None)
    assert free.shape == (3, N)
    # a stop token that some row first emits at a step k in [1, N - 1) and some other row never emits
    eos = next(int(row[k]) for row in free for k in range(1, N - 1)
               if row[k] not in row[:k] and not all(row[k] in r for r in free))
    ref, ref_logp = _hf_generate(tm, cfg, px, ids, mask, eos=eos)
    out = generate(model, params, pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=N,
                   greedy=True, eos_token_id=eos, pad_token_id=cfg.pad_token_id, rng=None)
    tokens, logprobs, lengths = map(np.asarray, (out.tokens, out.logprobs, out.lengths))
    ref = np.pad(ref, ((0, 0), (0, N - ref.shape[1])), constant_values=cfg.pad_token_id)  # HF stops when all rows did
    np.testing.assert_array_equal(tokens, ref)
    first = [list(r).index(eos) + 1 if eos in r else N for r in free]
    np.testing.assert_array_equal(lengths, first)
    assert lengths.min() < N and lengths.max() == N  # some rows stopped early, some did not
    for r, k in enumerate(first):
        if eos in free[r]:
            assert tokens[r, k - 1] == eos
        assert (tokens[r, k:] == cfg.pad_token_id).all() and (logprobs[r, k:] == 0).all()
        # log-probs (temperature 1) equal transformers' per-step logits at the same tokens
        np.testing.assert_allclose(logprobs[r, :k], ref_logp[r, :k], atol=1e-4)


def _full_forward_logprobs(model, params, px, ids, mask, out, temperature):
    """log_softmax(logits / (T + 1e-7)) at the generated tokens from one cache-free forward
    over prompt + completion (completion mask from the lengths; PaliGemma: completion is suffix)."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    b, tp = ids.shape
    comp_mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    seq = np.concatenate([ids, tokens], 1)
    seq_mask = np.concatenate([mask, comp_mask], 1)
    tt = np.concatenate([np.zeros_like(ids), np.ones_like(tokens)], 1) if model.config.prefix_lm else None
    logits = forward(model, params, pixel_values=px, input_ids=seq, attention_mask=seq_mask, token_type_ids=tt)
    logp = jax.nn.log_softmax(logits[:, tp - 1:-1].astype(jnp.float32) / (temperature + 1e-7), -1)
    return np.where(comp_mask, np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0], 0.0)


@pytest.mark.parametrize("name,temperature,top_k,top_p", [("paligemma", 0.7, 0, 0.9), ("llava", 1.0, 5, 1.0)])
def test_logprobs_equal_full_forward(loaded, name, temperature, top_k, top_p):
    model, params = loaded[name]
    cfg = model.config
    px, ids, mask = _prompts(cfg, seed=1)
    kw = dict(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=N, temperature=temperature,
              top_k=top_k, top_p=top_p, eos_token_id=[cfg.eos_token_id, 7, 11], pad_token_id=cfg.pad_token_id)
    out = generate(model, params, rng=jax.random.key(0), **kw)
    ref = _full_forward_logprobs(model, params, px, ids, mask, out, temperature)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=1e-4)  # unfiltered, temperature-scaled
    assert cfg.image_token_index not in np.asarray(out.tokens)

    # fixed seed: deterministic; another seed: different samples
    again = generate(model, params, rng=jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    np.testing.assert_array_equal(np.asarray(again.logprobs), np.asarray(out.logprobs))
    other = generate(model, params, rng=jax.random.key(1), **kw)
    assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any()
    # temperature, top_p, stop ids and the seed are traced: none of these calls compiled again
    compiled = _generate_jit._cache_size()
    generate(model, params, rng=jax.random.key(2), **{**kw, "temperature": 0.5, "eos_token_id": [3, 4, 5],
                                                     "top_p": 0.8 if top_p < 1 else 1.0})
    assert _generate_jit._cache_size() == compiled


def test_filtering_keeps_only_allowed_tokens():
    # probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02 over tokens 3, 0, 6, 1, 5, 2, 4
    probs = np.zeros(7)
    probs[[3, 0, 6, 1, 5, 2, 4]] = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    cases = {  # (top_k, top_p) -> allowed set
        (3, None): {3, 0, 6},
        (0, 0.6): {3, 0},  # 0.4 < 0.6 <= 0.65
        (0, 0.3): {3},  # always at least the most likely token
        (0, 0.92): {3, 0, 6, 1, 5},  # 0.9 < 0.92 <= 0.95
        (4, 0.92): {3, 0, 6, 1},  # top-k first, then the nucleus of what is left
        (2, 0.7): {3, 0},
    }
    keys = jax.random.split(jax.random.key(0), 4000)
    sample = jax.jit(sample_tokens, static_argnames=("top_k", "top_p", "greedy", "never"))
    for (k, p), allowed in cases.items():
        f = np.asarray(filter_logits(logits, top_k=k, top_p=p))[0]
        assert set(np.nonzero(np.isfinite(f))[0]) == allowed, (k, p)
        tokens, lp = sample(jnp.repeat(logits, len(keys), 0), keys, 1.0, top_k=k, top_p=p)
        seen = np.bincount(np.asarray(tokens), minlength=7)
        assert set(np.nonzero(seen)[0]) == allowed, (k, p, seen)
        # the kept tokens keep their relative odds (renormalised)
        want = probs[sorted(allowed)] / probs[sorted(allowed)].sum()
        np.testing.assert_allclose(seen[sorted(allowed)] / len(keys), want, atol=0.03)
        # log-probs are the unfiltered ones
        np.testing.assert_allclose(np.asarray(lp), np.log(probs[np.asarray(tokens)]), atol=1e-5)
    # `never` tokens (the image token) are not sampled even when most likely, and keep their log-prob mass
    tokens, lp = sample(jnp.repeat(logits, 500, 0), keys[:500], 1.0, never=(3,))
    assert 3 not in np.asarray(tokens) and set(np.asarray(tokens)) == {0, 1, 2, 4, 5, 6}
    np.testing.assert_allclose(np.asarray(lp), np.log(probs[np.asarray(tokens)]), atol=1e-5)
    greedy, _ = sample_tokens(logits, None, 1.0, greedy=True, never=(3,))
    assert int(greedy[0]) == 0
    # temperature sharpens before filtering: at T=0.25, 0.4 vs 0.25 becomes 0.4^4 : 0.25^4 -> top-p 0.8 keeps one
    f = filter_logits(logits / (0.25 + 1e-7), top_p=0.8)
    assert set(np.nonzero(np.isfinite(np.asarray(f)[0]))[0]) == {3}


def _batch8(cfg):
    px, ids, mask = _prompts(cfg, text_lens=(4, 9, 1, 6, 2, 9, 3, 5), seed=2)
    return dict(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=N, temperature=0.7, top_k=20,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)


def test_sharded_equals_single_device_and_rows_are_keyed_by_row_id(checkpoints, loaded):
    assert len(jax.devices()) == 8
    model, params = loaded["llava"]  # 2 kv heads: the cache is split over tensor=2
    kw = _batch8(model.config)
    rng = jax.random.key(3)
    single = generate(model, params, rng=rng, **kw)

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model8, params8 = load_pretrained(checkpoints["llava"][0], mesh=mesh)
    sharded = generate(model8, params8, rng=rng, **kw)
    assert sharded.tokens.sharding.spec[0] == "fsdp"  # rows spread over the fsdp devices
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(single.logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sharded.lengths), np.asarray(single.lengths))

    # rows 4..7 generated as a batch of 4 with their global row ids sample what they did in the batch of 8
    half = {k: (v[4:] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    part = generate(model, params, rng=rng, row_ids=np.arange(4, 8), **half)
    np.testing.assert_array_equal(np.asarray(part.tokens), np.asarray(single.tokens)[4:])
    np.testing.assert_allclose(np.asarray(part.logprobs), np.asarray(single.logprobs)[4:], atol=1e-5)
    # ... and with the default row ids (0..3) they sample something else
    default = generate(model, params, rng=rng, **half)
    assert (np.asarray(default.tokens) != np.asarray(single.tokens)[4:]).any()


def test_clear_errors(loaded):
    model, params = loaded["llava"]
    cfg = model.config
    px, ids, mask = _prompts(cfg)
    kw = dict(pixel_values=px, input_ids=ids, max_new_tokens=4, eos_token_id=1, pad_token_id=0, rng=jax.random.key(0))
    right = np.zeros_like(mask)
    right[:, :3] = 1
    with pytest.raises(ValueError, match="prompts must be left-padded: row 0"):
        generate(model, params, attention_mask=right, **kw)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(model, params, attention_mask=mask, top_p=0.0, **kw)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, params, attention_mask=mask, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="attention_mask int"):
        generate(model, params, attention_mask=mask[:, 1:], **kw)


def _word_tokenizer():
    """A real fast tokenizer over the shapes ids: <pad> <eos> <bos> <unk> <image> "\\n", then words w6..w1023."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"])}
    vocab["\n"] = 5
    vocab.update({f"w{i}": i for i in range(6, 1024)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" +"), "removed"),
                                                pre_tokenizers.Split("\n", "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def test_cli_prints_the_completion(tmp_path, capsys):
    pytest.importorskip("jaxpref.data.tokenizer")  # written alongside; the CLI loads tokenizers through it
    cfg = get_preset("tiny")  # PaliGemma-style, 32x32 images (16 image tokens), the shapes ids
    model = VLM(cfg)
    params = init_params(model, jax.random.key(0))
    params["decoder"]["layers"] = jax.tree.map(lambda p: p * 10.0, params["decoder"]["layers"])  # varied tokens
    d = str(tmp_path / "model")
    save_pretrained(model, params, d)
    tok = _word_tokenizer()
    tok.save_pretrained(d)
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")

    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers())
    argv = ["generate", "--model", d, "--image", str(tmp_path / "x.png"), "--prompt", "w7 w8 w9", "--greedy",
            "--max-new-tokens", "6"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out

    # the same request built by hand: PaliGemma's layout and SigLIP's preprocessing
    ids = np.array([[4] * 16 + [cfg.bos_token_id, 7, 8, 9, 5]], np.int32)
    px = np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255
    out = generate(model, params, pixel_values=((px - 0.5) / 0.5)[None], input_ids=ids,
                   attention_mask=np.ones_like(ids), max_new_tokens=6, greedy=True, eos_token_id=cfg.eos_token_id,
                   pad_token_id=cfg.pad_token_id, rng=None)
    tokens = [int(t) for t in np.asarray(out.tokens)[0, :int(out.lengths[0])] if t != cfg.eos_token_id]
    assert tokens and printed == tok.decode(tokens, skip_special_tokens=True) + "\n"

    args = parser.parse_args(["generate", "--model", d, "--image", str(tmp_path / "missing.png"), "--prompt", "w7"])
    assert args.func(args) == 2
    assert "--image" in capsys.readouterr().err
