"""Every DPO loss type against an independent float64 numpy transcription of TRL's formulas."""

import numpy as np
import pytest

from jaxpref.objectives.dpo import LOSSES, check_loss_types, dpo_loss


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(name, pc, pr, rc, rr, lc, lr, beta, eps):
    """float64, written from TRL's DPOTrainer._compute_loss (trl 1.16)."""
    sc, sr = pc - rc, pr - rr
    d = sc - sr
    if name == "sigmoid":
        return -_logsig(beta * d)
    if name == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if name == "ipo":
        return (sc / np.maximum(lc, 1) - sr / np.maximum(lr, 1) - 1 / (2 * beta)) ** 2
    if name == "robust":
        return (-(1 - eps) * _logsig(beta * d) - (-eps * _logsig(-beta * d))) / (1 - 2 * eps)
    if name == "bco_pair":
        return -_logsig(beta * sc) - _logsig(-beta * sr)
    if name == "sppo_hard":
        return (sc - 0.5 / beta) ** 2 + (sr + 0.5 / beta) ** 2
    if name == "nca_pair":
        return -_logsig(beta * sc) - 0.5 * _logsig(-beta * sc) - 0.5 * _logsig(-beta * sr)
    if name == "apo_zero":
        return (1 - _sig(beta * sc)) + _sig(beta * sr)
    if name == "apo_down":
        return _sig(beta * sc) + 1 - _sig(beta * d)
    if name == "sft":
        return np.full_like(pc, -pc.sum() / lc.sum())
    raise KeyError(name)


def _inputs(seed=0, b=16):
    rng = np.random.default_rng(seed)
    lc = rng.integers(1, 40, b).astype(np.float64)
    lr = rng.integers(1, 40, b).astype(np.float64)
    pc, pr = -lc * rng.uniform(0.5, 3, b), -lr * rng.uniform(0.5, 3, b)
    rc, rr = pc + rng.normal(0, 2, b), pr + rng.normal(0, 2, b)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_type_matches_trl_formula(name, beta):
    pc, pr, rc, rr, lc, lr = _inputs()
    eps = 0.2
    loss, rw_c, rw_r = dpo_loss(pc, pr, rc, rr, lc, lr, beta=beta, loss_type=name, label_smoothing=eps)
    want = reference(name, pc, pr, rc, rr, lc, lr, beta, eps)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rw_c), beta * (pc - rc), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rw_r), beta * (pr - rr), rtol=1e-5, atol=1e-5)


def test_weighted_combination():
    pc, pr, rc, rr, lc, lr = _inputs(1)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, lc, lr, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2])
    want = 0.8 * reference("sigmoid", pc, pr, rc, rr, lc, lr, 0.1, 0) + 0.2 * reference("sft", pc, pr, rc, rr, lc, lr, 0.1, 0)
    np.testing.assert_allclose(np.asarray(loss), want, rtol=2e-5)


def test_sigmoid_gradient_pushes_chosen_up():
    import jax

    pc, pr, rc, rr, lc, lr = _inputs(2)
    g = jax.grad(lambda c, r: dpo_loss(c, r, rc, rr, lc, lr)[0].sum(), argnums=(0, 1))(pc.astype(np.float32),
                                                                                   pr.astype(np.float32))
    assert (np.asarray(g[0]) < 0).all() and (np.asarray(g[1]) > 0).all()


def test_bad_loss_type_names_the_choices():
    with pytest.raises(ValueError, match="choose from .*'apo_down'.*'sigmoid'"):
        check_loss_types("sigmod", None)
    with pytest.raises(ValueError, match="loss_weights has 1 entries but loss_type has 2"):
        check_loss_types(["sigmoid", "ipo"], [1.0])
