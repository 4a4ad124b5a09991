"""PPO's rollout-to-update math against a float64 numpy transcription of TRL's PPOTrainer, in loops."""

import numpy as np
import pytest

from jaxpref.objectives import ppo

PAD = 0
EOS = 7


def np_whiten(x, mask, shift_mean=True):
    v = x[mask]
    mean = v.mean()
    var = ((v - mean) ** 2).mean() * len(v) / (len(v) - 1)
    w = (x - mean) / np.sqrt(var + 1e-8)
    return w if shift_mean else w + mean


def np_reference(scores, logprobs, ref, values, responses, kl_coef, estimator, gamma, lam, whiten_rewards):
    b, t = responses.shape
    seq_len = np.array([(list(r).index(PAD) if PAD in r else t) - 1 for r in responses])
    pad = np.arange(t)[None] > seq_len[:, None]
    pad_p1 = np.arange(t)[None] > seq_len[:, None] + 1
    logprobs = np.where(pad, 1.0, logprobs)
    ref = np.where(pad, 1.0, ref)
    values = np.where(pad_p1, 0.0, values)
    logr = ref - logprobs
    kl = -logr if estimator == "k1" else (np.exp(logr) - 1) - logr
    rewards = -kl_coef * kl
    for i in range(b):
        end = seq_len[i] + 1 if seq_len[i] + 1 < t else seq_len[i]
        rewards[i, end] += scores[i]
    if whiten_rewards:
        rewards = np.where(pad_p1, 0.0, np_whiten(rewards, ~pad_p1, shift_mean=False))
    adv = np.zeros((b, t))
    last = np.zeros(b)
    for s in reversed(range(t)):
        nextv = values[:, s + 1] if s < t - 1 else 0.0
        delta = rewards[:, s] + gamma * nextv - values[:, s]
        last = delta + gamma * lam * last
        adv[:, s] = last
    returns = adv + values
    adv = np.where(pad, 0.0, np_whiten(adv, ~pad))
    return adv, returns, rewards, kl, pad, pad_p1


def _rollout(seed, b=6, t=9):
    rng = np.random.default_rng(seed)
    responses = rng.integers(8, 50, (b, t))
    for i in range(b):  # row i stops at a different place; one row never stops
        if i < b - 1:
            stop = rng.integers(0, t)
            responses[i, stop] = EOS
            responses[i, stop + 1:] = PAD
    logprobs = -rng.uniform(0.1, 3, (b, t))
    ref = logprobs + rng.normal(0, 0.3, (b, t))
    values = rng.normal(0, 1, (b, t))
    scores = rng.normal(0, 2, b)
    return scores, logprobs, ref, values, responses


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_advantages_returns_rewards_match_trl(estimator, whiten_rewards, gamma, lam):
    scores, logprobs, ref, values, responses = _rollout(0)
    got = ppo.advantages_and_returns(scores, logprobs, ref, values, responses, pad_token_id=PAD, kl_coef=0.05,
                                     kl_estimator=estimator, gamma=gamma, lam=lam, whiten_rewards=whiten_rewards)
    adv, ret, rew, kl, pad, pad_p1 = np_reference(scores, logprobs, ref, values, responses, 0.05, estimator, gamma,
                                                  lam, whiten_rewards)
    np.testing.assert_array_equal(np.asarray(got["padding_mask"]), pad)
    np.testing.assert_array_equal(np.asarray(got["padding_mask_p1"]), pad_p1)
    for name, want in (("kl", kl), ("rewards", rew), ("returns", ret), ("advantages", adv)):
        np.testing.assert_allclose(np.asarray(got[name]), want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_truncate_after_stop_keeps_the_stop_token():
    tokens = np.array([[5, 7, 9, 7], [5, 6, 9, 8], [7, 1, 2, 3]])
    out = np.asarray(ppo.truncate_after_stop(tokens, 7, PAD))
    np.testing.assert_array_equal(out, [[5, 7, 0, 0], [5, 6, 9, 8], [7, 0, 0, 0]])
    seq_len, pad, _ = ppo.response_masks(out, PAD)
    np.testing.assert_array_equal(np.asarray(seq_len), [1, 3, 0])


def test_ppo_losses_match_trl():
    rng = np.random.default_rng(1)
    scores, logprobs, ref, values, responses = _rollout(1)
    a = ppo.advantages_and_returns(scores, logprobs, ref, values, responses, pad_token_id=PAD, kl_coef=0.05)
    old_lp, adv, ret = np.asarray(a["logprobs"]), np.asarray(a["advantages"]), np.asarray(a["returns"])
    pad, pad_p1 = np.asarray(a["padding_mask"]), np.asarray(a["padding_mask_p1"])
    old_v = np.asarray(a["values"])
    new_lp = old_lp + rng.normal(0, 0.4, old_lp.shape)
    vpred = old_v + rng.normal(0, 0.5, old_v.shape)
    loss, st = ppo.ppo_losses(new_lp, old_lp, adv, vpred, old_v, ret, pad, pad_p1, cliprange=0.2,
                              cliprange_value=0.2, vf_coef=0.1)
    # float64 reference
    new_lp = np.where(pad, 1.0, new_lp)
    vpred = np.where(pad_p1, 0.0, vpred)
    vclip = np.clip(vpred, old_v - 0.2, old_v + 0.2)
    v1, v2 = (vpred - ret) ** 2, (vclip - ret) ** 2
    vf = 0.5 * np.maximum(v1, v2)[~pad_p1].mean()
    ratio = np.exp(new_lp - old_lp)
    p1, p2 = -adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)
    pg = np.maximum(p1, p2)[~pad].mean()
    np.testing.assert_allclose(float(loss), pg + 0.1 * vf, rtol=1e-5)
    np.testing.assert_allclose(float(st["pg_clipfrac"]), (p2 > p1)[~pad].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(st["vf_clipfrac"]), (v2 > v1)[~pad_p1].mean(), rtol=1e-6)
    np.testing.assert_allclose(float(st["approxkl"]), 0.5 * ((new_lp - old_lp) ** 2).mean(), rtol=1e-5)
    assert 0 < float(st["pg_clipfrac"]) < 1  # the test exercises clipping


def test_bad_kl_estimator():
    with pytest.raises(ValueError, match=r"kl_estimator must be one of \('k1', 'k3'\)"):
        ppo.kl_per_token(np.zeros((1, 2)), np.zeros((1, 2)), "k2")
