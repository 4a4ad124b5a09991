"""Rows in TRL's schema -> sharded files that `datasets`, TFDS and jaxpref's sources read back.

    write_shards(rows, "out/preference", num_shards=4, format="parquet", split="train")

writes `out/preference/train-00000-of-00004.parquet` ... and `jaxpref_dataset.json` (splits, shard
row counts, columns, caller's `info`). Rows are dealt round-robin (row j -> shard j % num_shards)
so shards are balanced without knowing the row count in advance; only one small chunk per shard
is held in memory.

Formats:
  parquet, arrow   `datasets` features in the schema metadata: image columns ({"bytes", "path"}
                   structs) load back as `Image` columns with `load_dataset("parquet"|"arrow", ...)`.
                   Arrow files are IPC streams, like the `datasets` cache.
  array_record     a TFDS-prepared directory, written without TensorFlow: `dataset_info.json`,
                   `features.json` and `{split}-XXXXX-of-YYYYY.array_record` shards of serialized
                   tf.train.Example records (TFDS' own protos). `tfds.builder_from_directory(dir)
                   .as_data_source(split)` reads it. Images are TFDS `Image` features holding the
                   encoded PNG/JPEG bytes; strings are `Text`; ints and floats `Scalar`; any other
                   column (conversational messages) is `Text` holding JSON, listed under
                   "json_columns" in `jaxpref_dataset.json`.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from typing import Any, Iterable

import datasets
import numpy as np
import pyarrow as pa

FORMATS = ("parquet", "arrow", "array_record")
CARD_FILE = "jaxpref_dataset.json"
_INFER_ROWS = 64  # rows read ahead to infer the column types
_CHUNK_ROWS = 256  # rows per parquet row group / arrow record batch


def shard_name(split: str, index: int, num_shards: int, format: str) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.{format}"


def infer_features(rows: list[dict]) -> datasets.Features:
    """Column types of `rows` as `datasets` infers them, with {"bytes", "path"} structs (and lists
    of them) typed as `Image`."""
    if not rows:
        raise ValueError("cannot infer column types from zero rows")
    try:
        inferred = datasets.Features.from_arrow_schema(pa.Table.from_pylist(rows).schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"rows do not share column types: {e}") from e
    return datasets.Features({k: _image_typed(v) for k, v in inferred.items()})


def _image_typed(feature):
    if isinstance(feature, dict) and "bytes" in feature and set(feature) <= {"bytes", "path"}:
        return datasets.Image()
    if isinstance(feature, datasets.List):
        return datasets.List(_image_typed(feature.feature))
    return feature


def write_shards(rows: Iterable[dict], out_dir: str, *, num_shards: int, format: str = "parquet",
                 split: str = "train", features: datasets.Features | None = None,
                 info: dict | None = None) -> dict:
    """Writes `rows` as `num_shards` shards of `split` in `out_dir`; returns the updated card.

    features: column types (default: inferred from the first rows); info: JSON-able metadata
    stored in the card (e.g. how the data was made). Shards of `split` already in `out_dir` are
    replaced; other splits are kept.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(glob.escape(out_dir), f"{split}-?????-of-?????.{format}")):
        os.remove(old)
    rows = iter(rows)
    head = list(itertools.islice(rows, _INFER_ROWS))
    if features is None:
        features = infer_features(head)
    paths = [os.path.join(out_dir, shard_name(split, i, num_shards, format)) for i in range(num_shards)]
    tfds_spec = _TfdsSpec(features) if format == "array_record" else None
    writers = [_TfdsShardWriter(p, tfds_spec) if tfds_spec else _ArrowShardWriter(p, features, format)
               for p in paths]
    try:
        for j, row in enumerate(itertools.chain(head, rows)):
            writers[j % num_shards].add(row, j)
    finally:
        for w in writers:
            w.close()
    lengths = [w.count for w in writers]
    if tfds_spec:
        tfds_spec.write_metadata(out_dir, split, lengths)
    return _update_card(out_dir, format, split, paths, lengths, features, info,
                        json_columns=tfds_spec.json_columns if tfds_spec else [])


def _update_card(out_dir, format, split, paths, lengths, features, info, json_columns) -> dict:
    path = os.path.join(out_dir, CARD_FILE)
    card = {"format": format, "splits": {}}
    if os.path.exists(path):
        with open(path) as f:
            card = json.load(f)
        if card.get("format") != format:
            raise ValueError(f"{out_dir} already holds {card.get('format')} shards; cannot add {format} ones")
        if card.get("features") != features.to_dict():
            raise ValueError(f"split {split!r} has other columns than the splits already in {out_dir}: "
                             f"{features} vs {card.get('features')}")
    card["features"] = features.to_dict()
    card["json_columns"] = json_columns
    card["splits"][split] = {"num_rows": sum(lengths),
                             "shards": [{"file": os.path.basename(p), "num_rows": n} for p, n in zip(paths, lengths)]}
    if info is not None:
        card["info"] = info
    with open(path, "w") as f:
        json.dump(card, f, indent=2)
    return card


