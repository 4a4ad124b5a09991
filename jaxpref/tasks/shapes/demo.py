"""`jaxpref demo`: the whole pipeline on the built-in shapes task, stage by stage, ending in a report.

    jaxpref demo                                   # the full plan, from the shipped base -> runs/demo
    jaxpref demo --from-scratch                    # the tower and decoder pretraining too
    jaxpref demo --quick --out runs/demo-quick     # the quick plan
    jaxpref demo --quick --set sft.max_steps=50 --set eval.num=32     # change the plan: STAGE.KEY=VALUE

    from jaxpref.tasks.shapes.demo import run_demo
    summary = run_demo("runs/demo-quick", quick=True, sets=["ppo.max_steps=5"])

Stages (STAGES, in order), each a call into the code its own command runs:

  data     the shapes datasets (jaxpref.tasks.shapes.scenes.generate_split) -> DIR/data/{short,sft,preference,prompt}
           (short, the pretraining's, only with --from-scratch)
  tower    a vision tower pretrained on the scenes (jaxpref.tasks.shapes.tower)   -> DIR/runs/tower
  pretrain jaxpref/tasks/shapes/configs/pretrain.yaml (SFT on short questions), from DIR/runs/tower -> DIR/runs/pretrain
  pretrain2  the same config again from DIR/runs/pretrain: a second cosine from the peak rate, a fresh
           AdamW state and another data order (plan: pretrain2.seed) -> DIR/runs/pretrain2
           Without --from-scratch (base.from_scratch false) these three take the shipped base instead
           (BASE_DIR, made by them: its model becomes DIR/runs/pretrain2, their recorded times are kept)
  sft      jaxpref/tasks/shapes/configs/sft.yaml + the plan, from DIR/runs/pretrain2 -> DIR/runs/sft
  comparisons  SFT's own answers to the train prompts, judged with label noise and paired
           (jaxpref.eval.comparisons.collect)                            -> DIR/data/comparisons
  reward   jaxpref/tasks/shapes/configs/reward.yaml, from DIR/runs/sft on data/comparisons -> DIR/runs/reward
  dpo      jaxpref/tasks/shapes/configs/dpo.yaml, from DIR/runs/sft on data/comparisons    -> DIR/runs/dpo; with
           comparisons.dpo_rounds > 1, more rounds, each from the last on comparisons of its own answers
           (paired comparisons.round_pairs, comparisons.round_steps steps)
  ppo      jaxpref/tasks/shapes/configs/ppo.yaml, from DIR/runs/sft against the implicit reward of DIR/runs/dpo
           (ppo.reward_model_type=implicit, both plans; with scalar: DIR/runs/reward), the value model
           from DIR/runs/reward (ppo_config) -> DIR/runs/ppo; then comparisons.ppo_rounds rounds of
           iterated RLHF: comparisons of PPO's own answers, one more DPO round on them, PPO resumed
           comparisons.ppo_round_steps iterations against it (DIR/runs/ppo-rounds/)
  ppo_scalar_rm  the classic RLHF route: ppo.yaml from DIR/runs/sft against the scalar reward model
           DIR/runs/reward (value model from it too) -> DIR/runs/ppo_scalar_rm
  eval     jaxpref.eval with the judge `shapes`: the reward model's accuracy (against the labels and the
           judge); DPO, PPO and PPO-RM against SFT; best-of-n of SFT picked by the reward model; each
           model's reads (greedy answers to held-out short questions)
           -> DIR/eval/{reward_model,dpo,ppo,ppo_scalar_rm,best_of_n,reads/<model>}/
  report   DIR/report.md, DIR/img/*.png, DIR/examples.html

A trainer stage's config is its YAML file (jaxpref/tasks/shapes/configs/<stage>.yaml) read by
jaxpref.config.load_config (what `jaxpref sft --config F key=value` does) with the demo's paths and
the plan's entries for that stage as key=value overrides. PLANS holds the two plans' step and row
counts; `--set STAGE.KEY=VALUE` changes one entry (a trainer stage takes any config key, e.g.
`--set sft.model.name_or_path=tiny`).

DIR/summary.json is rewritten after every stage: the plan, a fingerprint of every trainer config,
`stages` (a stage is listed, with its wall time, only once it has finished) and the key results.
Re-running with the same DIR skips finished stages; an interrupted trainer stage resumes from its
latest Orbax checkpoint (trainers run with resume_from_checkpoint=true). A DIR made with another
plan or other trainer configs is refused (DemoError) rather than mixed.

`--reuse OTHER_DIR` starts a new DIR from another demo's finished stages: a stage is copied (hard-linked
where possible), not run, when OTHER_DIR finished it with the same plan entries and trainer config and
every stage it reads (Stage.needs) is reused too. Changing only the PPO settings re-runs ppo, eval and
the report:

    jaxpref demo --out runs/demo-ppo120 --reuse runs/demo --set ppo.max_steps=120

`--until STAGE` stops once STAGE has finished (it is not part of the plan): `jaxpref demo --until
pretrain` makes the pretrained decoder and stops; the same command without --until goes on from there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from jaxpref.config import ConfigError, load_config, to_dict
from jaxpref.eval import (EvalArgs, evaluate, evaluate_best_of_n, image_reliance, reward_model_accuracy, win, write,
                          write_best_of_n)
from jaxpref.eval.comparisons import PAIRINGS, ComparisonArgs, collect, format_stats
from jaxpref.tasks.shapes.data import write_shapes
from jaxpref.tasks.shapes.reads import agreement_by_question, short_answer_reads, write_reads
from jaxpref.tasks.shapes.report import (DATA_KINDS, METHODS, duration, format_summary, read_summary, summary_path,
                                          write_report)
from jaxpref.tasks.shapes.tower import TowerArgs, format_result, pretrain_tower
from jaxpref.train.checkpoint import CHECKPOINTS, complete_steps
from jaxpref.train.cli import RUNNERS
from jaxpref.train.loop import NonFiniteError, RunError

# Stage times on a 2-core CPU: docs/RESULTS.md and docs/BENCHMARKS.md.
# `data`: train rows per dataset kind and eval rows of each, and the SFT rows' mix: `sft_short_fraction` short
# questions, `sft_grounded_fraction` of the good color/locate answers listing the scene (docs/SHAPES.md);
# trainer stages: config overrides (any key of that trainer's config); `eval`: held-out prompts (0: every eval row), best-of-n's
# largest n (0: none) and the held-out short questions each model answers (`reads`,
# jaxpref.eval.short_answer_reads; 0: none).
PLANS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        # from_scratch false: the tower and pretraining stages take the shipped base (BASE_DIR) instead of running
        "base": {"from_scratch": False},
        "data": {"short_rows": 38400, "sft_rows": 5000, "preference_rows": 2000, "prompt_rows": 1500,
                 "eval_rows": 300, "image_size": 64, "label_noise": 0.1, "sft_short_fraction": 0.3,
                 "corrected_fraction": 0.5, "sft_grounded_fraction": 0.5, "seed": 0},
        "tower": {"preset": "small", "steps": 2400, "batch_size": 64, "learning_rate": 2e-3, "lookup_weight": 1.0,
                  "patch_weight": 0.3, "seed": 0},
        "pretrain": {"max_steps": 1200, "eval_steps": 400, "save_steps": 200},
        # a second cosine from the peak rate: the held-out reads were better than after 1 800 steps on one
        "pretrain2": {"max_steps": 600, "eval_steps": 300, "save_steps": 100, "seed": 43},
        "sft": {"max_steps": 800, "eval_steps": 400, "save_steps": 200},
        "comparisons": {"prompts": "prompt", "num": 0, "n": 4, "pairs": "best-worst", "label_noise": 0.1, "mix": 0,
                        "seed": 1000, "dpo_rounds": 5, "round_pairs": "all", "round_steps": 60,
                        "ppo_rounds": 2, "ppo_round_steps": 40},
        "reward": {"max_steps": 120, "eval_steps": 40, "save_steps": 40},
        "dpo": {"max_steps": 120, "eval_steps": 60, "save_steps": 40},
        "ppo": {"max_steps": 120, "eval_steps": 10, "save_steps": 10, "reward_model_type": "implicit"},
        "ppo_scalar_rm": {"max_steps": 120, "eval_steps": 20, "save_steps": 20, "reward_model_type": "scalar"},
        "eval": {"num": 0, "max_new_tokens": 48, "batch_size": 32, "best_of": 8, "reads": 1024},
    },
    "quick": {
        "base": {"from_scratch": False},
        "data": {"short_rows": 1600, "sft_rows": 1500, "preference_rows": 600, "prompt_rows": 300,
                 "eval_rows": 100, "image_size": 64, "label_noise": 0.1, "sft_short_fraction": 0.3,
                 "corrected_fraction": 0.5, "sft_grounded_fraction": 0.5, "seed": 0},
        "tower": {"preset": "small", "steps": 150, "batch_size": 64, "learning_rate": 2e-3, "lookup_weight": 1.0,
                  "patch_weight": 0.3, "seed": 0},
        "pretrain": {"max_steps": 50, "eval_steps": 50, "save_steps": 25},
        "pretrain2": {"max_steps": 25, "eval_steps": 25, "save_steps": 25, "seed": 43},
        # one evaluation per trainer and no PPO rounds: on a 2-core CPU compiles are most of the quick plan's time
        "sft": {"max_steps": 80, "eval_steps": 80, "save_steps": 80},
        "comparisons": {"prompts": "prompt", "num": 0, "n": 4, "pairs": "best-worst", "label_noise": 0.1, "mix": 0,
                        "seed": 1000, "dpo_rounds": 1, "round_pairs": "all", "round_steps": 20,
                        "ppo_rounds": 0, "ppo_round_steps": 5},
        "reward": {"max_steps": 30, "eval_steps": 30, "save_steps": 30},
        "dpo": {"max_steps": 20, "eval_steps": 20, "save_steps": 20},
        "ppo": {"max_steps": 5, "eval_steps": 5, "save_steps": 5, "reward_model_type": "implicit"},
        "ppo_scalar_rm": {"max_steps": 5, "eval_steps": 5, "save_steps": 5, "reward_model_type": "scalar"},
        "eval": {"num": 0, "max_new_tokens": 48, "batch_size": 32, "best_of": 2, "reads": 64},
    },
}

# the `data` plan entries each dataset kind depends on (every other entry: all of them)
DATA_SETTINGS = {"short": ("short_rows",), "sft": ("sft_rows", "sft_short_fraction", "sft_grounded_fraction"),
                 "preference": ("preference_rows", "label_noise", "corrected_fraction"), "prompt": ("prompt_rows",)}
READ_MODELS = ("pretrain", "pretrain2", "sft") + METHODS  # the models whose reads the eval stage measures
DATA_STAGES = ("comparisons",)  # datasets made by a stage of their own (DIR/data/<name>), after the data stage
# The pretrained base shipped with the task: `jaxpref demo --from-scratch --until pretrain2` then
# scripts/make_shapes_base.py (its README.md says the command, data, seed and commit). Without
# --from-scratch the tower, pretrain and pretrain2 stages take it instead of running.
BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "base")
BASE_INFO = "jaxpref_base.json"  # in BASE_DIR: what the base's stages measured and how long they took
PRETRAINING = ("tower", "pretrain", "pretrain2")  # the stages the shipped base stands for (pretrain2: its model)
BASE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
JUDGE = "shapes"  # the task's gold judge (jaxpref.tasks.shapes.judge), the raters and the evaluator
STAGE_SECONDS = "_stage_seconds"  # a stage's result may name its own time (the tower's, when reused)


class DemoError(RuntimeError):
    """A demo that cannot start or continue (bad --set, a DIR made with another plan ...)."""


@dataclasses.dataclass
class Demo:
    """One demo run: where it writes, its plan, and summary.json's contents."""

    out: str
    plan: dict
    quick: bool
    configs: str  # the directory of the trainers' YAML files (jaxpref/tasks/shapes/configs)
    summary: dict = dataclasses.field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the demo. `run(demo)` does the work and returns entries for summary.json (or None);
    `describe(demo)` is the banner's text; trainer stages also have `config(demo)`."""

    name: str
    run: Callable[[Demo], dict | None]
    describe: Callable[[Demo], str]
    config: Callable[[Demo], Any] | None = None
    needs: tuple[str, ...] = ()    # the stages whose outputs it reads
    outputs: tuple[str, ...] = ()  # what it writes, relative to DIR (--reuse copies these)
    results: tuple[str, ...] = ()  # the summary.json entries its run returns
    # plan -> the plan entries it is made with (what --reuse compares); None: its own section
    plan_entries: Callable[[dict], dict | None] | None = None


