"""Sensor updates: what a device posts, and their validation against a stream's channels.

Wire shape (ServIoTicy):

    {"channels": {"temperature": {"current-value": 21.5}}, "lastUpdate": 1700000000000}

A message may instead carry a batch, as a list of such objects or in the columnar form

    {"lastUpdate": [t0, t1, ...], "channels": {"temperature": [v0, v1, ...], ...}}

`lastUpdate` is milliseconds since the Unix epoch. Old ServIoTicy devices sent seconds: a
value below `SECONDS_BELOW` (1e11, i.e. before 1973-03-03 read as ms, or after the year 5138
read as s) is taken as seconds and multiplied by 1000.

A `StreamValidator` is built once per stream and reused for every update on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from streams import kernels
from streams.objects import ChannelType, Stream
from streams.rejections import InvalidUpdate, Rejection, RejectReason, show_value

SECONDS_BELOW = 100_000_000_000
"""A lastUpdate below this is in seconds (ServIoTicy demo devices); at or above, milliseconds."""

MAX_LAST_UPDATE = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z in milliseconds; anything larger is a unit mistake (µs, ns)."""


class GeoPoint(NamedTuple):
    """A WGS84 position. On the wire: the string "lat,lon" or the list [lat, lon]."""

    lat: float
    lon: float

    def to_wire(self) -> str:
        return f"{self.lat!r},{self.lon!r}"


Value = bool | int | float | str | GeoPoint


@dataclass(slots=True)
class SensorUpdate:
    """Validated values of some or all of a stream's channels at one instant (ms).

    Shared by every stage that reads it (flows, processors, sinks): treat it as immutable.
    It is not a frozen dataclass because one is made per reading, and a frozen one costs
    three times as much to create."""

    channels: dict[str, Value]
    last_update: int


class StreamKey(NamedTuple):
    """Where an update belongs: service object id and stream id."""

    so: str
    stream: str


