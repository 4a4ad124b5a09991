"""LoRA (jaxpref.models.lora) against PEFT on transformers' models: which modules are adapted, the
adapted logits, the adapter files both ways, the merged export; and the trainers with use_peft:
only adapters train, the DPO reference is the base with adapters off, resume is bit-exact."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_builders as hb
from jaxpref.config import ConfigError, DPOConfig, config_from_dict, load_config
from jaxpref.models import forward, load_pretrained, lora, save_pretrained
from jaxpref.sharding import make_mesh
from jaxpref.train import dpo
from jaxpref.train.loop import build_model, device_batch, make_steps
from jaxpref.train.state import init_state
from test_train import run_jaxpref, run_overrides, setup, synthetic_batch, tiny_task  # noqa: F401

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

BUILDERS = {"paligemma": hb.paligemma_config, "llava": hb.llava_config}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (directory, transformers model)} of tiny random PaliGemma and LLaVA checkpoints."""
    out = {}
    for family, make in BUILDERS.items():
        d = str(tmp_path_factory.mktemp(family))
        out[family] = (d, hb.build(make(), d))
    return out


def peft_targets(model, **kw):
    """The module names PEFT wraps with LoRA on a fresh copy of `model` (get_peft_model mutates it)."""
    import copy

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, **kw))
    return sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A"))


def our_targets(config, args: lora.LoraArgs, head="lm"):
    plan = lora.make_plan(config, head, args)
    return sorted(t.name.format(i=i) if i is not None else t.name for t in plan.targets
                  for i in (t.layers if t.layers is not None else (None,)))


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj"), r".*language_model.*\.(q|o)_proj",
                                     r"model\.language_model\.layers\.1\.mlp\.down_proj", ("fc1", "linear_1")])
def test_targets_are_the_modules_peft_adapts(checkpoints, family, targets):
    d, model = checkpoints[family]
    config = load_pretrained(d)[0].config
    try:
        theirs = peft_targets(model, target_modules=list(targets) if isinstance(targets, tuple) else targets)
    except ValueError as e:
        assert "not found" in str(e)
        with pytest.raises(ConfigError, match="not found"):
            our_targets(config, lora.LoraArgs(target_modules=targets))
        return
    assert our_targets(config, lora.LoraArgs(target_modules=targets)) == theirs


def test_trl_reading_of_one_name_and_errors(checkpoints):
    config = load_pretrained(checkpoints["paligemma"][0])[0].config
    spec = lora.target_spec(["q_proj"])  # TRL: a one-element list is its string, a regex over the whole name
    assert spec == "q_proj"
    with pytest.raises(ConfigError, match=r"not found in the model.*model\.language_model\.layers\.N\.self_attn\.q_proj"):
        lora.make_plan(config, "lm", lora.LoraArgs(target_modules=spec))
    with pytest.raises(ConfigError, match="no default for paligemma"):
        lora.make_plan(config, "lm", lora.LoraArgs(target_modules=None))
    with pytest.raises(ConfigError, match="not a linear layer"):
        lora.make_plan(config, "lm", lora.LoraArgs(target_modules=("embed_tokens",)))
    with pytest.raises(ConfigError, match="matches 1 of the 2 layers"):
        lora.make_plan(config, "lm", lora.LoraArgs(target_modules="all-linear", modules_to_save=("layers.0.mlp",)))
    plan = lora.make_plan(config, "lm", lora.LoraArgs(target_modules="all-linear",
                                                      modules_to_save=("multi_modal_projector",)))
    assert ("projector", "kernel") in plan.saved and all(t.path != ("projector",) for t in plan.targets)
    assert lora.make_plan(config, "lm", lora.LoraArgs(r=8, alpha=16, use_rslora=True,
                                                      target_modules="all-linear")).scale == 16 / np.sqrt(8)


def inputs(model, seed=0, rows=2):
    c, rng = model.config, np.random.default_rng(seed)
    n = c.num_image_tokens
    ids = np.concatenate([np.full((rows, n), c.image_token_index), np.full((rows, 1), c.bos_token_id),
                          rng.integers(3, 200, (rows, 7))], 1).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, -2:] = 0  # right padding on one row
    px = rng.normal(size=(rows, c.vision.image_size, c.vision.image_size, 3)).astype(np.float32)
    return px, ids, mask


