"""The report of a `jaxpref demo` run: DIR/report.md, DIR/img/*.png and DIR/examples.html from
DIR/summary.json and the files the stages wrote, and the summary printed at the end of a run.

    from jaxpref.tasks.shapes.report import write_report
    write_report("runs/demo")           # what the demo's last stage does; re-run it after editing a table
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import textwrap

import numpy as np
import yaml
from PIL import Image

from jaxpref.eval import first_rows, win
from jaxpref.plots import plot_ppo, plot_reward_model, pyplot, save
from jaxpref.tasks.shapes.reads import agreement_by_question, rows_by_question
from jaxpref.tasks.shapes.scenes import Scene, names_every_shape, question_of
from jaxpref.train.logging import read_metrics

DATA_KINDS = ("short", "sft", "preference", "prompt")
# the policies the eval stage compares with SFT: DPO, PPO against DPO's implicit reward (with its rounds), and
# PPO against the scalar reward model (the classic RLHF route)
METHODS = ("dpo", "ppo", "ppo_scalar_rm")
LABELS = {"ppo_scalar_rm": "PPO-RM"}  # how tables and plots name a model when not by its stage name upper-cased


def model_label(name: str) -> str:
    return LABELS.get(name, name.upper())
NUM_EXAMPLES = 8  # held-out prompts in the example grid


def summary_path(out: str) -> str:
    return os.path.join(out, "summary.json")


def read_summary(out: str) -> dict:
    with open(summary_path(out)) as f:
        return json.load(f)


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _method_rows(summary: dict) -> list[tuple[str, dict]]:
    return [(name, summary[m]) for m, name in (("sft", "SFT (reference)"), ("dpo", "DPO"), ("ppo", "PPO"),
                                                   ("ppo_scalar_rm", "PPO-RM"))
            if m in summary]


def format_summary(summary: dict, out: str) -> str:
    """The one screen printed at the end: stage times, the key numbers, where the report is."""
    stages = summary["stages"]
    w = max(len(name) for name in list(stages) + ["total"])
    lines = [f"jaxpref demo ({'quick' if summary['quick'] else 'full'} plan): {out}", f"  {'stage':<{w}}  wall time"]
    lines += [f"  {name:<{w}}  {duration(s['seconds']):>9}" + _stage_note(s) for name, s in stages.items()]
    lines.append(f"  {'total':<{w}}  {duration(run_seconds(stages)):>9}  (the stages run here: not the shipped base's)")
    if rm := summary.get("reward_model"):
        lines.append(f"reward model: accuracy {_f(rm.get('accuracy'))} against the labels (ceiling "
                     f"{_f(rm.get('label_agreement'))}), {_f(rm.get('gold_accuracy'))} against the gold judge")
    if "ppo" in summary or "dpo" in summary:
        lines.append(f"  {'':<16}{'gold win-rate':>14}{'RM win-rate':>13}{'judge score':>13}{'KL':>8}{'length':>8}")
        for name, m in _method_rows(summary):
            lines.append(f"  {name:<16}{_f(m.get('win_rate')):>14}{_f(m.get('rm_win_rate')):>13}"
                         f"{_f(m.get('judge_score')):>13}{_f(m.get('kl'), '.2f'):>8}{_f(m.get('length'), '.1f'):>8}")
    if "report" in stages:
        lines.append(f"report: {os.path.join(out, 'report.md')} (plots in {os.path.join(out, 'img')}/, examples in "
                     f"{os.path.join(out, 'examples.html')})")
    return "\n".join(lines)


def _stage_note(s: dict, quote: str = "") -> str:
    """Where a stage's time comes from, when it did not run here (`quote`: "`" in markdown)."""
    if "shipped_base" in s:
        return f"  (the shipped base's, made at {quote}{s['shipped_base']}{quote}; not run here)"
    return f"  (reused from {quote}{s['reused_from']}{quote})" if "reused_from" in s else ""


def run_seconds(stages: dict) -> float:
    """The wall time of the stages a demo ran (or reused): the shipped base's recorded times left out."""
    return sum(s["seconds"] for s in stages.values() if s and "shipped_base" not in s)


