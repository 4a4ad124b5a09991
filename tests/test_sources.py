"""Shard writers and sources: parquet, arrow and TFDS array_record shards written to tmp_path and
read back through every source, by `datasets` and by TFDS; dispatch, errors, process assignment."""

import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from jaxpref.data import sources, writers
from jaxpref.data.sources import SourceError, assign_shards, open_source
from jaxpref.data.writers import write_shards

FORMATS = ("parquet", "arrow", "array_record")


def png(i: int, size: int = 8) -> bytes:
    """A PNG whose color encodes i."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i % 256, i // 256, 7)).save(buf, "PNG")
    return buf.getvalue()


def rlaif_row(i: int) -> dict:
    """A row shaped like HuggingFaceH4/rlaif-v_formatted: conversational texts, one image."""
    return {
        "images": [{"bytes": png(i), "path": None}],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"question {i}"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": f"good answer {i}"}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"bad answer {i}"}]}],
        "scene": json.dumps({"id": i}),
        "margin": i / 4,
    }


def row_id(row: dict) -> int:
    return json.loads(row["scene"])["id"]


def drop_none(x):
    """Parquet/arrow give missing struct fields as None ({"type": "image", "text": None})."""
    if isinstance(x, dict):
        return {k: drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [drop_none(v) for v in x]
    return x


def write(tmp_path, fmt, n=23, num_shards=4, split="train", rows=None):
    out = str(tmp_path / fmt)
    write_shards(rows if rows is not None else (rlaif_row(i) for i in range(n)), out, num_shards=num_shards,
                 format=fmt, split=split)
    return out


def read_all(src):
    return [[(i, r) for i, r in src.read(s)] for s in range(len(src.shards))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_through_every_source(tmp_path, fmt):
    out = write(tmp_path, fmt)
    write(tmp_path, fmt, n=5, num_shards=1, split="eval")
    src = open_source(out, split="train")
    assert len(src.shards) == 4 and all(os.path.basename(p).startswith("train-0000") for p in src.shards)
    shards = read_all(src)
    for s, rows in enumerate(shards):  # round-robin: input row j is row j // 4 of shard j % 4
        assert [i for i, _ in rows] == list(range(len(rows))) == list(range(src.num_rows(s)))
        assert [row_id(r) for _, r in rows] == list(range(s, 23, 4))
        for _, r in rows:
            ref = rlaif_row(row_id(r))
            assert r["images"][0]["bytes"] == ref["images"][0]["bytes"]
            assert drop_none(r) == {**ref, "images": [{"bytes": ref["images"][0]["bytes"]}]}
    assert sorted(row_id(r) for _, r in open_source(out, split="eval").read(0)) == list(range(5))
    card = writers.read_card(out)
    assert card["format"] == fmt and card["splits"]["train"]["num_rows"] == 23
    assert [s["num_rows"] for s in card["splits"]["train"]["shards"]] == [6, 6, 6, 5]
    # Other ways to name the same shards.
    globs = [os.path.join(out, f"train-*.{fmt}")] if fmt != "array_record" else []
    for spec in [sorted(src.shards), src.shards[2]] + globs:
        other = open_source(spec, split="train")
        assert [[row_id(r) for _, r in other.read(s)] for s in range(len(other.shards))] == \
               [[row_id(r) for _, r in src.read(src.shards.index(p))] for p in other.shards]


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_from_a_row_seeks_like_a_full_read(tmp_path, fmt):
    out = write(tmp_path, fmt, n=600, num_shards=1)  # more rows than a parquet row group / arrow batch
    src = open_source(out)
    full = [(i, row_id(r)) for i, r in src.read(0)]
    assert full == [(i, i) for i in range(600)]
    for start in (0, 1, 255, 256, 257, 511, 599, 600):
        assert [(i, row_id(r)) for i, r in src.read(0, start)] == full[start:]


def test_hf_datasets_and_tfds_read_the_shards_independently(tmp_path):
    import datasets
    import tensorflow_datasets as tfds

    for fmt in ("parquet", "arrow"):
        out = write(tmp_path, fmt, n=6, num_shards=2)
        ds = datasets.load_dataset(fmt, data_files=sorted(open_source(out).shards), split="train")
        assert isinstance(ds.features["images"].feature, datasets.Image)
        for r in ds:
            i = row_id(r)
            assert np.asarray(r["images"][0]).tolist() == np.asarray(Image.open(io.BytesIO(png(i)))).tolist()
            assert r["chosen"] == rlaif_row(i)["chosen"]
    out = write(tmp_path, "array_record", n=6, num_shards=2)
    data = tfds.builder_from_directory(out).as_data_source("train")
    assert len(data) == 6
    for r in data:
        i = json.loads(r["scene"])["id"]
        assert r["images"][0].tolist() == np.asarray(Image.open(io.BytesIO(png(i)))).tolist()
        assert json.loads(r["prompt"]) == rlaif_row(i)["prompt"]  # conversational columns are JSON text
        assert r["margin"] == np.float32(i / 4)


def test_plain_text_rows_and_single_image_column(tmp_path):
    rows = [{"image": {"bytes": png(i), "path": None}, "prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    for fmt in FORMATS:
        out = str(tmp_path / fmt)
        write_shards(rows, out, num_shards=2, format=fmt)
        src = open_source(out)
        got = sorted((r for s in range(2) for _, r in src.read(s)), key=lambda r: r["prompt"])
        assert [drop_none(r) for r in got] == [{"image": {"bytes": r["image"]["bytes"]}, "prompt": r["prompt"],
                                               "completion": r["completion"]} for r in rows]
        assert "image" in src.columns() and len(src.columns()) == 3


def test_assign_shards():
    assert assign_shards([3, 1, 0, 2], 0, 2) == ([3, 0], 1)
    assert assign_shards([3, 1, 0, 2], 1, 2) == ([1, 2], 1)
    assert assign_shards([2, 0, 1], 1, 2) == ([2, 0, 1], 2)  # not divisible: all shards, every 2nd row
    assert assign_shards([0, 1], 0, 1) == ([0, 1], 1)
    with pytest.raises(ValueError, match="process_index 2"):
        assign_shards([0, 1], 2, 2)


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # tests run offline (conftest)
    t = time.perf_counter()
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE.*pass the local\\s+directory"):
        open_source("HuggingFaceH4/rlaif-v_formatted")
    # Without offline mode, an unreachable hub also fails at once (a closed local port stands in for it).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    with pytest.raises(SourceError, match="cannot be reached.*127.0.0.1"):
        open_source("HuggingFaceH4/rlaif-v_formatted")
    assert time.perf_counter() - t < 5


def test_open_source_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing"))
    out = write(tmp_path, "parquet", n=4, num_shards=1)
    with pytest.raises(SourceError, match="no parquet/arrow files of split 'test'.*splits found: \\['train'\\]"):
        open_source(out, split="test")
    with pytest.raises(SourceError, match="no files match"):
        open_source(str(tmp_path / "*.arrow"))
    tfds_dir = write(tmp_path, "array_record", n=4, num_shards=1)
    with pytest.raises(SourceError, match="no split 'test'.*\\['train'\\]"):
        open_source(tfds_dir, split="test")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="must all be .parquet or all .arrow"):
        open_source([os.path.join(out, "train-00000-of-00001.parquet"), str(tmp_path / "notes.txt")])
    assert sources.list_splits(tfds_dir) == ["train"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_writer_names_the_row_that_does_not_fit(tmp_path, fmt):
    rows = [rlaif_row(i) for i in range(70)]
    rows[66] = {k: v for k, v in rows[66].items() if k != "rejected"}
    with pytest.raises(ValueError, match="input row 66 has columns"):
        write_shards(rows, str(tmp_path / "a"), num_shards=2, format=fmt)
    rows[66] = {**rlaif_row(66), "images": [{"bytes": None, "path": None}]} if fmt == "array_record" else \
        {**rlaif_row(66), "margin": "high"}
    with pytest.raises(ValueError, match="input row 66"):
        write_shards(rows, str(tmp_path / "b"), num_shards=2, format=fmt)
    with pytest.raises(ValueError, match="format must be one of"):
        write_shards(rows, str(tmp_path / "c"), num_shards=2, format="csv")


def test_inspect_prints_schema_counts_rows_and_saves_images(tmp_path, capsys):
    from jaxpref.cli import main

    write(tmp_path / "ds", "parquet", n=7, num_shards=2)
    write(tmp_path / "ds", "array_record", n=3, num_shards=1, split="eval")
    assert main(["data", "inspect", str(tmp_path / "ds"), "--rows", "2", "--save-images", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    for fmt, counts in (("parquet", ["split train: 7 rows in 2 shards", "train-00000-of-00002.parquet: 4 rows",
                                     "train-00001-of-00002.parquet: 3 rows"]),
                        ("array_record", ["split eval: 3 rows in 1 shards",
                                          "eval-00000-of-00001.array_record: 3 rows"])):
        section = out[out.index(f"== {tmp_path / 'ds' / fmt}"):]
        for line in counts + ["images: PNG 8x8 RGB", "prompt: 'user: <image> question 0'",
                              "chosen: 'assistant: good answer 0'", "margin: 0.0"]:
            assert line in section, (fmt, line)
    assert "prompt: List({'role': Value('string')" in out and "prompt: Text (JSON)" in out
    saved = sorted(os.listdir(tmp_path / "png"))
    assert saved == ["array_record-eval-0-0.png", "array_record-eval-1-0.png",
                     "parquet-train-0-0.png", "parquet-train-1-0.png"]
    assert Image.open(tmp_path / "png" / saved[2]).getpixel((0, 0)) == (0, 0, 7)  # train row 0 is input row 0
    assert main(["data", "inspect", str(tmp_path / "nothing-here")]) == 2


def test_tfds_directory_with_tfds_default_file_names(tmp_path):
    """A TFDS directory as `tfds` names its files ({name}-{split}.array_record-XXXXX-of-YYYYY), no jaxpref card:
    shards come from dataset_info.json, text columns stay strings."""
    out = write(tmp_path, "array_record", n=9, num_shards=3)
    info_path = tmp_path / "array_record" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    for split in info["splits"]:
        del split["filepathTemplate"]  # tfds' default template
    info_path.write_text(json.dumps(info))
    for i in range(3):
        os.rename(os.path.join(out, f"train-0000{i}-of-00003.array_record"),
                  os.path.join(out, f"jaxpref_dataset-train.array_record-0000{i}-of-00003"))
    os.remove(os.path.join(out, writers.CARD_FILE))
    src = open_source(out)
    assert [os.path.basename(p) for p in src.shards] == [f"jaxpref_dataset-train.array_record-0000{i}-of-00003"
                                                         for i in range(3)]
    rows = [r for s in range(3) for _, r in src.read(s)]
    assert sorted(row_id(r) for r in rows) == list(range(9))
    assert all(json.loads(r["chosen"]) == rlaif_row(row_id(r))["chosen"] for r in rows)  # JSON text, undecoded
    assert rows[0]["images"][0]["bytes"] == png(row_id(rows[0]))


@pytest.mark.parametrize("fmt", ["parquet", "array_record"])
def test_shapes_cli_writes_trl_datasets_and_a_card(tmp_path, fmt):
    from jaxpref.cli import main
    from jaxpref.tasks.shapes.scenes import generate_split

    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--num-train", "12", "--num-eval", "3", "--num-shards", "4",
                 "--format", fmt, "--label-noise", "0.2", "--sft-short-fraction", "0.5", "--corrected-fraction", "0.25",
                 "--sft-grounded-fraction", "0.75", "--seed", "5"]) == 0
    columns = {"preference": {"images", "prompt", "chosen", "rejected", "scene"},
               "prompt": {"images", "prompt", "scene"}, "sft": {"images", "prompt", "completion", "scene"},
               "short": {"images", "prompt", "completion", "scene"}}
    for kind, cols in columns.items():
        for split, n, shards in (("train", 12, 4), ("eval", 3, 3)):  # at most one shard per row
            src = open_source(str(out / kind), split=split)
            assert len(src.shards) == shards and sum(src.num_rows(s) for s in range(shards)) == n
            short = 0.5 if (kind, split) == ("sft", "train") else 0.0  # the eval split asks the task only
            corrected = 0.25 if (kind, split) == ("preference", "train") else 0.0
            grounded = 0.75 if (kind, split) == ("sft", "train") else 0.0
            want = list(generate_split(kind, n, 5, image_size=64, label_noise=0.2, split=split, short_fraction=short,
                                       corrected_fraction=corrected, grounded_fraction=grounded))
            got = [src.read(j % shards, j // shards) for j in range(n)]  # round-robin
            for j, (it, ref) in enumerate(zip(got, want)):
                _, row = next(it)
                assert set(row) == cols and drop_none(row) == drop_none(ref), (kind, split, j)
    card = (out / "README.md").read_text()
    assert ("--label-noise 0.2 --sft-short-fraction 0.5 --corrected-fraction 0.25 --sft-grounded-fraction 0.75 "
            "--seed 5") in card
    assert main(["data", "shapes", "--out", str(tmp_path / "bad"), "--sft-short-fraction", "1.5"]) == 2
    assert main(["data", "shapes", "--out", str(tmp_path / "bad"), "--corrected-fraction", "-0.1"]) == 2
    assert main(["data", "shapes", "--out", str(tmp_path / "bad"), "--sft-grounded-fraction", "2"]) == 2
    assert not (tmp_path / "bad").exists() and "| `preference/` |" in card and "| 12 | 3 |" in card
    assert "| `short/` |" in card
    if fmt == "parquet":  # the card's YAML configs make the directory loadable by name
        import datasets

        ds = datasets.load_dataset(str(out), "sft", split="eval")
        assert len(ds) == 3 and isinstance(ds.features["images"].feature, datasets.Image)


def test_rewriting_a_split_replaces_its_shards(tmp_path):
    out = write(tmp_path, "parquet", n=8, num_shards=4)
    write(tmp_path, "parquet", n=5, num_shards=1, split="eval")
    write(tmp_path, "parquet", n=6, num_shards=2)
    assert sorted(os.listdir(out)) == ["eval-00000-of-00001.parquet", "jaxpref_dataset.json",
                                       "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert sum(open_source(out).num_rows(s) for s in range(2)) == 6
    assert writers.read_card(out)["splits"]["eval"]["num_rows"] == 5
