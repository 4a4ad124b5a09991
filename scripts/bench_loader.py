"""Loader throughput: examples/s with image decode + processing, next to a training step's appetite.

    .venv/bin/python scripts/bench_loader.py [--batch 8] [--rows 512]

Cases (parquet shards written to a temp dir, read back through Loader with a prefetch thread):
  shapes-64     the built-in shapes preference data (64x64 PNG), `small` preset processing
  jpeg-224      224x224 JPEGs (q=90), PaliGemma-3B-224's image processing (SigLIP, 256 image tokens)
  jpeg-336      336x336 JPEGs (q=90), LLaVA-1.5's image processing (CLIP resize + crop, 576 tokens)
The large cases use the presets' vision settings with a small word-level tokenizer (text is short,
so tokenization is not what is measured). For each: rows/s of the raw read (no decode), and
examples/s of the loader (read + decode + process + collate; num_workers 1 and 2). Then the time
of one jitted forward + backward of the `small` model on a shapes-64 batch (a training step's cost).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never grab a TPU runtime for this CPU benchmark

from jaxpref.data.loader import Loader
from jaxpref.data.processing import Processor, ProcessorConfig
from jaxpref.tasks.shapes.scenes import generate_split
from jaxpref.data.sources import open_source
from jaxpref.data.writers import write_shards
from jaxpref.models import VLM, forward, get_preset, init_params
from jaxpref.sequence import concat_prompt_completion

WORDS = ("describe the image what color is shape how many shapes are there where a red blue green circle square "
         "triangle on left right top bottom one two three of and is in it looks like").split()


def bench_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS) | set(".,?!")))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])


def photo_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A photo-like JPEG: smooth color fields plus texture noise (compresses like a real photo)."""
    coarse = rng.uniform(0, 255, (size // 16 + 1, size // 16 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, np.float32) + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def jpeg_rows(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        words = rng.choice(WORDS, 40)
        yield {"images": [{"bytes": photo_jpeg(rng, size), "path": None}],
               "prompt": [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": " ".join(words[:12]) + "?"}]}],
               "chosen": [{"role": "assistant", "content": [{"type": "text", "text": " ".join(words[12:26])}]}],
               "rejected": [{"role": "assistant", "content": [{"type": "text", "text": " ".join(words[26:])}]}]}


def small_ids(cfg):
    """The preset's vision and layout with the bench tokenizer's special-token ids."""
    return dataclasses.replace(cfg, image_token_index=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f}/s"


def bench_case(name, rows, model_config, tokenizer, batch, tmp):
    out = os.path.join(tmp, name)
    write_shards(rows, out, num_shards=4, format="parquet")
    src = open_source(out)
    proc = Processor(model_config, tokenizer, ProcessorConfig(kind="preference", max_prompt_length=2048,
                                                              max_length=4096,
                                                              length_buckets=(32, 64, 128, 256, 512, 1024, 2048)))
    t = time.perf_counter()
    raw = [r for s in range(len(src.shards)) for _, r in src.read(s)]
    t_read = time.perf_counter() - t
    for r in raw[:16]:  # warm-up (first-call costs of PIL plugins and the tokenizer)
        proc(r)
    rates = []
    for workers in (1, 2):
        loader = Loader(src, proc, proc.collate, batch_size=batch, seed=0, shuffle_buffer=256, num_epochs=1,
                        process_index=0, process_count=1, num_workers=workers)
        t = time.perf_counter()
        batches = iter(loader)
        first = next(batches)
        count = 1 + sum(1 for _ in batches)  # consumed and dropped, as a training loop does
        rates.append(count * batch / (time.perf_counter() - t))
    b = first
    print(f"{name:10s} rows {len(raw):4d}  read {rate(len(raw), t_read)}  "
          f"loader {rates[0]:7.1f}/s (1 worker) {rates[1]:7.1f}/s (2 workers)  "
          f"[batch {batch}, {b['pixel_values'].shape[2]}px, prompt {b['prompt_ids'].shape[1]} tokens]")
    return max(rates), first


def train_step_seconds(batch: dict, iters: int = 5) -> float:
    """Median seconds of a jitted forward + backward (SFT cross-entropy on `chosen`) of the small model."""
    import jax
    import jax.numpy as jnp

    model = VLM(get_preset("small"))
    params = init_params(model, jax.random.key(0))
    seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], batch["chosen_ids"], batch["chosen_mask"])

    def loss(params, px, seq):
        logits = forward(model, params, pixel_values=px, input_ids=seq["input_ids"],
                         attention_mask=seq["attention_mask"], token_type_ids=seq["token_type_ids"])
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        tok = jnp.take_along_axis(logp, seq["input_ids"][:, 1:, None], -1)[..., 0]
        mask = seq["completion_mask"][:, 1:]
        return -(tok * mask).sum() / mask.sum()

    step = jax.jit(jax.value_and_grad(loss))
    args = (params, jnp.asarray(batch["pixel_values"][:, 0]), jax.tree.map(jnp.asarray, seq))
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rows", type=int, default=512, help="rows per case (the large-image cases use half)")
    args = p.parse_args(argv)
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"host: {os.cpu_count()} CPUs; loader: 1 process, prefetch thread, shuffle_buffer 256")
    tok = bench_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        shapes_rate, shapes_batch = bench_case("shapes-64", generate_split("preference", args.rows, 0),
                                               small_ids(get_preset("small")), tok, args.batch, tmp)
        bench_case("jpeg-224", jpeg_rows(args.rows // 2, 224), small_ids(get_preset("paligemma-3b-224")), tok,
                   args.batch, tmp)
        bench_case("jpeg-336", jpeg_rows(args.rows // 2, 336), small_ids(get_preset("llava-1.5-7b")), tok,
                   args.batch, tmp)
    step = train_step_seconds(shapes_batch)
    need = args.batch / step
    print(f"small model fwd+bwd on the 64px batch: {step * 1e3:.1f} ms/step = {need:.1f} examples/s; "
          f"loader (best) / step ratio {shapes_rate / need:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
