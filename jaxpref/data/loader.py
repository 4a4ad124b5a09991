"""The per-process, deterministic, resumable loader: source rows -> processed, collated numpy batches.

    loader = Loader(source, processor, processor.collate, batch_size=8, seed=0)
    for batch in loader:                       # dict of numpy arrays, batch dim = batch_size
        state = loader.state()                 # JSON-able; position after the last batch received
    resumed = Loader(source, processor, processor.collate, batch_size=8, seed=0, state=state)

The row stream is a pure function of (seed, epoch):
  1. shard order: a permutation of the shards drawn from (seed, epoch), the same on every process
     (`shuffle_shards=False`: file order); the process takes its part (sources.assign_shards);
  2. windowed shuffle: the process's rows, in that order, are cut into windows of `shuffle_buffer`
     consecutive rows; each window is emitted in a random order drawn from (seed, epoch, window).
     Unlike tf.data's reservoir buffer a row only moves within its window, which is what makes the
     state a handful of counters. Windows never straddle epochs.
  3. each row goes through `process_fn` (a row -> an example; BadRecordError for bad rows, handled
     by `on_bad_record`), consecutive examples are grouped into batches of `batch_size` (crossing
     epoch boundaries, like tf.data's repeat().batch()) and merged by `collate_fn`.

State = (epoch, window number, the window's start in the process's shard list (shard position,
row, rows read this epoch), rows of the window already used, rows seen and rows bad). No RNG
state: permutations are recomputed. Restoring re-reads the current window's rows (at most
`shuffle_buffer` raw rows, not processed): parquet seeks to the row group, array_record to the row,
arrow IPC streams skip record batches, hub streams re-read the shard's rows up to the cursor.

A background thread runs the pipeline `prefetch` batches ahead (`num_workers` threads process
rows); order is unchanged and exceptions are raised in the consumer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np

from jaxpref.data.errors import BadRecordError
from jaxpref.data.sources import Source, assign_shards

log = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("error", "skip")
MIN_ROWS_FOR_FRACTION = 100  # max_bad_fraction is enforced once this many rows were seen
ALL_BAD_LIMIT = 10  # ... or as soon as this many rows were seen and every one was bad


class TooManyBadRecordsError(RuntimeError):
    """More rows were bad than `max_bad_fraction` allows."""


@dataclasses.dataclass(frozen=True)
class _Pos:
    """Where the stream stands: the next row is row `offset` of window `window` of `epoch`, the
    window starting at `cursor` = (position in the process's shard list, row in that shard, rows
    read this epoch)."""

    epoch: int = 0
    window: int = 0
    cursor: tuple[int, int, int] = (0, 0, 0)
    offset: int = 0


class Loader:
    """Iterates over collated batches of `batch_size` examples (this process's share).

    source: a Source; process_fn: row dict -> example (raises BadRecordError for bad rows);
    collate_fn: list of examples -> dict of numpy arrays; seed: a non-negative int;
    shuffle_buffer: rows per shuffle window (<= 1: no shuffling within shards);
    shuffle_shards: permute the shard order each epoch; num_epochs: None = forever;
    drop_remainder: drop the last partial batch (finite num_epochs only);
    process_index / process_count: default jax.process_index() / jax.process_count();
    on_bad_record: "error" raises BadRecordError naming shard, row and field; "skip" logs and
    skips it, raising TooManyBadRecordsError when bad rows exceed max_bad_fraction of rows seen;
    prefetch: batches prepared ahead by the background thread; num_workers: threads running
    process_fn (PIL decode and resize release the GIL), order unchanged; state: from `state()`.
    """

    def __init__(self, source: Source, process_fn: Callable[[dict], Any],
                 collate_fn: Callable[[list], dict[str, np.ndarray]], *, batch_size: int, seed: int,
                 shuffle_buffer: int = 1000, shuffle_shards: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, process_index: int | None = None, process_count: int | None = None,
                 on_bad_record: str = "error", max_bad_fraction: float = 0.01, prefetch: int = 2,
                 num_workers: int = 1, state: dict | None = None):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        for name, value, ok in (("batch_size", batch_size, batch_size >= 1), ("seed", seed, seed >= 0),
                                ("num_epochs", num_epochs, num_epochs is None or num_epochs >= 1),
                                ("prefetch", prefetch, prefetch >= 1), ("num_workers", num_workers, num_workers >= 1),
                                ("max_bad_fraction", max_bad_fraction, 0 <= max_bad_fraction <= 1)):
            if not ok:
                raise ValueError(f"Loader: invalid {name}={value!r}")
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
        if not source.shards:
            raise ValueError(f"{source} has no shards")
        self.source, self.process_fn, self.collate_fn = source, process_fn, collate_fn
        self.batch_size, self.seed, self.window_size = batch_size, seed, max(shuffle_buffer, 1)
        self.shuffle_shards, self.num_epochs, self.drop_remainder = shuffle_shards, num_epochs, drop_remainder
        self.process_index, self.process_count = process_index, process_count
        self.on_bad_record, self.max_bad_fraction = on_bad_record, max_bad_fraction
        self.prefetch, self.num_workers = prefetch, num_workers
        _, stride = assign_shards(list(range(len(source.shards))), process_index, process_count)
        if stride > 1:
            log.warning("%d shards do not divide by %d processes: every process reads every shard of %s and keeps "
                        "every %d-th row (each process reads all the data)", len(source.shards), process_count,
                        source.name, process_count)
        self._pos, self._seen, self._bad = _Pos(), 0, 0
        if state is not None:
            self.restore(state)

    # -- state -------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What a state is only valid for."""
        return {"seed": self.seed, "shuffle_buffer": self.window_size, "shuffle_shards": self.shuffle_shards,
                "num_shards": len(self.source.shards), "process_index": self.process_index,
                "process_count": self.process_count}

    def state(self) -> dict:
        """The position after the last batch handed out, as a JSON-able dict."""
        p = self._pos
        return {"epoch": p.epoch, "window": p.window, "cursor": {"shard": p.cursor[0], "row": p.cursor[1],
                                                                  "read": p.cursor[2]},
                "offset": p.offset, "rows_seen": self._seen, "rows_bad": self._bad, "loader": self._identity()}

    def restore(self, state: dict):
        """Continues from a `state()`; raises ValueError if it was saved by a loader set up differently."""
        if state.get("loader") != self._identity():
            diff = {k: (v, self._identity().get(k)) for k, v in (state.get("loader") or {}).items()
                    if self._identity().get(k) != v}
            raise ValueError(f"loader state does not match this loader (saved, now): {diff or state.get('loader')}")
        c = state["cursor"]
        self._pos = _Pos(state["epoch"], state["window"], (c["shard"], c["row"], c["read"]), state["offset"])
        self._seen, self._bad = state["rows_seen"], state["rows_bad"]

    # -- the stream --------------------------------------------------------------------------

    def epoch_shards(self, epoch: int) -> tuple[list[int], int]:
        """(this process's shards for `epoch` in reading order, row stride) — see assign_shards."""
        n = len(self.source.shards)
        order = np.random.default_rng([self.seed, 0, epoch]).permutation(n) if self.shuffle_shards else np.arange(n)
        return assign_shards([int(i) for i in order], self.process_index, self.process_count)

    def _rows(self, epoch: int, cursor: tuple[int, int, int]) -> Iterator[tuple[tuple[int, int], dict, tuple]]:
        """((shard, row_index), row, cursor after it) for this process's rows of `epoch` from `cursor`."""
        shards, stride = self.epoch_shards(epoch)
        keep = self.process_index if stride > 1 else 0
        start_pos, start_row, read = cursor
        for pos in range(start_pos, len(shards)):
            for row_index, row in self.source.read(shards[pos], start_row if pos == start_pos else 0):
                read += 1
                if (read - 1) % stride == keep:
                    yield (shards[pos], row_index), row, (pos, row_index + 1, read)

    def _stream(self, pos: _Pos) -> Iterator[tuple[tuple[int, int], dict, _Pos]]:
        """((shard, row_index), row, position after it), from `pos` to the end of the last epoch."""
        epoch, window, cursor, offset = pos.epoch, pos.window, pos.cursor, pos.offset
        while self.num_epochs is None or epoch < self.num_epochs:
            rows = self._rows(epoch, cursor)
            while items := list(itertools.islice(rows, self.window_size)):
                order = np.random.default_rng([self.seed, 1, epoch, window]).permutation(len(items))
                for j in range(offset, len(items)):
                    ref, row, _ = items[order[j]]
                    after = (_Pos(epoch, window, cursor, j + 1) if j + 1 < len(items)
                             else _Pos(epoch, window + 1, items[-1][2], 0))
                    yield ref, row, after
                window, cursor, offset = window + 1, items[-1][2], 0
            if window == 0:
                raise ValueError(f"process {self.process_index} of {self.process_count} gets no rows from "
                                 f"{self.source} in epoch {epoch}")
            epoch, window, cursor, offset = epoch + 1, 0, (0, 0, 0), 0

    def _batches(self, pos: _Pos, seen: int, bad: int) -> Iterator[tuple[dict, tuple[_Pos, int, int]]]:
        examples, epoch, last_bad = [], pos.epoch, None
        for (shard, row_index), example, after in self._processed(self._stream(pos)):
            if after.epoch != epoch and bad:
                log.info("epoch %d done: skipped %d bad of %d rows seen so far", epoch, bad, seen)
            epoch, seen = after.epoch, seen + 1
            if isinstance(example, BadRecordError):
                e = example.at(f"shard {self.source.shards[shard]}, row {row_index}")
                if self.on_bad_record == "error":
                    raise e from example.__cause__
                bad, last_bad = bad + 1, e
                log.warning("skipping bad record: %s", e)
            else:
                examples.append(example)
            if bad:
                self._check_bad(seen, bad, last_bad)
            if len(examples) == self.batch_size:
                yield self.collate_fn(examples), (after, seen, bad)
                examples = []
        if examples and not self.drop_remainder:
            yield self.collate_fn(examples), (after, seen, bad)
        if bad:
            log.info("bad records: skipped %d of %d rows seen", bad, seen)

    def _processed(self, stream):
        """The stream with each row replaced by its example (or its BadRecordError), in order;
        with num_workers > 1 a thread pool processes a few rows per worker ahead."""
        if self.num_workers == 1:
            for ref, row, after in stream:
                yield ref, self._try_process(row), after
            return
        with concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="jaxpref-process") as pool:
            while chunk := list(itertools.islice(stream, 4 * self.num_workers)):
                results = pool.map(self._try_process, [row for _, row, _ in chunk])
                for (ref, _, after), example in zip(chunk, results):
                    yield ref, example, after

    def _try_process(self, row: dict):
        try:
            return self.process_fn(row)
        except BadRecordError as e:
            return e

    def _check_bad(self, seen: int, bad: int, last: BadRecordError | None):
        if (bad == seen >= ALL_BAD_LIMIT
                or (seen >= MIN_ROWS_FOR_FRACTION and bad > self.max_bad_fraction * seen)):
            raise TooManyBadRecordsError(
                f"{bad} of {seen} rows from {self.source} were bad ({bad / seen:.1%} > max_bad_fraction="
                f"{self.max_bad_fraction})" + (f"; the last one: {last}" if last else ""))

    # -- iteration with a prefetch thread ----------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches from the current state on; each batch received advances `state()`."""
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        batches = self._batches(self._pos, self._seen, self._bad)

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work():
            try:
                for item in batches:
                    if not put(item):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(_Failed(e))

        thread = threading.Thread(target=work, name="jaxpref-loader", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.error
                batch, (self._pos, self._seen, self._bad) = item
                yield batch
        finally:
            stop.set()
            thread.join()


_END = object()


@dataclasses.dataclass
class _Failed:
    error: BaseException


def to_global(batch: dict[str, Any], mesh, batch_axes: tuple[str, ...] = ("data", "fsdp")) -> dict[str, Any]:
    """A process-local batch -> global jax.Arrays sharded over the batch dim across `batch_axes`.

    Numeric arrays [B_local, ...] become jax.Arrays [B_local * process_count, ...] with
    `jax.make_array_from_process_local_data`; other entries (e.g. object arrays of "scene"
    strings) are returned unchanged, on host.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    axes = tuple(a for a in batch_axes if a in mesh.shape)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    out = {}
    for key, value in batch.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            out[key] = value
            continue
        global_batch = value.shape[0] * jax.process_count()
        if global_batch % shards:
            raise ValueError(f"batch[{key!r}]: global batch {value.shape[0]} x {jax.process_count()} processes "
                             f"does not divide by the {shards} shards of mesh axes {axes}")
        sharding = NamedSharding(mesh, P(axes, *([None] * (value.ndim - 1))))
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
