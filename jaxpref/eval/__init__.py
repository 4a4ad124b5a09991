"""Evaluation: a policy against a reference (judge and reward-model win-rates, KL, samples),
best-of-n, a reward model's pairwise accuracy, image reliance (evaluate.py), and comparisons of a
policy's own answers labeled by a judge (comparisons.py)."""

from jaxpref.eval.evaluate import (EvalArgs, best_of_n, best_of_n_curve, compare, evaluate, evaluate_best_of_n,
                                   first_rows, format_agreement, format_curve, format_table, image_reliance,
                                   judge_agreement, load_model, real_and_shuffled_nll, reward_model_accuracy,
                                   summarize, win, write, write_best_of_n)

__all__ = ["EvalArgs", "best_of_n", "best_of_n_curve", "compare", "evaluate", "evaluate_best_of_n", "first_rows",
           "format_agreement", "format_curve", "format_table", "image_reliance", "judge_agreement", "load_model",
           "real_and_shuffled_nll", "reward_model_accuracy", "summarize", "win", "write", "write_best_of_n"]
