"""Fault injection: turn a good reading into the kinds of bad input real devices send.

Each fault names the rejection reason the cloudlet must give it, so a run can check that
every injected fault was caught for the right reason and nothing else was lost.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
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


class StreamFault(StrEnum):
    """Faults in the stream rather than in the message: what flows must cope with."""

    GAP = "gap"  # a reading never sent
    DUPLICATE = "duplicate"  # a reading sent twice (a device's retry)
    OUT_OF_ORDER = "out_of_order"  # a reading held back and sent after the next one
    OFFLINE = "offline"  # a device gone for a few steps, then replaying its readings in order


FAULT_KINDS = [*(f.value for f in Fault), *(f.value for f in StreamFault)]


@dataclass(frozen=True, slots=True)
class Send:
    topic: str
    payload: bytes
    kind: str  # "update", a Fault, "duplicate", "out_of_order" or "replayed"


class FaultInjector:
    """Turns each step's good readings into what faulty devices would send. `rate` is the
    chance that a reading is hit by one of `kinds` (all by default)."""

    def __init__(
        self,
        rng: random.Random,
        rate: float,
        topics: TopicScheme,
        kinds: list[str] | None = None,
        offline_steps: tuple[int, int] = (3, 8),
    ) -> None:
        unknown = set(kinds or ()) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(
                f"unknown fault kind {', '.join(sorted(unknown))} (kinds: {', '.join(FAULT_KINDS)})"
            )
        self.rng = rng
        self.rate = rate
        self.topics = topics
        self.kinds = list(kinds or FAULT_KINDS)
        self.offline_steps = offline_steps
        self.injected: Counter[str] = Counter()
        self._held: dict[str, list[Send]] = {}  # device -> readings sent after its next one
        self._offline: dict[str, int] = {}  # device -> steps still offline
        self._buffered: dict[str, list[Send]] = {}

    def _good(self, key: StreamKey, update: SensorUpdate, kind: str = "update") -> Send:
        return Send(self.topics.device_update(key.so, key.stream), encode(update_document(update)),
                    kind)  # fmt: skip

    def apply(self, readings: list[tuple[StreamKey, SensorUpdate]]) -> list[Send]:
        out: list[Send] = []
        stepped: set[str] = set()
        for key, update in readings:
            device = key.so
            if device in self._offline:
                self._buffered[device].append(self._good(key, update, "replayed"))
                continue
            fault = self.rng.choice(self.kinds) if self.rng.random() < self.rate else None
            if fault is not None:
                self.injected[fault] += 1
            if fault in {f.value for f in Fault}:
                topic, payload = corrupt(Fault(fault), key, update, self.topics)
                out += [self._good(key, update), Send(topic, payload, fault)]
            elif fault == StreamFault.GAP:
                pass
            elif fault == StreamFault.DUPLICATE:
                out += [self._good(key, update), self._good(key, update, "duplicate")]
            elif fault == StreamFault.OUT_OF_ORDER and device not in self._held:
                self._held[device] = [self._good(key, update, "out_of_order")]
                stepped.add(device)
            elif fault == StreamFault.OFFLINE:
                self._offline[device] = self.rng.randint(*self.offline_steps)
                self._buffered[device] = [self._good(key, update, "replayed")]
                stepped.add(device)
            else:
                out.append(self._good(key, update))
            if device in self._held and device not in stepped:
                out += self._held.pop(device)  # after the reading that overtook it
        for device in [d for d in self._offline if d not in stepped]:
            self._offline[device] -= 1
            if self._offline[device] <= 0:  # back: the buffer goes out in order
                del self._offline[device]
                out += self._buffered.pop(device)
        return out

    def release(self) -> list[Send]:
        """Everything still held back or buffered (the end of a run): nothing is lost."""
        out = [s for sends in self._held.values() for s in sends]
        out += [s for sends in self._buffered.values() for s in sends]
        self._held.clear()
        self._buffered.clear()
        self._offline.clear()
        return out