def read_card(directory: str) -> dict | None:
    """The `jaxpref_dataset.json` card of a directory, or None."""
    path = os.path.join(directory, CARD_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# parquet / arrow


class _ArrowShardWriter:
    def __init__(self, path: str, features: datasets.Features, format: str):
        self.features, self.schema, self.count, self._buf = features, features.arrow_schema, 0, []
        import pyarrow.parquet as pq

        self._writer = (pq.ParquetWriter(path, self.schema) if format == "parquet"
                        else pa.ipc.new_stream(path, self.schema))

    def add(self, row: dict, index: int):
        self._buf.append((index, row))
        if len(self._buf) == _CHUNK_ROWS:
            self._flush()

    def _flush(self):
        if not self._buf:
            return
        encoded = [self._encode(i, r) for i, r in self._buf]
        try:
            table = pa.Table.from_pylist(encoded, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            for (i, _), r in zip(self._buf, encoded):  # name the first row that does not fit
                try:
                    pa.Table.from_pylist([r], schema=self.schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e_row:
                    raise ValueError(f"input row {i} does not fit the columns {self.features}: {e_row}") from e
            raise
        self._writer.write_table(table)
        self.count += len(self._buf)
        self._buf = []

    def _encode(self, index: int, row: dict) -> dict:
        if set(row) != set(self.features):
            raise ValueError(f"input row {index} has columns {sorted(row)}, expected {sorted(self.features)}")
        try:
            return self.features.encode_example(row)
        except (ValueError, TypeError) as e:
            raise ValueError(f"input row {index}: {e}") from e

    def close(self):
        try:
            self._flush()
        finally:
            self._writer.close()


# ---------------------------------------------------------------------------
# array_record (TFDS-prepared directory)


class _TfdsSpec:
    """TFDS features for `datasets` features, and the directory's TFDS metadata."""

    def __init__(self, features: datasets.Features):
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core import example_serializer

        self.columns = dict(features)
        self.json_columns = [k for k, f in features.items() if _tfds_feature(f) is None]
        self.features = tfds.features.FeaturesDict(
            {k: _tfds_feature(f) or tfds.features.Text() for k, f in features.items()})
        self.serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())

    def encode(self, row: dict, index: int) -> bytes:
        if set(row) != set(self.columns):
            raise ValueError(f"input row {index} has columns {sorted(row)}, expected {sorted(self.columns)}")
        try:
            values = {k: _tfds_value(k, v, self.columns[k], k in self.json_columns) for k, v in row.items()}
            return self.serializer.serialize_example(self.features.encode_example(values))
        except (ValueError, TypeError) as e:
            raise ValueError(f"input row {index}: {e}") from e

    def write_metadata(self, out_dir: str, split: str, lengths: list[int]):
        """dataset_info.json (splits merged with those already there) and features.json."""
        from google.protobuf import json_format
        from tensorflow_datasets.core.proto import dataset_info_pb2

        features_path = os.path.join(out_dir, "features.json")
        if os.path.exists(features_path):
            with open(features_path) as f:
                if json.load(f) != self.features.to_json():
                    raise ValueError(f"split {split!r} has other TFDS features than the splits already in {out_dir}")
        info_path = os.path.join(out_dir, "dataset_info.json")
        info = dataset_info_pb2.DatasetInfo(
            name="jaxpref_dataset", version="1.0.0", file_format="array_record",
            description="Written by jaxpref (jaxpref/data/writers.py); JSON-encoded text columns: "
                        + (", ".join(self.json_columns) or "none") + ".")
        if os.path.exists(info_path):
            with open(info_path) as f:
                json_format.Parse(f.read(), info)
        kept = [s for s in info.splits if s.name != split]
        del info.splits[:]
        info.splits.extend(kept)
        info.splits.add(name=split, shard_lengths=lengths, filepath_template="{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}")
        with open(info_path, "w") as f:
            f.write(json_format.MessageToJson(info))
        with open(features_path, "w") as f:
            json.dump(self.features.to_json(), f, indent=2)


def _tfds_feature(feature):
    """The TFDS feature storing a `datasets` feature natively, or None (stored as JSON text)."""
    import tensorflow_datasets as tfds

    if isinstance(feature, datasets.Image):
        return tfds.features.Image()
    if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
        return tfds.features.Sequence(tfds.features.Image())
    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return tfds.features.Text()
        if feature.dtype == "bool":
            return tfds.features.Scalar(np.bool_)
        if feature.dtype.startswith(("int", "uint")):
            return tfds.features.Scalar(np.int64)
        if feature.dtype.startswith("float"):
            return tfds.features.Scalar(np.float32)
    return None


def _tfds_value(column: str, value: Any, feature, as_json: bool):
    if as_json:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(feature, datasets.Image):
        return _image_bytes(column, value)
    if isinstance(feature, datasets.List):
        return [_image_bytes(column, v) for v in value]
    if value is None:
        raise ValueError(f"column {column!r} is None")
    return value


def _image_bytes(column: str, value: Any) -> bytes:
    """Encoded image bytes from a {"bytes", "path"} dict or bytes; array_record shards hold the bytes."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError(f"column {column!r}: expected encoded image bytes or a {{'bytes', 'path'}} dict, "
                     f"got {type(value).__name__}")


class _TfdsShardWriter:
    def __init__(self, path: str, spec: _TfdsSpec):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.spec, self.count = spec, 0
        self._writer = ArrayRecordWriter(path, "group_size:1")

    def add(self, row: dict, index: int):
        self._writer.write(self.spec.encode(row, index))
        self.count += 1

    def close(self):
        self._writer.close()
