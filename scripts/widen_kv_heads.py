"""A checkpoint with its key-value heads tiled (MQA 1 -> N heads): the same function at step 0, a start
for training with more key-value heads (docs/TRAINING.md, session 29's lookup fine-tunes).

    python scripts/widen_kv_heads.py runs/s28/main/runs/pretrain2 runs/s29/pre2-kv4 --heads 4
    jaxpref sft --config runs/s28/main/runs/pretrain2/config.yaml model.name_or_path=runs/s29/pre2-kv4 ...

Each query head h of a group reads key-value head h // (heads / kv_heads); tiling every key-value head
`--heads / kv_heads` times gives each group's heads the same keys and values they read before.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil

import jax
import numpy as np

from jaxpref.models import VLM
from jaxpref.models.hf import load_pretrained, save_pretrained


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a jaxpref / Hugging Face model directory")
    p.add_argument("out")
    p.add_argument("--heads", type=int, required=True, help="key-value heads of the new model")
    args = p.parse_args()
    model, params = load_pretrained(args.src, "float32")
    text = model.config.text
    if args.heads % text.num_key_value_heads or text.num_attention_heads % args.heads:
        raise SystemExit(f"--heads {args.heads} must be a multiple of {text.num_key_value_heads} key-value heads and "
                         f"divide {text.num_attention_heads} query heads")
    reps = args.heads // text.num_key_value_heads
    layers = dict(jax.device_get(params["decoder"]["layers"]))
    for name in ("k", "v"):  # kernel [layers, embed, kv_heads, head_dim]
        layers[name] = {**layers[name], "kernel": np.repeat(np.asarray(layers[name]["kernel"]), reps, axis=-2)}
    params = {**params, "decoder": {**params["decoder"], "layers": layers}}
    cfg = dataclasses.replace(model.config, text=dataclasses.replace(text, num_key_value_heads=args.heads))
    save_pretrained(VLM(cfg, head="lm"), params, args.out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        try:
            shutil.copy(f"{args.src}/{f}", args.out)
        except FileNotFoundError:
            pass
    print(f"{args.src} -> {args.out}: {text.num_key_value_heads} -> {args.heads} key-value heads")


if __name__ == "__main__":
    main()
