"""PPO for VLMs (TRL's PPOTrainer semantics, extended to images): policy + value model trained,
reference + reward model frozen, images flowing through all four.

    jaxpref ppo --config jaxpref/tasks/shapes/configs/ppo.yaml [key=value ...]

One training step is one PPO iteration, compiled as ONE jitted program:
  1. rollout: the KV-cache sampler (jaxpref.generate) draws a response of up to response_length
     tokens per prompt at `temperature`; with stop_token(_id) every token after the first stop
     token is pad;
  2. scoring: the reference's log-probs (logits / (temperature + 1e-7)), the value model's values at
     positions ctx-1 .. end-1, the reward model's score at the last non-pad token (or, with
     reward_model_type "implicit", DPO's implicit reward: beta x log pi_rm / pi_ref of the
     response), minus missing_eos_penalty for responses without a stop token;
  3. rewards, KL, GAE, whitening and masks as TRL computes them (jaxpref.objectives.ppo);
  4. the update: num_ppo_epochs x num_mini_batches shuffled mini-batches (each accumulating
     gradient_accumulation_steps micro-batches), clipped policy loss + vf_coef x clipped value loss,
     one AdamW step per mini-batch, as a lax.scan inside the same jit.
The step's randomness is fold_in(state.rng, step): a resumed run draws the same rollouts.

Roles: policy = model.name_or_path (TRL's sft_model_path), value = value_model_path (default
reward_model_path, as TRL initialises it), reference = ref_model (default: the policy's starting
weights), reward = reward_model_path. Frozen roles are held in `frozen_dtype`.

Evaluation (every eval_steps, on the first eval_num_prompts rows of dataset_test_split): the
policy and the reference each sample a response per prompt; logged as eval_reward (reward model),
eval_rm_win_rate, eval_kl and, with a `judge` (jaxpref.rewards), eval_win_rate (ties 1/2) and
eval_judge_score; the samples go to output_dir/samples/step-N.jsonl. Where the reward rises and the
judge score does not, the policy is exploiting the reward model; the report shows both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxpref.config import ConfigError, PPOConfig
from jaxpref.data.processing import ProcessorConfig
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.eval.evaluate import EvalArgs, compare, first_rows, summarize
from jaxpref.generate import generate_tokens
from jaxpref.models import VLM
from jaxpref.objectives.ppo import advantages_and_returns, masked_mean, ppo_losses
from jaxpref.profile import text_flops, vision_flops
from jaxpref import rewards
from jaxpref.sequence import (ImplicitReward, cast_floats, images, implicit_reward, response_logits,
                              response_logprobs, response_scores, token_logprobs)
from jaxpref.sharding import constrain, logical_to_spec, make_mesh, on_mesh, param_shapes, param_shardings
from jaxpref.models import lora
from jaxpref.models.lora import Adapted
from jaxpref.train.loop import (Steps, Task, batch_shards, export_adapter, load_params, lora_args, lora_plan,
                                model_config, passes, run, tokenizer_spec)
from jaxpref.train.loop import export as export_model
from jaxpref.train.optim import make_optimizer, make_schedule
from jaxpref.train.state import batch_sharding, state_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class Roles:
    """The four models (static modules, compute dtype)."""

    policy: VLM = flax.struct.field(pytree_node=False)
    value: VLM = flax.struct.field(pytree_node=False)
    ref: VLM = flax.struct.field(pytree_node=False)
    reward: VLM = flax.struct.field(pytree_node=False)
    # with use_peft: the policy's and the value model's adapters (jaxpref.models.lora.Plan); None: full weights
    policy_plan: object = flax.struct.field(pytree_node=False, default=None)
    value_plan: object = flax.struct.field(pytree_node=False, default=None)


def bind(params, frozen, roles: Roles) -> dict:
    """role -> the params each model runs with. Full weights: the trained policy and value, the frozen
    ref and reward. LoRA: the policy is its adapters on the frozen policy base (frozen["policy"]); the
    value model is its adapters and score head on the frozen reward model (TRL initialises the value
    model from the reward model: one copy serves both); the reference is ref_model when given, else
    the policy base with adapters off."""
    frozen = frozen or {}
    if roles.policy_plan is None:
        return {"policy": params["policy"], "value": params["value"], "ref": frozen.get("ref"),
                "reward": frozen.get("reward")}
    base = frozen["policy"]
    ref = frozen.get("ref")
    return {"policy": Adapted(base, params["policy"], roles.policy_plan),
            "value": Adapted(frozen.get("reward"), params["value"], roles.value_plan),
            "ref": ref if ref is not None else Adapted(base, None, roles.policy_plan),
            "reward": frozen.get("reward")}


# ---------------------------------------------------------------------------
# scoring


def scores(roles: Roles, frozen, batch: dict, responses, response_mask, ref_logits, cfg: PPOConfig):
    """The reward model's score float32[B] of each response: TRL's scalar head (reward_model_type
    "scalar"), or DPO's implicit reward ("implicit"): implicit_reward_beta x the summed log-ratio of
    the reward model (a DPO policy) to the reference at temperature 1, the reference's logits reused
    from the KL term (jaxpref.sequence.reward_scores computes the same from its own forward passes)."""
    if cfg.reward_model_type == "scalar":
        return response_scores(roles.reward, frozen["reward"], batch, responses, response_mask)
    rm, _ = token_logprobs(response_logits(roles.reward, frozen["reward"], batch, responses, response_mask),
                           responses, None)
    ref, _ = token_logprobs(ref_logits, responses, None)
    return implicit_reward(jnp.sum(rm * response_mask, axis=1), jnp.sum(ref * response_mask, axis=1),
                           cfg.implicit_reward_beta)


# ---------------------------------------------------------------------------
# the iteration


def stop_ids(cfg: PPOConfig, eos_token_id: int) -> tuple[int, ...]:
    """The stop token (TRL: stop_token "eos" or stop_token_id); () = none, responses run to response_length."""
    if cfg.stop_token_id is not None:
        return (cfg.stop_token_id,)
    return (eos_token_id,) if cfg.stop_token == "eos" else ()


def sample_responses(state, batch: dict, frozen=None, *, roles: Roles, cfg: PPOConfig, cache_sharding=None):
    """Step 1: (responses int32[B, T], their log-probs float32[B, T] at `temperature`): pad after the
    first stop token (the sampler stops there). `frozen`: what bind reads (LoRA: the policy base)."""
    mc = roles.policy.config
    b = batch["prompt_ids"].shape[0]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    px = images(batch)
    tt = jnp.zeros_like(batch["prompt_mask"]) if mc.prefix_lm else None
    gen = generate_tokens(roles.policy, cast_floats(bind(state.params, frozen, roles)["policy"], roles.policy.dtype),
                          None if px is None else px.astype(roles.policy.dtype), batch["prompt_ids"],
                          batch["prompt_mask"], tt, key, jnp.arange(b, dtype=jnp.int32), jnp.float32(cfg.temperature),
                          None, jnp.asarray(stop_ids(cfg, mc.eos_token_id), jnp.int32), jnp.int32(mc.pad_token_id),
                          max_new_tokens=cfg.response_length, top_k=0, greedy=False, cache_sharding=cache_sharding)
    return gen.tokens, gen.logprobs


def score_rollout(params, frozen, batch: dict, responses, logprobs, *, roles: Roles, cfg: PPOConfig):
    """Steps 2-3: reference log-probs, values, scores, advantages and returns of sampled responses,
    as a dict of [B, T] / [B] arrays."""
    mc = roles.policy.config
    stops = stop_ids(cfg, mc.eos_token_id)
    response_mask = (jnp.cumsum(responses == mc.pad_token_id, axis=1) == 0).astype(jnp.int32)
    p = bind(params, frozen, roles)
    ref_logits = response_logits(roles.ref, p["ref"], batch, responses, response_mask)
    ref_logprobs, _ = token_logprobs(ref_logits, responses, cfg.temperature)
    values = response_logits(roles.value, p["value"], batch, responses, response_mask).astype(jnp.float32)
    score = scores(roles, p, batch, responses, response_mask, ref_logits, cfg)
    has_stop = jnp.any(jnp.isin(responses, jnp.asarray(stops or (-1,), jnp.int32)), axis=1)
    if cfg.missing_eos_penalty is not None:
        score = jnp.where(has_stop, score, score - cfg.missing_eos_penalty)
    out = advantages_and_returns(score, logprobs, ref_logprobs, values, responses, pad_token_id=mc.pad_token_id,
                                 kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam,
                                 whiten_rewards=cfg.whiten_rewards)
    return {**out, "responses": responses, "response_mask": response_mask, "scores": score,
            "num_stop": jnp.sum(jnp.isin(responses, jnp.asarray(stops or (-1,), jnp.int32)))}


def rollout(state, batch: dict, frozen, *, roles: Roles, cfg: PPOConfig, cache_sharding=None):
    """Steps 1-3: responses, old log-probs, reference log-probs, values, scores, advantages and
    returns, as a dict of [B, T] / [B] arrays."""
    responses, logprobs = sample_responses(state, batch, frozen, roles=roles, cfg=cfg, cache_sharding=cache_sharding)
    return score_rollout(state.params, frozen, batch, responses, logprobs, roles=roles, cfg=cfg)


def minibatch_loss(params, mb: dict, frozen=None, *, roles: Roles, cfg: PPOConfig):
    """TRL's PPO loss on one micro-batch (masked means over it), and its statistics."""
    p = bind(params, frozen, roles)
    new_logprobs, entropy = response_logprobs(roles.policy, p["policy"], mb, mb["responses"],
                                              mb["response_mask"], cfg.temperature)
    vpred = response_logits(roles.value, p["value"], mb, mb["responses"], mb["response_mask"]).astype(jnp.float32)
    loss, stats = ppo_losses(new_logprobs, mb["logprobs"], mb["advantages"], vpred, mb["values"], mb["returns"],
                             mb["padding_mask"], mb["padding_mask_p1"], cliprange=cfg.cliprange,
                             cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef)
    stats["entropy"] = masked_mean(entropy, ~mb["padding_mask"])
    stats["loss"] = loss
    return loss, stats


