"""`jaxpref comparisons`: preference pairs from a policy's own answers. The pairings against a
brute-force count over every two answers, the label noise's share, and the command end to end on a
tiny model (its answers sampled and judged for real, the dataset written and read back)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxpref.eval.comparisons import ComparisonArgs, collect, pairs_from_samples
from jaxpref.tasks.shapes.scenes import generate_split, judge
from jaxpref.tasks.shapes.tokenizer import load_shapes_tokenizer
from jaxpref.data.writers import write_shards
from jaxpref.eval import first_rows
from jaxpref.models import VLM, get_preset, init_params, save_pretrained


def _scored(num: int, n: int, seed: int = 0):
    """Rows and answers with scores from {0, 0.5, 1} (ties and repeated texts included)."""
    rng = np.random.default_rng(seed)
    rows = [{"images": [], "prompt": f"p{i}", "scene": f"s{i}"} for i in range(num)]
    samples = []
    for i in range(num):
        texts = [f"a{int(t)}" for t in rng.integers(0, n + 1, n)]  # repeats happen
        score_of = {t: float(rng.choice([0.0, 0.5, 1.0])) for t in set(texts)}
        if i % 8 == 0:
            score_of = dict.fromkeys(score_of, 0.5)  # all alike: no pair
        samples.append({"answers": texts, "judge": [score_of[t] for t in texts]})
    return rows, samples


def _expected(samples, pairs: str):
    """(prompt index, chosen, rejected) by brute force over every two distinct answers."""
    out = []
    for i, s in enumerate(samples):
        first = {}
        for t, sc in zip(s["answers"], s["judge"]):
            first.setdefault(t, sc)
        texts = list(first)
        best = max(first.values())
        top = next(t for t in texts if first[t] == best)
        worst = next(t for t in texts if first[t] == min(first.values()))
        for a, b in itertools.combinations(texts, 2):
            if first[a] == first[b]:
                continue
            hi, lo = (a, b) if first[a] > first[b] else (b, a)
            if pairs == "all" or (pairs == "best-rest" and hi == top) or (pairs == "best-worst" and (hi, lo) == (top, worst)):
                out.append((i, hi, lo))
    return sorted(out)


@pytest.mark.parametrize("pairs", ["best-worst", "best-rest", "all"])
def test_pairings_against_every_two_answers(pairs):
    rows, samples = _scored(200, 5)
    made, swapped = pairs_from_samples(rows, samples, 0.0, pairs=pairs)
    assert swapped == 0
    got = sorted((int(p["prompt"][1:]), p["chosen"], p["rejected"]) for p in made)
    assert got == _expected(samples, pairs) and len(got) > 150
    for p in made:  # every pair: the better answer chosen, the row's image and scene kept
        i = int(p["prompt"][1:])
        score = dict(zip(samples[i]["answers"], samples[i]["judge"]))
        assert score[p["chosen"]] > score[p["rejected"]] and p["scene"] == f"s{i}"
    assert all(int(p["prompt"][1:]) % 8 for p in made)  # prompts whose answers all score alike give none


def test_label_noise_swaps_its_share_of_pairs_and_nothing_else():
    rows, samples = _scored(400, 4)
    clean, _ = pairs_from_samples(rows, samples, 0.0, pairs="best-rest")
    noisy, swapped = pairs_from_samples(rows, samples, 0.3, seed=5, pairs="best-rest")
    assert len(noisy) == len(clean)
    flips = [n["chosen"] == c["rejected"] and n["rejected"] == c["chosen"] for n, c in zip(noisy, clean)]
    same = [n["chosen"] == c["chosen"] and n["rejected"] == c["rejected"] for n, c in zip(noisy, clean)]
    assert all(f or s for f, s in zip(flips, same)) and sum(flips) == swapped
    assert 0.25 < swapped / len(clean) < 0.35
    with pytest.raises(ValueError, match="pairs must be one of"):
        pairs_from_samples(rows, samples, 0.1, pairs="best")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random policy (an HF directory with the shapes tokenizer), shapes prompts and
    preference pairs (train and eval splits of each)."""
    root = tmp_path_factory.mktemp("comparisons")
    model = VLM(get_preset("tiny"), head="lm")
    save_pretrained(model, init_params(model, jax.random.key(0)), str(root / "policy"))
    load_shapes_tokenizer().save_pretrained(str(root / "policy"))
    for kind, num in (("prompt", 12), ("preference", 10)):
        for split in ("train", "eval"):
            write_shards(generate_split(kind, num, seed=3, image_size=32, split=split), str(root / kind),
                         num_shards=2, split=split)
    return root


