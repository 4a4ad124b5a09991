"""Evaluation of a policy against a reference on held-out prompts: judge win-rate, reward-model
win-rate, mean judge score, response length, KL to the reference, and the samples themselves.

    jaxpref eval --policy runs/demo/runs/dpo --reference runs/demo/runs/sft --data runs/demo/data/prompt \
                 --judge shapes [--split eval] [--num 200] [--reward-model runs/demo/runs/reward] [--out DIR]
    jaxpref eval --reward-model runs/demo/runs/reward --data runs/demo/data/preference --num 0   # accuracy

    result = evaluate(EvalArgs(policy="runs/dpo", reference="runs/sft", data="data/prompt", judge="shapes"))

For each prompt both models sample one response (the same per-row RNG key for both, so the
comparison uses common random numbers). Each response is scored by the judge (`judge`: a reward
function of jaxpref.rewards, by name or module:function; rows it returns None for are left out of
the judge's numbers) and, with --reward-model, by the reward model at its last token. Without a
judge only the reward model's numbers and the KL are reported.
win_rate = mean over judged prompts of 1 (policy better), 0.5 (tie), 0 (worse).
kl = mean over prompts of sum_t [log pi(y_t) - log pi_ref(y_t)] on the policy's own samples
(the k1 estimate of KL(pi || pi_ref), at temperature 1, whatever the sampling temperature).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from functools import partial


import jax
import numpy as np

from tqdm import tqdm

from jaxpref import rewards
from jaxpref.data.processing import Processor, ProcessorConfig
from jaxpref.data.sources import open_source
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.generate import generate
from jaxpref.models import VLM, load_pretrained, lora
from jaxpref.objectives.sft import sft_loss
from jaxpref.sequence import ImplicitReward, forward, log_ratio, pair_scores, reward_scores
from jaxpref.sharding import make_mesh, param_shardings


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    policy: str
    """The policy: a Hugging Face model directory (what every trainer exports)."""
    reference: str
    """What the policy is compared with (e.g. the SFT model)."""
    data: str
    """Prompt-only (or any TRL-schema) dataset."""
    split: str = "eval"
    num: int | None = 200
    """Prompts to evaluate, the first in file order (None: the whole split)."""
    judge: str | None = None
    """The judge: a registered name (`shapes`) or module:function (jaxpref.rewards); None: no judge."""
    reward_model: str | None = None
    """A reward model directory (scalar head): adds rm_win_rate and the reward scores."""
    implicit_reward_beta: float | None = None
    """When given, reward_model is a DPO policy scored by its implicit reward, this beta x
    log pi_rm(y|x) / pi_reference(y|x) (PPO's reward_model_type "implicit")."""
    tokenizer: str | None = None
    """Default: the policy directory's tokenizer."""
    max_new_tokens: int = 48
    temperature: float = 0.7
    """Sampling temperature (TRL's PPO default); greedy ignores it."""
    greedy: bool = False
    batch_size: int = 32
    seed: int = 0
    max_prompt_length: int | None = None
    length_buckets: tuple[int, ...] = (16, 32, 48, 64, 80, 128, 256, 512, 1024)


def load_model(path: str, head: str, mesh, what: str):
    """(VLM, params) from a Hugging Face model directory in float32 with `head` ("lm" or "scalar"), or
    from a PEFT LoRA adapter directory (params: its base with the adapter on, lora.Adapted); `what`
    names the argument in the error when `path` is not a directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path} is not a model directory")
    if not lora.is_adapter_dir(path):
        return load_pretrained(path, "float32", head=head, mesh=mesh)
    base = lora.read_adapter_config(path).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"{what}: {path} is a LoRA adapter whose base {base!r} is not a model directory")
    model, params = load_pretrained(base, "float32", head=head, mesh=mesh)
    plan, trained = lora.load_adapter(path, model.config, head)
    if mesh is not None:
        trained = jax.device_put(trained, lora.adapter_shardings(plan, param_shardings(model, mesh)))
    return model, lora.Adapted(params, trained, plan)


def _rows(args: EvalArgs):
    return first_rows(args.data, args.split, args.num)


def first_rows(data: str, split: str, num: int | None):
    """The first `num` rows of a split in file order (None: all)."""
    source = open_source(data, split)
    n = 0
    for shard in range(len(source.shards)):
        for _, row in source.read(shard):
            if num is not None and n >= num:
                return
            n += 1
            yield row


def win(a: float, b: float) -> float:
    """1 if a > b, 0.5 on a tie, 0 otherwise."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def _win_rate(a, b) -> float:
    """The mean of `win` over paired arrays."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.mean(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))))


def _models_and_rows(args: EvalArgs):
    """(policy, reference, reward model or None, rows, tokenizer) as `args` names them: the first
    arguments of `compare` and `best_of_n`."""
    mesh = make_mesh(1, -1, 1)
    policy = load_model(args.policy, "lm", mesh, "--policy")
    reference = load_model(args.reference, "lm", mesh, "--reference")
    if reference[0].config != policy[0].config:
        raise ValueError(f"--reference {args.reference} is not the policy's architecture")
    rm = None
    if args.implicit_reward_beta is not None and not args.reward_model:
        raise ValueError("--implicit-reward-beta needs --reward-model (the DPO policy whose implicit reward it is)")
    if args.reward_model and args.implicit_reward_beta is not None:
        if args.implicit_reward_beta <= 0:
            raise ValueError(f"--implicit-reward-beta must be > 0, got {args.implicit_reward_beta}")
        rm = ImplicitReward(*load_model(args.reward_model, "lm", mesh, "--reward-model"), *reference,
                            beta=args.implicit_reward_beta)
    elif args.reward_model:
        rm = load_model(args.reward_model, "scalar", mesh, "--reward-model")
    tokenizer = load_tokenizer(args.tokenizer or args.policy)
    rows = list(_rows(args))
    if not rows:
        raise ValueError(f"{args.data} split {args.split!r} has no rows")
    return policy, reference, rm, rows, tokenizer


def evaluate(args: EvalArgs, progress: bool = True) -> dict:
    """Runs the evaluation; returns {"metrics": {...}, "samples": [...]} (see the module docstring)."""
    judge = rewards.resolve(args.judge) if args.judge else None
    samples = compare(*_models_and_rows(args), args, progress=progress, judge=judge)
    return {"metrics": summarize(samples), "samples": samples, "args": dataclasses.asdict(args)}


def evaluate_best_of_n(args: EvalArgs, n: int, progress: bool = True) -> dict:
    """best_of_n with the models, rows and judge `args` names: {"curve", "samples", "args"}."""
    if not args.judge:
        raise ValueError("best-of-n needs a judge (--judge NAME or module:function)")
    judge = rewards.resolve(args.judge)
    out = best_of_n(*_models_and_rows(args), args, n, progress, judge=judge)
    return {**out, "args": dataclasses.asdict(args)}


def write_best_of_n(result: dict, out: str):
    """out/best_of_n.json (the curve, the args, n) and out/best_of_n.jsonl (every row's answers)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "best_of_n.json"), "w") as f:
        json.dump({"curve": result["curve"], "args": result["args"], "n": result["curve"][-1]["k"],
                   **({"agreement": result["agreement"]} if "agreement" in result else {})}, f, indent=2)
    with open(os.path.join(out, "best_of_n.jsonl"), "w") as f:
        for s in result["samples"]:
            f.write(json.dumps(s) + "\n")


def format_curve(curve: list[dict]) -> str:
    """best_of_n_curve as a table, one line per k."""
    cols = [("k", "k"), ("kl_bound", "KL bound"), ("oracle_win_rate", "win (judge picks)"),
            ("oracle_judge_score", "judge score"), ("rm_pick_win_rate", "win (RM picks)"),
            ("rm_pick_judge_score", "judge score"), ("rm_pick_reward_win_rate", "RM's own win")]
    cols = [(k, h) for k, h in cols if k in curve[0]]
    lines = ["  ".join(f"{h:>17}" for _, h in cols)]
    for p in curve:
        lines.append("  ".join(f"{p[k]:>17}" if k == "k" else f"{p[k]:>17.3f}" for k, _ in cols))
    return "\n".join(lines)


def _columns(row: dict) -> dict:
    """The row's other scalar columns (e.g. scene, solution), kept with its samples."""
    return {k: v for k, v in row.items() if k != "prompt" and isinstance(v, (str, int, float, bool))}


def compare(policy, reference, reward_model, rows: list[dict], tokenizer, args: EvalArgs,
            progress: bool = False, judge: rewards.RewardFunction | None = None) -> list[dict]:
    """Samples a response from each of `policy` and `reference` ((VLM, params) pairs) for every row
    and scores both: by `judge` when given (a reward function; `<name>_judge` where it returns a
    score), by `reward_model` when given. Returns the samples."""
    cfg = policy[0].config
    samples = []
    bar = tqdm(total=len(rows), desc="eval", unit="prompt", disable=not progress)
    rng = jax.random.key(args.seed)
    for start, chunk, batch, row_ids in prompt_batches(cfg, tokenizer, rows, args):
        out = {name: sample_responses(model, params, batch, args, rng, row_ids)
               for name, (model, params) in (("policy", policy), ("reference", reference))}
        kl = log_ratio(policy, reference, batch, out["policy"]["tokens"], out["policy"]["mask"])
        if reward_model is not None:
            for name in out:
                out[name]["reward"] = reward_scores(reward_model, batch, out[name]["tokens"], out[name]["mask"])
        texts = {name: [decode_response(tokenizer, cfg.eos_token_id, out[name]["tokens"][i], out[name]["lengths"][i])
                        for i in range(len(chunk))] for name in out}
        judged = {name: rewards.score(judge, chunk, texts[name]) for name in out} if judge is not None else {}
        for i, row in enumerate(chunk):
            s = {"index": start + i, "prompt": rewards.text_of(row.get("prompt")), "kl": float(kl[i])}
            for name in out:
                s[name] = texts[name][i]
                s[f"{name}_length"] = int(out[name]["lengths"][i])
                if "reward" in out[name]:
                    s[f"{name}_reward"] = float(out[name]["reward"][i])
                if name in judged and judged[name][i] is not None:
                    s[f"{name}_judge"] = judged[name][i]
            samples.append({**_columns(row), **s})
        bar.update(len(chunk))
    bar.close()
    return samples


def prompt_batches(cfg, tokenizer, rows: list[dict], args: EvalArgs):
    """(start, chunk, batch, row_ids) for each `args.batch_size` rows: the collated prompt batch,
    padded to a static batch shape with copies of its first row (callers use only len(chunk) rows),
    and the rows' global ids (`generate`'s row_ids)."""
    processor = Processor(cfg, tokenizer, ProcessorConfig(kind="prompt", max_prompt_length=args.max_prompt_length,
                                                          max_length=None, length_buckets=args.length_buckets))
    bs = args.batch_size
    for start in range(0, len(rows), bs):
        chunk = rows[start:start + bs]
        examples = [processor(r) for r in chunk]
        examples += [examples[0]] * (bs - len(examples))
        batch = {k: v for k, v in processor.collate(examples).items() if v.dtype != object}
        yield start, chunk, batch, np.arange(start, start + bs, dtype=np.int32)


def sample_responses(model: VLM, params, batch, args: EvalArgs, rng, row_ids) -> dict:
    """One sampled response per row of a collated prompt batch: tokens, mask, lengths (numpy)."""
    cfg = model.config
    g = generate(model, params, pixel_values=batch["pixel_values"], input_ids=batch["prompt_ids"],
                 attention_mask=batch["prompt_mask"], max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, greedy=args.greedy, eos_token_id=cfg.eos_token_id,
                 pad_token_id=cfg.pad_token_id, rng=rng, row_ids=row_ids)
    tokens, lengths = np.asarray(g.tokens), np.asarray(g.lengths)
    mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "lengths": lengths}


def decode_response(tokenizer, eos_token_id: int, tokens, length) -> str:
    return tokenizer.decode([int(x) for x in tokens[:length] if int(x) != eos_token_id], skip_special_tokens=True).strip()


def best_of_n(policy, reference, reward_model, rows: list[dict], tokenizer, args: EvalArgs, n: int,
              progress: bool = False, desc: str | None = None, *, judge: rewards.RewardFunction) -> dict:
    """Best-of-n sampling from `policy` against one sample of `reference` per row, the standard
    yardstick of what preference tuning can reach from a model: the reference samples with
    `args.seed` (as `compare` does), the policy draws n candidates with seeds seed+1 ... seed+n, and
    `judge` scores all (it must score every row), the reward model too when given. Returns
    {"curve": best_of_n_curve(...), "samples": [...]}: per row the reference's response and the n
    candidates with their scores; with a reward model also "agreement" ({"all": judge_agreement})."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    cfg = policy[0].config
    samples = []
    bar = tqdm(total=len(rows) * (n + 1), desc=desc or f"best-of-{n}", unit="sample", disable=not progress)
    for start, chunk, batch, row_ids in prompt_batches(cfg, tokenizer, rows, args):
        drawn = [sample_responses(*reference, batch, args, jax.random.key(args.seed), row_ids)]
        bar.update(len(chunk))
        for j in range(n):
            drawn.append(sample_responses(*policy, batch, args, jax.random.key(args.seed + 1 + j), row_ids))
            bar.update(len(chunk))
        if reward_model is not None:
            for d in drawn:
                d["reward"] = reward_scores(reward_model, batch, d["tokens"], d["mask"])
        texts = [[decode_response(tokenizer, cfg.eos_token_id, d["tokens"][i], d["lengths"][i]) for d in drawn]
                 for i in range(len(chunk))]
        scored = [rewards.score(judge, chunk, [t[k] for t in texts]) for k in range(n + 1)]
        for i, row in enumerate(chunk):
            judged = [scored[k][i] for k in range(n + 1)]
            if None in judged:
                raise ValueError(f"best-of-n: the judge {rewards.name_of(judge)} cannot score row {start + i} "
                                 f"({rewards.text_of(row.get('prompt'))!r}); best-of-n needs a score for every row")
            s = {**_columns(row), "index": start + i, "prompt": rewards.text_of(row.get("prompt")),
                 "reference": texts[i][0], "reference_judge": judged[0], "candidates": texts[i][1:],
                 "candidate_judge": judged[1:]}
            if reward_model is not None:
                s["reference_reward"] = float(drawn[0]["reward"][i])
                s["candidate_reward"] = [float(d["reward"][i]) for d in drawn[1:]]
            samples.append(s)
    bar.close()
    curve = best_of_n_curve(
        np.array([s["reference_judge"] for s in samples]), np.array([s["candidate_judge"] for s in samples]),
        np.array([s["candidate_reward"] for s in samples]) if reward_model is not None else None,
        np.array([s["reference_reward"] for s in samples]) if reward_model is not None else None)
    out = {"curve": curve, "samples": samples}
    if reward_model is not None:
        out["agreement"] = {"all": {"prompts": len(samples), **judge_agreement(
            [s["candidate_judge"] for s in samples], [s["candidate_reward"] for s in samples])}}
    return out


def judge_agreement(candidate_judge, candidate_reward) -> dict:
    """How often a reward model orders two answers to one prompt as the gold judge does: over every two
    candidates of a row (float[rows, n] scores) that the judge scores differently, the share whose
    rewards differ the same way (equal rewards count 1/2). {"pairs": how many, "agreement": the share,
    None without pairs}. Unlike accuracy on a fixed preference set, this is measured on the sampler's
    own answers, the ones best-of-n and PPO ask the reward model to rank."""
    cj, cr = np.asarray(candidate_judge, float), np.asarray(candidate_reward, float)
    i, j = np.triu_indices(cj.shape[1], 1)
    dj, dr = np.sign(cj[:, i] - cj[:, j]), np.sign(cr[:, i] - cr[:, j])
    scored = dj != 0
    agree = np.where(dr == 0, 0.5, (dr == dj).astype(float))[scored]
    return {"pairs": int(scored.sum()), "agreement": float(agree.mean()) if agree.size else None}


def format_agreement(agreement: dict) -> str:
    """agreement_by_question as lines of text."""
    lines = ["reward model agrees with the judge on two answers to one prompt (pairs the judge scores differently):"]
    for q, a in agreement.items():
        share = "-" if a["agreement"] is None else f"{a['agreement']:.3f}"
        lines.append(f"  {q:<10} {share} of {a['pairs']} pairs ({a['prompts']} prompts)")
    return "\n".join(lines)


def best_of_n_curve(reference_judge, candidate_judge, candidate_reward=None, reference_reward=None) -> list[dict]:
    """For k = 1, 2, 4, ... up to n (and n itself): the best of each row's first k candidates
    (float[rows, n] scores), chosen by the gold judge (`oracle_*`: what tuning against a perfect
    reward can reach at this KL) and, with `candidate_reward`, by the reward model (`rm_pick_*`: what
    that reward model can buy), each scored by the judge against the reference (win-rate, ties 1/2)
    and by its mean judge score; `rm_pick_reward_win_rate`: the reward model's own verdict on its pick
    against the reference's reward. kl_bound = log k - (k-1)/k, the KL of best-of-k sampling to the sampler (an
    upper bound, exact when the k scores differ; Beirami et al. 2024). Ties in the choice go to the
    first candidate."""
    ref = np.asarray(reference_judge, float)
    cj = np.asarray(candidate_judge, float)
    rows, n = cj.shape
    ks = sorted({k for k in (2 ** i for i in range(n.bit_length())) if k <= n} | {n})
    out = []
    for k in ks:
        by_judge = cj[:, :k].max(axis=1)
        point = {"k": k, "kl_bound": float(np.log(k) - (k - 1) / k), "oracle_win_rate": _win_rate(by_judge, ref),
                 "oracle_judge_score": float(by_judge.mean())}
        if candidate_reward is not None:
            cr = np.asarray(candidate_reward, float)
            pick = cr[:, :k].argmax(axis=1)
            chosen = cj[np.arange(rows), pick]
            point.update(rm_pick_win_rate=_win_rate(chosen, ref), rm_pick_judge_score=float(chosen.mean()))
            if reference_reward is not None:
                point["rm_pick_reward_win_rate"] = _win_rate(cr[np.arange(rows), pick], reference_reward)
        out.append(point)
    return out


def reward_model_accuracy(reward_model: str, data: str, split: str = "eval", num: int | None = None,
                          batch_size: int = 32, tokenizer: str | None = None, progress: bool = True,
                          judge: str | rewards.RewardFunction | None = None) -> dict:
    """Held-out pairwise accuracy of a reward model on preference rows: `accuracy` against the
    dataset's labels (TRL's eval_accuracy) and, with a judge, over the pairs it scores differently,
    `gold_accuracy` against the judge's ordering and `label_agreement`, the fraction of labels the
    judge agrees with: the ceiling `accuracy` can reach when labels are noisy."""
    judge = rewards.resolve(judge) if judge is not None else None
    mesh = make_mesh(1, -1, 1)
    model, params = load_model(reward_model, "scalar", mesh, "--reward-model")
    tok = load_tokenizer(tokenizer or reward_model)
    processor = Processor(model.config, tok, ProcessorConfig(kind="preference", max_prompt_length=None,
                                                             max_completion_length=None, max_length=None))
    score = jax.jit(lambda p, b: pair_scores(model, p, b))
    rows = list(first_rows(data, split, num))
    if not rows:
        raise ValueError(f"{data} split {split!r} has no rows")
    right, gold_right, agree, n_gold = 0, 0, 0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="reward model", disable=not progress):
        chunk = rows[start:start + batch_size]
        examples = [processor(r) for r in chunk]
        examples += [examples[0]] * (batch_size - len(examples))
        batch = {k: v for k, v in processor.collate(examples).items() if v.dtype != object}
        rc, rr = (np.asarray(x)[:len(chunk)] for x in score(params, batch))
        right += int(np.sum(rc > rr))
        if judge is None:
            continue
        judged = [rewards.score(judge, chunk, [rewards.text_of(row[k]) for row in chunk])
                  for k in ("chosen", "rejected")]
        for c, r, jc, jr in zip(rc, rr, *judged):
            if jc is not None and jr is not None:
                if jc != jr:
                    n_gold += 1
                    agree += int(jc > jr)
                    gold_right += int((c > r) == (jc > jr))
    out = {"num_pairs": len(rows), "accuracy": right / len(rows)}
    if judge is not None:
        out["judged_pairs"] = n_gold
    if n_gold:
        out.update(gold_accuracy=gold_right / n_gold, label_agreement=agree / n_gold)
    return out


def image_reliance(model_dir: str, data: str, split: str = "eval", num: int | None = 256, batch_size: int = 32,
                   tokenizer: str | None = None) -> dict:
    """How much an LM's completions depend on its image: the mean NLL per completion token of SFT rows
    (prompt, completion) with their own images (`nll_real`) and with the previous row's image
    (`nll_shuffled`, images rolled by one within each batch). A model that ignores the image has
    gap = nll_shuffled - nll_real = 0; one that reads it has gap > 0. Whole batches only."""
    mesh = make_mesh(1, -1, 1)
    model, params = load_model(model_dir, "lm", mesh, "model")
    processor = Processor(model.config, load_tokenizer(tokenizer or model_dir), ProcessorConfig(
        kind="sft", max_prompt_length=None, max_completion_length=None, max_length=None))
    rows = list(first_rows(data, split, num))
    if len(rows) < batch_size:
        raise ValueError(f"{data} split {split!r} has {len(rows)} rows, fewer than one batch of {batch_size}")
    batches = []
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        batch = processor.collate([processor(r) for r in rows[start:start + batch_size]])
        batch = {k: v for k, v in batch.items() if v.dtype != object}
        batch["valid"] = np.ones(batch_size, np.float32)
        batches.append(batch)
    real, shuffled = real_and_shuffled_nll(model, params, batches)
    return {"num_rows": len(batches) * batch_size, "nll_real": real, "nll_shuffled": shuffled,
            "gap": shuffled - real}


def real_and_shuffled_nll(model: VLM, params, batches) -> tuple[float, float]:
    """Mean NLL per completion token over collated SFT batches (with `valid`): with each row's own
    image, and with the previous row's (images rolled by one within each batch)."""
    real = shuffled = tokens = 0.0
    for b in batches:
        real += float(_nll_sum(model, params, b))
        shuffled += float(_nll_sum(model, params, {**b, "pixel_values": np.roll(b["pixel_values"], 1, axis=0)}))
        tokens += float(b["completion_mask"].sum())
    return real / tokens, shuffled / tokens


