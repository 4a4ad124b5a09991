"""The built-in `shapes` task: a procedural visual preference task with a gold judge.

A scene holds 1-3 coloured shapes, one per column (left, center, right). Prompts ask to describe
the image, name a shape's color, count shapes, or locate one. Candidate responses come in quality
tiers (TIERS, best first); `judge` scores any free text against the scene in [0, 1] and stands in
for the human raters: preference pairs are ordered by it (then flipped with probability
`label_noise`), and evaluation uses it. See docs/SHAPES.md for the rules.

    scene = sample_scene(np.random.default_rng(0))
    image = render(scene)                                   # uint8[64, 64, 3]
    prompt = sample_prompt(scene, rng)                      # Prompt(question, text, target, count_kind)
    texts = responses(scene, prompt, rng)                   # {"good": ..., "robotic": ..., ...}
    judge(scene, prompt.text, texts["good"])                # ~1.0
    rows = generate_split("preference", 1000, seed=0, split="train")   # TRL-schema dicts
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import re
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------
# Vocabulary of the world

KINDS = ("circle", "square", "triangle", "star")
COLORS = {"red": (215, 40, 40), "green": (40, 160, 70), "blue": (40, 90, 220), "yellow": (235, 200, 20),
          "purple": (145, 60, 190), "orange": (245, 135, 25)}
POSITIONS = ("left", "center", "right")  # the shape's column; at most one shape per column
SIZES = ("small", "large")
BACKGROUND = (255, 255, 255)
TIERS = ("good", "robotic", "partial", "hallucinated")  # best first
QUESTIONS = ("describe", "color", "count", "locate")
SPLITS = ("train", "eval")
GENERATED_KINDS = ("preference", "prompt", "sft", "short")
EVAL_BUCKETS = 10  # a scene's content hashes into one of these; bucket 0 is the eval split's
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    color: str  # a key of COLORS
    position: str  # one of POSITIONS
    size: str  # one of SIZES
    dx: float = 0.0  # horizontal jitter in [-1, 1] (a small fraction of the column width)
    dy: float = 0.0  # vertical offset in [-1, 1] (up to a quarter of the image height)


@dataclasses.dataclass(frozen=True)
class Scene:
    """1-3 shapes in distinct columns, sorted left to right; (kind, color) pairs are unique."""

    shapes: tuple[Shape, ...]

    def __post_init__(self):
        if not 1 <= len(self.shapes) <= 3:
            raise ValueError(f"a scene holds 1-3 shapes, got {len(self.shapes)}")
        for i, s in enumerate(self.shapes):
            for field, value, allowed in (("kind", s.kind, KINDS), ("color", s.color, tuple(COLORS)),
                                          ("position", s.position, POSITIONS), ("size", s.size, SIZES)):
                if value not in allowed:
                    raise ValueError(f"shape {i}: {field} must be one of {allowed}, got {value!r}")
            if not (-1 <= s.dx <= 1 and -1 <= s.dy <= 1):
                raise ValueError(f"shape {i}: dx and dy must lie in [-1, 1], got {s.dx}, {s.dy}")
        if [s.position for s in self.shapes] != [p for p in POSITIONS if p in {s.position for s in self.shapes}]:
            raise ValueError(f"shapes must sit in distinct columns, sorted left to right: "
                             f"{[s.position for s in self.shapes]}")
        if len({(s.kind, s.color) for s in self.shapes}) != len(self.shapes):
            raise ValueError("two shapes share both kind and color")

    def key(self) -> str:
        """The scene's content (no jitter): equal keys mean the same facts for the judge."""
        return ";".join(f"{s.size} {s.color} {s.kind} {s.position}" for s in self.shapes)

    def to_json(self) -> str:
        return json.dumps({"shapes": [dataclasses.asdict(s) for s in self.shapes]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        try:
            shapes = json.loads(text)["shapes"]
            return cls(tuple(Shape(**s) for s in shapes))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"not a shapes scene JSON ({type(e).__name__}: {e}): {text[:200]!r}") from None


def scene_split(scene: Scene) -> str:
    """"eval" for the 1/EVAL_BUCKETS of scene contents hashed into bucket 0, else "train"."""
    bucket = int.from_bytes(hashlib.sha256(scene.key().encode()).digest()[:8], "big") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def sample_scene(rng: np.random.Generator, split: str | None = None) -> Scene:
    """A random scene; with `split`, only scenes whose content belongs to that split (scene_split)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    while True:
        n = int(rng.integers(1, 4))
        columns = sorted(rng.choice(3, size=n, replace=False))
        pairs = rng.choice(len(KINDS) * len(COLORS), size=n, replace=False)  # distinct (kind, color)
        shapes = tuple(Shape(kind=KINDS[p // len(COLORS)], color=list(COLORS)[p % len(COLORS)],
                             position=POSITIONS[c], size=SIZES[int(rng.integers(2))],
                             dx=round(float(rng.uniform(-1, 1)), 3), dy=round(float(rng.uniform(-1, 1)), 3))
                       for c, p in zip(columns, pairs))
        scene = Scene(shapes)
        if split is None or scene_split(scene) == split:
            return scene


# ---------------------------------------------------------------------------
# Rendering

_SUPERSAMPLE = 4


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":  # equilateral, pointing up, centred on its centroid
        angles, radii = np.deg2rad([-90, 30, 150]), [1.4 * r] * 3
    else:  # five-pointed star
        angles, radii = np.deg2rad(-90 + 36 * np.arange(10)), [1.25 * r, 0.5 * r] * 5
    return [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)]


def shape_geometry(shape: Shape, image_size: int) -> tuple[float, float, float]:
    """(cx, cy, r) in pixels of an image_size image: centre and nominal radius."""
    column = image_size / 3
    cx = (POSITIONS.index(shape.position) + 0.5 + 0.05 * shape.dx) * column
    cy = image_size * (0.5 + 0.25 * shape.dy)
    r = image_size * (0.125 if shape.size == "large" else 0.085)
    return cx, cy, r


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """uint8[image_size, image_size, 3]: the shapes on a white background (drawn 4x larger, then
    area-averaged, so edges are smooth and interiors keep their exact colour)."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    _paint(img, scene, [COLORS[s.color] for s in scene.shapes])
    return np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX))


