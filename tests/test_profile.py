"""`jaxpref profile` and what it measures: real steps built from recipes, analytic against XLA FLOPs,
per-device memory that falls as the batch axes grow (compiled memory analysis, not timings),
traces, and ahead-of-time compiles for TPU topologies (skipped where libtpu is absent)."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxpref.config import load_config
from jaxpref.models import VLM, get_preset
from jaxpref.profile import TopologyError, count_chips, measure, text_flops, topology_name, vision_flops
from jaxpref.profile_cli import _candidates, _global_rows_kept, _merge, forward_program
from jaxpref.sharding import make_mesh
from jaxpref.train.program import build_program, load_recipe, recipe_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "jaxpref", "tasks", "shapes", "configs")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="AOT compiles for TPU need libtpu (pip install 'jaxpref[tpu]')")
UNUSED = ["output_dir=/tmp/jaxpref-profile-unused", "data.dataset_name=unused"]


def _jaxpref(*args, timeout=600):
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's laptop
    return subprocess.run([sys.executable, "-m", "jaxpref.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# ---------------------------------------------------------------------------
# the command


def test_profile_of_a_forward_pass_reports_time_flops_and_memory(tmp_path):
    out = tmp_path / "r.json"
    r = _jaxpref("profile", "--model", "tiny", "--batch", "2", "--iters", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile" in r.stdout and "TFLOP per step" in r.stdout and "MFU" in r.stdout
    rep = json.load(open(out))
    for key in ("step", "platform", "topology", "compile_seconds", "step_seconds_median", "flops_per_step", "mfu",
                "per_device_memory_bytes", "device_memory_bytes", "fits"):
        assert key in rep, key
    assert rep["platform"] == "cpu" and rep["topology"] is None and rep["fits"] is True
    assert rep["step_seconds_median"] > 0 and 0 < rep["mfu"] < 2 and rep["per_device_memory_bytes"] > 0


def test_profile_rejects_unknown_models_and_bad_recipes():
    r = _jaxpref("profile", "--model", "no-such-model")
    assert r.returncode == 2 and "neither a directory nor a preset" in r.stderr
    r = _jaxpref("profile", "--config", os.path.join(CONFIGS, "dpo.yaml"), "model.name_or_path=tiny", "beta=-1",
                 *UNUSED)
    assert r.returncode == 2 and "beta" in r.stderr


def test_profile_of_a_recipe_runs_its_real_step_and_writes_a_trace(tmp_path):
    """The DPO recipe's own jitted step (the trainer's, with its reference), timed, with a trace."""
    out, trace = tmp_path / "dpo.json", tmp_path / "trace"
    r = _jaxpref("profile", "--config", os.path.join(CONFIGS, "dpo.yaml"), "model.name_or_path=tiny",
                 "precompute_ref_log_probs=false", *UNUSED, "--iters", "2",
                 "per_device_train_batch_size=2",  # an override after a flag is still an override
                 "--trace", str(trace), "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(out))
    assert rep["step"] == "dpo step" and rep["rows"] == 2 and rep["step_seconds_median"] > 0
    assert glob.glob(str(trace / "**" / "*.xplane.pb"), recursive=True), "no jax.profiler trace written"


def test_the_trainer_is_told_by_the_recipe():
    assert [recipe_trainer(os.path.join(CONFIGS, f"{k}.yaml")) for k in ("sft", "reward", "dpo", "ppo")] == \
        ["sft", "reward", "dpo", "ppo"]
    assert recipe_trainer(os.path.join(ROOT, "configs", "paligemma-3b", "ppo_rlaif_v.yaml")) == "ppo"


# ---------------------------------------------------------------------------
# FLOPs


def _one_layer(name="small"):
    c = get_preset(name)
    return dataclasses.replace(c, vision=dataclasses.replace(c.vision, num_hidden_layers=1),
                               text=dataclasses.replace(c.text, num_hidden_layers=1))


def test_analytic_flops_equal_xlas_on_an_unscanned_model():
    """XLA counts a scanned stack's body once; with one layer per stack both counts agree (~3%)."""
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    prog = forward_program(VLM(_one_layer()), mesh, batch=2, seq=None)
    m = measure(prog.fn, prog.args, run=False)
    assert prog.flops == pytest.approx(m.xla_flops, rel=0.03)


def test_flops_are_linear_in_the_batch_and_count_the_head_where_it_reads():
    c = get_preset("small")
    assert text_flops(c, 4, 32) == pytest.approx(4 * text_flops(c, 1, 32))
    assert vision_flops(c, 3) == pytest.approx(3 * vision_flops(c, 1))
    full, window = text_flops(c, 2, 100), text_flops(c, 2, 100, head_positions=10)
    assert full - window == pytest.approx(2 * 90 * 2 * c.text.hidden_size * c.text.vocab_size)


