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
    """The FLOP counts (analytic and the compiler's) are linear in the batch."""
    model = VLM(get_preset("tiny"))
    params = init_params(model, jax.random.key(0))
    r1 = profile_forward(model, params, batch=1, iters=1)
    r4 = profile_forward(model, params, batch=4, iters=1)
    assert r4.flops == pytest.approx(4 * r1.flops, rel=1e-6)
    assert r4.compiler_flops == pytest.approx(4 * r1.compiler_flops, rel=0.05)
    assert count_params(params) == sum(x.size for x in jax.tree.leaves(params))


def test_analytic_flops_equal_the_compilers_on_one_layer():
    """XLA counts a scanned stack once; with one layer per stack both counts must agree (~1%)."""
    import dataclasses

    c = get_preset("small")
    c = c.replace(vision=dataclasses.replace(c.vision, num_hidden_layers=1),
                  text=dataclasses.replace(c.text, num_hidden_layers=1))
    model = VLM(c)
    r = profile_forward(model, init_params(model, jax.random.key(0)), batch=2, iters=1)
    assert r.flops == pytest.approx(r.compiler_flops, rel=0.03)


def _has_libtpu():
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


@pytest.mark.tpu
@pytest.mark.skipif(not _has_libtpu(), reason="AOT compiles for TPU need libtpu (pip install 'jaxpref[tpu]')")
def test_aot_compile_for_a_tpu_topology():
    r = _jaxpref("profile", "--model", "small", "--topology", "v5p:2x2x1", "--mesh-fsdp", "4", "--mesh-data", "1",
                 "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "AOT for v5p:2x2x1 (4 chips, mesh data=1 x fsdp=4 x tensor=1)" in r.stdout
    from jaxpref.models.hf import param_shapes
    from jaxpref.profile import aot_forward

    model = VLM(get_preset("small"))
    rep = aot_forward(model, "v5p:2x2x1", data=1, fsdp=4, batch=8)
    full = sum(x.size * 4 for x in jax.tree.leaves(param_shapes(model)))
    # parameters are sharded 4 ways (some small ones replicated) + the batch
    assert full / 4 < rep.memory_bytes["argument"] < full / 2
