"""Training-step time of the `small` preset: jaxpref's flattened Dense layers vs flax's nn.DenseGeneral.

    .venv/bin/python scripts/bench_dense.py [--iters 5]

jaxpref.models.layers.Dense computes every linear layer (and decoder.attend the tied LM head) as one
2-D matmul over the flattened leading dims. Flax's nn.DenseGeneral contracts [B, T, ...] directly; on
XLA:CPU the kernel's gradient then contracts two dims (B and T), and the compiled backward pass
transposes the larger operand inside an elementwise loop fusion. Both variants have the same
parameters, initialised identically, and give the same logits: the baseline is built here by pointing
`layers.Dense` (the class `layers.dense` builds) at nn.DenseGeneral, which takes the same arguments, and
`Decoder.attend` at an unflattened one, for the comparison alone.

Cases (synthetic batches of the demo's shapes; one image per row, 64 image tokens):
  pretrain  SFT loss, tower frozen, 32 rows: prompt 96 + completion 16 tokens (jaxpref/tasks/shapes/configs/pretrain.yaml)
  sft       SFT loss, tower frozen, 16 rows: prompt 80 + completion 64 tokens (jaxpref/tasks/shapes/configs/sft.yaml)
  tower     the vision tower's backward pass alone, 64 images (jaxpref tower trains it)
Each: the jitted forward (loss) and the jitted step (loss gradient + AdamW), best of --iters calls
after a warm-up call. The two variants are timed in one run, interleaved case by case.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxpref.models import VLM, get_preset  # noqa: E402
from jaxpref.models import decoder, layers  # noqa: E402
from jaxpref.objectives.sft import sft_loss  # noqa: E402
from jaxpref.sharding import init_sharded, make_mesh  # noqa: E402

CASES = {"pretrain": (32, 96, 16), "sft": (16, 80, 64), "tower": (64, 0, 0)}


FLAT_DENSE, FLAT_ATTEND = layers.Dense, decoder.Decoder.attend


def use_variant(name: str):
    """Points `layers.dense` at the flattened Dense ("Dense") or at nn.DenseGeneral ("DenseGeneral")."""
    flat = name == "Dense"
    layers.Dense = FLAT_DENSE if flat else nn.DenseGeneral
    decoder.Decoder.attend = FLAT_ATTEND if flat else (lambda self, x: self.embed.attend(x))


def batch(cfg, rows: int, prompt: int, completion: int):
    n = cfg.num_image_tokens
    rng = np.random.default_rng(0)
    px = rng.random((rows, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
    if not prompt:
        return (px,)
    t = prompt + completion
    ids = rng.integers(5, cfg.text.vocab_size, (rows, t)).astype(np.int32)
    ids[:, :n] = cfg.image_token_index
    token_types = np.zeros((rows, t), np.int32)
    token_types[:, prompt:] = 1
    return px, ids, np.ones((rows, t), np.int32), token_types


def make_fns(case: str, cfg):
    rows = CASES[case][0]
    if case == "tower":
        model = VLM(cfg, head="lm")

        def loss(params, px):
            feats = model.apply({"params": params}, px, method=VLM.encode_images)
            return jnp.mean(feats ** 2)
    else:
        model = VLM(cfg, head="lm", freeze_vision=True)

        def loss(params, px, ids, mask, token_types):
            out = model.apply({"params": params}, px, ids, mask, token_types)
            return sft_loss(out.logits, ids, mask, token_types, jnp.ones(rows, jnp.float32))[0]

    tx = optax.adamw(1e-3)

    def step(params, opt, *b):
        value, grads = jax.value_and_grad(loss)(params, *b)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    params = init_sharded(model, jax.random.key(0), make_mesh(1, 1, 1))
    return jax.jit(loss), jax.jit(step), params, tx.init(params)


def best_time(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    cfg = get_preset("small")
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cores")
    print(f"{'case':9s} {'variant':13s} {'forward ms':>11s} {'step ms':>9s}")
    for case, shape in CASES.items():
        b = batch(cfg, *shape)
        steps = {}
        for variant in ("DenseGeneral", "Dense"):
            use_variant(variant)
            forward, step, params, opt = make_fns(case, cfg)
            fwd = best_time(forward, (params, *b), args.iters)
            steps[variant] = best_time(step, (params, opt, *b), args.iters)
            print(f"{case:9s} {variant:13s} {fwd * 1e3:11.1f} {steps[variant] * 1e3:9.1f}", flush=True)
        print(f"{case:9s} step time DenseGeneral / Dense: {steps['DenseGeneral'] / steps['Dense']:.2f}x")
    use_variant("Dense")


if __name__ == "__main__":
    main()
