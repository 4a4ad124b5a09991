"""Judges and reward functions: one protocol, TRL's reward-function signature.

    def exact_match(prompts, completions, solution, **kwargs) -> list[float | None]:
        return [float(c.strip() == s) for c, s in zip(completions, solution)]

    judge = resolve("shapes")                        # a registered name (the built-in task's gold judge)
    judge = resolve("mypkg.rewards:exact_match")      # any importable module:function
    scores = score(judge, rows, completions)          # list[float | None], one per row

A reward function takes `prompts` (each row's prompt as the dataset holds it: a string, or a
conversation: a list of {role, content} messages), `completions` (plain strings for plain prompts;
for conversational prompts `[{"role": "assistant", "content": text}]`, as TRL passes them), and the
dataset's other columns for those rows as keyword arguments (`scene`, `solution`, `images`, ...).
It returns one float per row, or None where it does not apply (that row is left out of judge-based
metrics). `jaxpref eval --judge`, `jaxpref comparisons --judge` and PPO's in-training evaluation
(config field `judge`) take the same functions.

Functions are found by name in JUDGES (a task registers its judge when imported: `shapes` is
jaxpref/tasks/shapes/judge.py) or imported as `module:function`. Only import: nothing is downloaded
or executed from elsewhere.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Sequence

from jaxpref.registry import Registry

RewardFunction = Callable[..., Sequence[float | None]]

JUDGES = Registry("judge")


def register(name: str, fn: RewardFunction) -> RewardFunction:
    """Registers `fn` as the judge / reward function `name`."""
    return JUDGES.register(name, fn)


def resolve(spec: str | RewardFunction) -> RewardFunction:
    """A reward function from a registered name, a `module:function` path, or a callable (as is)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"judge {spec!r}: expected a registered name or module:function")
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise ValueError(f"judge {spec!r}: cannot import module {module!r} ({e})") from None
        except AttributeError:
            raise ValueError(f"judge {spec!r}: module {module!r} has no {attr!r}") from None
        if not callable(fn):
            raise ValueError(f"judge {spec!r}: {attr!r} is not a function")
        return fn
    fn = JUDGES.find(spec)
    if fn is None:
        known = ", ".join(JUDGES.names()) or "none registered"
        raise ValueError(f"judge {spec!r}: no judge of that name (registered: {known}); give a registered "
                         f"name or module:function, e.g. mypkg.rewards:exact_match")
    return fn


def name_of(fn: RewardFunction) -> str:
    """How metrics and reports name a reward function: its __name__ (TRL's rewards/<name>/...)."""
    return getattr(fn, "__name__", type(fn).__name__)


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt)


def completion_for(prompt: Any, text: str):
    """A completion in the prompt's format: the text, or one assistant message for a conversation."""
    return [{"role": "assistant", "content": text}] if is_conversational(prompt) else text


def text_of(value: Any) -> str:
    """The text of a plain or conversational prompt or completion (text blocks joined by spaces)."""
    if isinstance(value, str):
        return value
    parts = []
    for m in value:
        c = m.get("content")
        parts += [c] if isinstance(c, str) else [b.get("text", "") for b in c if b.get("type") == "text"]
    return " ".join(p for p in parts if p)


def score(fn: RewardFunction, rows: Sequence[dict], completions: Sequence[str]) -> list[float | None]:
    """fn over `rows` (dataset rows, each with a `prompt`) and their completions (texts): TRL's call,
    `fn(prompts=..., completions=..., **other columns)`, checked: one finite float or None per row."""
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
    if not rows:
        return []
    prompts = [r.get("prompt") for r in rows]
    columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"}
    out = fn(prompts=prompts, completions=[completion_for(p, c) for p, c in zip(prompts, completions)], **columns)
    out = list(out)
    if len(out) != len(rows):
        raise ValueError(f"judge {name_of(fn)} returned {len(out)} scores for {len(rows)} rows")
    scores = []
    for i, v in enumerate(out):
        if v is None:
            scores.append(None)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"judge {name_of(fn)}: row {i}: score {v!r} is not a number or None") from None
        if not math.isfinite(v):
            raise ValueError(f"judge {name_of(fn)}: row {i}: score {v} is not finite")
        scores.append(v)
    return scores
