"""Evaluation of a policy against a reference on held-out prompts: gold-judge win-rate, reward-model
win-rate, mean judge score, response length, KL to the reference, and the samples themselves.

    jaxpref eval --policy runs/shapes-dpo --reference runs/shapes-sft --data data/shapes/prompt \
                 [--split eval] [--num 200] [--reward-model runs/shapes-rm] [--out runs/eval-dpo]

    result = evaluate(EvalArgs(policy="runs/shapes-dpo", reference="runs/shapes-sft", data="data/shapes/prompt"))

For each prompt both models sample one response (the same per-row RNG key for both, so the
comparison uses common random numbers). Each response is scored by the gold judge
(jaxpref.data.shapes.judge, for rows with a `scene`) and, with --reward-model, by the reward model
at its last token. win_rate = mean over prompts of 1 (policy better), 0.5 (tie), 0 (worse).
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
import jax.numpy as jnp
import numpy as np

from jaxpref.data.processing import Processor, ProcessorConfig, concat_prompt_completion
from jaxpref.data.sources import open_source
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.generate import generate
from jaxpref.models import VLM, load_pretrained
from jaxpref.objectives.dpo import completion_logps
from jaxpref.objectives.reward import last_token_values
from jaxpref.sharding import make_mesh


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    policy: str
    """The policy: a Hugging Face model directory (what every trainer exports)."""
    reference: str
    """What the policy is compared with (e.g. the SFT model)."""
    data: str
    """Prompt-only (or any TRL-schema) dataset; rows with a `scene` column get the gold judge."""
    split: str = "eval"
    num: int | None = 200
    """Prompts to evaluate, the first in file order (None: the whole split)."""
    reward_model: str | None = None
    """A reward model directory (scalar head): adds rm_win_rate and the reward scores."""
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


def _prompt_text(prompt) -> str:
    """The text of a plain or conversational prompt (what the judge reads)."""
    if isinstance(prompt, str):
        return prompt
    parts = []
    for m in prompt:
        c = m.get("content")
        parts += [c] if isinstance(c, str) else [b.get("text", "") for b in c if b.get("type") == "text"]
    return " ".join(p for p in parts if p)


def _load(path: str, head: str, mesh, what: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: {path} is not a model directory")
    return load_pretrained(path, "float32", head=head, mesh=mesh)


@partial(jax.jit, static_argnames="model")
def _completion_logps(model: VLM, params, batch, tokens, mask):
    seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], tokens, mask)
    px = batch["pixel_values"] if batch["pixel_values"].shape[1] else None
    logits = model.apply({"params": params}, px, seq["input_ids"], seq["attention_mask"], seq["token_type_ids"]).logits
    return completion_logps(logits, seq["input_ids"], seq["completion_mask"])


@partial(jax.jit, static_argnames="model")
def _reward(model: VLM, params, batch, tokens, mask):
    seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], tokens, mask)
    px = batch["pixel_values"] if batch["pixel_values"].shape[1] else None
    values = model.apply({"params": params}, px, seq["input_ids"], seq["attention_mask"], seq["token_type_ids"]).logits
    return last_token_values(values, seq["attention_mask"])


def _rows(args: EvalArgs):
    source = open_source(args.data, args.split)
    n = 0
    for shard in range(len(source.shards)):
        for _, row in source.read(shard):
            if args.num is not None and n >= args.num:
                return
            n += 1
            yield row


def win(a: float, b: float) -> float:
    """1 if a > b, 0.5 on a tie, 0 otherwise."""
    return 1.0 if a > b else 0.5 if a == b else 0.0


def evaluate(args: EvalArgs, progress: bool = True) -> dict:
    """Runs the evaluation; returns {"metrics": {...}, "samples": [...]} (see the module docstring)."""
    from tqdm import tqdm

    from jaxpref.data.shapes import judge

    mesh = make_mesh(1, -1, 1)
    policy, p_params = _load(args.policy, "lm", mesh, "--policy")
    reference, r_params = _load(args.reference, "lm", mesh, "--reference")
    if reference.config != policy.config:
        raise ValueError(f"--reference {args.reference} is not the policy's architecture")
    rm = _load(args.reward_model, "scalar", mesh, "--reward-model") if args.reward_model else None
    tokenizer = load_tokenizer(args.tokenizer or args.policy)
    cfg = policy.config
    processor = Processor(cfg, tokenizer, ProcessorConfig(kind="prompt", max_prompt_length=args.max_prompt_length,
                                                          max_length=None, length_buckets=args.length_buckets))
    rows = list(_rows(args))
    if not rows:
        raise ValueError(f"{args.data} split {args.split!r} has no rows")
    bs = args.batch_size
    samples = []
    bar = tqdm(total=len(rows), desc="eval", unit="prompt", disable=not progress)
    rng = jax.random.key(args.seed)
    for start in range(0, len(rows), bs):
        chunk = rows[start:start + bs]
        examples = [processor(r) for r in chunk]
        examples += [examples[0]] * (bs - len(examples))  # static batch shape; extra rows are dropped below
        batch = {k: v for k, v in processor.collate(examples).items() if v.dtype != object}
        row_ids = np.arange(start, start + bs, dtype=np.int32)
        out = {}
        for name, model, params in (("policy", policy, p_params), ("reference", reference, r_params)):
            g = generate(model, params, pixel_values=batch["pixel_values"], input_ids=batch["prompt_ids"],
                         attention_mask=batch["prompt_mask"], max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, greedy=args.greedy, eos_token_id=cfg.eos_token_id,
                         pad_token_id=cfg.pad_token_id, rng=rng, row_ids=row_ids)
            tokens, lengths = np.asarray(g.tokens), np.asarray(g.lengths)
            mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(np.int32)
            out[name] = {"tokens": tokens, "mask": mask, "lengths": lengths}
        t, m = out["policy"]["tokens"], out["policy"]["mask"]
        kl = np.asarray(_completion_logps(policy, p_params, batch, t, m) - _completion_logps(reference, r_params, batch, t, m))
        if rm is not None:
            for name in out:
                out[name]["reward"] = np.asarray(_reward(rm[0], rm[1], batch, out[name]["tokens"], out[name]["mask"]))
        for i, row in enumerate(chunk):
            s = {"index": start + i, "prompt": _prompt_text(row.get("prompt")), "kl": float(kl[i])}
            for name in out:
                ids = [int(x) for x in out[name]["tokens"][i, :out[name]["lengths"][i]] if int(x) != cfg.eos_token_id]
                s[name] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                s[f"{name}_length"] = int(out[name]["lengths"][i])
                if "reward" in out[name]:
                    s[f"{name}_reward"] = float(out[name]["reward"][i])
                if "scene" in row:
                    s[f"{name}_judge"] = judge(row["scene"], s["prompt"], s[name])
            if "scene" in row:
                s["scene"] = row["scene"]
            samples.append(s)
        bar.update(len(chunk))
    bar.close()
    return {"metrics": summarize(samples), "samples": samples, "args": dataclasses.asdict(args)}


def summarize(samples: list[dict]) -> dict:
    """The metrics of a list of samples (see the module docstring)."""
    mean = lambda k: float(np.mean([s[k] for s in samples]))
    m = {"num_prompts": len(samples), "kl": mean("kl"), "policy_length": mean("policy_length"),
         "reference_length": mean("reference_length")}
    if "policy_judge" in samples[0]:
        m.update(win_rate=float(np.mean([win(s["policy_judge"], s["reference_judge"]) for s in samples])),
                 judge_score=mean("policy_judge"), reference_judge_score=mean("reference_judge"),
                 judge_ties=float(np.mean([s["policy_judge"] == s["reference_judge"] for s in samples])))
    if "policy_reward" in samples[0]:
        m.update(rm_win_rate=float(np.mean([win(s["policy_reward"], s["reference_reward"]) for s in samples])),
                 reward=mean("policy_reward"), reference_reward=mean("reference_reward"))
    return m


def format_table(metrics: dict) -> str:
    """A readable two-column table of the metrics."""
    names = {"win_rate": "gold-judge win-rate (ties 1/2)", "judge_ties": "judge ties", "judge_score": "judge score",
             "reference_judge_score": "reference judge score", "rm_win_rate": "reward-model win-rate",
             "reward": "reward", "reference_reward": "reference reward", "kl": "KL(policy || reference), nats",
             "policy_length": "policy length, tokens", "reference_length": "reference length, tokens",
             "num_prompts": "prompts"}
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
    p.add_argument("--policy", required=True, help="policy model directory")
    p.add_argument("--reference", required=True, help="reference model directory (e.g. the SFT model)")
    p.add_argument("--data", required=True, help="dataset (e.g. data/shapes/prompt)")
    p.add_argument("--split", default="eval", help="default: eval")
    p.add_argument("--num", type=int, default=200, help="prompts (default 200; 0: all)")
    p.add_argument("--reward-model", default=None, help="reward model directory: adds the reward-model win-rate")
    p.add_argument("--tokenizer", default=None, help="default: the policy directory's")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write eval.json and samples.jsonl here")
    p.set_defaults(func=_main)


def _main(args) -> int:
    ea = EvalArgs(policy=args.policy, reference=args.reference, data=args.data, split=args.split,
                  num=args.num or None, reward_model=args.reward_model, tokenizer=args.tokenizer,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, greedy=args.greedy,
                  batch_size=args.batch_size, seed=args.seed)
    try:
        result = evaluate(ea)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxpref eval: {e}", file=sys.stderr)
        return 2
    print(format_table(result["metrics"]))
    if args.out:
        write(result, args.out)
        print(f"wrote {args.out}/eval.json and {args.out}/samples.jsonl")
    return 0