def visible_shapes(scene: Scene, image_size: int = 64) -> np.ndarray:
    """int32[image_size, image_size]: at each pixel of render(scene, image_size), 1 + the index of the
    last-drawn shape that reaches it (any of its supersampled points: the pixel is not pure
    background colour in that shape's own rendering), 0 on pure background."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    big = image_size * _SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    _paint(img, scene, list(range(1, len(scene.shapes) + 1)))  # later shapes paint over earlier ones
    points = np.asarray(img).reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE)
    return points.max((1, 3)).astype(np.int32)


def _paint(img: Image.Image, scene: Scene, fills: list) -> None:
    """Draws scene.shapes in order onto `img` (a supersampled canvas), shape i in fills[i]."""
    draw = ImageDraw.Draw(img)
    for shape, fill in zip(scene.shapes, fills):
        cx, cy, r = shape_geometry(shape, img.width)
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape.kind == "square":
            h = 0.9 * r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(_polygon(shape.kind, cx, cy, r), fill=fill)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(row: dict) -> np.ndarray:
    """uint8[H, W, 3]: the first image of a generated row."""
    return np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB"))


# ---------------------------------------------------------------------------
# Prompts

PROMPT_TEMPLATES = {
    "describe": ("Describe the image.", "What is in the image?", "What do you see in the picture?",
                 "Describe what you see."),
    "color": ("What color is the {ref}?", "What is the color of the {ref}?", "Which color does the {ref} have?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes in the picture."),
    "count_kind": ("How many {kind}s are there?", "How many {kind}s can you see?", "Count the {kind}s."),
    "locate": ("Where is the {color} {kind}?", "Where is the {color} {kind} located?",
               "In which part of the image is the {color} {kind}?"),
}


@dataclasses.dataclass(frozen=True)
class Prompt:
    question: str  # one of QUESTIONS
    text: str
    target: int | None = None  # color/locate: index of the shape asked about
    count_kind: str | None = None  # count: only shapes of this kind are counted (None: all)


def _color_ref(scene: Scene, i: int) -> str:
    """How a color question names shape i: its kind, plus its column when the kind repeats."""
    s = scene.shapes[i]
    if sum(t.kind == s.kind for t in scene.shapes) == 1:
        return s.kind
    return f"{s.kind} {POSITION_PHRASES[s.position][0]}"


def sample_prompt(scene: Scene, rng: np.random.Generator, question: str | None = None) -> Prompt:
    """A prompt about `scene` (random question unless given); it only names shapes in the scene."""
    question = QUESTIONS[int(rng.integers(len(QUESTIONS)))] if question is None else question
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if question == "describe":
        return Prompt("describe", pick(PROMPT_TEMPLATES["describe"]))
    if question == "count":
        if rng.random() < 0.5:
            return Prompt("count", pick(PROMPT_TEMPLATES["count"]))
        kind = pick(sorted({s.kind for s in scene.shapes}))
        return Prompt("count", pick(PROMPT_TEMPLATES["count_kind"]).format(kind=kind), count_kind=kind)
    if question not in ("color", "locate"):
        raise ValueError(f"question must be one of {QUESTIONS}, got {question!r}")
    i = int(rng.integers(len(scene.shapes)))
    s = scene.shapes[i]
    if question == "color":
        return Prompt("color", pick(PROMPT_TEMPLATES["color"]).format(ref=_color_ref(scene, i)), target=i)
    return Prompt("locate", pick(PROMPT_TEMPLATES["locate"]).format(color=s.color, kind=s.kind), target=i)


def question_of(text: str) -> str:
    """The question (one of QUESTIONS) a prompt text asks, from its words alone (no scene needed)."""
    words = _words(text)
    joined = " ".join(words)
    if "how many" in joined or (words and words[0] == "count"):
        return "count"
    if "color" in words:
        return "color"
    if {"where", "locate", "position"} & set(words) or "which part" in joined:
        return "locate"
    return "describe"


def parse_prompt(scene: Scene, text: str) -> Prompt:
    """The Prompt a prompt text asks about `scene` (any phrasing naming the shape like ours do).
    Raises ValueError when it names a shape that is not (uniquely) in the scene."""
    question = question_of(text)
    if question == "describe":
        return Prompt("describe", text)
    words = _words(text)
    mentions = [m for clause in _clauses(words) for m in _parse_clause(clause)[0] if m.kind != GENERIC]
    if question == "count":
        return Prompt("count", text, count_kind=mentions[0].kind if mentions else None)
    if not mentions:
        raise ValueError(f"prompt {text!r} asks a {question} question about no shape")
    m = mentions[0]
    found = [i for i, s in enumerate(scene.shapes) if _compatible(m, s) and (not m.positions or s.position
                                                                             in m.positions)]
    if len(found) != 1:
        raise ValueError(f"prompt {text!r} names {len(found)} shapes of scene {scene.key()!r}, not one")
    return Prompt(question, text, target=found[0])


# ---------------------------------------------------------------------------
# Responses in quality tiers

POSITION_PHRASES = {"left": ("on the left", "on the left side"), "center": ("in the center", "in the middle"),
                    "right": ("on the right", "on the right side")}
ROBOTIC_PREFIXES = ("Certainly! ", "Based on the image provided, ", "After careful analysis of the image, ",
                    "Thank you for your question. ", "Great question! ")
ROBOTIC_SUFFIXES = (" I hope this helps!", " Let me know if you have any other questions.",
                    " Please let me know if you need anything else.", " I hope this answer is helpful.")


class _Writer:
    """Phrase helpers drawing their variations from one rng."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def pos(self, position: str) -> str:
        return self.pick(POSITION_PHRASES[position])

    def noun(self, s: Shape, size: str | None = None, color: str | None = None, position: str | None = None) -> str:
        """"a red circle on the left"; size shown a quarter of the time (always when overridden)."""
        size = size or (s.size if self.rng.random() < 0.25 else None)
        return _a(" ".join(w for w in (size, color or s.color, s.kind, self.pos(position or s.position)) if w))

    def number(self, n: int) -> str:
        return str(n) if self.rng.random() < 0.3 else NUMBER_WORDS[n]

    def robotic(self, core: str) -> str:
        prefix = self.pick(ROBOTIC_PREFIXES)
        core = _cap(core) if prefix.endswith((". ", "! ")) else core
        return prefix + core + self.pick(ROBOTIC_SUFFIXES)

    def absent_color(self, scene: Scene) -> str:
        return self.pick([c for c in COLORS if c not in {s.color for s in scene.shapes}])

    def absent_kind(self, scene: Scene) -> str:
        return self.pick([k for k in KINDS if k not in {s.kind for s in scene.shapes}])

    def other_position(self, s: Shape) -> str:
        return self.pick([p for p in POSITIONS if p != s.position])


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _other_size(s: Shape) -> str:
    return SIZES[1 - SIZES.index(s.size)]


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else noun + "s"