UPDATE_KEYS = ("responses", "response_mask", "logprobs", "advantages", "values", "returns", "padding_mask",
               "padding_mask_p1")


def ppo_update(state, batch: dict, ro: dict, frozen=None, *, roles: Roles, cfg: PPOConfig, tx):
    """Step 4 on a scored rollout `ro` (rollout's dict): num_ppo_epochs x num_mini_batches AdamW steps
    (`frozen`: what bind reads; LoRA: the policy base and the reward model under the value adapters).
    Returns ((params, opt_state), per-mini-batch stats). Traced under jaxpref.sharding.on_mesh, every
    micro-batch is constrained to the batch axes, so each device trains on rows of its own."""
    data = {**{k: v for k, v in batch.items() if k in ("prompt_ids", "prompt_mask", "pixel_values")},
            **{k: ro[k] for k in UPDATE_KEYS}}
    b = batch["prompt_ids"].shape[0]
    e, m, a = cfg.num_ppo_epochs, cfg.num_mini_batches, cfg.gradient_accumulation_steps
    micro = b // (m * a)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 1)
    order = jnp.stack([jax.random.permutation(jax.random.fold_in(key, i), b) for i in range(e)])
    order = order.reshape(e * m, a, micro)  # each epoch: a fresh permutation cut into mini- and micro-batches
    grad_fn = jax.grad(partial(minibatch_loss, frozen=frozen, roles=roles, cfg=cfg), has_aux=True)

    def take(rows):
        return jax.tree.map(lambda x: constrain(jnp.take(x, rows, axis=0), ("batch",) + (None,) * (x.ndim - 1)),
                            data)

    def minibatch(carry, rows):
        params, opt_state = carry

        def accumulate(g_sum, r):
            g, stats = grad_fn(params, take(r))
            return jax.tree.map(lambda s, x: s + x.astype(jnp.float32) / a, g_sum, g), stats

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, stats = jax.lax.scan(accumulate, zeros, rows)
        updates, opt_state = tx.update(grads, opt_state, params)
        stats = jax.tree.map(jnp.mean, stats)
        stats["grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state), stats

    return jax.lax.scan(minibatch, (state.params, state.opt_state), order)


def ppo_step(state, batch: dict, frozen, *, roles: Roles, cfg: PPOConfig, tx, schedule, cache_sharding=None):
    """One PPO iteration on a batch of B prompts ([B, ...], B over the batch axes). Returns the
    new state and TRL's metrics."""
    ro = rollout(state, batch, frozen, roles=roles, cfg=cfg, cache_sharding=cache_sharding)
    b = batch["prompt_ids"].shape[0]
    (params, opt_state), stats = ppo_update(state, batch, ro, frozen, roles=roles, cfg=cfg, tx=tx)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    pad = ro["padding_mask"]
    kl_sum = jnp.sum(ro["kl"], axis=1)  # padded positions hold 0 (both log-probs are INVALID_LOGPROB)
    non_score = jnp.sum(ro["non_score_reward"], axis=1)
    metrics = {
        "objective/kl": jnp.mean(kl_sum),
        "objective/entropy": jnp.mean(jnp.sum(jnp.where(pad, 0.0, -ro["logprobs"]), axis=1)),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(non_score) + jnp.mean(ro["scores"]),
        "objective/scores": jnp.mean(ro["scores"]),
        "policy/approxkl_avg": jnp.mean(stats["approxkl"]),
        "policy/clipfrac_avg": jnp.mean(stats["pg_clipfrac"]),
        "loss/policy_avg": jnp.mean(stats["pg_loss"]),
        "loss/value_avg": jnp.mean(stats["vf_loss"]),
        "val/clipfrac_avg": jnp.mean(stats["vf_clipfrac"]),
        "policy/entropy_avg": jnp.mean(stats["entropy"]),
        "val/ratio": jnp.mean(stats["ratio"]),
        "val/ratio_var": jnp.var(stats["ratio"]),
        "val/num_eos_tokens": ro["num_stop"].astype(jnp.float32),
        "completions/mean_length": jnp.mean(jnp.sum(ro["response_mask"], axis=1).astype(jnp.float32)),
        "lr": schedule(state.step),
        "episode": (new.step * b).astype(jnp.float32),
        "loss": jnp.mean(stats["loss"]),
        "grad_norm": jnp.mean(stats["grad_norm"]),
        "num_tokens": jnp.sum(batch["prompt_mask"]) + jnp.sum(ro["response_mask"]),
    }
    return new, metrics


# ---------------------------------------------------------------------------
# setup: the four roles, the jitted step, evaluation, export


def processor_config(cfg: PPOConfig) -> ProcessorConfig:
    return ProcessorConfig(kind="prompt", max_prompt_length=cfg.max_prompt_length, max_completion_length=None,
                           max_length=None, truncation_mode="keep_end", num_images=cfg.data.num_images,
                           length_buckets=cfg.data.length_buckets)


def step_rows(cfg: PPOConfig, mesh) -> int:
    """TRL's batch_size: per_device_train_batch_size x devices x gradient_accumulation_steps x num_mini_batches."""
    return cfg.per_device_train_batch_size * batch_shards(mesh) * cfg.gradient_accumulation_steps * cfg.num_mini_batches


def _role_model(path: str, head: str, dtype, what: str, policy: VLM, trained: bool = False) -> VLM:
    p, c = policy.config, model_config(path, what)
    same_inputs = (c.family, c.vision.image_size, c.num_image_tokens, c.image_token_index, c.pad_token_id,
                   c.text.vocab_size) == (p.family, p.vision.image_size, p.num_image_tokens, p.image_token_index,
                                          p.pad_token_id, p.text.vocab_size)
    if not same_inputs:
        raise ConfigError(f"{what}: {path} does not read the policy's inputs (family, image size, image tokens, vocab)")
    return VLM(c, head=head, dtype=dtype, freeze_vision=trained and policy.freeze_vision)


def roles_of(cfg: PPOConfig, policy: VLM) -> tuple[dict[str, str], dict[str, VLM]]:
    """(role -> path, role -> master-dtype module)."""
    paths = {"policy": cfg.model.name_or_path, "value": cfg.value_model_path or cfg.reward_model_path,
             "ref": cfg.ref_model or cfg.model.name_or_path, "reward": cfg.reward_model_path}
    frozen = DTYPES[cfg.frozen_dtype]
    models = {"policy": policy,
              "value": _role_model(paths["value"], "scalar", policy.dtype, "value_model_path", policy, trained=True),
              "ref": _role_model(paths["ref"], "lm", frozen, "ref_model", policy),
              "reward": _role_model(paths["reward"], "lm" if cfg.reward_model_type == "implicit" else "scalar",
                                    frozen, "reward_model_path", policy)}
    if models["ref"].config != policy.config:
        raise ConfigError(f"ref_model: {paths['ref']} is not the policy's architecture")
    return paths, models


def compute_roles(cfg: PPOConfig, models: dict[str, VLM], plans: dict | None = None) -> Roles:
    """The modules the step runs: bf16 compute when cfg.bf16, remat for the trained ones."""
    compute = jnp.bfloat16 if cfg.bf16 else models["policy"].dtype
    plans = plans or {}
    return Roles(policy=models["policy"].clone(dtype=compute, remat=cfg.gradient_checkpointing),
                 value=models["value"].clone(dtype=compute, remat=cfg.gradient_checkpointing),
                 ref=models["ref"].clone(dtype=compute), reward=models["reward"].clone(dtype=compute),
                 policy_plan=plans.get("policy"), value_plan=plans.get("value"))


def lora_plans(cfg: PPOConfig, paths: dict, models: dict[str, VLM]) -> dict | None:
    """{"policy", "value"}: the adapters a use_peft run trains, or None. The value model's adapters (and
    its score head, trained whole) sit on the reward model, which the run holds anyway."""
    policy = lora_plan(cfg, models["policy"])
    if policy is None:
        return None
    if cfg.reward_model_type != "scalar":
        raise ConfigError("reward_model_type: with use_peft the value model is adapters on the reward model's "
                          "backbone and score head, which an implicit (DPO) reward model does not have")
    if paths["value"] != paths["reward"]:
        raise ConfigError("value_model_path: with use_peft the value model is adapters on the reward model "
                          "(TRL initialises it from the reward model): leave value_model_path unset")
    value = lora.make_plan(models["value"].config, "scalar", lora_args(cfg), ("score",))
    return {"policy": policy, "value": lora.without_vision(value) if cfg.model.freeze_vision else value}


@dataclasses.dataclass(frozen=True)
class Program:
    """The PPO iteration built from shapes alone (nothing loaded): what build_steps runs and
    `jaxpref profile` compiles."""

    paths: dict  # role -> path
    models: dict  # role -> master-dtype VLM
    param_shapes: dict  # role -> its params' ShapeDtypeStructs (the models' dtypes)
    roles: Roles  # compute-dtype modules
    tx: optax.GradientTransformation
    shardings: object  # TrainState of NamedShardings (policy + value trained)
    frozen_shardings: dict  # ref, reward (LoRA: and the policy base; ref None when it is that base)
    cache_sharding: NamedSharding
    train: object  # jitted (state, batch [B, ...], frozen) -> (state, metrics); the state donated
    plans: dict | None = None  # LoRA: {"policy", "value"} adapters
    trained_shapes: dict | None = None  # role -> ShapeDtypeStructs of what trains (LoRA: the adapters)

    def frozen_shapes(self) -> dict:
        """The `frozen` argument as ShapeDtypeStructs carrying shardings (nothing loaded)."""
        from jaxpref.sharding import placed_shapes

        shapes = {r: self.param_shapes[r] for r in ("ref", "reward")}
        if self.plans is not None:
            shapes["policy"] = self.param_shapes["policy"]
        return {r: None if self.frozen_shardings[r] is None else placed_shapes(shapes[r], self.frozen_shardings[r])
                for r in self.frozen_shardings}


def build_program(cfg: PPOConfig, policy: VLM, mesh, total_steps: int) -> Program:
    updates = cfg.num_ppo_epochs * cfg.num_mini_batches
    paths, models = roles_of(cfg, policy)
    plans = lora_plans(cfg, paths, models)
    tx = make_optimizer(cfg, total_steps, updates_per_step=updates)
    trained = ("policy", "value")
    shapes = {r: param_shapes(m) for r, m in models.items()}
    frozen_shardings = {r: param_shardings(models[r], mesh) for r in ("ref", "reward")}
    if plans is None:
        trained_shapes = {r: shapes[r] for r in trained}
        trained_shardings = {r: param_shardings(models[r], mesh) for r in trained}
    else:
        # the value adapters sit on the reward model's params (frozen_dtype, the reward's head)
        bases = {"policy": shapes["policy"], "value": shapes["reward"]}
        base_shardings = {"policy": param_shardings(policy, mesh), "value": frozen_shardings["reward"]}
        trained_shapes = {r: lora.adapter_shapes(plans[r], bases[r]) for r in trained}
        trained_shardings = {r: lora.adapter_shardings(plans[r], base_shardings[r]) for r in trained}
        frozen_shardings["policy"] = base_shardings["policy"]
        if cfg.ref_model is None:
            frozen_shardings["ref"] = None  # the policy base with adapters off
    shardings = state_shardings(trained_shardings, trained_shapes, tx, mesh)
    roles = compute_roles(cfg, models, plans)
    t = policy.config.text
    rows = step_rows(cfg, mesh)
    # the KV cache: batch over (data, fsdp), kv heads over tensor, like generate() places it
    cache_len = max(cfg.data.length_buckets) + cfg.response_length  # an upper bound is only used for the spec
    cache = NamedSharding(mesh, logical_to_spec(("layers", "batch", "length", "kv_heads", "head_dim"),
                                                (t.num_hidden_layers, rows, cache_len, t.num_key_value_heads,
                                                 t.head_dim), mesh))
    step = partial(ppo_step, roles=roles, cfg=cfg, tx=tx, schedule=make_schedule(cfg, total_steps),
                   cache_sharding=cache)
    train = jax.jit(on_mesh(step, mesh), in_shardings=(shardings, batch_sharding(mesh), frozen_shardings),
                    out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    return Program(paths, models, shapes, roles, tx, shardings, frozen_shardings, cache, train, plans, trained_shapes)


def build_steps(task: Task, cfg: PPOConfig, policy: VLM, mesh, total_steps: int) -> Steps:
    """Task hook: the jitted PPO iteration with the value model trained beside the policy."""
    prog = build_program(cfg, policy, mesh, total_steps)
    paths, models, plans = prog.paths, prog.models, prog.plans
    trained = ("policy", "value")
    frozen = {r: None if prog.frozen_shardings[r] is None else
              load_params(paths[r], models[r], cfg.frozen_dtype, mesh, cfg.seed) for r in ("ref", "reward")}
    start = None
    if plans is not None:
        loaded = load_params(paths["policy"], policy, cfg.model.dtype, mesh, cfg.seed)
        frozen["policy"], start = (loaded.base, loaded.trained) if isinstance(loaded, lora.Adapted) else (loaded, None)

    def init_params():
        if plans is None:
            return {r: load_params(paths[r], models[r], cfg.model.dtype, mesh, cfg.seed) for r in trained}
        bases = {"policy": frozen["policy"], "value": frozen["reward"]}
        out = {}
        for i, r in enumerate(trained):
            if r == "policy" and start is not None:
                out[r] = jax.tree.map(jnp.copy, start)  # continuing an adapter directory
                continue
            out[r] = jax.jit(partial(lora.init_adapters, plans[r], rng=jax.random.key(cfg.seed + i)),
                             out_shardings=prog.shardings.params[r])(bases[r])
        return out

    def export(params, tokenizer):
        value_cfg = dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, "value_model"))
        if plans is None:
            export_model(policy, params["policy"], tokenizer, cfg)  # output_dir: the policy, as every trainer
            export_model(models["value"], params["value"], tokenizer, value_cfg)
            return
        export_adapter(plans["policy"], policy, params["policy"], tokenizer, cfg)
        value_cfg = dataclasses.replace(value_cfg, model=dataclasses.replace(cfg.model, name_or_path=paths["reward"]))
        export_adapter(plans["value"], models["value"], params["value"], tokenizer, value_cfg)

    host_eval = None
    if cfg.data.dataset_test_split is not None:
        host_eval = make_host_eval(cfg, policy, frozen, models, mesh, prog.roles)
    return Steps(train=prog.train, evaluate=None, tx=prog.tx, shardings=prog.shardings, init_params=init_params,
                 param_shapes=prog.trained_shapes, export=export, frozen=frozen, accum=None, host_eval=host_eval)


