"""Where rows come from: an ordered list of shards, each read as an iterator of (row_index, row).

    source = open_source("data/preference", split="train")    # a directory, glob, files or hub id
    for row_index, row in source.read(shard=0, start=0): ...

Rows are dicts in the dataset's own schema; images stay encoded ({"bytes", "path"} dicts, what
`datasets` gives with `Image(decode=False)`) so the processor decodes them. Sources:

  ArrowFileSource  parquet or arrow (IPC stream) files, read with pyarrow; `start` skips whole
                   parquet row groups / arrow record batches, then rows within one.
  TfdsSource       a TFDS-prepared directory (dataset_info.json, features.json, array_record
                   shards): each shard is an ArrayRecordDataSource (random access), records
                   are decoded with the dataset's TFDS features (images kept as bytes).
  HubSource        `datasets.load_dataset(id, streaming=True)`; shards are its `num_shards`
                   file shards; `start` skips rows by reading them. Needs the network.

Per-process shards (`assign_shards`): with P processes and N shards, when N % P == 0 process p
reads shards p, p + P, ... of the (epoch's) shard order; otherwise every process reads every
shard and keeps every P-th row (rows p, p + P, ... of the concatenated stream), as `datasets`'
split_dataset_by_node does. Either way each row goes to exactly one process per epoch.
"""

from __future__ import annotations

import glob as glob_lib
import json
import logging
import os
import re
from typing import Iterator

import numpy as np

from jaxpref.data.writers import read_card

log = logging.getLogger(__name__)

_FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
_READ_ROWS = 256  # rows per read from a shard


class SourceError(ValueError):
    """A dataset that cannot be found or opened."""


class Source:
    """An ordered list of shards; subclasses implement `read` and `num_rows`."""

    name: str  # what to call the dataset in messages
    shards: list[str]  # one display name (a file path) per shard

    def read(self, shard: int, start: int = 0) -> Iterator[tuple[int, dict]]:
        """Rows start, start + 1, ... of shard `shard` as (row_index, row)."""
        raise NotImplementedError

    def num_rows(self, shard: int) -> int | None:
        """Rows in a shard, when the source knows without reading it."""
        raise NotImplementedError

    def columns(self) -> dict[str, str]:
        """Column name -> type description."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, {len(self.shards)} shards)"


def assign_shards(order: list[int], process_index: int, process_count: int) -> tuple[list[int], int]:
    """This process's shards (in order) and the row stride: (order[p::P], 1) when the shard count
    divides by the process count, else (order, P), the process keeping rows p, p + P, ..."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if len(order) % process_count == 0:
        return list(order[process_index::process_count]), 1
    return list(order), process_count


# ---------------------------------------------------------------------------
# parquet / arrow files


class ArrowFileSource(Source):
    """Parquet or arrow IPC-stream files (one shard per file)."""

    def __init__(self, files: list[str], format: str):
        self.name, self.shards, self.format = os.path.commonpath(files), list(files), format
        self._lengths: dict[int, int] = {}

    def read(self, shard, start=0):
        for first, batch in self._batches(shard, start):
            rows = batch.slice(max(start - first, 0)).to_pylist()
            yield from enumerate(rows, max(start, first))

    def _batches(self, shard: int, start: int):
        """(index of the batch's first row, RecordBatch) for the batches holding rows >= start."""
        path = self.shards[shard]
        if self.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            first_group = int(np.searchsorted(ends, start, side="right"))
            first = int(ends[first_group - 1]) if first_group else 0
            for batch in pf.iter_batches(batch_size=_READ_ROWS, row_groups=range(first_group, pf.num_row_groups),
                                         use_threads=False):
                if first + batch.num_rows > start:
                    yield first, batch
                first += batch.num_rows
        else:
            first = 0
            for batch in _open_ipc(path):
                if first + batch.num_rows > start:
                    yield first, batch
                first += batch.num_rows

    def num_rows(self, shard):
        if shard not in self._lengths:
            path = self.shards[shard]
            if self.format == "parquet":
                import pyarrow.parquet as pq

                self._lengths[shard] = pq.ParquetFile(path).metadata.num_rows
            else:
                self._lengths[shard] = sum(b.num_rows for b in _open_ipc(path))
        return self._lengths[shard]

    def columns(self):
        import datasets

        schema = _schema(self.shards[0], self.format)
        return {k: str(v) for k, v in datasets.Features.from_arrow_schema(schema).items()}


def _open_ipc(path: str):
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).to_batches()  # IPC file (feather v2) format