@partial(jax.jit, static_argnames="model")
def _nll_sum(model: VLM, params, batch):
    logits, seq = forward(model, params, batch, batch["completion_ids"], batch["completion_mask"])
    return sft_loss(logits, seq["input_ids"], seq["attention_mask"], seq["completion_mask"], batch["valid"])[0]


def summarize(samples: list[dict]) -> dict:
    """The metrics of a list of samples (see the module docstring)."""
    mean = lambda k: float(np.mean([s[k] for s in samples]))
    m = {"num_prompts": len(samples), "kl": mean("kl"), "policy_length": mean("policy_length"),
         "reference_length": mean("reference_length")}
    judged = [s for s in samples if "policy_judge" in s and "reference_judge" in s]
    if judged:
        jmean = lambda k: float(np.mean([s[k] for s in judged]))  # noqa: E731
        m.update(judged_prompts=len(judged),
                 win_rate=float(np.mean([win(s["policy_judge"], s["reference_judge"]) for s in judged])),
                 judge_score=jmean("policy_judge"), reference_judge_score=jmean("reference_judge"),
                 judge_ties=float(np.mean([s["policy_judge"] == s["reference_judge"] for s in judged])))
    if "policy_reward" in samples[0]:
        m.update(rm_win_rate=float(np.mean([win(s["policy_reward"], s["reference_reward"]) for s in samples])),
                 reward=mean("policy_reward"), reference_reward=mean("reference_reward"))
    return m


