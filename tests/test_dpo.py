"""DPO for VLMs: the objective from logits against a float64 numpy reference, PaliGemma's causal
completions, images encoded once per pair, 8 devices = 1 device, and precomputed reference
log-probs = the reference in the step (full runs on the tiny task, through the CLI)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import needs8, run_jaxpref, run_overrides, synthetic_batch, tiny_task  # noqa: F401 (a fixture)

from jaxpref.config import ConfigError, DPOConfig, config_from_dict, load_config
from jaxpref.models import VLM
from jaxpref.objectives.dpo import dpo_objective, token_logps
from jaxpref.sharding import make_mesh
from jaxpref.train import dpo
from jaxpref.train.loop import build_model, device_batch, initial_params, make_steps
from jaxpref.train.logging import read_metrics
from jaxpref.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(**kw):
    base = {"output_dir": "unused", "data": {"dataset_name": "unused"}, "model": {"name_or_path": "tiny"},
            "bf16": False, "gradient_checkpointing": False, "learning_rate": 1e-3, "per_device_train_batch_size": 8}
    return config_from_dict(DPOConfig, {**base, **kw})


def setup(mesh, **kw):
    cfg = make_cfg(**kw)
    model = build_model(cfg, "lm")
    steps = make_steps(dpo.TASK, cfg, model, mesh, 10)
    state = init_state(initial_params(cfg, model, mesh), steps.tx, cfg.seed, steps.shardings)
    return cfg, model, steps, state


# ---------------------------------------------------------------------------
# the objective


def _log_softmax64(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logsig(x):
    return -np.log1p(np.exp(-x))


@pytest.mark.parametrize("loss_type, weights", [(("sigmoid",), None), (("ipo",), None),
                                                (("sigmoid", "sft"), (1.0, 0.5)), (("robust",), None)])
def test_objective_matches_a_float64_reference(loss_type, weights):
    rng = np.random.default_rng(0)
    b, t, v, beta, eps = 4, 9, 11, 0.3, 0.1
    logits = rng.normal(0, 2, (2 * b, t, v)).astype(np.float32)
    ids = rng.integers(0, v, (2 * b, t)).astype(np.int32)
    cmask = np.zeros((2 * b, t), np.int32)
    for i in range(2 * b):
        start, end = int(rng.integers(2, 5)), int(rng.integers(6, t + 1))
        cmask[i, start:end] = 1
    ref_c, ref_r = rng.normal(-8, 2, b).astype(np.float32), rng.normal(-8, 2, b).astype(np.float32)
    valid = np.array([1, 1, 1, 0], np.float32)  # the last pair is padding
    loss_sum, stats = dpo_objective(jnp.asarray(logits), ids, cmask, ref_c, ref_r, valid, beta=beta,
                                    loss_type=loss_type, loss_weights=weights, label_smoothing=eps)
    got = {k: float(v) for k, v in stats.report().items()}

    lp = _log_softmax64(logits.astype(np.float64))[:, :-1]
    tok = np.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    m = cmask[:, 1:].astype(np.float64)
    seq, lens = (tok * m).sum(-1), m.sum(-1)
    pc, pr, lc, lr = seq[0::2], seq[1::2], lens[0::2], lens[1::2]
    keep = valid > 0
    s_c, s_r = pc - ref_c, pr - ref_r
    d = s_c - s_r
    per = {"sigmoid": -_logsig(beta * d),
           "ipo": (s_c / lc - s_r / lr - 1 / (2 * beta)) ** 2,
           "robust": (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps),
           "sft": np.full(b, -pc[keep].sum() / lc[keep].sum())}
    loss = sum(w * per[name] for name, w in zip(loss_type, weights or (1.0,) * len(loss_type)))
    want = {"loss": loss[keep].mean(), "rewards/chosen": (beta * s_c)[keep].mean(),
            "rewards/rejected": (beta * s_r)[keep].mean(), "rewards/accuracies": (s_c > s_r)[keep].mean(),
            "rewards/margins": (beta * d)[keep].mean(), "logps/chosen": pc[keep].mean(),
            "logps/rejected": pr[keep].mean()}
    mv = np.repeat(valid, 2)[:, None] * m
    mean_logit = logits[:, :-1].astype(np.float64).mean(-1)
    want["logits/chosen"] = (mean_logit * mv)[0::2].sum() / mv[0::2].sum()
    want["logits/rejected"] = (mean_logit * mv)[1::2].sum() / mv[1::2].sum()
    want["entropy"] = ((-(np.exp(lp) * lp).sum(-1)) * mv).sum() / mv.sum()
    want["mean_token_accuracy"] = ((lp.argmax(-1) == ids[:, 1:]) * mv)[0::2].sum() / mv[0::2].sum()
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(float(loss_sum), loss[keep].sum(), rtol=1e-5)


def test_config_checks_loss_types_and_weights():
    assert make_cfg().loss_type == ("sigmoid",) and make_cfg().beta == 0.1 and DPOConfig.learning_rate == 1e-6
    cfg = load_config("dpo", os.path.join(ROOT, "jaxpref/tasks/shapes/configs/dpo.yaml"), ["loss_type=sigmoid,sft",
                                                                           "loss_weights=1,0.2"])
    assert cfg.loss_type == ("sigmoid", "sft") and cfg.loss_weights == (1.0, 0.2)
    with pytest.raises(ConfigError, match=r"loss_type.*'nope'.*apo_down"):
        make_cfg(loss_type="nope")
    with pytest.raises(ConfigError, match="loss_weights: has 1 entries but loss_type has 2"):
        make_cfg(loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ConfigError, match="label_smoothing"):
        make_cfg(label_smoothing=0.5)


# ---------------------------------------------------------------------------
# the forward pass


def test_paligemma_completions_attend_causally():
    """Changing a later completion token leaves every earlier token's log-prob unchanged; marking
    the completion as prefix (what TRL's patched collator does) would let it see the future."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, model, _, state = setup(mesh)
    assert model.config.family == "paligemma" and model.config.prefix_lm
    host = synthetic_batch(model, 2, "reward", seed=1)
    host["chosen_mask"][:] = 1  # full-length completions: position k exists in every row
    lp = host["prompt_ids"].shape[1]
    k = 5  # the completion token that changes

    @jax.jit
    def per_token(params, batch):
        logits, seq = dpo.pair_logits(params, batch, model=model)
        return token_logps(logits, seq["input_ids"])[0]

    @jax.jit
    def per_token_as_prefix(params, batch):
        from jaxpref.sequence import concat_prompt_completion

        seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], batch["chosen_ids"],
                                       batch["chosen_mask"])
        logits = model.apply({"params": params}, batch["pixel_values"], seq["input_ids"], seq["attention_mask"],
                             jnp.zeros_like(seq["token_type_ids"])).logits
        return token_logps(logits, seq["input_ids"])[0]

    changed = {**host, "chosen_ids": host["chosen_ids"].copy()}
    changed["chosen_ids"][:, k] = (host["chosen_ids"][:, k] + 7) % 200 + 5
    a, b = np.asarray(per_token(state.params, host)), np.asarray(per_token(state.params, changed))
    pos = lp + k  # sequence index of the changed token; logp index pos - 1 predicts it
    w = k  # pair_logits starts at position lp - 1: window index k is sequence position pos - 1
    assert a.shape[1] == host["chosen_ids"].shape[1]  # the prompt's logits are never computed
    chosen_rows = slice(0, None, 2)
    np.testing.assert_array_equal(a[chosen_rows, :w], b[chosen_rows, :w])
    assert not np.allclose(a[chosen_rows, w], b[chosen_rows, w])  # the token itself did change
    np.testing.assert_array_equal(a[1::2], b[1::2])  # the rejected rows are untouched
    pa, pb = np.asarray(per_token_as_prefix(state.params, host)), np.asarray(per_token_as_prefix(state.params, changed))
    assert not np.allclose(pa[:, lp:pos - 1], pb[:, lp:pos - 1])  # as prefix, earlier tokens see the change


