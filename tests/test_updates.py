"""Sensor update validation: every error, with its exact message, and the batch forms."""

from __future__ import annotations

from typing import Any

import pytest

from streams import GeoPoint, InvalidUpdate, Rejection, RejectReason, SensorUpdate, ServiceObject
from streams.updates import StreamValidator, normalize_last_update, parse_geo_point

SO = ServiceObject.model_validate(
    {
        "id": "ambient-1",
        "streams": {
            "data": {
                "channels": {
                    "temperature": {"type": "number", "unit": "C"},
                    "location": {"type": "geo_point"},
                    "label": {"type": "string"},
                    "door": {"type": "boolean"},
                }
            }
        },
    }
)
VALIDATOR = StreamValidator("ambient-1", "data", SO.streams["data"])
T = 1_700_000_000_000


def _su(**channels: Any) -> dict[str, Any]:
    return {"channels": {k: {"current-value": v} for k, v in channels.items()}, "lastUpdate": T}


def _rejected(doc: Any) -> tuple[RejectReason, str]:
    with pytest.raises(InvalidUpdate) as info:
        VALIDATOR.update(doc)
    return info.value.reason, str(info.value)


def test_a_servioticy_update_is_accepted_with_typed_values() -> None:
    doc = _su(temperature=21.5, location="41.38,2.17", label="hall", door=False)
    doc["channels"]["temperature"]["unit"] = "C"
    assert VALIDATOR.update(doc) == SensorUpdate(
        {"temperature": 21.5, "location": GeoPoint(41.38, 2.17), "label": "hall", "door": False},
        T,
    )


def test_a_partial_update_carries_only_its_channels() -> None:
    assert VALIDATOR.update(_su(temperature=3)) == SensorUpdate({"temperature": 3}, T)


@pytest.mark.parametrize(
    ("doc", "reason", "message"),
    [
        (
            _su(humidity=40),
            RejectReason.UNKNOWN_CHANNEL,
            "ambient-1/data: unknown channel 'humidity' (the stream declares: temperature,"
            " location, label, door)",
        ),
        (
            {"channels": {"temperature": {"unit": "C"}}, "lastUpdate": T},
            RejectReason.MISSING_VALUE,
            "ambient-1/data: channel 'temperature' has no current-value",
        ),
        (
            _su(temperature=None),
            RejectReason.MISSING_VALUE,
            "ambient-1/data: channel 'temperature' has no current-value",
        ),
        (
            _su(temperature="hot"),
            RejectReason.WRONG_TYPE,
            "ambient-1/data: channel 'temperature' expects a number, got a string: 'hot'",
        ),
        (
            _su(temperature=True),
            RejectReason.WRONG_TYPE,
            "ambient-1/data: channel 'temperature' expects a number, got a boolean: True",
        ),
        (
            _su(temperature=float("nan")),
            RejectReason.WRONG_TYPE,
            "ambient-1/data: channel 'temperature' expects a finite number, got nan",
        ),
        (
            _su(label=7),
            RejectReason.WRONG_TYPE,
            "ambient-1/data: channel 'label' expects a string, got a number: 7",
        ),
        (
            _su(door="yes"),
            RejectReason.WRONG_TYPE,
            "ambient-1/data: channel 'door' expects a boolean, got a string: 'yes'",
        ),
        (
            _su(location="91,0"),
            RejectReason.BAD_GEO_POINT,
            "ambient-1/data: channel 'location' expects a geo_point as \"lat,lon\" or [lat, lon],"
            " got '91,0': latitude 91.0 is outside -90..90",
        ),
        (
            _su(location=[10, 200]),
            RejectReason.BAD_GEO_POINT,
            "ambient-1/data: channel 'location' expects a geo_point as \"lat,lon\" or [lat, lon],"
            " got [10, 200]: longitude 200.0 is outside -180..180",
        ),
        (
            _su(location="here"),
            RejectReason.BAD_GEO_POINT,
            "ambient-1/data: channel 'location' expects a geo_point as \"lat,lon\" or [lat, lon],"
            " got 'here': expected 2 coordinates, got 1",
        ),
        (
            _su(location="north,2"),
            RejectReason.BAD_GEO_POINT,
            "ambient-1/data: channel 'location' expects a geo_point as \"lat,lon\" or [lat, lon],"
            " got 'north,2': 'north' is not a number",
        ),
        (
            _su(location=41.3),
            RejectReason.BAD_GEO_POINT,
            "ambient-1/data: channel 'location' expects a geo_point as \"lat,lon\" or [lat, lon],"
            " got 41.3: got a number",
        ),
        (
            {"channels": {"temperature": {"current-value": 1}}},
            RejectReason.MISSING_LAST_UPDATE,
            "ambient-1/data: the update has no lastUpdate (an integer timestamp in milliseconds)",
        ),
        (
            {**_su(temperature=1), "lastUpdate": 1.5},
            RejectReason.BAD_LAST_UPDATE,
            "ambient-1/data: lastUpdate must be an integer timestamp in milliseconds, got a"
            " number: 1.5",
        ),
        (
            {**_su(temperature=1), "lastUpdate": "2024-01-01"},
            RejectReason.BAD_LAST_UPDATE,
            "ambient-1/data: lastUpdate must be an integer timestamp in milliseconds, got a"
            " string: '2024-01-01'",
        ),
        (
            {**_su(temperature=1), "lastUpdate": -5},
            RejectReason.BAD_LAST_UPDATE,
            "ambient-1/data: lastUpdate must not be negative, got -5",
        ),
        (
            {**_su(temperature=1), "lastUpdate": 1_700_000_000_000_000},
            RejectReason.BAD_LAST_UPDATE,
            "ambient-1/data: lastUpdate 1700000000000000 is after the year 9999 in milliseconds"
            " (is it in microseconds or nanoseconds?)",
        ),
        (
            {"channels": {}, "lastUpdate": T},
            RejectReason.NO_CHANNELS,
            "ambient-1/data: the update has no channels (expected an object like"
            ' {"<channel>": {"current-value": ...}})',
        ),
        (
            {**_su(temperature=1), "lastupdate": T},
            RejectReason.MALFORMED,
            "ambient-1/data: unexpected field 'lastupdate' in the update (it may hold only"
            " channels and lastUpdate)",
        ),
        (
            {"channels": {"temperature": {"current-value": 1, "quality": "good"}}, "lastUpdate": T},
            RejectReason.MALFORMED,
            "ambient-1/data: channel 'temperature' has unexpected field 'quality' (it may hold"
            " only current-value and unit)",
        ),
        (
            [1, 2],
            RejectReason.MALFORMED,
            "ambient-1/data: an update must be an object with channels and lastUpdate, got a list",
        ),
    ],
)
def test_each_validation_error_is_distinct_and_readable(
    doc: Any, reason: RejectReason, message: str
) -> None:
    assert _rejected(doc) == (reason, message)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (1_700_000_000_000, 1_700_000_000_000),  # milliseconds, as they should be
        (1_199_192_939, 1_199_192_939_000),  # seconds, as ServIoTicy's demo devices sent
        (99_999_999_999, 99_999_999_999_000),  # the largest value taken as seconds
        (100_000_000_000, 100_000_000_000),  # the smallest taken as milliseconds
        (0, 0),
        (1.7e12, 1_700_000_000_000),  # JavaScript devices may print a float
    ],
)
def test_last_update_unit(given: int | float, expected: int) -> None:
    assert normalize_last_update(given) == expected


