"""`jaxpref data ...`: inspect any dataset (tasks add their own writers, e.g. `jaxpref data shapes`).

    jaxpref data inspect PATH [--split S] [--rows 3] [--save-images DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from jaxpref.data.sources import SourceError, list_splits, open_source


def add_data_parser(subparsers):
    """Registers `data inspect` under a `jaxpref` subparsers object; returns `data`'s own subparsers,
    where tasks add their dataset writers (jaxpref.tasks.shapes.data: `data shapes`)."""
    p = subparsers.add_parser("data", help="inspect a dataset; write a built-in task's datasets")
    sub = p.add_subparsers(dest="data_command", required=True)

    i = sub.add_parser("inspect", help="schema, row counts and a few decoded rows of a dataset")
    i.add_argument("path", help="a dataset directory (parquet/arrow shards or TFDS), a file or a glob")
    i.add_argument("--split", default=None, help="only this split (default: every split found)")
    i.add_argument("--rows", type=int, default=3, help="rows to print per split (default: 3)")
    i.add_argument("--save-images", default=None, metavar="DIR", help="save the printed rows' images as PNGs here")
    i.set_defaults(func=run_inspect)
    return sub


# ---------------------------------------------------------------------------
# data inspect


def run_inspect(args) -> int:
    path = args.path
    if os.path.isdir(path) and not list_splits(path):
        subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                         and list_splits(os.path.join(path, d)))
        if not subdirs:
            print(f"jaxpref data inspect: no dataset in {path}", file=sys.stderr)
            return 2
        for d in subdirs:
            code = run_inspect(argparse.Namespace(**{**vars(args), "path": os.path.join(path, d)}))
            if code:
                return code
        return 0
    splits = [args.split] if args.split else (list_splits(path) if os.path.isdir(path) else ["train"])
    try:
        sources = {split: open_source(path, split=split) for split in splits}
    except SourceError as e:
        print(f"jaxpref data inspect: {e}", file=sys.stderr)
        return 2
    print(f"== {path}")
    print("columns:")
    for name, kind in next(iter(sources.values())).columns().items():
        print(f"  {name}: {kind}")
    for split, src in sources.items():
        counts = [src.num_rows(i) for i in range(len(src.shards))]
        total = "?" if None in counts else sum(counts)
        print(f"split {split}: {total} rows in {len(src.shards)} shards")
        for shard, n in zip(src.shards, counts):
            print(f"  {os.path.basename(shard)}: {'?' if n is None else n} rows")
    for split, src in sources.items():
        for k, (shard, row_index, row) in enumerate(_first_rows(src, args.rows)):
            print(f"-- {split} row {row_index} of {os.path.basename(src.shards[shard])}")
            for name, value in row.items():
                print(f"  {name}: {describe_value(value)}")
            if args.save_images:
                for j, img in enumerate(_images(row)):
                    os.makedirs(args.save_images, exist_ok=True)
                    out = os.path.join(args.save_images, f"{os.path.basename(path.rstrip('/'))}-{split}-{k}-{j}.png")
                    img.save(out)
                    print(f"  saved {out}")
    return 0


def _first_rows(src, n: int):
    for shard in range(len(src.shards)):
        for row_index, row in src.read(shard):
            if n <= 0:
                return
            n -= 1
            yield shard, row_index, row


def _is_image(value) -> bool:
    return isinstance(value, dict) and ("bytes" in value or "path" in value) and set(value) <= {"bytes", "path"}


def _images(row: dict) -> list:
    from PIL import Image

    values = [v for col in ("images", "image") if col in row
              for v in (row[col] if isinstance(row[col], list) else [row[col]]) if _is_image(v)]
    return [Image.open(io.BytesIO(v["bytes"])) if v.get("bytes") else Image.open(v["path"]) for v in values]


def describe_value(value, limit: int = 160) -> str:
    """One line for a column value: images as format and size, conversations as `role: text` turns."""
    if _is_image(value) or (isinstance(value, list) and value and all(_is_image(v) for v in value)):
        from PIL import Image

        described = []
        for v in value if isinstance(value, list) else [value]:
            try:
                img = Image.open(io.BytesIO(v["bytes"])) if v.get("bytes") else Image.open(v["path"])
                described.append(f"{img.format} {img.width}x{img.height} {img.mode}")
            except (OSError, ValueError) as e:
                described.append(f"undecodable image ({e})")
        return "; ".join(described)
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        text = " | ".join(f"{m['role']}: {_content_text(m.get('content'))}" for m in value)
    elif isinstance(value, str):
        text = value
    else:
        return json.dumps(value, default=str)[:limit]
    return repr(text[:limit] + "..." if len(text) > limit else text)


def _content_text(content) -> str:
    if isinstance(content, list):
        return " ".join("<image>" if isinstance(b, dict) and b.get("type") == "image"
                        else str(b.get("text") if isinstance(b, dict) else b) for b in content)
    return str(content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpref")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
