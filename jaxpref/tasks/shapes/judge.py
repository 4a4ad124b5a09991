"""The shapes task's gold judge as a reward function (jaxpref.rewards' protocol), registered as
the judge "shapes":

    jaxpref eval --policy P --reference R --data runs/demo/data/prompt --judge shapes

It reads each row's `scene` column (the scene as JSON, as `jaxpref data shapes` writes it) and scores
the completion with jaxpref.tasks.shapes.scenes.judge (docs/SHAPES.md). A row it cannot score gets
None: no scene, or a prompt naming a shape that is not (uniquely) in its scene (the SFT data's short
questions about another image's shapes, say).
"""

from __future__ import annotations

from jaxpref.rewards import text_of
from jaxpref.tasks.shapes.scenes import Scene, judge, parse_prompt


def shapes(prompts, completions, scene=None, **columns) -> list[float | None]:
    """The gold score in [0, 1] of each completion to its prompt about its row's scene, None where
    the row has no scene or the judge cannot read the prompt."""
    scenes = scene if scene is not None else [None] * len(prompts)
    out = []
    for prompt, completion, s in zip(prompts, completions, scenes):
        if s is None:
            out.append(None)
            continue
        scene_ = Scene.from_json(s)
        try:
            asked = parse_prompt(scene_, text_of(prompt).strip())
        except ValueError:
            out.append(None)
            continue
        out.append(judge(scene_, asked, text_of(completion)))
    return out
