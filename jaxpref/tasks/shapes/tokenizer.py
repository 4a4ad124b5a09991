"""The shapes task's tokenizer, shipped in jaxpref/tasks/shapes/assets/tokenizer.json.

Byte-level BPE (vocab <= 1024, decode(encode(t)) == t for any text) with fixed special ids <pad> 0,
<eos> 1, <bos> 2, <unk> 3, <image> 4, the ids of the `tiny` and `small` presets. It never adds
<bos>/<eos> itself. Registered as the tokenizer "shapes" (`data.tokenizer: shapes`).
"""

from __future__ import annotations

from importlib import resources

from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")  # ids 0..4
SHAPES_TOKENIZER_PATH = resources.files("jaxpref.tasks.shapes") / "assets" / "tokenizer.json"


def load_shapes_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped shapes tokenizer, with pad/eos/bos/unk set and "<image>" as an extra special token."""
    with resources.as_file(SHAPES_TOKENIZER_PATH) as path:
        if not path.is_file():
            raise FileNotFoundError(f"the shapes tokenizer {path} is missing: run scripts/train_shapes_tokenizer.py")
        pad, eos, bos, unk, image = SPECIAL_TOKENS
        return PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token=pad, eos_token=eos, bos_token=bos,
                                       unk_token=unk, extra_special_tokens={"image_token": image},
                                       add_bos_token=False, add_eos_token=False)
