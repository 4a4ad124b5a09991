"""The training loop every trainer shares: setup, steps, logging, evaluation, checkpoints, export.

    run(task, cfg)    # task: what differs between SFT, reward, ... (head, data kind, loss)

Order within optimizer step s (1-based):
  1. the jitted step on the next batch (A = gradient_accumulation_steps micro-batches);
  2. s % logging_steps == 0 (or the last step): one record in metrics.jsonl / TensorBoard;
  3. s % eval_steps == 0 (or the last step, when there is an eval split): evaluation;
  4. s % save_steps == 0 (or the last step): an asynchronous Orbax checkpoint.
Each record of step 2 carries step_seconds (wall time per step since the previous record, the first
step, which compiles, left out) and, on a device whose peak jaxpref.profile knows (TPU, H100/H200),
mfu (the task's analytic FLOPs of the step / step_seconds / the devices' peak). With profile_steps
[a, b], steps a .. b-1 are traced with jax.profiler into output_dir/trace.
Metrics stay on device until 2-4 need them; then every pending step's loss and grad_norm are
checked, and a non-finite one stops the run (NonFiniteError) before anything is saved: the last
checkpoint on disk predates it. At the end the model is exported as HF safetensors + config.json,
the tokenizer and config.yaml, into output_dir.

Batch sizes: a micro-batch holds per_device_train_batch_size x (mesh data x fsdp) rows globally
(tensor-parallel devices share rows); each process loads its share of A micro-batches per step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.config import ConfigError, TrainingConfig, to_dict, to_yaml
from jaxpref.data.loader import Loader
from jaxpref.data.processing import Processor, ProcessorConfig
from jaxpref.data.sources import open_source
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.models import VLM, get_preset, load_pretrained, preset_names, save_pretrained
from jaxpref.models import lora
from jaxpref.models.config import read_hf_config
from jaxpref.models.hf import param_shapes
from jaxpref.sharding import init_sharded, make_mesh, param_shardings
from jaxpref.train.checkpoint import CHECKPOINTS, Checkpointer, complete_steps, gather_json, resolve_resume
from jaxpref.train.logging import IntervalMeans, MetricsWriter
from jaxpref.train.optim import make_optimizer, make_schedule
from jaxpref.train.state import (BATCH_AXES, abstract_state, batch_sharding, eval_step, init_state,
                                 jit_eval_step, jit_train_step, micro_batch_sharding, state_shardings, train_step)

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteError(RuntimeError):
    """A step produced a NaN/inf loss or gradient norm; the run stopped without saving it."""


class RunError(RuntimeError):
    """A run that cannot start (e.g. it would overwrite another run's checkpoints)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What one trainer adds to the shared loop."""

    head: str  # the model's head: "lm" or "scalar"
    processor_config: Callable[[TrainingConfig], ProcessorConfig]  # how rows become examples
    make_loss: Callable[[VLM, TrainingConfig], Callable]  # (compute model, cfg) -> loss_fn(params, batch)
    count_tokens: Callable[[dict], jax.Array]  # batch -> tokens the model reads (TRL's num_tokens)
    # (cfg, mesh) -> (params, shardings) the loss reads but never trains (DPO's reference model), or
    # None; the loss is then called as loss_fn(params, batch, frozen=params). With abstract=True the
    # params are ShapeDtypeStructs carrying their shardings (nothing loaded: `jaxpref profile`)
    frozen: Callable[..., tuple[Any, Any] | None] | None = None
    # (cfg, split) -> the split's source, for tasks that add columns to the rows (default: open_source)
    open_split: Callable[[TrainingConfig, str], Any] | None = None
    # (task, cfg, model, mesh, total_steps) -> Steps, for tasks whose step is not "gradient of a
    # loss" or whose trained params are not one model's (PPO: policy + value); default: make_steps
    build_steps: Callable[..., "Steps"] | None = None
    # (cfg, mesh) -> global rows one step reads (default: per_device_train_batch_size x the batch
    # shards x gradient_accumulation_steps)
    step_rows: Callable[[TrainingConfig, Any], int] | None = None
    # (model.name_or_path's VLMConfig, cfg) -> the VLMConfig to train (the reward model's
    # score_pooling), or None: as it is
    configure_model: Callable[[Any, TrainingConfig], Any] | None = None
    # (cfg, VLMConfig, {key: global shape of the step's batch}) -> analytic FLOPs of one step by phase
    # (jaxpref.profile's counts; the phases' sum is the step's): what MFU is measured against
    step_flops: Callable[[TrainingConfig, Any, dict], dict[str, float]] | None = None
    # with LoRA, the loss's `frozen` is the reference: the base with adapters off (or, continuing an
    # adapter, with the adapter it started from), unless Task.frozen gives one (DPO's ref_model)
    lora_reference: bool = False

    def source(self, cfg: TrainingConfig, split: str):
        """The source of `split` of cfg.data.dataset_name, as this task reads it."""
        if self.open_split is not None:
            return self.open_split(cfg, split)
        return open_source(cfg.data.dataset_name, split)


# ---------------------------------------------------------------------------
# setup pieces


def base_spec(spec: str, key: str = "model.name_or_path") -> str:
    """The base model of `spec`: a PEFT adapter directory's base_model_name_or_path, else spec itself."""
    if os.path.isdir(spec) and lora.is_adapter_dir(spec):
        base = lora.read_adapter_config(spec).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{key}: {spec}/adapter_config.json names no base_model_name_or_path")
        return base
    return spec


def model_config(spec: str, key: str):
    """The VLMConfig of `spec`: an HF directory's config.json, a PEFT adapter directory's base or a
    preset; ConfigError naming `key` otherwise."""
    spec = base_spec(spec, key)
    if os.path.isdir(spec):
        return read_hf_config(spec)
    if spec in preset_names():
        return get_preset(spec)
    raise ConfigError(f"{key}: {spec!r} is neither a directory nor a preset ({', '.join(preset_names())})")


def load_params(spec: str, model: VLM, dtype: str, mesh, seed: int):
    """Weights of an HF directory (a missing scalar head is initialised from `seed`), or a random
    init of a preset from `seed`, placed directly onto the mesh. A PEFT adapter directory gives
    lora.Adapted: its base (base_model_name_or_path) with the adapter on."""
    rng = jax.random.key(seed)
    if base_spec(spec) != spec:
        base = load_params(base_spec(spec), model, dtype, mesh, seed)
        plan, trained = lora.load_adapter(spec, model.config, model.head)
        return lora.Adapted(base, place_adapters(plan, trained, model, mesh), plan)
    if os.path.isdir(spec):
        return load_pretrained(spec, dtype, head=model.head, mesh=mesh, rng=rng)[1]
    return init_sharded(model, rng, mesh)


def build_model(cfg: TrainingConfig, head: str, configure: Callable | None = None) -> VLM:
    """The VLM module (master dtype) for model.name_or_path: a preset or an HF directory's config,
    passed through `configure(config, cfg)` when given (Task.configure_model)."""
    config = model_config(cfg.model.name_or_path, "model.name_or_path")
    if configure is not None:
        config = configure(config, cfg)
    return VLM(config, head=head, dtype=DTYPES[cfg.model.dtype], freeze_vision=cfg.model.freeze_vision)


def initial_params(cfg: TrainingConfig, model: VLM, mesh):
    """The weights training starts from (see load_params)."""
    return load_params(cfg.model.name_or_path, model, cfg.model.dtype, mesh, cfg.seed)


# ---------------------------------------------------------------------------
# LoRA


def place_adapters(plan, trained, model: VLM, mesh):
    """An adapter tree (numpy) on the mesh, sharded as the kernels it adapts."""
    return jax.device_put(trained, lora.adapter_shardings(plan, param_shardings(model, mesh)))


def passes(cfg: TrainingConfig) -> tuple[int, int]:
    """(tower, decoder) forward-equivalents one trained example costs, for analytic FLOPs: 3 (forward,
    and a backward of twice its cost), 2 under LoRA (the frozen weights' gradients are never formed;
    the adapters' are negligible), 1 for a frozen tower (forward only)."""
    trained = 2 if cfg.model.use_peft else 3
    return (1 if cfg.model.freeze_vision else trained), trained


def lora_args(cfg: TrainingConfig) -> lora.LoraArgs:
    """The model section's LoRA fields, lora_target_modules read as TRL reads them (lora.target_spec)."""
    m = cfg.model
    return lora.LoraArgs(r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                         target_modules=lora.target_spec(m.lora_target_modules),
                         modules_to_save=m.lora_modules_to_save, use_rslora=m.use_rslora)


def lora_plan(cfg: TrainingConfig, model: VLM):
    """The adapters a use_peft run trains (jaxpref.models.lora.Plan), or None without use_peft. A
    scalar-head model trains its score head whole (PEFT's sequence classification); with
    model.freeze_vision the tower gets no adapters. Continuing an adapter directory, its own
    adapter_config.json says what is adapted."""
    m = cfg.model
    adapter_dir = base_spec(m.name_or_path) != m.name_or_path
    if not m.use_peft:
        if adapter_dir:
            raise ConfigError(f"model.name_or_path: {m.name_or_path} is a LoRA adapter: set model.use_peft=true "
                              f"to continue training it, or merge it first (jaxpref export --merge)")
        return None
    if adapter_dir:
        plan = lora.load_adapter(m.name_or_path, model.config, model.head)[0]
        log.info("model.name_or_path is a LoRA adapter: continuing it with its own settings (r=%d, alpha=%g, "
                 "targets %s); the model.lora_* fields are not used", plan.r, plan.alpha, plan.target_modules)
    else:
        plan = lora.make_plan(model.config, model.head, lora_args(cfg), ("score",) if model.head == "scalar" else ())
    return lora.without_vision(plan) if m.freeze_vision else plan


def adapted_loss(trained, batch: dict, frozen, rng=None, *, loss_fn: Callable, plan, reference: bool):
    """A task's loss with LoRA: the trained params are the adapters, the base rides in `frozen`
    ({"base", "start", "task"}). With `reference`, the loss's own `frozen` is the task's (e.g. DPO's
    ref_model) or else the base with adapters off, or with the adapters a run continues from."""
    base = frozen["base"]
    params = lora.Adapted(base, trained, plan, rng)
    if not reference:
        return loss_fn(params, batch)
    ref = frozen["task"] if frozen["task"] is not None else lora.Adapted(base, frozen["start"], plan)
    return loss_fn(params, batch, frozen=ref)


def export_adapter(plan, model: VLM, trained, tokenizer, cfg: TrainingConfig):
    """output_dir: the PEFT adapter (adapter_config.json, adapter_model.safetensors) that
    peft.PeftModel.from_pretrained loads onto the base, the tokenizer and config.yaml."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        trained = multihost_utils.process_allgather(trained)
    if jax.process_index() == 0:
        base = base_spec(cfg.model.name_or_path)
        lora.save_adapter(plan, jax.device_get(trained), model.config, model.head, cfg.output_dir,
                          base_model_name_or_path=os.path.abspath(base) if os.path.isdir(base) else base,
                          task_type="SEQ_CLS" if model.head == "scalar" else "CAUSAL_LM")
        tokenizer.save_pretrained(cfg.output_dir)
        write_config(cfg)


def tokenizer_spec(cfg: TrainingConfig) -> str:
    """data.tokenizer, else the model directory, else the built-in task's tokenizer (presets)."""
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    return cfg.model.name_or_path if os.path.isdir(cfg.model.name_or_path) else "shapes"


def batch_shards(mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def plan_steps(cfg: TrainingConfig, source, step_rows: int) -> tuple[int, int | None]:
    """(optimizer steps to run, rows per epoch or None when the source does not know)."""
    counts = [source.num_rows(i) for i in range(len(source.shards))]
    rows = None if None in counts else sum(counts)
    if cfg.max_steps > 0:
        return cfg.max_steps, rows
    if rows is None:
        raise ConfigError(f"max_steps: must be set: {source} does not know its size, which "
                          f"num_train_epochs={cfg.num_train_epochs} needs")
    return math.ceil(cfg.num_train_epochs * max(1, rows // step_rows)), rows


def device_batch(host: dict, mesh, accum: int | None) -> dict:
    """A process-local numpy batch -> global jax.Arrays: [A, B, ...] sharded on B when `accum`
    is given (a train step's micro-batches), else [B, ...]. Non-numeric fields are dropped;
    `valid` (float32, 1 = real row) is added when absent."""
    arrays = {k: v for k, v in host.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}
    n = len(arrays["prompt_ids"])
    arrays.setdefault("valid", np.ones(n, np.float32))
    procs = jax.process_count()
    out = {}
    for k, v in arrays.items():
        if accum is None:
            sharding, shape = batch_sharding(mesh), (n * procs,) + v.shape[1:]
        else:
            v = v.reshape((accum, n // accum) + v.shape[1:])
            sharding, shape = micro_batch_sharding(mesh), (accum, n // accum * procs) + v.shape[2:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def pad_rows(host: dict, size: int) -> dict:
    """A batch of n <= size rows -> `size` rows; the added ones repeat row 0 with valid = 0."""
    n = len(host["prompt_ids"])
    out = {k: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for k, v in host.items()
           if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}
    out["valid"] = (np.arange(size) < n).astype(np.float32)
    return out


def eval_batches(cfg: TrainingConfig, processor: Processor, local_rows: int, source=None) -> list[dict]:
    """The whole eval split (or `source`), processed once, in batches of `local_rows` (the last one
    padded); every process gets the same number of batches (padding ones have valid = 0)."""
    source = source if source is not None else open_source(cfg.data.dataset_name, cfg.data.dataset_test_split)
    loader = Loader(source, processor, processor.collate, batch_size=local_rows, seed=cfg.seed, shuffle_buffer=1,
                    shuffle_shards=False, num_epochs=1, drop_remainder=False, on_bad_record=cfg.data.on_bad_record)
    batches = [pad_rows(b, local_rows) for b in loader]
    if not batches:
        raise RunError(f"the eval split {cfg.data.dataset_test_split!r} of {source} has no usable rows")
    most = max(gather_json(len(batches)))
    blank = {**batches[0], "valid": np.zeros(local_rows, np.float32)}
    return batches + [blank] * (most - len(batches))


def export(model: VLM, params, tokenizer, cfg: TrainingConfig):
    """output_dir: HF safetensors + config.json (transformers loads it), the tokenizer, config.yaml."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params)
    if jax.process_index() == 0:
        save_pretrained(model, jax.device_get(params), cfg.output_dir)
        tokenizer.save_pretrained(cfg.output_dir)
        write_config(cfg)


def write_config(cfg: TrainingConfig):
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))


@dataclasses.dataclass(frozen=True)
class Steps:
    train: Callable  # jitted (state, batch [A, B, ...][, frozen]) -> (state, metrics); the state is donated
    evaluate: Callable | None  # jitted (params, batch [B, ...][, frozen]) -> Stats; None: no loss to evaluate
    tx: Any  # the optax optimizer
    shardings: Any  # TrainState of NamedShardings
    init_params: Callable[[], Any]  # () -> the trained params at step 0, on the mesh
    param_shapes: Any  # ShapeDtypeStructs of the trained params (restoring a checkpoint)
    export: Callable[[Any, Any], None]  # (params, tokenizer) -> writes the final model(s) to output_dir
    frozen: Any = None  # the task's frozen params (on the mesh), passed to both steps; None: none
    accum: int | None = 1  # the batch's leading micro-batch axis; None: a flat [B, ...] batch
    host_eval: Callable[[Any, int], dict] | None = None  # (params, step) -> extra eval metrics computed on the host

    def step(self, state, batch):
        return self.train(state, batch) if self.frozen is None else self.train(state, batch, self.frozen)

    def stats(self, params, batch):
        return self.evaluate(params, batch) if self.frozen is None else self.evaluate(params, batch, self.frozen)


@dataclasses.dataclass(frozen=True)
class Jitted:
    """A task's jitted steps on a mesh, built from shapes alone."""

    train: Callable  # (state, batch[, frozen]) -> (state, metrics)
    evaluate: Callable  # (params, batch[, frozen]) -> Stats
    tx: Any
    shardings: Any  # TrainState of NamedShardings
    param_shapes: Any  # ShapeDtypeStructs of the trained params
    frozen_shardings: Any  # of the steps' `frozen` argument, or None: none
    plan: Any = None  # jaxpref.models.lora.Plan under use_peft


def jitted_steps(task: Task, cfg: TrainingConfig, model: VLM, mesh, total_steps: int, frozen_shardings=None,
                 plan=None, start: bool = False) -> Jitted:
    """The task's jitted train and eval steps on `mesh`, built from shapes alone (nothing is loaded):
    bf16 compute when cfg.bf16 (master params stay in model.dtype), remat when
    cfg.gradient_checkpointing; `frozen_shardings` when the loss reads frozen params (Task.frozen).

    With a LoRA `plan` the trained params are the adapters (float32) and the steps' `frozen` is
    {"base": the model's params, "start": the adapters a continued run started from (when `start`) or
    None, "task": the task's frozen params or None}; see adapted_loss."""
    tx = make_optimizer(cfg, total_steps)
    p_shardings = param_shardings(model, mesh)
    dropout = 0.0 if plan is None or getattr(cfg, "disable_dropout", False) else cfg.model.lora_dropout
    compute = model.clone(dtype=jnp.bfloat16 if cfg.bf16 else model.dtype, remat=cfg.gradient_checkpointing,
                          lora_dropout=dropout)
    loss_fn = task.make_loss(compute, cfg)
    trained_shapes, trained_shardings = param_shapes(model), p_shardings
    if plan is not None:
        trained_shapes = lora.adapter_shapes(plan, trained_shapes)
        trained_shardings = lora.adapter_shardings(plan, p_shardings)
        loss_fn = partial(adapted_loss, loss_fn=loss_fn, plan=plan, reference=task.lora_reference)
        frozen_shardings = {"base": p_shardings, "start": trained_shardings if start else None,
                            "task": frozen_shardings}
    shardings = state_shardings(trained_shardings, trained_shapes, tx, mesh)
    train = jit_train_step(partial(train_step, loss_fn=loss_fn, tx=tx, schedule=make_schedule(cfg, total_steps),
                                   count_tokens=task.count_tokens, loss_rng=dropout > 0),
                           shardings, mesh, frozen_shardings)
    evaluate = jit_eval_step(partial(eval_step, loss_fn=loss_fn), trained_shardings, mesh, frozen_shardings)
    return Jitted(train, evaluate, tx, shardings, trained_shapes, frozen_shardings, plan)


def make_steps(task: Task, cfg: TrainingConfig, model: VLM, mesh, total_steps: int) -> Steps:
    """The task's jitted train and eval steps on `mesh` (jitted_steps), its frozen params loaded. With
    model.use_peft the base is frozen too, and the adapters train (jaxpref.models.lora)."""
    plan = lora_plan(cfg, model)
    frozen = task.frozen(cfg, mesh) if task.frozen is not None else None
    frozen_params, frozen_shardings = frozen if frozen is not None else (None, None)
    if plan is None:
        j = jitted_steps(task, cfg, model, mesh, total_steps, frozen_shardings)
        return Steps(train=j.train, evaluate=j.evaluate, tx=j.tx, shardings=j.shardings,
                     init_params=lambda: initial_params(cfg, model, mesh), param_shapes=j.param_shapes,
                     export=lambda params, tokenizer: export(model, params, tokenizer, cfg), frozen=frozen_params,
                     accum=cfg.gradient_accumulation_steps)
    loaded = initial_params(cfg, model, mesh)
    base, start = (loaded.base, loaded.trained) if isinstance(loaded, lora.Adapted) else (loaded, None)
    continued = start is not None and task.lora_reference and frozen_params is None
    j = jitted_steps(task, cfg, model, mesh, total_steps, frozen_shardings, plan, start=continued)

    def init_params():
        if start is not None:
            return jax.tree.map(jnp.copy, start)  # the state is donated; `start` may be the reference
        return jax.jit(lambda b: lora.init_adapters(plan, b, jax.random.key(cfg.seed)),
                       out_shardings=lora.adapter_shardings(plan, param_shardings(model, mesh)))(base)

    return Steps(train=j.train, evaluate=j.evaluate, tx=j.tx, shardings=j.shardings, init_params=init_params,
                 param_shapes=j.param_shapes,
                 export=lambda trained, tokenizer: export_adapter(plan, model, trained, tokenizer, cfg),
                 frozen={"base": base, "start": start if continued else None, "task": frozen_params},
                 accum=cfg.gradient_accumulation_steps)


# ---------------------------------------------------------------------------
# the loop


def run(task: Task, cfg: TrainingConfig) -> dict[str, float]:
    """Trains per `cfg`; returns the last evaluation's metrics ({} without an eval split)."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    primary = jax.process_index() == 0
    ckpt_dir = os.path.join(cfg.output_dir, CHECKPOINTS)
    resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    if resume is None and (existing := complete_steps(ckpt_dir)):
        raise RunError(f"{ckpt_dir} already holds checkpoints {existing}: set resume_from_checkpoint=true to "
                       f"continue that run, or choose another output_dir")
    checkpointer = Checkpointer(ckpt_dir, save_total_limit=cfg.save_total_limit)

    model = build_model(cfg, task.head, task.configure_model)
    tokenizer = load_tokenizer(tokenizer_spec(cfg))
    processor = Processor(model.config, tokenizer, task.processor_config(cfg))
    source = task.source(cfg, cfg.data.dataset_train_split)
    procs = jax.process_count()
    step_rows = (task.step_rows(cfg, mesh) if task.step_rows is not None
                 else cfg.per_device_train_batch_size * batch_shards(mesh) * cfg.gradient_accumulation_steps)
    total, epoch_rows = plan_steps(cfg, source, step_rows)
    steps = (task.build_steps or make_steps)(task, cfg, model, mesh, total)
    tx, shardings, accum = steps.tx, steps.shardings, steps.accum

    if resume is None:
        state, data = init_state(steps.init_params(), tx, cfg.seed, shardings), None
    else:
        directory, step = resume
        target = abstract_state(shardings, steps.param_shapes, tx)
        if os.path.abspath(directory) == checkpointer.directory:  # resume_from_checkpoint=true: output_dir's own
            state, data, saved_cfg = checkpointer.restore(step, target)
        else:
            other = Checkpointer(directory, read_only=True)
            state, data, saved_cfg = other.restore(step, target)
            other.close()
        changed = {k for k, v in to_dict(cfg).items() if saved_cfg.get(k) != v and k != "resume_from_checkpoint"}
        log.info("resumed from %s/%d%s", directory, step, f" (config changed: {sorted(changed)})" if changed else "")

    loader = Loader(source, processor, processor.collate, batch_size=step_rows // procs, seed=cfg.seed,
                    shuffle_buffer=cfg.data.shuffle_buffer, on_bad_record=cfg.data.on_bad_record,
                    state=data["loaders"][jax.process_index()] if data else None)
    eval_rows = cfg.per_device_eval_batch_size * batch_shards(mesh) // procs
    eval_data = None  # processed on first use

    start = int(jax.device_get(state.step))
    interval = IntervalMeans(data["interval"] if data else None)
    num_tokens = data["num_tokens"] if data else 0
    writer = MetricsWriter(cfg.output_dir, resume_step=start if resume else None, enabled=primary)
    if primary:
        write_config(cfg)
    pending: list[tuple[int, dict]] = []
    last_eval: dict[str, float] = {}

    def epoch(s: int) -> float:
        return s * step_rows / epoch_rows if epoch_rows else float(loader.state()["epoch"])

    def flush():
        """Checks and accumulates every pending step's metrics."""
        nonlocal num_tokens
        for s, m in jax.device_get(pending):
            m = {k: float(v) for k, v in m.items()}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                checkpointer.wait()
                saved = checkpointer.latest_step()
                raise NonFiniteError(
                    f"step {s}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; stopping without "
                    f"saving. The last checkpoint ({'none' if saved is None else f'{ckpt_dir}/{saved}'}) predates "
                    f"it and is untouched: lower learning_rate or check the data, then resume from it.")
            num_tokens += int(m["num_tokens"])
            m["num_tokens"] = num_tokens
            interval.add(m)
        pending.clear()

    def evaluate(s: int):
        """The eval split's loss statistics (exact sums over the split), and the task's host-side
        metrics (e.g. PPO's sampled responses scored by the judge)."""
        nonlocal eval_data, last_eval
        t0, last_eval, rows = time.perf_counter(), {}, 0
        if steps.evaluate is not None:
            if eval_data is None:
                eval_data = eval_batches(cfg, processor, eval_rows, task.source(cfg, cfg.data.dataset_test_split))
            stats = None
            for host in eval_data:
                out = jax.device_get(steps.stats(state.params, device_batch(host, mesh, None)))
                stats = out if stats is None else stats.merge(out)
            rows = int(sum(b["valid"].sum() for b in eval_data)) * procs
            last_eval = {f"eval_{k}": float(v) for k, v in stats.report().items()}
        if steps.host_eval is not None:
            extra = steps.host_eval(state.params, s)
            extra_rows = int(extra.pop("rows", 0))  # prompts the host evaluation read
            rows = rows or extra_rows
            last_eval.update({f"eval_{k}": float(v) for k, v in extra.items()})
        elapsed = time.perf_counter() - t0
        writer.write({"step": s, "epoch": epoch(s), **last_eval, "eval_runtime": elapsed,
                      "eval_samples_per_second": rows / elapsed})
        log.info("step %d: %s", s, " ".join(f"{k}={v:.4g}" for k, v in last_eval.items()))

    from tqdm import tqdm

    from jaxpref.profile import count_chips, device_spec

    spec = device_spec(jax.devices()[0].device_kind)
    peak = spec[0] * count_chips(jax.devices()) if spec else None
    trace = cfg.profile_steps
    tracing = False
    bar = tqdm(total=total, initial=start, disable=not primary, unit="step", dynamic_ncols=True)
    t0, batches = time.perf_counter(), iter(loader)
    timed = None  # (time, step) the step timing counts from: after the first step, which compiles
    try:
        for s in range(start + 1, total + 1):
            if trace and s == trace[0]:
                jax.profiler.start_trace(os.path.join(cfg.output_dir, "trace"))
                tracing = True
            batch = device_batch(next(batches), mesh, accum)
            state, metrics = steps.step(state, batch)
            pending.append((s, metrics))
            if tracing and s == trace[1] - 1:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
            if timed is None:
                jax.block_until_ready(metrics)
                timed = (time.perf_counter(), s)
            bar.update(1)
            last = s == total
            if s % cfg.logging_steps == 0 or last:
                flush()
                record = interval.pop()
                now = time.perf_counter()
                if s > timed[1]:
                    record["step_seconds"] = (now - timed[0]) / (s - timed[1])
                    if peak and task.step_flops is not None:
                        shapes = {k: v.shape for k, v in batch.items()}
                        flops = sum(task.step_flops(cfg, model.config, shapes).values())
                        record["mfu"] = flops / record["step_seconds"] / peak
                    timed = (now, s)
                writer.write({"step": s, "epoch": epoch(s), **record})
                rate = (s - start) * step_rows / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_per_s=f"{rate:.1f}")
            if cfg.data.dataset_test_split is not None and ((cfg.eval_steps and s % cfg.eval_steps == 0) or last):
                flush()
                evaluate(s)
            if s % cfg.save_steps == 0 or last:
                flush()
                checkpointer.save(s, state, {"loaders": gather_json(loader.state()), "num_tokens": num_tokens,
                                             "interval": interval.state()}, to_dict(cfg))
        flush()
        elapsed = time.perf_counter() - t0
        if total > start:
            writer.write({"step": total, "epoch": epoch(total), "train_runtime": elapsed,
                          "train_samples_per_second": (total - start) * step_rows / elapsed,
                          "train_steps_per_second": (total - start) / elapsed})
        checkpointer.wait()
        steps.export(state.params, tokenizer)
    finally:
        if tracing:
            jax.profiler.stop_trace()
        bar.close()
        writer.close()
        checkpointer.close()
    return last_eval
