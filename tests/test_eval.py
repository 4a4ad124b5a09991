"""`jaxpref eval` on models whose outcome is known: a policy against itself ties everywhere (win-rate
0.5, KL 0); the judge's best responses against its worst win ~100%; another policy is compared
for real (KL > 0, scores from the judge and the reward model)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxpref.tasks.shapes.scenes import TIERS, generate_split, judge, parse_prompt, responses, Scene
from jaxpref.tasks.shapes.tokenizer import load_shapes_tokenizer
from jaxpref.data.writers import write_shards
from jaxpref.eval import EvalArgs, evaluate, summarize, win
from jaxpref.models import VLM, get_preset, init_params, save_pretrained


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random policies and a reward model (HF directories with the shapes tokenizer) and
    12 held-out shapes prompts."""
    root = tmp_path_factory.mktemp("eval")
    cfg = get_preset("tiny")
    for name, seed, head in (("a", 0, "lm"), ("b", 1, "lm"), ("rm", 2, "scalar")):
        model = VLM(cfg, head=head)
        save_pretrained(model, init_params(model, jax.random.key(seed)), str(root / name))
        load_shapes_tokenizer().save_pretrained(str(root / name))
    write_shards(generate_split("prompt", 12, seed=3, image_size=32, split="eval"), str(root / "prompt"),
                 num_shards=2, split="eval")
    return root


def test_a_policy_against_itself_ties_everywhere(models):
    r = evaluate(EvalArgs(policy=str(models / "a"), reference=str(models / "a"), data=str(models / "prompt"),
                          batch_size=8, max_new_tokens=8, judge="shapes"), progress=False)
    m = r["metrics"]
    assert m["num_prompts"] == 12 and len(r["samples"]) == 12
    assert m["win_rate"] == 0.5 and m["judge_ties"] == 1.0 and m["kl"] == pytest.approx(0.0, abs=1e-6)
    s = r["samples"][0]
    assert s["policy"] == s["reference"] and 1 <= s["policy_length"] <= 8 and "scene" in s