def _describe(scene: Scene, w: _Writer) -> dict[str, str]:
    shapes, n = scene.shapes, len(scene.shapes)
    items = _listing([w.noun(s) for s in shapes])
    good = [f"{_cap(items)}.", f"There is {items}.", f"The image shows {items}.", f"I see {items}."]
    if n > 1:
        good.append(f"{_cap(w.number(n))} shapes: {items}.")
    listed = " ".join(f"There is {w.noun(s)} of the image." for s in shapes)
    robotic = [f"the image contains the following shapes: {items}. The total number of shapes in the image is "
               f"{n}.", f"I can see that there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} "
               f"{_plural(n, 'shape')} in the image. {listed}"]
    j = int(w.rng.integers(n))
    wrong_position = [w.noun(s, position=w.other_position(s) if i == j else None) for i, s in enumerate(shapes)]
    wrong_size = [w.noun(s, size=_other_size(s) if i == j else None) for i, s in enumerate(shapes)]
    partial = [f"{_cap(_listing(wrong_position))}.", f"There is {_listing(wrong_size)}."]
    if n > 1:  # one shape left out
        partial.append(f"There is {_listing([w.noun(s) for i, s in enumerate(shapes) if i != j])}.")
    extra = _a(f"{w.absent_color(scene)} {w.absent_kind(scene)} {w.pos(w.pick(POSITIONS))}")
    recolored = [w.noun(s, color=w.absent_color(scene) if i == j else None) for i, s in enumerate(shapes)]
    hallucinated = [f"{_cap(_listing([w.noun(s) for s in shapes] + [extra]))}.",
                    f"There is {_listing(recolored)}."]
    return {"good": w.pick(good), "robotic": w.robotic(w.pick(robotic)), "partial": w.pick(partial),
            "hallucinated": w.pick(hallucinated)}


def _color(scene: Scene, p: Prompt, w: _Writer) -> dict[str, str]:
    s = scene.shapes[p.target]
    ref = _color_ref(scene, p.target)
    good = [f"{_cap(s.color)}.", f"It is {s.color}.", f"The {ref} is {s.color}.", f"It's {s.color}."]
    robotic = [f"the color of the {ref} in the image is {s.color}. The {s.kind} is {s.color} in color.",
               f"after analyzing the {ref}, I can confirm that its color is {s.color}."]
    partial = [f"It is {_a(_other_size(s))} {s.color} {s.kind}."]
    if ref == s.kind:  # right color, wrong column
        partial.append(f"The {s.kind} {w.pos(w.other_position(s))} is {s.color}.")
    absent = w.absent_color(scene)
    hallucinated = [f"It is {absent}.", f"The {ref} is {absent}.",
                    f"{_cap(s.color)}, next to {_a(w.absent_color(scene))} {w.absent_kind(scene)}."]
    return {"good": w.pick(good), "robotic": w.robotic(w.pick(robotic)), "partial": w.pick(partial),
            "hallucinated": w.pick(hallucinated)}


def _count(scene: Scene, p: Prompt, w: _Writer) -> dict[str, str]:
    counted = [s for s in scene.shapes if p.count_kind in (None, s.kind)]
    n, noun = len(counted), p.count_kind or "shape"
    num = w.number(n)
    good = [f"{_cap(num)}.", f"There {'is' if n == 1 else 'are'} {num} {_plural(n, noun)}.",
            f"I count {num} {_plural(n, noun)}."]
    robotic = [f"after counting all of the {noun}s in the image, the total number of {noun}s is {n}. There "
               f"{'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {_plural(n, noun)} in total."]
    j = int(w.rng.integers(n))
    wrong = [w.noun(s, position=w.other_position(s) if i == j else None) for i, s in enumerate(counted)]
    smaller = [w.noun(s, size=_other_size(s) if i == j else None) for i, s in enumerate(counted)]
    partial = [f"{_cap(num)}: {_listing(wrong)}.", f"{_cap(num)}: {_listing(smaller)}."]
    extra = _a(f"{w.absent_color(scene)} {p.count_kind or w.absent_kind(scene)}")
    hallucinated = [f"There are {w.number(n + 1)} {noun}s: {_listing([w.noun(s) for s in counted] + [extra])}.",
                    f"{_cap(w.number(n + 1))}, including {extra}."]
    return {"good": w.pick(good), "robotic": w.robotic(w.pick(robotic)), "partial": w.pick(partial),
            "hallucinated": w.pick(hallucinated)}


