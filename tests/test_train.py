"""The training core: optimizer and schedules against transformers/torch, the jitted steps on 1 and
8 devices, gradient accumulation, checkpoints across meshes, and full runs (resume after SIGKILL,
the non-finite guard, metrics files, export) on the built-in task with the tiny preset."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.config import RewardConfig, SFTConfig, config_from_dict
from jaxpref.models.config import from_hf_config, read_hf_config, to_hf_config
from jaxpref.sharding import make_mesh
from jaxpref.train import reward, sft
from jaxpref.train.checkpoint import Checkpointer, complete_steps, resolve_resume
from jaxpref.train.loop import build_model, device_batch, make_steps
from jaxpref.train.optim import SCHEDULES, decay_mask, make_optimizer, make_schedule
from jaxpref.train.state import abstract_state, init_state

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
KINDS = {"sft": (SFTConfig, sft.TASK), "reward": (RewardConfig, reward.TASK)}


def make_cfg(kind, **kw):
    base = {"output_dir": "unused", "data": {"dataset_name": "unused"}, "model": {"name_or_path": "tiny"},
            "bf16": False, "gradient_checkpointing": False, "learning_rate": 1e-3, "per_device_train_batch_size": 8}
    return config_from_dict(KINDS[kind][0], {**base, **kw})


def synthetic_batch(model, rows, kind, seed):
    """A collated batch as jaxpref.data.processing lays it out: left-padded prompts with image
    tokens, bos and text; right-padded completions ending in eos; one image per row."""
    c, r = model.config, np.random.default_rng(seed)
    n, lp, lc = model.config.num_image_tokens, model.config.num_image_tokens + 8, 8
    prompt, pmask = np.zeros((rows, lp), np.int32), np.zeros((rows, lp), np.int32)
    for i in range(rows):
        k = int(r.integers(2, 8))
        prompt[i, lp - n - k - 1:lp - k - 1] = c.image_token_index
        prompt[i, lp - k - 1] = c.bos_token_id
        prompt[i, lp - k:] = r.integers(5, 200, k)
        pmask[i, lp - n - k - 1:] = 1

    def completion():
        ids, mask = np.zeros((rows, lc), np.int32), np.zeros((rows, lc), np.int32)
        for i in range(rows):
            k = int(r.integers(2, lc + 1))
            ids[i, :k] = r.integers(5, 200, k)
            ids[i, k - 1], mask[i, :k] = c.eos_token_id, 1
        return ids, mask

    size = c.vision.image_size
    out = {"prompt_ids": prompt, "prompt_mask": pmask,
           "pixel_values": r.uniform(-1, 1, (rows, 1, size, size, 3)).astype(np.float32)}
    if kind == "sft":
        out["completion_ids"], out["completion_mask"] = completion()
    else:
        (out["chosen_ids"], out["chosen_mask"]), (out["rejected_ids"], out["rejected_mask"]) = completion(), completion()
        out["margin"] = r.uniform(0, 1, rows).astype(np.float32)
    return out


def setup(kind, mesh, total=10, **kw):
    cfg = make_cfg(kind, **kw)
    task = KINDS[kind][1]
    model = build_model(cfg, task.head, task.configure_model)
    steps = make_steps(task, cfg, model, mesh, total)
    state = init_state(steps.init_params(), steps.tx, cfg.seed, steps.shardings)
    return cfg, model, steps, state


# ---------------------------------------------------------------------------
# optimizer


SCHEDULE_CASES = [(name, {}) for name in sorted(SCHEDULES) if name not in ("cosine_with_min_lr",
                                                                           "warmup_stable_decay")] + [
    ("cosine", {"num_cycles": 1.5}),
    ("cosine_with_restarts", {"num_cycles": 3}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 0.02, "num_cycles": 0.75}),
    ("polynomial", {"lr_end": 0.01, "power": 2.0}),
    ("inverse_sqrt", {"timescale": 7}),
    ("warmup_stable_decay", {"num_decay_steps": 6}),
    ("warmup_stable_decay", {"num_decay_steps": 5, "num_stable_steps": 4, "warmup_type": "cosine",
                             "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "warmup_type": "1-sqrt", "decay_type": "linear",
                             "num_cycles": 0.25}),
]


@pytest.mark.parametrize("name, kwargs", SCHEDULE_CASES)
def test_schedules_match_transformers(name, kwargs):
    """Every schedule and its lr_scheduler_kwargs against transformers' get_scheduler, through warmup, the
    decay and past the last step."""
    import warnings

    import torch
    from transformers import get_scheduler

    total, warmup = 20, 5
    cfg = make_cfg("sft", lr_scheduler_type=name, warmup_steps=warmup, learning_rate=0.1,
                   **{f"lr_scheduler_kwargs.{k}": v for k, v in kwargs.items()})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with warnings.catch_warnings():  # wsd warns when given num_stable_steps beside num_training_steps
        warnings.simplefilter("ignore")
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=kwargs)
    ours = make_schedule(cfg, total)
    for step in range(total + 4):
        np.testing.assert_allclose(float(ours(step)), sched.get_last_lr()[0], rtol=1e-5, atol=1e-8,
                                   err_msg=f"{name} {kwargs} step {step}")
        opt.step()
        sched.step()


def test_wsd_decay_must_fit_in_the_run():
    cfg = make_cfg("sft", lr_scheduler_type="warmup_stable_decay", warmup_steps=5,
                   **{"lr_scheduler_kwargs.num_decay_steps": 20})
    with pytest.raises(ValueError, match="20 decay steps after 5 warmup steps do not fit in the run's 24 steps"):
        make_schedule(cfg, 24)
    assert float(make_schedule(cfg, 25)(5)) == pytest.approx(1e-3)  # no stable phase: the decay starts at once


def test_warmup_ratio_rounds_up_like_transformers():
    assert make_cfg("sft", warmup_ratio=0.1).warmup_ratio == 0.1
    from jaxpref.train.optim import warmup_steps

    assert warmup_steps(make_cfg("sft", warmup_ratio=0.1), 25) == 3  # ceil(2.5)
    assert warmup_steps(make_cfg("sft", warmup_ratio=0.1, warmup_steps=7), 25) == 7


def test_adamw_clipping_and_decay_mask_match_torch():
    """make_optimizer == torch AdamW (decay on weights only) + clip_grad_norm_ + transformers' linear schedule."""
    import torch
    from transformers import get_scheduler

    total = 6
    cfg = make_cfg("sft", learning_rate=0.05, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=2,
                   adam_beta2=0.99, adam_epsilon=1e-6)
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
              "norm": {"scale": rng.normal(size=4)}}
    assert jax.tree.leaves(decay_mask(params)) == [False, True, False]  # bias, kernel, scale
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(total)]
    tx = make_optimizer(cfg, total)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    for g in grads:
        upd, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, upd)
    t = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in
         (("kernel", params["dense"]["kernel"]), ("bias", params["dense"]["bias"]), ("scale", params["norm"]["scale"]))}
    opt = torch.optim.AdamW([{"params": [t["kernel"]], "weight_decay": 0.1},
                             {"params": [t["bias"], t["scale"]], "weight_decay": 0.0}],
                            lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=total)
    for g in grads:
        for k, (a, b) in {"kernel": ("dense", "kernel"), "bias": ("dense", "bias"), "scale": ("norm", "scale")}.items():
            t[k].grad = torch.tensor(g[a][b])
        torch.nn.utils.clip_grad_norm_(list(t.values()), 0.5)
        opt.step()
        sched.step()
    for k, (a, b) in {"kernel": ("dense", "kernel"), "bias": ("dense", "bias"), "scale": ("norm", "scale")}.items():
        np.testing.assert_allclose(np.asarray(p[a][b]), t[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------
# steps


@needs8
@pytest.mark.parametrize("kind", [pytest.param("sft", marks=pytest.mark.slow), "reward"])
def test_eight_devices_fsdp4_tensor2_give_the_single_device_losses(kind):
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    eight = make_mesh(1, 4, 2)
    _, model, steps1, s1 = setup(kind, one, per_device_train_batch_size=8)
    _, _, steps8, s8 = setup(kind, eight, per_device_train_batch_size=2)  # same 8 global rows
    for i in range(3):
        host = synthetic_batch(model, 8, kind, seed=i)
        s1, m1 = steps1.train(s1, device_batch(host, one, 1))
        s8, m8 = steps8.train(s8, device_batch(host, eight, 1))
        m1, m8 = jax.device_get((m1, m8))
        assert sorted(m1) == sorted(m8)
        for k in m1:
            np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=f"step {i} {k}")
    q = s8.params["decoder"]["layers"]["q"]["kernel"]
    assert q.sharding.spec[1] == "fsdp" and q.sharding.spec[2] == "tensor"  # really sharded
    mu = s8.opt_state[1][0].mu["decoder"]["layers"]["q"]["kernel"]
    assert mu.sharding == q.sharding


def test_gradient_accumulation_gives_the_full_batch_step():
    """2 micro-batches of 4 rows == 1 batch of 8 rows: loss mean over all completion tokens."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, model, steps_a, sa = setup("sft", mesh, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    _, _, steps_b, sb = setup("sft", mesh, per_device_train_batch_size=8)
    host = synthetic_batch(model, 8, "sft", seed=3)
    host["completion_mask"][:4, 3:] = 0  # uneven token counts between the two micro-batches
    sa, ma = steps_a.train(sa, device_batch(host, mesh, 2))
    sb, mb = steps_b.train(sb, device_batch(host, mesh, 1))
    for k in ("loss", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens"):
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=2e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_freeze_vision_trains_everything_but_the_tower(tmp_path):
    """model.freeze_vision: the tower keeps its exact weights (no update, no weight decay, no Adam
    moments), while the projector and decoder get the same gradients as without freezing (the tower's
    features are fixed inputs to them), so grad_norm is the norm of those alone."""
    from jaxpref.train.sft import loss_fn

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    kw = dict(weight_decay=0.1, max_grad_norm=0.0)
    _, model, steps_f, sf = setup("sft", mesh, model={"name_or_path": "tiny", "freeze_vision": True}, **kw)
    _, plain, steps_p, sp = setup("sft", mesh, **kw)
    assert model.freeze_vision and not plain.freeze_vision
    host = synthetic_batch(model, 8, "sft", seed=5)
    full = jax.grad(lambda p: loss_fn(p, device_batch(host, mesh, None), model=plain)[0])(sp.params)
    trained = {k: v for k, v in full.items() if k != "vision"}
    tokens = host["completion_mask"].sum()
    n_opt = len(jax.tree.leaves(sp.opt_state))
    before = jax.device_get(sf.params)  # the step donates its input state
    sf1, m = steps_f.train(sf, device_batch(host, mesh, 1))
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax_norm(trained)) / tokens, rtol=1e-5)
    assert float(optax_norm(full["vision"])) > 0  # the tower would have trained
    for a, b in zip(jax.tree.leaves(before["vision"]), jax.tree.leaves(sf1.params["vision"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    for k in ("projector", "decoder"):
        assert any(not np.array_equal(a, np.asarray(b))
                   for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(sf1.params[k]))), k
    n_vision = len(jax.tree.leaves(before["vision"]))
    assert len(jax.tree.leaves(sf1.opt_state)) == n_opt - 2 * n_vision  # no mu, nu for the tower
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))  # the masked optimizer state round-trips through Orbax
    ckpt.save(1, sf1, {}, {})
    ckpt.wait()
    target = abstract_state(steps_f.shardings, jax.eval_shape(lambda: sf1.params), steps_f.tx)
    restored, _, _ = Checkpointer(str(tmp_path / "checkpoints"), read_only=True).restore(1, target)
    assert jax.tree.structure(restored) == jax.tree.structure(sf1)
    for a, b in zip(jax.tree.leaves(sf1), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_bf16_compute_keeps_float32_master_params():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, model, steps32, s32 = setup("reward", mesh)
    _, _, steps16, s16 = setup("reward", mesh, bf16=True)
    host = synthetic_batch(model, 8, "reward", seed=0)
    s32, m32 = steps32.train(s32, device_batch(host, mesh, 1))
    s16, m16 = steps16.train(s16, device_batch(host, mesh, 1))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s16.params), jax.tree.leaves(s32.params))]
    assert any(changed)  # bf16 really computed differently


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_reward_step_scores_and_encodes_images_once(pooling):
    """The step's rewards equal two separate scalar-head forwards (chosen, rejected) with pixels,
    read in float64 numpy: the last attended position ("last", TRL), or the mean over the
    completion's tokens ("mean")."""
    from jaxpref.sequence import concat_prompt_completion

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, model, _, state = setup("reward", mesh, score_pooling=pooling)
    assert model.config.score_pooling == pooling
    host = synthetic_batch(model, 4, "reward", seed=5)
    host["chosen_mask"][1, :] = 0  # an empty completion scores 0 under "mean"
    rc, rr = jax.jit(lambda p, b: reward.rewards(p, b, model=model))(state.params, host)

    @jax.jit
    def separately(params, px, ids, mask, tt):  # pixels given: the image is encoded in this forward
        return model.apply({"params": params}, px, ids, mask, tt).logits

    for name, got in (("chosen", rc), ("rejected", rr)):
        seq = concat_prompt_completion(host["prompt_ids"], host["prompt_mask"], host[f"{name}_ids"],
                                       host[f"{name}_mask"])
        values = np.asarray(separately(state.params, host["pixel_values"], seq["input_ids"], seq["attention_mask"],
                                       seq["token_type_ids"]), np.float64)
        if pooling == "last":
            want = [v[np.flatnonzero(m)[-1]] for v, m in zip(values, seq["attention_mask"])]
        else:
            want = [v[m > 0].mean() if m.any() else 0.0 for v, m in zip(values, seq["completion_mask"])]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    if pooling == "mean":
        assert float(rc[1]) == 0.0


def test_mean_pooled_reward_model_is_saved_and_read_back_as_trained(tiny_task, tmp_path):
    """score_pooling=mean lands in the exported config.json, and the readers of a reward model
    (load_pretrained, PPO's roles, eval's response_scores) score with it."""
    from jaxpref.config import PPOConfig, load_config
    from jaxpref.models import load_pretrained
    from jaxpref.sequence import concat_prompt_completion, response_scores
    from jaxpref.train.ppo import roles_of

    out = tmp_path / "rm-mean"
    cfg = load_config("reward", None, run_overrides(tiny_task, "reward", out, score_pooling="mean", max_steps=2,
                                                    save_steps=2, eval_steps=2))
    reward.run_reward(cfg)
    assert json.loads((out / "config.json").read_text())["jaxpref_score_pooling"] == "mean"
    model, params = load_pretrained(str(out), head="scalar")
    assert model.config.score_pooling == "mean"
    ppo_cfg = config_from_dict(PPOConfig, {"output_dir": "unused", "data": {"dataset_name": "unused"},
                                           "model": {"name_or_path": "tiny"}, "reward_model_path": str(out)})
    _, roles = roles_of(ppo_cfg, build_model(ppo_cfg, "lm"))
    assert roles["reward"].config.score_pooling == "mean"

    host = synthetic_batch(model, 3, "reward", seed=2)
    got = response_scores(model, params, host, host["chosen_ids"], host["chosen_mask"])
    seq = concat_prompt_completion(host["prompt_ids"], host["prompt_mask"], host["chosen_ids"], host["chosen_mask"])
    values = np.asarray(model.apply({"params": params}, host["pixel_values"], seq["input_ids"],
                                    seq["attention_mask"], seq["token_type_ids"]).logits, np.float64)
    want = [v[m > 0].mean() for v, m in zip(values, seq["completion_mask"])]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert read_hf_config(str(out)).score_pooling == "mean"
    # TRL's "last" writes no key, and a config.json without one (a policy's, transformers') reads "last"
    default = to_hf_config(dataclasses.replace(model.config, score_pooling="last"))
    assert "jaxpref_score_pooling" not in default and from_hf_config(default).score_pooling == "last"


# ---------------------------------------------------------------------------
# checkpoints


@needs8
def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    src = make_mesh(1, 4, 2)
    _, model, steps, state = setup("reward", src)
    state, _ = steps.train(state, device_batch(synthetic_batch(model, 8, "reward", 0), src, 1))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(1, state, {"loaders": [{"epoch": 0}]}, {"learning_rate": 1e-3})
    ckpt.wait()
    for dst in (make_mesh(2, 2, 2), make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        steps_d = make_steps(reward.TASK, make_cfg("reward"), model, dst, 10)
        target = abstract_state(steps_d.shardings, jax.eval_shape(lambda: state.params), steps_d.tx)
        restored, data, config = Checkpointer(str(tmp_path / "checkpoints"), read_only=True).restore(1, target)
        assert data == {"loaders": [{"epoch": 0}]} and config == {"learning_rate": 1e-3}
        for (path, a), b, sh in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored),
                                    jax.tree.leaves(steps_d.shardings)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
            assert b.sharding.is_equivalent_to(sh, b.ndim), path
    ckpt.close()


def test_incomplete_checkpoint_is_ignored_and_cleaned(tmp_path):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, _, _, state = setup("sft", mesh)
    root = tmp_path / "run"
    ckpt = Checkpointer(str(root / "checkpoints"))
    ckpt.save(4, state, {"x": 1}, {})
    ckpt.wait()
    ckpt.close()
    crashed = root / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"  # what a kill mid-save leaves
    (crashed / "state").mkdir(parents=True)
    (crashed / "state" / "garbage").write_bytes(b"\0" * 10)
    assert resolve_resume(True, str(root)) == (str(root / "checkpoints"), 4)
    assert resolve_resume(str(root), str(tmp_path)) == (str(root / "checkpoints"), 4)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "elsewhere"), str(root))
    assert resolve_resume(None, str(root)) is None and resolve_resume(True, str(tmp_path / "new")) is None
    again = Checkpointer(str(root / "checkpoints"))
    assert again.all_steps() == [4]
    again.save(8, state, {"x": 2}, {})  # the resumed run redoes step 8; orbax deleted the leftover first
    again.wait()
    assert again.all_steps() == [4, 8] and not crashed.exists()
    again.close()


