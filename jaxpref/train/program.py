"""A recipe's real update step, built from its config alone: no data read, no weights loaded.

    kind, cfg = load_recipe("configs/paligemma-3b/ppo_rlaif_v.yaml", ["model.name_or_path=paligemma-3b-224"])
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=topology_devices("v5e-16"))
    prog = build_program(kind, cfg, mesh)
    compiled = prog.fn.lower(*prog.args).compile()      # the trainer's own jitted step

`prog.fn` is the function the trainer jits (jaxpref.train.loop.jitted_steps, PPO's build_program),
with its shardings and donation; `prog.args` are ShapeDtypeStructs carrying shardings: the train
state, one step's batch at the recipe's longest lengths, the frozen models. PPO's iteration also
comes split in its phases (rollout, scoring, update), each jitted the same way.

Batch shapes: prompts at max_prompt_length (or the image tokens + 64) rounded up to a length bucket;
completions at max_completion_length, else max_length minus the prompt, else 128 (PPO: response_length).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref.config import ConfigError, TrainingConfig, load_config
from jaxpref.data.processing import bucket_length
from jaxpref.sharding import on_mesh, param_shapes, placed_shapes
from jaxpref.train import dpo, ppo, reward, sft
from jaxpref.train.loop import batch_shards, build_model, jitted_steps, lora_plan
from jaxpref.train.state import abstract_state, batch_sharding, micro_batch_sharding

TASKS = {"sft": sft.TASK, "reward": reward.TASK, "dpo": dpo.TASK, "ppo": ppo.TASK}

# keys only one trainer's config has, to tell which trainer a recipe is for
_MARKS = (("ppo", ("reward_model_path", "response_length", "num_ppo_epochs", "kl_coef")),
          ("dpo", ("beta", "loss_type", "precompute_ref_log_probs", "label_smoothing")),
          ("reward", ("center_rewards_coefficient", "score_pooling")))


def recipe_trainer(path: str) -> str:
    """Which trainer a recipe file is for, from the keys only that trainer has (sft otherwise)."""
    try:
        with open(path) as f:
            keys = set(yaml.safe_load(f) or {})
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return next((kind for kind, marks in _MARKS if keys & set(marks)), "sft")


def load_recipe(path: str, overrides=(), trainer: str | None = None) -> tuple[str, TrainingConfig]:
    kind = trainer or recipe_trainer(path)
    return kind, load_config(kind, path, overrides)


@dataclasses.dataclass
class Program:
    name: str
    fn: Any  # jitted
    args: tuple  # ShapeDtypeStructs with shardings
    flops: float  # analytic, the whole program (all devices)
    rows: int  # examples one call reads (PPO: prompts)
    tokens: int  # tokens one call reads
    lengths: dict[str, int]  # the batch lengths assumed
    donates_first: bool = True  # returns a new first argument (the train state) in place of the donated one
    phases: list["Program"] = dataclasses.field(default_factory=list)


def lengths(kind: str, cfg: TrainingConfig, mc, prompt_length: int | None = None,
            completion_length: int | None = None) -> dict[str, int]:
    """{"prompt": Lp, "completion": Lc}: the padded lengths one step of the recipe reads at most."""
    buckets = cfg.data.length_buckets
    image = mc.num_image_tokens * cfg.data.num_images
    lp = prompt_length or getattr(cfg, "max_prompt_length", None) or image + 64
    lp = bucket_length(max(lp, image + 1), buckets)
    if kind == "ppo":
        return {"prompt": lp, "completion": completion_length or cfg.response_length}
    lc = completion_length or getattr(cfg, "max_completion_length", None)
    if lc is None:
        lc = cfg.max_length - lp if getattr(cfg, "max_length", None) and cfg.max_length > lp else 128
    return {"prompt": lp, "completion": bucket_length(lc, buckets)}


def batch_shapes(kind: str, cfg: TrainingConfig, mc, mesh, lp: int, lc: int) -> dict[str, tuple]:
    """Global shapes of one step's batch: [A, B, ...] (B = per_device_train_batch_size x batch shards,
    A = gradient_accumulation_steps), PPO's [B, ...] (its rollout batch)."""
    n, size = cfg.data.num_images, mc.vision.image_size
    if kind == "ppo":
        b = ppo.step_rows(cfg, mesh)
        return {"prompt_ids": (b, lp), "prompt_mask": (b, lp), "pixel_values": (b, n, size, size, 3), "valid": (b,)}
    lead = (cfg.gradient_accumulation_steps, cfg.per_device_train_batch_size * batch_shards(mesh))
    out = {"prompt_ids": lead + (lp,), "prompt_mask": lead + (lp,), "pixel_values": lead + (n, size, size, 3),
           "valid": lead}
    for c in (("completion",) if kind == "sft" else ("chosen", "rejected")):
        out[f"{c}_ids"] = out[f"{c}_mask"] = lead + (lc,)
    if kind == "dpo" and cfg.precompute_ref_log_probs:
        out["ref_chosen_logps"] = out["ref_rejected_logps"] = lead
    return out


