"""What a model reads off the image, and results grouped by the task's question types.

    jaxpref reads --policy runs/demo/runs/sft [--num 1024] [--out DIR]

`short_answer_reads` asks a model held-out short questions of the built-in task and compares its
greedy answers with the right ones; `rows_by_question` / `agreement_by_question` split evaluation
samples by question type (describe, color, count, locate).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from tqdm import tqdm

from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.eval import EvalArgs, judge_agreement, load_model
from jaxpref.eval.evaluate import decode_response, prompt_batches, sample_responses
from jaxpref.sharding import make_mesh
from jaxpref.tasks.shapes import scenes
from jaxpref.tasks.shapes.scenes import QUESTIONS, Scene, parse_prompt


def short_answer_reads(model_dir: str, num: int = 1024, seed: int = 1, batch_size: int = 32,
                       tokenizer: str | None = None, max_new_tokens: int = 32, progress: bool = False) -> dict:
    """What a model reads off the image, measured by its greedy answers to `num` held-out short questions
    of the built-in task (jaxpref.tasks.shapes.scenes.SHORT_TEMPLATES: "Quick question: where is the red circle?"
    -> "On the left."; the eval split's scenes, the same rows for every model with the same num and seed),
    each compared with the right answer by exact match (stripped text). Every question is asked twice:
    with its own image, and with the image of the row before it in its batch (`shuffled`: what the
    language prior alone gets right). The preference methods answer with the reads the decoder has;
    they do not add reads (docs/RESULTS.md).

    Returns {"num_questions", "exact_match", "shuffled_exact_match", "by_kind": {kind: {"num",
    "exact_match", "shuffled_exact_match"}}, "samples": [{"prompt", "answer", "said", "said_shuffled",
    "kind"}]}."""
    if num < 1 or batch_size < 2:
        raise ValueError(f"short_answer_reads needs num >= 1 and batch_size >= 2, got {num} and {batch_size}")
    mesh = make_mesh(1, -1, 1)
    model, params = load_model(model_dir, "lm", mesh, "model")
    tok = load_tokenizer(tokenizer or model_dir)
    cfg = model.config
    rows = list(scenes.generate_split("short", num, seed, image_size=cfg.vision.image_size, split="eval"))
    args = EvalArgs(policy=model_dir, reference=model_dir, data="", max_new_tokens=max_new_tokens, greedy=True,
                    batch_size=batch_size)
    samples = []
    bar = tqdm(total=len(rows), desc=f"reads {model_dir}", unit="question", disable=not progress)
    for start, chunk, batch, row_ids in prompt_batches(cfg, tok, [{"images": r["images"], "prompt": r["prompt"]}
                                                                   for r in rows], args):
        n = len(chunk)
        said = {}
        for name, px in (("real", batch["pixel_values"]),
                         ("shuffled", np.concatenate([np.roll(batch["pixel_values"][:n], 1, axis=0),
                                                      batch["pixel_values"][n:]]))):
            g = sample_responses(model, params, {**batch, "pixel_values": px}, args, jax.random.key(seed), row_ids)
            said[name] = [decode_response(tok, cfg.eos_token_id, g["tokens"][i], g["lengths"][i]) for i in range(n)]
        for i, r in enumerate(rows[start:start + n]):
            samples.append({"prompt": r["prompt"], "answer": r["completion"].strip(), "said": said["real"][i],
                            "said_shuffled": said["shuffled"][i], "kind": scenes.short_question_kind(r["prompt"])})
        bar.update(n)
    bar.close()
    right = lambda ss, key: float(np.mean([s[key] == s["answer"] for s in ss]))  # noqa: E731
    by_kind = {}
    for k in scenes.SHORT_TEMPLATES:
        asked = [s for s in samples if s["kind"] == k]
        if asked:
            by_kind[k] = {"num": len(asked), "exact_match": right(asked, "said"),
                          "shuffled_exact_match": right(asked, "said_shuffled")}
    return {"num_questions": len(samples), "exact_match": right(samples, "said"),
            "shuffled_exact_match": right(samples, "said_shuffled"), "by_kind": by_kind, "samples": samples}


def format_reads(reads: dict) -> str:
    """A table of short_answer_reads' result: exact match per question kind, own and other rows' images."""
    lines = [f"{'question':<12} {'asked':>6}  {'exact match':>11}  {'with another image':>18}"]
    rows = [(k, v) for k, v in reads["by_kind"].items()] + [("all", {
        "num": reads["num_questions"], "exact_match": reads["exact_match"],
        "shuffled_exact_match": reads["shuffled_exact_match"]})]
    for k, v in rows:
        lines.append(f"{k:<12} {v['num']:>6}  {v['exact_match']:>11.3f}  {v['shuffled_exact_match']:>18.3f}")
    return "\n".join(lines)


def write_reads(reads: dict, out_dir: str):
    """out_dir/reads.json (everything but the samples) and out_dir/reads.jsonl (one question per line)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "reads.json"), "w") as f:
        json.dump({k: v for k, v in reads.items() if k != "samples"}, f, indent=2)
    with open(os.path.join(out_dir, "reads.jsonl"), "w") as f:
        for s in reads["samples"]:
            f.write(json.dumps(s) + "\n")




def rows_by_question(samples: list[dict]) -> dict[str, list[int]]:
    """Row indices of samples (each with the built-in task's "scene" JSON and "prompt") for all rows
    and per question type: {"all": [...], "describe": [...], ...}, in QUESTIONS' order, types
    without rows left out."""
    kinds = [parse_prompt(Scene.from_json(s["scene"]), s["prompt"]).question for s in samples]
    groups = {q: [i for i, k in enumerate(kinds) if q in ("all", k)] for q in ("all",) + QUESTIONS}
    return {q: idx for q, idx in groups.items() if idx}


def agreement_by_question(samples: list[dict]) -> dict:
    """judge_agreement over best_of_n's samples, for all rows and per question type of the built-in
    task ({"all": ..., "color": ..., ...}; types without rows left out): jaxpref.eval.format_agreement
    prints it."""
    return {q: {"prompts": len(idx), **judge_agreement([samples[i]["candidate_judge"] for i in idx],
                                                       [samples[i]["candidate_reward"] for i in idx])}
            for q, idx in rows_by_question(samples).items()}


def add_reads_parser(subparsers):
    p = subparsers.add_parser("reads", help="what a model reads off the image: held-out short questions of the "
                                            "built-in shapes task, exact match per question kind",
                              description=short_answer_reads.__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the model directory whose reads are measured")
    p.add_argument("--num", type=int, default=1024, help="questions (default 1024)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tokenizer", default=None, help="default: the model directory's")
    p.add_argument("--out", default=None, help="write reads.json and reads.jsonl here")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        reads = short_answer_reads(args.policy, num=args.num, batch_size=args.batch_size, tokenizer=args.tokenizer,
                                   progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxpref reads: {e}", file=sys.stderr)
        return 2
    print(format_reads(reads))
    if args.out:
        write_reads(reads, args.out)
        print(f"wrote {args.out}/reads.json and {args.out}/reads.jsonl")
    return 0
