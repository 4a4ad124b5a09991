"""Can a fresh decoder learn to find a shape named by its kind and color, over a frozen tower? A probe
for model variants (docs/TRAINING.md, session 29): `scripts/probe_grounding.py`'s `where3` ("Quick
question: where is the red circle?" on three-shape scenes, chance 1/3) or `exists3` rows, AdamW with
25 warmup steps and a cosine, held-out exact-answer accuracy (teacher-forced argmax over every
completion token) every 50 steps.

    python scripts/probe_binding.py --tower runs/s28/main/runs/tower             # the `small` decoder
    python scripts/probe_binding.py --tower runs/s28/main/runs/tower --nopos     # image tokens at one position
    python scripts/probe_binding.py --tower runs/s28/main/runs/tower --kv 4 --layers 8
"""
import argparse
import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_grounding import _batch, generated_row  # noqa: E402
from jaxpref.data.processing import Processor, ProcessorConfig, concat_prompt_completion  # noqa: E402
from jaxpref.data.tokenizer import load_tokenizer  # noqa: E402
from jaxpref.models import VLM  # noqa: E402
from jaxpref.models.hf import load_pretrained  # noqa: E402
from jaxpref.models.vlm import dummy_inputs, default_positions  # noqa: E402
from jaxpref.objectives.sft import sft_loss  # noqa: E402
from jaxpref.train.sft import images  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--tower", required=True, help="a `jaxpref tower` directory (its vision weights are used)")
p.add_argument("--task", default="where3", choices=["where3", "exists3"])
p.add_argument("--kv", type=int, default=1)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--nopos", action="store_true", help="every image token at one position")
p.add_argument("--steps", type=int, default=400)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=32)
a = p.parse_args()

tmodel, tparams = load_pretrained(a.tower, "float32")
cfg = tmodel.config
cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_key_value_heads=a.kv, num_hidden_layers=a.layers))
model = VLM(cfg)
params = nn.meta.unbox(model.init(jax.random.key(0), *dummy_inputs(cfg))["params"])
params = {**params, "vision": tparams["vision"]}
processor = Processor(cfg, load_tokenizer("shapes"), ProcessorConfig(kind="sft", length_buckets=(16, 96)))
eval_rng, rng = np.random.default_rng(123), np.random.default_rng(0)
held = [_batch(processor, [generated_row(eval_rng, a.task, "eval") for _ in range(64)]) for _ in range(4)]

def forward(p, b):
    seq = concat_prompt_completion(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"])
    pos = default_positions(seq["attention_mask"], cfg.position_offset)
    if a.nopos:
        is_img = seq["input_ids"] == cfg.image_token_index
        first = jnp.min(jnp.where(is_img, pos, 10**6), axis=1, keepdims=True)
        pos = jnp.where(is_img, first, pos)
    logits = model.apply({"params": p}, images(b), seq["input_ids"], seq["attention_mask"], seq["token_type_ids"],
                         position_ids=pos).logits
    return logits, seq

def loss(p, b):
    logits, seq = forward(p, b)
    l, _ = sft_loss(logits, seq["input_ids"], seq["attention_mask"], seq["completion_mask"], b["valid"])
    return l

warmup = min(25, a.steps // 4)
tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, a.lr, warmup, max(a.steps, warmup + 1)),
                 weight_decay=0.0)
opt = tx.init(params)

@jax.jit
def step(p, o, b):
    l, g = jax.value_and_grad(loss)(p, b)
    g = {**g, "vision": jax.tree.map(jnp.zeros_like, g["vision"])}
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l

@jax.jit
def exact(p, b):
    logits, seq = forward(p, b)
    pred = jnp.argmax(logits[:, :-1], -1)
    tgt = seq["input_ids"][:, 1:]
    m = seq["completion_mask"][:, 1:] > 0
    return jnp.all((pred == tgt) | ~m, axis=1).mean()

t0 = time.perf_counter()
for s in range(a.steps + 1):
    if s % 50 == 0 or s == a.steps:
        acc = float(np.mean([exact(params, b) for b in held]))
        print(f"{vars(a)} step {s} exact {acc:.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    if s == a.steps:
        break
    params, opt, l = step(params, opt, _batch(processor, [generated_row(rng, a.task, "train") for _ in range(a.batch)]))