def _schema(path: str, format: str):
    if format == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path)
    import pyarrow as pa

    reader = _open_ipc(path)
    return reader.schema if isinstance(reader, pa.ipc.RecordBatchStreamReader) else reader[0].schema


# ---------------------------------------------------------------------------
# TFDS-prepared directory (array_record)


class TfdsSource(Source):
    """A TFDS-prepared dataset directory of array_record shards, read without TensorFlow.

    Image and Sequence(Image) features come back as {"bytes", "path": None} dicts, Text as str
    (JSON-decoded for the columns a jaxpref card lists as "json_columns"), scalars as Python numbers.
    """

    def __init__(self, directory: str, split: str, files: list[str] | None = None):
        import tensorflow_datasets as tfds

        builder = tfds.builder_from_directory(directory)
        if split not in builder.info.splits:
            raise SourceError(f"{directory} has no split {split!r}; it has {sorted(builder.info.splits)}")
        info = builder.info.splits[split]
        paths, lengths = [os.fspath(p) for p in info.filepaths], list(info.shard_lengths)
        if files is not None:
            wanted = {os.path.abspath(f) for f in files}
            keep = [i for i, p in enumerate(paths) if os.path.abspath(p) in wanted]
            if len(keep) != len(wanted):
                raise SourceError(f"files {sorted(wanted - {os.path.abspath(paths[i]) for i in keep})} are not "
                                  f"shards of split {split!r} in {directory}")
            paths, lengths = [paths[i] for i in keep], [lengths[i] for i in keep]
        self.name, self.shards, self._lengths = directory, paths, lengths
        self.features = builder.info.features
        card = read_card(directory) or {}
        self.json_columns = set(card.get("json_columns", []))
        self.column_order = [k for k in card.get("features", sorted(self.features.keys())) if k in self.features]
        self._decoders = {k: _keep_bytes_decoder() for k, f in self.features.items() if _is_image(f)}
        self._sources: dict[int, object] = {}

    def read(self, shard, start=0):
        source = self._source(shard)
        for lo in range(start, len(source), _READ_ROWS):
            idx = list(range(lo, min(lo + _READ_ROWS, len(source))))
            for i, record in zip(idx, source.__getitems__(idx)):
                example = self.features.deserialize_example_np(record, decoders=self._decoders)
                yield i, {k: self._value(k, example[k]) for k in self.column_order}

    def _source(self, shard):
        if shard not in self._sources:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._sources[shard] = ArrayRecordDataSource([self.shards[shard]])
        return self._sources[shard]

    def _value(self, column: str, v):
        if column in self._decoders:
            return [_image_dict(b) for b in v] if isinstance(v, list) else _image_dict(v)
        if isinstance(v, bytes):
            text = v.decode("utf-8")
            return json.loads(text) if column in self.json_columns else text
        if isinstance(v, np.ndarray):
            return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.tolist()]
        return v.item() if isinstance(v, np.generic) else v

    def num_rows(self, shard):
        return self._lengths[shard]

    def columns(self):
        return {k: f"{type(self.features[k]).__name__} (JSON)" if k in self.json_columns else repr(self.features[k])
                for k in self.column_order}


def _is_image(feature) -> bool:
    import tensorflow_datasets as tfds

    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    return isinstance(feature, tfds.features.Image)


def _image_dict(b: bytes) -> dict:
    return {"bytes": b, "path": None}


def _keep_bytes_decoder():
    """A TFDS decoder that leaves encoded images as bytes (one image, or a Sequence of them)."""
    import tensorflow_datasets as tfds

    class KeepBytes(tfds.decode.SkipDecoding):
        def decode_batch_example_np(self, serialized):
            return list(serialized)

    return KeepBytes()


# ---------------------------------------------------------------------------
# Hugging Face hub


class HubSource(Source):
    """A hub dataset through `datasets` streaming (needs the network)."""

    def __init__(self, name: str, split: str):
        import datasets

        _check_hub_reachable(name)
        try:
            ds = datasets.load_dataset(name, split=split, streaming=True)
        except (ConnectionError, OSError) as e:
            raise SourceError(_no_hub_message(name, f"{type(e).__name__}: {e}")) from e
        for column, feature in (ds.features or {}).items():
            if isinstance(feature, datasets.Image) or (isinstance(feature, datasets.List)
                                                       and isinstance(feature.feature, datasets.Image)):
                ds = ds.cast_column(column, _no_decode(feature))
        self.name, self._ds = f"{name}[{split}]", ds
        self.shards = [f"{self.name} shard {i}" for i in range(ds.num_shards)]

    def read(self, shard, start=0):
        import itertools

        rows = self._ds.shard(num_shards=len(self.shards), index=shard, contiguous=True)
        yield from itertools.islice(enumerate(rows), start, None)

    def num_rows(self, shard):
        return None

    def columns(self):
        return {k: str(v) for k, v in (self._ds.features or {}).items()}