# ---------------------------------------------------------------------------
# full runs on tiny data (parquet shards written here, a real word-level tokenizer)

COLORS, SHAPES = ("red", "blue", "green"), ("circle", "square", "triangle")


def write_tiny_task(root, n_train=48, n_eval=12):
    """preference/ and sft/ parquet shards (2 per split) of 32x32 one-shape images, and tok/: the
    task's tokenizer. Chosen names the shape's true colour, rejected another one."""
    import io

    from PIL import Image
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxpref.data.writers import write_shards

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>", "\n", "what", "is", "in", "the", "image", "a", "?", "."]
    vocab = {w: i for i, w in enumerate(words + list(COLORS) + list(SHAPES))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" +"), "removed"),
                                                pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.Punctuation("isolated")])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}
                            ).save_pretrained(str(root / "tok"))
    rng = np.random.default_rng(0)

    def rows(n):
        for _ in range(n):
            c, s = int(rng.integers(3)), int(rng.integers(3))
            img = np.zeros((32, 32, 3), np.uint8)
            img[8:24, 8:24, c] = 255
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            yield {"images": [{"bytes": buf.getvalue(), "path": None}], "prompt": "what is in the image ?",
                   "chosen": f"a {COLORS[c]} {SHAPES[s]} .", "rejected": f"a {COLORS[(c + 1) % 3]} {SHAPES[s]} ."}

    for split, n in (("train", n_train), ("eval", n_eval)):
        pref = list(rows(n))
        write_shards(iter(pref), str(root / "preference"), num_shards=2, split=split)
        write_shards(({"images": r["images"], "prompt": r["prompt"], "completion": r["chosen"]} for r in pref),
                     str(root / "sft"), num_shards=2, split=split)
    return root


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    return write_tiny_task(tmp_path_factory.mktemp("tiny_task"))