def test_geo_point_forms() -> None:
    assert parse_geo_point("41.38, 2.17") == GeoPoint(41.38, 2.17)
    assert parse_geo_point([41.38, 2.17]) == GeoPoint(41.38, 2.17)
    assert parse_geo_point(["-90", "180"]) == GeoPoint(-90.0, 180.0)
    assert GeoPoint(41.38, 2.17).to_wire() == "41.38,2.17"


def test_list_batch_accepts_good_updates_and_rejects_bad_ones_by_index() -> None:
    accepted, rejected = VALIDATOR.document(
        [_su(temperature=1), _su(temperature="x"), {"channels": {"door": {"current-value": True}}}]
    )
    assert accepted == [SensorUpdate({"temperature": 1}, T)]
    assert rejected == [
        Rejection(
            RejectReason.WRONG_TYPE,
            "ambient-1/data update 1: channel 'temperature' expects a number, got a string: 'x'",
            "ambient-1",
            "data",
            1,
        ),
        Rejection(
            RejectReason.MISSING_LAST_UPDATE,
            "ambient-1/data update 2: the update has no lastUpdate (an integer timestamp in"
            " milliseconds)",
            "ambient-1",
            "data",
            2,
        ),
    ]


def test_columnar_batch() -> None:
    accepted, rejected = VALIDATOR.document(
        {
            "lastUpdate": [T, T + 1000, T + 2000],
            "channels": {"temperature": [20.5, 21, None], "location": ["1,2", [3, 4], "5,6"]},
        }
    )
    assert accepted == [
        SensorUpdate({"temperature": 20.5, "location": GeoPoint(1.0, 2.0)}, T),
        SensorUpdate({"temperature": 21, "location": GeoPoint(3.0, 4.0)}, T + 1000),
    ]
    assert [(r.reason, r.index, r.message) for r in rejected] == [
        (
            RejectReason.MISSING_VALUE,
            2,
            "ambient-1/data update 2: channel 'temperature' has no current-value",
        )
    ]


@pytest.mark.parametrize(
    ("doc", "reason", "message"),
    [
        (
            {"lastUpdate": [T, T], "channels": {"temperature": [1]}},
            RejectReason.MALFORMED,
            "ambient-1/data: columnar channel 'temperature' must be a list of 2 values (one per"
            " lastUpdate), got 1 value",
        ),
        (
            {"lastUpdate": [T], "channels": {"temperature": 1}},
            RejectReason.MALFORMED,
            "ambient-1/data: columnar channel 'temperature' must be a list of 1 value (one per"
            " lastUpdate), got a number",
        ),
        (
            {"lastUpdate": [T], "channels": {}},
            RejectReason.NO_CHANNELS,
            "ambient-1/data: the columnar batch has no channels (expected"
            ' {"<channel>": [v0, v1, ...]} beside lastUpdate: [t0, t1, ...])',
        ),
        (
            {"lastUpdate": [T], "channels": {"temperature": [1]}, "x": 1},
            RejectReason.MALFORMED,
            "ambient-1/data: unexpected field 'x' in the columnar batch",
        ),
    ],
)
def test_columnar_shape_errors_reject_the_whole_message(
    doc: Any, reason: RejectReason, message: str
) -> None:
    accepted, rejected = VALIDATOR.document(doc)
    assert accepted == []
    assert rejected == [Rejection(reason, message, "ambient-1", "data", None)]


def test_single_update_document() -> None:
    assert VALIDATOR.document(_su(temperature=1)) == ([SensorUpdate({"temperature": 1}, T)], [])
    accepted, rejected = VALIDATOR.document("hello")
    assert accepted == []
    assert [r.reason for r in rejected] == [RejectReason.MALFORMED]