# ---------------------------------------------------------------------------
# trainer stages


def trainer_config(kind: str, demo: Demo, data: str, start: str | None = None, reward_model: str | None = None,
                   name: str | None = None, extra: dict | None = None, yaml: str | None = None):
    """The config of trainer stage `name` (default: `kind`), which runs trainer `kind` (sft, reward, dpo,
    ppo): jaxpref/tasks/shapes/configs/<yaml or name>.yaml through jaxpref.config.load_config with overrides
    output_dir=DIR/runs/<name>, data.dataset_name=DIR/data/<data>, model.name_or_path=DIR/runs/<start>
    (when given), reward_model_path=DIR/runs/<reward_model> (when given), resume_from_checkpoint=true,
    then the plan's entries for the stage, then `extra` (paths given as they are)."""

    name = name or kind
    overrides = {"output_dir": demo.path("runs", name), "data.dataset_name": demo.path("data", data),
                 "resume_from_checkpoint": "true"}
    if start is not None:
        overrides["model.name_or_path"] = demo.path("runs", start)
    if reward_model is not None:
        overrides["reward_model_path"] = demo.path("runs", reward_model)
    overrides.update(demo.plan.get(name, {}))
    overrides.update(extra or {})
    return load_config(kind, os.path.join(demo.configs, f"{yaml or name}.yaml"),
                       [f"{k}={_override_text(v)}" for k, v in overrides.items()])


def _override_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def trainer(kind: str, data: str, start: str | None = None, reward_model: str | None = None,
            name: str | None = None, config: Callable[[Demo], Any] | None = None,
            needs: tuple[str, ...] = (), yaml: str | None = None) -> Stage:
    """A stage `name` (default: `kind`) running jaxpref.train.RUNNERS[kind] on trainer_config(kind, ...)
    (jaxpref/tasks/shapes/configs/<yaml or name>.yaml), or on `config(demo)` when given (reading the stages `needs` too)."""
    name = name or kind
    config = config or (lambda demo: trainer_config(kind, demo, data, start, reward_model, name, yaml=yaml))

    def run(demo: Demo):

        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save at INFO
        RUNNERS[kind](config(demo))

    def describe(demo: Demo) -> str:
        cfg = config(demo)
        unit = "iterations" if kind == "ppo" else "steps"
        extra = f" + reward model {cfg.reward_model_path}" if kind == "ppo" else ""
        if kind == "ppo" and cfg.reward_model_type == "implicit":
            extra += f" (its implicit reward, beta {cfg.implicit_reward_beta}; value model from {cfg.value_model_path})"
        resumed = " (resuming from its last checkpoint)" if _has_checkpoints(cfg.output_dir) else ""
        return (f"{cfg.max_steps} {unit} from {cfg.model.name_or_path}{extra} on {cfg.data.dataset_name} "
                f"-> {cfg.output_dir}{resumed}")

    # a dataset a stage makes is reused with that stage (the data stage's datasets, one by one)
    needs = ((data if data in DATA_STAGES else f"data/{data}",)
             + tuple(s for s in (start, reward_model) if s is not None) + needs)
    return Stage(name, run, describe, config, needs=needs, outputs=(os.path.join("runs", name),))