def test_another_policy_is_really_compared_and_the_cli_writes_files(models, tmp_path):
    env = dict(os.environ, XLA_FLAGS="")
    p = subprocess.run([sys.executable, "-m", "jaxpref.cli", "eval", "--policy", str(models / "a"), "--reference",
                        str(models / "b"), "--data", str(models / "prompt"), "--reward-model", str(models / "rm"),
                        "--batch-size", "8", "--max-new-tokens", "8", "--out", str(tmp_path / "ev"), "--judge", "shapes"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "judge win-rate" in p.stdout and "reward-model win-rate" in p.stdout and "no judge" not in p.stdout
    m = json.load(open(tmp_path / "ev" / "eval.json"))["metrics"]
    samples = [json.loads(line) for line in open(tmp_path / "ev" / "samples.jsonl")]
    assert len(samples) == 12 and m["kl"] != 0
    # the metrics are what the samples say
    assert m["win_rate"] == pytest.approx(np.mean([win(s["policy_judge"], s["reference_judge"]) for s in samples]))
    assert m["rm_win_rate"] == pytest.approx(np.mean([win(s["policy_reward"], s["reference_reward"]) for s in samples]))
    assert all(s["policy_judge"] == judge(s["scene"], s["prompt"], s["policy"]) for s in samples)


def test_an_implicit_reward_model_scores_beta_times_the_log_ratio_to_the_reference(models):
    """--implicit-reward-beta: the reward model is a DPO policy read as beta x log pi_rm / pi_reference.
    With the policy itself as that model, the policy's reward is beta x its sample's KL term."""
    args = EvalArgs(policy=str(models / "a"), reference=str(models / "b"), data=str(models / "prompt"),
                    reward_model=str(models / "a"), implicit_reward_beta=0.5, batch_size=8, max_new_tokens=8)
    samples = evaluate(args, progress=False)["samples"]
    kl = np.array([s["kl"] for s in samples])
    assert np.all(np.abs(kl) > 1e-3)
    np.testing.assert_allclose([s["policy_reward"] for s in samples], 0.5 * kl, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="implicit-reward-beta must be > 0"):
        evaluate(dataclasses.replace(args, implicit_reward_beta=0.0), progress=False)
    with pytest.raises(ValueError, match="implicit-reward-beta needs --reward-model"):
        evaluate(dataclasses.replace(args, reward_model=None), progress=False)


def test_the_judges_best_responses_beat_its_worst():
    rng = np.random.default_rng(0)
    samples = []
    for row in generate_split("prompt", 200, seed=5, split="eval"):
        scene = Scene.from_json(row["scene"])
        texts = responses(scene, parse_prompt(scene, row["prompt"]), rng)
        s = {"kl": 0.0, "policy_length": 1, "reference_length": 1, "policy": texts[TIERS[0]],
             "reference": texts[TIERS[-1]]}
        s["policy_judge"], s["reference_judge"] = (judge(scene, row["prompt"], s[k]) for k in ("policy", "reference"))
        samples.append(s)
    m = summarize(samples)
    assert m["win_rate"] > 0.95 and m["judge_score"] > m["reference_judge_score"] + 0.5


def test_missing_model_is_a_clear_error(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="--policy: .* is not a model directory"):
        evaluate(EvalArgs(policy=str(tmp_path / "nope"), reference=str(models / "a"), data=str(models / "prompt")))


def test_reward_model_accuracy_against_labels_and_the_judge(models, tmp_path):
    from jaxpref.eval import reward_model_accuracy

    for noise in (0.0, 0.4):
        rows = list(generate_split("preference", 24, seed=4, image_size=32, split="eval", label_noise=noise))
        write_shards(iter(rows), str(tmp_path / f"pref{noise}"), num_shards=1, split="eval")
        m = reward_model_accuracy(str(models / "rm"), str(tmp_path / f"pref{noise}"), batch_size=8, progress=False,
                                  judge="shapes")
        agree = np.mean([judge(r["scene"], r["prompt"], r["chosen"]) > judge(r["scene"], r["prompt"], r["rejected"])
                         for r in rows])
        assert m["num_pairs"] == 24 and m["label_agreement"] == pytest.approx(agree)
        if noise == 0.0:
            assert agree == 1.0 and m["gold_accuracy"] == pytest.approx(m["accuracy"])
        else:
            assert agree < 1.0


def test_image_reliance_is_the_loss_with_own_and_with_other_images(models, tmp_path):
    """nll_real / nll_shuffled equal the completion log-probs (the DPO/KL code path) with each row's
    image and with the previous row's; a model whose image features are constant has no gap."""
    from jaxpref.data.processing import Processor, ProcessorConfig
    from jaxpref.eval import image_reliance
    from jaxpref.sequence import response_logps
    from jaxpref.models import load_pretrained

    write_shards(generate_split("sft", 16, seed=4, image_size=32, split="eval"), str(tmp_path / "sft"),
                 num_shards=1, split="eval")
    r = image_reliance(str(models / "a"), str(tmp_path / "sft"), num=16, batch_size=8)
    model, params = load_pretrained(str(models / "a"))
    processor = Processor(model.config, load_shapes_tokenizer(), ProcessorConfig(kind="sft"))
    rows = list(generate_split("sft", 16, seed=4, image_size=32, split="eval"))
    want = {"real": 0.0, "shuffled": 0.0}
    tokens = 0
    for start in (0, 8):
        b = processor.collate([processor(row) for row in rows[start:start + 8]])
        b = {k: v for k, v in b.items() if v.dtype != object}
        for name, px in (("real", b["pixel_values"]), ("shuffled", np.roll(b["pixel_values"], 1, axis=0))):
            want[name] -= float(np.sum(response_logps(model, params, {**b, "pixel_values": px},
                                                      b["completion_ids"], b["completion_mask"])))
        tokens += int(b["completion_mask"].sum())
    assert r["num_rows"] == 16
    assert r["nll_real"] == pytest.approx(want["real"] / tokens, rel=1e-5)
    assert r["nll_shuffled"] == pytest.approx(want["shuffled"] / tokens, rel=1e-5)
    assert abs(r["gap"]) > 1e-6  # a random model's output does move with its image
    blind = jax.tree.map(np.asarray, params)
    blind["projector"]["kernel"] = np.zeros_like(blind["projector"]["kernel"])  # every image looks the same
    save_pretrained(model, blind, str(tmp_path / "blind"))
    load_shapes_tokenizer().save_pretrained(str(tmp_path / "blind"))
    assert image_reliance(str(tmp_path / "blind"), str(tmp_path / "sft"), num=16, batch_size=8)["gap"] == \
        pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="fewer than one batch"):
        image_reliance(str(models / "a"), str(tmp_path / "sft"), num=4, batch_size=8)


def _best_of_k_reference(ref, cand_judge, cand_reward, k):
    """Row by row in plain Python: the judge's pick and the reward model's pick among the first k."""
    oracle, rm_pick = [], []
    for r, js, rs in zip(ref, cand_judge, cand_reward):
        best_j = max(js[:k])
        i = max(range(k), key=lambda j: (rs[j], -j))  # the highest reward, the first on a tie
        oracle.append(1.0 if best_j > r else 0.5 if best_j == r else 0.0)
        rm_pick.append(1.0 if js[i] > r else 0.5 if js[i] == r else 0.0)
    return sum(oracle) / len(ref), sum(rm_pick) / len(ref)


def test_best_of_n_curve_against_a_row_by_row_count():
    from jaxpref.eval import best_of_n_curve

    rng = np.random.default_rng(0)
    ref = rng.choice([0.0, 0.5, 1.0], 50)
    cj = rng.choice([0.0, 0.25, 0.5, 1.0], (50, 6))
    cr = rng.normal(size=(50, 6))
    cr[:5, 1] = cr[:5, 0]  # ties in the reward: the first candidate is chosen
    curve = best_of_n_curve(ref, cj, cr, rng.normal(size=50))
    assert [p["k"] for p in curve] == [1, 2, 4, 6]
    for p in curve:
        oracle, rm_pick = _best_of_k_reference(ref.tolist(), cj.tolist(), cr.tolist(), p["k"])
        assert p["oracle_win_rate"] == pytest.approx(oracle) and p["rm_pick_win_rate"] == pytest.approx(rm_pick)
        assert p["kl_bound"] == pytest.approx(np.log(p["k"]) - (p["k"] - 1) / p["k"])
    # the judge's pick can only improve with k; at k=1 both picks are the first candidate
    assert all(a["oracle_win_rate"] <= b["oracle_win_rate"] for a, b in zip(curve, curve[1:]))
    assert curve[0]["oracle_win_rate"] == curve[0]["rm_pick_win_rate"] and curve[0]["kl_bound"] == 0.0


def test_judge_agreement_against_a_pair_by_pair_count():
    from jaxpref.eval import judge_agreement

    rng = np.random.default_rng(1)
    cj = rng.choice([0.0, 0.5, 1.0], (40, 5))
    cr = rng.choice([-1.0, 0.0, 0.3, 2.0], (40, 5))  # ties in the reward too
    agree, pairs = [], 0
    for js, rs in zip(cj.tolist(), cr.tolist()):
        for a in range(5):
            for b in range(a + 1, 5):
                if js[a] != js[b]:
                    pairs += 1
                    agree.append(0.5 if rs[a] == rs[b] else float((rs[a] > rs[b]) == (js[a] > js[b])))
    got = judge_agreement(cj, cr)
    assert got["pairs"] == pairs and got["agreement"] == pytest.approx(sum(agree) / pairs)
    assert judge_agreement(cj, cj) == {"pairs": pairs, "agreement": 1.0}  # the judge agrees with itself
    assert judge_agreement(cj, -cj)["agreement"] == 0.0
    assert judge_agreement(np.ones((3, 4)), cr[:3, :4]) == {"pairs": 0, "agreement": None}


def test_rows_by_question_groups_rows_by_the_question_asked():
    from jaxpref.tasks.shapes.scenes import QUESTIONS, sample_prompt, sample_scene
    from jaxpref.tasks.shapes.reads import rows_by_question

    rng = np.random.default_rng(3)
    asked = ["color", "count", "color", "describe", "count", "color"]  # no locate question
    samples = []
    for q in asked:
        scene = sample_scene(rng)
        samples.append({"scene": scene.to_json(), "prompt": sample_prompt(scene, rng, q).text})
    got = rows_by_question(samples)
    assert got == {"all": list(range(6)), "describe": [3], "color": [0, 2, 5], "count": [1, 4]}
    assert list(got) == ["all"] + [q for q in QUESTIONS if q in asked]


def test_best_of_n_from_the_cli(models, tmp_path):
    env = dict(os.environ, XLA_FLAGS="")
    p = subprocess.run([sys.executable, "-m", "jaxpref.cli", "eval", "--policy", str(models / "a"), "--reference",
                        str(models / "a"), "--data", str(models / "prompt"), "--reward-model", str(models / "rm"),
                        "--best-of", "3", "--batch-size", "8", "--max-new-tokens", "8", "--out", str(tmp_path / "bo"),
                        "--judge", "shapes"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "win (judge picks)" in p.stdout and "win (RM picks)" in p.stdout
    out = json.load(open(tmp_path / "bo" / "best_of_n.json"))
    samples = [json.loads(line) for line in open(tmp_path / "bo" / "best_of_n.jsonl")]
    assert out["n"] == 3 and [c["k"] for c in out["curve"]] == [1, 2, 3] and len(samples) == 12
    for s in samples:
        assert len(s["candidates"]) == len(s["candidate_judge"]) == len(s["candidate_reward"]) == 3
        assert s["reference_judge"] == judge(s["scene"], s["prompt"], s["reference"])
    # candidates are drawn with other seeds than the reference's sample, and differ from each other
    assert any(s["candidates"][0] != s["reference"] for s in samples)
    assert any(len(set(s["candidates"])) > 1 for s in samples)
    oracle, rm_pick = _best_of_k_reference([s["reference_judge"] for s in samples],
                                           [s["candidate_judge"] for s in samples],
                                           [s["candidate_reward"] for s in samples], 3)
    assert out["curve"][-1]["oracle_win_rate"] == pytest.approx(oracle)
    assert out["curve"][-1]["rm_pick_win_rate"] == pytest.approx(rm_pick)
    # the reward model's agreement with the judge on these candidates (per question type: the task's report)
    from jaxpref.eval import judge_agreement

    assert out["agreement"] == {"all": {"prompts": 12, **judge_agreement([s["candidate_judge"] for s in samples],
                                                                         [s["candidate_reward"] for s in samples])}}
    assert "reward model agrees with the judge" in p.stdout


def test_reads_are_each_questions_greedy_answer_alone_with_its_own_image_and_the_one_before(models, tmp_path):
    """short_answer_reads batches 12 held-out short questions by 8 (the last batch padded); each answer
    equals the greedy answer to that question asked alone, with its own image and with the image of the
    question before it in its batch; the scores are exact matches counted per kind; the CLI writes them."""
    from jaxpref.data.processing import Processor, ProcessorConfig
    from jaxpref.tasks.shapes.scenes import short_question_kind
    from jaxpref.tasks.shapes.reads import short_answer_reads
    from jaxpref.generate import generate
    from jaxpref.models import load_pretrained

    r = short_answer_reads(str(models / "a"), num=12, batch_size=8, max_new_tokens=6)
    rows = list(generate_split("short", 12, seed=1, image_size=32, split="eval"))
    assert [(s["prompt"], s["answer"], s["kind"]) for s in r["samples"]] == [
        (q["prompt"], q["completion"], short_question_kind(q["prompt"])) for q in rows]
    model, params = load_pretrained(str(models / "a"))
    tok = load_shapes_tokenizer()
    processor = Processor(model.config, tok, ProcessorConfig(kind="prompt"))

    def alone(row, image_row):
        b = processor.collate([processor({"images": image_row["images"], "prompt": row["prompt"]})])
        g = generate(model, params, pixel_values=b["pixel_values"], input_ids=b["prompt_ids"],
                     attention_mask=b["prompt_mask"], max_new_tokens=6, greedy=True, rng=jax.random.key(0),
                     eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
        n = int(g.lengths[0])
        return tok.decode([int(t) for t in np.asarray(g.tokens)[0, :n] if t != model.config.eos_token_id],
                          skip_special_tokens=True).strip()

    for i, before in ((0, 7), (5, 4), (8, 11), (11, 10)):  # batches [0, 8) and [8, 12): rolled within each
        assert r["samples"][i]["said"] == alone(rows[i], rows[i]), i
        assert r["samples"][i]["said_shuffled"] == alone(rows[i], rows[before]), i
    for key, said in (("exact_match", "said"), ("shuffled_exact_match", "said_shuffled")):
        assert r[key] == np.mean([s[said] == s["answer"] for s in r["samples"]])
        for kind, v in r["by_kind"].items():
            assert v[key] == np.mean([s[said] == s["answer"] for s in r["samples"] if s["kind"] == kind])
    assert sum(v["num"] for v in r["by_kind"].values()) == r["num_questions"] == 12

    env = dict(os.environ, XLA_FLAGS="")
    p = subprocess.run([sys.executable, "-m", "jaxpref.cli", "reads", "--policy", str(models / "a"),
                        "--num", "8", "--batch-size", "8", "--out", str(tmp_path / "reads")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    stored = json.load(open(tmp_path / "reads" / "reads.json"))
    assert stored["num_questions"] == 8 and "samples" not in stored and "exact match" in p.stdout
    assert len(open(tmp_path / "reads" / "reads.jsonl").read().splitlines()) == 8
    p = subprocess.run([sys.executable, "-m", "jaxpref.cli", "reads", "--policy", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 2 and "nope" in p.stderr


USER_MODULE = '''
def exact_match(prompts, completions, solution, **kwargs):
    """1 where the completion is the row's solution; None where the row has none."""
    return [None if not s else float(c.strip() == s) for c, s in zip(completions, solution)]
'''


def test_eval_takes_a_users_module_function_and_says_when_there_is_no_judge(models, tmp_path):
    """`--judge mypkg.rewards:exact_match` scores with the user's function and the dataset's
    `solution` column; rows it returns None for are left out; without --judge the output says so."""
    from jaxpref.data.sources import open_source

    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "rewards.py").write_text(textwrap.dedent(USER_MODULE))
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "jaxpref.cli", "eval", "--policy", str(models / "a"), "--reference", str(models / "b"),
            "--batch-size", "8", "--max-new-tokens", "8"]
    # first without a judge: the policy's own answers, and the note
    p = subprocess.run(base + ["--data", str(models / "prompt"), "--out", str(tmp_path / "nojudge")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no judge given" in p.stdout and "judge win-rate" not in p.stdout
    first = [json.loads(line) for line in open(tmp_path / "nojudge" / "samples.jsonl")]
    assert not any("policy_judge" in s for s in first)
    # the solution: the policy's own answer on even rows (it answers the same way again: same seeds),
    # a text no model says on odd rows but the last, and none on the last (the function returns None)
    src = open_source(str(models / "prompt"), "eval")
    rows = [row for shard in range(len(src.shards)) for _, row in src.read(shard)]
    assert len(rows) == len(first)
    for i, (row, s) in enumerate(zip(rows, first)):
        row["solution"] = s["policy"] if i % 2 == 0 else ("" if i == len(rows) - 1 else "zzz never said")
    write_shards(iter(rows), str(tmp_path / "solved"), num_shards=1, split="eval")
    p = subprocess.run(base + ["--data", str(tmp_path / "solved"), "--judge", "mypkg.rewards:exact_match", "--out",
                               str(tmp_path / "judged")], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.load(open(tmp_path / "judged" / "eval.json"))["metrics"]
    samples = [json.loads(line) for line in open(tmp_path / "judged" / "samples.jsonl")]
    assert [s.get("policy_judge") for s in samples] == [
        1.0 if i % 2 == 0 else (None if i == len(rows) - 1 else 0.0) for i in range(len(rows))]
    assert m["judged_prompts"] == len(rows) - 1
    want = sum(1.0 if s["policy_judge"] > s["reference_judge"] else 0.5 if s["policy_judge"] == s["reference_judge"]
               else 0.0 for s in samples if "policy_judge" in s) / (len(rows) - 1)
    assert m["win_rate"] == pytest.approx(want) and m["win_rate"] > 0.5
    p = subprocess.run(base + ["--data", str(tmp_path / "solved"), "--judge", "mypkg.rewards:nothing"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 2 and "has no 'nothing'" in p.stderr