def test_collect_samples_judges_and_writes_a_preference_dataset(tiny, tmp_path):
    out = tmp_path / "cmp"
    args = ComparisonArgs(policy=str(tiny / "policy"), data=str(tiny / "prompt"), out=str(out), judge="shapes", n=3,
                          pairs="all",
                          mix_from=str(tiny / "preference"), mix=6, eval_from=str(tiny / "preference"),
                          max_new_tokens=8, batch_size=8)
    stats = collect(args)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    prompts = list(first_rows(str(tiny / "prompt"), "train", None))
    assert len(samples) == 12 and all(s["split"] == "train" for s in samples)
    for s, row in zip(samples, prompts):  # n answers per prompt, each with the judge's own score
        assert s["prompt"] == row["prompt"] and len(s["answers"]) == len(s["judge"]) == 3
        assert s["judge"] == [judge(row["scene"], row["prompt"], a) for a in s["answers"]]
    assert any(len(set(s["answers"])) > 1 for s in samples)  # the answers use different seeds
    # a random tiny model's answers mostly score alike (0), so few or no pairs come from them here: the
    # pairings themselves are checked against the brute force above; this checks what collect writes
    expected, _ = pairs_from_samples(prompts, samples, args.label_noise, args.noise_seed, "all")
    train = list(first_rows(str(out), "train", None))
    assert stats["train"]["pairs"] == len(expected) and stats["train"]["mixed"] == 6
    assert len(train) == len(expected) + 6 and set(train[0]) >= {"images", "prompt", "chosen", "rejected", "scene"}
    mixed = list(first_rows(str(tiny / "preference"), "train", 6))
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"], r["scene"])
    assert sorted(map(key, train)) == sorted(map(key, expected + mixed))
    ev = list(first_rows(str(out), "eval", None))
    assert list(map(key, ev)) == list(map(key, first_rows(str(tiny / "preference"), "eval", None)))
    card = json.load(open(out / "jaxpref_dataset.json"))  # the dataset card agrees
    assert card["splits"]["train"]["num_rows"] == len(train) and card["splits"]["eval"]["num_rows"] == len(ev)
    assert json.load(open(out / "comparisons.json"))["train"] == stats["train"]


@pytest.mark.slow  # 58 s of CLI subprocesses: kept out of CI's 30-minute budget; run with -m slow
def test_the_cli_names_what_is_wrong(tiny, tmp_path):
    env = dict(os.environ, XLA_FLAGS="")

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "jaxpref.cli", "comparisons", "--policy", str(tiny / "policy"),
                               "--out", str(tmp_path / "o"), "--max-new-tokens", "8", "--batch-size", "8", "--judge",
                               "shapes", *extra],
                              capture_output=True, text=True, timeout=600, env=env)

    # a random policy's answers all score 0: no pairs, and the message says what would add some
    p = run("--data", str(tiny / "prompt"), "--n", "2", "--eval-num", "4")
    assert p.returncode == 2 and "all score alike: no pairs" in p.stderr and "mix_from" in p.stderr, p.stderr[-2000:]
    rows = [{k: v for k, v in r.items() if k != "scene"} for r in first_rows(str(tiny / "prompt"), "train", 3)]
    write_shards(iter(rows), str(tmp_path / "noscene"), num_shards=1, split="train")
    p = run("--data", str(tmp_path / "noscene"))
    # rows without the scene the judge reads: the judge returns None for them, and the row is named
    assert p.returncode == 2 and f"{tmp_path / 'noscene'} split 'train' row 0: the judge shapes cannot score this row" \
        in p.stderr, p.stderr[-2000:]
    # the SFT data's short questions ("what color is the shape in the center?") have no judge: named, or skipped
    write_shards(generate_split("sft", 24, seed=4, image_size=32, short_fraction=0.5), str(tmp_path / "sft"),
                 num_shards=1, split="train")
    p = run("--data", str(tmp_path / "sft"))
    assert p.returncode == 2 and "split 'train' row " in p.stderr and "cannot score this row" in p.stderr
    p = run("--data", str(tmp_path / "sft"), "--skip-unscorable", "--eval-num", "0", "--mix-from",
            str(tiny / "preference"), "--mix", "2", "--seed", "7", "--noise-seed", "3")
    assert p.returncode == 0, p.stderr[-2000:]
    written = json.load(open(tmp_path / "o" / "comparisons.json"))
    assert (written["args"]["seed"], written["args"]["noise_seed"]) == (7, 3)
    st = written["train"]
    assert st["skipped"] > 0 and st["prompts"] + st["skipped"] == 24 and "the judge cannot score, skipped" in p.stdout
    p = run("--data", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and "nowhere" in p.stderr
    p = run("--data", str(tiny / "prompt"), "--mix", "3")
    assert p.returncode == 2 and "mix needs mix_from" in p.stderr
    p = run("--data", str(tiny / "prompt"), "--label-noise", "1.5")  # refused before any sampling
    assert p.returncode == 2 and "label_noise must be in [0, 1], got 1.5" in p.stderr and "answers" not in p.stderr
