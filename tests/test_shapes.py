"""The built-in shapes task: scenes, rendering, tiers, the gold judge, datasets and the tokenizer."""

import importlib.util
import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from jaxpref.tasks.shapes.scenes import (COLORS, KINDS, POSITION_WORDS, QUESTIONS, SHORT_LEAD, TIERS, Scene, Shape,
                                 corrected_pair, generate_split, judge, parse_claims, parse_prompt, render, responses,
                                 question_of, sample_prompt, sample_scene, scene_listing,
                                 scene_split)
from jaxpref.data.tokenizer import load_tokenizer
from jaxpref.tasks.shapes.tokenizer import SPECIAL_TOKENS, load_shapes_tokenizer

# A hand-made scene: a large red circle on the left, a small blue square on the right.
S1 = Scene((Shape("circle", "red", "left", "large"), Shape("square", "blue", "right", "small")))


def tier_samples(num, seed=0, split="eval"):
    """(scene, prompt, {tier: text}) for num held-out scenes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        scene = sample_scene(rng, split)
        prompt = sample_prompt(scene, rng)
        out.append((scene, prompt, responses(scene, prompt, rng)))
    return out


# ---------------------------------------------------------------------------
# Scenes and rendering


def test_render_puts_each_color_at_its_shape():
    scene = Scene((Shape("triangle", "green", "left", "large"), Shape("circle", "purple", "center", "small"),
                   Shape("star", "orange", "right", "large", dx=0.0, dy=-1.0)))
    img = render(scene, 96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    # Layout by hand: column centres x = 16, 48, 80; y = 96 * (0.5 + 0.25 * dy) = 48, 48, 24.
    for (x, y), color in (((16, 48), "green"), ((48, 48), "purple"), ((80, 24), "orange")):
        assert tuple(img[y, x]) == COLORS[color], (x, y, color)
    assert tuple(img[2, 2]) == (255, 255, 255) and tuple(img[90, 80]) == (255, 255, 255)
    for column, color in enumerate(("green", "purple", "orange")):  # each color only in its own column
        mask = np.all(img == COLORS[color], axis=-1)
        xs = np.nonzero(mask)[1]
        assert mask.sum() > 20 and xs.min() >= 32 * column and xs.max() < 32 * (column + 1), color
    assert np.all(img == render(scene, 96))


def test_visible_shapes_marks_what_render_draws():
    from jaxpref.tasks.shapes.scenes import BACKGROUND, visible_shapes

    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = sample_scene(rng)
        for size in (32, 64):
            img, visible = render(scene, size), visible_shapes(scene, size)
            assert visible.shape == (size, size) and set(np.unique(visible)) <= set(range(len(scene.shapes) + 1))
            assert np.array_equal(visible > 0, (img != np.array(BACKGROUND)).any(-1))  # drawn <=> not background
            for i, s in enumerate(scene.shapes):  # a pixel of exactly one shape's colour shows that shape
                if sum(t.color == s.color for t in scene.shapes) == 1:
                    solid = np.all(img == COLORS[s.color], axis=-1)
                    assert solid.any() and (visible[solid] == i + 1).all(), (scene, size)


def test_large_shapes_cover_more_pixels_than_small_ones():
    for kind in KINDS:
        areas = [np.all(render(Scene((Shape(kind, "red", "center", size),))) == COLORS["red"], -1).sum()
                 for size in ("small", "large")]
        assert areas[1] > 1.8 * areas[0] > 0, (kind, areas)


def test_scene_json_round_trip_and_validation():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = sample_scene(rng)
        assert Scene.from_json(scene.to_json()) == scene
        assert 1 <= len(scene.shapes) <= 3
    with pytest.raises(ValueError, match="kind must be one of"):
        Scene((Shape("hexagon", "red", "left", "large"),))
    with pytest.raises(ValueError, match="distinct columns"):
        Scene((Shape("circle", "red", "left", "large"), Shape("square", "blue", "left", "small")))
    with pytest.raises(ValueError, match="not a shapes scene"):
        Scene.from_json('{"shape": []}')


def test_prompts_name_shapes_of_the_scene_and_parse_back():
    rng = np.random.default_rng(4)
    seen = set()
    for _ in range(300):
        scene = sample_scene(rng)
        prompt = sample_prompt(scene, rng)
        seen.add(prompt.question)
        assert parse_prompt(scene, prompt.text) == prompt and question_of(prompt.text) == prompt.question
        if prompt.target is not None:
            s = scene.shapes[prompt.target]
            assert s.kind in prompt.text and (prompt.question != "locate" or s.color in prompt.text)
        if prompt.count_kind is not None:
            assert prompt.count_kind in {s.kind for s in scene.shapes}
    assert seen == set(QUESTIONS)
    with pytest.raises(ValueError, match="names 0 shapes"):
        parse_prompt(S1, "Where is the green star?")


# ---------------------------------------------------------------------------
# The judge


def test_judge_ranks_tiers_on_held_out_scenes():
    samples = tier_samples(400)
    scores = {t: np.array([judge(s, p.text, r[t]) for s, p, r in samples]) for t in TIERS}
    means = [scores[t].mean() for t in TIERS]
    assert means == sorted(means, reverse=True) and means[0] - means[-1] > 0.8, means
    assert np.all((scores["good"] >= 0) & (scores["good"] <= 1))
    assert np.mean(scores["good"] > scores["hallucinated"]) >= 0.95
    for q in QUESTIONS:  # the order holds for every kind of question
        idx = [i for i, (_, p, _) in enumerate(samples) if p.question == q]
        m = [scores[t][idx].mean() for t in TIERS]
        assert m == sorted(m, reverse=True), (q, m)


def test_judge_hand_computed_scores():
    """score = clip(answer - 0.6 invented - 0.5 false - style); describe answer = mean per shape of
    kind 0.5 + color 0.3 + position 0.2."""
    d, c = "Describe the image.", "What color is the circle?"
    cases = [
        (d, "A red circle on the left and a blue square on the right.", 1.0),
        (d, "A red circle on the left.", 0.5),  # square missed
        (d, "A red circle in the center and a blue square on the right.", 0.4),  # (0.8 + 1) / 2 - 0.5
        (d, "A red circle on the left, a blue square on the right and a red star.", 0.4),  # star invented
        (d, "A red circle on the left, a blue square on the right and a blue circle.", 0.5),  # no blue circle
        (d, "Three shapes: a red circle on the left and a blue square on the right.", 0.5),  # wrong count
        (c, "Red.", 1.0), (c, "Blue.", 0.0), (c, "It is red, not blue.", 1.0), (c, "Grey.", 0.0),
        ("How many shapes are there?", "Two.", 1.0), ("How many shapes are there?", "3", 0.0),
        ("How many circles are there?", "There is 1 circle.", 1.0),
        ("Where is the blue square?", "On the right.", 1.0),
        ("Where is the blue square?", "On the right or on the left.", 0.5),
        ("Where is the blue square?", "The small blue square is on the right.", 1.0),
        ("Where is the blue square?", "The large blue square is on the right.", 0.5),  # wrong size
    ]
    for prompt, response, want in cases:
        assert judge(S1, prompt, response) == pytest.approx(want), (prompt, response)


def test_judge_reads_free_text_variants():
    variants = {
        "Describe the image.": ["A RED CIRCLE ON THE LEFT AND A BLUE SQUARE ON THE RIGHT!!!",
                                "red ball (left side), blue box (right side)",
                                "Two shapes: a big red circle at the left, and a small blue square on the right.",
                                "There's a red circle on the left-hand side and a little blue rectangle on the right",
                                "On the left is a red circle; on the right, a blue square."],
        "What color is the circle?": ["red", "It's RED!", "The circle is red.", "The colour is crimson.",
                                      "The circle is red and the square is blue."],
        "How many shapes are there?": ["2", "two!", "There are 2 shapes.", "I can count two objects."],
        "Where is the red circle?": ["left", "It is on the left-hand side.", "The red ball is on the left side",
                                     "Leftmost."],
    }
    for prompt, texts in variants.items():
        for text in texts:
            assert judge(S1, prompt, text) >= 0.9, (prompt, text, judge(S1, prompt, text))


def test_judge_penalises_invented_shapes_and_colors():
    rng = np.random.default_rng(7)
    worse = 0
    samples = tier_samples(150, seed=1)
    for scene, prompt, texts in samples:
        good = texts["good"].rstrip(".")
        colors = [c for c in COLORS if c not in {s.color for s in scene.shapes}]
        kinds = [k for k in KINDS if k not in {s.kind for s in scene.shapes}]
        base = judge(scene, prompt, good)
        shape = scene.shapes[0]
        with_color = f"{good}, and there is also a {rng.choice(colors)} {shape.kind}."
        with_kind = f"{good}, and there is also a {shape.color} {rng.choice(kinds)}."
        worse += judge(scene, prompt, with_color) <= base - 0.5 and judge(scene, prompt, with_kind) <= base - 0.5
    assert worse == len(samples)


def test_judge_penalises_padding_repetition_and_garbage():
    c = "What color is the circle?"
    assert judge(S1, c, "Red.") == 1.0
    assert judge(S1, c, "Red. Red. Red. Red. Red. Red.") < 0.8
    assert judge(S1, c, "Certainly! Based on the image provided, the circle is red. I hope this helps!") < 0.8
    assert judge(S1, c, "Red. " + "The circle is red and I am sure of it because it is red. " * 4) < 0.7
    for garbage in ("", "   ", "!!!", "asdf qwer zxcv", "the the the the", "circle circle circle"):
        assert judge(S1, c, garbage) == 0.0, garbage
    assert judge(S1, c, "Red blorp zonk fribble.") < judge(S1, c, "Red.") - 0.2


def test_judge_accepts_scene_json_and_prompt_objects():
    scene, prompt, texts = tier_samples(1, seed=9)[0]
    want = judge(scene, prompt, texts["partial"])
    assert judge(scene.to_json(), prompt.text, texts["partial"]) == want
    assert judge(scene, prompt.text + "\n", texts["partial"]) == want  # PaliGemma's prompt suffix


# ---------------------------------------------------------------------------
# Datasets


def test_rows_follow_trls_schema():
    columns = {"preference": {"images", "prompt", "chosen", "rejected", "scene"},
               "prompt": {"images", "prompt", "scene"}, "sft": {"images", "prompt", "completion", "scene"}}
    for kind, cols in columns.items():
        rows = list(generate_split(kind, 5, seed=0, image_size=32))
        assert len(rows) == 5
        for row in rows:
            assert set(row) == cols and all(isinstance(row[k], str) for k in cols - {"images"})
            (image,) = row["images"]
            assert image["path"] is None
            decoded = np.asarray(Image.open(io.BytesIO(image["bytes"])).convert("RGB"))
            assert np.array_equal(decoded, render(Scene.from_json(row["scene"]), 32))
    with pytest.raises(ValueError, match="kind must be one of"):
        next(generate_split("dpo", 1, 0))
    with pytest.raises(ValueError, match="split must be one of"):
        next(generate_split("sft", 1, 0, split="test"))


def test_generation_is_deterministic_per_seed():
    a = list(generate_split("preference", 20, seed=3, split="eval"))
    assert a == list(generate_split("preference", 20, seed=3, split="eval"))
    b = list(generate_split("preference", 20, seed=4, split="eval"))
    assert [r["scene"] for r in a] != [r["scene"] for r in b]


def test_train_and_eval_scenes_are_disjoint():
    keys = {}
    for split in ("train", "eval"):
        rows = generate_split("prompt", 300, seed=0, image_size=16, split=split)
        scenes = [Scene.from_json(r["scene"]) for r in rows]
        assert all(scene_split(s) == split for s in scenes)
        keys[split] = {s.key() for s in scenes}
    assert not keys["train"] & keys["eval"]
    assert len(keys["eval"]) > 200  # held-out scenes are varied, not a handful


@pytest.mark.parametrize("noise", [0.0, 0.25])
def test_label_noise_fraction(noise):
    n = 600
    rows = list(generate_split("preference", n, seed=1, image_size=16, label_noise=noise))
    flipped = sum(judge(r["scene"], r["prompt"], r["chosen"]) < judge(r["scene"], r["prompt"], r["rejected"])
                  for r in rows)
    assert all(judge(r["scene"], r["prompt"], r["chosen"]) != judge(r["scene"], r["prompt"], r["rejected"])
               for r in rows)
    assert abs(flipped / n - noise) <= 3.5 * math.sqrt(max(noise * (1 - noise), 1e-9) / n)


def test_preference_pairs_mix_easy_and_hard_and_sft_mixes_all_tiers():
    rows = list(generate_split("preference", 300, seed=2, image_size=16, label_noise=0.0))
    gaps = np.array([judge(r["scene"], r["prompt"], r["chosen"]) - judge(r["scene"], r["prompt"], r["rejected"])
                     for r in rows])
    assert np.mean(gaps < 0.45) > 0.2 and np.mean(gaps > 0.9) > 0.1  # subtle pairs and obvious ones
    sft = list(generate_split("sft", 400, seed=2, image_size=16))
    scores = np.array([judge(r["scene"], r["prompt"], r["completion"]) for r in sft])
    assert 0.2 < np.mean(scores >= 0.95) < 0.35 and 0.15 < np.mean(scores <= 0.05) < 0.4  # good, hallucinated
    assert 0.3 < np.mean((scores > 0.05) & (scores < 0.95)) < 0.65  # robotic and partial in between


def test_short_questions_are_answered_from_the_scene_and_leave_the_other_rows_alone():
    n, fraction = 600, 0.3
    mixed = list(generate_split("sft", n, seed=7, image_size=16, short_fraction=fraction))
    plain = list(generate_split("sft", n, seed=7, image_size=16))
    short = [r["prompt"].startswith(SHORT_LEAD) for r in mixed]
    assert abs(np.mean(short) - fraction) <= 3.5 * math.sqrt(fraction * (1 - fraction) / n)
    assert [r["scene"] for r in mixed] == [r["scene"] for r in plain]  # the same scenes, row for row
    assert all(a == b for a, b, s in zip(mixed, plain, short) if not s)  # task rows untouched
    assert _short_question_kinds([r for r, s in zip(mixed, short) if s]) == SHORT_KINDS_SEEN
    with pytest.raises(ValueError, match="short_fraction"):
        next(generate_split("preference", 1, 0, short_fraction=0.5))


def test_corrections_differ_from_the_good_answer_in_the_asked_fact_only():
    rng = np.random.default_rng(3)
    made = {q: 0 for q in QUESTIONS}
    for _ in range(400):
        scene = sample_scene(rng, "train")
        prompt = sample_prompt(scene, rng)
        pair = corrected_pair(scene, prompt, rng)
        if pair is None:
            continue
        right, wrong = pair
        made[prompt.question] += 1
        assert judge(scene, prompt.text, right) >= 0.9 and judge(scene, prompt.text, wrong) < 0.5, (prompt, pair)
        if prompt.question in ("color", "locate"):  # the same words but the color or the column
            a, b = right.split(), wrong.split()
            assert len(a) - 2 <= len(b) <= len(a) + 2 and sum(x != y for x, y in zip(a, b)) <= 3, pair
        if prompt.question == "color":  # the wrong color is another shape's where one can take it (no two
            target = scene.shapes[prompt.target]  # shapes share kind and color)
            others = {s.color for s in scene.shapes} - {s.color for s in scene.shapes if s.kind == target.kind}
            said = [w.strip(".,") for w in wrong.lower().split() if w.strip(".,") in COLORS]
            assert said and (not others or said[-1] in others), (scene, pair)
    assert all(n >= 40 for n in made.values()), made  # every question type gets corrections


def test_corrected_pairs_replace_that_fraction_of_pairs_and_leave_the_others_alone():
    n, fraction = 600, 0.4
    mixed = list(generate_split("preference", n, seed=4, image_size=16, label_noise=0.0, corrected_fraction=fraction))
    plain = list(generate_split("preference", n, seed=4, image_size=16, label_noise=0.0))
    assert [r["scene"] for r in mixed] == [r["scene"] for r in plain] and \
        [r["prompt"] for r in mixed] == [r["prompt"] for r in plain]
    changed = np.array([a != b for a, b in zip(mixed, plain)])
    # drawn for `fraction` of the rows; a few draws find no edit the judge scores lower and keep the pair
    assert fraction - 0.1 < np.mean(changed) <= fraction + 3.5 * math.sqrt(fraction * (1 - fraction) / n)
    for r in (r for r, c in zip(mixed, changed) if c):
        assert judge(r["scene"], r["prompt"], r["chosen"]) >= 0.9 > judge(r["scene"], r["prompt"], r["rejected"])
    with pytest.raises(ValueError, match="corrected_fraction"):
        next(generate_split("sft", 1, 0, corrected_fraction=0.5))


def test_grounded_answers_list_the_scene_in_that_fraction_of_good_color_and_locate_answers():
    n, fraction = 800, 0.6
    mixed = list(generate_split("sft", n, seed=9, image_size=16, grounded_fraction=fraction, short_fraction=0.2))
    plain = list(generate_split("sft", n, seed=9, image_size=16, short_fraction=0.2))
    assert [(r["scene"], r["prompt"]) for r in mixed] == [(r["scene"], r["prompt"]) for r in plain]
    changed = [(a, b) for a, b in zip(mixed, plain) if a != b]
    asked = [b for b in plain if not b["prompt"].startswith(SHORT_LEAD)
             and parse_prompt(Scene.from_json(b["scene"]), b["prompt"]).question in ("color", "locate")
             and judge(b["scene"], b["prompt"], b["completion"]) >= 0.95]  # good-tier answers (and a few others)
    assert 0.25 * len(asked) < len(changed) <= len(asked)  # good is one tier in four; 0.6 of those
    assert abs(len(changed) / len(asked) - fraction) < 0.2, (len(changed), len(asked))
    for grounded, good in changed:
        scene = Scene.from_json(grounded["scene"])
        prompt = parse_prompt(scene, grounded["prompt"])
        assert prompt.question in ("color", "locate") and not grounded["prompt"].startswith(SHORT_LEAD)
        assert judge(scene, prompt, good["completion"]) >= 0.95, good  # it replaced a good answer
        claims = parse_claims(grounded["completion"])  # every shape, with its kind, color and column
        assert sorted((m.kind, m.color, tuple(m.positions)) for m in claims.mentions if m.kind in KINDS) == \
            sorted((s.kind, s.color, (s.position,)) for s in scene.shapes), grounded["completion"]
        assert grounded["completion"] == scene_listing(scene)  # the short describe answer's phrasing
        assert judge(scene, prompt, grounded["completion"]) >= {1: 1.0, 2: 0.94, 3: 0.88}[len(scene.shapes)]
    assert list(generate_split("sft", 50, seed=9, image_size=16, split="eval", grounded_fraction=0.0)) == \
        list(generate_split("sft", 50, seed=9, image_size=16, split="eval"))
    with pytest.raises(ValueError, match="grounded_fraction"):
        next(generate_split("preference", 1, 0, grounded_fraction=0.5))
    with pytest.raises(ValueError, match="grounded_fraction"):
        next(generate_split("sft", 1, 0, grounded_fraction=1.5))


SHORT_KINDS_SEEN = {"what color", "which shape", "is the", "what", "where", "how", "what shapes"}  # SHORT_TEMPLATES


def _short_question_kinds(rows) -> set[str]:
    """Checks each short-question row's answer against its scene; returns the question openings seen."""
    seen = set()
    for r in rows:
        scene, prompt, answer = Scene.from_json(r["scene"]), r["prompt"], r["completion"]
        assert prompt.startswith(SHORT_LEAD), r
        question = prompt[len(SHORT_LEAD):]
        words = question.rstrip("?").split()
        at = [POSITION_WORDS[w] for w in words if w in POSITION_WORDS]
        if at:  # asks about the shape in a column
            (shape,) = [s for s in scene.shapes if s.position == at[0]]
            facts = parse_claims(answer)
            said = facts.colors + [m.size for m in facts.mentions if m.size] + [m.kind for m in facts.mentions]
            if "color" in words:
                assert said == [shape.color], r
            elif "which" in words:
                assert said == [shape.kind], r
            else:
                assert answer == f"It is {shape.size}.", r
            seen.add(words[0] + " " + words[1])
        else:  # names a shape, or counts: the gold judge reads these prompts and scores a right answer 1
            describe = words[:2] == ["what", "shapes"]  # every shape, left to right
            # (a repeated trigram, "triangle on the", costs a description 0.05 of style)
            assert judge(scene, question, answer) >= (0.95 if describe else 1.0), r
            assert judge(scene, question, "It is gray.") == 0.0  # an invented color answers nothing
            if describe:
                assert [(m.color, m.kind, m.positions) for m in parse_claims(answer).mentions] == [
                    (s.color, s.kind, [s.position]) for s in scene.shapes], r
            seen.add("what shapes" if describe else words[0])
    return seen


