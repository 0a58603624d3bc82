"""Fault injection: turn a good reading into the kinds of bad input real devices send.

Each fault names the rejection reason the cloudlet must give it, so a run can check that
every injected fault was caught for the right reason and nothing else was lost.
"""

from __future__ import annotations

import random
from enum import StrEnum

from streams import RejectReason, SensorUpdate, StreamKey, TopicScheme, update_document
from streams.codec import encode


class Fault(StrEnum):
    TRUNCATED = "truncated"
    UNKNOWN_OBJECT = "unknown_object"
    UNKNOWN_CHANNEL = "unknown_channel"
    WRONG_TYPE = "wrong_type"
    MISSING_LAST_UPDATE = "missing_last_update"

    @property
    def expected_reason(self) -> RejectReason:
        return _EXPECTED[self]


_EXPECTED = {
    Fault.TRUNCATED: RejectReason.MALFORMED,
    Fault.UNKNOWN_OBJECT: RejectReason.UNKNOWN_OBJECT,
    Fault.UNKNOWN_CHANNEL: RejectReason.UNKNOWN_CHANNEL,
    Fault.WRONG_TYPE: RejectReason.WRONG_TYPE,
    Fault.MISSING_LAST_UPDATE: RejectReason.MISSING_LAST_UPDATE,
}


def corrupt(
    fault: Fault, key: StreamKey, update: SensorUpdate, topics: TopicScheme
) -> tuple[str, bytes]:
    """The (topic, payload) a faulty device would send instead of this reading."""
    doc = update_document(update)
    topic = topics.device_update(key.so, key.stream)
    if fault is Fault.TRUNCATED:
        body = encode(doc)
        return topic, body[: len(body) // 2]
    if fault is Fault.UNKNOWN_OBJECT:
        return topics.device_update(f"ghost-{key.so}", key.stream), encode(doc)
    if fault is Fault.UNKNOWN_CHANNEL:
        doc["channels"]["humidity"] = {"current-value": 55}
    elif fault is Fault.WRONG_TYPE:
        name = next(iter(doc["channels"]))
        doc["channels"][name]["current-value"] = [1, 2, 3]
    elif fault is Fault.MISSING_LAST_UPDATE:
        del doc["lastUpdate"]
    return topic, encode(doc)


def pick(rng: random.Random) -> Fault:
    return rng.choice(list(Fault))