class _ValueProblem(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _values(n: int) -> str:
    return f"{n} value" if n == 1 else f"{n} values"


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _number(value: Any) -> Value:
    """A number channel's value: a finite double, or an integer within signed 64 bits (what
    every store and Kafka consumer downstream holds exactly; nothing wraps or rounds
    silently). A JSON integer literal beyond 64 bits is read as the nearest double by the
    JSON decoder (as JavaScript does), and is a float from then on."""
    kind = type(value)
    if kind is int:
        if not INT64_MIN <= value <= INT64_MAX:
            raise _ValueProblem(
                RejectReason.WRONG_TYPE,
                f"expects a number within the signed 64-bit integer range, got {value}"
                " (send larger values as floats)",
            )
        return value  # type: ignore[no-any-return]
    if kind is float:
        if not math.isfinite(value):
            raise _ValueProblem(RejectReason.WRONG_TYPE, f"expects a finite number, got {value!r}")
        return value  # type: ignore[no-any-return]
    raise _ValueProblem(
        RejectReason.WRONG_TYPE, f"expects a number, got {_kind(value)}: {show_value(value)}"
    )


def _string(value: Any) -> Value:
    if type(value) is str:
        return value
    raise _ValueProblem(
        RejectReason.WRONG_TYPE, f"expects a string, got {_kind(value)}: {show_value(value)}"
    )


def _boolean(value: Any) -> Value:
    if type(value) is bool:
        return value
    raise _ValueProblem(
        RejectReason.WRONG_TYPE, f"expects a boolean, got {_kind(value)}: {show_value(value)}"
    )


def _coordinate(value: Any) -> float:
    if type(value) in (int, float):
        return float(value)
    if type(value) is str:
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{show_value(value)} is not a number")


def parse_geo_point(value: Any) -> GeoPoint:
    """A GeoPoint from "lat,lon" or [lat, lon]; ValueError saying what is wrong otherwise."""
    if type(value) is str:
        parts = value.split(",")
    elif type(value) in (list, tuple):
        parts = list(value)
    else:
        raise ValueError(f"got {_kind(value)}")
    if len(parts) != 2:
        raise ValueError(f"expected 2 coordinates, got {len(parts)}")
    lat, lon = _coordinate(parts[0]), _coordinate(parts[1])
    if not -90.0 <= lat <= 90.0:
        raise ValueError(f"latitude {lat!r} is outside -90..90")
    if not -180.0 <= lon <= 180.0:
        raise ValueError(f"longitude {lon!r} is outside -180..180")
    return GeoPoint(lat, lon)


def _geo_point(value: Any) -> Value:
    try:
        return parse_geo_point(value)
    except ValueError as exc:
        raise _ValueProblem(
            RejectReason.BAD_GEO_POINT,
            f'expects a geo_point as "lat,lon" or [lat, lon], got {show_value(value)}: {exc}',
        ) from None


_CHECKS: dict[ChannelType, Callable[[Any], Value]] = {
    ChannelType.NUMBER: _number,
    ChannelType.STRING: _string,
    ChannelType.BOOLEAN: _boolean,
    ChannelType.GEO_POINT: _geo_point,
}

# the columnar kernel's codes; geo_point readings take the row path
_KIND_CODES = {ChannelType.NUMBER: 0, ChannelType.STRING: 1, ChannelType.BOOLEAN: 2,
               ChannelType.GEO_POINT: 3}  # fmt: skip
_UPDATE_KEYS = frozenset({"channels", "lastUpdate"})
_CHANNEL_KEYS = frozenset({"current-value", "unit"})


def normalize_last_update(value: Any) -> int:
    """lastUpdate in milliseconds; seconds from old devices are scaled. ValueError if invalid."""
    if type(value) is not int:
        if type(value) is float and value.is_integer():
            value = int(value)  # JavaScript devices may send 1.7e12
        else:
            raise ValueError(
                f"lastUpdate must be an integer timestamp in milliseconds, got {_kind(value)}:"
                f" {show_value(value)}"
            )
    ms: int = value  # an int from here on
    if ms < 0:
        raise ValueError(f"lastUpdate must not be negative, got {ms}")
    if ms < SECONDS_BELOW:
        return ms * 1000
    if ms > MAX_LAST_UPDATE:
        raise ValueError(
            f"lastUpdate {ms} is after the year 9999 in milliseconds"
            " (is it in microseconds or nanoseconds?)"
        )
    return ms


class StreamValidator:
    """Checks updates posted to one raw stream; built once, called per update or batch."""

    __slots__ = ("_checks", "_declared", "_kinds", "_prefix", "so_id", "stream_id")

    @property
    def kinds(self) -> dict[str, int]:
        """Channel name -> kind code, for the kernels (`streams.kernels`)."""
        return self._kinds

    def __init__(self, so_id: str, stream_id: str, stream: Stream) -> None:
        self.so_id = so_id
        self.stream_id = stream_id
        self._checks = {name: _CHECKS[ch.type] for name, ch in stream.channels.items()}
        self._kinds = {name: _KIND_CODES[ch.type] for name, ch in stream.channels.items()}
        self._declared = ", ".join(stream.channels)
        self._prefix = f"{so_id}/{stream_id}"

    def _reject(self, reason: RejectReason, detail: str, index: int | None) -> InvalidUpdate:
        where = self._prefix if index is None else f"{self._prefix} update {index}"
        return InvalidUpdate(
            Rejection(reason, f"{where}: {detail}", self.so_id, self.stream_id, index)
        )

    def update(self, doc: Any, index: int | None = None) -> SensorUpdate:
        """Validate one update in the ServIoTicy shape; raises InvalidUpdate naming the problem."""
        if type(doc) is not dict:
            raise self._reject(
                RejectReason.MALFORMED,
                f"an update must be an object with channels and lastUpdate, got {_kind(doc)}",
                index,
            )
        extra = doc.keys() - _UPDATE_KEYS
        if extra:
            raise self._reject(
                RejectReason.MALFORMED,
                f"unexpected field {', '.join(sorted(map(repr, extra)))} in the update"
                " (it may hold only channels and lastUpdate)",
                index,
            )
        if "lastUpdate" not in doc:
            raise self._reject(
                RejectReason.MISSING_LAST_UPDATE,
                "the update has no lastUpdate (an integer timestamp in milliseconds)",
                index,
            )
        try:
            last_update = normalize_last_update(doc["lastUpdate"])
        except ValueError as exc:
            raise self._reject(RejectReason.BAD_LAST_UPDATE, str(exc), index) from None
        raw = doc.get("channels")
        if type(raw) is not dict or not raw:
            raise self._reject(
                RejectReason.NO_CHANNELS,
                "the update has no channels (expected an object like"
                ' {"<channel>": {"current-value": ...}})',
                index,
            )
        values: dict[str, Value] = {}
        for name, entry in raw.items():
            check = self._checks.get(name)
            if check is None:
                raise self._reject(
                    RejectReason.UNKNOWN_CHANNEL,
                    f"unknown channel {name!r} (the stream declares: {self._declared})",
                    index,
                )
            if type(entry) is not dict or entry.get("current-value") is None:
                raise self._reject(
                    RejectReason.MISSING_VALUE,
                    f"channel {name!r} has no current-value",
                    index,
                )
            if len(entry) > 1 and not entry.keys() <= _CHANNEL_KEYS:
                unexpected = sorted(map(repr, entry.keys() - _CHANNEL_KEYS))
                raise self._reject(
                    RejectReason.MALFORMED,
                    f"channel {name!r} has unexpected field {', '.join(unexpected)}"
                    " (it may hold only current-value and unit)",
                    index,
                )
            try:
                values[name] = check(entry["current-value"])
            except _ValueProblem as problem:
                raise self._reject(
                    problem.reason, f"channel {name!r} {problem.detail}", index
                ) from None
        return SensorUpdate(values, last_update)

    def document(self, doc: Any) -> tuple[list[SensorUpdate], list[Rejection]]:
        """Validate a message body: one update, a list of updates, or the columnar form.

        Each update in a batch stands on its own: bad ones become rejections with their
        index, good ones are accepted.
        """
        if type(doc) is list:
            return self._each(enumerate(doc))
        if type(doc) is dict and type(doc.get("lastUpdate")) is list:
            try:
                times, names, columns = self._columns(doc)
            except InvalidUpdate as exc:
                return [], [exc.rejection]
            unknown = [n for n in names if n not in self._kinds]
            if unknown:  # every reading has it: the row path words the rejections
                rows = (self._row(times, names, columns, i) for i in range(len(times)))
                return self._each(enumerate(rows))
            split: tuple[list[SensorUpdate], list[Rejection]] = kernels.columnar_updates(
                times, names, columns, [self._kinds[n] for n in names], SensorUpdate,
                lambda i: self.update(self._row(times, names, columns, i), i), InvalidUpdate,
            )  # fmt: skip
            return split
        try:
            return [self.update(doc)], []
        except InvalidUpdate as exc:
            return [], [exc.rejection]

    def valid_columns(self, doc: Any) -> tuple[list[int], list[str], list[list[Any]]] | None:
        """A columnar batch whose every reading is good as it is, as (times, channel names,
        columns), checked without an update object per reading; None for anything else
        (`document` words what is wrong)."""
        if type(doc) is not dict or type(doc.get("lastUpdate")) is not list:
            return None
        try:
            times, names, columns = self._columns(doc)
        except InvalidUpdate:
            return None
        kinds = self._kinds
        if not times or any(n not in kinds for n in names):
            return None
        if not kernels.columnar_fits(times, columns, [kinds[n] for n in names]):
            return None
        return times, names, columns

    def _each(self, docs: Iterable[tuple[int, Any]]) -> tuple[list[SensorUpdate], list[Rejection]]:
        accepted: list[SensorUpdate] = []
        rejected: list[Rejection] = []
        for i, doc in docs:
            try:
                accepted.append(self.update(doc, i))
            except InvalidUpdate as exc:
                rejected.append(exc.rejection)
        return accepted, rejected

    @staticmethod
    def _row(times: list[Any], names: list[str], columns: list[list[Any]], i: int) -> Any:
        channels = {n: {"current-value": c[i]} for n, c in zip(names, columns, strict=True)}
        return {"lastUpdate": times[i], "channels": channels}

    def _columns(self, doc: dict[str, Any]) -> tuple[list[Any], list[str], list[list[Any]]]:
        """The columnar form's times, channel names and columns, after checking its shape."""
        times: list[Any] = doc["lastUpdate"]
        columns = doc.get("channels")
        extra = doc.keys() - _UPDATE_KEYS
        if extra:
            raise self._reject(
                RejectReason.MALFORMED,
                f"unexpected field {', '.join(sorted(map(repr, extra)))} in the columnar batch",
                None,
            )
        if type(columns) is not dict or not columns:
            raise self._reject(
                RejectReason.NO_CHANNELS,
                "the columnar batch has no channels (expected"
                ' {"<channel>": [v0, v1, ...]} beside lastUpdate: [t0, t1, ...])',
                None,
            )
        for name, column in columns.items():
            if type(column) is not list or len(column) != len(times):
                got = _values(len(column)) if type(column) is list else _kind(column)
                raise self._reject(
                    RejectReason.MALFORMED,
                    f"columnar channel {name!r} must be a list of {_values(len(times))}"
                    f" (one per lastUpdate), got {got}",
                    None,
                )
        return times, list(columns), list(columns.values())