def dpo_round_dir(demo: Demo, r: int) -> str:
    """Where DPO's round r trains: DIR/runs/dpo for the last round, DIR/runs/dpo-rounds/round-<r> before it."""
    rounds = demo.plan["comparisons"]["dpo_rounds"]
    return demo.path("runs", "dpo") if r == rounds else demo.path("runs", "dpo-rounds", f"round-{r}")


def ppo_config(demo: Demo, extra: dict | None = None):
    """jaxpref/tasks/shapes/configs/ppo.yaml from DIR/runs/sft against DIR/runs/reward; with reward_model_type
    "implicit" (both plans), against the implicit reward of DPO's final policy DIR/runs/dpo (every
    DPO round's comparisons; docs/TRAINING.md measures it against DPO's first round), the value model
    starting from DIR/runs/reward. `extra`: overrides after those (PPO's rounds: their reward model and
    iterations). PPO's rounds (comparisons.ppo_rounds > 0) retrain the DPO policy PPO reads its reward
    from, so they need the implicit reward."""
    cfg = trainer_config("ppo", demo, "prompt", "sft", "reward", extra=extra)
    if cfg.reward_model_type != "implicit":
        if demo.plan["comparisons"]["ppo_rounds"]:
            raise DemoError(f"comparisons.ppo_rounds={demo.plan['comparisons']['ppo_rounds']} needs "
                            f"ppo.reward_model_type=implicit (each round trains a new DPO round and PPO continues "
                            f"against its implicit reward), not {cfg.reward_model_type!r}: set "
                            f"comparisons.ppo_rounds=0 to tune against the scalar reward model")
        return cfg
    if demo.plan["comparisons"]["ppo_rounds"] and cfg.max_steps <= 0:
        raise DemoError(f"comparisons.ppo_rounds counts PPO's iterations on from ppo.max_steps, which is "
                        f"{cfg.max_steps}: set ppo.max_steps rather than ppo.total_episodes")
    return trainer_config("ppo", demo, "prompt", "sft", extra={
        "reward_model_path": demo.path("runs", "dpo"),
        "value_model_path": cfg.value_model_path or demo.path("runs", "reward"), **(extra or {})})


