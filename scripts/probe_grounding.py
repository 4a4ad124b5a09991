"""Does a VLM read its image on the built-in shapes task? The probes of docs/TRAINING.md ("Why the SFT
model is blind").

    # 1. a vision tower pretrained alone on the scenes' attributes (kind, color, size per column),
    #    saved as a `small` VLM directory (random decoder) that SFT can start from; --head patch:
    #    each image token is trained to name the shape covering its patch (kind, color, size, column)
    python scripts/probe_grounding.py tower --head mean --steps 400 --out /tmp/tower
    # 2. a short SFT on one kind of generated rows, printing the eval NLL per completion token with the
    #    real images and with other rows' images (shuffled): a model that reads the image has a gap
    python scripts/probe_grounding.py sft --init /tmp/tower --task color --steps 150
    python scripts/probe_grounding.py sft --init small --task good-any --steps 150 --batch 16
    # 3. the same gap for a trained model on a dataset's eval split, or on generated held-out rows
    python scripts/probe_grounding.py gap runs/shapes-sft --data data/shapes/sft
    python scripts/probe_grounding.py gap runs/shapes-sft --generated short      # or: good
    # 4. greedy answers to held-out short questions: exact-match accuracy per question kind, with the
    #    rows' own images and with other rows' (what the language prior alone gets right); the packaged
    #    version, on the `short` kind's held-out rows (other questions): jaxpref eval --policy M --reads
    python scripts/probe_grounding.py answers runs/shapes-sft
    # 5. the two-lookup questions alone, by the number of shapes in the scene and the target's column
    python scripts/probe_grounding.py lookups runs/shapes-pretrain
    # 6. are the image tokens local: each token's cosine to its image's mean token, and linear probes
    #    naming the kind / color / column of the shape on each token's patch
    python scripts/probe_grounding.py tokens runs/tower
    # 7. does a reward model (or a policy) prefer the right fact to a wrong one, by question and scene size
    python scripts/probe_grounding.py facts runs/shapes-rm --reward-model

Tasks: `color` ("What color is the shape?" -> "red", one-shape scenes), `color-sentence` (-> "The shape
is red."), `good-one` / `good-any` (the task's own prompts with good-tier answers, one-shape / 1-3-shape
scenes). SFT here is plain AdamW at a constant rate, no clipping (the probe isolates the data).
"""

from __future__ import annotations

import argparse
import io
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from jaxpref.data import shapes
from jaxpref.data.processing import Processor, ProcessorConfig, preprocess_image
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.eval import image_reliance, real_and_shuffled_nll
from jaxpref.models import VLM
from jaxpref.models.hf import load_pretrained, save_pretrained
from jaxpref.models.presets import get_preset
from jaxpref.models.vision import VisionEncoder
from jaxpref.models.vlm import dummy_inputs
from jaxpref.train.sft import loss_fn
from jaxpref.train.tower import ATTRIBUTES, scene_labels


def patch_labels(scene: shapes.Scene, image_size: int = 64, patch: int = 8) -> np.ndarray:
    """int32[patches, 4]: per image patch (raster order) the kind, color, size and column (1-3) of the
    shape whose disc of nominal radius reaches the patch (0: background). The probes' first labels,
    kept so their numbers reproduce; `jaxpref tower` labels patches from the drawn pixels instead."""
    g = image_size // patch
    out = np.zeros((g * g, 4), np.int32)
    centers = (np.arange(g) + 0.5) * patch
    for s in scene.shapes:
        cx, cy, r = shapes.shape_geometry(s, image_size)
        near = np.hypot(centers[None, :] - cx, centers[:, None] - cy) <= r + patch / 2  # [row, col]
        out[near.reshape(-1)] = [ATTRIBUTES["kind"].index(s.kind), ATTRIBUTES["color"].index(s.color),
                                 ATTRIBUTES["size"].index(s.size), ATTRIBUTES["column"].index(s.position)]
    return out