# ---------------------------------------------------------------------------
# memory falls as the batch axes grow


def _temporaries(name, n, rows, *overrides):
    kind, cfg = load_recipe(os.path.join(CONFIGS, f"{name}.yaml"),
                            [*UNUSED, "model.name_or_path=small", f"per_device_train_batch_size={rows // n}",
                             *overrides])
    mesh = make_mesh(data=1, fsdp=n, tensor=1, devices=jax.devices()[:n])
    prog = build_program(kind, cfg, mesh)
    return measure(prog.fn, prog.args, run=False).memory["temp"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("name,overrides", [
    ("dpo", ("max_length=96", "precompute_ref_log_probs=false")),
    pytest.param("ppo", ("reward_model_path=small", "num_mini_batches=1", "response_length=8", "max_prompt_length=72"),
                 marks=pytest.mark.slow)])  # CI budget: DPO's case runs there
def test_per_device_temporaries_shrink_as_the_batch_axes_grow(name, overrides):
    """At one global batch (16 rows), the compiled step's per-device temporaries on 2 and 8 devices fall
    close to 1/N of one device's: activations live on their batch shard, never whole on every device."""
    t1, t2, t8 = (_temporaries(name, n, 16, *overrides) for n in (1, 2, 8))
    assert t2 < 0.65 * t1, (t1, t2)
    assert t8 < 0.25 * t1, (t1, t8)


# ---------------------------------------------------------------------------
# levers


def test_levers_are_tried_cheapest_first_and_keep_the_global_batch():
    cfg = load_config("dpo", os.path.join(CONFIGS, "dpo.yaml"),
                      [*UNUSED, "precompute_ref_log_probs=false", "per_device_train_batch_size=4",
                       "mesh.fsdp=2", "mesh.tensor=2", "mesh.data=1"])
    names = [n for n, _ in _candidates("dpo", cfg, 4)]
    assert names[:4] == ["remat", "frozen models in bfloat16", "bf16 compute", "fsdp over every chip"]
    assert "micro-batches of 2 rows per device" in names and "micro-batches of 1 rows per device" in names
    over = dict(o.split("=") for o in _global_rows_kept(cfg, 1, -1, 1, 4))  # 4 rows x 2 shards -> 4 shards
    assert over["mesh.fsdp"] == "4" and over["per_device_train_batch_size"] == "2"
    assert _merge(["mesh.fsdp=4", "bf16=true"], ["mesh.fsdp=8", "mesh.tensor=1"]) == \
        ["mesh.fsdp=8", "bf16=true", "mesh.tensor=1"]


# ---------------------------------------------------------------------------
# ahead of time, for a TPU slice


def test_slice_names_become_topologies():
    assert topology_name("v5e-16") == "v5e:4x4" and topology_name("v5p-16") == "v5p:2x2x2"
    assert topology_name("v4-16") == "v4:2x2x2" and topology_name("v6e:2x4") == "v6e:2x4"
    with pytest.raises(TopologyError, match="no v5e slice of 12 chips"):
        topology_name("v5e-12")


@pytest.mark.tpu
@needs_libtpu
@pytest.mark.parametrize("name", ["dpo", "ppo"])
def test_a_recipes_step_compiles_for_a_tpu_slice(tmp_path, name):
    out = tmp_path / "r.json"
    r = _jaxpref("profile", "--config", os.path.join(CONFIGS, f"{name}.yaml"), "model.name_or_path=tiny",
                 "reward_model_path=tiny" if name == "ppo" else "precompute_ref_log_probs=false",
                 "per_device_train_batch_size=2", *UNUSED, "--topology", "v5e-4", "--json", str(out),
                 *(["--phases"] if name == "ppo" else []))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(out))
    assert rep["platform"] == "tpu" and rep["chips"] == 4 and rep["device_kind"] == "TPU v5 lite"
    assert rep["device_memory_bytes"] == 16 * 2**30 and rep["fits"] is True
    assert rep["step_seconds_median"] is None and rep["estimated_step_seconds"] > 0
    assert rep["collectives"], "a step sharded over 4 chips has collectives"
    if name == "ppo":
        assert [p["step"] for p in rep["phases"]] == ["ppo rollout", "ppo scoring", "ppo update"]


@pytest.mark.tpu
@needs_libtpu
def test_a_v4_topology_counts_chips_not_cores():
    from jaxpref.profile import topology_devices

    jax.config.update("jax_platforms", "cpu")
    devices = topology_devices("v4-8")  # 4 chips, two cores each: 8 devices ahead of time
    assert len(devices) == 8 and count_chips(devices) == 4