def _locate(scene: Scene, p: Prompt, w: _Writer) -> dict[str, str]:
    s = scene.shapes[p.target]
    where = w.pos(s.position)
    good = [f"{_cap(where)}.", f"It is {where}.", f"The {s.color} {s.kind} is {where}.", f"It's {where}."]
    robotic = [f"the {s.color} {s.kind} is located {where} of the image. Its position in the image is {where}.",
               f"after analyzing the position of the {s.color} {s.kind}, I can confirm that it is located "
               f"{where}."]
    partial = [f"{_cap(where)} or {w.pos(w.other_position(s))}.",
               f"The {_other_size(s)} {s.color} {s.kind} is {where}."]
    extra = _a(f"{w.absent_color(scene)} {w.absent_kind(scene)}")
    hallucinated = [f"It is {w.pos(w.other_position(s))}, next to {extra}.",
                    f"{_cap(where)}, next to {extra}."]
    return {"good": w.pick(good), "robotic": w.robotic(w.pick(robotic)), "partial": w.pick(partial),
            "hallucinated": w.pick(hallucinated)}


_RESPONDERS = {"describe": lambda scene, p, w: _describe(scene, w), "color": _color, "count": _count,
               "locate": _locate}


def scene_listing(scene: Scene) -> str:
    """Every shape left to right, in one fixed phrasing: "A red circle on the left and a blue star in the
    center." (the short describe question's answer)."""
    return _cap(_listing([_a(f"{t.color} {t.kind} {POSITION_PHRASES[t.position][0]}") for t in scene.shapes])) + "."


def grounded_answer(scene: Scene) -> str:
    """The answer to a color or locate question that lists the scene (scene_listing: "A red circle on the
    left and a blue star in the center."): it answers either without finding the shape the question names
    first, in the phrasing the decoder's pretraining taught it to read the scene in (no sizes, which it
    reads worst). The judge scores it like any answer: 1.0 for one shape, 0.94-1.0 for two, 0.88-0.94 for
    three (0.01 a word over the budget of 12)."""
    return scene_listing(scene)


def names_every_shape(scene: Scene | str, text: str) -> bool:
    """Does `text` name each shape of a scene with two or three by its kind and color (a grounded_answer,
    or any listing)? False for one-shape scenes, where every answer names the one shape."""
    scene = _scene(scene) if isinstance(scene, str) else scene
    named = {(m.kind, m.color) for m in parse_claims(text).mentions}
    return len(scene.shapes) > 1 and all((s.kind, s.color) in named for s in scene.shapes)


def responses(scene: Scene, prompt: Prompt | str, rng: np.random.Generator) -> dict[str, str]:
    """One response per tier (TIERS) to `prompt` about `scene`; templates and wording vary with rng."""
    prompt = parse_prompt(scene, prompt) if isinstance(prompt, str) else prompt
    return _RESPONDERS[prompt.question](scene, prompt, _Writer(rng))


# ---------------------------------------------------------------------------
# Parsing free text

GENERIC = "*"  # the kind of a mention that names no kind ("shape", "object", "the red one")
KIND_WORDS = {**{k: k for k in KINDS}, "ball": "circle", "dot": "circle", "disc": "circle", "disk": "circle",
              "oval": "circle", "ellipse": "circle", "ring": "circle", "box": "square", "rectangle": "square",
              "block": "square", "cube": "square", "pyramid": "triangle", "pentagram": "star",
              "shape": GENERIC, "object": GENERIC, "figure": GENERIC, "item": GENERIC, "thing": GENERIC}
OTHER_KINDS = {"hexagon", "pentagon", "octagon", "diamond", "heart", "cross", "arrow", "moon", "crescent",
               "rhombus", "cylinder", "cone", "trapezoid", "parallelogram"}
COLOR_WORDS = {**{c: c for c in COLORS}, "crimson": "red", "scarlet": "red", "violet": "purple",
               "lime": "green", "navy": "blue", "gold": "yellow", "golden": "yellow"}
OTHER_COLORS = {"grey", "gray", "black", "white", "pink", "brown", "cyan", "teal", "magenta", "silver", "beige",
                "turquoise"}
POSITION_WORDS = {"left": "left", "leftmost": "left", "right": "right", "rightmost": "right", "center": "center",
                  "centre": "center", "middle": "center", "central": "center"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
              "huge": "large"}
NUMBERS = {**{w: i for i, w in enumerate(NUMBER_WORDS)}, "single": 1}
DETERMINERS = {"the", "this", "that", "which", "each", "other", "another", "every"}
NEGATIONS = {"no", "not", "without", "neither", "nor", "none", "never", "isn", "aren"}
CLAUSE_BREAKS = {"and", "but", "while", "whereas", "with", "next", "beside", "besides", "near", "plus", "also",
                 "then", "above", "below", "between", "alongside", "like"}
BACKDROP = {"background", "backdrop", "image", "picture", "canvas"}  # "a white background" is no claim
PUNCTUATION = set(".,;:!?")


@dataclasses.dataclass
class Mention:
    """A shape named in text: kind (or GENERIC) and the attributes said about it."""

    kind: str
    color: str | None = None  # a key of COLORS, or an OTHER_COLORS word
    size: str | None = None
    number: int | None = None  # "two circles": a count claim
    positions: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Claims:
    """Everything a text asserts: mentions, plus attributes said of no named shape ("It is red.")."""

    mentions: list[Mention]
    colors: list[str]
    positions: list[str]
    numbers: list[int]
    kinds_invented: set[str]  # OTHER_KINDS words used


def _words(text: str) -> list[str]:
    text = text.lower().replace("colour", "color")
    return re.findall(r"[a-z]+|\d+|[.,;:!?]", text)


