"""Tokenizers: the shapes task's shipped tokenizer, or a local Hugging Face tokenizer directory.

    tok = load_tokenizer("shapes")                # jaxpref/assets/shapes_tokenizer.json
    tok = load_tokenizer("/ckpt/paligemma-3b")    # AutoTokenizer.from_pretrained, local files only

The shapes tokenizer is byte-level BPE (vocab <= 1024, decode(encode(t)) == t for any text) with
fixed special ids <pad> 0, <eos> 1, <bos> 2, <unk> 3, <image> 4, the ids of the `tiny` and `small`
presets. Like every tokenizer here it never adds <bos>/<eos> itself: the data processor does.
"""

from __future__ import annotations

import os
from importlib import resources

from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")  # ids 0..4
SHAPES_TOKENIZER_PATH = resources.files("jaxpref") / "assets" / "shapes_tokenizer.json"


def load_shapes_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped shapes tokenizer, with pad/eos/bos/unk set and "<image>" as an extra special token."""
    with resources.as_file(SHAPES_TOKENIZER_PATH) as path:
        if not path.is_file():
            raise FileNotFoundError(f"the shapes tokenizer {path} is missing: run scripts/train_shapes_tokenizer.py")
        pad, eos, bos, unk, image = SPECIAL_TOKENS
        return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token=pad, eos_token=eos, bos_token=bos,
                                       unk_token=unk, extra_special_tokens={"image_token": image},
                                       add_bos_token=False, add_eos_token=False)


def load_tokenizer(path_or_name: str):
    """"shapes" -> load_shapes_tokenizer(); a local directory -> AutoTokenizer.from_pretrained (no
    network, no remote code)."""
    if path_or_name == "shapes":
        return load_shapes_tokenizer()
    if not os.path.isdir(path_or_name):
        raise FileNotFoundError(f"tokenizer {path_or_name!r}: not 'shapes' and not a local directory "
                                "(jaxpref never downloads from the hub)")
    return AutoTokenizer.from_pretrained(path_or_name, local_files_only=True, trust_remote_code=False)
