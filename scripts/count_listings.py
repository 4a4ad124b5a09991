"""How many of a policy's answers to color and locate prompts list the scene, and how the judge scored them,
from the samples.jsonl that `jaxpref comparisons` (and the demo's DPO and PPO rounds) write: every answer
that names two or more shapes by kind counts as a listing (those files hold no scenes; on held-out
prompts the demo report's "Answers that list the scene" uses the scenes, shapes.names_every_shape).

    python scripts/count_listings.py runs/s29/main2/data/comparisons/samples.jsonl \
        runs/s29/main2/runs/dpo-rounds/comparisons-*/samples.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from jaxpref.data import shapes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("samples", nargs="+", help="samples.jsonl files: {prompt, answers, judge} per line")
    args = p.parse_args()
    for path in args.samples:
        listed, other = [], []
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if shapes.question_of(row["prompt"]) not in ("color", "locate"):
                    continue
                for answer, score in zip(row["answers"], row["judge"]):
                    kinds = [m for m in shapes.parse_claims(answer).mentions if m.kind in shapes.KINDS]
                    (listed if len(kinds) >= 2 else other).append(score)
        n = len(listed) + len(other)
        mean = lambda xs: f"{np.mean(xs):.3f}" if xs else "-"  # noqa: E731
        print(f"{path}: {n} color/locate answers, {len(listed) / max(n, 1):.3f} list the scene (judge score "
              f"{mean(listed)}), the others {mean(other)}")


if __name__ == "__main__":
    main()
