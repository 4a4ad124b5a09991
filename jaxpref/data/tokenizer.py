"""Tokenizers: a local Hugging Face tokenizer directory, or one a task ships, by name.

    tok = load_tokenizer("/ckpt/paligemma-3b")    # AutoTokenizer.from_pretrained, local files only
    tok = load_tokenizer("shapes")                # the built-in task's (jaxpref/tasks/shapes/tokenizer.py)

Named tokenizers live in TOKENIZERS (name -> a function returning the tokenizer); a task registers
its own when imported (jaxpref.registry). Like every tokenizer here they never add <bos>/<eos>
themselves: the data processor does.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer

from jaxpref.registry import Registry

TOKENIZERS = Registry("tokenizer")


def load_tokenizer(path_or_name: str):
    """A local directory -> AutoTokenizer.from_pretrained (no network, no remote code); a registered
    name -> that tokenizer."""
    if os.path.isdir(path_or_name):
        return AutoTokenizer.from_pretrained(path_or_name, local_files_only=True, trust_remote_code=False)
    loader = TOKENIZERS.find(path_or_name)
    if loader is None:
        names = ", ".join(repr(n) for n in TOKENIZERS.names()) or "none registered"
        raise FileNotFoundError(f"tokenizer {path_or_name!r}: not a local directory and not a named tokenizer "
                                f"({names}; jaxpref never downloads from the hub)")
    return loader()
