"""Reward and SFT losses and metrics against float64 numpy transcriptions of TRL's formulas."""

import numpy as np
import pytest

from jaxpref.objectives.reward import completion_mean_values, last_token_values, pooled_scores, reward_loss
from jaxpref.objectives.sft import sft_loss


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def trl_reward_reference(rc, rr, margin, coef):
    """float64, as TRL's RewardTrainer.compute_loss (trl 1.x) computes loss and metrics."""
    d = rc - rr - (margin if margin is not None else 0.0)
    loss = -_logsig(d).mean()
    if coef is not None:
        loss += coef * np.mean((rc + rr) ** 2)
    both = np.concatenate([rc, rr])
    return {"loss": loss, "accuracy": np.mean(rc > rr), "margin": np.mean(rc - rr), "min_reward": both.min(),
            "mean_reward": both.mean(), "max_reward": both.max()}


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.01, 0.5])
def test_reward_loss_and_metrics_match_trl(with_margin, coef):
    rng = np.random.default_rng(0)
    b = 64
    rc, rr = rng.normal(0, 3, b), rng.normal(0, 3, b)
    margin = rng.uniform(0, 2, b) if with_margin else None
    valid = np.ones(b, np.float32)
    loss_sum, stats = reward_loss(rc.astype(np.float32), rr.astype(np.float32), valid,
                                  margin=None if margin is None else margin.astype(np.float32),
                                  center_rewards_coefficient=coef)
    got = {k: float(v) for k, v in stats.report().items()}
    want = trl_reward_reference(rc, rr, margin, coef)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(float(loss_sum) / b, want["loss"], rtol=1e-5)


def test_padding_rows_and_micro_batches_give_the_global_metrics():
    """Stats of uneven micro-batches with padding rows merge into the metrics of the real rows."""
    rng = np.random.default_rng(1)
    rc, rr, margin = rng.normal(0, 2, 24), rng.normal(0, 2, 24), rng.uniform(0, 1, 24)
    valid = np.ones(24, np.float32)
    valid[[3, 10, 11, 20, 21, 22, 23]] = 0
    rc_pad = np.where(valid > 0, rc, 1e6)  # padding rows hold garbage that must not leak
    parts = [slice(0, 7), slice(7, 16), slice(16, 24)]
    stats = None
    for sl in parts:
        _, s = reward_loss(rc_pad[sl].astype(np.float32), rr[sl].astype(np.float32), valid[sl],
                           margin=margin[sl].astype(np.float32), center_rewards_coefficient=0.1)
        stats = s if stats is None else stats.merge(s)
    keep = valid > 0
    want = trl_reward_reference(rc[keep], rr[keep], margin[keep], 0.1)
    got = {k: float(v) for k, v in stats.report().items()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_last_token_values_reads_the_last_attended_position():
    # left-padded prompt (2 slots) + right-padded completion (3 slots)
    mask = np.array([[0, 1, 1, 1, 0],   # last real token at 3
                     [1, 1, 1, 1, 1],   # at 4
                     [0, 0, 1, 0, 0]])  # at 2
    values = np.arange(15, dtype=np.float32).reshape(3, 5)
    np.testing.assert_array_equal(np.asarray(last_token_values(values, mask)), [3.0, 9.0, 12.0])


def test_mean_pooling_averages_the_completion_tokens_only():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 7)).astype(np.float32)
    completion = np.array([[0, 0, 1, 1, 1, 0, 0],
                           [0, 0, 0, 0, 0, 0, 0],   # no completion: 0
                           [1, 1, 1, 1, 1, 1, 1],
                           [0, 0, 0, 0, 0, 0, 1]])
    attention = np.maximum(completion, np.array([1, 1, 0, 0, 0, 0, 0]))
    want = [values[i].astype(np.float64)[completion[i] > 0].mean() if completion[i].any() else 0.0 for i in range(4)]
    np.testing.assert_allclose(np.asarray(completion_mean_values(values, completion)), want, rtol=1e-6)
    seq = {"attention_mask": attention, "completion_mask": completion}
    np.testing.assert_allclose(np.asarray(pooled_scores(values, seq, "mean")), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pooled_scores(values, seq, "last")),
                                  np.asarray(last_token_values(values, attention)))
    with pytest.raises(ValueError, match="score pooling"):
        pooled_scores(values, seq, "max")


def trl_sft_reference(logits, ids, attention_mask, completion_mask):
    """float64: mean NLL of completion tokens (shifted), TRL's mean_token_accuracy and entropy."""
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    m = completion_mask[:, 1:].astype(bool)
    tgt = ids[:, 1:]
    lp = np.take_along_axis(logp[:, :-1], tgt[..., None], -1)[..., 0]
    acc = (logits[:, :-1].argmax(-1) == tgt)
    ent = -(np.exp(logp) * logp).sum(-1)
    am = attention_mask.astype(bool)
    return {"loss": -lp[m].mean(), "mean_token_accuracy": acc[m].mean(), "entropy": ent[am].mean()}


def test_sft_loss_matches_reference_and_ignores_prompt_and_padding():
    rng = np.random.default_rng(2)
    b, t, v = 5, 12, 40
    logits = rng.normal(0, 2, (b, t, v))
    ids = rng.integers(0, v, (b, t))
    attention = np.ones((b, t), np.int32)
    attention[0, :3] = 0  # left padding
    completion = np.zeros((b, t), np.int32)
    completion[:, 6:10] = 1
    completion[1, 9] = 0  # a shorter completion, right-padded
    attention[1, 10:] = 0
    valid = np.array([1, 1, 1, 1, 0], np.float32)  # the last row is padding
    loss_sum, stats = sft_loss(logits.astype(np.float32), ids, attention, completion, valid)
    keep = valid > 0
    want = trl_sft_reference(logits[keep], ids[keep], attention[keep], completion[keep])
    got = {k: float(x) for k, x in stats.report().items()}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
    n = completion[keep][:, 1:].sum()
    np.testing.assert_allclose(float(loss_sum), want["loss"] * n, rtol=1e-5)
    # Changing a prompt token's logits (not predicting a completion token) leaves the loss unchanged.
    logits2 = logits.copy()
    logits2[:, 1] += 5.0
    np.testing.assert_allclose(float(sft_loss(logits2.astype(np.float32), ids, attention, completion, valid)[0]),
                               float(loss_sum), rtol=1e-6)
