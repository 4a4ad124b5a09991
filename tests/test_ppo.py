"""The PPO iteration: the rollout's log-probs agree with the update's forward pass, stop tokens and
masks as TRL, 8 devices = 1 device, the reference and reward model stay frozen, and a resumed run
equals an uninterrupted one (full runs on the tiny task through the CLI)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
from test_train import needs8, run_jaxpref, run_overrides, synthetic_batch, tiny_task  # noqa: F401 (a fixture)

from jaxpref.config import ConfigError, PPOConfig, config_from_dict, load_config
from jaxpref.sharding import make_mesh
from jaxpref.train import ppo
from jaxpref.train.loop import build_model, device_batch
from jaxpref.train.state import init_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(**kw):
    base = {"output_dir": "unused", "data": {"dataset_name": "unused"}, "model": {"name_or_path": "tiny"},
            "reward_model_path": "tiny", "bf16": False, "gradient_checkpointing": False, "learning_rate": 1e-3,
            "per_device_train_batch_size": 8, "response_length": 6, "stop_token": "eos", "num_ppo_epochs": 1}
    return config_from_dict(PPOConfig, {**base, **kw})


def setup(mesh, **kw):
    cfg = make_cfg(**kw)
    model = build_model(cfg, "lm")
    steps = ppo.build_steps(ppo.TASK, cfg, model, mesh, 10)
    state = init_state(steps.init_params(), steps.tx, cfg.seed, steps.shardings)
    return cfg, model, steps, state


def prompts(model, rows, seed):
    b = synthetic_batch(model, rows, "reward", seed)
    return {k: b[k] for k in ("prompt_ids", "prompt_mask", "pixel_values")}


def test_config_defaults_and_errors():
    cfg = make_cfg()
    assert (PPOConfig.learning_rate, PPOConfig.kl_coef, PPOConfig.vf_coef, PPOConfig.cliprange, PPOConfig.lam,
            PPOConfig.response_length, PPOConfig.temperature, PPOConfig.num_ppo_epochs) == (
        3e-6, 0.05, 0.1, 0.2, 0.95, 53, 0.7, 4)
    assert cfg.kl_estimator == "k1" and cfg.missing_eos_penalty is None and not cfg.whiten_rewards
    load_config("ppo", os.path.join(ROOT, "jaxpref/tasks/shapes/configs/ppo.yaml"))
    assert load_config("ppo", os.path.join(ROOT, "configs/paligemma-3b/ppo_rlaif_v.yaml")).mesh.tensor == 4
    with pytest.raises(ConfigError, match="reward_model_path: is required"):
        make_cfg(reward_model_path="")
    with pytest.raises(ConfigError, match=r"kl_estimator.*k3"):
        make_cfg(kl_estimator="k2")


def test_rollout_log_probs_agree_with_the_update_and_masks_follow_the_stop_token():
    """One epoch, one mini-batch: the update's forward gives the sampler's log-probs back (ratio 1,
    approx-KL 0); tokens after the first eos are pad; the reference starts equal to the policy."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg, model, steps, state = setup(mesh, temperature=1.3)
    batch = device_batch(prompts(model, 8, 0), mesh, None)
    roles = ppo.compute_roles(cfg, ppo.roles_of(cfg, model)[1])
    ro = jax.jit(lambda s, b, f: ppo.rollout(s, b, f, roles=roles, cfg=cfg))(state, batch, steps.frozen)
    responses, mask = np.asarray(ro["responses"]), np.asarray(ro["response_mask"])
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    for r, m in zip(responses, mask):
        stop = np.flatnonzero(r == eos)
        end = stop[0] + 1 if stop.size else len(r)
        assert np.all(r[end:] == pad) and np.all(m[:end] == 1) and np.all(m[end:] == 0)
    np.testing.assert_allclose(np.asarray(ro["kl"]), 0.0, atol=1e-5)  # reference == policy at step 0
    state, metrics = steps.step(state, batch)
    np.testing.assert_allclose(float(metrics["val/ratio"]), 1.0, atol=1e-4)
    assert float(metrics["policy/approxkl_avg"]) < 1e-8
    assert float(metrics["objective/kl"]) == pytest.approx(0.0, abs=1e-4)
    assert float(metrics["episode"]) == 8 and float(metrics["lr"]) == pytest.approx(1e-3)


