"""DPO for VLMs (TRL's DPOTrainer): the policy against a frozen reference, on preference pairs.

    jaxpref dpo --config jaxpref/tasks/shapes/configs/dpo.yaml [key=value ...]

One forward pass per micro-batch: each pair's images are encoded once, then prompt + chosen and
prompt + rejected run interleaved on the batch axis (rows 2i and 2i + 1 are pair i, so every
device keeps its own pairs). PaliGemma's completions are suffix tokens (token_type_ids 1):
they attend causally, so no completion token sees a later one.

The reference's log-probs come either from the frozen reference inside the same jitted step
(its params are an extra, never-donated argument, sharded like the policy's), or, with
`precompute_ref_log_probs`, from one pass of the reference over the train and eval splits
before training. That pass stores each row's values by its position (shard, row) in
output_dir/ref_logps/{split}.npz; the rows then carry them as two columns wherever the loader
reads them, so shuffling, multi-host sharding and exact resume are unchanged. The reference is
freed before training starts; a resumed run reuses the stored values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.config import ConfigError, DPOConfig
from jaxpref.data.errors import BadRecordError
from jaxpref.data.processing import Processor, ProcessorConfig
from jaxpref.data.sources import Source, assign_shards, open_source
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.models import VLM
from jaxpref.objectives.dpo import completion_logps, dpo_objective
from jaxpref.profile import text_flops, vision_flops
from jaxpref.sequence import pair_forward
from jaxpref.sharding import make_mesh, on_mesh, param_shapes, param_shardings, placed_shapes
from jaxpref.train.checkpoint import gather_json
from jaxpref.train.loop import (DTYPES, Task, build_model, device_batch, load_params, model_config, pad_rows, passes,
                                run, tokenizer_spec)
from jaxpref.train.reward import count_tokens

log = logging.getLogger(__name__)

REF_DIR = "ref_logps"
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


# ---------------------------------------------------------------------------
# the forward pass and the loss


def pair_logits(params, batch: dict, *, model: VLM):
    """The model's logits over both sequences of every pair from the last prompt position on, and the
    sequence they score, cut to the same window (jaxpref.sequence.pair_forward with completions_only:
    logits [2B, Lc + 1, V], rows interleaved): the prompt's logits are never computed."""
    return pair_forward(model, params, batch, completions_only=True)


def reference_logps(ref_params, batch: dict, *, model: VLM):
    """(ref_chosen_logps float32[B], ref_rejected_logps float32[B]) under the frozen reference."""
    logits, seq = pair_logits(jax.lax.stop_gradient(ref_params), batch, model=model)
    r = completion_logps(logits, seq["input_ids"], seq["completion_mask"]).reshape(-1, 2)
    return r[:, 0], r[:, 1]


def loss_fn(params, batch: dict, frozen=None, *, model: VLM, cfg: DPOConfig):
    """(loss_sum, Stats) of one micro-batch. The reference log-probs are the batch's
    ref_chosen_logps / ref_rejected_logps (precomputed) or come from `frozen` (the reference's params)."""
    if "ref_chosen_logps" in batch:
        ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif frozen is not None:
        ref_c, ref_r = reference_logps(frozen, batch, model=model)
    else:
        raise ValueError("DPO needs the reference: precomputed ref_*_logps in the batch, or its params")
    logits, seq = pair_logits(params, batch, model=model)
    return dpo_objective(logits, seq["input_ids"], seq["completion_mask"], ref_c, ref_r, batch["valid"],
                         beta=cfg.beta, loss_type=cfg.loss_type, loss_weights=cfg.loss_weights,
                         label_smoothing=cfg.label_smoothing)


def processor_config(cfg: DPOConfig) -> ProcessorConfig:
    return ProcessorConfig(kind="preference", max_prompt_length=cfg.max_prompt_length,
                           max_completion_length=cfg.max_completion_length, max_length=cfg.max_length,
                           truncation_mode=cfg.truncation_mode, num_images=cfg.data.num_images,
                           length_buckets=cfg.data.length_buckets)


# ---------------------------------------------------------------------------
# the reference model


def reference_spec(cfg: DPOConfig) -> str:
    """What the reference is: ref_model, else the weights training starts from."""
    return cfg.ref_model or cfg.model.name_or_path


def load_reference(cfg: DPOConfig, model: VLM, mesh):
    """(params, shardings) of the frozen reference on `mesh`, in cfg.frozen_dtype. A preset is
    initialised from cfg.seed, like the policy; a directory must hold the policy's architecture."""
    spec = reference_spec(cfg)
    if model_config(spec, "ref_model") != model.config:
        what = spec if os.path.isdir(spec) else f"preset {spec!r}"
        raise ConfigError(f"ref_model: {what} is not the policy's architecture ({cfg.model.name_or_path})")
    ref = model.clone(head="lm", dtype=DTYPES[cfg.frozen_dtype])
    return load_params(spec, ref, cfg.frozen_dtype, mesh, cfg.seed), param_shardings(model, mesh)


