"""`jaxpref demo`: the whole pipeline end to end with the tiny preset and a few steps per stage (a
real subprocess, the real trainers), its files and numbers, resume (a re-run skips every finished
stage), and the plan checks (a DIR made with another plan is refused)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from jaxpref.tasks.shapes import demo as demo_module
from jaxpref.tasks.shapes.demo import (BASE_FILES, PLANS, STAGES, Demo, DemoError, config_fingerprints,
                                       default_configs_dir, make_plan, ppo_config, read_base_info, reusable_stages,
                                       run_demo, trainer_config, write_base, write_summary)
from jaxpref.tasks.shapes.report import grounded_table, judge_bins, judge_table, model_label
from jaxpref.tasks.shapes.reads import agreement_by_question
from test_train import run_jaxpref

# The quick plan shrunk to seconds: the tiny preset, 32x32 images, a handful of rows and steps, one
# length bucket per trainer (one compile per step function).
TINY = {
    "base.from_scratch": True,  # the tiny preset's own tower and pretraining (the shipped base is `small`)
    "data.short_rows": 16,
    "data.sft_rows": 32, "data.preference_rows": 32, "data.prompt_rows": 16, "data.eval_rows": 8, "data.image_size": 32,
    "tower.preset": "tiny", "tower.steps": 3, "tower.batch_size": 4,
    "pretrain.max_steps": 2, "pretrain2.max_steps": 2,
    "sft.max_steps": 3, "sft.save_steps": 1, "sft.data.shuffle_buffer": 16,
    "reward.max_steps": 3, "reward.warmup_steps": 0, "dpo.max_steps": 2, "dpo.warmup_steps": 0,
    "ppo.max_steps": 2, "ppo.eval_steps": 1, "ppo.eval_num_prompts": 8, "ppo.response_length": 8,
    "ppo.num_ppo_epochs": 1, "ppo_scalar_rm.max_steps": 1, "ppo_scalar_rm.eval_num_prompts": 8,
    "ppo_scalar_rm.response_length": 8, "ppo_scalar_rm.num_ppo_epochs": 1, "eval.num": 8, "eval.max_new_tokens": 8, "eval.batch_size": 8, "eval.best_of": 2,
    "eval.reads": 8,
    # a 3-step SFT model's answers all score 0 (no pairs of its own): the generator's pairs fill in
    "comparisons.n": 2, "comparisons.mix": 16, "comparisons.dpo_rounds": 2,
    "comparisons.round_pairs": "best-rest", "comparisons.round_steps": 1,
    "comparisons.ppo_rounds": 1, "comparisons.ppo_round_steps": 1,
}
for _stage in ("pretrain", "pretrain2", "sft", "reward", "dpo", "ppo", "ppo_scalar_rm"):
    TINY.update({f"{_stage}.logging_steps": 1, f"{_stage}.per_device_train_batch_size": 4,
                 f"{_stage}.per_device_eval_batch_size": 8, f"{_stage}.data.length_buckets": 80})
    TINY.setdefault(f"{_stage}.eval_steps", TINY[f"{_stage}.max_steps"])
    TINY.setdefault(f"{_stage}.save_steps", TINY[f"{_stage}.max_steps"])
SETS = [f"{k}={v}" for k, v in TINY.items()]


def _set_args(sets):
    return [a for s in sets for a in ("--set", s)]


# ~90 s of CPU (every trainer compiles its steps once); the README's main command, so it runs in CI
def test_the_demo_runs_end_to_end_resumes_and_refuses_another_plan(tmp_path, capsys):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    r = run_jaxpref("demo", "--quick", "--out", str(out), *_set_args(SETS))
    first = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"[3/12] pretrain: 2 steps from {out}/runs/tower on {out}/data/short" in r.stdout
    assert f"[4/12] pretrain2: 2 steps from {out}/runs/pretrain on {out}/data/short" in r.stdout
    assert f"[5/12] sft: 3 steps from {out}/runs/pretrain2" in r.stdout and "[9/12] ppo: 2 iterations" in r.stdout
    assert f"[6/12] comparisons: 2 answers of {out}/runs/sft to every train prompt of {out}/data/prompt" in r.stdout
    assert f"[7/12] reward: 3 steps from {out}/runs/sft on {out}/data/comparisons" in r.stdout
    assert f"report: {out}/report.md" in r.stdout

    s = json.loads((out / "summary.json").read_text())
    assert s["quick"] is True and s["plan"] == make_plan(True, SETS)
    assert list(s["stages"]) == [st.name for st in STAGES] == ["data", "tower", "pretrain", "pretrain2", "sft",
                                                               "comparisons", "reward", "dpo", "ppo", "ppo_scalar_rm",
                                                               "eval", "report"]
    assert all(0 <= x <= 1 for head in s["tower"].values() for x in head.values()) and list(s["tower"]) == ["scene_accuracy", "lookup_accuracy", "patch_accuracy"]
    assert all(v["seconds"] > 0 for v in s["stages"].values())
    rm = s["reward_model"]
    assert 0 <= rm["accuracy"] <= 1 and 0 <= rm["gold_accuracy"] <= 1 and 0 < rm["label_agreement"] <= 1
    assert f"[10/12] ppo_scalar_rm: 1 iterations from {out}/runs/sft + reward model {out}/runs/reward on" in r.stdout
    for method in ("dpo", "ppo", "ppo_scalar_rm"):
        m = s[method]
        assert 0 <= m["win_rate"] <= 1 and 0 <= m["rm_win_rate"] <= 1 and 0 <= m["judge_score"] <= 1
        assert abs(m["kl"]) < 50 and m["num_prompts"] == 8 and 1 <= m["length"] <= 8
    assert 0 <= s["sft"]["judge_score"] <= 1
    image = s["sft"]["image"]  # 8 eval rows: one batch of 8
    assert image["num_rows"] == 8 and image["gap"] == pytest.approx(image["nll_shuffled"] - image["nll_real"])

    # the files, and the numbers of summary.json in them
    report = (out / "report.md").read_text()
    numbers = [rm["accuracy"], rm["gold_accuracy"], rm["label_agreement"], s["sft"]["judge_score"],
               s["tower"]["patch_accuracy"]["kind"]]
    numbers += [s[m][k] for m in ("dpo", "ppo", "ppo_scalar_rm") for k in ("win_rate", "rm_win_rate", "judge_score")]
    for x in numbers:
        assert f"{x:.3f}" in report, x
    assert f"{image['nll_real']:.4f} with their own images and {image['nll_shuffled']:.4f}" in report
    assert "held-out preference pairs, 50% of them corrections that only the image" in report
    # the comparisons stage: SFT's own answers (none differ in score after 3 steps) + 16 generator pairs
    c = s["comparisons"]
    assert c["prompts"] == 16 and c["mixed"] == 16 and c["pairs"] + c["prompts_without_pair"] <= 16
    cmp_card = json.loads((out / "data" / "comparisons" / "jaxpref_dataset.json").read_text())
    assert cmp_card["splits"]["train"]["num_rows"] == c["pairs"] + 16 and cmp_card["splits"]["eval"]["num_rows"] == 8
    assert len((out / "data" / "comparisons" / "samples.jsonl").read_text().splitlines()) == 16
    assert f"collected comparisons of SFT's own answers (2 per prompt, scored by the gold judge with 10% of the " \
           f"labels flipped, as raters err: {c['pairs']} pairs)" in report
    # two DPO rounds: the second from the first, on comparisons of the first's answers (paired
    # round_pairs, trained round_steps steps)
    rounds = s["dpo_rounds"]
    assert [(d["round"], d["start"], d["data"], d["output_dir"]) for d in rounds] == [
        (1, "runs/sft", "data/comparisons", "runs/dpo-rounds/round-1"),
        (2, "runs/dpo-rounds/round-1", "runs/dpo-rounds/comparisons-2", "runs/dpo")]
    assert rounds[0]["pairs"] == c["pairs"] and (out / "runs" / "dpo-rounds" / "round-1" / "model.safetensors").exists()
    second = json.loads((out / "runs" / "dpo-rounds" / "comparisons-2" / "comparisons.json").read_text())
    assert second["args"]["policy"] == str(out / "runs" / "dpo-rounds" / "round-1") and second["args"]["seed"] == 2000
    assert second["args"]["pairs"] == "best-rest"
    assert json.loads((out / "data" / "comparisons" / "comparisons.json").read_text())["args"]["pairs"] == "best-worst"
    assert f"| 2 | `runs/dpo-rounds/round-1` | 1 | best-rest | {second['train']['pairs']} |" in report
    assert "PPO's rounds (iterated RLHF)" in report and "| 0 | 2 | `runs/dpo` |" in report
    assert (f"| 1 | 2 -> 3 | `runs/ppo-rounds/round-1` (1 steps from `runs/dpo`) | {s['ppo_rounds'][0]['pairs']} |"
            in report)
    assert "against the implicit reward of `runs/dpo` (beta 0.1" in report
    assert "(2 iterations, then 1 round of 1 more, each against a new DPO round" in report
    assert "- During PPO training (held-out, step 1 -> 2, before its rounds): reward" in report  # one reward's
    last = yaml.safe_load((out / "runs" / "dpo" / "config.yaml").read_text())
    assert last["model"]["name_or_path"] == str(out / "runs" / "dpo-rounds" / "round-1") and last["ref_model"] is None
    assert last["data"]["dataset_name"] == str(out / "runs" / "dpo-rounds" / "comparisons-2")
    assert (last["max_steps"], last["warmup_steps"]) == (1, 0)
    round1 = yaml.safe_load((out / "runs" / "dpo-rounds" / "round-1" / "config.yaml").read_text())
    assert round1["max_steps"] == 2
    # PPO: 2 iterations against the implicit reward of runs/dpo, then one round: comparisons of its own
    # answers (seeds after DPO's two rounds'), a DPO round from runs/dpo on them, PPO resumed to 3 against it
    assert s["ppo_rounds"] == [{
        "round": 1, "policy_steps": 2, "max_steps": 3, "data": "runs/ppo-rounds/comparisons-1", "dpo_start": "runs/dpo",
        "reward_model": "runs/ppo-rounds/round-1", "dpo_steps": 1, "pairing": "best-rest",
        **{k: s["ppo_rounds"][0][k] for k in ("prompts", "pairs", "prompts_without_pair", "judge_score",
                                              "best_judge_score")}}]
    assert s["ppo_rounds"][0]["prompts"] == 16
    assert json.loads((out / "runs" / "ppo-rounds" / "rounds.json").read_text()) == s["ppo_rounds"]
    made = json.loads((out / "runs" / "ppo-rounds" / "comparisons-1" / "comparisons.json").read_text())
    assert made["args"]["policy"] == str(out / "runs" / "ppo") and made["args"]["seed"] == 3000
    assert made["args"]["pairs"] == "best-rest" and made["train"]["pairs"] == s["ppo_rounds"][0]["pairs"]
    dpo_r1 = yaml.safe_load((out / "runs" / "ppo-rounds" / "round-1" / "config.yaml").read_text())
    assert (dpo_r1["model"]["name_or_path"], dpo_r1["data"]["dataset_name"], dpo_r1["max_steps"]) == (
        str(out / "runs" / "dpo"), str(out / "runs" / "ppo-rounds" / "comparisons-1"), 1)
    ppo_cfg = yaml.safe_load((out / "runs" / "ppo" / "config.yaml").read_text())
    assert (ppo_cfg["reward_model_type"], ppo_cfg["reward_model_path"], ppo_cfg["value_model_path"],
            ppo_cfg["max_steps"]) == ("implicit", str(out / "runs" / "ppo-rounds" / "round-1"),
                                      str(out / "runs" / "reward"), 3)
    ppo_steps = [r["step"] for r in map(json.loads, open(out / "runs" / "ppo" / "metrics.jsonl")) if "loss" in r]
    assert ppo_steps == [1, 2, 3]  # one run of three iterations, resumed once
    assert sorted(os.listdir(out / "runs" / "ppo" / "checkpoints"))[-1] == "3"
    # best-of-n of SFT: k = 1, 2, picked by the judge and the reward model
    curve = s["best_of_n"]
    bon = [json.loads(line) for line in open(out / "eval" / "best_of_n" / "best_of_n.jsonl")]
    agreement = agreement_by_question(bon)
    assert agreement["all"]["prompts"] == 8 and f"| all | 8 | {agreement['all']['pairs']} |" in report
    assert [p["k"] for p in curve] == [1, 2] and curve[0]["oracle_win_rate"] == curve[0]["rm_pick_win_rate"]
    assert curve[1]["oracle_win_rate"] >= curve[1]["rm_pick_win_rate"] and "### Best-of-n" in report
    assert f"| 2 | 0.19 | {curve[1]['oracle_win_rate']:.3f} |" in report
    stored = json.loads((out / "eval" / "best_of_n" / "best_of_n.json").read_text())
    assert stored["curve"] == curve and stored["agreement"] == agreement  # the report's table is the stored one
    # the judge's scores before and after: the eval stage's win-rates again, counted per question type
    judges = judge_table({m: [json.loads(line) for line in open(out / "eval" / m / "samples.jsonl")]
                          for m in ("dpo", "ppo", "ppo_scalar_rm")})
    assert sum(row["prompts"] for q, row in judges.items() if q != "all") == judges["all"]["prompts"] == 8
    for m in ("dpo", "ppo", "ppo_scalar_rm"):
        assert judges["all"][f"{m}_win"] == pytest.approx(s[m]["win_rate"])
        assert np.mean(judges["all"][m]) == pytest.approx(s[m]["judge_score"])
    assert np.mean(judges["all"]["sft"]) == pytest.approx(s["sft"]["judge_score"])
    assert "### The judge's scores before and after" in report
    grounded = grounded_table({m: [json.loads(line) for line in open(out / "eval" / m / "samples.jsonl")]
                               for m in ("dpo", "ppo", "ppo_scalar_rm")})
    assert ("### Answers that list the scene" in report) == (grounded["sft"]["prompts"] > 0)
    for name, row in grounded.items():
        assert 0 <= (row["share"] or 0) <= 1 and (not row["prompts"] or f"| {model_label(name)} | {row['share']:.2f} |"
                                                   in report)
    for q, row in judges.items():
        assert f"| {q} | {row['prompts']} | {np.mean(row['sft']):.3f} |" in report
    # each model's reads: greedy answers to the same 8 held-out short questions, stored and in the report
    assert list(s["reads"]) == ["pretrain", "pretrain2", "sft", "dpo", "ppo", "ppo_scalar_rm"]
    assert "### What the models read off the image" in report
    for name, r in s["reads"].items():
        answers = [json.loads(line) for line in open(out / "eval" / "reads" / name / "reads.jsonl")]
        assert r["num_questions"] == len(answers) == sum(k["num"] for k in r["by_kind"].values()) == 8
        assert r["exact_match"] == pytest.approx(np.mean([a["said"] == a["answer"] for a in answers]))
        assert f"| {model_label(name)} | {r['exact_match']:.3f} |" in report
    assert len({tuple(json.loads(line)["prompt"] for line in open(out / "eval" / "reads" / n / "reads.jsonl"))
                for n in s["reads"]}) == 1  # the same questions for every model
    for name in ("reward_model", "ppo", "win_rates", "judge_scores", "examples"):
        assert f"img/{name}.png" in report
        with Image.open(out / "img" / f"{name}.png") as im:
            assert im.width > 200 and im.height > 200
    assert "## Reward hacking" in report and "of 8 prompts" in report
    assert "The first 8 held-out prompts with each model's response" in report  # NUM_EXAMPLES, 8 eval prompts
    page = (out / "examples.html").read_text()
    samples = [json.loads(line) for line in open(out / "eval" / "ppo" / "samples.jsonl")]
    assert page.count('src="data:image/png;base64,') == 8
    assert samples[0]["prompt"] in page
    for method in ("reward_model", "dpo", "ppo", "ppo_scalar_rm"):
        assert (out / "eval" / method / "eval.json").exists()
    # the SFT trainer saved a checkpoint every step: what an interrupted stage resumes from
    assert (out / "runs" / "sft" / "checkpoints").is_dir()
    assert (out / "runs" / "ppo" / "model.safetensors").exists()

    # a re-run skips every stage (nothing is recomputed: the recorded times stay)
    capsys.readouterr()
    t0 = time.perf_counter()
    again = run_demo(str(out), quick=True, sets=SETS)
    assert time.perf_counter() - t0 < max(5.0, first / 10)
    printed = capsys.readouterr().out
    assert printed.count("finished in an earlier run") == len(STAGES)
    assert again["stages"] == s["stages"] and json.loads((out / "summary.json").read_text()) == s

    # a stage not recorded as finished runs again; the others are skipped
    del s["stages"]["report"]
    (out / "summary.json").write_text(json.dumps(s))
    (out / "report.md").unlink()
    run_demo(str(out), quick=True, sets=SETS)
    assert capsys.readouterr().out.count("finished in an earlier run") == len(STAGES) - 1
    assert (out / "report.md").exists() and "report" in json.loads((out / "summary.json").read_text())["stages"]

    # a ppo stage stopped in its round, after the round's comparisons, continues there: neither the first
    # iterations nor the comparisons are redone, and the trainers resume at their last step
    (out / "runs" / "ppo-rounds" / "rounds.json").unlink()
    policy = (out / "runs" / "ppo" / "model.safetensors").read_bytes()
    stage = next(st for st in STAGES if st.name == "ppo")
    result = stage.run(Demo(out=str(out), plan=make_plan(True, SETS), quick=True, configs=default_configs_dir()))
    printed = capsys.readouterr().out
    assert result == {"ppo_rounds": s["ppo_rounds"]} and "PPO 2 -> 3 iterations" in printed
    assert "comparisons of" not in printed  # nothing collected again, and no iteration taken again:
    assert [r["step"] for r in map(json.loads, open(out / "runs" / "ppo" / "metrics.jsonl")) if "loss" in r] == \
        [1, 2, 3]
    assert (out / "runs" / "ppo" / "model.safetensors").read_bytes() == policy

    # another plan into the same DIR is refused, naming the difference
    with pytest.raises(DemoError, match=r"sft\.max_steps: 3 -> 4"):
        run_demo(str(out), quick=True, sets=SETS + ["sft.max_steps=4"])
    with pytest.raises(DemoError, match="made with the quick plan .* \\(the full plan\\)"):
        run_demo(str(out), quick=False, sets=SETS)

    # --reuse: a new DIR without corrections among the preference pairs regenerates that dataset only, takes
    # the tower, pretrain and sft runs from `out` (the same files) and runs the rest
    capsys.readouterr()
    new = tmp_path / "plain"
    r = run_demo(str(new), quick=True, sets=SETS + ["data.corrected_fraction=0.0"], reuse=str(out))
    printed = capsys.readouterr().out
    ran = [st.name for st in STAGES if "reused_from" not in r["stages"][st.name]]
    assert ran == ["data", "comparisons", "reward", "dpo", "ppo", "ppo_scalar_rm", "eval", "report"]
    assert printed.count(f"reused from {out} (finished there in") == 4
    assert f"[1/12] data: reused from {out}: data/short, data/sft, data/prompt\n[1/12] data: train rows " \
           f"preference 32; " \
           f"8 eval rows each" in printed
    assert r["reused"] == {"from": str(out), "parts": ["data/short", "data/sft", "data/prompt", "tower", "pretrain",
                                                       "pretrain2", "sft"]}
    for name in ("tower", "sft"):
        assert r["stages"][name] == {"seconds": s["stages"][name]["seconds"], "reused_from": str(out)}
        assert (new / "runs" / name / "model.safetensors").read_bytes() == \
            (out / "runs" / name / "model.safetensors").read_bytes()
    assert r["tower"] == s["tower"] and json.loads((new / "summary.json").read_text())["stages"] == r["stages"]
    for kind, same in (("short", True), ("preference", False)):
        files = sorted(os.listdir(out / "data" / kind))
        assert all(((new / "data" / kind / f).read_bytes() == (out / "data" / kind / f).read_bytes()) == same
                   for f in files if f.startswith("train"))
    assert r["ppo"]["num_prompts"] == 8 and f"(reused from `{out}`)" in (new / "report.md").read_text()
    assert "accuracy on the generator's held-out preference pairs: " in (new / "report.md").read_text()
    (tmp_path / "copy").mkdir()  # another source for the same DIR is refused
    (tmp_path / "copy" / "summary.json").write_text((out / "summary.json").read_text())
    with pytest.raises(DemoError, match="was started from"):
        run_demo(str(new), quick=True, sets=SETS + ["data.corrected_fraction=0.0"], reuse=str(tmp_path / "copy"))


def test_a_different_plan_or_config_is_refused_before_anything_runs(tmp_path, capsys):
    """Tested on a DIR whose summary.json records every stage as finished: nothing but the checks runs."""
    from jaxpref.cli import main

    out = tmp_path / "demo"
    demo = Demo(out=str(out), plan=make_plan(True, SETS), quick=True, configs=default_configs_dir())
    stages = {st.name: {"seconds": 1.0} for st in STAGES}
    write_summary(str(out), {"quick": True, "plan": demo.plan, "configs": config_fingerprints(demo), "stages": stages})
    assert run_demo(str(out), quick=True, sets=SETS)["stages"] == stages
    assert capsys.readouterr().out.count("finished in an earlier run") == len(STAGES)

    assert main(["demo", "--out", str(out), *_set_args(SETS)]) == 2  # the full plan into a quick DIR
    assert "made with the quick plan" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out), *_set_args(SETS + ["eval.num=4"])]) == 2
    assert "eval.num: 8 -> 4" in capsys.readouterr().err

    # the trainers' YAML files are part of what must match
    configs = tmp_path / "configs"
    configs.mkdir()
    for kind in ("pretrain", "sft", "reward", "dpo", "ppo"):
        text = open(os.path.join(default_configs_dir(), f"{kind}.yaml")).read()
        (configs / f"{kind}.yaml").write_text(text + ("learning_rate: 0.5\n" if kind == "dpo" else ""))
    with pytest.raises(DemoError, match=r"stage\(s\) dpo differs"):
        run_demo(str(out), quick=True, sets=SETS, configs=str(configs))

    # a directory that is not a demo's is never written into
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("")
    with pytest.raises(DemoError, match="not a demo directory"):
        run_demo(str(other), quick=True, sets=SETS)


def test_until_stops_after_the_stage_and_a_rerun_without_it_goes_on(tmp_path, capsys):
    """--until runs what is left up to its stage and no further; it is not part of the plan."""
    from jaxpref.cli import main

    out = tmp_path / "demo"
    with pytest.raises(DemoError, match="--until sfft: not a stage; the stages: data, tower, pretrain, pretrain2, sft"):
        run_demo(str(out), quick=True, sets=SETS, until="sfft")
    assert not out.exists()
    assert main(["demo", "--quick", "--out", str(out), "--until", "data", *_set_args(SETS)]) == 0
    printed = capsys.readouterr().out
    assert "[1/12] data:" in printed and "[2/12]" not in printed
    assert "stopped after data (--until); the same command without --until goes on from tower" in printed
    s = json.loads((out / "summary.json").read_text())
    assert list(s["stages"]) == ["data"] and (out / "data" / "short").is_dir() and not (out / "runs").exists()

    # a DIR whose summary records the stages up to sft: nothing runs up to sft, and nothing after it
    demo = Demo(out=str(out), plan=make_plan(True, SETS), quick=True, configs=default_configs_dir())
    done = {name: {"seconds": 1.0} for name in ("data", "tower", "pretrain", "pretrain2", "sft")}
    write_summary(str(out), {**s, "configs": config_fingerprints(demo), "stages": done})
    assert run_demo(str(out), quick=True, sets=SETS, until="sft")["stages"] == done
    printed = capsys.readouterr().out
    assert printed.count("finished in an earlier run") == 5 and "[6/12]" not in printed
    assert "goes on from comparisons" in printed


def test_reuse_takes_a_stage_only_with_its_settings_and_everything_it_reads(tmp_path):
    demo = Demo(out=str(tmp_path / "a"), plan=make_plan(True, SETS), quick=True, configs=default_configs_dir())
    source = {"quick": True, "plan": demo.plan, "configs": config_fingerprints(demo),
              "stages": {st.name: {"seconds": 1.0} for st in STAGES}}

    def reusable(sets):
        other = dataclasses.replace(demo, plan=make_plan(True, SETS + sets))
        return reusable_stages(source, other.plan, config_fingerprints(other))

    kinds = ["data/short", "data/sft", "data/preference", "data/prompt"]
    everything = kinds + [st.name for st in STAGES if st.name != "report"]  # the report is always rewritten
    assert reusable([]) == everything
    upto_sft = ["data", "tower", "pretrain", "pretrain2", "sft"]
    # PPO against the scalar reward model has its own plan entries: it stays
    assert reusable(["ppo.kl_coef=0.1"]) == kinds + upto_sft + ["comparisons", "reward", "dpo", "ppo_scalar_rm"]
    assert reusable(["ppo_scalar_rm.kl_coef=0.1"]) == kinds + upto_sft + ["comparisons", "reward", "dpo", "ppo"]
    assert reusable(["reward.max_steps=5"]) == kinds + upto_sft + ["comparisons", "dpo"]
    # new comparisons: everything trained on them, and PPO against their reward model, run again
    assert reusable(["comparisons.n=3"]) == kinds + upto_sft
    # DPO's round settings, kept in the comparisons section, are DPO's, and PPO reads DPO (its final
    # policy is PPO's reward model with ppo.reward_model_type=implicit), so both run again
    more_rounds = kinds + upto_sft + ["comparisons", "reward", "ppo_scalar_rm"]
    assert reusable(["comparisons.dpo_rounds=3"]) == reusable(["comparisons.round_steps=7"]) == more_rounds
    assert reusable(["comparisons.round_pairs=all"]) == more_rounds
    # PPO's round settings are PPO's alone
    assert reusable(["comparisons.ppo_rounds=2"]) == reusable(["comparisons.ppo_round_steps=3"]) == \
        kinds + upto_sft + ["comparisons", "reward", "dpo", "ppo_scalar_rm"]
    assert reusable(["sft.max_steps=5"]) == kinds + ["data", "tower", "pretrain", "pretrain2"]
    # the second cosine reads the first; SFT and everything after read it
    assert reusable(["pretrain2.max_steps=5"]) == reusable(["pretrain2.seed=7"]) == kinds + ["data", "tower",
                                                                                           "pretrain"]
    assert reusable(["tower.steps=5"]) == kinds + ["data"]
    assert reusable(["data.eval_rows=4"]) == ["tower"]  # every dataset has an eval split
    assert reusable(["data.label_noise=0.2"]) == ["data/short", "data/sft", "data/prompt", "tower", "pretrain",
                                                  "pretrain2", "sft"]
    assert reusable(["data.sft_rows=64"]) == reusable(["data.sft_grounded_fraction=0.0"]) == \
        ["data/short", "data/preference", "data/prompt", "tower", "pretrain", "pretrain2"]
    assert reusable(["eval.num=4"]) == reusable(["eval.best_of=3"]) == everything[:-1]
    assert reusable(["eval.max_new_tokens=16"]) == kinds + upto_sft  # answers' length
    del source["stages"]["pretrain"]  # not finished there: nothing after it either
    assert reusable([]) == kinds + ["data", "tower"]

    # the source must be a demo, and not DIR itself; a stage's half-written outputs are not overwritten
    with pytest.raises(DemoError, match="not a demo directory"):
        run_demo(str(tmp_path / "b"), quick=True, sets=SETS, reuse=str(tmp_path))
    write_summary(demo.out, source)
    with pytest.raises(DemoError, match="that is --out itself"):
        run_demo(demo.out, quick=True, sets=SETS, reuse=demo.out)
    (tmp_path / "b" / "data" / "short").mkdir(parents=True)
    write_summary(str(tmp_path / "b"), {"quick": True, "plan": demo.plan, "configs": source["configs"], "stages": {}})
    with pytest.raises(DemoError, match=r"b/data/short exists, but data/short is not finished"):
        run_demo(str(tmp_path / "b"), quick=True, sets=SETS, reuse=demo.out)


def test_plan_settings_and_trainer_configs():
    plan = make_plan(False, ["sft.max_steps=7", "data.label_noise=0.2", "ppo.kl_coef=0.1"])
    assert plan["sft"]["max_steps"] == 7 and plan["data"]["label_noise"] == 0.2 and plan["ppo"]["kl_coef"] == "0.1"
    assert make_plan(True)["sft"]["max_steps"] == PLANS["quick"]["sft"]["max_steps"]
    for bad, msg in (("sft", "expected STAGE.KEY=VALUE"), ("nope.x=1", "unknown stage 'nope'"),
                     ("eval.nope=1", "eval has no setting 'nope'; its settings: num"),
                     ("data.eval_rows=many", "expected int"), ("data.sft_rows=0", "must be >= 1"),
                     ("comparisons.pairs=some", "comparisons.pairs: must be best-worst or best-rest or all"),
                     ("comparisons.prompts=short", "comparisons.prompts: must be prompt or sft"),
                     ("comparisons.n=1", "comparisons.n: must be >= 2"),
                     ("comparisons.ppo_rounds=-1", "comparisons.ppo_rounds: must be >= 0"),
                     ("comparisons.ppo_round_steps=0", "comparisons.ppo_round_steps: must be >= 1")):
        with pytest.raises(DemoError, match=msg):
            make_plan(False, [bad])

    demo = Demo(out="DIR", plan=make_plan(False, ["ppo.kl_coef=0.1"]), quick=False, configs=default_configs_dir())
    ppo = trainer_config("ppo", demo, "prompt", start="sft", reward_model="reward")
    assert (ppo.output_dir, ppo.data.dataset_name, ppo.model.name_or_path, ppo.reward_model_path) == (
        "DIR/runs/ppo", "DIR/data/prompt", "DIR/runs/sft", "DIR/runs/reward")
    assert ppo.max_steps == PLANS["full"]["ppo"]["max_steps"] and ppo.kl_coef == 0.1
    assert ppo.resume_from_checkpoint is True and ppo.response_length == 48  # the rest is jaxpref/tasks/shapes/configs/ppo.yaml
    # the ppo stage's config: the plans' implicit reward of DPO's final policy (whatever the rounds), the
    # value model from the scalar reward model; or, set to scalar, the YAML's reward model, without rounds
    stage = next(s for s in STAGES if s.name == "ppo")
    for sets in ([], ["comparisons.dpo_rounds=1"]):
        implicit = Demo(out="DIR", plan=make_plan(False, ["ppo.kl_coef=0.1"] + sets), quick=False,
                        configs=default_configs_dir())
        cfg = stage.config(implicit)
        assert (cfg.reward_model_type, cfg.reward_model_path, cfg.value_model_path, cfg.max_steps) == (
            "implicit", "DIR/runs/dpo", "DIR/runs/reward", PLANS["full"]["ppo"]["max_steps"])
        assert "its implicit reward, beta 0.1" in stage.describe(implicit) and "dpo" in stage.needs
        assert "; then 2 rounds of 40 iterations, each against a new DPO round (60 steps from the last)" in \
            stage.describe(implicit)
    # a round's PPO: the same run, resumed longer against the round's DPO policy (the value model as before)
    cfg = ppo_config(implicit, {"reward_model_path": "DIR/runs/ppo-rounds/round-1", "max_steps": 160})
    assert (cfg.reward_model_path, cfg.value_model_path, cfg.max_steps, cfg.output_dir) == (
        "DIR/runs/ppo-rounds/round-1", "DIR/runs/reward", 160, "DIR/runs/ppo")
    scalar = Demo(out="DIR", plan=make_plan(False, ["ppo.reward_model_type=scalar", "comparisons.ppo_rounds=0"]),
                  quick=False, configs=default_configs_dir())
    assert (stage.config(scalar).reward_model_path, stage.config(scalar).value_model_path) == ("DIR/runs/reward", None)
    with pytest.raises(DemoError, match="comparisons.ppo_rounds=2 needs ppo.reward_model_type=implicit"):
        config_fingerprints(dataclasses.replace(scalar, plan=make_plan(False, ["ppo.reward_model_type=scalar"])))
    with pytest.raises(DemoError, match="set ppo.max_steps rather than ppo.total_episodes"):
        config_fingerprints(dataclasses.replace(scalar, plan=make_plan(False, ["ppo.max_steps=0",
                                                                               "ppo.total_episodes=640"])))
    sft = next(st for st in STAGES if st.name == "sft").config(demo)
    assert sft.model.name_or_path == "DIR/runs/pretrain2" and sft.eval_steps == PLANS["full"]["sft"]["eval_steps"]
    assert sft.model.freeze_vision  # jaxpref/tasks/shapes/configs/sft.yaml: the pretrained tower stays as it is
    pre = trainer_config("sft", demo, "short", start="tower", name="pretrain")  # jaxpref/tasks/shapes/configs/pretrain.yaml
    assert (pre.output_dir, pre.data.dataset_name, pre.max_steps, pre.per_device_train_batch_size) == (
        "DIR/runs/pretrain", "DIR/data/short", PLANS["full"]["pretrain"]["max_steps"], 32)
    assert pre.model.freeze_vision and [s.name for s in STAGES if s.config is not None] == [
        "pretrain", "pretrain2", "sft", "reward", "dpo", "ppo", "ppo_scalar_rm"]
    # the classic route: ppo.yaml from SFT against the scalar reward model, value model from it too
    rm = next(st for st in STAGES if st.name == "ppo_scalar_rm").config(demo)
    assert (rm.reward_model_type, rm.reward_model_path, rm.model.name_or_path, rm.output_dir) == (
        "scalar", "DIR/runs/reward", "DIR/runs/sft", "DIR/runs/ppo_scalar_rm")
    assert rm.max_steps == PLANS["full"]["ppo_scalar_rm"]["max_steps"] and rm.judge == "shapes"
    # the second cosine: jaxpref/tasks/shapes/configs/pretrain.yaml again, from the first, with its own steps and data order
    pre2 = next(st for st in STAGES if st.name == "pretrain2").config(demo)
    assert (pre2.output_dir, pre2.model.name_or_path, pre2.data.dataset_name, pre2.max_steps, pre2.seed) == (
        "DIR/runs/pretrain2", "DIR/runs/pretrain", "DIR/data/short", 600, 43)
    assert (pre2.learning_rate, pre2.lr_scheduler_type, pre2.warmup_steps) == (
        pre.learning_rate, pre.lr_scheduler_type, pre.warmup_steps) and pre2.model.freeze_vision


def test_a_tower_left_by_a_stopped_run_is_reused_with_its_own_time_only_if_the_plan_made_it(tmp_path):
    """The tower stage writes runs/tower whole before summary.json records it: a run stopped between the
    two reuses that tower (and reports the minutes its training took), unless another plan made it."""
    from jaxpref.tasks.shapes.demo import STAGE_SECONDS, stage_tower

    demo = Demo(out=str(tmp_path), plan=make_plan(True, SETS), quick=True, configs=default_configs_dir())
    first = stage_tower(demo)
    made = json.loads((tmp_path / "runs" / "tower" / "tower.json").read_text())
    assert first[STAGE_SECONDS] == made["seconds"] > 0 and first["tower"] == {k: made[k] for k in ("scene_accuracy", "lookup_accuracy", "patch_accuracy")}
    weights = tmp_path / "runs" / "tower" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert stage_tower(demo) == first and weights.stat().st_mtime_ns == stamp  # reused, not trained again

    other = Demo(out=str(tmp_path), plan=make_plan(True, SETS + ["tower.steps=4"]), quick=True,
                 configs=default_configs_dir())
    with pytest.raises(DemoError, match="'steps': 3.*'steps': 4"):
        stage_tower(other)


def test_the_report_names_the_reward_ppo_was_tuned_against(tmp_path):
    from jaxpref.tasks.shapes.report import ppo_reward_text

    os.makedirs(tmp_path / "runs" / "ppo")
    config = tmp_path / "runs" / "ppo" / "config.yaml"
    config.write_text(f"reward_model_path: {tmp_path}/runs/reward\n")
    assert ppo_reward_text(str(tmp_path)) == "the reward model `runs/reward`"
    config.write_text(f"reward_model_path: {tmp_path}/runs/dpo-rounds/round-1\nreward_model_type: implicit\n"
                      f"implicit_reward_beta: 0.1\nvalue_model_path: {tmp_path}/runs/reward\n")
    assert ppo_reward_text(str(tmp_path)) == ("the implicit reward of `runs/dpo-rounds/round-1` (beta 0.1 x log pi / "
                                               "pi_sft; value model from `runs/reward`)")
    # after PPO's rounds the config names the last round's reward model: the report names the first's
    assert ppo_reward_text(str(tmp_path), "runs/dpo").startswith("the implicit reward of `runs/dpo` (beta 0.1")


def test_judge_bins_split_the_scores_at_0_one_half_and_1():
    scores = [0.0, 0.0, 0.2, 0.49, 0.5, 0.99, 1.0, 0.0]
    assert judge_bins(scores) == pytest.approx([3 / 8, 2 / 8, 2 / 8, 1 / 8])
    assert sum(judge_bins(np.random.default_rng(0).uniform(0, 1, 100).round(1))) == pytest.approx(1.0)
    assert judge_bins([]) == [0.0] * 4


def test_judge_table_refuses_comparisons_of_different_prompts():
    scene = ('{"shapes": [{"color": "red", "dx": 0.0, "dy": 0.0, "kind": "circle", "position": "left", '
             '"size": "small"}]}')
    row = {"prompt": "What color is the circle?", "scene": scene, "policy_judge": 1.0, "reference_judge": 0.0}
    table = judge_table({"dpo": [dict(row, index=0)], "ppo": [dict(row, index=0, reference_judge=1.0)]})
    assert table["color"]["prompts"] == 1 and table["all"]["dpo_win"] == 1.0 and table["all"]["ppo_ties"] == 1.0
    with pytest.raises(ValueError, match="different prompts"):
        judge_table({"dpo": [dict(row, index=0)], "ppo": [dict(row, index=1)]})


def test_grounded_table_counts_answers_that_list_a_scene_of_two_or_more_shapes():
    two = ('{"shapes": [{"color": "red", "dx": 0.0, "dy": 0.0, "kind": "circle", "position": "left", "size": "small"}, '
           '{"color": "blue", "dx": 0.0, "dy": 0.0, "kind": "star", "position": "right", "size": "large"}]}')
    one = '{"shapes": [{"color": "red", "dx": 0.0, "dy": 0.0, "kind": "circle", "position": "left", "size": "small"}]}'
    listing = "A red circle on the left and a blue star on the right."
    rows = [  # (prompt, scene, policy, its judge score, reference, its judge score)
        ("Where is the red circle?", two, listing, 1.0, "On the right.", 0.0),
        ("What color is the star?", two, "It is blue.", 1.0, "There is a blue star and a red circle.", 0.8),
        ("Where is the red circle?", one, "A red circle on the left.", 1.0, "On the left.", 1.0),  # one shape: skipped
        ("How many shapes are there?", two, listing, 0.2, "Two.", 1.0),  # not color or locate: skipped
        ("Where is the blue star?", two, "A blue star on the right and a red square.", 0.1, "On the left.", 0.0),
    ]
    samples = [{"index": i, "prompt": p, "scene": sc, "policy": a, "policy_judge": sa, "reference": b,
                "reference_judge": sb} for i, (p, sc, a, sa, b, sb) in enumerate(rows)]
    table = grounded_table({"dpo": samples, "ppo": samples})
    assert table["sft"] == {"prompts": 3, "share": pytest.approx(1 / 3), "score_listed": 0.8, "score_other": 0.0}
    assert table["ppo"] == table["dpo"] == {"prompts": 3, "share": pytest.approx(1 / 3), "score_listed": 1.0,
                                            "score_other": pytest.approx(0.55)}  # a red square is not the circle


def test_a_base_made_from_scratch_is_what_the_demo_starts_from(tmp_path, monkeypatch):
    """write_base packs a from-scratch demo's pretraining (model files, jaxpref_base.json, a card naming
    the command and commit); a demo without --from-scratch takes it for tower/pretrain/pretrain2 (their
    recorded times, no short-question data) and its SFT starts from exactly those weights."""
    scratch = tmp_path / "scratch"
    run_demo(str(scratch), quick=True, sets=SETS, until="pretrain2")
    base = tmp_path / "base"
    info = write_base(str(scratch), str(base))
    card = (base / "README.md").read_text()
    assert "jaxpref demo --from-scratch --until pretrain2" in card and info["commit"] in card
    assert info["commit"] == json.loads((scratch / "summary.json").read_text())["commit"]  # where the stages ran
    assert read_base_info(str(base))["stages"]["tower"] == json.loads((scratch / "summary.json").read_text())[
        "stages"]["tower"]
    run_demo(str(tmp_path / "data-only"), quick=True, sets=SETS, until="data")
    with pytest.raises(DemoError, match="has not finished tower, pretrain, pretrain2"):
        write_base(str(tmp_path / "data-only"), str(tmp_path / "nope"))

    monkeypatch.setattr(demo_module, "BASE_DIR", str(base))
    out = tmp_path / "demo"
    sets = [s for s in SETS if not s.startswith("base.")]
    summary = run_demo(str(out), quick=True, sets=sets, until="sft")
    for stage in ("tower", "pretrain", "pretrain2"):
        assert summary["stages"][stage] == {"seconds": info["stages"][stage]["seconds"],
                                            "shipped_base": info["commit"]}
    assert summary["tower"] == info["tower"]
    assert not (out / "data" / "short").exists() and not (out / "runs" / "tower").exists()
    for name in BASE_FILES:
        if (base / name).exists():
            assert (out / "runs" / "pretrain2" / name).read_bytes() == (base / name).read_bytes()
    sft_cfg = yaml.safe_load((out / "runs" / "sft" / "config.yaml").read_text())
    assert sft_cfg["model"]["name_or_path"] == str(out / "runs" / "pretrain2")
    # without a shipped base the message says how to make one
    monkeypatch.setattr(demo_module, "BASE_DIR", str(tmp_path / "no-base"))
    with pytest.raises(DemoError, match="no shipped base"):
        run_demo(str(tmp_path / "demo2"), quick=True, sets=sets, until="tower")
