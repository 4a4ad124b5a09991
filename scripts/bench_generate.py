"""Sampler throughput: jaxpref's KV-cache `generate` vs transformers' `generate` vs a no-cache loop.

    .venv/bin/python scripts/bench_generate.py [--configs small,large] [--batch 8] [--new-tokens 64,32]

Same random weights (saved once with jaxpref.models.save_pretrained, read by
transformers.AutoModelForImageTextToText), same left-padded batch (image + prompt), same number
of new tokens: greedy, no early stop (jaxpref: no stop token; transformers: min_new_tokens = N).
Generated tokens/s = batch * N / wall time of one full call (prefill included), best of --iters.
Prefill = a call with N = 1; decode ms/step = (time(N) - time(1)) / (N - 1). jaxpref's compile
time = its first call minus a warm call. The no-cache baseline is a jitted
loop that re-runs the whole fixed-length sequence every step (images encoded once).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpref.generate import generate, lm_logits  # noqa: E402
from jaxpref.models import VLM, TextConfig, get_preset, init_params, save_pretrained  # noqa: E402
from jaxpref.models.vlm import default_positions  # noqa: E402

CONFIGS = {
    "small": get_preset("small"),  # 4 layers, hidden 256, vocab 1024, 64 image tokens
    "large": get_preset("small").replace(text=TextConfig(
        kind="gemma", vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=1, head_dim=128)),
}


def prompts(cfg, batch: int, text: int, seed: int = 0):
    """Left-padded rows: image tokens, bos, 1..text random tokens."""
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens
    tp = n + 1 + text
    ids = np.full((batch, tp), cfg.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for r in range(batch):
        k = text - (r * text) // (2 * batch)  # lengths from text down to text/2
        row = np.concatenate([[cfg.image_token_index] * n, [cfg.bos_token_id], rng.integers(5, cfg.text.vocab_size, k)])
        ids[r, tp - len(row):], mask[r, tp - len(row):] = row, 1
    px = rng.uniform(-1, 1, (batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return px, ids, mask


def no_cache_generate(model: VLM, params, px, ids, mask, n: int):
    """Greedy, N tokens, no KV cache: every step runs the full [B, Tp + N] sequence (later slots masked)."""
    b, tp = ids.shape
    feats = model.apply({"params": params}, px, method=VLM.encode_images)
    seq = jnp.concatenate([ids, jnp.full((b, n), model.config.pad_token_id, ids.dtype)], 1)
    tt = jnp.concatenate([jnp.zeros_like(ids), jnp.ones((b, n), ids.dtype)], 1) if model.config.prefix_lm else None

    def step(t, seq):
        m = jnp.concatenate([mask, jnp.broadcast_to(jnp.arange(n) < t, (b, n)).astype(mask.dtype)], 1)
        out = model.apply({"params": params}, None, seq, m, tt, default_positions(m, model.config.position_offset),
                          image_features=feats)
        h = jax.lax.dynamic_slice_in_dim(out.hidden, tp + t - 1, 1, axis=1)[:, 0]
        tok = jnp.argmax(model.apply({"params": params}, h, method=lm_logits), -1).astype(seq.dtype)
        return jax.lax.dynamic_update_slice(seq, tok[:, None], (0, tp + t))

    return jax.lax.fori_loop(0, n, step, seq)[:, tp:]


def timed(fns: dict, iters: int, warm: bool = True) -> dict:
    """{name: best seconds over `iters` rounds}; each round calls every fn once, in turn, so that
    load from other processes hits all of them alike. warm: call each fn once before, untimed."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values() if warm else ():
        jax.block_until_ready(fn())
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bench(name: str, batch: int, text: int, n: int, iters: int) -> dict:
    import torch
    import transformers

    cfg = CONFIGS[name]
    model = VLM(cfg)
    params = init_params(model, jax.random.key(0))
    px, ids, mask = prompts(cfg, batch, text)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, params, d)
        tm = transformers.AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32).eval()

    def ours(k):
        return generate(model, params, pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=k,
                        greedy=True, eos_token_id=[], pad_token_id=cfg.pad_token_id, rng=None).tokens

    kw = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
              token_type_ids=torch.zeros(ids.shape, dtype=torch.long), do_sample=False, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)

    def hf(k):
        with torch.no_grad():
            return tm.generate(**kw, max_new_tokens=k, min_new_tokens=k)[:, ids.shape[1]:].numpy()

    t0 = time.perf_counter()
    out = np.asarray(ours(n))
    first = time.perf_counter() - t0  # compile + run
    hf_out = hf(n)
    assert hf_out.shape == (batch, n)
    t = timed({"ours": lambda: ours(n), "ours1": lambda: ours(1), "hf": lambda: hf(n), "hf1": lambda: hf(1)}, iters)
    jx, jx1, th, th1 = t["ours"], t["ours1"], t["hf"], t["hf1"]
    nc_fn = jax.jit(no_cache_generate, static_argnums=(0, 5))
    t0 = time.perf_counter()
    nc_out = np.asarray(nc_fn(model, params, px, ids, mask, n))
    nc_first = time.perf_counter() - t0
    nc = timed({"nc": lambda: nc_fn(model, params, px, ids, mask, n)}, 1, warm=False)["nc"]  # slow: one call
    tokens = batch * n
    return dict(config=name, batch=batch, prompt=ids.shape[1], new=n, compile=first - jx, jaxpref=tokens / jx,
                transformers=tokens / th, no_cache=tokens / nc, no_cache_compile=nc_first - nc,
                prefill=(jx1, th1), step=((jx - jx1) / (n - 1), (th - th1) / (n - 1)),
                cache_equals_no_cache=bool((out == nc_out).all()), agree_hf=float((out == hf_out).mean()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="small,large")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-text", type=int, default=16, help="max text tokens after the image tokens + bos")
    p.add_argument("--new-tokens", default="64,32", help="new tokens per config (comma list, one per config)")
    p.add_argument("--iters", type=int, default=3, help="timed calls after warm-up; the best counts (default 3)")
    args = p.parse_args()
    names = args.configs.split(",")
    news = [int(x) for x in args.new_tokens.split(",")]
    news = news + news[-1:] * (len(names) - len(news))
    import torch

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{len(jax.devices())}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f} (other processes skew every number)")
    rows = [bench(name, args.batch, args.prompt_text, n, args.iters) for name, n in zip(names, news)]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    head = ("config", "batch", "prompt", "new", "jaxpref tok/s", "transformers tok/s", "ratio",
            "prefill ms (jaxpref / HF)", "decode ms/step (jaxpref / HF)", "no-cache tok/s", "cache / no-cache",
            "jaxpref compile s", "same tokens cache vs no-cache", "tokens equal to HF")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['prompt']} | {r['new']} | {r['jaxpref']:.0f} | "
              f"{r['transformers']:.0f} | {r['jaxpref'] / r['transformers']:.1f}x | "
              f"{r['prefill'][0] * 1e3:.0f} / {r['prefill'][1] * 1e3:.0f} | "
              f"{r['step'][0] * 1e3:.1f} / {r['step'][1] * 1e3:.1f} | {r['no_cache']:.0f} | "
              f"{r['jaxpref'] / r['no_cache']:.1f}x | {r['compile']:.1f} | "
              f"{'yes' if r['cache_equals_no_cache'] else 'NO'} | {r['agree_hf']:.0%} |")


if __name__ == "__main__":
    main()