def dpo_round_config(demo: Demo, start: str, data: str, out: str):
    """The config of a DPO round after the first (DPO's rounds and PPO's): from `start` (also its
    reference) on the comparisons in `data` -> `out`, comparisons.round_steps steps, a sixth of them warm-up."""
    steps = demo.plan["comparisons"]["round_steps"]
    return trainer_config("dpo", demo, "comparisons", "sft", extra={
        "output_dir": out, "model.name_or_path": start, "data.dataset_name": data, "max_steps": steps,
        "warmup_steps": steps // 6})


ROUND_STATS = ("prompts", "pairs", "prompts_without_pair", "judge_score", "best_judge_score")  # kept per round


def _read_rounds(record: str) -> list[dict]:
    """The finished rounds a rounds.json records ([] before the first)."""
    if not os.path.exists(record):
        return []
    with open(record) as f:
        return json.load(f)


def _write_rounds(record: str, done: list[dict]):
    with open(record + ".tmp", "w") as f:
        json.dump(done, f, indent=2)
    os.replace(record + ".tmp", record)


def _round_comparisons(demo: Demo, policy: str, data: str, round_: int, head: str) -> dict:
    """A later round's comparisons of `policy`'s answers in `data` (collect_comparisons, round `round_`),
    or, when a stopped run finished them (comparisons.json written), their train split's counts."""
    stats_file = os.path.join(data, "comparisons.json")
    if os.path.exists(stats_file):  # collected before a stop
        with open(stats_file) as f:
            return json.load(f)["train"]
    print(f"  {head}: comparisons of {policy}'s answers -> {data}", flush=True)
    return collect_comparisons(demo, policy, data, round_)


def dpo_rounds_stage() -> Stage:
    """DPO, in `comparisons.dpo_rounds` rounds (online iterative DPO): round 1 trains from SFT on
    data/comparisons; each later round's start and reference is the previous round's policy, trained on
    comparisons of that policy's own answers (the comparisons stage's settings, new sampling and noise
    seeds, paired `comparisons.round_pairs`) in DIR/runs/dpo-rounds/comparisons-<r>, for
    `comparisons.round_steps` steps. Rounds before the last train into
    DIR/runs/dpo-rounds/round-<r>, the last into DIR/runs/dpo (what the eval stage reads). A stopped run
    continues in its round: finished datasets (comparisons.json written) and rounds (rounds.json) are kept,
    a trainer resumes from its checkpoints."""
    base = trainer("dpo", data="comparisons", start="sft")

    def paths(demo: Demo, r: int) -> tuple[str, str, str]:
        """(start, data, output_dir) of round r."""
        root, out = demo.path("runs", "dpo-rounds"), dpo_round_dir(demo, r)
        if r == 1:
            return demo.path("runs", "sft"), demo.path("data", "comparisons"), out
        return paths(demo, r - 1)[2], os.path.join(root, f"comparisons-{r}"), out

    def run(demo: Demo) -> dict:

        logging.getLogger("absl").setLevel(logging.WARNING)
        rounds = demo.plan["comparisons"]["dpo_rounds"]
        root = demo.path("runs", "dpo-rounds")
        os.makedirs(root, exist_ok=True)
        record = os.path.join(root, "rounds.json")
        done = _read_rounds(record)
        for r in range(len(done) + 1, rounds + 1):
            start, data, out = paths(demo, r)
            stats = demo.summary.get("comparisons", {})
            if r > 1:
                stats = _round_comparisons(demo, start, data, r, f"round {r}")
            print(f"  round {r}/{rounds}: DPO from {start} on {data} -> {out}", flush=True)
            c = demo.plan["comparisons"]
            if r > 1:  # later rounds: shorter, on more pairs per prompt (round_pairs)
                cfg = dpo_round_config(demo, start, data, out)
            else:
                cfg = trainer_config("dpo", demo, "comparisons", "sft", extra={
                    "output_dir": out, "model.name_or_path": start, "data.dataset_name": data})
            RUNNERS["dpo"](cfg)
            done.append({"round": r, "start": os.path.relpath(start, demo.out), "data": os.path.relpath(data, demo.out),
                         "output_dir": os.path.relpath(out, demo.out), "max_steps": cfg.max_steps,
                         "pairing": c["pairs"] if r == 1 else c["round_pairs"],
                         **{k: stats.get(k) for k in ROUND_STATS}})
            _write_rounds(record, done)
        return {"dpo_rounds": done}

    def describe(demo: Demo) -> str:
        rounds = demo.plan["comparisons"]["dpo_rounds"]
        if rounds == 1:
            return base.describe(demo)
        c = demo.plan["comparisons"]
        return (f"{rounds} rounds: {base.config(demo).max_steps} steps from {demo.path('runs', 'sft')} on "
                f"{demo.path('data', 'comparisons')}, then {c['round_steps']} steps a round, each from the last on "
                f"comparisons of its own answers (paired {c['round_pairs']}) -> {demo.path('runs', 'dpo')} "
                f"(earlier rounds in {demo.path('runs', 'dpo-rounds')})")

    return dataclasses.replace(base, run=run, describe=describe, outputs=base.outputs + ("runs/dpo-rounds",),
                               results=("dpo_rounds",), plan_entries=_with_round_keys("dpo", ROUND_KEYS))


def ppo_rounds_stage() -> Stage:
    """PPO (ppo_config: `ppo.max_steps` iterations), then `comparisons.ppo_rounds` rounds of iterated
    RLHF, each the loop DPO's rounds run but with PPO's answers: comparisons of the PPO policy's own
    answers (collect_comparisons, numbered after DPO's rounds for their seeds, paired
    `comparisons.round_pairs`) -> DIR/runs/ppo-rounds/comparisons-<r>; one more DPO round on them, from
    the last DPO policy (DIR/runs/dpo for the first) -> DIR/runs/ppo-rounds/round-<r> (dpo_round_config);
    then PPO resumed from its checkpoint for `comparisons.ppo_round_steps` more iterations against that
    round's implicit reward (its log-ratio to SFT, which sums every earlier round's). The policy stays in
    DIR/runs/ppo (what the eval stage reads; its metrics.jsonl runs on across rounds). A stopped run
    continues in its round: finished rounds are in DIR/runs/ppo-rounds/rounds.json, a round's finished
    comparisons (comparisons.json written) are kept, the trainers resume from their checkpoints."""
    base = trainer("ppo", data="prompt", start="sft", reward_model="reward", config=ppo_config, needs=("dpo",))

    def run(demo: Demo) -> dict:

        logging.getLogger("absl").setLevel(logging.WARNING)
        c = demo.plan["comparisons"]
        root = demo.path("runs", "ppo-rounds")
        os.makedirs(root, exist_ok=True)
        record = os.path.join(root, "rounds.json")
        done = _read_rounds(record)
        first, policy = ppo_config(demo), demo.path("runs", "ppo")
        if not done and not os.path.exists(os.path.join(root, "comparisons-1", "comparisons.json")):
            RUNNERS["ppo"](first)  # the first iterations (resuming from a checkpoint when stopped in them)
        for r in range(len(done) + 1, c["ppo_rounds"] + 1):
            data, out = os.path.join(root, f"comparisons-{r}"), os.path.join(root, f"round-{r}")
            start = demo.path("runs", "dpo") if r == 1 else os.path.join(root, f"round-{r - 1}")
            before, steps = first.max_steps + (r - 1) * c["ppo_round_steps"], first.max_steps + r * c["ppo_round_steps"]
            stats = _round_comparisons(demo, policy, data, c["dpo_rounds"] + r,
                                       f"PPO round {r}/{c['ppo_rounds']} (iteration {before})")
            print(f"  PPO round {r}/{c['ppo_rounds']}: DPO from {start} on {data} -> {out}", flush=True)
            dpo = dpo_round_config(demo, start, data, out)
            RUNNERS["dpo"](dpo)
            print(f"  PPO round {r}/{c['ppo_rounds']}: PPO {before} -> {steps} iterations against {out}'s implicit "
                  f"reward", flush=True)
            RUNNERS["ppo"](ppo_config(demo, {"reward_model_path": out, "max_steps": steps}))
            rel = lambda path: os.path.relpath(path, demo.out)
            done.append({"round": r, "policy_steps": before, "max_steps": steps, "data": rel(data),
                         "dpo_start": rel(start), "reward_model": rel(out), "dpo_steps": dpo.max_steps,
                         "pairing": c["round_pairs"], **{k: stats.get(k) for k in ROUND_STATS}})
            _write_rounds(record, done)
        return {"ppo_rounds": done}

    def describe(demo: Demo) -> str:
        c = demo.plan["comparisons"]
        if not c["ppo_rounds"]:
            return base.describe(demo)
        return (f"{base.describe(demo)}; then {c['ppo_rounds']} rounds of {c['ppo_round_steps']} iterations, each "
                f"against a new DPO round ({c['round_steps']} steps from the last) on comparisons of PPO's own "
                f"answers (paired {c['round_pairs']}) -> {demo.path('runs', 'ppo-rounds')}")

    return dataclasses.replace(base, run=run, describe=describe, outputs=base.outputs + ("runs/ppo-rounds",),
                               results=("ppo_rounds",), plan_entries=_with_round_keys("ppo", PPO_ROUND_KEYS))


def _with_round_keys(section: str, keys: tuple[str, ...]) -> Callable[[dict], dict]:
    """A Stage.plan_entries: the plan's `section` and the round settings `keys`, which live in `comparisons`."""
    def entries(plan: dict) -> dict:
        rounds = plan.get("comparisons", {})
        return {**plan.get(section, {}), **{f"comparisons.{k}": rounds.get(k) for k in keys}}
    return entries


def _has_checkpoints(output_dir: str) -> bool:

    return bool(complete_steps(os.path.join(output_dir, CHECKPOINTS)))


# ---------------------------------------------------------------------------
# data, eval, report


def stage_data(demo: Demo):
    """The shapes datasets in TRL's schema: DIR/data/<kind>/ with train and eval splits (parquet)."""

    p = demo.plan["data"]
    splits = {kind: [("train", p[f"{kind}_rows"]), ("eval", p["eval_rows"])] for kind in _kinds_to_write(demo)}
    write_shapes(demo.path("data"), splits, seed=p["seed"], image_size=p["image_size"], label_noise=p["label_noise"],
                 num_shards=4, command="jaxpref demo", sft_short_fraction=p["sft_short_fraction"],
                 corrected_fraction=p["corrected_fraction"], sft_grounded_fraction=p["sft_grounded_fraction"])


def _kinds_to_write(demo: Demo) -> list[str]:
    """The dataset kinds the data stage generates: all but those --reuse copied (and the short questions,
    which only the pretraining stages read, when the shipped base stands for them)."""
    reused = demo.summary.get("reused", {}).get("parts", [])
    return [kind for kind in DATA_KINDS if f"data/{kind}" not in reused
            and (kind != "short" or demo.plan["base"]["from_scratch"])]


def read_base_info(base: str | None = None) -> dict:
    """BASE_DIR/jaxpref_base.json (or `base`'s): the command, commit and plan that made the base, its stages'
    seconds and results (the tower's accuracies)."""
    base = base or BASE_DIR
    path = os.path.join(base, BASE_INFO)
    if not os.path.exists(path):
        raise DemoError(f"no shipped base in {base} (missing {BASE_INFO}): run `jaxpref demo --from-scratch`, "
                        f"or make one with scripts/make_shapes_base.py")
    with open(path) as f:
        return json.load(f)


def take_base(demo: Demo, stage: str) -> dict:
    """The shipped base in place of a pretraining stage: pretrain2's model is BASE_DIR's (linked or
    copied into DIR/runs/pretrain2); tower and pretrain make nothing. Returns the stage's summary entry."""
    info = read_base_info()
    if stage == "pretrain2":
        out = demo.path("runs", "pretrain2")
        os.makedirs(out, exist_ok=True)
        for name in BASE_FILES:
            if os.path.exists(os.path.join(BASE_DIR, name)) and not os.path.exists(os.path.join(out, name)):
                _link_or_copy(os.path.join(BASE_DIR, name), os.path.join(out, name))
    if stage == "tower" and "tower" in info:
        demo.summary["tower"] = info["tower"]
    return {"seconds": info["stages"][stage]["seconds"], "shipped_base": info["commit"]}


def current_commit() -> str | None:
    """The git commit jaxpref runs from (short hash; None outside a git checkout)."""
    r = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


def write_base(demo_dir: str, out: str | None = None, command: str = "jaxpref demo --from-scratch --until pretrain2",
               commit: str | None = None):
    """The base a from-scratch demo made (DIR/runs/pretrain2 and summary.json), as BASE_DIR holds it: the
    model files, jaxpref_base.json and a model card naming the command, data, seed and commit."""
    out = out or BASE_DIR
    summary = read_summary(demo_dir)
    missing = [s for s in PRETRAINING if s not in summary.get("stages", {})]
    if missing:
        raise DemoError(f"{demo_dir} has not finished {', '.join(missing)}: run `{command} --out {demo_dir}` first")
    if not summary["plan"]["base"]["from_scratch"]:
        raise DemoError(f"{demo_dir} took its pretraining from the shipped base; make a base with --from-scratch")
    commit = commit or summary.get("commit") or current_commit() or "unknown"  # the commit the stages ran at
    os.makedirs(out, exist_ok=True)
    for name in BASE_FILES:
        src = os.path.join(demo_dir, "runs", "pretrain2", name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, name))
    plan = {k: summary["plan"][k] for k in ("data",) + PRETRAINING}
    info = {"command": command, "commit": commit, "plan": plan, "tower": summary.get("tower", {}),
            "stages": {s: summary["stages"][s] for s in ("data",) + PRETRAINING}}
    with open(os.path.join(out, BASE_INFO), "w") as f:
        json.dump(info, f, indent=2)
    seconds = sum(info["stages"][s]["seconds"] for s in PRETRAINING)
    card = [
        "---", "library_name: jaxpref", "tags: [jaxpref, shapes, vision-language]", "---", "",
        "# shapes base: the built-in task's pretrained VLM", "",
        "The `small` preset (a SigLIP-style vision tower, a linear projector and a Gemma-style decoder, "
        "4.9 M parameters, float32) pretrained on jaxpref's built-in `shapes` task: the vision tower on the "
        "scenes (`jaxpref tower`), then the decoder on short questions about them (two cosine cycles of "
        "`jaxpref/tasks/shapes/configs/pretrain.yaml`). `jaxpref demo` starts its SFT from it; it stands in "
        "for the pretrained VLM a real RLHF run starts from.", "",
        f"Made with `{command}` at commit {commit} on a 2-core CPU ({seconds / 60:.0f} min of stages), then "
        "`scripts/make_shapes_base.py`. `jaxpref demo --from-scratch` reproduces it.", "",
        "| stage | plan | seconds |", "|---|---|---|",
        *[f"| {s} | `{json.dumps(plan[s])}` | {info['stages'][s]['seconds']:.0f} |" for s in ("data",) + PRETRAINING],
        "", f"Data: `jaxpref data shapes` rows as the plan's data entry says (seed {plan['data']['seed']}); "
        f"the tower's scenes are drawn fresh from seed {plan['tower']['seed']}.", "",
        f"Held-out tower accuracies: `{json.dumps(info['tower'])}`.", "",
        "Load it with `jaxpref.models.load_pretrained(DIR)` or transformers' `PaliGemmaForConditionalGeneration`; "
        "its tokenizer is the task's (`data.tokenizer: shapes`).", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(card))
    return info


def _describe_data(demo: Demo) -> str:
    p = demo.plan["data"]
    rows = ", ".join(f"{k} {p[f'{k}_rows']}" for k in _kinds_to_write(demo))
    return f"train rows {rows}; {p['eval_rows']} eval rows each -> {demo.path('data')}"


def stage_tower(demo: Demo) -> dict:
    """The vision tower pretrained on the task's scenes (`jaxpref tower`), the start of SFT."""

    p, out = demo.plan["tower"], demo.path("runs", "tower")
    if os.path.exists(os.path.join(out, "tower.json")):  # written, but the run stopped before summary.json
        with open(os.path.join(out, "tower.json")) as f:
            result = json.load(f)
        made = {k: result.get("args", {}).get(k) for k in p}
        if made != p:
            raise DemoError(f"{out} holds a tower made with {made}, not this plan's {p}: remove it or pick another DIR")
    else:
        result = pretrain_tower(TowerArgs(output_dir=out, preset=p["preset"], steps=p["steps"],
                                          batch_size=p["batch_size"], learning_rate=p["learning_rate"],
                                          lookup_weight=p["lookup_weight"], patch_weight=p["patch_weight"],
                                          seed=p["seed"]))
    print(f"  {format_result(result)}", flush=True)
    return {"tower": {k: result[k] for k in ("scene_accuracy", "lookup_accuracy", "patch_accuracy") if k in result},
            STAGE_SECONDS: result["seconds"]}  # the training's time, also when an earlier run made the tower


def _describe_tower(demo: Demo) -> str:
    p = demo.plan["tower"]
    return (f"{p['steps']} steps x {p['batch_size']} scenes on the `{p['preset']}` preset -> "
            f"{demo.path('runs', 'tower')}")


def stage_comparisons(demo: Demo) -> dict:
    """The SFT model's own answers, scored by the gold judge with label noise (the raters) and paired
    (jaxpref.eval.comparisons): DIR/data/comparisons, on which the reward model and DPO train; its eval split
    is the generator's held-out pairs (data/preference), so the reward model's accuracy keeps its meaning."""
    return {"comparisons": collect_comparisons(demo, demo.path("runs", "sft"), demo.path("data", "comparisons"))}


def collect_comparisons(demo: Demo, policy: str, out: str, round_: int = 1) -> dict:
    """jaxpref.eval.comparisons.collect of `policy`'s answers with the plan's `comparisons` settings into
    `out`, the eval split copied from data/preference; round r > 1 (DPO's later rounds) samples with
    seed + 1000 (r - 1) and noise seed r - 1 and pairs `round_pairs`. Prints and returns the train split's counts."""

    c, data = demo.plan["comparisons"], demo.path("data", "preference")
    stats = collect(ComparisonArgs(policy=policy, data=demo.path("data", c["prompts"]), out=out, judge=JUDGE, n=c["n"],
                                   pairs=c["pairs"] if round_ == 1 else c["round_pairs"],
                                   label_noise=c["label_noise"], num=c["num"] or None,
                                   eval_from=data, mix_from=data if c["mix"] else None, mix=c["mix"],
                                   seed=c["seed"] + 1000 * (round_ - 1), noise_seed=round_ - 1,
                                   skip_unscorable=c["prompts"] == "sft",  # its short questions have no judge
                                   max_new_tokens=demo.plan["eval"]["max_new_tokens"]))
    print("  " + format_stats(stats).replace("\n", "\n  "), flush=True)
    return stats["train"]


# the `comparisons` plan entries only DPO's later rounds read (the comparisons stage does not; PPO's
# rounds read them too, and need the dpo stage)
ROUND_KEYS = ("dpo_rounds", "round_pairs", "round_steps")
PPO_ROUND_KEYS = ("ppo_rounds", "ppo_round_steps")  # the ones only PPO's rounds read


def _comparisons_plan(plan: dict) -> dict:
    """The comparisons stage's plan entries: its section but the rounds' settings (ROUND_KEYS,
    PPO_ROUND_KEYS), and eval.max_new_tokens, which sets its answers' length."""
    return {**{k: v for k, v in plan.get("comparisons", {}).items() if k not in ROUND_KEYS + PPO_ROUND_KEYS},
            "eval.max_new_tokens": plan.get("eval", {}).get("max_new_tokens")}


def _describe_comparisons(demo: Demo) -> str:
    c = demo.plan["comparisons"]
    prompts = f"the first {c['num']}" if c["num"] else "every"
    mix = f", plus {c['mix']} of data/preference's pairs" if c["mix"] else ""
    return (f"{c['n']} answers of {demo.path('runs', 'sft')} to {prompts} train prompt of "
            f"{demo.path('data', c['prompts'])}, judged ({c['label_noise']:.0%} of the labels flipped), paired "
            f"{c['pairs']}{mix} -> {demo.path('data', 'comparisons')}")


def stage_eval(demo: Demo) -> dict:
    """The reward model's held-out accuracy, and DPO and PPO against SFT (jaxpref.eval), written to
    DIR/eval/<name>/; returns summary.json's result entries."""

    p = demo.plan["eval"]
    rm = reward_model_accuracy(demo.path("runs", "reward"), demo.path("data", "preference"), "eval", num=None,
                               batch_size=p["batch_size"], judge=JUDGE)
    os.makedirs(demo.path("eval", "reward_model"), exist_ok=True)
    with open(demo.path("eval", "reward_model", "eval.json"), "w") as f:
        json.dump({"metrics": rm}, f, indent=2)
    out: dict[str, Any] = {"reward_model": rm}
    for method in METHODS:
        print(f"  {method} against sft on {_prompts(demo)}", flush=True)
        r = evaluate(EvalArgs(policy=demo.path("runs", method), reference=demo.path("runs", "sft"),
                              data=demo.path("data", "prompt"), reward_model=demo.path("runs", "reward"),
                              num=p["num"] if p["num"] > 0 else None, max_new_tokens=p["max_new_tokens"],
                              batch_size=p["batch_size"], judge=JUDGE))
        write(r, demo.path("eval", method))
        m, samples = r["metrics"], r["samples"]
        out[method] = {"win_rate": m["win_rate"], "judge_score": m["judge_score"], "kl": m["kl"],
                       "rm_win_rate": m["rm_win_rate"], "reward": m["reward"], "length": m["policy_length"],
                       "judge_ties": m["judge_ties"], "num_prompts": m["num_prompts"],
                       "win_rate_se": _win_se(samples, "judge"), "rm_win_rate_se": _win_se(samples, "reward")}
        out["sft"] = {"judge_score": m["reference_judge_score"], "reward": m["reference_reward"],
                      "length": m["reference_length"]}  # the same in both comparisons (same keys, same model)
    if p["best_of"]:  # what the reward model buys when it picks among SFT's own answers
        print(f"  best-of-{p['best_of']} of sft, picked by the reward model and by the judge", flush=True)
        r = evaluate_best_of_n(EvalArgs(policy=demo.path("runs", "sft"), reference=demo.path("runs", "sft"),
                                        data=demo.path("data", "prompt"), reward_model=demo.path("runs", "reward"),
                                        num=p["num"] if p["num"] > 0 else None, max_new_tokens=p["max_new_tokens"],
                                        batch_size=p["batch_size"], judge=JUDGE), p["best_of"])
        r["agreement"] = agreement_by_question(r["samples"])  # per question type of the task
        write_best_of_n(r, demo.path("eval", "best_of_n"))
        out["best_of_n"] = r["curve"]
    rows = min(256, demo.plan["data"]["eval_rows"] // p["batch_size"] * p["batch_size"])
    if rows:  # does SFT read the image? its loss on the sft eval split with each row's image and another's
        out["sft"]["image"] = image_reliance(demo.path("runs", "sft"), demo.path("data", "sft"), "eval", num=rows,
                                             batch_size=p["batch_size"])
    if p.get("reads"):  # what each model reads off the image: greedy answers to held-out short questions
        out["reads"] = {}
        for name in READ_MODELS:
            if os.path.isdir(demo.path("runs", name)):  # pretrain: skipped when SFT starts from another model
                print(f"  {name}: greedy answers to {p['reads']} held-out short questions", flush=True)
                r = short_answer_reads(demo.path("runs", name), num=p["reads"], batch_size=p["batch_size"])
                write_reads(r, demo.path("eval", "reads", name))
                out["reads"][name] = {k: v for k, v in r.items() if k != "samples"}
    return out


def _win_se(samples: list[dict], score: str) -> float:
    """One standard error of a win-rate (ties 1/2) over prompts."""

    w = np.array([win(s[f"policy_{score}"], s[f"reference_{score}"]) for s in samples])
    return float(w.std(ddof=1) / math.sqrt(len(w))) if len(w) > 1 else float("nan")


def _describe_eval(demo: Demo) -> str:
    k = demo.plan["eval"]["best_of"]
    reads = demo.plan["eval"].get("reads")
    return (f"reward-model accuracy on {demo.path('data', 'preference')} (eval); DPO and PPO against SFT on "
            f"{_prompts(demo)}" + (f"; best-of-{k} of SFT picked by the reward model and the judge" if k else "")
            + "; SFT's loss with real and shuffled images"
            + (f"; {', '.join(READ_MODELS)} on {reads} held-out short questions" if reads else "")
            + f" -> {demo.path('eval')}")


def _prompts(demo: Demo) -> str:
    n = demo.plan["eval"]["num"]
    return f"{n} held-out prompts" if n > 0 else f"every held-out prompt ({demo.plan['data']['eval_rows']})"


def stage_report(demo: Demo):
    write_report(demo.out)


# The pipeline. A new stage is one entry here (and, if it has settings, an entry in each plan).
STAGES: list[Stage] = [
    Stage("data", stage_data, _describe_data, outputs=tuple(f"data/{kind}" for kind in DATA_KINDS)),
    Stage("tower", stage_tower, _describe_tower, outputs=(os.path.join("runs", "tower"),), results=("tower",)),
    trainer("sft", name="pretrain", data="short", start="tower"),
    trainer("sft", name="pretrain2", data="short", start="pretrain", yaml="pretrain"),
    trainer("sft", data="sft", start="pretrain2"),
    Stage("comparisons", stage_comparisons, _describe_comparisons, needs=("sft", "data/sft", "data/prompt",
                                                                          "data/preference"),
          outputs=("data/comparisons",), results=("comparisons",), plan_entries=_comparisons_plan),
    trainer("reward", data="comparisons", start="sft"),
    dpo_rounds_stage(),
    ppo_rounds_stage(),
    # the classic RLHF route: PPO from SFT against the scalar reward model (value model from it too)
    trainer("ppo", name="ppo_scalar_rm", data="prompt", start="sft", reward_model="reward", yaml="ppo"),
    Stage("eval", stage_eval, _describe_eval, needs=("data/sft", "data/preference", "data/prompt", "pretrain",
                                                     "pretrain2", "sft", "reward") + METHODS, outputs=("eval",),
          results=("reward_model", "sft", "best_of_n", "reads") + METHODS),
    Stage("report", stage_report, lambda demo: f"{demo.path('report.md')}, {demo.path('img')}/, "
                                               f"{demo.path('examples.html')}"),
]


# ---------------------------------------------------------------------------
# plan, summary.json, the run


def make_plan(quick: bool = False, sets=()) -> dict:
    """PLANS["quick" or "full"] with `STAGE.KEY=VALUE` settings applied. A value takes the type of the
    entry it replaces; a trainer stage accepts any key of its config (checked when the config is built)."""
    plan = copy.deepcopy(PLANS["quick" if quick else "full"])
    trainers = {s.name for s in STAGES if s.config is not None}
    for item in sets:
        lhs, eq, value = item.partition("=")
        stage, dot, key = lhs.strip().partition(".")
        value = value.strip()
        if not (eq and dot and key):
            raise DemoError(f"--set {item!r}: expected STAGE.KEY=VALUE (e.g. sft.max_steps=50)")
        if stage not in plan and stage not in trainers:
            raise DemoError(f"--set {item!r}: unknown stage {stage!r}; stages with settings: "
                            f"{', '.join(sorted(set(plan) | trainers))}")
        entries = plan.setdefault(stage, {})
        if stage not in trainers and key not in entries:
            raise DemoError(f"--set {item!r}: {stage} has no setting {key!r}; its settings: {', '.join(entries)}")
        entries[key] = _typed(value, entries.get(key), item)
    for key, n in plan["data"].items():
        if key.endswith("_rows") and (not isinstance(n, int) or n < 1):
            raise DemoError(f"--set data.{key}: must be >= 1, got {n!r}")
    _check_comparisons(plan["comparisons"])
    return plan


def _check_comparisons(c: dict):

    checks = [("prompts", c["prompts"] in ("prompt", "sft"), "prompt or sft (the dataset whose prompts are answered)"),
              ("pairs", c["pairs"] in PAIRINGS, " or ".join(PAIRINGS)), ("n", c["n"] >= 2, ">= 2"),
              ("num", c["num"] >= 0, ">= 0 (0: every train prompt)"), ("mix", c["mix"] >= 0, ">= 0"),
              ("label_noise", 0 <= c["label_noise"] <= 1, "in [0, 1]"), ("dpo_rounds", c["dpo_rounds"] >= 1, ">= 1"),
              ("round_pairs", c["round_pairs"] in PAIRINGS, " or ".join(PAIRINGS)),
              ("round_steps", c["round_steps"] >= 1, ">= 1"), ("ppo_rounds", c["ppo_rounds"] >= 0, ">= 0"),
              ("ppo_round_steps", c["ppo_round_steps"] >= 1, ">= 1")]
    for key, ok, what in checks:
        if not ok:
            raise DemoError(f"--set comparisons.{key}: must be {what}, got {c[key]!r}")


def _typed(value: str, old, item: str):
    """`value` as the type of `old` (a string when there is no old value)."""
    try:
        if isinstance(old, bool):
            return {"true": True, "false": False}[value.lower()]
        if isinstance(old, int):
            return int(value)
        if isinstance(old, float):
            return float(value)
    except (KeyError, ValueError):
        raise DemoError(f"--set {item!r}: expected {type(old).__name__}, got {value!r}") from None
    return value


def default_configs_dir() -> str:
    """The trainers' YAML files shipped with the task (jaxpref/tasks/shapes/configs)."""
    d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    if not os.path.isdir(d):
        raise DemoError(f"no {d}: pass --configs DIR (the directory holding sft.yaml, reward.yaml, dpo.yaml and "
                        f"ppo.yaml)")
    return d


def stage_plan(plan: dict, stage: Stage) -> dict | None:
    """The plan entries `stage` is made with (what --reuse compares): its `plan_entries`, or its own section."""
    return stage.plan_entries(plan) if stage.plan_entries is not None else plan.get(stage.name)


def config_fingerprints(demo: Demo) -> dict[str, str]:
    """{trainer stage: a hash of its full config with DIR replaced by a placeholder}: equal exactly when
    the YAML files and the plan give the same configs (wherever DIR is). Builds (validates) every
    trainer config, so a bad setting fails before any stage runs."""

    placeholder = dataclasses.replace(demo, out="<out>")
    out = {}
    for stage in STAGES:
        if stage.config is not None:
            try:
                cfg = stage.config(placeholder)
            except ConfigError as e:
                raise DemoError(f"stage {stage.name}: {e} (set with --set {stage.name}.KEY=VALUE)") from None
            text = json.dumps(to_dict(cfg), sort_keys=True)
            out[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def write_summary(out: str, summary: dict):
    """summary.json, atomically (a crash leaves the previous version)."""
    os.makedirs(out, exist_ok=True)
    tmp = summary_path(out) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, summary_path(out))


def _open_summary(demo: Demo, fingerprints: dict) -> dict:
    """The summary to continue: the existing one when it was made with the same plan and configs, a
    fresh one for a new or empty DIR; DemoError otherwise."""
    path = summary_path(demo.out)
    if not os.path.exists(path):
        if os.path.isdir(demo.out) and os.listdir(demo.out):
            raise DemoError(f"{demo.out} exists and is not a demo directory (no summary.json): choose another --out")
        return {"quick": demo.quick, "plan": demo.plan, "configs": fingerprints, "commit": current_commit(),
                "stages": {}}
    try:
        summary = read_summary(demo.out)
    except (OSError, json.JSONDecodeError) as e:
        raise DemoError(f"{path}: unreadable ({e}); delete {demo.out} or choose another --out") from None
    old = summary.get("plan", {})
    if summary.get("quick") != demo.quick or old != demo.plan:
        diffs = [f"{k}: {_get(old, k)!r} -> {_get(demo.plan, k)!r}" for k in sorted(_keys(old) | _keys(demo.plan))
                 if _get(old, k) != _get(demo.plan, k)]
        name = lambda q: "the quick plan" if q else "the full plan"
        more = "; ..." if len(diffs) > 8 else ""
        raise DemoError(f"{path}: {demo.out} was made with {name(summary.get('quick'))} and other settings than this "
                        f"run ({name(demo.quick)}); they differ in {'; '.join(diffs[:8])}{more}. Finished stages "
                        f"would be mixed with new ones: use another --out, or delete {demo.out}")
    changed = [k for k in fingerprints if summary.get("configs", {}).get(k) != fingerprints[k]]
    if changed:
        files = ", ".join(os.path.join(demo.configs, f"{k}.yaml") for k in changed)
        raise DemoError(f"{path}: the config of stage(s) {', '.join(changed)} differs from the one {demo.out} was "
                        f"made with ({files} changed?): use another --out or delete {demo.out}")
    return summary


def _keys(plan: dict) -> set[str]:
    return {f"{s}.{k}" for s, entries in plan.items() for k in entries}


def _get(plan: dict, key: str):
    stage, _, k = key.partition(".")
    return plan.get(stage, {}).get(k, "(unset)")


def reusable_stages(source: dict, plan: dict, fingerprints: dict) -> list[str]:
    """What of the demo whose summary.json is `source` a run with `plan` and trainer-config
    `fingerprints` may take as it is: the stages finished there with the same plan entries and config
    and everything they need reusable too, and the datasets ("data/<kind>") made with the same
    settings (DATA_SETTINGS), so that e.g. a new preference set leaves the pretraining's short
    questions reusable. The report, which reads everything, is always rewritten."""
    ok: list[str] = []
    done = source.get("stages", {})
    old, new = source.get("plan", {}).get("data", {}), plan.get("data", {})
    if "data" in done:
        own = {k for keys in DATA_SETTINGS.values() for k in keys}
        common = [k for k in set(old) | set(new) if k not in own]
        ok += [f"data/{kind}" for kind in DATA_KINDS
               if all(old.get(k) == new.get(k) for k in common + list(DATA_SETTINGS[kind]))]
    for stage in STAGES:
        if stage.name == "data":
            if all(part in ok for part in stage.outputs):  # every entry of the plan's `data` is the same
                ok.append("data")
        elif (stage.outputs and stage.name in done
                and stage_plan(source.get("plan", {}), stage) == stage_plan(plan, stage)
                and source.get("configs", {}).get(stage.name) == fingerprints.get(stage.name)
                and all(n in ok for n in stage.needs)):
            ok.append(stage.name)
    return ok


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)  # a finished stage's files are never written again: share them
    except OSError:
        shutil.copy2(src, dst)


def _copy_from(demo: Demo, source: str, rel: str, part: str):
    dst = demo.path(rel)
    if os.path.exists(dst):
        raise DemoError(f"--reuse {source}: {dst} exists, but {part} is not finished in {demo.out}: delete {dst} to "
                        f"reuse {os.path.join(source, rel)}, or run without --reuse")
    shutil.copytree(os.path.join(source, rel), dst, copy_function=_link_or_copy)
    demo.summary["reused"]["parts"].append(part)


def _reuse(demo: Demo, stage: Stage, source: str, source_summary: dict):
    """Copies (hard-links where it can) `stage`'s outputs from the demo in `source` into DIR and records
    the stage as finished there, with its time and results from `source`."""
    for rel in stage.outputs:
        _copy_from(demo, source, rel, stage.name)
    for key in stage.results:
        if key in source_summary:
            demo.summary[key] = copy.deepcopy(source_summary[key])
    demo.summary["stages"][stage.name] = {"seconds": source_summary["stages"][stage.name]["seconds"],
                                          "reused_from": source}


def run_demo(out: str = "runs/demo", quick: bool = False, sets=(), configs: str | None = None,
             reuse: str | None = None, until: str | None = None) -> dict:
    """Runs every stage not finished yet (see the module docstring); returns summary.json's contents.
    `reuse`: another demo's DIR; what of it this plan would make the same way (`reusable_stages`: the
    same plan entries and configs, for the stage and everything it reads) is copied instead of run,
    e.g. to try other DPO or PPO settings without the ~80 min before them. `until`: the stage after
    which to stop (None: the last)."""
    names = [stage.name for stage in STAGES]
    if until is not None and until not in names:
        raise DemoError(f"--until {until}: not a stage; the stages: {', '.join(names)}")
    demo = Demo(out=out, plan=make_plan(quick, sets), quick=quick, configs=configs or default_configs_dir())
    fingerprints = config_fingerprints(demo)
    source, reusable = None, []
    if reuse is not None:
        if os.path.abspath(reuse) == os.path.abspath(out):
            raise DemoError(f"--reuse {reuse}: that is --out itself; re-running with the same --out already "
                            f"skips finished stages")
        if not os.path.exists(summary_path(reuse)):
            raise DemoError(f"--reuse {reuse}: no {summary_path(reuse)}; not a demo directory")
        try:
            source = read_summary(reuse)
        except (OSError, json.JSONDecodeError) as e:
            raise DemoError(f"--reuse {reuse}: {summary_path(reuse)} unreadable ({e})") from None
        reusable = reusable_stages(source, demo.plan, fingerprints)
    demo.summary = summary = _open_summary(demo, fingerprints)
    started = summary.get("reused", {}).get("from")
    if reuse is not None and started is not None and os.path.abspath(started) != os.path.abspath(reuse):
        raise DemoError(f"--reuse {reuse}: {out} was started from {started}; continue it with --reuse {started} "
                        f"or without --reuse")
    write_summary(out, summary)
    last = names.index(until) if until is not None else len(names) - 1
    for i, stage in enumerate(STAGES[:last + 1], 1):
        head = f"[{i}/{len(STAGES)}] {stage.name}"
        if stage.name in summary["stages"]:
            print(f"{head}: finished in an earlier run ({duration(summary['stages'][stage.name]['seconds'])}), "
                  f"skipping", flush=True)
            continue
        if reuse is not None:
            # a stage is taken only when what it reads in DIR came from there too
            parts = summary.setdefault("reused", {"from": reuse, "parts": []})["parts"]
            if stage.name == "data":  # dataset by dataset: each output is its own part
                for part in stage.outputs:
                    if part in reusable and part not in parts:
                        _copy_from(demo, reuse, part, part)
                write_summary(out, summary)
            if stage.name in reusable and all(n in parts for n in stage.needs):
                if stage.name == "data":  # every kind copied above
                    summary["stages"]["data"] = {"seconds": source["stages"]["data"]["seconds"], "reused_from": reuse}
                else:
                    _reuse(demo, stage, reuse, source)
                write_summary(out, summary)
                print(f"{head}: reused from {reuse} (finished there in "
                      f"{duration(summary['stages'][stage.name]['seconds'])})", flush=True)
                continue
            if stage.name == "data" and parts:
                print(f"{head}: reused from {reuse}: {', '.join(p for p in parts if p.startswith('data/'))}",
                      flush=True)
        if stage.name in PRETRAINING and not demo.plan["base"]["from_scratch"]:
            summary["stages"][stage.name] = take_base(demo, stage.name)
            write_summary(out, summary)
            print(f"{head}: the shipped base ({BASE_DIR}, made by `{read_base_info()['command']}` in "
                  f"{duration(summary['stages'][stage.name]['seconds'])}); --from-scratch runs it", flush=True)
            continue
        print(f"{head}: {stage.describe(demo)}", flush=True)
        t0 = time.perf_counter()
        result = dict(stage.run(demo) or {})
        seconds = result.pop(STAGE_SECONDS, time.perf_counter() - t0)
        summary.update(result)
        summary["stages"][stage.name] = {"seconds": round(seconds, 2)}
        write_summary(out, summary)
    print(format_summary(summary, out), flush=True)
    if last < len(names) - 1:
        print(f"stopped after {until} (--until); the same command without --until goes on from "
              f"{names[last + 1]}", flush=True)
    return summary


# ---------------------------------------------------------------------------
# command line


def add_demo_parser(subparsers):
    p = subparsers.add_parser("demo", help="the whole pipeline on the built-in shapes task, with a report",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the quick plan: shorter stages that show the pipeline working, too noisy to read much into")
    p.add_argument("--from-scratch", action="store_true",
                   help="run the tower and decoder pretraining stages too (about 40 min on a 2-core CPU) instead of "
                        "starting from the shipped base they made (base.from_scratch=true)")
    p.add_argument("--out", default="runs/demo",
                   help="output directory; re-running with it resumes (default: runs/demo)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="change one plan entry, e.g. sft.max_steps=50, data.eval_rows=200, eval.num=100, "
                        "ppo.kl_coef=0.1 (repeatable; part of the plan a re-run must match)")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="another demo's output directory: its finished stages that this plan runs the same way "
                        "(same settings, and the same for every stage they read) are copied, not re-run")
    p.add_argument("--configs", default=None,
                   help="directory of the trainers' YAML configs (default: jaxpref/tasks/shapes/configs)")
    p.add_argument("--until", default=None, metavar="STAGE",
                   help=f"stop once STAGE has finished ({', '.join(s.name for s in STAGES)}); not part of "
                        f"the plan: re-running without it goes on")
    p.set_defaults(func=_main)


def _main(args) -> int:

    try:
        sets = args.sets + (["base.from_scratch=true"] if args.from_scratch else [])
        run_demo(args.out, quick=args.quick, sets=sets, configs=args.configs, reuse=args.reuse, until=args.until)
    except (DemoError, ConfigError) as e:
        print(f"jaxpref demo: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, RunError, FileNotFoundError, ValueError) as e:
        print(f"jaxpref demo: {e}\nfinished stages are recorded in {summary_path(args.out)}; the same command "
              f"continues from the failed stage", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\njaxpref demo: interrupted; the same command continues (finished stages are recorded in "
              f"{summary_path(args.out)}, trainers resume from their last checkpoint)", file=sys.stderr)
        return 130
    return 0