def _samples(out: str, method: str) -> list[dict]:
    with open(os.path.join(out, "eval", method, "samples.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def hacking_cases(samples: list[dict]) -> list[dict]:
    """Samples where the reward model scores the policy's response above the reference's but the gold
    judge does not (judge score equal or lower), largest reward gap first."""
    cases = [s for s in samples
             if s["policy_reward"] > s["reference_reward"] and s["policy_judge"] <= s["reference_judge"]]
    return sorted(cases, key=lambda s: s["reference_reward"] - s["policy_reward"])


def _image_bytes(out: str, num: int) -> list[bytes]:
    """PNG bytes of the first `num` held-out prompts (eval samples' `index` is the row's position)."""

    return [row["images"][0]["bytes"] for row in first_rows(os.path.join(out, "data", "prompt"), "eval", num)]


def examples(out: str, samples: dict[str, list[dict]], num: int = NUM_EXAMPLES) -> list[dict]:
    """The first `num` held-out prompts: image (PNG bytes), prompt, and the SFT, DPO and PPO responses with
    their judge scores and rewards (SFT's from the PPO comparison: the same keys give the same response in both).
    `samples`: {method: the eval samples of METHODS' comparisons with SFT}."""
    by_method = {m: {s["index"]: s for s in samples[m]} for m in METHODS}
    images = _image_bytes(out, num)
    rows = []
    for i, image in enumerate(images):
        if not all(i in by_method[m] for m in METHODS):
            break
        ppo = by_method["ppo"][i]
        row = {"index": i, "image": image, "prompt": ppo["prompt"],
               "sft": (ppo["reference"], ppo["reference_judge"], ppo["reference_reward"])}
        for m in METHODS:
            s = by_method[m][i]
            row[m] = (s["policy"], s["policy_judge"], s["policy_reward"])
        rows.append(row)
    return rows


JUDGE_BINS = ("0", "(0, 0.5)", "[0.5, 1)", "1")  # the judge's scores: wrong, mostly wrong, mostly right, right


def judge_bins(scores) -> list[float]:
    """Fractions of `scores` (judge scores in [0, 1]) in each of JUDGE_BINS."""
    x = np.asarray(scores, np.float64)
    if not x.size:
        return [0.0] * len(JUDGE_BINS)
    return [float(np.mean(m)) for m in (x == 0, (x > 0) & (x < 0.5), (x >= 0.5) & (x < 1), x == 1)]


def judge_table(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """The judge's scores before (SFT: the reference's responses, the same in every comparison) and after
    (each of METHODS in `samples`), overall and per question type of the task: {"all" | question: {"prompts": n,
    "sft": scores, method: scores, f"{method}_win": win-rate vs SFT (ties 1/2), f"{method}_ties": ...}}."""

    methods = [m for m in METHODS if m in samples]
    ref = samples[methods[0]]
    for m in methods:  # row i of every comparison must be the same held-out prompt
        if [s["index"] for s in samples[m]] != [s["index"] for s in ref]:
            raise ValueError(f"the {m} and {methods[0]} eval samples hold different prompts: re-run the eval stage")
    table = {}
    for q, idx in rows_by_question(ref).items():
        row = {"prompts": len(idx), "sft": [ref[i]["reference_judge"] for i in idx]}
        for m in methods:
            pairs = [(samples[m][i]["policy_judge"], samples[m][i]["reference_judge"]) for i in idx]
            row[m] = [p for p, _ in pairs]
            row[f"{m}_win"] = float(np.mean([win(p, r) for p, r in pairs]))
            row[f"{m}_ties"] = float(np.mean([p == r for p, r in pairs]))
        table[q] = row
    return table


def plot_judge_scores(table: dict, path: str) -> str:
    """Bars: the fraction of held-out prompts in each judge-score bin for SFT and each tuned policy."""

    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    names = ["sft"] + list(METHODS)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(JUDGE_BINS))]
        bars = ax.bar(xs, judge_bins(table["all"][name]), width, label=model_label(name), color=f"C{j + 2}")
        for b in bars:
            ax.annotate(f"{b.get_height():.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(JUDGE_BINS)), [f"score {b}" for b in JUDGE_BINS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"fraction of the {table['all']['prompts']} prompts")
    ax.set_title("gold-judge scores of one sampled response per prompt")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_win_rates(summary: dict, path: str) -> str:
    """Bars: DPO's and PPO's win-rates against SFT by the gold judge and by the reward model (ties 1/2),
    with one standard error and the 0.5 line."""

    fig, ax = pyplot().subplots(figsize=(5, 3.6))
    names = [m for m in METHODS if m in summary]
    width = 0.38
    for j, (key, label) in enumerate((("win_rate", "gold judge"), ("rm_win_rate", "reward model"))):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        vals = [summary[m][key] for m in names]
        errs = [summary[m].get(f"{key}_se", 0.0) for m in names]
        bars = ax.bar(xs, vals, width, yerr=errs, capsize=3, label=label, color=f"C{j}")
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 3), textcoords="offset points")
    ax.axhline(0.5, color="gray", ls="--", lw=0.8, label="tie with SFT")
    ax.set_xticks(range(len(names)), [model_label(m) for m in names])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("win-rate against SFT")
    ax.set_title("held-out win-rates (ties 1/2)")
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def plot_examples(rows: list[dict], path: str) -> str:
    """A grid: one held-out prompt per row, its image, and the SFT / DPO / PPO responses with judge scores."""


    n = max(1, len(rows))
    fig, axes = pyplot().subplots(n, 2, figsize=(12, 1.75 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 7]})
    for (ax_img, ax_txt), row in zip(axes, rows):
        ax_img.imshow(Image.open(io.BytesIO(row["image"])).convert("RGB"), interpolation="nearest")
        ax_img.set_axis_off()
        ax_txt.set_axis_off()
        lines = [f"Q: {row['prompt']}"]
        for m in ("sft", *METHODS):
            text, judge, _ = row[m]
            short = textwrap.shorten(text or "(empty)", 120, placeholder=" ...")
            lines.append(f"{model_label(m):>4} [judge {judge:.2f}]  {short}")
        ax_txt.text(0, 0.5, "\n".join(lines), va="center", ha="left", fontsize=8, family="monospace")
    for ax_img, ax_txt in axes[len(rows):]:
        ax_img.set_axis_off()
        ax_txt.set_axis_off()
    fig.suptitle("held-out prompts: SFT, DPO and PPO responses (gold-judge score in brackets)", fontsize=10)
    return save(fig, path, dpi=100)


