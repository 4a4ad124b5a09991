"""Vision-tower pretraining on the shapes task (jaxpref.tasks.shapes.tower): its per-patch labels against the
rendered pixels, short real runs that learn (the scene and lookup heads; the patch head), and the model
directory it writes."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxpref.tasks.shapes import scenes as shapes
from jaxpref.tasks.shapes.tower import ATTRIBUTES, LOOKUP_PAIRS, TowerArgs, lookup_labels, patch_labels, pretrain_tower


def test_patch_labels_name_the_shape_drawn_in_each_patch():
    rng = np.random.default_rng(0)
    size, patch = 64, 8
    for _ in range(40):
        scene = shapes.sample_scene(rng)
        image = shapes.render(scene, size).astype(int)
        labels = patch_labels(scene, size, patch)
        assert labels.shape == ((size // patch) ** 2, 4)
        drawn = np.stack([(np.abs(image - np.array(shapes.COLORS[s.color])).sum(-1) < 30)  # each shape's pixels
                          .reshape(size // patch, patch, size // patch, patch).mean((1, 3)).reshape(-1)
                          for s in scene.shapes])
        for i, s in enumerate(scene.shapes):
            if sum(t.color == s.color for t in scene.shapes) > 1:
                continue  # its pixels are not told apart by color
            want = [ATTRIBUTES["kind"].index(s.kind), ATTRIBUTES["color"].index(s.color),
                    ATTRIBUTES["size"].index(s.size), ATTRIBUTES["column"].index(s.position)]
            mostly = (drawn[i] > 0.3) & (drawn[i] == drawn.max(0))  # patches this shape fills most of
            assert (labels[mostly] == want).all(), scene
            assert (labels == want).all(1).any(), scene  # every shape, even a small star, has its patches
        painted = (image != np.array(shapes.BACKGROUND)).any(-1)
        blank = painted.reshape(size // patch, patch, size // patch, patch).mean((1, 3)).reshape(-1) < 0.05
        assert blank.any() and (labels[blank] == 0).all()  # and (nearly) blank patches are background
        empty = (labels[:, 0] == 0).mean()
        assert 0.2 < empty < 1  # the background is labelled "none"


def test_lookup_labels_give_each_kind_and_color_its_column():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = shapes.sample_scene(rng)
        labels = lookup_labels(scene)
        assert labels.shape == (len(shapes.KINDS) * len(shapes.COLORS),) and (labels > 0).sum() == len(scene.shapes)
        for (kind, color), label in zip(LOOKUP_PAIRS, labels):
            there = [s.position for s in scene.shapes if (s.kind, s.color) == (kind, color)]
            assert ATTRIBUTES["column"][label] == (there[0] if there else "none"), scene


def test_pretraining_learns_the_scenes_and_writes_a_vlm(tmp_path):
    from jaxpref.models import VLM, get_preset, load_pretrained
    from jaxpref.models.vlm import dummy_inputs

    out = tmp_path / "tower"
    args = TowerArgs(output_dir=str(out), preset="tiny", steps=600, batch_size=32, learning_rate=3e-3, seed=1,
                     eval_images=128, patch_weight=0.0)  # the patch head (on by default) has its own test
    result = pretrain_tower(args, progress=False)
    assert set(result["scene_accuracy"]) == {"kind", "color", "size"} and "patch_accuracy" not in result
    # chance over the columns holding a shape: 1/4 kind, 1/6 color, 1/2 size (the head may also say "none");
    # the mean of 16 tiny tokens learns slowly (0.66 color, 0.78 size here), kinds slower still
    assert result["scene_accuracy"]["color"] > 0.45 and result["scene_accuracy"]["size"] > 0.6, result
    # the lookup head (on by default), each (kind, color)'s column: 0.67 for the shapes in the scene here (a head
    # that knew only that the pair is present would get 1/3), 0.39 for the pairs absent from it (present pairs
    # weigh 23x in the loss, so it leans to "present" early on)
    assert result["lookup_accuracy"]["present"] > 0.5 and result["lookup_accuracy"]["absent"] > 0.25, result
    assert json.loads((out / "tower.json").read_text()) == result
    model, params = load_pretrained(str(out))
    assert model.config == get_preset("tiny") and (out / "tokenizer.json").exists()
    init = nn.meta.unbox(VLM(get_preset("tiny")).init(jax.random.key(1), *dummy_inputs(model.config))["params"])
    for part in ("projector", "decoder"):  # untouched: the random initialisation of the seed
        for a, b in zip(jax.tree.leaves(init[part]), jax.tree.leaves(params[part])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(init["vision"]), jax.tree.leaves(params["vision"]))]
    assert min(moved) > 0  # every tower weight trained
    with pytest.raises(FileExistsError, match="already holds a model"):
        pretrain_tower(args, progress=False)


def test_the_patch_head_learns_the_patches(tmp_path):
    args = TowerArgs(output_dir=str(tmp_path / "tower"), preset="tiny", steps=150, batch_size=32,
                     learning_rate=2e-3, seed=1, eval_images=128, patch_weight=1.0)
    result = pretrain_tower(args, progress=False)
    assert set(result["patch_accuracy"]) == set(ATTRIBUTES) and 0.05 < result["covered_patch_fraction"] < 0.6
    # chance: 1/4 kind, 1/6 color, 1/2 size, 1/3 column (a head may also say "none")
    assert result["patch_accuracy"]["color"] > 0.6 and result["patch_accuracy"]["column"] > 0.6, result
    assert set(result["scene_accuracy"]) == {"kind", "color", "size"}


def test_tower_cli_rejects_bad_arguments(capsys):
    from jaxpref.cli import main

    assert main(["tower", "--out", "unused", "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["tower", "--out", "unused", "--patch-weight", "-1"]) == 2
    assert "patch_weight must be >= 0" in capsys.readouterr().err
    assert main(["tower", "--out", "unused", "--lookup-weight", "-1"]) == 2
    assert "lookup_weight must be >= 0" in capsys.readouterr().err
    assert main(["tower", "--out", "unused", "--preset", "llava-1.5-7b"]) == 2
    assert "needs a PaliGemma (SigLIP) preset" in capsys.readouterr().err
