"""Trains the shapes task's tokenizer and writes jaxpref/assets/shapes_tokenizer.json.

    .venv/bin/python scripts/train_shapes_tokenizer.py [--out PATH] [--scenes 4000]

Byte-level BPE (GPT-2 style pre-tokenizer and decoder, no added prefix space), so decode(encode(t))
== t for every string; trained on every prompt template and the responses of all tiers to
`--scenes` random scenes (fixed seed: the output is deterministic). Special tokens get the fixed ids
of the `tiny`/`small` presets: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <image> 4. Total vocab: at most
1024 (the presets' vocab_size). No post-processor: encoding never adds <bos>/<eos>.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxpref.tasks.shapes.scenes import QUESTIONS, responses, sample_prompt, sample_scene
from jaxpref.tasks.shapes.tokenizer import SHAPES_TOKENIZER_PATH, SPECIAL_TOKENS

VOCAB_SIZE = 1024


def corpus(num_scenes: int, seed: int = 0) -> Iterator[str]:
    """Every question about num_scenes scenes: the prompt (also as PaliGemma renders it, with "\\n")
    and the four tiers' responses; then digits and ASCII punctuation."""
    rng = np.random.default_rng(seed)
    for _ in range(num_scenes):
        scene = sample_scene(rng)
        for question in QUESTIONS:
            prompt = sample_prompt(scene, rng, question)
            yield prompt.text
            yield prompt.text + "\n"
            yield from responses(scene, prompt, rng).values()
    yield " ".join(str(i) for i in range(100))
    yield "".join(chr(c) for c in range(32, 127)) + "\n"


def train(num_scenes: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(num_scenes), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    return tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(SHAPES_TOKENIZER_PATH), help="output tokenizer.json path")
    p.add_argument("--scenes", type=int, default=4000, help="random scenes in the training corpus")
    args = p.parse_args(argv)
    tok = train(args.scenes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out, pretty=True)
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}, {os.path.getsize(args.out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
