"""Comparisons of a policy's own answers, labeled by a judge: the preference data RLHF collects.

    jaxpref comparisons --policy runs/demo/runs/sft --data runs/demo/data/prompt --out data/comparisons \
                        --judge shapes [--n 4] [--pairs best-worst|best-rest|all] [--label-noise 0.1] [--num 1500]
    jaxpref reward --config jaxpref/tasks/shapes/configs/reward.yaml data.dataset_name=data/comparisons ...

    from jaxpref.eval.comparisons import ComparisonArgs, collect
    stats = collect(ComparisonArgs(policy="runs/sft", data="data/prompt", out="data/comparisons", judge="shapes"))

For every prompt of a split the policy samples `n` answers (`jaxpref eval --best-of`'s sampler:
seeds seed, seed+1, ... seed+n-1, temperature 0.7), the judge (a reward function of jaxpref.rewards,
e.g. `shapes`, the built-in task's stand-in for human raters) scores each, and the answers become pairs:

  best-worst  the best answer against the worst (one pair per prompt; the default)
  best-rest   the best against every distinct answer that scores lower
  all         every two distinct answers whose scores differ, the better one chosen

Prompts whose answers all score alike give no pair. A fraction `label_noise` of the pairs is swapped
(independently per pair), as `jaxpref data shapes` makes its rater noise. The train split of `data`
becomes the train split of `out`; its eval split becomes `out`'s eval split the same way (held-out
pairs of the policy's own answers: what a reward model must rank when it scores that policy), or,
with `eval_from`, another preference dataset's eval split is copied (to keep a reward model's held-out
accuracy comparable with earlier runs). `mix_from` + `mix` append the first `mix` train rows of another
preference dataset (e.g. the generator's corrections) to the train split. Rows are TRL's preference
schema (images, prompt, chosen, rejected) with the rows' other scalar columns (the scene), written as parquet shards with a dataset
card; `out/samples.jsonl` holds every answer and its score, `out/comparisons.json` the counts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time

import numpy as np

from jaxpref import rewards
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.data.writers import write_shards
from jaxpref.eval.evaluate import EvalArgs, best_of_n, first_rows, load_model
from jaxpref.sharding import make_mesh

PAIRINGS = ("best-worst", "best-rest", "all")


@dataclasses.dataclass(frozen=True)
class ComparisonArgs:
    policy: str
    """The policy whose answers are compared (a Hugging Face model directory, e.g. the SFT model)."""
    data: str
    """Prompts (with the columns the judge reads: the built-in task's prompt or SFT datasets hold the scene)."""
    out: str
    """The preference dataset to write (train and eval splits)."""
    judge: str | None = None
    """The judge labeling the answers (required): a registered name (`shapes`) or module:function."""
    n: int = 4
    """Answers sampled per prompt."""
    pairs: str = "best-worst"
    """Which answers are paired: best-worst, best-rest or all (see the module docstring)."""
    label_noise: float = 0.1
    """The share of pairs swapped, the raters' mistakes."""
    num: int | None = None
    """Train prompts, the first in file order (None: the whole split)."""
    eval_num: int | None = None
    """Eval prompts (None: the whole eval split; 0: no eval split)."""
    eval_from: str | None = None
    """Copy this preference dataset's eval split instead of sampling one."""
    mix_from: str | None = None
    """A preference dataset whose first `mix` train rows are added to the train split."""
    mix: int = 0
    skip_unscorable: bool = False
    """Leave out rows the judge cannot score (it returns None: the SFT data's short questions) instead of failing."""
    seed: int = 1000
    """Sampling seed: answer j uses seed + j (jaxpref eval's comparisons use 0)."""
    noise_seed: int = 0
    """Seed of the label noise."""
    max_new_tokens: int = 48
    temperature: float = 0.7
    batch_size: int = 32


def pairs_from_samples(rows: list[dict], samples: list[dict], label_noise: float, seed: int = 0,
                       pairs: str = "best-worst") -> tuple[list[dict], int]:
    """Preference rows from scored answers: per row, `samples[i]` holds "answers" and their "judge"
    scores. Returns (pairs, swapped): the rows in TRL's preference schema (images, prompt, chosen,
    rejected, and the row's other scalar columns, e.g. scene) and how many of them label noise swapped."""
    if pairs not in PAIRINGS:
        raise ValueError(f"pairs must be one of {', '.join(PAIRINGS)}, got {pairs!r}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    rng = np.random.default_rng(seed)
    out, swapped = [], 0
    for row, s in zip(rows, samples, strict=True):
        for chosen, rejected in _pairings(s["answers"], s["judge"], pairs):
            if rng.random() < label_noise:
                chosen, rejected = rejected, chosen
                swapped += 1
            out.append({"images": row["images"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                        **_extra_columns(row)})
    return out, swapped


def _extra_columns(row: dict) -> dict:
    """The row's scalar columns a pair keeps (the judge's inputs, e.g. the scene)."""
    return {k: v for k, v in row.items() if k not in ("images", "prompt", "chosen", "rejected", "completion")
            and isinstance(v, (str, int, float, bool))}


def _pairings(answers: list[str], scores: list[float], pairs: str) -> list[tuple[str, str]]:
    """(better, worse) answer pairs of one prompt; distinct texts only, first occurrence kept."""
    best = {}
    for a, s in zip(answers, scores, strict=True):
        best.setdefault(a, s)
    texts, sc = list(best), np.array(list(best.values()), float)
    if len(texts) < 2 or sc.max() == sc.min():
        return []
    hi = int(np.argmax(sc))
    if pairs == "best-worst":
        return [(texts[hi], texts[int(np.argmin(sc))])]
    if pairs == "best-rest":
        return [(texts[hi], texts[j]) for j in range(len(texts)) if sc[j] < sc[hi]]
    return [(texts[i], texts[j]) if sc[i] > sc[j] else (texts[j], texts[i])
            for i, j in itertools.combinations(range(len(texts)), 2) if sc[i] != sc[j]]


def sample_answers(model, rows: list[dict], tokenizer, args: ComparisonArgs, desc: str) -> list[dict]:
    """`args.n` answers per row from `model` ((VLM, params)), scored by `args.judge`: per row
    {"prompt", "answers", "judge"}."""
    ea = EvalArgs(policy=args.policy, reference=args.policy, data=args.data, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, batch_size=args.batch_size, seed=args.seed)
    res = best_of_n(model, model, None, rows, tokenizer, ea, args.n - 1, progress=True, desc=desc,
                    judge=rewards.resolve(args.judge))
    return [{"prompt": s["prompt"], "answers": [s["reference"]] + s["candidates"],
             "judge": [s["reference_judge"]] + s["candidate_judge"]} for s in res["samples"]]


def collect(args: ComparisonArgs) -> dict:
    """Samples, scores and pairs the answers of `args.policy` on both splits of `args.data` and writes
    the preference dataset `args.out`; returns the counts (also in out/comparisons.json)."""
    if not args.judge:
        raise ValueError("comparisons need a judge to label the answers (--judge NAME or module:function)")
    judge = rewards.resolve(args.judge)
    if args.n < 2:
        raise ValueError(f"comparisons need n >= 2 answers per prompt, got {args.n}")
    if args.pairs not in PAIRINGS:
        raise ValueError(f"pairs must be one of {', '.join(PAIRINGS)}, got {args.pairs!r}")
    if not 0.0 <= args.label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {args.label_noise}")
    if args.mix and not args.mix_from:
        raise ValueError("mix needs mix_from (the preference dataset to take the rows from)")
    t0 = time.perf_counter()
    splits = [("train", args.num)]
    if args.eval_from is None and args.eval_num != 0:
        splits.append(("eval", args.eval_num))
    # every split's rows checked before the model loads and anything is sampled or written
    checked = {split: _prompt_rows(args.data, split, num, judge, args.skip_unscorable) for split, num in splits}
    model = load_model(args.policy, "lm", make_mesh(1, -1, 1), "--policy")
    tokenizer = load_tokenizer(args.policy)
    stats: dict = {"args": dataclasses.asdict(args)}
    info = {"made_by": "jaxpref comparisons", **{k: v for k, v in dataclasses.asdict(args).items() if v is not None}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "samples.jsonl"), "w") as f:
        for split, (rows, skipped) in checked.items():
            samples = sample_answers(model, rows, tokenizer, args, desc=f"{split} answers")
            for s in samples:
                f.write(json.dumps({"split": split, **s}) + "\n")
            pairs, swapped = pairs_from_samples(rows, samples, args.label_noise,
                                                args.noise_seed + (split == "eval"), args.pairs)
            judged = np.array([s["judge"] for s in samples], float)
            stats[split] = {"prompts": len(rows), "skipped": skipped, "pairs": len(pairs), "swapped": swapped,
                            "prompts_without_pair": int(np.sum(judged.max(1) == judged.min(1))),
                            "judge_score": float(judged.mean()), "best_judge_score": float(judged.max(1).mean())}
            if split == "train" and args.mix:
                mixed = list(first_rows(args.mix_from, "train", args.mix))
                stats[split]["mixed"] = len(mixed)
                keys = {"images", "prompt", "chosen", "rejected", *_extra_columns(rows[0])}
                pairs += [{k: r[k] for k in keys if k in r} for r in mixed]
                # the mixed pairs spread through the shards, not at their ends
                order = np.random.default_rng(args.noise_seed).permutation(len(pairs))
                pairs = [pairs[i] for i in order]
            if not pairs:
                raise ValueError(f"{args.policy}'s answers on {args.data} split {split!r} all score alike: no pairs "
                                 f"(a policy that cannot answer yet; mix_from adds other pairs)")
            write_shards(iter(pairs), args.out, num_shards=4 if split == "train" else 1, split=split, info=info)
    if args.eval_from is not None:
        rows = list(first_rows(args.eval_from, "eval", None))
        write_shards(iter(rows), args.out, num_shards=1, split="eval", info=info)
        stats["eval"] = {"copied_from": args.eval_from, "pairs": len(rows)}
    stats["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "comparisons.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def _prompt_rows(data: str, split: str, num: int | None, judge: rewards.RewardFunction,
                 skip_unscorable: bool = False) -> tuple[list[dict], int]:
    """The rows to answer, checked before any sampling: (rows, how many were skipped because the judge
    cannot score them, i.e. returns None for an empty answer: e.g. the SFT data's short questions)."""
    all_rows = list(first_rows(data, split, num))
    for i, r in enumerate(all_rows):
        missing = [k for k in ("prompt", "images") if k not in r]
        if missing:
            raise ValueError(f"{data} split {split!r} row {i}: no {', '.join(missing)} field (comparisons need "
                             f"prompt and images, and the columns the judge reads)")
    scorable = rewards.score(judge, all_rows, [""] * len(all_rows))
    rows, skipped = [], 0
    for i, (r, sc) in enumerate(zip(all_rows, scorable)):
        if sc is None:
            if not skip_unscorable:
                raise ValueError(f"{data} split {split!r} row {i}: the judge {rewards.name_of(judge)} cannot score "
                                 f"this row ({rewards.text_of(r['prompt'])!r}); skip_unscorable (--skip-unscorable) "
                                 f"leaves such rows out")
            skipped += 1
            continue
        rows.append(r)
    if not rows:
        raise ValueError(f"{data} split {split!r} has no rows" + (f" the judge can score ({skipped} skipped)"
                                                                 if skipped else ""))
    return rows, skipped


def format_stats(stats: dict) -> str:
    lines = []
    for split in ("train", "eval"):
        s = stats.get(split)
        if s and "copied_from" in s:
            lines.append(f"eval: {s['pairs']} pairs copied from {s['copied_from']}")
        elif s:
            skipped = f" (+{s['skipped']} the judge cannot score, skipped)" if s.get("skipped") else ""
            lines.append(f"{split}: {s['prompts']} prompts{skipped} -> {s['pairs']} pairs ({s['swapped']} swapped "
                         f"by label noise, {s['prompts_without_pair']} prompts whose answers all score alike); "
                         f"mean judge score {s['judge_score']:.3f}, of the best answer {s['best_judge_score']:.3f}"
                         + (f"; {s['mixed']} pairs added from mix_from" if s.get("mixed") else ""))
    lines.append(f"{stats['seconds'] / 60:.1f} min")
    return "\n".join(lines)


def add_comparisons_parser(subparsers):
    p = subparsers.add_parser("comparisons",
                              help="preference pairs from a policy's own answers, labeled by a judge",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy model directory (e.g. the SFT model)")
    p.add_argument("--data", required=True, help="prompts (e.g. runs/demo/data/prompt)")
    p.add_argument("--judge", required=True, metavar="NAME|module:function",
                   help="the judge labeling the answers: a registered name (shapes: the built-in task's gold judge) "
                        "or a reward function module:function (jaxpref.rewards)")
    p.add_argument("--out", required=True, help="the preference dataset to write")
    p.add_argument("--n", type=int, default=4, help="answers per prompt (default 4)")
    p.add_argument("--pairs", default="best-worst", choices=PAIRINGS,
                   help="which answers are paired (default best-worst)")
    p.add_argument("--label-noise", type=float, default=0.1, help="share of pairs swapped (default 0.1)")
    p.add_argument("--num", type=int, default=0, help="train prompts (default 0: all)")
    p.add_argument("--eval-num", type=int, default=-1, help="eval prompts (default -1: all; 0: no eval split)")
    p.add_argument("--eval-from", default=None, help="copy this preference dataset's eval split (default: sample one)")
    p.add_argument("--mix-from", default=None, help="a preference dataset whose first --mix train rows are added")
    p.add_argument("--mix", type=int, default=0, help="rows taken from --mix-from (default 0)")
    p.add_argument("--skip-unscorable", action="store_true",
                   help="leave out rows whose prompt the judge cannot score (e.g. the SFT data's short questions)")
    p.add_argument("--seed", type=int, default=1000, help="sampling seed (default 1000)")
    p.add_argument("--noise-seed", type=int, default=0,
                   help="seed of which labels are swapped and of the mixed rows' order (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_main)


def _main(args) -> int:
    ca = ComparisonArgs(policy=args.policy, data=args.data, out=args.out, judge=args.judge, n=args.n, pairs=args.pairs,
                        label_noise=args.label_noise, num=args.num or None,
                        eval_num=None if args.eval_num < 0 else args.eval_num, eval_from=args.eval_from,
                        mix_from=args.mix_from, mix=args.mix, skip_unscorable=args.skip_unscorable, seed=args.seed,
                        noise_seed=args.noise_seed, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, batch_size=args.batch_size)
    try:
        stats = collect(ca)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxpref comparisons: {e}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    print(f"wrote {args.out} (train and eval splits), {args.out}/samples.jsonl and {args.out}/comparisons.json")
    return 0
