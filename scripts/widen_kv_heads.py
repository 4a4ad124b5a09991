"""A checkpoint with its key-value heads tiled (MQA 1 -> N heads): the same function at step 0, a start
for training with more key-value heads.

    python scripts/widen_kv_heads.py runs/demo/runs/pretrain2 runs/pretrain2-kv4 --heads 4
    jaxpref sft --config runs/demo/runs/pretrain2/config.yaml model.name_or_path=runs/pretrain2-kv4 ...

Each query head h of a group reads key-value head h // (heads / kv_heads); tiling every key-value head
`--heads / kv_heads` times gives each group's heads the same keys and values they read before.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil

import jax
import numpy as np

from jaxpref.models import VLM
from jaxpref.models.hf import load_pretrained, save_pretrained


def widen(src: str, out: str, heads: int) -> None:
    """Writes `src` with its key-value heads tiled to `heads` (a multiple of its own) into `out`."""
    model, params = load_pretrained(src, "float32")
    text = model.config.text
    if heads % text.num_key_value_heads or text.num_attention_heads % heads:
        raise ValueError(f"{heads} key-value heads must be a multiple of {src}'s {text.num_key_value_heads} and "
                         f"divide its {text.num_attention_heads} query heads")
    reps = heads // text.num_key_value_heads
    layers = dict(jax.device_get(params["decoder"]["layers"]))
    for name in ("k", "v"):  # kernel [layers, embed, kv_heads, head_dim]
        layers[name] = {**layers[name], "kernel": np.repeat(np.asarray(layers[name]["kernel"]), reps, axis=-2)}
    params = {**params, "decoder": {**params["decoder"], "layers": layers}}
    cfg = dataclasses.replace(model.config, text=dataclasses.replace(text, num_key_value_heads=heads))
    save_pretrained(VLM(cfg, head="lm"), params, out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a jaxpref / Hugging Face model directory")
    p.add_argument("out")
    p.add_argument("--heads", type=int, required=True, help="key-value heads of the new model")
    args = p.parse_args()
    try:
        widen(args.src, args.out, args.heads)
    except ValueError as e:
        raise SystemExit(f"widen_kv_heads: {e}") from None
    print(f"{args.src} -> {args.out}: {args.heads} key-value heads")


if __name__ == "__main__":
    main()