def frozen_reference(cfg: DPOConfig, mesh, abstract: bool = False):
    """The Task hook: the reference's params for the step, unless they were precomputed or come from
    LoRA's base (use_peft without ref_model: the base with adapters off, as TRL does); with
    `abstract`, their shapes (in cfg.frozen_dtype, carrying their shardings), nothing loaded."""
    if cfg.precompute_ref_log_probs or (cfg.model.use_peft and cfg.ref_model is None):
        return None
    model = build_model(cfg, "lm")
    if abstract:
        shardings = param_shardings(model, mesh)
        shapes = param_shapes(model.clone(dtype=DTYPES[cfg.frozen_dtype]))
        return placed_shapes(shapes, shardings), shardings
    return load_reference(cfg, model, mesh)


# ---------------------------------------------------------------------------
# precompute_ref_log_probs


def ref_table_path(cfg: DPOConfig, split: str) -> str:
    return os.path.join(cfg.output_dir, REF_DIR, f"{split}.npz")


def fingerprint(cfg: DPOConfig, source: Source) -> str:
    """What a stored table is valid for: the reference, the data (shards) and the processing."""
    what = {"reference": os.path.abspath(reference_spec(cfg)) if os.path.isdir(reference_spec(cfg))
            else reference_spec(cfg), "seed": cfg.seed, "shards": [os.path.abspath(s) for s in source.shards],
            "processor": repr(processor_config(cfg)), "tokenizer": tokenizer_spec(cfg), "dtype": cfg.model.dtype,
            "bf16": cfg.bf16}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def read_ref_table(path: str) -> tuple[str, dict[tuple[int, int], tuple[float, float]]]:
    """(fingerprint, {(shard, row): (ref_chosen_logps, ref_rejected_logps)}) of a stored table."""
    with np.load(path, allow_pickle=False) as z:
        table = {(int(s), int(r)): (float(c), float(j))
                 for s, r, c, j in zip(z["shard"], z["row"], z["chosen"], z["rejected"])}
        return str(z["fingerprint"]), table


def _rows_with_positions(source: Source, processor: Processor, on_bad_record: str):
    """This process's rows of every shard, in file order: ((shard, row), example); bad rows are
    raised (on_bad_record='error') or dropped, as the training loader would."""
    shards, stride = assign_shards(list(range(len(source.shards))), jax.process_index(), jax.process_count())
    keep, read = jax.process_index() if stride > 1 else 0, 0
    for shard in shards:
        for row_index, row in source.read(shard):
            read += 1
            if (read - 1) % stride != keep:
                continue
            try:
                yield (shard, row_index), processor(row)
            except BadRecordError as e:
                if on_bad_record == "error":
                    raise e.at(f"shard {source.shards[shard]}, row {row_index}") from e.__cause__


def compute_ref_table(cfg: DPOConfig, split: str, ref_params, model: VLM, processor: Processor, mesh):
    """Runs the reference over `split` in batches: {(shard, row): (chosen, rejected)} for every
    process's rows (all processes get the whole table)."""
    from tqdm import tqdm

    from jaxpref.train.state import batch_sharding

    source = open_source(cfg.data.dataset_name, split)
    rows = cfg.per_device_eval_batch_size * int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    local = rows // jax.process_count()
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @partial(jax.jit, in_shardings=(param_shardings(model, mesh), batch_sharding(mesh)), out_shardings=replicated)
    @partial(on_mesh, mesh=mesh)
    def logps(params, batch):
        c, r = reference_logps(params, batch, model=model)
        return batch["position"], batch["valid"], c, r

    def batches():
        chunk = []
        for pos, example in _rows_with_positions(source, processor, cfg.data.on_bad_record):
            chunk.append((pos, example))
            if len(chunk) == local:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    host_batches = []
    for chunk in batches():
        b = pad_rows(processor.collate([e for _, e in chunk]), local)
        b["position"] = np.asarray([p for p, _ in chunk] + [chunk[0][0]] * (local - len(chunk)), np.int32)
        host_batches.append(b)
    most = max(gather_json(len(host_batches)))
    if most == 0:
        raise ValueError(f"{source}: no usable rows in split {split!r}")
    table = {}
    total = sum(source.num_rows(i) or 0 for i in range(len(source.shards))) or None
    bar = tqdm(total=total, desc=f"reference log-probs ({split})", unit="row", disable=jax.process_index() != 0)
    for i in range(most):
        host = host_batches[i] if i < len(host_batches) else {**host_batches[0], "valid": np.zeros(local, np.float32)}
        pos, valid, c, r = jax.device_get(logps(ref_params, device_batch(host, mesh, None)))
        for (s, row), v, x, y in zip(pos.tolist(), valid, c, r):
            if v:
                table[(s, row)] = (float(x), float(y))
        bar.update(int(valid.sum()))
    bar.close()
    return source, table


