"""The ingest stage, without a broker: every message becomes updates or dead letters."""

from __future__ import annotations

import msgpack
import orjson

from processors.ingest import Ingest, RawMessage
from streams import GeoPoint, Registry, RejectReason, SensorUpdate, StreamKey
from streams.rejections import payload_of
from tests.conftest import SERVIOTICY

DEVICE = "1396461657731411aa73c28444ecf9a8c803e62312fd1"
COMPOSITE = "1398788346015aa59fe5f854b4bda89647b969c51d8a4"
GOOD = {"channels": {"temperature": {"current-value": 20}}, "lastUpdate": 1_700_000_000_000}


def test_a_batch_of_good_and_bad_messages() -> None:
    ingest = Ingest(Registry.load([SERVIOTICY]))
    topic = f"{DEVICE}/streams/data"
    messages = [
        RawMessage(topic, orjson.dumps(GOOD), "application/json", 7),
        RawMessage(
            topic,
            msgpack.packb(
                {
                    "lastUpdate": [1_700_000_000_000, 1_700_000_001_000],
                    "channels": {"location": ["1,2", "x"]},
                }
            ),
            None,
            7,
        ),
        RawMessage(topic, b'{"channels":', None, 7),
        RawMessage("ghost/streams/data", orjson.dumps(GOOD), None, 7),
        RawMessage(f"{COMPOSITE}/streams/fahrenheit", orjson.dumps(GOOD), None, 7),
        RawMessage("not/a/device/topic", b"{}", None, 7),
    ]
    out = ingest.batch(messages)
    assert out.accepted == [
        (StreamKey(DEVICE, "data"), SensorUpdate({"temperature": 20}, 1_700_000_000_000)),
        (
            StreamKey(DEVICE, "data"),
            SensorUpdate({"location": GeoPoint(1.0, 2.0)}, 1_700_000_000_000),
        ),
    ]
    letters = [(d.topic, d.rejection.reason, d.rejection.message) for d in out.dead_letters]
    assert letters == [
        (
            f"cloudlet/dead-letter/{DEVICE}/data",
            RejectReason.BAD_GEO_POINT,
            f"{DEVICE}/data update 1: channel 'location' expects a geo_point as \"lat,lon\" or"
            " [lat, lon], got 'x': expected 2 coordinates, got 1",
        ),
        (
            f"cloudlet/dead-letter/{DEVICE}/data",
            RejectReason.MALFORMED,
            f"{DEVICE}/data: the body is not valid json: unexpected end of data: line 1 column 13"
            " (char 12)",
        ),
        (
            "cloudlet/dead-letter/ghost/data",
            RejectReason.UNKNOWN_OBJECT,
            "ghost/data: unknown service object 'ghost'",
        ),
        (
            f"cloudlet/dead-letter/{COMPOSITE}/fahrenheit",
            RejectReason.DERIVED_STREAM,
            f"{COMPOSITE}/fahrenheit: stream 'fahrenheit' is derived by the cloudlet; devices"
            " cannot post to it",
        ),
        (
            "cloudlet/dead-letter/_/_",
            RejectReason.MALFORMED,
            "topic 'not/a/device/topic' is not a device topic (<so>/streams/<stream>)",
        ),
    ]
    # each dead letter carries the original payload, byte for byte
    for letter, message in zip(out.dead_letters, [messages[1], *messages[2:]], strict=True):
        record = orjson.loads(letter.body)
        assert payload_of(record) == message.payload
        assert record["topic"] == message.topic
        assert record["receivedAt"] == 7
    counts = ingest.counts
    assert (counts.messages, counts.accepted) == (6, 2)
    assert counts.rejected == {
        RejectReason.BAD_GEO_POINT: 1,
        RejectReason.MALFORMED: 2,
        RejectReason.UNKNOWN_OBJECT: 1,
        RejectReason.DERIVED_STREAM: 1,
    }


def test_oversized_messages_are_rejected_before_decoding() -> None:
    ingest = Ingest(Registry.load([SERVIOTICY]), max_payload=64)
    out = ingest.batch([RawMessage(f"{DEVICE}/streams/data", b"[" + b" " * 100 + b"]")])
    assert out.accepted == []
    assert [d.rejection.message for d in out.dead_letters] == [
        f"{DEVICE}/data: the message body is 102 bytes, more than the limit of 64"
    ]
