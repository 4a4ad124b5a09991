"""Preference pairs from a policy's own answers, labeled by the gold judge (the built-in task's
stand-in for human raters), as RLHF collects comparisons: for each prompt of DATA's train split the
policy samples n answers plus one more (`jaxpref eval --best-of`'s sampler), the judge's best and worst
become chosen and rejected (prompts whose answers all score alike are dropped), and a fraction
`--label-noise` of the pairs is flipped, like `jaxpref data shapes`. The eval split is copied from
`--eval-from` (e.g. the demo's tier pairs) so a reward model's held-out accuracy stays comparable.

    python scripts/onpolicy_pairs.py runs/demo/runs/sft runs/demo/data/prompt OUT --n 3 \
        --eval-from runs/demo/data/preference
    jaxpref reward --config runs/demo/runs/reward/config.yaml output_dir=RM data.dataset_name=OUT/preference
"""

from __future__ import annotations

import argparse

import numpy as np

from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.data.writers import write_shards
from jaxpref.eval import EvalArgs, _load, best_of_n, first_rows
from jaxpref.sharding import make_mesh


def pairs_from_samples(rows: list[dict], samples: list[dict], label_noise: float, seed: int = 0) -> list[dict]:
    """chosen / rejected: the judge's best and worst of each row's answers (the reference sample and
    the candidates of `best_of_n`); rows whose answers all score alike are dropped."""
    rng = np.random.default_rng(seed)
    out = []
    for row, s in zip(rows, samples):
        texts = [s["reference"]] + s["candidates"]
        scores = [s["reference_judge"]] + s["candidate_judge"]
        hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[hi] == scores[lo]:
            continue
        chosen, rejected = texts[hi], texts[lo]
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        out.append({"images": row["images"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                    "scene": row["scene"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policy")
    p.add_argument("data", help="prompt dataset with scenes (e.g. runs/demo/data/prompt)")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=3, help="candidates per prompt (plus one more sample)")
    p.add_argument("--label-noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1000, help="sampling seed (the eval's reference uses 0)")
    p.add_argument("--eval-from", required=True, help="a preference dataset whose eval split is copied")
    args = p.parse_args()
    model = _load(args.policy, "lm", make_mesh(1, -1, 1), "policy")
    rows = list(first_rows(args.data, "train", None))
    ea = EvalArgs(policy=args.policy, reference=args.policy, data=args.data, split="train", seed=args.seed)
    res = best_of_n(model, model, None, rows, load_tokenizer(args.policy), ea, args.n, progress=True)
    pairs = pairs_from_samples(rows, res["samples"], args.label_noise)
    print(f"{len(rows)} prompts -> {len(pairs)} pairs")
    write_shards(iter(pairs), f"{args.out}/preference", num_shards=4, split="train")
    write_shards(first_rows(args.eval_from, "eval", None), f"{args.out}/preference", num_shards=1, split="eval")


if __name__ == "__main__":
    main()