def _singular(word: str) -> str:
    for cut in (0, 1, 2):
        base = word[:-cut] if cut else word
        if cut and not word.endswith("es" if cut == 2 else "s"):
            continue
        if base in KIND_WORDS or base in OTHER_KINDS or base == "one":
            return base
    return word


def _clauses(words: list[str]) -> list[list[str]]:
    """Splits at punctuation and connectives; a negation drops the rest of its clause."""
    clauses, current, negated = [], [], False
    for word in words:
        if word in PUNCTUATION or word in CLAUSE_BREAKS:
            clauses.append(current)
            current, negated = [], False
        elif word in NEGATIONS:
            negated = True
        elif not negated:
            current.append(word)
    clauses.append(current)
    return [c for c in clauses if c]


def _parse_clause(words: list[str]) -> tuple[list[Mention], list[str], list[str], list[int]]:
    """(mentions, loose colors, loose positions, loose numbers) of one clause.

    Adjectives (color, size, number) attach to the next noun ("one" after an adjective or a
    determiner is a noun: "the red one"); a position to the previous mention
    (else the next one); a lone color after a single colorless mention is its predicate ("the
    circle is red"). Positions followed by "of <shape>" are relative and ignored.
    """
    mentions, spans, colors, positions = [], [], [], []
    color = size = number = None
    backdrop = bool({"background", "backdrop"} & set(words))  # "the background is white" is no claim
    for i, word in enumerate(words):
        nxt = words[i + 1:i + 3]
        noun = _singular(word)
        pronoun = bool(color or size) or (i > 0 and words[i - 1] in DETERMINERS)  # "the red one", "the one"
        if word in COLOR_WORDS or word in OTHER_COLORS:
            if not backdrop and not (nxt and nxt[0] in BACKDROP):
                if color is not None:
                    colors.append(color)
                color = COLOR_WORDS.get(word, word)
        elif word in SIZE_WORDS:
            size = SIZE_WORDS[word]
        elif word in NUMBERS and not (noun == "one" and pronoun) or word.isdigit():
            if nxt[:1] != ["of"]:  # "one of the shapes" counts nothing
                number = NUMBERS[word] if word in NUMBERS else int(word)
        elif word in POSITION_WORDS:
            relative = nxt[:1] == ["of"] and not (set(words[i + 2:i + 4]) & BACKDROP)
            if not relative:
                positions.append((i, POSITION_WORDS[word]))
        elif noun in KIND_WORDS or noun in OTHER_KINDS or (noun == "one" and pronoun):
            kind = GENERIC if noun == "one" else KIND_WORDS.get(noun, noun)
            mentions.append(Mention(kind, color, size, number))
            spans.append(i)
            color = size = number = None
    if color is not None:
        colors.append(color)
    if colors and len(mentions) == 1 and mentions[0].color is None:
        mentions[0].color = colors.pop(0)
    loose_positions = []
    for i, position in positions:
        before = [m for m, j in zip(mentions, spans) if j < i]
        if before or mentions:
            (before or mentions)[-1 if before else 0].positions.append(position)
        else:
            loose_positions.append(position)
    return mentions, colors, loose_positions, [] if number is None else [number]


def parse_claims(text: str) -> Claims:
    """The claims a free-text response makes (see docs/SHAPES.md, "The judge")."""
    claims = Claims([], [], [], [], set())
    for clause in _clauses(_words(text)):
        mentions, colors, positions, numbers = _parse_clause(clause)
        claims.kinds_invented |= {m.kind for m in mentions if m.kind in OTHER_KINDS}
        claims.mentions += [m for m in mentions if m.kind not in OTHER_KINDS]
        claims.colors += colors
        claims.positions += positions
        claims.numbers += numbers
    return claims


# ---------------------------------------------------------------------------
# The judge

INVENTED_PENALTY = 0.6  # per distinct kind or color word absent from the scene
WRONG_PENALTY = 0.5  # per distinct false claim about things that are in the scene
STYLE_CAP = 0.4  # length, filler, trigram repetition and unknown words together take at most this much
STUTTER_PENALTY = 0.25  # per repeated sentence or immediately repeated word ("red red")
FILLER = re.compile(r"\b(i hope|let me know|based on|certainly|of course|thank you|great question|careful|"
                    r"analy[sz]|in summary|in conclusion|to summarize|i can confirm|please|as an ai|feel free|"
                    r"happy to help|provided|as follows|the following)\b")


def _compatible(m: Mention, s: Shape) -> bool:
    """Whether mention m can refer to shape s (position aside)."""
    return m.kind in (GENERIC, s.kind) and m.color in (None, s.color) and m.size in (None, s.size)


def _refers(m: Mention, s: Shape, scene: Scene) -> bool:
    """Whether m is about s: same kind and color where stated, and its positions don't point at
    another such shape (a wrong size or position is a false claim about s, not another shape)."""
    same = lambda t: m.kind in (GENERIC, t.kind) and m.color in (None, t.color)  # noqa: E731
    if not same(s):
        return False
    if not m.positions or s.position in m.positions:
        return True
    return not any(same(t) and t.position in m.positions for t in scene.shapes if t is not s)


def _mention_errors(m: Mention, scene: Scene) -> tuple[set[str], set[str]]:
    """(invented words, false claims) of one mention."""
    kinds, colors = {s.kind for s in scene.shapes}, {s.color for s in scene.shapes}
    invented = ({m.kind} - kinds - {GENERIC}) | ({m.color} - colors - {None})
    if invented:
        return invented, set()
    matching = [s for s in scene.shapes if _compatible(m, s)]
    desc = f"{m.size or ''} {m.color or ''} {m.kind}"
    if not matching:
        return set(), {f"no {desc}"}
    wrong = {f"{desc} {p}" for p in m.positions if all(s.position != p for s in matching)}
    if m.number is not None and m.number != len(matching):
        wrong.add(f"{m.number} x {desc}")
    return set(), wrong


