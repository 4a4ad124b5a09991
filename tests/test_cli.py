"""The `jaxpref` command, run as a user would (a real subprocess)."""

import os
import subprocess
import sys

import jax
import pytest

from jaxpref.models import VLM, get_preset, init_params
from jaxpref.profile import count_params, profile_forward


def _jaxpref(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's laptop
    return subprocess.run([sys.executable, "-m", "jaxpref.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_profile_command_reports_compile_step_and_flops():
    r = _jaxpref("profile", "--model", "tiny", "--batch", "2", "--iters", "2")
    assert r.returncode == 0, r.stderr
    assert "compile" in r.stdout and "GFLOP per call" in r.stdout and "M parameters" in r.stdout


def test_profile_rejects_unknown_model():
    r = _jaxpref("profile", "--model", "no-such-model")
    assert r.returncode == 2 and "neither a directory nor a preset" in r.stderr


def test_profile_flops_scale_with_batch():
    """The compiler's FLOP count is linear in the batch (a wrong cost analysis would not be)."""
    model = VLM(get_preset("tiny"))
    params = init_params(model, jax.random.key(0))
    f1 = profile_forward(model, params, batch=1, iters=1).flops
    f4 = profile_forward(model, params, batch=4, iters=1).flops
    assert f1 and f4 == pytest.approx(4 * f1, rel=0.05)
    assert count_params(params) == sum(x.size for x in jax.tree.leaves(params))
