"""`jaxpref data shapes`: the built-in task's datasets in TRL's schema (parquet or array_record).

    jaxpref data shapes --out DIR [--num-train N] [--num-eval N] [--num-shards K]
                        [--format parquet|array_record] [--image-size 64] [--label-noise 0.1]
                        [--sft-short-fraction 0.3] [--corrected-fraction 0.5]
                        [--sft-grounded-fraction 0.5] [--seed 0]
"""

from __future__ import annotations

import os
import shlex
import sys

import datasets
from tqdm import tqdm

from jaxpref.data.writers import write_shards
from jaxpref.tasks.shapes.scenes import generate_split

KINDS = ("preference", "prompt", "sft", "short")
SHORT_FRACTION = 0.3  # of the sft train rows: short_question rows (see jaxpref.tasks.shapes.scenes)
CORRECTED_FRACTION = 0.5  # of the preference train pairs: corrections (jaxpref.tasks.shapes.scenes.corrected_pair)
GROUNDED_FRACTION = 0.5  # of the sft train rows' good answers to color/locate questions: scene listings


def add_shapes_data_parser(data_subparsers):
    """Registers `shapes` under `jaxpref data`'s subparsers (jaxpref.data.cli.add_data_parser's result)."""
    sub = data_subparsers
    s = sub.add_parser("shapes", help="write the shapes task's preference, prompt, sft and short datasets (TRL schema)")
    s.add_argument("--out", required=True, help="output directory; gets {preference,prompt,sft,short}/ and README.md")
    s.add_argument("--num-train", type=int, default=5000, help="train rows per dataset (default: 5000)")
    s.add_argument("--num-eval", type=int, default=500, help="eval rows per dataset (default: 500)")
    s.add_argument("--num-shards", type=int, default=4, help="shards per split, at most one per row (default: 4)")
    s.add_argument("--format", choices=("parquet", "array_record"), default="parquet",
                   help="parquet (datasets) or array_record (a TFDS directory) (default: parquet)")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    s.add_argument("--label-noise", type=float, default=0.1,
                   help="fraction of preference pairs whose chosen/rejected are swapped (default: 0.1)")
    s.add_argument("--sft-short-fraction", type=float, default=SHORT_FRACTION,
                   help="fraction of the sft train rows that are short questions about the image ('Quick "
                        "question: what color is the shape on the left?' -> 'It is red.'), which teach the model "
                        f"to read it; the eval split has none (default: {SHORT_FRACTION})")
    s.add_argument("--corrected-fraction", type=float, default=CORRECTED_FRACTION,
                   help="fraction of the preference train pairs that are corrections: the good answer over "
                        "the same words with the asked fact wrong ('It is red.' over 'It is blue.'), pairs only "
                        f"the image can tell apart; the eval split has none (default: {CORRECTED_FRACTION})")
    s.add_argument("--sft-grounded-fraction", type=float, default=GROUNDED_FRACTION,
                   help="fraction of the sft train rows' good answers to color and locate questions that list "
                        "the scene instead ('Where is the red circle?' -> 'A red circle on the left and a blue "
                        "star in the center.'), answers that need no lookup of the named shape; the eval "
                        f"split has none (default: {GROUNDED_FRACTION})")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.set_defaults(func=run_shapes)




def run_shapes(args) -> int:
    for name, value in (("--num-train", args.num_train), ("--num-eval", args.num_eval)):
        if value < 0:
            print(f"jaxpref data shapes: {name} must be >= 0, got {value}", file=sys.stderr)
            return 2
    if args.num_shards < 1:
        print(f"jaxpref data shapes: --num-shards must be >= 1, got {args.num_shards}", file=sys.stderr)
        return 2
    for name, value in (("--sft-short-fraction", args.sft_short_fraction),
                        ("--corrected-fraction", args.corrected_fraction),
                        ("--sft-grounded-fraction", args.sft_grounded_fraction)):
        if not 0 <= value <= 1:
            print(f"jaxpref data shapes: {name} must lie in [0, 1], got {value}", file=sys.stderr)
            return 2
    splits = [(split, n) for split, n in (("train", args.num_train), ("eval", args.num_eval)) if n]
    if not splits:
        print("jaxpref data shapes: --num-train and --num-eval are both 0: nothing to write", file=sys.stderr)
        return 2
    cards = write_shapes(args.out, {kind: splits for kind in KINDS}, seed=args.seed, image_size=args.image_size,
                         label_noise=args.label_noise, num_shards=args.num_shards, format=args.format,
                         command=shapes_command(args), sft_short_fraction=args.sft_short_fraction,
                         corrected_fraction=args.corrected_fraction,
                         sft_grounded_fraction=args.sft_grounded_fraction)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(shapes_card(args, cards))
    for kind, card in cards.items():
        counts = ", ".join(f"{s} {v['num_rows']}" for s, v in card["splits"].items())
        print(f"wrote {os.path.join(args.out, kind)}: {counts} rows ({args.format})")
    return 0