def write_examples_html(rows: list[dict], path: str) -> str:
    """A self-contained HTML page (images inlined) of the example grid."""
    cells = []
    for row in rows:
        src = "data:image/png;base64," + base64.b64encode(row["image"]).decode()
        tds = [f'<td><img src="{src}" width="128" height="128" style="image-rendering: pixelated"></td>',
               f"<td>{html.escape(row['prompt'])}</td>"]
        ref_judge = row["sft"][1]
        for m in ("sft", *METHODS):
            text, judge, reward = row[m]
            cls = "" if m == "sft" else " better" if judge > ref_judge else " worse" if judge < ref_judge else ""
            tds.append(f'<td class="resp{cls}">{html.escape(text) or "<i>(empty)</i>"}<div class="score">judge '
                       f"{judge:.2f} &middot; reward {reward:.2f}</div></td>")
        cells.append("<tr>" + "".join(tds) + "</tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>jaxpref demo: examples</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 6px 10px; vertical-align: top; max-width: 22em; }}
th {{ background: #f3f3f3; }}
.score {{ color: #666; font-size: 80%; margin-top: 4px; }}
.better {{ background: #e8f6e8; }}
.worse {{ background: #fbeaea; }}
</style></head><body>
<h1>Held-out prompts: SFT, DPO and PPO</h1>
<p>The first {len(rows)} prompts of the held-out split. Each response carries its gold-judge score (against the
scene: facts right, nothing invented, natural and concise) and the reward model's score. Green: the judge scores
it above SFT's response; red: below.</p>
<table>
<tr><th>image</th><th>prompt</th><th>SFT (reference)</th><th>DPO</th><th>PPO</th></tr>
{chr(10).join(cells)}
</table></body></html>
"""
    with open(path, "w") as f:
        f.write(page)
    return path


def write_report(out: str) -> str:
    """DIR/report.md, DIR/img/{reward_model,ppo,win_rates,judge_scores,examples}.png and DIR/examples.html, from the
    files the earlier stages wrote (summary.json, runs/*/metrics.jsonl, eval/*/samples.jsonl)."""

    summary = read_summary(out)
    plan, rm = summary["plan"], summary["reward_model"]
    img = os.path.join(out, "img")
    plot_reward_model(os.path.join(out, "runs", "reward"), os.path.join(img, "reward_model.png"),
                      ceiling=rm.get("label_agreement"), gold=rm.get("gold_accuracy"))
    plot_ppo(os.path.join(out, "runs", "ppo"), os.path.join(img, "ppo.png"),
             rounds=[r["policy_steps"] for r in summary.get("ppo_rounds") or []])
    plot_win_rates(summary, os.path.join(img, "win_rates.png"))
    samples = {m: _samples(out, m) for m in METHODS}
    judges = judge_table(samples)
    plot_judge_scores(judges, os.path.join(img, "judge_scores.png"))
    rows = examples(out, samples)
    plot_examples(rows, os.path.join(img, "examples.png"))
    write_examples_html(rows, os.path.join(out, "examples.html"))
    ppo_evals = [r for r in read_metrics(os.path.join(out, "runs", "ppo")) if "eval_judge_score" in r]

    steps = {name: entries["max_steps"] for name, entries in plan.items() if "max_steps" in entries}
    rounds = plan["comparisons"]["dpo_rounds"]
    model = plan["sft"].get("model.name_or_path")  # None: SFT starts from the pretrain stage
    n = summary["ppo"]["num_prompts"]
    ppo_rounds = summary.get("ppo_rounds") or []
    ppo_reward = ppo_reward_text(out, ppo_rounds[0]["dpo_start"] if ppo_rounds else None)
    lines = ["# jaxpref demo: the shapes task, end to end", "", _paragraph(summary, steps, model, ppo_reward), ""]

    lines += ["## Stages", "", "| stage | wall time | what |", "|---|---|---|"]
    counts = " / ".join(str(plan["data"][f"{k}_rows"]) for k in DATA_KINDS)
    what = {"data": f"{counts} train rows ({' / '.join(DATA_KINDS)}), {plan['data']['eval_rows']} eval rows each",
            "tower": f"{plan['tower']['steps']} steps x {plan['tower']['batch_size']} scenes, vision tower of "
                     f"`{plan['tower']['preset']}` -> `runs/tower`",
            "pretrain": f"{steps['pretrain']} steps of short questions from `runs/tower` -> `runs/pretrain`",
            "pretrain2": f"{steps['pretrain2']} more on a second cosine (a fresh AdamW state, data order seed "
                         f"{plan['pretrain2'].get('seed')}) from `runs/pretrain` -> `runs/pretrain2`",
            "sft": f"{steps['sft']} steps from `{model or 'runs/pretrain2'}` -> `runs/sft`",
            "comparisons": _comparisons_what(summary, plan),
            "reward": f"{steps['reward']} steps from `runs/sft` on `data/comparisons` -> `runs/reward`",
            "dpo": (f"{steps['dpo']} steps from `runs/sft` on `data/comparisons` -> `runs/dpo`" if rounds == 1 else
                    f"{rounds} rounds: {steps['dpo']} steps from `runs/sft`, then {plan['comparisons']['round_steps']} "
                    f"steps a round on comparisons of the last round's answers (paired "
                    f"{plan['comparisons']['round_pairs']}) -> `runs/dpo` (`runs/dpo-rounds/`)"),
            "ppo": f"from `runs/sft` against {ppo_reward}: {_ppo_steps(summary, steps['ppo'])} -> `runs/ppo`"
                   + (" (`runs/ppo-rounds/`)" if ppo_rounds else ""),
            "ppo_scalar_rm": f"from `runs/sft` against the scalar reward model `runs/reward`: "
                             f"{steps.get('ppo_scalar_rm')} iterations -> `runs/ppo_scalar_rm`",
            "eval": f"reward-model accuracy; DPO, PPO and PPO-RM against SFT on {n} prompts"
                    + (f"; best-of-{plan['eval']['best_of']} of SFT" if plan["eval"].get("best_of") else "")
                    + (f"; each model's reads on {plan['eval']['reads']} short questions" if plan["eval"].get("reads")
                       else "") + " -> `eval/`",
            "report": "this file, `img/`, `examples.html`"}
    stages = dict(summary["stages"])
    stages.setdefault("report", None)  # this stage: still running
    for name, s in stages.items():
        note = _stage_note(s, "`").strip() if s else ""
        lines.append(f"| {name} | {duration(s['seconds']) if s else '(this step)'} | {what.get(name, '')}"
                     f"{' ' + note if note else ''} |")
    lines += [f"| total | {duration(run_seconds(stages))} (before the report; the shipped base's stages not "
              f"counted) | |", ""]

    lines += ["## Reward model", "",
              f"Pairwise accuracy on the {rm['num_pairs']} held-out preference pairs "
              "(`eval/reward_model/eval.json`):", "",
              "| measure | value |", "|---|---|",
              f"| accuracy against the eval labels | {_f(rm['accuracy'])} |",
              f"| accuracy against the gold judge's ordering | {_f(rm.get('gold_accuracy'))} |",
              "| labels the judge agrees with (label noise caps the first row here) | "
              f"{_f(rm.get('label_agreement'))} |",
              "", "![reward model accuracy](img/reward_model.png)", ""]
    if curve := summary.get("best_of_n"):
        lines += _best_of_n_lines(curve, n) + _agreement_lines(out)

    lines += [f"## DPO and PPO against SFT ({n} held-out prompts)", "",
              "Each model samples one response per prompt (temperature 0.7, the same random keys for all). "
              "Win-rates count ties as 1/2; ± is one standard error over prompts. KL is to SFT, in nats per response.",
              "", "| method | gold-judge win-rate vs SFT | reward-model win-rate vs SFT | judge score | reward | "
              "KL to SFT | length (tokens) |", "|---|---|---|---|---|---|---|"]
    for name, m in _method_rows(summary):
        win = f"{_f(m['win_rate'])} ± {_f(m.get('win_rate_se'), '.3f')}" if "win_rate" in m else "-"
        rmw = f"{_f(m['rm_win_rate'])} ± {_f(m.get('rm_win_rate_se'), '.3f')}" if "rm_win_rate" in m else "-"
        lines.append(f"| {name} | {win} | {rmw} | {_f(m['judge_score'])} | {_f(m.get('reward'))} | "
                     f"{_f(m.get('kl'), '.3f')} | {_f(m.get('length'), '.1f')} |")
    lines += ["", "![win-rates](img/win_rates.png)", ""]
    if len(summary.get("dpo_rounds", [])) > 1:
        lines += ["DPO's rounds: each round's comparisons, and the gold judge's mean score of the answers they were "
                  "made from (the policy the round starts from, on the train prompts; n answers per prompt):", "",
                  "| round | starts from | steps | pairing | pairs | prompts whose answers all score alike | "
                  "judge score of its answers | of the best answer |", "|---|---|---|---|---|---|---|---|"]
        for d in summary["dpo_rounds"]:
            lines.append(f"| {d['round']} | `{d['start']}` | {d.get('max_steps', '-')} | {d.get('pairing', '-')} | "
                         f"{d['pairs']} | {d['prompts_without_pair']} | "
                         f"{_f(d['judge_score'])} | {_f(d['best_judge_score'])} |")
        lines.append("")
    lines += _ppo_rounds_lines(summary, ppo_evals)
    lines += ["### The judge's scores before and after", "",
              "The fraction of prompts whose response the gold judge scores 0 (wrong or invented facts), "
              "above 0 but below 0.5, from 0.5 up to 1, and 1 (right and concise); then, per question type, the "
              "mean score and the win-rate against SFT (in brackets: the fraction of ties).", "",
              "| model | mean | " + " | ".join(f"score {b}" for b in JUDGE_BINS) + " |",
              "|---" * (2 + len(JUDGE_BINS)) + "|"]
    for name in ["sft"] + list(METHODS):
        scores = judges["all"][name]
        lines.append(f"| {model_label(name)} | {_f(float(np.mean(scores)))} | "
                     + " | ".join(_f(x, ".2f") for x in judge_bins(scores)) + " |")
    lines += ["", "| question | prompts | SFT | " + " | ".join(f"{model_label(m)}: score, win-rate (ties)" for m in METHODS)
              + " |", "|---" * (3 + len(METHODS)) + "|"]
    for q, row in judges.items():
        cells = [f"{_f(float(np.mean(row[m])))}, {_f(row[f'{m}_win'])} ({_f(row[f'{m}_ties'], '.2f')})"
                 for m in METHODS]
        lines.append(f"| {q} | {row['prompts']} | {_f(float(np.mean(row['sft'])))} | " + " | ".join(cells) + " |")
    lines += ["", "![judge scores](img/judge_scores.png)", ""]
    lines += _grounded_lines(samples)
    lines += _reads_lines(summary)
    lines += ["PPO per iteration (held-out evaluations every "
              f"{plan['ppo'].get('eval_steps', '?')} iterations):", "", "![PPO](img/ppo.png)", ""]

    lines += ["## Reward hacking", "",
              "A case: the reward model scores the policy's response above SFT's, the gold judge does not (equal or "
              "lower). Not every case is exploitation: the reward model orders held-out pairs like the judge only "
              f"{_f(rm.get('gold_accuracy'))} of the time, and the judge often scores both responses the same (e.g. "
              "both 0). What points at exploitation is a rate of such cases well above the reward model's error "
              "rate, and a held-out reward that climbs while the judge score does not.", ""]
    for m in METHODS:
        cases = hacking_cases(samples[m])
        lower = sum(s["policy_judge"] < s["reference_judge"] for s in cases)
        lines.append(f"- {model_label(m)}: {len(cases)} of {len(samples[m])} prompts ({len(cases) / len(samples[m]):.0%}); "
                     f"on {lower} of them the judge scores the policy strictly lower.")
    # one reward model's scores: PPO's first iterations (each of its rounds reads another DPO round)
    first_evals = [r for r in ppo_evals if not ppo_rounds or r["step"] <= ppo_rounds[0]["policy_steps"]]
    if len(first_evals) >= 2:
        a, b = first_evals[0], first_evals[-1]
        lines.append(f"- During PPO training (held-out, step {a['step']} -> {b['step']}"
                     + (", before its rounds" if ppo_rounds else "") + f"): reward "
                     f"{_f(a.get('eval_reward'))} -> {_f(b.get('eval_reward'))}, gold judge score "
                     f"{_f(a['eval_judge_score'])} -> {_f(b['eval_judge_score'])}.")
    lines.append("")
    for m in METHODS:
        cases = hacking_cases(samples[m])[:3]
        if not cases:
            lines += [f"No such case for {model_label(m)}.", ""]
            continue
        lines += [f"The {len(cases)} largest reward gaps for {model_label(m)}:", "",
                  f"| prompt | SFT | {model_label(m)} | reward SFT -> {model_label(m)} | judge SFT -> {model_label(m)} |",
                  "|---|---|---|---|---|"]
        for s in cases:
            lines.append(f"| {_md(s['prompt'])} | {_md(s['reference'])} | {_md(s['policy'])} | "
                         f"{s['reference_reward']:.2f} -> {s['policy_reward']:.2f} | "
                         f"{s['reference_judge']:.2f} -> {s['policy_judge']:.2f} |")
        lines.append("")

    lines += ["## Examples", "",
              f"The first {len(rows)} held-out prompts with each model's response and gold-judge score "
              "([examples.html](examples.html) has them with the reward model's scores too):", "",
              "![examples](img/examples.png)", "",
              "Files: `summary.json` (the numbers above), `eval/*/samples.jsonl` (every sample), "
              "`runs/*/metrics.jsonl`, `runs/*/` (Hugging Face model directories). Re-running the same "
              "`jaxpref demo` command skips finished stages.", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


READ_KINDS = {"where_is": "where is the X", "color_of": "color of the X", "color_at": "color at a place",
              "kind_at": "shape at a place", "size_at": "size at a place", "count": "count", "describe": "describe"}


def grounded_table(samples: dict[str, list[dict]]) -> dict[str, dict]:
    """On the color and locate prompts about scenes of two or three shapes: how often each model's answer
    names every shape (jaxpref.tasks.shapes.scenes.names_every_shape: a grounded answer, the scene listed) and the
    judge's mean score of the answers that do and of those that do not: {"sft" | method: {"prompts": n,
    "share": s, "score_listed": x, "score_other": y}} (a score None when no answer falls there)."""

    methods = tuple(m for m in METHODS if m in samples)
    ref = samples[methods[0]]
    picked = [i for i, s in enumerate(ref) if question_of(s["prompt"]) in ("color", "locate")
              and len(Scene.from_json(s["scene"]).shapes) > 1]
    table = {}
    for name in ("sft",) + methods:
        key, rows = ("reference", ref) if name == "sft" else ("policy", samples[name])
        listed = [names_every_shape(rows[i]["scene"], rows[i][key]) for i in picked]
        scores = [rows[i][f"{key}_judge"] for i in picked]
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        table[name] = {"prompts": len(picked), "share": mean([float(x) for x in listed]),
                       "score_listed": mean([s for s, x in zip(scores, listed) if x]),
                       "score_other": mean([s for s, x in zip(scores, listed) if not x])}
    return table


def _grounded_lines(samples: dict[str, list[dict]]) -> list[str]:
    """The report's table of grounded answers (grounded_table)."""
    table = grounded_table(samples)
    n = table["sft"]["prompts"]
    if not n:
        return []
    lines = ["### Answers that list the scene", "",
             f"On the {n} held-out color and locate prompts about scenes of two or three shapes: the share of answers "
             "that name every shape (\"Where is the red circle?\" -> \"A red circle on the left and a blue star in the "
             "center.\", as `data.sft_grounded_fraction` of SFT's good answers do), and the judge's mean score "
             "of those answers and of the others. A listing answers without finding the named shape first, the lookup "
             "the decoder reads worst (below); the judge scores it by the same rules as any answer, its length rule "
             "charging 0.01 a word over 12 (docs/SHAPES.md).", "",
             "| model | share that list the scene | judge score when they do | when they do not |", "|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {model_label(name)} | {_f(row['share'], '.2f')} | {_f(row['score_listed'])} | "
                     f"{_f(row['score_other'])} |")
    return lines + [""]


def _reads_lines(summary: dict) -> list[str]:
    """The report's table of what each model reads off the image (summary["reads"], from the eval stage)."""
    reads = summary.get("reads")
    if not reads:
        return []
    first = next(iter(reads.values()))
    kinds = [k for k in READ_KINDS if k in first["by_kind"]]
    lines = ["### What the models read off the image", "",
             f"Greedy answers to {first['num_questions']} held-out short questions (\"Quick question: where is the red "
             "circle?\" -> \"On the left.\"), exact match (an answer in another form counts wrong), per question kind "
             "(how many were asked in brackets); the last column asks every question with another row's image (what "
             "the words alone get right). The judge's locate and color questions need the first two reads, unless the "
             "answer lists the scene (above). "
             "Preference tuning teaches the decoder to use the reads it has, not new ones, so on locate and color "
             "questions these limit what DPO and PPO can win (docs/RESULTS.md, \"What the numbers mean, and their "
             "limits\"). Every answer: `eval/reads/<model>/reads.jsonl`.", "",
             "| model | all | " + " | ".join(f"{READ_KINDS[k]} ({first['by_kind'][k]['num']})" for k in kinds)
             + " | all, another image |", "|---" * (3 + len(kinds)) + "|"]
    for name, r in reads.items():
        lines.append(f"| {model_label(name)} | {_f(r['exact_match'])} | "
                     + " | ".join(_f(r["by_kind"][k]["exact_match"], ".2f") if k in r["by_kind"] else "-"
                                  for k in kinds)
                     + f" | {_f(r['shuffled_exact_match'])} |")
    return lines + [""]


def _comparisons_what(summary: dict, plan: dict) -> str:
    c, st = plan["comparisons"], summary.get("comparisons", {})
    made = (f": {st['prompts']} prompts -> {st['pairs']} pairs" + (f" + {st['mixed']} from `data/preference`"
                                                                   if st.get("mixed") else "")) if st else ""
    return (f"{c['n']} answers of `runs/sft` per `data/{c['prompts']}` prompt, judged with {c['label_noise']:.0%} "
            f"of the labels flipped, {c['pairs']}{made} -> `data/comparisons`")


def ppo_reward_text(out: str, reward_model: str | None = None) -> str:
    """What PPO was tuned against, from runs/ppo/config.yaml: `runs/reward`, or DPO's implicit reward;
    `reward_model` (relative to `out`): the one its first iterations used, when its rounds changed it."""

    with open(os.path.join(out, "runs", "ppo", "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    rm = f"`{reward_model or os.path.relpath(cfg['reward_model_path'], out)}`"
    if cfg.get("reward_model_type", "scalar") != "implicit":
        return f"the reward model {rm}"
    return (f"the implicit reward of {rm} (beta {cfg['implicit_reward_beta']} x log pi / pi_sft; value model from "
            f"`{os.path.relpath(cfg['value_model_path'], out)}`)")


def _best_of_n_lines(curve: list[dict], n: int) -> list[str]:
    """The best-of-n table: what the reward model buys when it picks among SFT's own answers, against
    what the gold judge's pick reaches (the ceiling of tuning at that KL)."""
    lines = [f"### Best-of-n: the reward model picking among SFT's answers ({n} held-out prompts)", "",
             "SFT samples k answers per prompt; the reward model's favourite and the gold judge's favourite are "
             "each compared with SFT's own sample (the one in the table below). The judge's pick is what tuning "
             "against a perfect reward could reach at that KL (best-of-k's KL to SFT is at most "
             "log k - (k-1)/k); the reward model's pick is what this reward model can buy. A reward model that "
             "misleads on the policy's own answers shows here as a win-rate that falls with k while its own "
             "verdict climbs (`eval/best_of_n/`).", "",
             "| k | KL bound | win-rate, judge picks | judge score | win-rate, RM picks | judge score | "
             "RM's own win-rate |", "|---|---|---|---|---|---|---|"]
    for p in curve:
        lines.append(f"| {p['k']} | {p['kl_bound']:.2f} | {_f(p['oracle_win_rate'])} | {_f(p['oracle_judge_score'])} | "
                     f"{_f(p.get('rm_pick_win_rate'))} | {_f(p.get('rm_pick_judge_score'))} | "
                     f"{_f(p.get('rm_pick_reward_win_rate'))} |")
    return lines + [""]


def _agreement_lines(out: str) -> list[str]:
    """Per question type: how often the reward model orders two of SFT's answers as the judge does:
    the eval stage's eval/best_of_n/best_of_n.json, or for demos evaluated before it stored the
    agreement, jaxpref.eval.agreement_by_question over best_of_n.jsonl."""

    stored, path = (os.path.join(out, "eval", "best_of_n", f) for f in ("best_of_n.json", "best_of_n.jsonl"))
    agreement = None
    if os.path.exists(stored):
        with open(stored) as f:
            agreement = json.load(f).get("agreement")
    if agreement is None:
        if not os.path.exists(path):
            return []
        with open(path) as f:
            agreement = agreement_by_question([json.loads(line) for line in f])
    lines = ["Where the reward model can tell answers apart: of every two of SFT's answers to one prompt that "
             "the judge scores differently (the candidates above), the share the reward model orders the same "
             "way (0.5: chance):", "", "| question | prompts | pairs | agreement with the judge |", "|---|---|---|---|"]
    for q, a in agreement.items():
        lines.append(f"| {q} | {a['prompts']} | {a['pairs']} | {_f(a['agreement'])} |")
    return lines + [""]


def _ppo_steps(summary: dict, steps: int) -> str:
    rounds = summary.get("ppo_rounds") or []
    if not rounds:
        return f"{steps} iterations"
    return (f"{steps} iterations, then {len(rounds)} round{'s' if len(rounds) > 1 else ''} of "
            f"{rounds[0]['max_steps'] - rounds[0]['policy_steps']} more, each against a new DPO round trained on "
            f"comparisons of PPO's own answers")


def _ppo_rounds_lines(summary: dict, evals: list[dict]) -> list[str]:
    """The report's table of PPO's rounds (summary["ppo_rounds"]), with the held-out evaluation PPO
    logged at the end of each (`evals`: runs/ppo/metrics.jsonl's eval records)."""
    rounds = summary.get("ppo_rounds") or []
    if not rounds:
        return []
    at = {r["step"]: r for r in evals}
    first = rounds[0]
    lines = ["PPO's rounds (iterated RLHF): after its first iterations, each round judges PPO's own answers to the "
             "train prompts (with the raters' label noise), trains one more DPO round on them from the last, and "
             "continues PPO against that round's implicit reward. The last columns are PPO's own held-out "
             "evaluation at the round's last iteration (its `eval_num_prompts` prompts, fewer than the table "
             "above):", "",
             "| round | PPO iterations | reward (implicit) | comparisons of PPO's answers: pairs | prompts whose "
             "answers all score alike | judge score of its answers | of the best answer | win-rate vs SFT | "
             "judge score |", "|---|---|---|---|---|---|---|---|---|"]
    e = at.get(first["policy_steps"], {})
    lines.append(f"| 0 | {first['policy_steps']} | `{first['dpo_start']}` | - | - | - | - | "
                 f"{_f(e.get('eval_win_rate'))} | {_f(e.get('eval_judge_score'))} |")
    for d in rounds:
        e = at.get(d["max_steps"], {})
        lines.append(f"| {d['round']} | {d['policy_steps']} -> {d['max_steps']} | `{d['reward_model']}` "
                     f"({d['dpo_steps']} steps from `{d['dpo_start']}`) | {d['pairs']} | {d['prompts_without_pair']} | "
                     f"{_f(d['judge_score'])} | {_f(d['best_judge_score'])} | {_f(e.get('eval_win_rate'))} | "
                     f"{_f(e.get('eval_judge_score'))} |")
    return lines + [""]


def _dpo_steps(summary: dict, steps: int) -> str:
    rounds = summary["plan"]["comparisons"]["dpo_rounds"]
    c = summary["plan"]["comparisons"]
    return (f"{steps} steps" if rounds == 1 else f"{rounds} rounds ({steps} steps, then {c['round_steps']} a round), "
            f"each round after the first from the last round's policy on comparisons of its own answers")


def _md(text: str) -> str:
    """Text for a markdown table cell."""
    return (text or "(empty)").replace("|", "\\|").replace("\n", " ")


def _paragraph(summary: dict, steps: dict, model: str | None, ppo_reward: str = "the reward model") -> str:
    rm, sft = summary["reward_model"], summary["sft"]
    n = summary["ppo"]["num_prompts"]
    if model is None:
        acc = summary.get("tower", {}).get("scene_accuracy", {})
        look = summary.get("tower", {}).get("lookup_accuracy")
        look = f"; of each shape's column from its kind and color: {_f(look['present'])}" if look else ""
        patch = summary.get("tower", {}).get("patch_accuracy")
        look += f"; of the kind of the shape on each image patch: {_f(patch['kind'])}" if patch else ""
        start = (f"the `{summary['plan']['tower']['preset']}` VLM with a vision tower pretrained on the task's scenes "
                 f"(held-out accuracy of the shape in each column: kind {_f(acc.get('kind'))}, color "
                 f"{_f(acc.get('color'))}, size {_f(acc.get('size'))}{look}) and frozen from then on, and a decoder "
                 f"pretrained on short questions about the scenes ({steps['pretrain']} steps, then "
                 f"{steps['pretrain2']} on a second cosine),")
    else:
        start = f"the `{model}` preset from random initialisation" if not os.path.isdir(model) else f"`{model}`"
    verdicts = []
    for m in METHODS:
        r = summary[m]
        lo, hi = r["win_rate"] - 2 * r["win_rate_se"], r["win_rate"] + 2 * r["win_rate_se"]
        where = "above" if lo > 0.5 else "below" if hi < 0.5 else "not distinguishable from"
        verdicts.append(f"{model_label(m)} wins {r['win_rate']:.3f} of the comparisons ({where} 0.5 at two standard "
                        f"errors) while the reward model prefers it {r['rm_win_rate']:.3f} of the time")
    gaps = [model_label(m) for m in METHODS if summary[m]["rm_win_rate"] - summary[m]["win_rate"] > 0.1]
    gap = (f"For {' and '.join(gaps)} the reward model's verdict runs well ahead of the judge's: the policy gained "
           "more in what the reward model scores than in what the judge scores (see Reward hacking)." if gaps else
           "The reward model's and the judge's verdicts agree to within 0.1.")
    image = sft.get("image")
    reads = (f" SFT's loss per completion token on {image['num_rows']} held-out SFT rows is {image['nll_real']:.4f} "
             f"with their own images and {image['nll_shuffled']:.4f} with other rows' (a gap of {image['gap']:.4f} "
             f"nats: {'it reads the image' if image['gap'] > 0.01 else 'it barely reads the image'})."
             if image else "")
    c, st = summary["plan"]["comparisons"], summary.get("comparisons", {})
    pairs = (f"comparisons of SFT's own answers ({c['n']} per prompt, scored by the gold judge with "
             f"{c['label_noise']:.0%} of the labels flipped, as raters err: {st.get('pairs', '?')} pairs)")
    corrected = summary["plan"]["data"].get("corrected_fraction") or 0
    held_out = (f"the generator's held-out preference pairs, {corrected:.0%} of them corrections that only the image "
                "tells apart" if corrected else "the generator's held-out preference pairs")
    quick = (" This is the quick plan: short runs that show the pipeline working end to end; its numbers are noisy "
             "and say little about what the methods can reach." if summary["quick"] else "")
    grounded = summary["plan"]["data"].get("sft_grounded_fraction") or 0
    grounded = f"; {grounded:.0%} of its data's good color and locate answers list the scene" if grounded else ""
    return (f"This run trained {start} on the built-in shapes task with SFT ({steps['sft']} steps{grounded}), "
            f"collected {pairs}, trained a reward model on them ({steps['reward']} steps; accuracy on {held_out}: "
            f"{_f(rm['accuracy'])} against the labels, whose ceiling is {_f(rm.get('label_agreement'))}, and "
            f"{_f(rm.get('gold_accuracy'))} against the gold judge), and tuned the SFT policy on them with DPO "
            f"({_dpo_steps(summary, steps['dpo'])}) and with PPO against {ppo_reward} "
            f"({_ppo_steps(summary, steps['ppo'])}). On {n} held-out prompts, scored by the gold judge against the "
            f"scene (SFT's mean judge score: {sft['judge_score']:.3f}), {'; '.join(verdicts)}. {gap}{reads}{quick}")