def test_the_short_kind_is_all_short_questions_on_scenes_of_its_own():
    rows = list(generate_split("short", 300, seed=7, image_size=16))
    assert _short_question_kinds(rows) == SHORT_KINDS_SEEN
    assert rows == list(generate_split("short", 300, seed=7, image_size=16))  # deterministic
    sft_scenes = [r["scene"] for r in generate_split("sft", 300, seed=7, image_size=16)]
    assert sum(a == b for a, b in zip(sft_scenes, (r["scene"] for r in rows))) < 10  # its own random stream
    # asked by SHORT_WEIGHTS: the two lookups 3/11 each, every other kind 1/11
    asked = [r["prompt"][len(SHORT_LEAD):] for r in rows]
    for opening, share in (("where is", 3 / 11), ("what color is the shape", 1 / 11), ("how many", 1 / 11)):
        got = np.mean([q.startswith(opening) for q in asked])
        assert abs(got - share) <= 3.5 * math.sqrt(share * (1 - share) / len(rows)), (opening, got)
    held_out = list(generate_split("short", 50, seed=7, image_size=16, split="eval"))
    assert all(scene_split(Scene.from_json(r["scene"])) == "eval" for r in held_out)
    assert set(rows[0]) == {"images", "prompt", "completion", "scene"}


