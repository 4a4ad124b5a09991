"""Vision-tower pretraining on the built-in shapes task: the offline stand-in for the pretrained
SigLIP tower a real PaliGemma comes with.

    jaxpref tower --out runs/tower [--preset small] [--steps 2400] [--batch-size 64] [--learning-rate 2e-3]
    jaxpref sft --config jaxpref/tasks/shapes/configs/pretrain.yaml model.name_or_path=runs/tower   # then sft.yaml from its output

Linear heads, dropped afterwards, train the tower on scenes drawn fresh each step from the task's
train split:
  scene  from the mean of the image tokens: the kind, color and size of the shape in each column
         ("none" for an empty one). This is what makes a tiny decoder read the image soon: the
         average token, what uniform attention sees, names every shape (docs/TRAINING.md).
  lookup from the same mean token: for each of the 24 (kind, color) pairs, the column holding that
         shape ("none" if absent). It binds kind and color in the features the other way round, so
         that "where is the red circle?" and "what color is the square?" are linear reads of the
         mean token instead of a search over the columns (lookup_weight; 0 turns it off). The tower
         learns it fully (1.000 held-out), but the decoder pretrained on it did not answer those
         questions any better (docs/SHAPES.md).
  patch  from each image token: the kind, color, size and column of the shape covering its patch
         ("none" on the background), at patch_weight (0.3; 0 turns it off). It keeps each shape's
         facts in the tokens of its own patches, beside the scene everywhere: what the decoder's
         attention can match a question's "red circle" against. At weight 1 it held the scene head's
         kind accuracy at 0.29 after 400 steps (0.61 without it; docs/TRAINING.md); at 0.3 and the
         default 2400 steps (2e-3, 18.6 min on a 2-core CPU) every head reaches 0.995-1.000 held out.
Accuracies are measured on held-out (eval-split) scenes: the scene head's over the columns holding
a shape, the patch head's over the patches a shape covers (the background is most patches, and
easy). The output directory is a full VLM in Hugging Face format (config.json, safetensors, the
shapes tokenizer) whose projector and decoder keep their random initialisation, plus tower.json
with the measured accuracies: SFT starts from it with the tower frozen (model.freeze_vision).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from jaxpref.data.processing import preprocess_image
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.models import VLM, get_preset
from jaxpref.models.hf import save_pretrained
from jaxpref.models.vision import VisionEncoder
from jaxpref.models.vlm import dummy_inputs

from jaxpref.tasks.shapes import scenes as shapes

ATTRIBUTES = {"kind": ("none",) + shapes.KINDS, "color": ("none",) + tuple(shapes.COLORS),
              "size": ("none",) + shapes.SIZES, "column": ("none",) + shapes.POSITIONS}


def patch_labels(scene: shapes.Scene, image_size: int, patch: int, min_cover: float = 0.1) -> np.ndarray:
    """int32[patches, 4]: for each image patch (raster order, as the tower's tokens) the index in
    ATTRIBUTES of the kind, color, size and column of the shape covering most of the patch's pixels
    as drawn (shapes.visible_shapes: the last-drawn shape reaching each pixel), when it covers at least
    `min_cover` of them; 0 ("none") elsewhere."""
    g = image_size // patch
    visible = shapes.visible_shapes(scene, image_size)
    cover = np.stack([(visible == i + 1).reshape(g, patch, g, patch).mean((1, 3)).reshape(-1)
                      for i in range(len(scene.shapes))])  # [shapes, patches]
    per_shape = np.array([[ATTRIBUTES[a].index(v) for a, v in
                           (("kind", s.kind), ("color", s.color), ("size", s.size), ("column", s.position))]
                          for s in scene.shapes], np.int32)
    out = np.zeros((g * g, len(ATTRIBUTES)), np.int32)
    covered = cover.max(0) >= min_cover
    out[covered] = per_shape[cover.argmax(0)[covered]]
    return out


FOREGROUND_WEIGHT = 3.0  # a shape covers about a quarter of the patches: they weigh as much as the background


@dataclasses.dataclass(frozen=True)
class TowerArgs:
    output_dir: str
    preset: str = "small"  # a jaxpref.models preset with a SigLIP tower (tiny, small)
    steps: int = 2400  # kinds are learnt last: held-out kind accuracy 0.78 after 800 steps, 1.000 after 2400
    batch_size: int = 64  # images per step
    learning_rate: float = 2e-3  # peak of a warmup (50 steps) + cosine schedule, AdamW, weight decay 0.01
    seed: int = 0
    eval_images: int = 512  # held-out scenes the accuracies are measured on
    patch_weight: float = 0.3  # weight of the per-patch head's loss (0: no patch head)
    lookup_weight: float = 1.0  # weight of the lookup head's loss (0: no lookup head)

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("patch_weight", "lookup_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


LOOKUP_PAIRS = tuple((k, c) for k in shapes.KINDS for c in shapes.COLORS)  # every shape a scene can hold
LOOKUP_PRESENT_WEIGHT = float(len(LOOKUP_PAIRS) - 1)  # 1-3 of the 24 pairs are present: each weighs as much
# as all the absent ones together


def lookup_labels(scene: shapes.Scene) -> np.ndarray:
    """int32[24]: for each (kind, color) pair of LOOKUP_PAIRS, the index in ATTRIBUTES["column"] of the
    column holding that shape (0: not in the scene). Pairs are unique within a scene."""
    out = np.zeros(len(LOOKUP_PAIRS), np.int32)
    for s in scene.shapes:
        out[LOOKUP_PAIRS.index((s.kind, s.color))] = ATTRIBUTES["column"].index(s.position)
    return out


def scene_labels(scene: shapes.Scene) -> np.ndarray:
    """int32[3 columns, 3]: the index in ATTRIBUTES of the kind, color and size of the shape in each
    column, left to right (0: an empty column)."""
    out = np.zeros((len(shapes.POSITIONS), 3), np.int32)
    for s in scene.shapes:
        out[shapes.POSITIONS.index(s.position)] = [ATTRIBUTES[a].index(v) for a, v in
                                                   (("kind", s.kind), ("color", s.color), ("size", s.size))]
    return out


def pretrain_tower(args: TowerArgs, progress: bool = True) -> dict:
    """Trains the tower and writes args.output_dir (see the module docstring). Returns tower.json's
    contents: held-out accuracies of the heads (patch_accuracy only with a patch head), and seconds."""
    if os.path.exists(os.path.join(args.output_dir, "config.json")):
        raise FileExistsError(f"{args.output_dir} already holds a model: choose another --out or remove it")
    cfg = get_preset(args.preset)
    v = cfg.vision
    if cfg.family != "paligemma" or v.kind != "siglip":
        raise ValueError(f"preset {args.preset!r}: tower pretraining needs a PaliGemma (SigLIP) preset")
    model = VLM(cfg)
    params = dict(nn.meta.unbox(model.init(jax.random.key(args.seed), *dummy_inputs(cfg))["params"]))
    tower = VisionEncoder(v, jnp.float32)  # as the VLM runs it (PaliGemma: the last layer's tokens)
    patch_sizes = [len(values) for values in ATTRIBUTES.values()]
    scene_sizes = patch_sizes[:3]  # kind, color, size of each column
    columns = len(shapes.POSITIONS)
    k1, k2 = jax.random.split(jax.random.key(args.seed + 1))
    d = v.hidden_size
    trained = {"tower": params["vision"],
               "scene_w": jax.random.normal(k2, (d, columns * sum(scene_sizes))) * d ** -0.5,
               "scene_b": jnp.zeros(columns * sum(scene_sizes))}
    with_patch, with_lookup = args.patch_weight > 0, args.lookup_weight > 0
    lookup_classes = len(ATTRIBUTES["column"])
    if with_lookup:
        k3 = jax.random.fold_in(k2, 1)
        trained.update(lookup_w=jax.random.normal(k3, (d, len(LOOKUP_PAIRS) * lookup_classes)) * d ** -0.5,
                       lookup_b=jnp.zeros(len(LOOKUP_PAIRS) * lookup_classes))
    if with_patch:
        trained.update(patch_w=jax.random.normal(k1, (d, sum(patch_sizes))) * d ** -0.5,
                       patch_b=jnp.zeros(sum(patch_sizes)))

    def heads(logits, labels, sizes, weight):
        """Summed weighted cross-entropy over the attribute groups of `logits`, and bool hits [..., groups]."""
        total, lo, correct = 0.0, 0, []
        for i, n in enumerate(sizes):
            part = logits[..., lo:lo + n]
            ce = optax.softmax_cross_entropy_with_integer_labels(part, labels[..., i])
            total += jnp.sum(weight * ce) / jnp.sum(weight)
            correct.append(part.argmax(-1) == labels[..., i])
            lo += n
        return total, jnp.stack(correct, -1)

    def loss_fn(p, pixels, patch, scene, lookup):
        features = tower.apply({"params": p["tower"]}, pixels)  # [B, patches, d]
        mean = features.mean(1)
        scene_logits = (mean @ p["scene_w"] + p["scene_b"]).reshape(-1, columns, sum(scene_sizes))
        loss, scene_hits = heads(scene_logits, scene, scene_sizes, jnp.ones(scene.shape[:2]))
        hits = {"scene": scene_hits}
        if with_lookup:
            lookup_logits = (mean @ p["lookup_w"] + p["lookup_b"]).reshape(-1, len(LOOKUP_PAIRS), lookup_classes)
            lookup_loss, hits["lookup"] = heads(lookup_logits, lookup[..., None], [lookup_classes],
                                                jnp.where(lookup > 0, LOOKUP_PRESENT_WEIGHT, 1.0))
            loss += args.lookup_weight * lookup_loss
        if with_patch:
            patch_loss, hits["patch"] = heads(features @ p["patch_w"] + p["patch_b"], patch, patch_sizes,
                                              jnp.where(patch[..., 0] > 0, FOREGROUND_WEIGHT, 1.0))
            loss += args.patch_weight * patch_loss
        return loss, hits

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.learning_rate, min(50, args.steps // 2), args.steps)
    tx = optax.adamw(schedule, weight_decay=0.01)
    opt_state = tx.init(trained)

    @jax.jit
    def step(p, o, *batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    hits_fn = jax.jit(lambda p, *batch: loss_fn(p, *batch)[1])
    rng = np.random.default_rng(args.seed)

    def batch(n: int, split: str):
        scenes = [shapes.sample_scene(rng, split) for _ in range(n)]
        pixels = np.stack([preprocess_image(Image.fromarray(shapes.render(s, v.image_size)), v.image_size, "siglip")
                           for s in scenes])
        patch = np.stack([patch_labels(s, v.image_size, v.patch_size) for s in scenes]) if with_patch else None
        return pixels, patch, np.stack([scene_labels(s) for s in scenes]), np.stack([lookup_labels(s) for s in scenes])

    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="tower", unit="step", disable=not progress, dynamic_ncols=True)
    for s in bar:
        trained, opt_state, loss = step(trained, opt_state, *batch(args.batch_size, "train"))
        if s % 25 == 0 or s == args.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    seconds = time.perf_counter() - t0

    patch_hits, scene_hits, lookup_hits = np.zeros(len(patch_sizes)), np.zeros(len(scene_sizes)), np.zeros(2)
    covered = total = filled = 0
    for start in range(0, args.eval_images, 128):
        pixels, patch, scene, lookup = batch(min(128, args.eval_images - start), "eval")
        hits = {k: np.asarray(h) for k, h in hits_fn(trained, pixels, patch, scene, lookup).items()}
        full = scene[..., 0] > 0
        scene_hits += hits["scene"][full].sum(0)
        filled += int(full.sum())
        if with_lookup:  # shapes of the scene found in their column; absent pairs called absent
            lookup_hits += [hits["lookup"][lookup > 0].sum(), hits["lookup"][lookup == 0].sum()]
        if with_patch:
            fg = patch[..., 0] > 0
            patch_hits += hits["patch"][fg].sum(0)
            covered, total = covered + int(fg.sum()), total + fg.size
    result = {"scene_accuracy": {a: float(h / filled) for a, h in zip(ATTRIBUTES, scene_hits)}}
    if with_lookup:
        result["lookup_accuracy"] = {"present": float(lookup_hits[0] / filled),
                                     "absent": float(lookup_hits[1] / (len(LOOKUP_PAIRS) * args.eval_images - filled))}
    if with_patch:
        result.update(patch_accuracy={a: float(h / covered) for a, h in zip(ATTRIBUTES, patch_hits)},
                      covered_patch_fraction=covered / total)
    result.update(seconds=seconds, args=dataclasses.asdict(args))

    params["vision"] = trained["tower"]
    tmp = args.output_dir.rstrip("/") + ".tmp"  # the directory appears whole or not at all
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, jax.device_get(params), tmp)
    load_tokenizer("shapes").save_pretrained(tmp)
    with open(os.path.join(tmp, "tower.json"), "w") as f:
        json.dump(result, f, indent=2)
    if os.path.isdir(args.output_dir) and not os.listdir(args.output_dir):
        os.rmdir(args.output_dir)
    os.replace(tmp, args.output_dir)
    return result


def format_result(result: dict) -> str:
    scene = ", ".join(f"{a} {x:.3f}" for a, x in result["scene_accuracy"].items())
    text = f"held-out accuracy of the shape in each column from the mean image token: {scene}"
    if "lookup_accuracy" in result:
        look = result["lookup_accuracy"]
        text += (f"; of each shape's column from its (kind, color): {look['present']:.3f} "
                 f"(absent pairs: {look['absent']:.3f})")
    if "patch_accuracy" in result:
        text += "; of each patch a shape covers: " + ", ".join(f"{a} {x:.3f}" for a, x in result["patch_accuracy"].items())
    return f"{text} ({result['seconds']:.0f} s)"


def add_tower_parser(subparsers):
    p = subparsers.add_parser("tower", help="pretrain a vision tower on the shapes task (the start of SFT)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output model directory (Hugging Face format)")
    p.add_argument("--preset", default="small", help="model preset with a SigLIP tower (default: small)")
    p.add_argument("--steps", type=int, default=2400, help="training steps (default: 2400)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--patch-weight", type=float, default=0.3,
                   help="loss weight of the per-patch head, each token's shape (default: 0.3; 0: none)")
    p.add_argument("--lookup-weight", type=float, default=1.0,
                   help="loss weight of the lookup head, each (kind, color)'s column (default: 1; 0: none)")
    p.set_defaults(func=run_tower)
    return p


def run_tower(args) -> int:
    try:
        targs = TowerArgs(output_dir=args.out, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                          learning_rate=args.learning_rate, seed=args.seed, patch_weight=args.patch_weight,
                          lookup_weight=args.lookup_weight)
        result = pretrain_tower(targs)
    except (ValueError, KeyError, FileExistsError) as e:
        print(f"jaxpref tower: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    print(f"wrote {args.out}")
    return 0