def write_ref_table(path: str, fp: str, table: dict):
    keys = sorted(table)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=np.asarray(fp), shard=np.asarray([k[0] for k in keys], np.int32),
             row=np.asarray([k[1] for k in keys], np.int64),
             chosen=np.asarray([table[k][0] for k in keys], np.float32),
             rejected=np.asarray([table[k][1] for k in keys], np.float32))
    os.replace(tmp, path)  # a crash never leaves a partial table behind


def precompute_reference(cfg: DPOConfig):
    """Stores the reference's log-probs of the train (and eval) split in output_dir/ref_logps/,
    unless a table for the same reference, data and processing is there already; then frees the
    reference."""
    splits = [s for s in (cfg.data.dataset_train_split, cfg.data.dataset_test_split) if s is not None]
    todo = []
    for split in splits:
        path = ref_table_path(cfg, split)
        fp = fingerprint(cfg, open_source(cfg.data.dataset_name, split))
        if os.path.exists(path) and read_ref_table(path)[0] == fp:
            log.info("reference log-probs of %r: reusing %s", split, path)
        else:
            todo.append((split, path, fp))
    if not todo:
        return
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    model = build_model(cfg, "lm")
    compute = model.clone(dtype=jnp.bfloat16 if cfg.bf16 else model.dtype)
    processor = Processor(model.config, load_tokenizer(tokenizer_spec(cfg)), processor_config(cfg))
    ref_params, _ = load_reference(cfg, model, mesh)
    for split, path, fp in todo:
        _, table = compute_ref_table(cfg, split, ref_params, compute, processor, mesh)
        if jax.process_index() == 0:
            write_ref_table(path, fp, table)
        log.info("reference log-probs of %r: %d rows -> %s", split, len(table), path)
    jax.tree.map(lambda x: x.delete(), ref_params)  # the reference is not needed again
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxpref-dpo-ref-logps")


class WithRefLogps(Source):
    """A source whose rows carry the stored reference log-probs of their position."""

    def __init__(self, source: Source, table: dict):
        self.inner, self.table = source, table
        self.name, self.shards = source.name, source.shards

    def read(self, shard, start=0):
        for row_index, row in self.inner.read(shard, start):
            values = self.table.get((shard, row_index))
            # a row missing from the table was a bad record in the precompute pass: it stays one
            yield row_index, row if values is None else {**row, **dict(zip(REF_COLUMNS, values))}

    def num_rows(self, shard):
        return self.inner.num_rows(shard)

    def columns(self):
        return {**self.inner.columns(), **{c: "float32" for c in REF_COLUMNS}}


def open_split(cfg: DPOConfig, split: str) -> Source:
    """The Task hook: the split's rows, with the stored reference log-probs when precomputed."""
    source = open_source(cfg.data.dataset_name, split)
    if not cfg.precompute_ref_log_probs:
        return source
    fp, table = read_ref_table(ref_table_path(cfg, split))
    if fp != fingerprint(cfg, source):
        raise ValueError(f"{ref_table_path(cfg, split)} was computed for another reference, data or processing")
    return WithRefLogps(source, table)


def step_flops(cfg: DPOConfig, mc, shapes: dict) -> dict[str, float]:
    """The policy's forward and backward over both sequences of [A, B] pairs, the LM head from the
    last prompt position on; the reference's forward unless its log-probs were precomputed."""
    a, b, lp = shapes["prompt_ids"]
    lc = shapes["chosen_ids"][2]
    rows, images = a * b, a * b * shapes["pixel_values"][2]
    text = text_flops(mc, 2 * rows, lp + lc, head_positions=lc + 1)
    tower, trained = passes(cfg)
    out = {"policy": tower * vision_flops(mc, images) + trained * text}
    if not cfg.precompute_ref_log_probs:
        out["reference"] = vision_flops(mc, images) + text
    return out


TASK = Task(head="lm", processor_config=processor_config,
            make_loss=lambda model, cfg: partial(loss_fn, model=model, cfg=cfg), count_tokens=count_tokens,
            frozen=frozen_reference, open_split=open_split, step_flops=step_flops, lora_reference=True)


def run_dpo(cfg: DPOConfig) -> dict[str, float]:
    """Trains per cfg; the policy lands in cfg.output_dir. Returns the last eval metrics."""
    if cfg.precompute_ref_log_probs:
        precompute_reference(cfg)
    return run(TASK, cfg)
