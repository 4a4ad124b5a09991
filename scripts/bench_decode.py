"""Decode step time of jaxpref's sampler: ms per generated token of one batch, prefill excluded.

    .venv/bin/python scripts/bench_decode.py [--config small] [--batch 32] [--prompt-text 512] [--new-tokens 64]

Greedy, no stop token, random weights (jaxpref.models.init_params, seed 0), left-padded prompts of
image tokens + bos + --prompt-text tokens. decode ms/step = (best time(N) - best time(1)) / (N - 1),
each the best of --iters calls after a warm-up call. It uses only `jaxpref.generate.generate`, so
the same script times any commit: run it from two checkouts in turn (A B A B) for a ratio.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxpref.generate import generate  # noqa: E402
from jaxpref.models import VLM, get_preset, init_params  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-text", type=int, default=512, help="text tokens after the image tokens + bos")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    cfg = get_preset(args.config)
    model = VLM(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    n = cfg.num_image_tokens
    ids = np.concatenate([np.full((args.batch, n), cfg.image_token_index), np.full((args.batch, 1), cfg.bos_token_id),
                          rng.integers(5, cfg.text.vocab_size, (args.batch, args.prompt_text))], 1).astype(np.int32)
    px = rng.uniform(-1, 1, (args.batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)

    def best(k: int) -> float:
        def call():
            return generate(model, params, pixel_values=px, input_ids=ids, attention_mask=np.ones_like(ids),
                            max_new_tokens=k, greedy=True, eos_token_id=[], pad_token_id=cfg.pad_token_id,
                            rng=jax.random.key(0)).tokens

        jax.block_until_ready(call())
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - t0)
        return min(times)

    one, many = best(1), best(args.new_tokens)
    step = (many - one) / (args.new_tokens - 1)
    print(f"{args.config} B={args.batch} S={ids.shape[1] + args.new_tokens - 1}: prefill {one * 1e3:.1f} ms, "
          f"decode {step * 1e3:.2f} ms/step, {args.batch / step:.0f} tokens/s while decoding")


if __name__ == "__main__":
    main()
