"""The functions expressions may call: math, strings, time on lastUpdate, geo, null handling.

Each function declares its parameter and result types, so calls are checked when the
expression is compiled; implementations raise `EvaluationError` for values outside their
domain (sqrt of a negative, log of zero), which rejects that one update and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from streams.updates import GeoPoint

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG), metres


class Type(StrEnum):
    NUMBER = "number"
    STRING = "string"
    BOOLEAN = "boolean"
    GEO_POINT = "geo_point"
    LIST = "list"
    NULL = "null"
    ANY = "any"


class EvaluationError(ValueError):
    """An expression failed on this input; the update is rejected with this reason."""


def type_of(value: Any) -> Type:
    kind = type(value)
    if kind is bool:
        return Type.BOOLEAN
    if kind is int or kind is float:
        return Type.NUMBER
    if kind is str:
        return Type.STRING
    if kind is GeoPoint:
        return Type.GEO_POINT
    if kind is list or kind is tuple:
        return Type.LIST
    if value is None:
        return Type.NULL
    return Type.ANY


def describe(value: Any) -> str:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{type_of(value).value} {shown}"


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    params: tuple[Type, ...]
    returns: Type
    impl: Callable[..., Any]
    optional: int = 0  # how many trailing params may be left out
    variadic: bool = False  # the last param repeats
    lazy: bool = False  # receives argument thunks (null handling needs to see "unavailable")

    @property
    def signature(self) -> str:
        names = [p.value for p in self.params]
        if self.optional:
            names[-self.optional :] = [f"[{n}]" for n in names[-self.optional :]]
        if self.variadic:
            names[-1] += ", ..."
        return f"{self.name}({', '.join(names)})"


# math ---------------------------------------------------------------------------------------


def _round(x: float, digits: int = 0) -> float | int:
    # Half away from zero on the shortest decimal text of x, so round(1.005, 2) == 1.01.
    if type(digits) is not int or not -15 <= digits <= 15:
        raise EvaluationError(f"round() takes a whole number of digits in -15..15, got {digits!r}")
    exact = Decimal(repr(x)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return int(exact) if digits <= 0 else float(exact)


def _sqrt(x: float) -> float:
    if x < 0:
        raise EvaluationError(f"sqrt() of a negative number ({x!r})")
    return math.sqrt(x)


def _log(x: float, base: float | None = None) -> float:
    if x <= 0:
        raise EvaluationError(f"log() of a number that is not positive ({x!r})")
    if base is None:
        return math.log(x)
    if base <= 0 or base == 1:
        raise EvaluationError(f"log() base must be positive and not 1, got {base!r}")
    return math.log(x, base)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        raise EvaluationError(f"exp({x!r}) is too large") from None


MAX_EXACT_POWER_BITS = 1024


def power(x: float, y: float) -> float:
    """x ** y. Exact for small whole numbers; otherwise in floating point, so that a user's
    expression cannot make an integer of millions of digits (it would stall the unit)."""
    if type(x) is int and type(y) is int and 0 <= y and x.bit_length() * y <= MAX_EXACT_POWER_BITS:
        exact: int = x**y
        return exact
    try:
        result: float | complex = float(x) ** y
    except OverflowError:
        raise EvaluationError(f"{x!r} ** {y!r} is too large") from None
    except ZeroDivisionError:
        raise EvaluationError(f"{x!r} ** {y!r}: zero has no negative powers") from None
    if isinstance(result, complex):
        raise EvaluationError(f"{x!r} ** {y!r} is not a real number")
    return result


def _clamp(x: float, low: float, high: float) -> float:
    if low > high:
        raise EvaluationError(f"clamp() bounds are reversed: {low!r} > {high!r}")
    return min(max(x, low), high)


def _floor(x: float) -> int:
    return math.floor(x)


def _ceil(x: float) -> int:
    return math.ceil(x)


# strings ------------------------------------------------------------------------------------


def _len(value: Any) -> int:
    if type(value) not in (str, list, tuple):
        raise EvaluationError(f"len() needs a string or a list, got {describe(value)}")
    return len(value)


def _substr(s: str, start: int, length: int | None = None) -> str:
    if type(start) is not int or (length is not None and type(length) is not int):
        raise EvaluationError("substr() takes whole-number positions")
    return s[start:] if length is None else s[start : start + max(0, length)]


def to_text(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is GeoPoint:
        return value.to_wire()
    if type(value) is float and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def _num(value: Any) -> float | int:
    if type(value) in (int, float):
        return value  # type: ignore[no-any-return]
    if type(value) is str:
        try:
            number = float(value.strip())
        except ValueError:
            raise EvaluationError(f"num() cannot read a number from {value!r}") from None
        if not math.isfinite(number):
            raise EvaluationError(f"num() got a value that is not finite: {value!r}")
        return int(number) if number.is_integer() and "." not in value else number
    raise EvaluationError(f"num() needs a string or a number, got {describe(value)}")


# time ---------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise EvaluationError(
            f"unknown time zone {name!r} (use an IANA name such as Europe/Madrid)"
        ) from None


def _moment(ms: float, tz: str | None) -> datetime:
    try:
        return datetime.fromtimestamp(ms / 1000, zone(tz) if tz else UTC)
    except (OverflowError, OSError, ValueError):
        raise EvaluationError(f"{ms!r} is not a timestamp in milliseconds") from None


def _time_part(attribute: str) -> Callable[..., int]:
    def part(ms: float, tz: str | None = None) -> int:
        moment = _moment(ms, tz)
        return moment.isoweekday() if attribute == "weekday" else int(getattr(moment, attribute))

    return part


def _duration(unit_ms: int) -> Callable[[float], float]:
    def duration(n: float) -> float:
        value = n * unit_ms
        return int(value) if float(value).is_integer() else value

    return duration


# geo ----------------------------------------------------------------------------------------


def haversine(a: GeoPoint, b: GeoPoint) -> float:
    """Great-circle distance in metres."""
    lat1, lat2 = math.radians(a.lat), math.radians(b.lat)
    dlat = lat2 - lat1
    dlon = math.radians(b.lon - a.lon)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _inside(p: GeoPoint, south: float, west: float, north: float, east: float) -> bool:
    if not south <= p.lat <= north:
        return False
    if west <= east:
        return west <= p.lon <= east
    return p.lon >= west or p.lon <= east  # the box crosses the antimeridian


def _geo(lat: float, lon: float) -> GeoPoint:
    if not -90 <= lat <= 90 or not -180 <= lon <= 180:
        raise EvaluationError(f"geo({lat!r}, {lon!r}) is outside -90..90, -180..180")
    return GeoPoint(float(lat), float(lon))


N, S, B, G, A = Type.NUMBER, Type.STRING, Type.BOOLEAN, Type.GEO_POINT, Type.ANY

FUNCTIONS: dict[str, Function] = {
    f.name: f
    for f in [
        Function("abs", (N,), N, abs),
        Function("min", (N, N), N, min, variadic=True),
        Function("max", (N, N), N, max, variadic=True),
        Function("round", (N, N), N, _round, optional=1),
        Function("floor", (N,), N, _floor),
        Function("ceil", (N,), N, _ceil),
        Function("sqrt", (N,), N, _sqrt),
        Function("pow", (N, N), N, power),
        Function("log", (N, N), N, _log, optional=1),
        Function("exp", (N,), N, _exp),
        Function("clamp", (N, N, N), N, _clamp),
        Function("len", (A,), N, _len),
        Function("lower", (S,), S, str.lower),
        Function("upper", (S,), S, str.upper),
        Function("trim", (S,), S, str.strip),
        Function("contains", (S, S), B, lambda s, sub: sub in s),
        Function("startswith", (S, S), B, str.startswith),
        Function("endswith", (S, S), B, str.endswith),
        Function("substr", (S, N, N), S, _substr, optional=1),
        Function("str", (A,), S, to_text),
        Function("num", (A,), N, _num),
        Function("year", (N, S), N, _time_part("year"), optional=1),
        Function("month", (N, S), N, _time_part("month"), optional=1),
        Function("day", (N, S), N, _time_part("day"), optional=1),
        Function("weekday", (N, S), N, _time_part("weekday"), optional=1),
        Function("hour", (N, S), N, _time_part("hour"), optional=1),
        Function("minute", (N, S), N, _time_part("minute"), optional=1),
        Function("seconds", (N,), N, _duration(1000)),
        Function("minutes", (N,), N, _duration(60_000)),
        Function("hours", (N,), N, _duration(3_600_000)),
        Function("days", (N,), N, _duration(86_400_000)),
        Function("distance", (G, G), N, haversine),
        Function("inside", (G, N, N, N, N), B, _inside),
        Function("geo", (N, N), G, _geo),
        Function("lat", (G,), N, lambda p: p.lat),
        Function("lon", (G,), N, lambda p: p.lon),
        # null handling: these see "not yet available" instead of propagating it
        Function("is_null", (A,), B, lambda x: None, lazy=True),
        Function("available", (A,), B, lambda x: None, lazy=True),
        Function("coalesce", (A, A), A, lambda *xs: None, variadic=True, lazy=True),
    ]
}
