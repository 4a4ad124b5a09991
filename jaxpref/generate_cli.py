"""`jaxpref generate`: one image + one prompt -> a completion, from a Hugging Face model directory.

    jaxpref generate --model DIR --image cat.png --prompt "describe the image" [--greedy]
                     [--max-new-tokens 32] [--temperature 0.7] [--top-k 0] [--top-p 1.0] [--seed 0]
                     [--tokenizer shapes|DIR] [--dtype float32|bfloat16]

The image and prompt go through the same processing as training rows (jaxpref.data.processing,
a TRL prompt-only row {"images": [image], "prompt": text}), then jaxpref.generate samples.
"""

from __future__ import annotations

import os
import sys


def add_generate_parser(subparsers):
    p = subparsers.add_parser("generate", help="sample a completion for one image and prompt")
    p.add_argument("--model", required=True, help="Hugging Face model directory (PaliGemma or LLaVA)")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--tokenizer", default=None,
                   help="'shapes' (the built-in task's tokenizer) or a tokenizer directory (default: --model)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default: 32")
    p.add_argument("--temperature", type=float, default=0.7, help="default: 0.7 (TRL's PPO default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-k/top-p)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import jax

    from .data.errors import BadRecordError
    from .data.processing import Processor, ProcessorConfig
    from .data.tokenizer import load_tokenizer
    from .generate import generate
    from .models import load_pretrained

    for flag, path in (("--model", args.model), ("--image", args.image)):
        if not os.path.exists(path):
            print(f"jaxpref generate: {flag} {path}: no such file or directory", file=sys.stderr)
            return 2
    model, params = load_pretrained(args.model, dtype=args.dtype)
    cfg = model.config
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    processor = Processor(cfg, tokenizer, ProcessorConfig(kind="prompt"))
    with open(args.image, "rb") as f:
        try:
            example = processor({"images": [f.read()], "prompt": args.prompt})
        except BadRecordError as e:
            print(f"jaxpref generate: --image {args.image} / --prompt: {e}", file=sys.stderr)
            return 2
    batch = processor.collate([example])
    out = generate(model, params, pixel_values=batch["pixel_values"], input_ids=batch["prompt_ids"],
                   attention_mask=batch["prompt_mask"], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                   eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, rng=jax.random.key(args.seed))
    ids = [int(t) for t in jax.device_get(out.tokens)[0, : int(out.lengths[0])] if int(t) != cfg.eos_token_id]
    print(tokenizer.decode(ids, skip_special_tokens=True))
    return 0