def _no_decode(feature):
    import datasets

    if isinstance(feature, datasets.List):
        return datasets.List(datasets.Image(decode=False))
    return datasets.Image(decode=False)


def _no_hub_message(name: str, why: str) -> str:
    return (f"{name!r} is not a local file or directory, so it was taken for a Hugging Face hub dataset id, "
            f"but the hub cannot be reached ({why}). No network or hub here: download the dataset elsewhere "
            f"(e.g. `huggingface-cli download --repo-type dataset {name} --local-dir DIR`) and pass the local "
            f"directory of parquet/arrow files, or a TFDS directory.")


def _check_hub_reachable(name: str, timeout: float = 3.0):
    """Fails at once when offline mode is on or the hub's host does not answer within `timeout`
    (instead of `datasets`' retries, which take tens of seconds)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise SourceError(_no_hub_message(name, "HF_HUB_OFFLINE is set"))
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        raise SourceError(_no_hub_message(name, f"{url.hostname}: {e}")) from e


# ---------------------------------------------------------------------------
# Dispatch


def open_source(spec: str | list[str], split: str = "train") -> Source:
    """A source for `spec`: a TFDS-prepared directory (dataset_info.json), a directory of parquet or
    arrow shards (files named `{split}-*`, `{split}_*` or `{split}.*`, there or under `data/`), a glob,
    a file, a list of files, or else a hub dataset id."""
    if isinstance(spec, (list, tuple)):
        return _from_files(list(spec), split)
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "dataset_info.json")):
            return TfdsSource(spec, split)
        files = split_files(spec, split)
        if not files:
            found = list_splits(spec)
            raise SourceError(f"no parquet/arrow files of split {split!r} in {spec}"
                              + (f"; splits found: {found}" if found else " (and no dataset_info.json)"))
        return _from_files(files, split)
    if glob_lib.has_magic(spec):
        files = sorted(glob_lib.glob(spec))
        if not files:
            raise SourceError(f"no files match {spec!r}")
        return _from_files(files, split)
    if os.path.isfile(spec):
        return _from_files([spec], split)
    if spec.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise SourceError(f"{spec!r}: no such file or directory")
    return HubSource(spec, split)


def _from_files(files: list[str], split: str) -> Source:
    if not files:
        raise SourceError("no files given")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise SourceError(f"no such file(s): {missing}")
    if all(".array_record" in os.path.basename(f) for f in files):
        dirs = {os.path.dirname(os.path.abspath(f)) for f in files}
        if len(dirs) != 1 or not os.path.exists(os.path.join(dirs.pop(), "dataset_info.json")):
            raise SourceError(f"array_record files {files} must lie in one TFDS directory with its "
                              f"dataset_info.json and features.json")
        return TfdsSource(os.path.dirname(os.path.abspath(files[0])), split, files)
    formats = {_FILE_FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if None in formats or len(formats) != 1:
        raise SourceError(f"files must all be .parquet or all .arrow (or TFDS array_record shards), got {files}")
    return ArrowFileSource(files, formats.pop())


def split_files(directory: str, split: str) -> list[str]:
    """Parquet/arrow files of `split` in a directory (HF hub layout conventions)."""
    found = set()
    for base in (directory, os.path.join(directory, "data")):
        for pattern in (f"{split}-*", f"{split}_*", f"{split}.*"):
            found.update(f for f in glob_lib.glob(os.path.join(glob_lib.escape(base), pattern))
                         if os.path.splitext(f)[1] in _FILE_FORMATS)
    return sorted(found)


def list_splits(directory: str) -> list[str]:
    """Split names found in a directory: TFDS splits, or the `{split}-...` prefixes of data files."""
    if os.path.exists(os.path.join(directory, "dataset_info.json")):
        with open(os.path.join(directory, "dataset_info.json")) as f:
            return [s["name"] for s in json.load(f).get("splits", [])]
    card = read_card(directory)
    if card:
        return list(card["splits"])
    names = set()
    for base in (directory, os.path.join(directory, "data")):
        for f in glob_lib.glob(os.path.join(glob_lib.escape(base), "*")):
            if os.path.splitext(f)[1] in _FILE_FORMATS:
                names.add(re.split(r"[-_.]", os.path.basename(f))[0])
    return sorted(names)