def _style_penalty(words: list[str], budget: int) -> float:
    """Length over budget, filler phrases, repeated word trigrams, unknown words (capped at STYLE_CAP),
    plus STUTTER_PENALTY per repeated sentence or immediately repeated word (uncapped)."""
    tokens = [w for w in words if w not in PUNCTUATION]
    length = 0.01 * max(0, len(tokens) - budget)
    filler = 0.1 * len(set(FILLER.findall(" ".join(tokens))))
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    repeats = 0.05 * (len(trigrams) - len(set(trigrams)))
    unknown = 0.1 * sum(w not in LEXICON and not w.isdigit() for w in tokens)
    style = min(STYLE_CAP, min(length, 0.2) + min(filler, 0.2) + min(repeats, 0.2) + min(unknown, 0.3))
    sentences = [s.split() for s in re.split(r"[.!?]", " ".join(words)) if s.split()]
    stutter = (len(sentences) - len({tuple(s) for s in sentences})) + sum(a == b for a, b in zip(tokens, tokens[1:]))
    return style + STUTTER_PENALTY * stutter


@functools.lru_cache(maxsize=4096)
def _scene(scene_json: str) -> Scene:
    return Scene.from_json(scene_json)


@functools.lru_cache(maxsize=4096)
def _prompt(scene: Scene, text: str) -> Prompt:
    return parse_prompt(scene, text)


def judge(scene: Scene | str, prompt: Prompt | str, response: str) -> float:
    """The gold score of `response` to `prompt` about `scene` (a Scene or its JSON), in [0, 1].

    score = clip(answer - 0.6 * invented - 0.5 * false - style, 0, 1), where answer in [0, 1] is
    how well the question is answered, invented counts distinct kind/color words absent from
    the scene, false counts distinct false claims about what is there, and style penalises
    length over budget, filler phrases, repeated trigrams and unknown words (at most 0.4 together)
    and, 0.25 each, repeated sentences and words. Deterministic; see docs/SHAPES.md.
    """
    scene = _scene(scene) if isinstance(scene, str) else scene
    prompt = _prompt(scene, prompt.strip()) if isinstance(prompt, str) else prompt
    words = _words(response)
    if not any(w not in PUNCTUATION for w in words):
        return 0.0
    claims = parse_claims(response)
    invented, wrong = set(claims.kinds_invented), set()
    for m in claims.mentions:
        i, f = _mention_errors(m, scene)
        invented |= i
        wrong |= f
    colors = {s.color for s in scene.shapes}
    invented |= set(claims.colors) - colors

    answer, budget = 0.0, 12
    if prompt.question == "describe":
        budget = 6 + 8 * len(scene.shapes)
        answer = float(np.mean([max([_credit(m, s) for m in claims.mentions if _refers(m, s, scene)], default=0.0)
                                for s in scene.shapes]))
        wrong |= {f"{n} shapes" for n in claims.numbers if n != len(scene.shapes)}
    elif prompt.question == "count":
        n = sum(prompt.count_kind in (None, s.kind) for s in scene.shapes)
        said = claims.numbers + [m.number for m in claims.mentions if m.number is not None
                                 and m.kind == (prompt.count_kind or GENERIC)]
        answer = float(n in said)
        wrong |= {f"{k} counted" for k in claims.numbers if k != n}
    else:
        target = scene.shapes[prompt.target]
        about = [m for m in claims.mentions if _refers(m, target, scene)]
        if prompt.question == "color":
            said = claims.colors + [m.color for m in about if m.color]
            answer = float(target.color in said)
            wrong |= {f"colored {c}" for c in claims.colors if c != target.color and c in colors}
        else:
            said = claims.positions + [p for m in about for p in m.positions]
            answer = float(target.position in said)
            wrong |= {f"at {p}" for p in claims.positions if p != target.position}
    score = answer - INVENTED_PENALTY * len(invented) - WRONG_PENALTY * len(wrong) - _style_penalty(words, budget)
    return float(min(1.0, max(0.0, score)))


def _credit(m: Mention, s: Shape) -> float:
    """How much of shape s mention m gets right: kind 0.5, color 0.3, position 0.2."""
    return 0.5 * (m.kind == s.kind) + 0.3 * (m.color == s.color) + 0.2 * (s.position in m.positions)


def _template_words() -> set[str]:
    texts = [t for ts in PROMPT_TEMPLATES.values() for t in ts]
    texts += [p for ps in POSITION_PHRASES.values() for p in ps] + list(ROBOTIC_PREFIXES + ROBOTIC_SUFFIXES)
    return {w for t in texts for w in _words(re.sub(r"\{\w+\}", " ", t))}


COMMON_WORDS = set("""a an the it its s t is are was were be there here this that these those of in on at to from
by for as i you we see can count counted counting shows show showing contains contain has have one ones both only
just or some all any total image picture photo scene side sides top bottom upper lower corner hand half part area
located location placed positioned sits sitting appears looks color colored shape shapes which what where how
many answer including together first second third number position positions following confirm analyzing
analysing light dark bright pale""".split())
LEXICON = (COMMON_WORDS | set(KIND_WORDS) | OTHER_KINDS | set(COLOR_WORDS) | OTHER_COLORS | set(POSITION_WORDS)
           | set(SIZE_WORDS) | set(NUMBERS) | DETERMINERS | NEGATIONS | CLAUSE_BREAKS | BACKDROP | _template_words()
           | {w + "s" for w in KIND_WORDS} | {w + "es" for w in KIND_WORDS} | {w + "s" for w in OTHER_KINDS})


# ---------------------------------------------------------------------------
# Datasets in TRL's schema