# ---------------------------------------------------------------------------
# The tokenizer


def test_tokenizer_special_ids_and_no_automatic_bos_eos():
    tok = load_shapes_tokenizer()
    assert tok.is_fast and len(tok) <= 1024
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.added_tokens_decoder[4].content == "<image>" and "<image>" in tok.all_special_tokens
    ids = tok("A red circle.").input_ids
    assert ids == tok("A red circle.", add_special_tokens=False).input_ids and not {0, 1, 2, 3, 4} & set(ids)
    assert tok("<image><image>Describe the image.\n").input_ids[:2] == [4, 4]
    assert len(tok("A red circle on the left.").input_ids) <= 8  # words of the task are single tokens


def test_tokenizer_round_trips_task_text_and_anything_else():
    tok = load_shapes_tokenizer()
    texts = [t for _, p, r in tier_samples(100, seed=5) for t in (p.text + "\n", *r.values())]
    texts += ["  two  spaces", "\n\nnew lines\n", "Ünïcödé — 🟥 ok?", "tab\there", "0123456789"]
    for text in texts:
        assert tok.decode(tok(text).input_ids) == text, text


def test_load_tokenizer_from_a_saved_directory(tmp_path):
    tok = load_tokenizer("shapes")
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    text = "<image>Where is the blue square?\nOn the right."
    assert again(text).input_ids == tok(text).input_ids
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (2, 1, 0)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer("google/paligemma-3b-pt-224")