def _abstract(shapes: dict, sharding) -> dict:
    def dtype(k):
        return jnp.float32 if k in ("pixel_values", "valid") or k.startswith("ref_") else jnp.int32

    return {k: jax.ShapeDtypeStruct(s, dtype(k), sharding=sharding) for k, s in shapes.items()}


def _tokens(kind: str, shapes: dict) -> int:
    seqs = 1 if kind in ("sft", "ppo") else 2
    rows = math.prod(shapes["prompt_ids"][:-1])
    second = shapes.get("completion_ids", shapes.get("chosen_ids"))
    return seqs * rows * (shapes["prompt_ids"][-1] + (second[-1] if second else 0))


def build_program(kind: str, cfg: TrainingConfig, mesh, prompt_length: int | None = None,
                  completion_length: int | None = None) -> Program:
    """The trainer's jitted step for `cfg` on `mesh` (its devices may be an AOT topology's)."""
    if kind not in TASKS:
        raise ConfigError(f"unknown trainer {kind!r}; choose one of {sorted(TASKS)}")
    task = TASKS[kind]
    total = max(cfg.max_steps, 1)
    model = build_model(cfg, task.head, task.configure_model)
    mc = model.config
    ls = lengths(kind, cfg, mc, prompt_length, completion_length)
    shapes = batch_shapes(kind, cfg, mc, mesh, ls["prompt"], ls["completion"])
    flops = task.step_flops(cfg, mc, shapes)
    rows = math.prod(shapes["prompt_ids"][:-1])
    if kind == "ppo":
        return _ppo_program(cfg, model, mesh, total, shapes, flops, ls)
    frozen = task.frozen(cfg, mesh, abstract=True) if task.frozen is not None else None
    frozen_args, frozen_shardings = frozen if frozen is not None else (None, None)
    plan = lora_plan(cfg, model)
    j = jitted_steps(task, cfg, model, mesh, total, frozen_shardings, plan)
    if plan is not None:  # the base, in the model's dtype, rides in `frozen`
        base = placed_shapes(param_shapes(model), j.frozen_shardings["base"])
        frozen_args, frozen = {"base": base, "start": None, "task": frozen_args}, True
    state = abstract_state(j.shardings, j.param_shapes, j.tx)
    args = (state, _abstract(shapes, micro_batch_sharding(mesh))) + ((frozen_args,) if frozen is not None else ())
    name = f"{kind} step" + (f" (LoRA r={plan.r})" if plan is not None else "")
    return Program(name, j.train, args, sum(flops.values()), rows, _tokens(kind, shapes), ls)


def _ppo_program(cfg, policy, mesh, total, shapes, flops, ls) -> Program:
    prog = ppo.build_program(cfg, policy, mesh, total)
    state = abstract_state(prog.shardings, prog.trained_shapes, prog.tx)
    frozen = prog.frozen_shapes()
    rows_sharding = batch_sharding(mesh)
    batch = _abstract(shapes, rows_sharding)
    b, r = shapes["prompt_ids"][0], cfg.response_length
    tokens = b * (shapes["prompt_ids"][1] + r)
    replicated = NamedSharding(mesh, P())

    def rows_like(tree):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rows_sharding if s.ndim and
                                                           s.shape[0] == b else replicated), tree)

    kw = dict(roles=prog.roles, cfg=cfg)
    # each phase gets the frozen params it reads: none (LoRA: the policy base) to sample, the policy base
    # and the reward model under the value adapters (LoRA) to update
    lora_run = prog.plans is not None
    sample_frozen = {"policy": frozen["policy"]} if lora_run else None
    update_frozen = {"policy": frozen["policy"], "reward": frozen["reward"]} if lora_run else None
    sample = partial(ppo.sample_responses, cache_sharding=prog.cache_sharding, **kw)
    sample_jit = jax.jit(on_mesh(sample, mesh))  # the phases' arguments carry their shardings
    responses, logprobs = rows_like(jax.eval_shape(sample, state, batch, sample_frozen))
    score = partial(ppo.score_rollout, **kw)
    score_jit = jax.jit(on_mesh(score, mesh))
    ro = rows_like(jax.eval_shape(score, state.params, frozen, batch, responses, logprobs))
    update = partial(ppo.ppo_update, tx=prog.tx, **kw)
    update_jit = jax.jit(on_mesh(update, mesh))
    phases = [Program("ppo rollout", sample_jit, (state, batch, sample_frozen), flops["rollout"], b, tokens, ls,
                      False),
              Program("ppo scoring", score_jit, (state.params, frozen, batch, responses, logprobs), flops["scoring"],
                      b, tokens, ls, False),
              Program("ppo update", update_jit, (state, batch, ro, update_frozen), flops["update"], b, tokens, ls,
                      False)]
    name = "ppo iteration" + (f" (LoRA r={prog.plans['policy'].r})" if lora_run else "")
    return Program(name, prog.train, (state, batch, frozen), sum(flops.values()), b, tokens, ls, phases=phases)
