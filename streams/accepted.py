"""Accepted updates in arrival order, as rows or as column runs.

A device message in the columnar form (`{"lastUpdate": [...], "channels": {"t": [...]}}`)
whose every reading is valid is kept as it was decoded: one `ColumnRun`, its times and one
list per channel, with no object per reading; so are consecutive single-update messages of
streams of one shape (`MessageRun`: a column per channel, the stream of each message beside
it), straight from their bytes. `Updates` strings rows and runs together in
arrival order and reads as a sequence of `(StreamKey, SensorUpdate)` rows: a run's
`SensorUpdate` objects are made only when something reads it as rows (the echo, a plug-in,
a composite stream), while the flows' window kernels read its columns directly
(`kernels.fold_parts`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any, overload

from streams.updates import SensorUpdate, StreamKey

Row = tuple[StreamKey, SensorUpdate]
_first = itemgetter(0)


class ColumnRun:
    """The readings of one columnar message, all valid: times (ms) and one column per channel,
    every cell present. The ingest kernel types them (times int64; a number channel's values
    int64 or double when all of one type, a list otherwise); a list of values reads the same."""

    __slots__ = ("columns", "key", "names", "times")

    def __init__(
        self, key: StreamKey, times: Sequence[int], names: list[str], columns: list[Any]
    ) -> None:
        self.key = key
        self.times = times
        self.names = names
        self.columns = columns

    def __len__(self) -> int:
        return len(self.times)

    def row(self, i: int) -> Row:
        channels = {n: column[i] for n, column in zip(self.names, self.columns, strict=True)}
        return self.key, SensorUpdate(channels, self.times[i])

    def rows(self) -> list[Row]:
        key, names = self.key, self.names
        return [
            (key, SensorUpdate(dict(zip(names, values, strict=True)), t))
            for t, *values in zip(self.times, *self.columns, strict=True)
        ]

    def __repr__(self) -> str:
        return f"ColumnRun({self.key.so}/{self.key.stream}, {len(self)} readings)"


class Shape:
    """The channels of a stream as the ingest kernel reads them: names in declaration order,
    the kind code of each, and each name's column."""

    __slots__ = ("column_of", "encoded", "kind_of", "kinds", "names")

    def __init__(self, kind_of: dict[str, int]) -> None:
        self.kind_of = kind_of
        self.names = list(kind_of)
        self.kinds = list(kind_of.values())
        self.column_of = {name: j for j, name in enumerate(self.names)}
        self.encoded = [name.encode() for name in self.names]  # matched against the bytes


class MessageRun:
    """Consecutive single-update messages of streams of one shape, as columns: the stream of
    each, its time (int64), and one column per channel of the shape (doubles, NaN where a
    message did not carry the channel, for a number channel of floats only; a list, None
    where absent, otherwise). The ingest kernel writes them straight from the payloads, without a
    dict or an update object per message; a message's channels are in the shape's order
    (others are rows), so a row made of it has its channels in the message's order."""

    __slots__ = ("columns", "distinct", "keys", "names", "times")

    def __init__(
        self,
        keys: list[StreamKey],
        times: Sequence[int],
        names: list[str],
        columns: list[Any],
        distinct: list[StreamKey] | None = None,
    ) -> None:
        self.keys = keys
        self.times = times
        self.names = names
        self.columns = columns
        self.distinct = distinct  # the keys without repeats, when the kernel counted them

    def __len__(self) -> int:
        return len(self.times)

    def row(self, i: int) -> Row:
        # absent: None in a list, NaN in doubles (v == v: no value of a message is NaN)
        channels = {n: v for n, c in zip(self.names, self.columns, strict=True)
                    if (v := c[i]) is not None and v == v}  # fmt: skip
        return self.keys[i], SensorUpdate(channels, self.times[i])

    def rows(self) -> list[Row]:
        if len(self.names) == 1:  # the common case: one channel
            name, values = self.names[0], zip(self.times, self.columns[0], strict=True)
            return [(k, SensorUpdate({name: v} if v is not None and v == v else {}, t))
                    for k, (t, v) in zip(self.keys, values, strict=True)]  # fmt: skip
        return [self.row(i) for i in range(len(self.times))]

    def __repr__(self) -> str:
        return f"MessageRun({len(self)} messages, channels {self.names})"


