"""The columnar kernel, pure Python: the specification of `_columnar.pyx`.

A columnar batch `{"lastUpdate": [t0, ...], "channels": {"c": [v0, ...]}}` becomes sensor
updates, checked column by column without building a dict per reading first. A reading with
anything unusual (a missing or mistyped value, a lastUpdate to scale or refuse, a geo_point)
goes to `fallback(i)`, which validates that row the slow way and returns its SensorUpdate, or
raises InvalidUpdate: messages and reasons stay exactly those of the row path.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from typing import Any

NUMBER, STRING, BOOLEAN, OTHER = 0, 1, 2, 3
SECONDS_BELOW = 100_000_000_000  # below: seconds, as old devices send
WIDEST = 64  # the most channels of a shape read into a message run (wider: rows)
MAX_LAST_UPDATE = 253_402_300_799_999


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # a number channel's integers: signed 64-bit


def _fits(v: Any, kind: int) -> bool:
    """Whether `v` is a good value of a channel of `kind` as it is (anything else: slow path)."""
    tv = type(v)
    if kind == NUMBER:
        return (tv is int and INT64_MIN <= v <= INT64_MAX) or (tv is float and math.isfinite(v))
    if kind == STRING:
        return tv is str
    if kind == BOOLEAN:
        return tv is bool
    return False


def columnar_fits(times: list[Any], columns: list[list[Any]], kinds: list[int]) -> bool:
    """Whether every reading of a columnar batch is good as it is (times in ms, every value of
    its channel's kind): then it needs no update object per reading to be checked."""
    if not all(type(t) is int and SECONDS_BELOW <= t <= MAX_LAST_UPDATE for t in times):
        return False
    return all(_fits(v, kind) for column, kind in zip(columns, kinds, strict=True)
               for v in column)  # fmt: skip


def columnar_updates(
    times: list[Any],
    names: list[str],
    columns: list[list[Any]],
    kinds: list[int],
    make: Callable[[dict[str, Any], int], Any],
    fallback: Callable[[int], Any],
    invalid: type[Exception],
) -> tuple[list[Any], list[Any]]:
    """(accepted updates, rejections); `invalid` is the exception `fallback` raises, whose
    `.rejection` is collected."""
    accepted: list[Any] = []
    rejected: list[Any] = []
    m = len(names)
    for i in range(len(times)):
        t = times[i]
        ok = type(t) is int and SECONDS_BELOW <= t <= MAX_LAST_UPDATE
        values: dict[str, Any] = {}
        j = 0
        while ok and j < m:
            v = columns[j][i]
            ok = _fits(v, kinds[j])
            values[names[j]] = v
            j += 1
        if ok:
            accepted.append(make(values, t))
            continue
        try:
            accepted.append(fallback(i))
        except invalid as exc:
            rejected.append(exc.rejection)  # type: ignore[attr-defined]
    return accepted, rejected


def row_updates(
    docs: list[Any], kinds: list[dict[str, int]], make: Callable[[dict[str, Any], int], Any]
) -> list[Any]:
    """One decoded single-update document per message, `kinds[i]` the channel kinds of its
    stream: the SensorUpdate of each document in the plain shape
    `{"lastUpdate": ms, "channels": {"c": {"current-value": v}}}` with good values, else None,
    and the caller validates that one the slow way (which words any rejection)."""
    out: list[Any] = []
    for doc, kind_of in zip(docs, kinds, strict=True):
        out.append(_row(doc, kind_of, make))
    return out


def _row(doc: Any, kind_of: dict[str, int], make: Callable[[dict[str, Any], int], Any]) -> Any:
    if type(doc) is not dict or len(doc) != 2:
        return None
    t = doc.get("lastUpdate")
    raw = doc.get("channels")
    if type(t) is not int or not SECONDS_BELOW <= t <= MAX_LAST_UPDATE:
        return None
    if type(raw) is not dict or not raw:
        return None
    values: dict[str, Any] = {}
    for name, entry in raw.items():
        k = kind_of.get(name)
        if k is None or type(entry) is not dict or len(entry) != 1:
            return None
        v = entry.get("current-value")
        if not _fits(v, k):
            return None
        values[name] = v
    return make(values, t)


def _plain(doc: Any, shape: Any) -> tuple[int, list[Any]] | None:
    """(time, one value or None per channel of `shape`) of a document in the plain shape whose
    channels come in the shape's order; None for anything else."""
    if type(doc) is not dict or len(doc) != 2:
        return None
    t = doc.get("lastUpdate")
    raw = doc.get("channels")
    if type(t) is not int or not SECONDS_BELOW <= t <= MAX_LAST_UPDATE:
        return None
    if type(raw) is not dict or not raw:
        return None
    row: list[Any] = [None] * len(shape.names)
    last = -1
    for name, entry in raw.items():
        j = shape.column_of.get(name)
        if j is None or j <= last or type(entry) is not dict or len(entry) != 1:
            return None
        v = entry.get("current-value")
        if not _fits(v, shape.kinds[j]):
            return None
        row[j] = v
        last = j
    return t, row


def typed(column: list[Any], kind: int) -> Sequence[Any]:
    """A good column as the kernel keeps it: a number channel's values as one typed array
    (int64 or double) when they are all of one type, as they are otherwise."""
    if kind == NUMBER and column:
        if all(type(v) is float for v in column):
            return array("d", column)
        if all(type(v) is int for v in column):
            return array("q", column)
    return column


def columns_of(doc: Any, shape: Any) -> tuple[Any, list[str], list[Any]] | None:
    """(times, channel names, columns) of a document in the columnar form whose every reading
    is good as it is (`StreamValidator.valid_columns`, against a shape), the times an int64
    array and the columns `typed`; None otherwise."""
    if type(doc) is not dict or len(doc) != 2:
        return None
    times, channels = doc.get("lastUpdate"), doc.get("channels")
    if type(times) is not list or not times or type(channels) is not dict or not channels:
        return None
    if not all(type(t) is int and SECONDS_BELOW <= t <= MAX_LAST_UPDATE for t in times):
        return None
    names: list[str] = []
    columns: list[Sequence[Any]] = []
    for name, column in channels.items():
        j = shape.column_of.get(name)
        if j is None or type(column) is not list or len(column) != len(times):
            return None
        kind = shape.kinds[j]
        if not all(_fits(v, kind) for v in column):
            return None
        names.append(shape.names[j])
        columns.append(typed(column, kind))
    return array("q", times), names, columns


def ingest_rows(
    messages: Sequence[Any],
    routes: dict[str, tuple[Any, Any]],
    max_bytes: int,
    horizon: int | None,
    make: Callable[[dict[str, Any], int], Any],
    loads: Callable[[bytes], Any],
    unpack: Callable[[bytes], Any] | None = None,
) -> tuple[list[Any], list[Any], list[int], list[int]]:
    """A batch of device messages in one call: those whose topic has a route (`routes`: topic
    -> (its StreamKey, its stream's `streams.accepted.Shape`)) and a body of at most
    `max_bytes` that is a JSON object or list (no content type, or exactly application/json:
    `loads`) or a msgpack map or array (no content type, or exactly application/msgpack:
    `unpack`), and hold updates in the plain shape with good values no later than `horizon`
    (one, a list of them) or a columnar batch of good readings, are accepted, with the message
    of each update in `origins`; the index of every other message goes to `slow`, for the
    caller's slow path (which words any rejection).

    The accepted come as parts (`parts`, in the messages' order, none spanning a slow
    message): `MessageRun`s of consecutive updates of one shape whose channels come in the
    shape's order, read into columns without an update object each, a `ColumnRun` per
    message in the columnar form whose every reading is good (`columns_of`), and lists of
    (key, update) rows for the others; `starts` has the index of each part's first message."""
    from streams.accepted import ColumnRun, MessageRun

    parts: list[Any] = []
    origins: list[Any] = []
    slow: list[int] = []
    starts: list[int] = []  # the index of each part's first message
    run: MessageRun | None = None  # the part being written, while messages continue it
    shapes: list[tuple[MessageRun, list[list[Any]], Any]] = []
    times: array[int] = array("q")
    cells: list[list[Any]] = []
    shape: Any = None
    rows: list[Any] | None = None
    for i, message in enumerate(messages):
        route = routes.get(message.topic)
        content_type = message.content_type
        payload = message.payload
        codec = _codec(content_type, payload) if route and 0 < len(payload) <= max_bytes else -1
        if route is None or codec < 0 or (codec == 1 and unpack is None):
            slow.append(i)
            run = rows = None
            continue
        try:
            doc = loads(payload) if codec == 0 else unpack(payload)  # type: ignore[misc]
        except Exception:  # the slow path says what is wrong with it
            slow.append(i)
            run = rows = None
            continue
        if type(doc) is list:  # a list of updates: all in the plain shape, or the slow path
            plains = [_plain(d, route[1]) for d in doc] if len(route[1].names) <= WIDEST else []
            if not plains or any(p is None or (horizon is not None and p[0] > horizon)
                                 for p in plains):  # fmt: skip
                slow.append(i)
                run = rows = None
                continue
        else:
            plains = [_plain(doc, route[1]) if len(route[1].names) <= WIDEST else None]
        plain = plains[0]
        if plain is None and (columns := columns_of(doc, route[1])) is not None:
            if horizon is not None and max(columns[0]) > horizon:  # read row by row
                slow.append(i)
            else:  # a columnar message: a column run of its own
                parts.append(ColumnRun(route[0], *columns))
                starts.append(i)
                origins += [message] * len(columns[0])
            run = rows = None
            continue
        if plain is not None:
            if horizon is not None and plain[0] > horizon:
                slow.append(i)
                run = rows = None
                continue
            if run is None or shape is not route[1]:
                shape = route[1]
                times, cells = array("q"), [[] for _ in shape.names]
                run = MessageRun([], times, shape.names, cells)
                parts.append(run)
                starts.append(i)
                shapes.append((run, cells, shape))
                rows = None
            for one in plains:
                assert one is not None
                run.keys.append(route[0])
                times.append(one[0])
                for column, v in zip(cells, one[1], strict=True):
                    column.append(v)
                origins.append(message)
            continue
        update = _row(doc, route[1].kind_of, make)
        if update is None or (horizon is not None and update.last_update > horizon):
            slow.append(i)
            run = rows = None
            continue
        if rows is None:
            rows = []
            parts.append(rows)
            starts.append(i)
            run = None
        rows.append((route[0], update))
        origins.append(message)
    for run, cells, shape in shapes:  # the columns typed as the kernel types them
        run.columns = [message_column(c, k) for c, k in zip(cells, shape.kinds, strict=True)]
    return parts, origins, slow, starts


def _codec(content_type: str | None, payload: bytes) -> int:
    """0 for a JSON body the kernel reads (an object or a list), 1 for msgpack (a map or an
    array), -1 for anything else (the slow path detects and words it)."""
    first = payload[0]
    if content_type is None:
        if first in (0x7B, 0x5B):  # { [
            return 0
        return 1 if 0x80 <= first <= 0x9F or 0xDC <= first <= 0xDF else -1
    if content_type == "application/json":
        return 0 if first in (0x7B, 0x5B) else -1
    return 1 if content_type == "application/msgpack" else -1


def message_column(cells: list[Any], kind: int) -> Sequence[Any]:
    """A message run's column as the kernel keeps it: a number channel's doubles (NaN where a
    message lacks it) unless an int is among them; a list (None where absent) otherwise."""
    if kind == NUMBER and all(v is None or type(v) is float for v in cells):
        return array("d", [math.nan if v is None else v for v in cells])
    return cells
