"""`jaxpref export --merge ADAPTER_DIR --out DIR`: a LoRA adapter folded into its base, as a full
Hugging Face model directory (safetensors + config.json, and the adapter directory's tokenizer).

    jaxpref export --merge runs/dpo-lora --out runs/dpo-merged [--base DIR] [--dtype bfloat16]

The base is adapter_config.json's base_model_name_or_path unless --base names it; it must be a
model directory (a preset's random weights are not on disk). Each adapted kernel becomes
W + (alpha / r) A B; modules the adapter trained whole (modules_to_save) replace the base's.
`transformers.AutoModelForImageTextToText.from_pretrained(DIR)` loads the result.
"""

from __future__ import annotations

import os
import sys


def add_export_parser(subparsers):
    p = subparsers.add_parser("export", help="merge a LoRA adapter into its base: a full HF model directory")
    p.add_argument("--merge", required=True, metavar="ADAPTER_DIR",
                   help="a PEFT LoRA adapter directory (what a use_peft run writes to its output_dir)")
    p.add_argument("--out", required=True, help="directory to write the merged model to")
    p.add_argument("--base", default=None, help="the base model directory (default: the adapter's "
                                                "base_model_name_or_path)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the written tensors (default: the base's dtype as loaded, float32)")
    p.set_defaults(func=run)
    return p


def merge_adapter(adapter_dir: str, out_dir: str, base: str | None = None, dtype: str | None = None) -> str:
    """Writes the merged model of `adapter_dir` to out_dir; returns out_dir."""
    from .data.tokenizer import load_tokenizer
    from .models import load_pretrained, lora, save_pretrained
    from .models.config import ConfigError

    config = lora.read_adapter_config(adapter_dir)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path: give --base DIR")
    if not os.path.isdir(base):
        raise ConfigError(f"the base {base!r} is not a model directory (jaxpref never downloads; a preset's "
                          f"random weights are not on disk): give --base DIR")
    head = "scalar" if config.get("task_type") == "SEQ_CLS" else "lm"
    model, params = load_pretrained(base, "float32", head=head)
    plan, trained = lora.load_adapter(adapter_dir, model.config, head)
    save_pretrained(model, lora.merge(plan, params, trained), out_dir, dtype=dtype)
    try:
        load_tokenizer(adapter_dir).save_pretrained(out_dir)
    except (OSError, ValueError):  # an adapter directory without a tokenizer: the base's, if it has one
        try:
            load_tokenizer(base).save_pretrained(out_dir)
        except (OSError, ValueError):
            pass
    return out_dir


def run(args) -> int:
    from .models.config import ConfigError
    from .models.hf import CheckpointError

    if not os.path.isdir(args.merge):
        print(f"jaxpref export: --merge {args.merge}: no such directory", file=sys.stderr)
        return 2
    try:
        out = merge_adapter(args.merge, args.out, args.base, args.dtype)
    except (ConfigError, CheckpointError) as e:
        print(f"jaxpref export: {e}", file=sys.stderr)
        return 1
    print(f"merged model written to {out}")
    return 0
