"""The judge / reward-function protocol: resolving names and module:function paths, TRL's call with
the dataset's columns, and `jaxpref eval --judge` with a user's own function."""

from __future__ import annotations

import pytest

from jaxpref import rewards
from jaxpref.tasks.shapes.scenes import generate_split, judge


def test_shapes_is_registered_by_name_and_scores_as_the_gold_judge():
    fn = rewards.resolve("shapes")
    rows = list(generate_split("sft", 6, seed=2, image_size=32, split="eval"))
    got = rewards.score(fn, rows, [r["completion"] for r in rows])
    assert got == [judge(r["scene"], r["prompt"], r["completion"]) for r in rows]
    # a row without a scene, or a prompt naming a shape its scene lacks, cannot be scored: None
    rows[0] = {k: v for k, v in rows[0].items() if k != "scene"}
    other = next(r for r in generate_split("sft", 40, seed=9, image_size=32, split="eval")
                 if r["scene"] != rows[1]["scene"] and "color" in r["prompt"].lower())
    rows[1] = {**rows[1], "prompt": other["prompt"]}
    got = rewards.score(fn, rows, [r["completion"] for r in rows])
    assert got[0] is None and got[2:] == [judge(r["scene"], r["prompt"], r["completion"]) for r in rows[2:]]


def test_columns_and_conversational_completions_reach_the_function_as_trl_passes_them():
    seen = {}

    def f(prompts, completions, solution, **kwargs):
        seen.update(prompts=prompts, completions=completions, solution=solution, kwargs=kwargs)
        return [1, None]

    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    rows = [{"prompt": "Hi", "solution": "a", "scene": "{}"}, {"prompt": conv, "solution": "b", "scene": "{}"}]
    assert rewards.score(f, rows, ["x", "y"]) == [1.0, None]
    assert seen["prompts"] == ["Hi", conv] and seen["solution"] == ["a", "b"]
    assert seen["completions"] == ["x", [{"role": "assistant", "content": "y"}]]
    assert seen["kwargs"] == {"scene": ["{}", "{}"]}
    assert rewards.text_of(conv) == "What?"


def test_bad_specs_and_bad_scores_are_named():
    with pytest.raises(ValueError, match="no judge of that name .*registered: .*shapes"):
        rewards.resolve("no_such_judge")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        rewards.resolve("no_such_mod:f")
    with pytest.raises(ValueError, match="has no 'nothing'"):
        rewards.resolve("json:nothing")
    with pytest.raises(ValueError, match="returned 1 scores for 2 rows"):
        rewards.score(lambda prompts, completions, **kw: [1.0], [{"prompt": "a"}, {"prompt": "b"}], ["x", "y"])
    with pytest.raises(ValueError, match="row 1: score 'bad' is not a number"):
        rewards.score(lambda prompts, completions, **kw: [1.0, "bad"], [{"prompt": "a"}, {"prompt": "b"}], ["x", "y"])
    with pytest.raises(ValueError, match="row 0: score nan is not finite"):
        rewards.score(lambda prompts, completions, **kw: [float("nan")], [{"prompt": "a"}], ["x"])