def torch_logits(model, px, ids, mask):
    """transformers' logits at the attended positions (pads zeroed: what they hold is no one's contract)."""
    with torch.no_grad():
        kw = {"token_type_ids": torch.zeros(ids.shape, dtype=torch.long)} if model.config.model_type == "paligemma" else {}
        out = model(pixel_values=torch.tensor(px).permute(0, 3, 1, 2), input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask), **kw).logits.numpy()
    return out * mask[..., None]


def ours(model, params, px, ids, mask):
    tt = np.zeros_like(ids) if model.config.prefix_lm else None
    out = forward(model, params, pixel_values=px, input_ids=ids, attention_mask=mask, token_type_ids=tt)
    return np.asarray(out) * mask[..., None]


def random_adapters(plan, params, seed):
    """Adapters with B != 0 (a trained adapter), and module copies moved off the base."""
    trained = lora.init_adapters(plan, params, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(trained))))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), trained)


@pytest.mark.parametrize("family", ["paligemma", pytest.param("llava", marks=pytest.mark.slow)])  # CI budget
def test_adapters_match_peft_both_ways_and_merge(checkpoints, family, tmp_path):
    d, hf_model = checkpoints[family]
    model, params = load_pretrained(d)
    px, ids, mask = inputs(model)
    plan = lora.make_plan(model.config, "lm", lora.LoraArgs(r=4, alpha=8, target_modules="all-linear",
                                                            modules_to_save=("multi_modal_projector",)))
    # at init the adapted model is the base, bit for bit
    start = lora.init_adapters(plan, params, jax.random.key(0))
    base = ours(model, params, px, ids, mask)
    np.testing.assert_array_equal(ours(model, lora.Adapted(params, start, plan), px, ids, mask), base)
    # jaxpref's adapter, saved in PEFT's format, loaded by peft onto transformers' model
    trained = random_adapters(plan, params, 1)
    adapted = ours(model, lora.Adapted(params, trained, plan), px, ids, mask)
    assert np.abs(adapted - base).max() > 1e-2
    lora.save_adapter(plan, trained, model.config, "lm", str(tmp_path / "ours"), base_model_name_or_path=d)
    saved = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(hb.build(BUILDERS[family](), None), str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_logits(pm, px, ids, mask), adapted, atol=1e-4, rtol=0)
    # PEFT's own adapter (random weights), read by jaxpref
    theirs = peft.get_peft_model(hb.build(BUILDERS[family](), None),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    plan2, trained2 = lora.load_adapter(str(tmp_path / "peft"), model.config, "lm")
    np.testing.assert_allclose(ours(model, lora.Adapted(params, trained2, plan2), px, ids, mask),
                               torch_logits(theirs, px, ids, mask), atol=1e-4, rtol=0)
    # the merged model equals the adapted one, in jaxpref and (saved) in transformers
    merged = lora.merge(plan, params, trained)
    np.testing.assert_allclose(ours(model, merged, px, ids, mask), adapted, atol=1e-5, rtol=0)
    save_pretrained(model, merged, str(tmp_path / "merged"))
    import transformers

    back = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(torch_logits(back, px, ids, mask), adapted, atol=1e-4, rtol=0)


def test_bad_adapter_files_are_named(checkpoints, tmp_path):
    d, _ = checkpoints["llava"]
    model, params = load_pretrained(d)
    plan = lora.make_plan(model.config, "lm", lora.LoraArgs(r=4, target_modules=("q_proj",) * 2))
    lora.save_adapter(plan, lora.init_adapters(plan, params, jax.random.key(0)), model.config, "lm", str(tmp_path),
                      base_model_name_or_path=d)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    json.dump({**cfg, "r": 8}, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(lora.CheckpointError, match=r"adapter_model.safetensors: .*q_proj.lora_A.weight has shape \(4, 48\), "
                                                    r"expected \(8, 48\)"):
        lora.load_adapter(str(tmp_path), model.config, "lm")
    json.dump({**cfg, "use_dora": True}, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(lora.CheckpointError, match="use_dora=True is not supported"):
        lora.load_adapter(str(tmp_path), model.config, "lm")


# ---------------------------------------------------------------------------
# trainers


def one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


LORA = {"model.use_peft": True, "model.lora_target_modules": ["all-linear"], "model.lora_r": 4}


def test_sft_steps_train_only_the_adapters_and_match_the_merged_model():
    mesh = one_device()
    cfg, model, steps, state = setup("sft", mesh, **LORA, **{"model.lora_dropout": 0.0})
    base = jax.tree.map(np.asarray, steps.frozen["base"])
    assert set(state.params) == {"lora", "modules"} and not jax.tree.leaves(state.params["modules"])
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt < sum(x.size for x in jax.tree.leaves(base)) / 4  # moments of the adapters only
    batches = [device_batch(synthetic_batch(model, 8, "sft", i), mesh, 1) for i in range(3)]
    for b in batches:
        state, m = steps.step(state, b)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(steps.frozen["base"])):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base never moves
    assert float(jnp.abs(state.params["lora"]["decoder"]["layers"]["q"]["lora_b"]).max()) > 0
    # the eval loss of the adapted model equals the loss of the merged full model
    plan = lora.make_plan(model.config, "lm", lora.LoraArgs(r=4, target_modules="all-linear"))
    merged = lora.merge(plan, base, state.params)
    full_cfg, _, full_steps, _ = setup("sft", mesh)
    ours_loss = steps.stats(state.params, jax.tree.map(lambda x: x[0], batches[0])).report()["loss"]
    full_loss = full_steps.stats(merged, jax.tree.map(lambda x: x[0], batches[0])).report()["loss"]
    np.testing.assert_allclose(float(ours_loss), float(full_loss), rtol=1e-5)


@pytest.mark.slow  # a detail of SFT; CI keeps the 30-minute budget
def test_lora_dropout_draws_per_step_and_only_while_training():
    mesh = one_device()
    _, model, steps, state = setup("sft", mesh, **LORA, **{"model.lora_dropout": 0.5})
    _, _, steps0, state0 = setup("sft", mesh, **LORA, **{"model.lora_dropout": 0.0})
    b = device_batch(synthetic_batch(model, 8, "sft", 0), mesh, 1)
    state, m1 = steps.step(state, b)
    state0, m0 = steps0.step(state0, b)
    # B = 0 at step 0: the loss is the base's either way, but B's gradient reads the dropped-out inputs
    assert float(m1["loss"]) == float(m0["loss"]) and abs(float(m1["grad_norm"]) - float(m0["grad_norm"])) > 1e-6
    ev = jax.tree.map(lambda x: x[0], b)
    e1 = steps.stats(state.params, ev).report()["loss"]
    assert float(e1) == float(steps.stats(state.params, ev).report()["loss"])  # no dropout in evaluation
    copy = jax.tree.map(jnp.copy, state)  # the same step twice draws the same masks (keyed by step, micro-batch)
    assert float(steps.step(state, b)[1]["grad_norm"]) == float(steps.step(copy, b)[1]["grad_norm"])


def dpo_cfg(**kw):
    base = {"output_dir": "unused", "data": {"dataset_name": "unused"}, "model": {"name_or_path": "tiny"},
            "bf16": False, "gradient_checkpointing": False, "learning_rate": 1e-2, "per_device_train_batch_size": 4}
    return config_from_dict(DPOConfig, {**base, **kw})


def test_dpo_reference_is_the_base_with_adapters_off():
    mesh = one_device()
    cfg = dpo_cfg(**LORA)
    model = build_model(cfg, "lm")
    steps = make_steps(dpo.TASK, cfg, model, mesh, 10)
    assert steps.frozen["task"] is None  # no second copy of the model
    state = init_state(steps.init_params(), steps.tx, cfg.seed, steps.shardings)
    batches = [device_batch(synthetic_batch(model, 4, "dpo", i), mesh, 1) for i in range(3)]
    for b in batches:
        state, _ = steps.step(state, b)
    ev = jax.tree.map(lambda x: x[0], batches[0])
    stats = steps.stats(state.params, ev).report()
    base = steps.frozen["base"]
    plan = lora.make_plan(model.config, "lm", lora.LoraArgs(r=4, target_modules="all-linear"))
    pol_c, pol_r = dpo.reference_logps(lora.Adapted(base, state.params, plan), ev, model=model)
    ref_c, ref_r = dpo.reference_logps(base, ev, model=model)
    off_c, off_r = dpo.reference_logps(lora.Adapted(base, None, plan), ev, model=model)
    np.testing.assert_array_equal(np.asarray(off_c), np.asarray(ref_c))
    np.testing.assert_array_equal(np.asarray(off_r), np.asarray(ref_r))
    assert np.abs(np.asarray(pol_c - ref_c)).max() > 1e-4  # the adapters moved the policy
    np.testing.assert_allclose(float(stats["rewards/chosen"]), float(jnp.mean(cfg.beta * (pol_c - ref_c))),
                               rtol=1e-4, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match="lora_target_modules: is required with use_peft"):
        load_config("sft", None, ["output_dir=x", "data.dataset_name=x", "model.use_peft=true"])
    cfg = load_config("sft", None, ["output_dir=x", "data.dataset_name=x", "model.use_peft=true",
                                    "model.lora_target_modules=all-linear", "model.freeze_vision=true"])
    model = build_model(cfg, "lm")
    from jaxpref.train.loop import lora_plan

    plan = lora_plan(cfg, model)
    assert plan.targets and all(t.path[0] != "vision" for t in plan.targets)  # the frozen tower gets none
    # what adapter_config.json records selects the same modules again (not the tower's q_proj, ...)
    assert lora.make_plan(model.config, "lm", lora.LoraArgs(target_modules=plan.target_modules)).targets == plan.targets


# ---------------------------------------------------------------------------
# end to end


def test_sft_and_dpo_runs_export_peft_adapters_resume_exactly_and_merge(tiny_task, tmp_path):
    """SFT with LoRA from an HF base, resumed bit-exactly from a checkpoint; its adapter loads with peft onto
    transformers' model; DPO continues that adapter; `jaxpref export --merge` writes a full model."""
    import transformers
    from safetensors.numpy import load_file

    from jaxpref.models import get_preset
    from jaxpref.models.vlm import VLM
    from jaxpref.sharding import init_sharded

    base_dir = str(tmp_path / "base")
    tiny = VLM(get_preset("tiny"))
    save_pretrained(tiny, init_sharded(tiny, jax.random.key(3), one_device()), base_dir)
    lora_kw = {"model.name_or_path": base_dir, "model.use_peft": "true", "model.lora_target_modules": "all-linear",
               "model.lora_r": 4, "model.lora_dropout": 0.1, "save_steps": 2, "max_steps": 4, "eval_steps": 4}
    whole, part = tmp_path / "whole", tmp_path / "part"
    r = run_jaxpref("sft", *run_overrides(tiny_task, "sft", whole, **lora_kw))
    assert r.returncode == 0, r.stderr[-3000:]
    # a second run resumes from the first's step-2 checkpoint (adapters, their moments, the data position)
    r = run_jaxpref("sft", *run_overrides(tiny_task, "sft", part, **lora_kw,
                                          resume_from_checkpoint=str(whole / "checkpoints" / "2")))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(whole / "adapter_model.safetensors")), load_file(str(part / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and any(k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in a.items())
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert not (whole / "model.safetensors").exists() and (whole / "tokenizer.json").exists()
    # peft loads the adapter onto transformers' model of the base: jaxpref's logits
    model, params = load_pretrained(base_dir)
    plan, trained = lora.load_adapter(str(whole), model.config, "lm")
    px, ids, mask = inputs(model)
    adapted = ours(model, lora.Adapted(params, trained, plan), px, ids, mask)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForImageTextToText.from_pretrained(base_dir),
                                        str(whole)).eval()
    np.testing.assert_allclose(torch_logits(pm, px, ids, mask), adapted, atol=1e-4, rtol=0)
    # DPO continues the SFT adapter (its reference: that adapter, as TRL's "ref" copy)
    dpo_out = tmp_path / "dpo"
    r = run_jaxpref("dpo", *run_overrides(tiny_task, "dpo", dpo_out, **{**lora_kw, "model.name_or_path": str(whole),
                                                                       "max_steps": 2, "learning_rate": "1e-2",
                                                                       "logging_steps": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    first = [json.loads(line) for line in open(dpo_out / "metrics.jsonl") if '"loss"' in line][0]
    assert first["step"] == 1 and abs(first["rewards/chosen"]) < 1e-6  # policy == reference at step 1
    cont = json.load(open(dpo_out / "adapter_config.json"))
    assert cont["r"] == 4 and cont["base_model_name_or_path"] == os.path.abspath(base_dir)
    # the merged export loads in transformers and equals the adapted model
    merged = tmp_path / "merged"
    r = run_jaxpref("export", "--merge", str(whole), "--out", str(merged))
    assert r.returncode == 0, r.stderr[-3000:]
    back = transformers.AutoModelForImageTextToText.from_pretrained(str(merged)).eval()
    np.testing.assert_allclose(torch_logits(back, px, ids, mask), adapted, atol=1e-4, rtol=0)
    assert (merged / "tokenizer.json").exists()


def test_ppo_trains_policy_and_value_adapters_with_one_copy_of_each_model():
    """PPO with use_peft: the policy's adapters on its base, the value model's adapters and score head on
    the reward model; the reference is the base with adapters off (KL 0, ratio 1 at the first
    iteration); the values start as the reward model's per-position scores; the bases never move."""
    import test_ppo
    from jaxpref.sequence import response_logits
    from jaxpref.train import ppo

    mesh = one_device()
    cfg, model, steps, state = test_ppo.setup(mesh, **LORA, **{"model.lora_dropout": 0.0})
    assert steps.frozen["ref"] is None and set(steps.frozen) == {"ref", "reward", "policy"}
    assert list(state.params["value"]["modules"]) == ["score"] and not state.params["policy"]["modules"]
    batch = device_batch(test_ppo.prompts(model, 8, 0), mesh, None)
    paths, models = ppo.roles_of(cfg, model)
    roles = ppo.compute_roles(cfg, models, ppo.lora_plans(cfg, paths, models))
    ro = jax.jit(lambda s, b, f: ppo.rollout(s, b, f, roles=roles, cfg=cfg))(state, batch, steps.frozen)
    np.testing.assert_allclose(np.asarray(ro["kl"]), 0.0, atol=1e-5)
    reward_values = response_logits(roles.value, steps.frozen["reward"], batch, ro["responses"], ro["response_mask"])
    np.testing.assert_allclose(np.asarray(ro["values"]), np.asarray(reward_values), atol=1e-6)
    bases = jax.tree.map(np.asarray, {k: steps.frozen[k] for k in ("policy", "reward")})
    state, metrics = steps.step(state, batch)
    np.testing.assert_allclose(float(metrics["val/ratio"]), 1.0, atol=1e-4)
    state, metrics = steps.step(state, device_batch(test_ppo.prompts(model, 8, 1), mesh, None))
    assert float(metrics["objective/kl"]) != 0.0  # the adapters moved the policy off the reference
    for a, b in zip(jax.tree.leaves(bases), jax.tree.leaves({k: steps.frozen[k] for k in ("policy", "reward")})):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(ConfigError, match="value_model_path: with use_peft"):
        ppo.lora_plans(cfg, {**paths, "value": "elsewhere"}, models)


@pytest.mark.parametrize("kind", ["dpo", pytest.param("ppo", marks=pytest.mark.slow)])  # CI budget
def test_profile_compiles_the_lora_step_with_a_smaller_train_state(kind):
    """`jaxpref profile`'s program for a use_peft recipe: the trainer's own LoRA step compiles from shapes
    alone, its train state a fraction of the full-weight one's, the base among the frozen arguments."""
    from jaxpref.profile import argument_bytes
    from jaxpref.train.program import build_program

    mesh = one_device()
    over = ["output_dir=x", "data.dataset_name=x", "model.name_or_path=tiny", "max_steps=2", "data.length_buckets=16,32",
            "per_device_train_batch_size=2", "bf16=false"]
    if kind == "ppo":
        over += ["reward_model_path=tiny", "response_length=4", "num_ppo_epochs=1"]
    full = build_program(kind, load_config(kind, None, over), mesh)
    adapted = build_program(kind, load_config(kind, None, over + ["model.use_peft=true",
                                                                  "model.lora_target_modules=all-linear",
                                                                  "model.lora_r=2"]), mesh)  # tiny: 32 wide
    assert "LoRA r=2" in adapted.name
    assert argument_bytes(adapted.args[0]) < argument_bytes(full.args[0]) / 3
    frozen = adapted.args[2]
    assert "base" in frozen if kind == "dpo" else frozen["ref"] is None and frozen["policy"] is not None
    adapted.fn.lower(*adapted.args).compile()