def tower(args) -> None:
    cfg = get_preset("small")
    d, n_tok = cfg.vision.hidden_size, cfg.num_image_tokens
    enc = VisionEncoder(cfg.vision, jnp.float32)
    sizes = [len(values) for values in ATTRIBUTES.values()][:4 if args.head == "patch" else 3]
    groups = n_tok if args.head == "patch" else 3  # predictions per image: one per patch, or per column
    width = {"mean": d, "flat": n_tok * d, "patch": d}[args.head]
    out_width = sum(sizes) * (1 if args.head == "patch" else 3)
    params = {"tower": nn.meta.unbox(enc.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]),
              "w": jax.random.normal(jax.random.key(1), (width, out_width)) * width**-0.5,
              "b": jnp.zeros(out_width)}

    def loss(p, px, y):
        f = enc.apply({"params": p["tower"]}, px)
        f = {"mean": lambda: f.mean(1), "flat": lambda: f.reshape(f.shape[0], -1), "patch": lambda: f}[args.head]()
        logits = (f @ p["w"] + p["b"]).reshape(-1, groups, sum(sizes))
        total, accs, lo = 0.0, [], 0
        for i, n in enumerate(sizes):
            part = logits[..., lo:lo + n]
            total += optax.softmax_cross_entropy_with_integer_labels(part, y[..., i]).mean()
            accs.append((part.argmax(-1) == y[..., i]).mean())
            lo += n
        return total, jnp.stack(accs)

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, args.lr, min(50, args.steps // 2), args.steps), weight_decay=0.01)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, px, y):
        (l, a), g = jax.value_and_grad(loss, has_aux=True)(p, px, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l, a

    rng = np.random.default_rng(args.seed)

    def batch(n, split):
        scenes = [shapes.sample_scene(rng, split) for _ in range(n)]
        px = np.stack([preprocess_image(Image.fromarray(shapes.render(s)), 64, "siglip") for s in scenes])
        labels = patch_labels if args.head == "patch" else scene_labels
        return px, np.stack([labels(s) for s in scenes])

    t0 = time.perf_counter()
    for s in range(args.steps):
        params, opt, l, a = step(params, opt, *batch(args.batch, "train"))
        if s % 50 == 0 or s == args.steps - 1:
            print(f"step {s} loss {float(l):.3f} train accuracy kind/color/size {np.round(np.asarray(a), 3)} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    _, acc = loss(params, *batch(512, "eval"))
    print(f"held-out accuracy kind/color/size{'/column' if args.head == 'patch' else ''} "
          f"{np.round(np.asarray(acc), 3)}")
    model = VLM(cfg)
    full = dict(nn.meta.unbox(model.init(jax.random.key(args.seed), *dummy_inputs(cfg))["params"]))
    full["vision"] = params["tower"]
    save_pretrained(model, jax.device_get(full), args.out)
    load_tokenizer("shapes").save_pretrained(args.out)
    print(f"saved {args.out}")


def generated_row(rng, task: str, split: str) -> dict:
    one = task not in ("good-any", "short", "where3", "exists3")
    while True:
        scene = shapes.sample_scene(rng, split)
        if (not one or len(scene.shapes) == 1) and (task not in ("where3", "exists3") or len(scene.shapes) == 3):
            break
    buf = io.BytesIO()
    Image.fromarray(shapes.render(scene)).save(buf, "PNG")
    if task == "short":
        prompt, completion = shapes.short_question(scene, rng)
    elif task == "where3":  # "Quick question: where is the red circle?" on three-shape scenes (chance: 1/3)
        s = scene.shapes[int(rng.integers(3))]
        prompt = shapes.SHORT_LEAD + shapes.SHORT_TEMPLATES["where_is"].format(color=s.color, kind=s.kind)
        completion = shapes._cap(shapes.POSITION_PHRASES[s.position][0]) + "."
    elif task == "exists3":  # "Quick question: is there a red circle?" on three-shape scenes, half of them
        # absent pairs whose kind and color are both in the scene (chance: 1/2)
        present = {(s.kind, s.color) for s in scene.shapes}
        absent = sorted({(s.kind, t.color) for s in scene.shapes for t in scene.shapes} - present)
        yes = rng.random() < 0.5 or not absent
        kind, color = sorted(present)[int(rng.integers(3))] if yes else absent[int(rng.integers(len(absent)))]
        prompt, completion = f"{shapes.SHORT_LEAD}is there {shapes._a(color + ' ' + kind)}?", "Yes." if yes else "No."
    elif task in ("color", "color-sentence"):
        color = scene.shapes[0].color
        prompt, completion = "What color is the shape?", color if task == "color" else f"The shape is {color}."
    else:
        p = shapes.sample_prompt(scene, rng)
        prompt, completion = p.text, shapes.responses(scene, p, rng)["good"]
    return {"images": [{"bytes": buf.getvalue()}], "prompt": prompt, "completion": completion}


def _batch(processor, rows):
    b = processor.collate([processor(r) for r in rows])
    b.pop("scene", None)
    b["valid"] = np.ones(len(rows), np.float32)
    return b


def _load(init: str):
    if init == "small":
        model = VLM(get_preset("small"))
        return model, nn.meta.unbox(model.init(jax.random.key(0), *dummy_inputs(model.config))["params"])
    return load_pretrained(init, "float32")


def sft(args) -> None:
    model, params = _load(args.init)
    processor = Processor(model.config, load_tokenizer("shapes"), ProcessorConfig(kind="sft", length_buckets=(16, 32, 80, 96, 160)))
    eval_rng, rng = np.random.default_rng(123), np.random.default_rng(args.seed)
    held_out = [_batch(processor, [generated_row(eval_rng, args.task, "eval") for _ in range(64)])]
    tx = optax.adamw(args.lr, weight_decay=0.0)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, b):
        (l, _), g = jax.value_and_grad(lambda p: loss_fn(p, b, model=model), has_aux=True)(p)
        if args.freeze_vision:  # the tower (not the projector) keeps its weights
            g = {**g, "vision": jax.tree.map(jnp.zeros_like, g["vision"])}
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l

    t0 = time.perf_counter()
    for s in range(args.steps):
        params, opt, _ = step(params, opt, _batch(processor, [generated_row(rng, args.task, "train")
                                                            for _ in range(args.batch)]))
        if s % 25 == 0 or s == args.steps - 1:
            real, shuffled = real_and_shuffled_nll(model, params, held_out)
            print(f"step {s} held-out NLL/token real {real:.4f} shuffled {shuffled:.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)


def generated_eval_rows(kind: str, num: int = 256) -> list[dict]:
    """Held-out rows: `short` questions, or the task's prompts with `good`-tier answers."""
    rows = list(shapes.generate_split("sft", num, seed=1, split="eval", short_fraction=1.0 if kind == "short" else 0.0))
    if kind == "good":
        rng = np.random.default_rng(0)
        for r in rows:
            r["completion"] = shapes.responses(shapes.Scene.from_json(r["scene"]), r["prompt"], rng)["good"]
    return rows


def gap(args) -> None:
    if args.generated:
        model, params = load_pretrained(args.model, "float32")
        processor = Processor(model.config, load_tokenizer(args.model),
                              ProcessorConfig(kind="sft", length_buckets=(16, 32, 48, 64, 80, 160)))
        rows = generated_eval_rows(args.generated, args.num)
        batches = [_batch(processor, rows[i:i + 32]) for i in range(0, len(rows) - 31, 32)]
        real, shuffled = real_and_shuffled_nll(model, params, batches)
        print(f"{args.model} on {len(rows) // 32 * 32} generated {args.generated} rows: NLL/token real {real:.4f} "
              f"shuffled {shuffled:.4f}")
        return
    r = image_reliance(args.model, args.data, "eval", num=args.num)
    print(f"{args.model} on {r['num_rows']} rows of {args.data}: NLL/token real {r['nll_real']:.5f} "
          f"shuffled {r['nll_shuffled']:.5f}")


def _greedy(model, params, tok, b, pixels, max_new_tokens: int) -> list[str]:
    """The model's greedy answers (decoded, stripped) to batch b's prompts, seeing `pixels`."""
    from jaxpref.generate import generate

    g = generate(model, params, pixel_values=pixels, input_ids=b["prompt_ids"], attention_mask=b["prompt_mask"],
                 max_new_tokens=max_new_tokens, greedy=True, eos_token_id=model.config.eos_token_id,
                 pad_token_id=model.config.pad_token_id, rng=jax.random.key(0))
    return [tok.decode([int(x) for x in t[:n] if x != model.config.eos_token_id], skip_special_tokens=True).strip()
            for t, n in zip(np.asarray(g.tokens), np.asarray(g.lengths))]


def answers(args) -> None:
    """Greedy answers of a model to held-out short questions, exact-match accuracy per question kind
    (SHORT_TEMPLATES), with the rows' own images and with other rows' images (chance level)."""
    model, params = load_pretrained(args.model, "float32")
    tok = load_tokenizer(args.model)
    processor = Processor(model.config, tok, ProcessorConfig(kind="sft", length_buckets=(16, 32, 48, 64, 80, 96)))
    rows = generated_eval_rows("short", args.num)
    hits = {"real": {}, "shuffled": {}}
    for start in range(0, len(rows) - 31, 32):
        chunk = rows[start:start + 32]
        b = _batch(processor, chunk)
        for name, pixels in (("real", b["pixel_values"]), ("shuffled", np.roll(b["pixel_values"], 1, axis=0))):
            for r, said in zip(chunk, _greedy(model, params, tok, b, pixels, 32)):
                hits[name].setdefault(shapes.short_question_kind(r["prompt"]), []).append(
                    said == r["completion"].strip())
    for name, by in hits.items():
        total = np.mean([h for v in by.values() for h in v])
        print(f"{args.model} short-question exact match, {name} images: {total:.3f} ("
              + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in sorted(by.items())) + ")")


def lookups(args) -> None:
    """The two-lookup short questions ("where is the red circle?", "what color is the square?"): greedy
    exact-match accuracy by the number of shapes in the scene (chance: 1/3 of the columns with three
    shapes) and by the target's column, and the commonest wrong answers."""
    from collections import Counter, defaultdict

    model, params = load_pretrained(args.model, "float32")
    tok = load_tokenizer(args.model)
    processor = Processor(model.config, tok, ProcessorConfig(kind="sft", length_buckets=(16, 32, 96)))
    leads = {shapes.SHORT_LEAD + shapes.SHORT_TEMPLATES[k].split("{")[0]: k for k in ("where_is", "color_of")}
    rows = [(r, k) for r in generated_eval_rows("short", args.num) for lead, k in leads.items()
            if r["prompt"].startswith(lead) and "shape" not in r["prompt"]]  # color_of, not color_at
    hits, wrong = defaultdict(list), Counter()
    for start in range(0, len(rows) - 31, 32):
        chunk = rows[start:start + 32]
        b = _batch(processor, [r for r, _ in chunk])
        for (r, kind), said in zip(chunk, _greedy(model, params, tok, b, b["pixel_values"], 8)):
            scene, ok = shapes.Scene.from_json(r["scene"]), said == r["completion"].strip()
            target = shapes.parse_prompt(scene, r["prompt"][len(shapes.SHORT_LEAD):]).target
            hits[(kind, f"{len(scene.shapes)} shapes")].append(ok)
            hits[(kind, f"target {scene.shapes[target].position}")].append(ok)
            if not ok:
                wrong[(kind, r["completion"].strip(), said)] += 1
    for key in sorted(hits):
        print(f"{key[0]:>8} {key[1]:<14} {len(hits[key]):4d} questions: {np.mean(hits[key]):.2f}")
    print("commonest wrong answers (question, right, said):",
          "; ".join(f"{n}x {k} {a!r} -> {s!r}" for (k, a, s), n in wrong.most_common(6)))


def fact_pairs(num: int, seed: int = 7) -> list[dict]:
    """Held-out task prompts (color, locate, count) as preference rows whose two answers differ in the
    one fact asked: "It is red." over "It is blue.", "It is on the left." over "It is on the right.",
    "There are two shapes." over "There are three shapes.". The wrong fact is another shape's where the
    scene has one (the confusable answer: blue is in the scene, on another shape), else another value."""
    rng = np.random.default_rng(seed)
    cols = list(shapes.POSITION_PHRASES)
    rows = []
    while len(rows) < num:
        scene = shapes.sample_scene(rng, "eval")
        question = ("color", "locate", "count")[len(rows) % 3]
        p = shapes.sample_prompt(scene, rng, question)
        if question == "count":
            n = sum(sh.kind == p.count_kind for sh in scene.shapes) if p.count_kind else len(scene.shapes)
            wrong = int(rng.choice([m for m in range(1, 4) if m != n]))
            noun = p.count_kind or "shape"
            say = lambda m: f"There {'is' if m == 1 else 'are'} {shapes.NUMBER_WORDS[m]} {shapes._plural(m, noun)}."
            right, other = say(n), say(wrong)
        else:
            t = scene.shapes[p.target]
            key = "color" if question == "color" else "position"
            values = list(shapes.COLORS) if question == "color" else cols
            others = [getattr(sh, key) for sh in scene.shapes if getattr(sh, key) != getattr(t, key)]
            wrong = others[int(rng.integers(len(others)))] if others else \
                [v for v in values if v != getattr(t, key)][int(rng.integers(len(values) - 1))]
            say = (lambda v: f"It is {v}.") if question == "color" else \
                (lambda v: f"It is {shapes.POSITION_PHRASES[v][0]}.")
            right, other = say(getattr(t, key)), say(wrong)
        buf = io.BytesIO()
        Image.fromarray(shapes.render(scene)).save(buf, "PNG")
        rows.append({"images": [{"bytes": buf.getvalue()}], "prompt": p.text, "chosen": right, "rejected": other,
                     "question": f"{question}, {len(scene.shapes)} shape{'s' if len(scene.shapes) > 1 else ''}",
                     "scene": scene.to_json()})
    return rows


def facts(args) -> None:
    """Does a model tell the right fact from a wrong one on the task's own questions (`fact_pairs`)?
    A reward model (--head scalar) by its scores, a policy by its answers' log-probabilities; with the
    rows' own images and with other rows' (the language prior's share). What PPO's reward, or a
    policy's likelihood, can see of the image."""
    from collections import defaultdict

    from jaxpref.train.dpo import reference_logps
    from jaxpref.train.reward import rewards

    model, params = load_pretrained(args.model, "float32", head="scalar" if args.reward_model else "lm")
    processor = Processor(model.config, load_tokenizer(args.model), ProcessorConfig(kind="preference"))
    score = jax.jit(lambda p, b: (rewards if args.reward_model else reference_logps)(p, b, model=model))
    rows = fact_pairs(args.num)
    hits = defaultdict(lambda: ([], []))
    for start in range(0, len(rows) - 31, 32):
        chunk = rows[start:start + 32]
        b = {k: v for k, v in processor.collate([processor(r) for r in chunk]).items() if v.dtype != object}
        for shuffled in (0, 1):
            if shuffled:
                b["pixel_values"] = np.roll(b["pixel_values"], 1, axis=0)
            right, wrong = (np.asarray(x) for x in score(params, b))
            for r, ok in zip(chunk, right > wrong):
                hits[r["question"]][shuffled].append(bool(ok))
                hits["all"][shuffled].append(bool(ok))
    print(f"{'question':<18}{'pairs':>6}{'own image':>11}{'other image':>13}")
    for key in sorted(hits, key=lambda k: (k == "all", k)):
        own, other = hits[key]
        print(f"{key:<18}{len(own):>6}{np.mean(own):>11.3f}{np.mean(other):>13.3f}")


def tokens(args) -> None:
    """Are a model's image tokens (projected, as the decoder sees them) local? How alike each token is
    to its image's mean token (cosine; the mean of the image's tokens each scaled to unit length, so
    that no few large tokens set it), and a linear probe's held-out accuracy at naming the kind, color
    and column of the shape covering each token's patch (jaxpref tower's patch labels)."""
    from jaxpref.train.tower import patch_labels as drawn_patch_labels

    model, params = load_pretrained(args.model, "float32")
    v = model.config.vision
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_images))
    rng = np.random.default_rng(0)

    def data(n: int, split: str):
        scenes = [shapes.sample_scene(rng, split) for _ in range(n)]
        pixels = np.stack([preprocess_image(Image.fromarray(shapes.render(s, v.image_size)), v.image_size, "siglip")
                           for s in scenes])
        labels = np.stack([drawn_patch_labels(s, v.image_size, v.patch_size) for s in scenes])
        return np.concatenate([np.asarray(encode(params, pixels[i:i + 128])) for i in range(0, n, 128)]), labels

    (f_train, y_train), (f_eval, y_eval) = data(args.num, "train"), data(512, "eval")
    unit = f_eval / np.linalg.norm(f_eval, axis=-1, keepdims=True)
    mean = unit.mean(1, keepdims=True)
    cos = (unit * mean / np.linalg.norm(mean, axis=-1, keepdims=True)).sum(-1)
    fg = y_eval[..., 0] > 0
    print(f"cosine of each token to its image's mean token: {cos.mean():.3f} (tokens on a shape {cos[fg].mean():.3f}, "
          f"on the background {cos[~fg].mean():.3f})")
    mu, sd = f_train.reshape(-1, f_train.shape[-1]).mean(0), f_train.reshape(-1, f_train.shape[-1]).std(0) + 1e-6
    x_train = jnp.asarray(((f_train - mu) / sd).reshape(-1, f_train.shape[-1]))
    x_eval = ((f_eval - mu) / sd).reshape(-1, f_eval.shape[-1])
    for name, col in (("kind", 0), ("color", 1), ("column", 3)):
        y, y_held = jnp.asarray(y_train[..., col].reshape(-1)), y_eval[..., col].reshape(-1)
        classes = len(ATTRIBUTES[name])
        w = {"w": jnp.zeros((x_train.shape[1], classes)), "b": jnp.zeros(classes)}
        weight = jnp.where(y > 0, 3.0, 1.0)  # shapes cover about a quarter of the patches
        tx = optax.adam(1e-2)
        opt = tx.init(w)

        @jax.jit
        def step(w, opt, x, y, weight):  # the data as arguments, not constants XLA would fold
            g = jax.grad(lambda w: jnp.mean(weight * optax.softmax_cross_entropy_with_integer_labels(
                x @ w["w"] + w["b"], y)))(w)
            u, opt = tx.update(g, opt)
            return optax.apply_updates(w, u), opt

        for _ in range(300):
            w, opt = step(w, opt, x_train, y, weight)
        pred = np.asarray((x_eval @ w["w"] + w["b"]).argmax(-1))
        on = y_held > 0
        print(f"linear probe, {name}: tokens on a shape {np.mean(pred[on] == y_held[on]):.3f}, "
              f"background {np.mean(pred[~on] == y_held[~on]):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("tower", help="pretrain the vision tower on scene attributes, save a small VLM directory")
    p.add_argument("--head", choices=["mean", "flat", "patch"], default="mean",
                   help="attributes per column from the mean of the tokens or from all of them, or per patch")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=tower)
    p = sub.add_parser("sft", help="a short SFT on generated rows, printing the real/shuffled-image gap")
    p.add_argument("--init", default="small", help="`small` (random init) or a model directory")
    p.add_argument("--task", choices=["color", "color-sentence", "good-one", "good-any", "short", "where3", "exists3"],
                   default="color")
    p.add_argument("--freeze-vision", action="store_true", help="keep the vision tower's weights fixed")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=sft)
    p = sub.add_parser("gap", help="the real/shuffled-image gap of a trained model on a dataset's eval split")
    p.add_argument("model")
    p.add_argument("--data", default="data/shapes/sft")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--generated", choices=["short", "good"], default=None,
                   help="instead of --data: held-out short questions, or task prompts with good-tier answers")
    p.set_defaults(func=gap)
    p = sub.add_parser("answers", help="greedy answers to held-out short questions: exact-match accuracy per kind")
    p.add_argument("model")
    p.add_argument("--num", type=int, default=256)
    p.set_defaults(func=answers)
    p = sub.add_parser("lookups", help="two-lookup short questions: accuracy by number of shapes and target column")
    p.add_argument("model")
    p.add_argument("--num", type=int, default=1500, help="held-out short questions drawn (about 6/11 of them asked)")
    p.set_defaults(func=lookups)
    p = sub.add_parser("facts", help="does a reward model or policy prefer the right fact to a wrong one?")
    p.add_argument("model")
    p.add_argument("--reward-model", action="store_true", help="MODEL is a reward model: compare its scores")
    p.add_argument("--num", type=int, default=960, help="held-out pairs (a third each color, locate, count)")
    p.set_defaults(func=facts)
    p = sub.add_parser("tokens", help="are the image tokens local? cosine to the mean token, per-patch linear probes")
    p.add_argument("model")
    p.add_argument("--num", type=int, default=2048, help="train scenes of the linear probes (512 held-out ones)")
    p.set_defaults(func=tokens)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