def make_host_eval(cfg: PPOConfig, policy: VLM, frozen: dict, models: dict, mesh, roles: Roles):
    """params -> eval metrics: the policy against the reference on held-out prompts (jaxpref.eval),
    samples written to output_dir/samples/step-N.jsonl."""
    rows = list(first_rows(cfg.data.dataset_name, cfg.data.dataset_test_split, cfg.eval_num_prompts))
    tokenizer = load_tokenizer(tokenizer_spec(cfg))
    args = EvalArgs(policy="", reference="", data=cfg.data.dataset_name, max_new_tokens=cfg.response_length,
                    temperature=cfg.temperature, batch_size=cfg.per_device_eval_batch_size * batch_shards(mesh),
                    seed=cfg.seed, max_prompt_length=cfg.max_prompt_length, length_buckets=cfg.data.length_buckets)
    ref = bind({"policy": None, "value": None}, frozen, roles)["ref"]  # LoRA: the base with adapters off
    reward = (models["reward"], frozen["reward"])
    if cfg.reward_model_type == "implicit":
        reward = ImplicitReward(*reward, models["ref"], ref, beta=cfg.implicit_reward_beta)
    try:
        judge = rewards.resolve(cfg.judge) if cfg.judge else None
    except ValueError as e:
        raise ConfigError(f"judge: {e}") from None

    def host_eval(params, step: int) -> dict:
        samples = compare((policy, bind(params, frozen, roles)["policy"]), (models["ref"], ref), reward, rows, tokenizer,
                          args,
                          judge=judge)
        if jax.process_index() == 0:
            out = os.path.join(cfg.output_dir, "samples")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"step-{step}.jsonl"), "w") as f:
                for s in samples:
                    f.write(json.dumps(s) + "\n")
        m = summarize(samples)
        return {k: v for k, v in m.items() if k not in ("num_prompts", "reference_length")} | {"rows": len(rows)}

    return host_eval


