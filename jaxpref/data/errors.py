"""The error a data row raises when it cannot be used (the loader's on_bad_record policy catches it)."""

from __future__ import annotations


class BadRecordError(ValueError):
    """A row that cannot be used.

    field: the column at fault (e.g. "images", "prompt"); reason: what is wrong;
    where: the row's location ("shard X, row N"), filled in by the loader with `at`.
    """

    def __init__(self, field: str, reason: str, *, where: str | None = None):
        self.field, self.reason, self.where = field, reason, where
        msg = f"field {field!r}: {reason}"
        super().__init__(f"{where}: {msg}" if where else msg)

    def at(self, where: str) -> "BadRecordError":
        """A copy of this error located at `where` (e.g. "shard data/train-0.parquet, row 17")."""
        return BadRecordError(self.field, self.reason, where=where)