def _script(name: str):
    """scripts/<name>.py as a module."""
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_widen_kv_heads_keeps_the_function_and_checks_the_head_count(tmp_path):
    import flax.linen as nn
    import jax

    from jaxpref.models import VLM, load_pretrained, save_pretrained
    from jaxpref.models.presets import get_preset
    from jaxpref.models.vlm import dummy_inputs

    model = VLM(get_preset("tiny"))  # 4 query heads, 1 key-value head
    inputs = dummy_inputs(model.config)
    params = nn.meta.unbox(model.init(jax.random.key(3), *inputs)["params"])
    save_pretrained(model, params, str(tmp_path / "one"))
    _script("widen_kv_heads").widen(str(tmp_path / "one"), str(tmp_path / "four"), 4)
    wide, wide_params = load_pretrained(str(tmp_path / "four"))
    assert wide.config.text.num_key_value_heads == 4
    assert wide_params["decoder"]["layers"]["k"]["kernel"].shape[-2] == 4
    pixels = np.random.default_rng(0).uniform(-1, 1, np.shape(inputs[0])).astype(np.float32)
    a = model.apply({"params": params}, pixels, *inputs[1:]).logits
    b = wide.apply({"params": wide_params}, pixels, *inputs[1:]).logits
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    assert np.abs(np.asarray(a)).max() > 1e-3  # not a vacuous comparison
    with pytest.raises(ValueError, match="must be a multiple"):
        _script("widen_kv_heads").widen(str(tmp_path / "four"), str(tmp_path / "bad"), 2)


