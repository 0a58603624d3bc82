"""Service object descriptors: ServIoTicy compatibility and every descriptor-level error."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from streams import ChannelType, ServiceObject
from tests.conftest import SERVIOTICY


def _so(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "probe-1",
        "streams": {"data": {"channels": {"t": {"type": "number"}}}},
    }
    doc.update(overrides)
    return doc


def _error(doc: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        ServiceObject.model_validate(doc)
    errors = info.value.errors()
    assert len(errors) == 1, errors
    loc = ".".join(str(p) for p in errors[0]["loc"])
    return loc, errors[0]["msg"].removeprefix("Value error, ")


def test_servioticy_device_descriptor_loads_unchanged() -> None:
    raw = orjson.loads((SERVIOTICY / "so.json").read_bytes())
    so = ServiceObject.model_validate(raw)
    assert so.id == "1396461657731411aa73c28444ecf9a8c803e62312fd1"
    assert so.public is False  # ServIoTicy wrote the string "false"
    assert so.version == "0.1.0"
    data = so.streams["data"]
    assert not data.derived
    assert data.channels["location"].type is ChannelType.GEO_POINT
    assert data.channels["temperature"].unit == "degrees"
    # fields we do not model are kept, at every level
    assert so.model_extra == {
        "userId": "87a69aedb0d5410496167826b4ca2492",
        "createdAt": 1396461657731,
        "updatedAt": 1397487304724,
        "properties": [],
    }
    assert data.model_extra == {"type": "sensor"}
    written = so.to_servioticy()
    assert written["streams"] == raw["streams"]
    assert {k: written[k] for k in ("userId", "createdAt", "properties")} == {
        "userId": raw["userId"],
        "createdAt": raw["createdAt"],
        "properties": [],
    }


def test_servioticy_dispatcher_test_objects_with_filters_on_device_streams_load() -> None:
    # as ServIoTicy's dispatcher tests wrote them: a filter that lets everything through
    raw = orjson.loads((SERVIOTICY / "so.json").read_bytes())
    raw["streams"]["data"]["pre-filter"] = "true"
    raw["streams"]["data"]["post-filter"] = " TRUE "
    so = ServiceObject.model_validate(raw)
    assert so.streams["data"].pre_filter == "true"
    assert so.to_servioticy()["streams"]["data"]["pre-filter"] == "true"


def test_servioticy_composite_descriptor_loads_unchanged() -> None:
    raw = orjson.loads((SERVIOTICY / "cso.json").read_bytes())
    so = ServiceObject.model_validate(raw)
    assert so.groups["group1"].so_ids == [
        "1396461657731411aa73c28444ecf9a8c803e62312fd1",
        "139879170177572ad72be6e67450c9d4d85176e02aeb1",
    ]
    assert so.groups["group1"].stream == "data"
    fahrenheit = so.streams["fahrenheit"]
    assert fahrenheit.derived
    assert (
        fahrenheit.channels["temperature"].current_value
        == "{$group1.channels.temperature.current-value} * 1.8 + 32"
    )
    above = so.streams["aboveSeventy"]
    assert above.post_filter == "{$result.channels.temperature.current-value} > 70"
    assert above.pre_filter is None
    assert so.to_servioticy()["streams"] == raw["streams"]
    assert so.to_servioticy()["groups"] == raw["groups"]


def test_aliases_accept_servioticy_list_form_and_a_map() -> None:
    listed = ServiceObject.model_validate(_so(aliases=[{"@a@": "1"}, {"@b@": "@a@ + 1"}]))
    mapped = ServiceObject.model_validate(_so(aliases={"@a@": "1", "@b@": "@a@ + 1"}))
    assert listed.aliases == mapped.aliases == {"@a@": "1", "@b@": "@a@ + 1"}


@pytest.mark.parametrize(
    ("doc", "loc", "message"),
    [
        (
            _so(streams={}),
            "streams",
            "a service object needs at least one stream",
        ),
        (
            _so(streams={"data": {"channels": {"t": {"type": "decimal"}}}}),
            "streams.data.channels.t.type",
            "channel type 'decimal' is not one of: number, string, boolean, geo_point",
        ),
        (
            _so(id="a/b"),
            "id",
            "service object id 'a/b' is not a valid id: use 1-128 letters, digits, '_', '.', ':'"
            " or '-', starting with a letter or digit (ids become MQTT topic levels)",
        ),
        (
            _so(streams={"da+ta": {"channels": {"t": {"type": "number"}}}}),
            "streams.da+ta.[key]",
            "stream id 'da+ta' is not a valid id: use 1-128 letters, digits, '_', '.', ':'"
            " or '-', starting with a letter or digit (ids become MQTT topic levels)",
        ),
        (
            _so(streams={"data": {"channels": {"a.b": {"type": "number"}}}}),
            "streams.data.channels",
            "channel name 'a.b' is not valid: use letters, digits, '_', '$' or '-', starting"
            " with a letter, '_' or '$' (at most 64)",
        ),
        (
            _so(
                streams={
                    "d": {
                        "channels": {
                            "x": {"type": "number", "current-value": "1"},
                            "y": {"type": "number"},
                        }
                    }
                }
            ),
            "streams.d",
            "a derived stream needs a current-value on every channel; missing on: y",
        ),
        (
            _so(streams={"data": {"channels": {"t": {"type": "number"}}, "pre-filter": "t > 1"}}),
            "streams.data",
            "pre-filter and post-filter apply to derived streams only; this stream has no"
            ' channel with a current-value (on a device stream only "true", which lets'
            " everything through, is accepted)",
        ),
        (
            _so(groups={"data": {"soIds": ["x"], "stream": "s"}}),
            "",
            "'data' is both a stream and a group; expressions could not tell them apart",
        ),
        (
            _so(streams={"result": {"channels": {"t": {"type": "number"}}}}),
            "",
            "'result' is reserved for the post-filter's result; rename the stream or group",
        ),
        (
            _so(groups={"g": {"soIds": [], "stream": "data"}}),
            "groups.g.soIds",
            "a group needs at least one service object in soIds",
        ),
        (
            _so(version="1.0"),
            "version",
            "version '1.0' is not a ServIoTicy descriptor version (0.1.0 or 0.2.0)",
        ),
        (
            _so(actions=[{"name": "open"}, {"name": "open"}]),
            "",
            "action 'open' is declared twice",
        ),
    ],
)
def test_descriptor_errors_name_field_and_reason(
    doc: dict[str, Any], loc: str, message: str
) -> None:
    assert _error(doc) == (loc, message)