# Short single-fact questions: answers of a few words, each with one fact read off the image, in
# which the fact is a single token. Mixed into SFT data (generate_split's short_fraction), they teach
# the decoder to look up a shape's attributes in the image tokens far sooner than the task's long,
# varied answers do (docs/TRAINING.md); the "Quick question:" lead keeps them apart from the task's
# own prompts, whose tier mix they leave alone.
SHORT_LEAD = "Quick question: "
SHORT_TEMPLATES = {
    "color_at": "what color is the shape {where}?",
    "kind_at": "which shape is {where}?",
    "size_at": "is the shape {where} small or large?",
    "color_of": "what color is the {ref}?",
    "where_is": "where is the {color} {kind}?",
    "count": "how many shapes are there?",
    "describe": "what shapes are in the image?",
}
# How often each kind is asked, relative to the others. The two lookups of a shape named by its kind
# and color ("where is the red circle?", "what color is the star?") weigh 3: with two or three shapes
# they are the slowest reads to learn (a decoder pretrained on the kinds equally often answered them
# at or near chance, docs/TRAINING.md), and the task's color and locate prompts (half of them) need them.
SHORT_WEIGHTS = {"color_at": 1, "kind_at": 1, "size_at": 1, "color_of": 3, "where_is": 3, "count": 1, "describe": 1}