def write_shapes(out: str, splits: dict, *, seed: int, image_size: int, label_noise: float, num_shards: int,
                 command: str, format: str = "parquet", sft_short_fraction: float = 0.0,
                 corrected_fraction: float = 0.0, sft_grounded_fraction: float = 0.0) -> dict:
    """The built-in task's datasets under one progress bar: for each kind of `splits` ({kind: [(split,
    rows), ...]}), out/<kind>/ holds those splits in at most `num_shards` shards; sft's train split mixes
    in `sft_short_fraction` short questions and lists the scene in `sft_grounded_fraction` of its good answers to
    color and locate questions, preference's train split has `corrected_fraction` corrections.
    Returns {kind: card} (write_shards' dataset info)."""
    info = {"task": "shapes", "seed": seed, "image_size": image_size, "label_noise": label_noise,
            "sft_short_fraction": sft_short_fraction, "corrected_fraction": corrected_fraction,
            "sft_grounded_fraction": sft_grounded_fraction, "command": command}
    cards = {}
    with tqdm(total=sum(n for kind_splits in splits.values() for _, n in kind_splits), unit="row",
              desc="shapes") as bar:
        for kind, kind_splits in splits.items():
            for split, n in kind_splits:
                bar.set_postfix_str(f"{kind}/{split}")
                short = sft_short_fraction if (kind, split) == ("sft", "train") else 0.0
                corrected = corrected_fraction if (kind, split) == ("preference", "train") else 0.0
                grounded = sft_grounded_fraction if (kind, split) == ("sft", "train") else 0.0
                rows = generate_split(kind, n, seed, image_size=image_size, label_noise=label_noise, split=split,
                                      short_fraction=short, corrected_fraction=corrected,
                                      grounded_fraction=grounded)
                cards[kind] = write_shards(_counted(rows, bar), os.path.join(out, kind),
                                           num_shards=min(num_shards, n), format=format, split=split,
                                           info={**info, "kind": kind})
    return cards


def _counted(rows, bar):
    for row in rows:
        yield row
        bar.update()


def shapes_command(args) -> str:
    return shlex.join(["jaxpref", "data", "shapes", "--out", args.out, "--num-train", str(args.num_train),
                       "--num-eval", str(args.num_eval), "--num-shards", str(args.num_shards), "--format",
                       args.format, "--image-size", str(args.image_size), "--label-noise", str(args.label_noise),
                       "--sft-short-fraction", str(args.sft_short_fraction), "--corrected-fraction",
                       str(args.corrected_fraction), "--sft-grounded-fraction", str(args.sft_grounded_fraction),
                       "--seed", str(args.seed)])


def shapes_card(args, cards: dict) -> str:
    """README.md for the written datasets: a Hugging Face dataset card (YAML `configs` for parquet)."""
    ext = "parquet" if args.format == "parquet" else "array_record"
    split_names = list(next(iter(cards.values()))["splits"])
    lines = []
    if args.format == "parquet":
        lines += ["---", "configs:"]
        for kind, card in cards.items():
            lines += [f"- config_name: {kind}", "  data_files:"]
            lines += [f"  - split: {s}\n    path: {kind}/{s}-*.{ext}" for s in card["splits"]]
        lines += ["---", ""]
    lines += [
        "# shapes: jaxpref's built-in visual preference task", "",
        f"Synthetic {args.image_size}x{args.image_size} images of 1-3 colored shapes, with prompts about them "
        "(describe the image, name a shape's color, count shapes, locate one) and responses of graded quality "
        "scored by a gold judge against the scene (jaxpref/tasks/shapes/scenes.py). Rows use TRL's dataset schema.", "",
        f"Made with `{shapes_command(args)}` (seed {args.seed}, label noise {args.label_noise}: that fraction of "
        "preference pairs has chosen and rejected swapped, like disagreeing human raters).", "",
        "| dataset | TRL type | " + " | ".join(f"{s} rows" for s in split_names) + " | columns |",
        "|---|---|" + "---|" * len(split_names) + "---|",
    ]
    trl_type = {"preference": "preference (prompt, chosen, rejected)", "prompt": "prompt-only (PPO/GRPO)",
                "sft": "prompt-completion (SFT)",
                "short": "prompt-completion (short questions: decoder pretraining)"}
    for kind, card in cards.items():
        features = datasets.Features.from_dict(card["features"])
        cols = ", ".join(f"`{k}` {_short_type(v)}" for k, v in features.items())
        counts = " | ".join(str(s["num_rows"]) for s in card["splits"].values())
        lines.append(f"| `{kind}/` | {trl_type[kind]} | {counts} | {cols} |")
    lines += ["", "`images` holds one encoded PNG per row ({\"bytes\", \"path\"}); `scene` is the scene as JSON, "
              "which the gold judge reads. Each directory's `jaxpref_dataset.json` lists its shards and row "
              "counts.", ""]
    if args.format == "parquet":
        lines += ["Load with jaxpref (`jaxpref.data.sources.open_source(\"DIR/preference\", split=\"train\")`) or "
                  "with `datasets.load_dataset(\"DIR\", \"preference\")`."]
    else:
        lines += ["Each directory is a TFDS-prepared dataset (array_record shards, written without TensorFlow): "
                  "load it with `jaxpref.data.sources.open_source(\"DIR/preference\", split=\"train\")` or "
                  "`tfds.builder_from_directory(\"DIR/preference\").as_data_source(\"train\")` (conversational "
                  "text columns, if any, are JSON strings there)."]
    return "\n".join(lines) + "\n"


def _short_type(feature) -> str:
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
        return "list of images"
    return "conversational" if isinstance(feature, datasets.List) else type(feature).__name__