def format_table(metrics: dict) -> str:
    """A readable two-column table of the metrics."""
    names = {"win_rate": "judge win-rate (ties 1/2)", "judged_prompts": "prompts the judge scored",
             "judged_pairs": "pairs the judge scores differently", "judge_ties": "judge ties", "judge_score": "judge score",
             "reference_judge_score": "reference judge score", "rm_win_rate": "reward-model win-rate",
             "reward": "reward", "reference_reward": "reference reward", "kl": "KL(policy || reference), nats",
             "policy_length": "policy length, tokens", "reference_length": "reference length, tokens",
             "num_prompts": "prompts", "num_pairs": "pairs", "accuracy": "pairwise accuracy (dataset labels)",
             "gold_accuracy": "pairwise accuracy (judge)", "label_agreement": "labels the judge agrees with"}
    width = max(len(v) for v in names.values())
    lines = [f"{names.get(k, k):<{width}}  {v:.4g}" if isinstance(v, float) else f"{names.get(k, k):<{width}}  {v}"
             for k, v in metrics.items()]
    return "\n".join(lines)


def write(result: dict, out_dir: str):
    """out_dir/eval.json (metrics and arguments) and out_dir/samples.jsonl (one sample per line)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({"metrics": result["metrics"], "args": result["args"]}, f, indent=2)
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for s in result["samples"]:
            f.write(json.dumps(s) + "\n")


def add_eval_parser(subparsers):
    p = subparsers.add_parser("eval", help="win-rate of a policy against a reference on held-out prompts",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--judge", default=None, metavar="NAME|module:function",
                   help="the judge scoring both models' answers: a registered name (shapes: the built-in task's gold "
                        "judge) or a reward function module:function, f(prompts, completions, **columns) -> "
                        "list[float | None] (jaxpref.rewards); without it: reward-model numbers only")
    p.add_argument("--policy", default=None, help="policy model directory")
    p.add_argument("--reference", default=None, help="reference model directory (e.g. the SFT model)")
    p.add_argument("--data", default=None,
                   help="prompts (e.g. runs/demo/data/prompt); without --policy: preference pairs "
                        "(runs/demo/data/preference) on which --reward-model's pairwise accuracy is measured")
    p.add_argument("--split", default="eval", help="default: eval")
    p.add_argument("--num", type=int, default=None,
                   help="prompts (default 200; 0: all)")
    p.add_argument("--reward-model", default=None, help="reward model directory: adds the reward-model win-rate")
    p.add_argument("--implicit-reward-beta", type=float, default=None, metavar="BETA",
                   help="--reward-model is a DPO policy: score by its implicit reward, BETA x log pi_rm / "
                        "pi_reference (PPO's reward_model_type: implicit)")
    p.add_argument("--tokenizer", default=None, help="default: the policy directory's")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--best-of", type=int, default=0, metavar="N",
                   help="best-of-N instead: the policy draws N samples per prompt, the best by --judge and by "
                        "--reward-model is compared with the reference's sample, for N = 1, 2, 4, ... (the policy may "
                        "be the reference itself: what tuning from it can reach)")
    p.add_argument("--out", default=None, help="write eval.json and samples.jsonl (best_of_n.json and "
                                               "best_of_n.jsonl with --best-of) here")
    p.set_defaults(func=_main)


def _no_judge_note(args) -> str | None:
    if args.judge:
        return None
    return "no judge given (--judge NAME|module:function): reward-model numbers only"


def _main(args) -> int:
    if args.data is None:
        print("jaxpref eval: give --data", file=sys.stderr)
        return 2
    if args.judge:
        try:
            rewards.resolve(args.judge)
        except ValueError as e:
            print(f"jaxpref eval: {e}", file=sys.stderr)
            return 2
    if args.num is None:
        args.num = 200
    if args.policy is None:
        if args.reward_model is None or args.reference is not None:
            print("jaxpref eval: give --policy and --reference (win-rate), or only --reward-model (its pairwise "
                  "accuracy on --data's preference pairs)", file=sys.stderr)
            return 2
        try:
            metrics = reward_model_accuracy(args.reward_model, args.data, args.split, args.num or None,
                                            args.batch_size, args.tokenizer, judge=args.judge)
        except (FileNotFoundError, ValueError) as e:
            print(f"jaxpref eval: {e}", file=sys.stderr)
            return 2
        print(format_table(metrics))
        if note := _no_judge_note(args):
            print(note)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "eval.json"), "w") as f:
                json.dump({"metrics": metrics}, f, indent=2)
        return 0
    if args.reference is None:
        print("jaxpref eval: --policy needs --reference", file=sys.stderr)
        return 2
    ea = EvalArgs(policy=args.policy, reference=args.reference, data=args.data, split=args.split,
                  num=args.num or None, judge=args.judge, reward_model=args.reward_model,
                  implicit_reward_beta=args.implicit_reward_beta, tokenizer=args.tokenizer,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, greedy=args.greedy,
                  batch_size=args.batch_size, seed=args.seed)
    if args.best_of:
        try:
            result = evaluate_best_of_n(ea, args.best_of)
        except (FileNotFoundError, ValueError) as e:
            print(f"jaxpref eval: {e}", file=sys.stderr)
            return 2
        print(format_curve(result["curve"]))
        if "agreement" in result:
            print(format_agreement(result["agreement"]))
        if args.out:
            write_best_of_n(result, args.out)
            print(f"wrote {args.out}/best_of_n.json and {args.out}/best_of_n.jsonl")
        return 0
    try:
        result = evaluate(ea)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxpref eval: {e}", file=sys.stderr)
        return 2
    print(format_table(result["metrics"]))
    if note := _no_judge_note(args):
        print(note)
    elif "win_rate" not in result["metrics"]:
        print(f"the judge {args.judge} scored none of the prompts (it returned None for every row)")
    if args.out:
        write(result, args.out)
        print(f"wrote {args.out}/eval.json and {args.out}/samples.jsonl")
    return 0