def short_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, completion): one question of SHORT_TEMPLATES (drawn by SHORT_WEIGHTS) about `scene` and
    its short answer ("It is red.", "A circle.", "It is small.", "On the left.", "I count two.", and for
    "describe" every shape left to right: "A red circle on the left and a blue star in the center.")."""
    weights = np.array([SHORT_WEIGHTS[k] for k in SHORT_TEMPLATES], float)
    kind = tuple(SHORT_TEMPLATES)[int(rng.choice(len(weights), p=weights / weights.sum()))]
    i = int(rng.integers(len(scene.shapes)))
    s = scene.shapes[i]
    where = POSITION_PHRASES[s.position][0]
    prompt = (SHORT_LEAD + SHORT_TEMPLATES[kind]).format(where=where, ref=_color_ref(scene, i), color=s.color,
                                                         kind=s.kind)
    answer = {"color_at": f"It is {s.color}.", "kind_at": f"A {s.kind}.", "size_at": f"It is {s.size}.",
              "color_of": f"It is {s.color}.", "where_is": f"{_cap(where)}.",
              "count": f"I count {NUMBER_WORDS[len(scene.shapes)]}.",
              "describe": scene_listing(scene)}[kind]
    return prompt, answer


_SHORT_PATTERNS = {k: re.compile(re.escape(SHORT_LEAD + t).replace(r"\{", "{").replace(r"\}", "}")
                                 .replace("{where}", ".+").replace("{ref}", ".+").replace("{color}", "\\w+")
                                 .replace("{kind}", "\\w+"))
                   for k, t in SHORT_TEMPLATES.items()}


def short_question_kind(prompt: str) -> str | None:
    """The SHORT_TEMPLATES key of a short question's text ("Quick question: where is the red circle?" ->
    "where_is"), or None for any other prompt. "What color is the shape on the left?" is color_at, not
    color_of (no kind is called "shape")."""
    return next((k for k, pattern in _SHORT_PATTERNS.items() if pattern.fullmatch(prompt)), None)


PAIR_TIERS = [(a, b) for i, a in enumerate(TIERS) for b in TIERS[i + 1:]]  # 6 pairs, easy and hard


def _with_shape(scene: Scene, i: int, **changes) -> tuple[Scene, int] | None:
    """`scene` with shape i changed (re-sorted by column; a shape already in the new column takes shape
    i's old one) and shape i's new index; None when the result is not a valid scene."""
    shapes = list(scene.shapes)
    new = dataclasses.replace(shapes[i], **changes)
    if "position" in changes:
        shapes = [dataclasses.replace(t, position=shapes[i].position) if t.position == new.position else t
                  for t in shapes]
    shapes[i] = new
    order = sorted(range(len(shapes)), key=lambda j: POSITIONS.index(shapes[j].position))
    try:
        return Scene(tuple(shapes[j] for j in order)), order.index(i)
    except ValueError:
        return None


def _wrong_fact(scene: Scene, prompt: Prompt, rng: np.random.Generator) -> tuple[Scene, Prompt] | None:
    """A scene that differs from `scene` in the one fact `prompt` asks about (its target's color or
    column; for a count, one shape more or fewer; for a description, one shape's color), the wrong value
    taken from another shape where the scene has one; with the prompt's target re-indexed."""
    n = len(scene.shapes)
    if prompt.question == "count":
        free = [p for p in POSITIONS if p not in {t.position for t in scene.shapes}]
        counted = [j for j, t in enumerate(scene.shapes) if prompt.count_kind in (None, t.kind)]
        if free and (len(counted) == 1 or rng.random() < 0.5):  # one more shape of the counted kind
            kind = prompt.count_kind or KINDS[int(rng.integers(len(KINDS)))]
            colors = [c for c in COLORS if (kind, c) not in {(t.kind, t.color) for t in scene.shapes}]
            extra = Shape(kind, colors[int(rng.integers(len(colors)))], free[int(rng.integers(len(free)))],
                          SIZES[int(rng.integers(len(SIZES)))])
            shapes = sorted(scene.shapes + (extra,), key=lambda t: POSITIONS.index(t.position))
            return Scene(tuple(shapes)), prompt
        if len(counted) < 2:
            return None
        drop = counted[int(rng.integers(len(counted)))]  # one fewer (at least one stays)
        return Scene(tuple(t for j, t in enumerate(scene.shapes) if j != drop)), prompt
    i = prompt.target if prompt.question in ("color", "locate") else int(rng.integers(n))
    if prompt.question == "locate":
        others = [t.position for t in scene.shapes if t.position != scene.shapes[i].position]
        options = others or [p for p in POSITIONS if p != scene.shapes[i].position]
        changed = _with_shape(scene, i, position=options[int(rng.integers(len(options)))])
    else:  # color, describe
        t = scene.shapes[i]
        taken = {u.color for u in scene.shapes if u.kind == t.kind}
        others = [u.color for u in scene.shapes if u.color not in taken]
        options = others or [c for c in COLORS if c not in taken]
        changed = _with_shape(scene, i, color=options[int(rng.integers(len(options)))])
    if changed is None:
        return None
    wrong, j = changed
    return wrong, dataclasses.replace(prompt, target=j if prompt.target is not None else None)


def corrected_pair(scene: Scene, prompt: Prompt, rng: np.random.Generator) -> tuple[str, str] | None:
    """(chosen, rejected): the good-tier answer and the same answer, in the same words, with the one fact
    the prompt asks about wrong (`_wrong_fact`): RLHF-V's fine-grained corrections, pairs that only
    the image can tell apart. None when no such edit exists or the judge does not score it lower."""
    changed = _wrong_fact(scene, prompt, rng)
    if changed is None:
        return None
    seed = int(rng.integers(2 ** 31))  # the same draws for both answers: the same template and words
    right = responses(scene, prompt, np.random.default_rng(seed))["good"]
    wrong = responses(*changed, np.random.default_rng(seed))["good"]
    if right == wrong or judge(scene, prompt, wrong) >= judge(scene, prompt, right):
        return None
    return right, wrong


def _image_column(scene: Scene, image_size: int) -> list[dict]:
    return [{"bytes": encode_png(render(scene, image_size)), "path": None}]


def generate_split(kind: str, num: int, seed: int, image_size: int = 64, label_noise: float = 0.1,
                   split: str = "train", short_fraction: float = 0.0,
                   corrected_fraction: float = 0.0, grounded_fraction: float = 0.0) -> Iterator[dict]:
    """`num` rows of one dataset in TRL's schema (plain-text prompts), deterministic for (kind, seed, split).

    kind "preference": images, prompt, chosen, rejected, scene. The pair's tiers are drawn
      uniformly from PAIR_TIERS (resampled until the judge scores them differently); chosen is the
      higher-scored one, then chosen/rejected are swapped with probability label_noise. With
      corrected_fraction > 0, that fraction of the pairs (in expectation) is a correction instead
      (corrected_pair: the good answer over itself with the asked fact wrong), noised the same way.
    kind "prompt": images, prompt, scene (for PPO/GRPO).
    kind "sft": images, prompt, completion, scene; the completion's tier is uniform over TIERS. With
      short_fraction > 0, that fraction of the rows (in expectation) is a short_question instead.
      With grounded_fraction > 0, that fraction of the good-tier answers to color and locate questions
      (in expectation) is a grounded_answer instead: the scene listed shape by shape.
    kind "short": images, prompt, completion, scene; every row a short_question (the data of the
      demo's decoder pretraining stage, jaxpref/tasks/shapes/configs/pretrain.yaml).
    Train and eval scenes never share content (scene_split). `images` is [{"bytes": PNG, "path": None}].
    """
    if kind not in GENERATED_KINDS:
        raise ValueError(f"kind must be one of {GENERATED_KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if not 0 <= label_noise <= 1:
        raise ValueError(f"label_noise must lie in [0, 1], got {label_noise}")
    if not 0 <= short_fraction <= 1 or (short_fraction and kind != "sft"):
        raise ValueError(f"short_fraction must lie in [0, 1] and is for kind 'sft' only, got {short_fraction} "
                         f"for kind {kind!r}")
    if not 0 <= corrected_fraction <= 1 or (corrected_fraction and kind != "preference"):
        raise ValueError(f"corrected_fraction must lie in [0, 1] and is for kind 'preference' only, got "
                         f"{corrected_fraction} for kind {kind!r}")
    if not 0 <= grounded_fraction <= 1 or (grounded_fraction and kind != "sft"):
        raise ValueError(f"grounded_fraction must lie in [0, 1] and is for kind 'sft' only, got {grounded_fraction} "
                         f"for kind {kind!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), GENERATED_KINDS.index(kind)])
    # separate streams, so that short_fraction=0 (corrected_fraction=0, grounded_fraction=0) writes exactly the
    # rows it always has
    short_rng = np.random.default_rng([seed, SPLITS.index(split), GENERATED_KINDS.index(kind), 1])
    grounded_rng = np.random.default_rng([seed, SPLITS.index(split), GENERATED_KINDS.index(kind), 2])
    for _ in range(num):
        scene = sample_scene(rng, split)
        if kind == "short":
            question, answer = short_question(scene, rng)
            row = {"images": _image_column(scene, image_size), "prompt": question, "completion": answer}
        else:
            prompt = sample_prompt(scene, rng)
            row = {"images": _image_column(scene, image_size), "prompt": prompt.text}
        if kind == "sft":  # drawn for every row, so that the main stream and the other rows stay the same
            tier = TIERS[int(rng.integers(len(TIERS)))]
            row["completion"] = responses(scene, prompt, rng)[tier]
            if (grounded_fraction and tier == "good" and prompt.question in ("color", "locate")
                    and grounded_rng.random() < grounded_fraction):
                row["completion"] = grounded_answer(scene)
            if short_fraction and short_rng.random() < short_fraction:
                row["prompt"], row["completion"] = short_question(scene, short_rng)
        elif kind == "preference":
            while True:
                tiers = PAIR_TIERS[int(rng.integers(len(PAIR_TIERS)))]
                texts = responses(scene, prompt, rng)
                (sa, a), (sb, b) = sorted(((judge(scene, prompt, texts[t]), texts[t]) for t in tiers), reverse=True)
                if sa != sb:
                    break
            if corrected_fraction and short_rng.random() < corrected_fraction:
                a, b = corrected_pair(scene, prompt, short_rng) or (a, b)
            row["chosen"], row["rejected"] = (b, a) if rng.random() < label_noise else (a, b)
        row["scene"] = scene.to_json()
        yield row