def _log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_implicit_reward_is_beta_times_the_dpo_policys_log_ratio_to_the_reference(tmp_path):
    """reward_model_type=implicit: each rollout's score is beta x (log pi_rm(y|x) - log pi_ref(y|x)),
    the response tokens' log-probs at temperature 1 (not the sampling temperature), summed up to and
    including the stop token, in float64 numpy from each model's full forward; eval's reward_scores
    (its own forward passes) gives the same; missing_eos_penalty is subtracted after."""
    from jaxpref.sequence import concat_prompt_completion
    from jaxpref.models import init_params, save_pretrained
    from jaxpref.sequence import ImplicitReward, reward_scores

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tiny = build_model(make_cfg(), "lm")
    save_pretrained(tiny, init_params(tiny, jax.random.key(7)), str(tmp_path / "dpo"))  # not the policy's init
    beta, penalty = 0.3, 0.5
    cfg, model, steps, state = setup(mesh, reward_model_path=str(tmp_path / "dpo"), reward_model_type="implicit",
                                     implicit_reward_beta=beta, value_model_path="tiny", temperature=1.7,
                                     missing_eos_penalty=penalty)
    paths, models = ppo.roles_of(cfg, model)
    assert models["reward"].head == "lm" and models["value"].head == "scalar"
    batch = device_batch(prompts(model, 8, 0), mesh, None)
    roles = ppo.compute_roles(cfg, models)
    first = ppo.rollout(state, batch, steps.frozen, roles=roles, cfg=cfg)
    # stop at a token row 0 draws third (the tiny random model rarely draws eos), so some rows stop
    cfg = dataclasses.replace(cfg, stop_token_id=int(first["responses"][0, 2]))
    ro = jax.jit(lambda s, b, f: ppo.rollout(s, b, f, roles=roles, cfg=cfg))(state, batch, steps.frozen)
    responses, mask = np.asarray(ro["responses"]), np.asarray(ro["response_mask"])
    seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], ro["responses"], ro["response_mask"])
    ids, comp = np.asarray(seq["input_ids"]), np.asarray(seq["completion_mask"])

    def logps(m, params):
        logits = m.apply({"params": params}, batch["pixel_values"], seq["input_ids"], seq["attention_mask"],
                         seq["token_type_ids"]).logits
        lp = np.take_along_axis(_log_softmax64(logits)[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
        return (lp * comp[:, 1:]).sum(-1)

    want = beta * (logps(models["reward"], steps.frozen["reward"]) - logps(models["ref"], steps.frozen["ref"]))
    assert np.all(np.abs(want) > 1e-3)  # the two models differ
    has_eos = (responses == cfg.stop_token_id).any(1)
    assert has_eos.any() and not has_eos.all() and comp.sum() == mask.sum()
    np.testing.assert_allclose(np.asarray(ro["scores"]), want - penalty * ~has_eos, rtol=1e-4, atol=1e-4)
    independent = reward_scores(ImplicitReward(models["reward"], steps.frozen["reward"], models["ref"],
                                               steps.frozen["ref"], beta), batch, ro["responses"], ro["response_mask"])
    np.testing.assert_allclose(np.asarray(independent), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="reward_model_type"):
        make_cfg(reward_model_type="pairwise")
    with pytest.raises(ConfigError, match="implicit_reward_beta: must be > 0"):
        make_cfg(implicit_reward_beta=0.0)


@needs8
@pytest.mark.slow  # the DPO and trainer 8-device tests run in CI
def test_eight_devices_fsdp4_tensor2_give_the_single_device_iteration():
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    eight = make_mesh(1, 4, 2)
    kw = dict(num_ppo_epochs=2, num_mini_batches=2)
    _, model, steps1, s1 = setup(one, per_device_train_batch_size=4, **kw)  # rollout batch 4 x 1 x 2 = 8
    _, _, steps8, s8 = setup(eight, per_device_train_batch_size=1, **kw)  # 1 x 4 x 2 = 8
    ref = steps8.frozen["ref"]["decoder"]["layers"]["q"]["kernel"]
    ref_before = np.asarray(ref)
    assert ref.sharding.spec[1] == "fsdp" and ref.sharding.spec[2] == "tensor"
    for i in range(2):
        host = prompts(model, 8, seed=i)
        s1, m1 = steps1.step(s1, device_batch(host, one, None))
        s8, m8 = steps8.step(s8, device_batch(host, eight, None))
        m1, m8 = jax.device_get((m1, m8))
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=f"iteration {i} {k}")
    assert float(m1["objective/kl"]) != 0  # the policy moved
    q = s8.params["value"]["decoder"]["layers"]["q"]["kernel"]
    assert q.sharding.spec[1] == "fsdp" and q.sharding.spec[2] == "tensor"
    np.testing.assert_array_equal(np.asarray(steps8.frozen["ref"]["decoder"]["layers"]["q"]["kernel"]), ref_before)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# full runs


def _ppo(*args):
    return run_jaxpref("ppo", *args)


def test_resumed_run_equals_an_uninterrupted_one(tiny_task, tmp_path):
    from jaxpref.models import load_pretrained
    from jaxpref.train.logging import TIMING, read_metrics

    common = dict(reward_model_path="tiny", response_length=5, stop_token="eos", num_ppo_epochs=2,
                  num_mini_batches=2, per_device_train_batch_size=2, logging_steps=1, eval_steps=2, save_steps=2,
                  max_steps=4, eval_num_prompts=4, per_device_eval_batch_size=4, lr_scheduler_type="constant")
    ppo_over = lambda out, **kw: [o for o in run_overrides(tiny_task, "dpo", out, **{**common, **kw})
                                  if not o.startswith(("data.length_buckets", "per_device_train_batch_size=4"))]
    full = tmp_path / "full"
    r = _ppo(*ppo_over(full), "data.length_buckets=8,16,32")
    assert r.returncode == 0, r.stderr[-3000:]
    part = tmp_path / "part"
    r = _ppo(*ppo_over(part, max_steps=2), "data.length_buckets=8,16,32")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _ppo(*ppo_over(part, resume_from_checkpoint="true"), "data.length_buckets=8,16,32")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_metrics(str(full)), read_metrics(str(part))
    timing = lambda k: k in TIMING  # wall clock; the stopped run's end record has only these
    strip = lambda ms: [{k: v for k, v in m.items() if not timing(k)} for m in ms if not all(map(timing, set(m) - {"step", "epoch"}))]
    assert strip(a) == strip(b)
    assert {"objective/kl", "objective/scores", "policy/approxkl_avg", "loss/value_avg", "val/ratio", "lr",
            "episode"} <= set(a[0])
    assert {"eval_rm_win_rate", "eval_reward"} <= set(next(m for m in a if "eval_kl" in m))  # no scene: no judge
    pa, pb = (load_pretrained(str(d))[1] for d in (full, part))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.exists(full / "value_model" / "model.safetensors") and os.path.exists(full / "samples" / "step-4.jsonl")
