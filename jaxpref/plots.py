"""Plots of a run's metrics.jsonl (matplotlib, Agg: no display needed).

    plot_ppo("runs/shapes-ppo", "docs/img/ppo_shapes.png")     # judge score, reward, KL, win-rate per iteration
    plot_run("runs/shapes-dpo", ["loss", "rewards/accuracies"], "dpo.png")
    plot_reward_model("runs/shapes-rm", "rm.png", ceiling=0.906)   # train and held-out pairwise accuracy

Command line: `python scripts/plot_run.py RUN_DIR --out PNG [--ppo | --keys k1,k2]`.
"""

from __future__ import annotations

import os

from jaxpref.train.logging import read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, dpi: int = 110) -> str:
    """Lays out `fig`, writes it to `path` (creating its directory) and closes it; returns `path`."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def _figure(panels: int):
    fig, axes = pyplot().subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    return fig, axes[0]


def plot_run(run_dir: str, keys: list[str], path: str, title: str | None = None) -> str:
    """One panel per metric key, against the step."""
    records = read_metrics(run_dir)
    fig, axes = _figure(len(keys))
    for ax, key in zip(axes, keys):
        ax.plot(*_series(records, key), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or os.path.basename(os.path.normpath(run_dir)))
    return save(fig, path)


def plot_ppo(run_dir: str, path: str, rounds: list[int] = ()) -> str:
    """PPO per iteration: the gold judge's score of held-out samples (policy and reference), the
    reward model's score (training rollouts and held-out), KL to the reference, and the win-rates.
    A reward that climbs while the judge score does not is reward hacking. `rounds`: iterations at
    which a new reward model took over (iterated RLHF), drawn as dotted lines; the reward's scale
    changes there."""
    records = read_metrics(run_dir)
    fig, axes = _figure(4)
    ax = axes[0]
    ax.plot(*_series(records, "eval_judge_score"), marker="o", label="policy")
    ax.plot(*_series(records, "eval_reference_judge_score"), "--", label="reference (SFT)")
    ax.set_title("gold judge score (held-out)")
    ax = axes[1]
    ax.plot(*_series(records, "objective/scores"), alpha=0.6, label="rollouts (train)")
    ax.plot(*_series(records, "eval_reward"), marker="o", label="policy (held-out)")
    ax.plot(*_series(records, "eval_reference_reward"), "--", label="reference (held-out)")
    ax.set_title("reward-model score")
    ax = axes[2]
    ax.plot(*_series(records, "objective/kl"), alpha=0.6, label="rollouts (train)")
    ax.plot(*_series(records, "eval_kl"), marker="o", label="held-out")
    ax.set_title("KL(policy || reference), nats")
    ax = axes[3]
    ax.plot(*_series(records, "eval_win_rate"), marker="o", label="gold judge")
    ax.plot(*_series(records, "eval_rm_win_rate"), marker="s", label="reward model")
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_title("win-rate vs reference (ties 1/2)")
    for ax in axes:
        for i, step in enumerate(rounds):
            ax.axvline(step, color="gray", ls=":", lw=1, label="new reward (round)" if i == 0 else None)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"PPO: {run_dir}")
    return save(fig, path)


def plot_reward_model(run_dir: str, path: str, ceiling: float | None = None, gold: float | None = None) -> str:
    """A reward model's pairwise accuracy per step: the training batches' (`accuracy`, means over
    each logging interval) and the held-out split's (`eval_accuracy`). `ceiling`: the fraction of
    eval labels the gold judge agrees with (label noise caps eval_accuracy there); `gold`: the final
    model's accuracy against the judge's ordering (jaxpref.eval.reward_model_accuracy)."""
    records = read_metrics(run_dir)
    fig, axes = _figure(1)
    ax = axes[0]
    ax.plot(*_series(records, "accuracy"), alpha=0.6, label="train batches")
    ax.plot(*_series(records, "eval_accuracy"), marker="o", label="held-out (labels)")
    steps = [r["step"] for r in records]
    if gold is not None and steps:
        ax.plot([max(steps)], [gold], "D", color="C2", mfc="none", ms=9, label="held-out (gold judge), final")
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", ls="--", lw=0.8, label="label-noise ceiling")
    ax.axhline(0.5, color="gray", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("reward model: pairwise accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)
