"""The topic scheme and dead-letter records."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from streams import Rejection, RejectReason, StreamKey, TopicScheme, dead_letter_record
from streams.rejections import payload_of


def test_default_scheme_mirrors_servioticy_paths() -> None:
    t = TopicScheme()
    assert t.device_update("so1", "data") == "so1/streams/data"
    assert t.device_updates_filter == "+/streams/+"
    assert t.updates("so1", "data") == "so1/streams/data/updates"
    assert t.updates_filter == "+/streams/+/updates"
    assert t.actions("valve-1") == "valve-1/actions"
    assert t.action_status("valve-1", "a1b2") == "valve-1/actions/a1b2/status"
    assert t.action_status_filter == "+/actions/+/status"
    assert t.parse_action_status("valve-1/actions/a1b2/status") == ("valve-1", "a1b2")
    assert t.parse_action_status("valve-1/actions") is None
    assert t.parse_action_status("valve-1/streams/a1b2/status") is None
    assert t.dead_letter("so1", "data") == "cloudlet/dead-letter/so1/data"
    assert t.dead_letter_filter == "cloudlet/dead-letter/#"


def test_root_prefixes_every_topic() -> None:
    t = TopicScheme(root="site-7")
    assert t.root == "site-7/"
    assert t.device_update("so1", "data") == "site-7/so1/streams/data"
    assert t.dead_letter(None, None) == "site-7/cloudlet/dead-letter/_/_"
    assert t.parse_device_update("site-7/so1/streams/data") == StreamKey("so1", "data")
    assert t.parse_device_update("so1/streams/data") is None


@pytest.mark.parametrize(
    "topic",
    ["so1/streams", "so1/streams/data/updates", "so1/stream/data", "/streams/data", "so1/streams/"],
)
def test_non_device_topics_do_not_parse(topic: str) -> None:
    assert TopicScheme().parse_device_update(topic) is None


def test_dead_letter_levels_stay_publishable() -> None:
    assert TopicScheme().dead_letter("a/b", "c+") == "cloudlet/dead-letter/_/_"


def test_bad_root_is_refused() -> None:
    with pytest.raises(ValidationError, match="topic root 'a/#/' must not contain"):
        TopicScheme(root="a/#")


@pytest.mark.parametrize(
    ("payload", "encoding"), [(b'{"channels": 1}', "utf-8"), (b"\x81\xff\xfe", "base64")]
)
def test_dead_letter_record_keeps_the_original_payload(payload: bytes, encoding: str) -> None:
    rejection = Rejection(RejectReason.WRONG_TYPE, "so1/data: channel 't' ...", "so1", "data", 2)
    record = orjson.loads(
        dead_letter_record(rejection, topic="so1/streams/data", payload=payload, received_at=5)
    )
    assert record == {
        "reason": "wrong_type",
        "message": "so1/data: channel 't' ...",
        "so": "so1",
        "stream": "data",
        "index": 2,
        "topic": "so1/streams/data",
        "receivedAt": 5,
        "payload": record["payload"],
        "payloadEncoding": encoding,
    }
    assert payload_of(record) == payload