def step_flops(cfg: PPOConfig, mc, shapes: dict) -> dict[str, float]:
    """One iteration on B prompts of Lp tokens by phase. rollout: the prefill (the LM head at its last
    position) and response_length - 1 decode steps (each attending to Lp + R/2 keys on average);
    scoring: the reference's, value model's and reward model's forwards over prompt + response;
    update: num_ppo_epochs passes of the policy's and value model's forward and backward over the
    batch (the heads at the response positions). All four models share the policy's shapes."""
    b, lp = shapes["prompt_ids"]
    r, images = cfg.response_length, b * shapes["pixel_values"][1]
    t, tower = lp + r, vision_flops(mc, images)
    rollout = tower + text_flops(mc, b, lp, head_positions=1) + text_flops(mc, b, r - 1, context=lp + r // 2)
    implicit = cfg.reward_model_type == "implicit"
    scoring = 3 * tower + text_flops(mc, b, t, head_positions=r) + text_flops(mc, b, t, head_positions=r, head_width=1) \
        + text_flops(mc, b, t, head_positions=r if implicit else t, head_width=None if implicit else 1)
    trained = text_flops(mc, b, t, head_positions=r) + text_flops(mc, b, t, head_positions=r, head_width=1)
    tower_passes, text_passes = passes(cfg)
    update = cfg.num_ppo_epochs * (2 * tower * tower_passes + text_passes * trained)
    return {"rollout": rollout, "scoring": scoring, "update": update}


TASK = Task(head="lm", processor_config=processor_config, make_loss=None, count_tokens=None,
            build_steps=build_steps, step_rows=step_rows, step_flops=step_flops)


def run_ppo(cfg: PPOConfig) -> dict[str, float]:
    """Trains per cfg; the policy lands in cfg.output_dir, the value model in output_dir/value_model."""
    if cfg.total_episodes is not None and cfg.max_steps <= 0:
        rows = step_rows(cfg, make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
        cfg = dataclasses.replace(cfg, max_steps=math.ceil(cfg.total_episodes / rows))
    return run(TASK, cfg)