def test_the_lm_head_over_the_completions_only_gives_the_whole_sequences_loss():
    """pair_forward(completions_only=True) skips the prompt's logits; the DPO loss and every statistic
    equal those of the logits over the whole sequence."""
    from jaxpref.sequence import pair_forward

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, model, _, state = setup(mesh)
    host = synthetic_batch(model, 3, "reward", seed=2)
    ref = np.random.default_rng(0).normal(-20, 3, (2, 3)).astype(np.float32)
    valid = np.ones(3, np.float32)

    def stats(completions_only):
        logits, seq = pair_forward(model, state.params, host, completions_only=completions_only)
        return logits.shape[1], dpo_objective(logits, seq["input_ids"], seq["completion_mask"], ref[0], ref[1], valid,
                                              beta=0.3)[1].report()

    (t_full, full), (t_window, window) = stats(False), stats(True)
    assert t_window == host["chosen_ids"].shape[1] + 1 < t_full
    assert full.keys() == window.keys()
    for k in full:
        np.testing.assert_allclose(window[k], full[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_each_pairs_images_are_encoded_once(monkeypatch):
    """Both the policy and the reference encode B images for B pairs (not 2B)."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, model, steps, state = setup(mesh, per_device_train_batch_size=4)
    seen = []
    original = VLM.encode_images

    def spy(self, pixel_values):
        seen.append(pixel_values.shape)
        return original(self, pixel_values)

    monkeypatch.setattr(VLM, "encode_images", spy)
    _, stats = dpo.loss_fn(state.params, {**synthetic_batch(model, 4, "reward", 2), "valid": np.ones(4, np.float32)},
                           steps.frozen, model=model, cfg=make_cfg())
    assert [s[0] for s in seen] == [4, 4]  # the reference's pass and the policy's
    np.testing.assert_allclose(float(stats.report()["loss"]), np.log(2), rtol=1e-6)  # policy == reference


@needs8
def test_eight_devices_fsdp4_tensor2_give_the_single_device_losses():
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    eight = make_mesh(1, 4, 2)
    _, model, steps1, s1 = setup(one, per_device_train_batch_size=8)
    _, _, steps8, s8 = setup(eight, per_device_train_batch_size=2)  # the same 8 global pairs
    ref = steps8.frozen["decoder"]["layers"]["q"]["kernel"]
    assert ref.sharding.spec[1] == "fsdp" and ref.sharding.spec[2] == "tensor"  # the reference is sharded too
    for i in range(3):
        host = synthetic_batch(model, 8, "reward", seed=i)
        s1, m1 = steps1.step(s1, device_batch(host, one, 1))
        s8, m8 = steps8.step(s8, device_batch(host, eight, 1))
        m1, m8 = jax.device_get((m1, m8))
        assert sorted(m1) == sorted(m8) and "rewards/margins" in m1
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=f"step {i} {k}")
    assert float(m1["rewards/margins"]) != 0  # the policy moved away from the reference
    np.testing.assert_array_equal(np.asarray(steps8.frozen["decoder"]["layers"]["q"]["kernel"]), np.asarray(ref))


# ---------------------------------------------------------------------------
# full runs


def _dpo(*args):
    return run_jaxpref("dpo", *args)


@pytest.mark.slow  # CI budget; run with -m slow
def test_precomputed_reference_gives_the_same_losses(tiny_task, tmp_path):
    common = dict(logging_steps=1, eval_steps=4, save_steps=4, max_steps=6, learning_rate="3e-3", beta="0.5")
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"pre{precompute}"
        r = _dpo(*run_overrides(tiny_task, "dpo", out, precompute_ref_log_probs=str(precompute).lower(), **common))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[precompute] = read_metrics(str(out))
    train = {p: [m for m in ms if "loss" in m] for p, ms in runs.items()}
    assert len(train[True]) == len(train[False]) == 6
    np.testing.assert_allclose(train[False][0]["loss"], np.log(2), rtol=1e-6)  # policy == reference at step 1
    for a, b in zip(train[False], train[True]):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=f"step {a['step']} {k}")
    evals = {p: [m for m in ms if "eval_loss" in m] for p, ms in runs.items()}
    assert len(evals[True]) == 2
    for a, b in zip(evals[False], evals[True]):
        np.testing.assert_allclose(b["eval_loss"], a["eval_loss"], rtol=1e-4)
        assert "eval_rewards/accuracies" in a
    assert evals[False][-1]["eval_loss"] < np.log(2) - 0.03  # held-out pairs: it learns which colour is right
    table = np.load(tmp_path / "preTrue" / "ref_logps" / "train.npz")
    assert len(table["row"]) == 48 and np.all(np.isfinite(table["chosen"]))

    # resuming reuses the stored table (same fingerprint) and ends where the uninterrupted run did
    mtime = os.path.getmtime(tmp_path / "preTrue" / "ref_logps" / "train.npz")
    r = _dpo(*run_overrides(tiny_task, "dpo", tmp_path / "preTrue", precompute_ref_log_probs="true",
                            resume_from_checkpoint="true", **{**common, "max_steps": 8}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.getmtime(tmp_path / "preTrue" / "ref_logps" / "train.npz") == mtime
    assert [m["step"] for m in read_metrics(str(tmp_path / "preTrue")) if "loss" in m][-1] == 8


def test_a_reference_of_another_architecture_is_refused(tiny_task, tmp_path):
    r = _dpo(*run_overrides(tiny_task, "dpo", tmp_path / "x", ref_model="small", max_steps=1))
    assert r.returncode != 0 and "ref_model: preset 'small' is not the policy's architecture" in r.stderr