def test_tokenizer_training_script_is_deterministic():
    script = _script("train_shapes_tokenizer")
    a, b = script.train(60), script.train(60)
    assert a.to_str() == b.to_str() and a.get_vocab_size() <= 1024
    assert [a.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]


def test_short_question_kind_names_the_template_of_every_short_question_and_no_task_prompt():
    from jaxpref.tasks.shapes.scenes import POSITION_PHRASES, SHORT_TEMPLATES, short_question_kind

    rows = list(generate_split("short", 400, seed=11, image_size=16, split="eval"))
    kinds = [short_question_kind(r["prompt"]) for r in rows]
    assert set(kinds) == set(SHORT_TEMPLATES)  # every kind asked, every question named
    for r, k in zip(rows, kinds):  # the answer has the form of that kind's answer (short_question)
        answer, scene = r["completion"], Scene.from_json(r["scene"])
        shape_words = {"color_at": ("It is", COLORS), "color_of": ("It is", COLORS), "kind_at": ("A ", None),
                       "size_at": ("It is", ("small", "large")), "count": ("I count", None)}
        if k in shape_words:
            lead, words = shape_words[k]
            assert answer.startswith(lead) and (words is None or answer[len("It is "):-1] in words), (k, r)
        elif k == "where_is":
            assert answer[:-1].lower() in {p[0] for p in POSITION_PHRASES.values()}, r
        else:
            assert len(parse_claims(answer).mentions) == len(scene.shapes), r
    # "what color is the shape on the left?" asks a place; "what color is the square on the left?" names a shape
    assert short_question_kind(SHORT_LEAD + "what color is the shape on the left?") == "color_at"
    assert short_question_kind(SHORT_LEAD + "what color is the square on the left?") == "color_of"
    assert all(short_question_kind(r["prompt"]) is None
               for r in generate_split("prompt", 200, seed=11, image_size=16, split="eval"))
    assert short_question_kind("where is the red circle?") is None  # not without the lead