Part = list[Row] | ColumnRun | MessageRun


class Updates(Sequence[Row]):
    """Rows and column runs in arrival order, read as rows (made once, when first read)."""

    __slots__ = ("_ends", "_keys", "_len", "_rows", "parts")

    def __init__(self, rows: Iterable[Row] = ()) -> None:
        self.parts: list[Part] = []  # lists of rows, column and message runs, in arrival order
        self._ends: list[int] = []  # the number of rows up to the end of each part
        self._len = 0
        self._rows: list[Row] | None = None  # every row, once read as rows
        self._keys: set[StreamKey] | None = None
        self.extend(rows)

    @classmethod
    def of_run(cls, run: ColumnRun | MessageRun) -> Updates:
        out = cls()
        out._add(run, len(run))
        return out

    def add_part(self, part: Part) -> None:
        """`part` after the updates held (a list of rows is taken as it is, not copied)."""
        self._add(part, len(part))

    def _add(self, part: Part, n: int) -> None:
        if not n:
            return
        self.parts.append(part)
        self._len += n
        self._ends.append(self._len)
        self._rows = self._keys = None

    def append(self, row: Row) -> None:
        last = self.parts[-1] if self.parts else None
        if type(last) is list:
            last.append(row)
            self._len += 1
            self._ends[-1] = self._len
            self._rows = self._keys = None
        else:
            self._add([row], 1)

    def extend(self, rows: Iterable[Row]) -> None:
        if isinstance(rows, Updates):
            for part in rows.parts:
                self._add(list(part) if type(part) is list else part, len(part))
            return
        rows = list(rows)
        last = self.parts[-1] if self.parts else None
        if type(last) is list and rows:
            last.extend(rows)
            self._len += len(rows)
            self._ends[-1] = self._len
            self._rows = self._keys = None
        else:
            self._add(rows, len(rows))

    def __iadd__(self, rows: Iterable[Row]) -> Updates:
        self.extend(rows)
        return self

    @property
    def has_runs(self) -> bool:
        return any(type(part) is not list for part in self.parts)

    def keys(self) -> set[StreamKey]:
        """The streams these updates belong to, without reading runs as rows."""
        if self._keys is None:
            out: set[StreamKey] = set()
            for part in self.parts:
                if isinstance(part, list):
                    out.update(map(_first, part))
                elif isinstance(part, MessageRun):
                    out.update(part.keys if part.distinct is None else part.distinct)
                else:
                    out.add(part.key)
            self._keys = out
        return self._keys

    def rows(self) -> list[Row]:
        """Every update as a (key, SensorUpdate) row (runs are made into rows once)."""
        if self._rows is None:
            if len(self.parts) == 1 and type(self.parts[0]) is list:
                self._rows = self.parts[0]
            else:
                rows: list[Row] = []
                for part in self.parts:
                    rows.extend(part if isinstance(part, list) else part.rows())
                self._rows = rows
        return self._rows

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows())

    @overload
    def __getitem__(self, i: int) -> Row: ...

    @overload
    def __getitem__(self, i: slice) -> list[Row]: ...

    def __getitem__(self, i: int | slice) -> Row | list[Row]:
        if isinstance(i, slice) or self._rows is not None:
            return self.rows()[i]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("update index out of range")
        at = bisect_right(self._ends, i)  # one row, without making the others
        part = self.parts[at]
        offset = i - (self._ends[at - 1] if at else 0)
        return part[offset] if isinstance(part, list) else part.row(offset)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Updates | list):
            return self.rows() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Updates({self.parts!r})"