def run_jaxpref(command, *args, timeout=900):
    """`jaxpref COMMAND ARGS...` in a real subprocess on one CPU device, from the repository root."""
    env = dict(os.environ, XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "jaxpref.cli", command, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_overrides(data, kind, out, **kw):
    base = {"output_dir": out, "data.dataset_name": data / ("sft" if kind == "sft" else "preference"),
            "data.dataset_test_split": "eval", "data.tokenizer": data / "tok", "data.shuffle_buffer": 16,
            "data.length_buckets": "8,16,32", "model.name_or_path": "tiny", "bf16": "false",
            "gradient_checkpointing": "false", "per_device_train_batch_size": 4, "learning_rate": "1e-3",
            "logging_steps": 2, "eval_steps": 6, "save_steps": 4, "max_steps": 12}
    return [f"{k}={v}" for k, v in {**base, **kw}.items()]


def read_events(directory):
    """(tag, step, value) of every scalar in the TensorBoard event files under `directory`."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_run_logs_trl_metrics_evaluates_and_exports(tiny_task, tmp_path):
    from jaxpref.config import load_config
    from jaxpref.models import load_pretrained
    from jaxpref.train.logging import read_metrics
    from jaxpref.train.loop import RunError

    out = tmp_path / "rm"
    cfg = load_config("reward", None, run_overrides(tiny_task, "reward", out, center_rewards_coefficient=0.01,
                                                    save_total_limit=2, profile_steps="3,5",
                                                    **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    final = reward.run_reward(cfg)
    records = read_metrics(str(out))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12] and [r["step"] for r in evals] == [6, 12]
    assert set(train[0]) == {"step", "epoch", "loss", "grad_norm", "learning_rate", "accuracy", "margin",
                             "min_reward", "mean_reward", "max_reward", "num_tokens", "step_seconds"}
    assert all(r["step_seconds"] > 0 for r in train) and "mfu" not in train[0]  # no known peak on a CPU
    assert list((out / "trace").glob("**/*.xplane.pb")), "profile_steps wrote no trace"
    assert train[-1]["epoch"] == 12 * (4 * 2 * 2) / 48 and train[-1]["learning_rate"] == 0.0  # 4 rows x data x fsdp
    assert [r["num_tokens"] for r in train] == sorted(r["num_tokens"] for r in train) and train[0]["num_tokens"] > 0
    assert {k: evals[-1][k] for k in final} == final and 0 <= final["eval_accuracy"] <= 1
    assert evals[-1]["eval_samples_per_second"] > 0
    tb = read_events(str(out / "runs"))
    assert ("train/loss", 2, pytest.approx(train[0]["loss"], rel=1e-6)) in tb
    assert ("eval/accuracy", 12, pytest.approx(final["eval_accuracy"], rel=1e-6)) in tb
    # The export: HF safetensors with the score head, equal to the last checkpoint's params.
    model, params = load_pretrained(str(out), head="scalar")
    ckpt = Checkpointer(str(out / "checkpoints"), read_only=True)
    assert ckpt.all_steps() == [8, 12]  # save_total_limit=2
    steps = make_steps(reward.TASK, cfg, model, make_mesh(1, 1, 1, devices=jax.devices()[:1]), 12)
    state, data, saved = ckpt.restore(12, abstract_state(steps.shardings, jax.eval_shape(lambda: params), steps.tx))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert saved["center_rewards_coefficient"] == 0.01 and data["num_tokens"] == train[-1]["num_tokens"]
    assert load_config("reward", str(out / "config.yaml")) == cfg
    assert (out / "tokenizer.json").exists()
    with pytest.raises(RunError, match="already holds checkpoints"):
        reward.run_reward(cfg)


def test_num_train_epochs_sets_the_steps_from_the_source_size(tiny_task):
    from jaxpref.data.sources import open_source
    from jaxpref.train.loop import plan_steps

    source = open_source(str(tiny_task / "sft"), "train")  # 48 rows
    assert plan_steps(make_cfg("sft", num_train_epochs=2.5), source, 16) == (8, 48)  # ceil(2.5 x 3)
    assert plan_steps(make_cfg("sft", num_train_epochs=2.5, max_steps=5), source, 16) == (5, 48)


def test_non_finite_loss_stops_before_saving(tiny_task, tmp_path):
    from jaxpref.config import load_config
    from jaxpref.train.logging import read_metrics
    from jaxpref.train.loop import NonFiniteError

    out = tmp_path / "nan"
    cfg = load_config("sft", None, run_overrides(tiny_task, "sft", out, learning_rate="1e30", save_steps=1,
                                                 logging_steps=1, lr_scheduler_type="constant"))
    with pytest.raises(NonFiniteError, match=r"step 2: loss=nan .* not finite; stopping without saving.*"
                                             r"checkpoints/1\) predates it"):
        sft.run_sft(cfg)
    assert Checkpointer(str(out / "checkpoints"), read_only=True).all_steps() == [1]
    assert [r["step"] for r in read_metrics(str(out))] == [1]
    assert not (out / "model.safetensors").exists()


RUN = """
import sys
from jaxpref.config import load_config
from jaxpref.train.sft import run_sft
run_sft(load_config("sft", None, sys.argv[1:]))
"""


def _spawn(args, log):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=os.path.dirname(os.path.dirname(__file__)))


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_task, tmp_path):
    """Two real processes: A runs 40 steps; B is SIGKILLed once its step-8 checkpoint is on disk,
    then resumed. The exported params are bitwise equal and metrics.jsonl agrees (timings aside)."""
    from safetensors.numpy import load_file

    from jaxpref.train.logging import TIMING, read_metrics

    kw = dict(max_steps=40, eval_steps=10, save_steps=8, logging_steps=3)
    # b's output_dir is relative to the processes' working directory: resuming restores from output_dir's
    # own checkpoint manager, not a second, read-only one on the same directory
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {name: run_overrides(tiny_task, "sft", os.path.relpath(tmp_path / name, repo) if name == "b" else
                                tmp_path / name, **kw) for name in ("a", "b")}
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in runs}
    a, b = _spawn(runs["a"], logs["a"]), _spawn(runs["b"], logs["b"])
    deadline, ckpts = time.time() + 300, str(tmp_path / "b" / "checkpoints")
    while 8 not in complete_steps(ckpts) and b.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert b.poll() is None, "run b finished before it could be killed:\n" + open(tmp_path / "b.log").read()[-3000:]
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert b.returncode == -signal.SIGKILL and not (tmp_path / "b" / "model.safetensors").exists()
    assert max(complete_steps(ckpts)) < 40
    resumed = _spawn(runs["b"] + ["resume_from_checkpoint=true"], logs["b"])
    for name, p in (("a", a), ("b", resumed)):
        assert p.wait(timeout=300) == 0, open(tmp_path / f"{name}.log").read()[-3000:]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
    ma, mb = strip(read_metrics(str(tmp_path / "a"))), strip(read_metrics(str(tmp_path / "b")))
    assert ma == mb and len([r for r in ma if "eval_loss" in r]) == 4
    assert "read only" not in open(tmp_path / "b.log").read()
