"""Why input was refused: machine-readable reasons, readable messages, dead-letter records.

Bad input from a device is data, not an exception that escapes: each refusal becomes a
`Rejection` that is counted by its `reason` and published on the dead-letter topic together
with the original payload.
"""

from __future__ import annotations

import base64
import hashlib
import reprlib
from dataclasses import dataclass
from enum import StrEnum

import orjson


class RejectReason(StrEnum):
    """Stable, machine-readable reason codes (used as metric labels and in dead letters)."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    UNKNOWN_OBJECT = "unknown_object"
    UNKNOWN_STREAM = "unknown_stream"
    DERIVED_STREAM = "derived_stream"
    NO_CHANNELS = "no_channels"
    UNKNOWN_CHANNEL = "unknown_channel"
    MISSING_VALUE = "missing_value"
    WRONG_TYPE = "wrong_type"
    BAD_GEO_POINT = "bad_geo_point"
    MISSING_LAST_UPDATE = "missing_last_update"
    BAD_LAST_UPDATE = "bad_last_update"
    EXPRESSION_FAILED = "expression_failed"
    LATE = "late"
    TOO_MANY_KEYS = "too_many_keys"
    PROCESSOR_FAILED = "processor_failed"
    NO_UPDATES = "no_updates"
    FUTURE_TIMESTAMP = "future_timestamp"
    BAD_STATUS_REPORT = "bad_status_report"
    UNPUBLISHABLE = "unpublishable"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Rejection:
    """One refused update (or a whole refused message when `index` is None)."""

    reason: RejectReason
    message: str
    so_id: str | None = None
    stream_id: str | None = None
    index: int | None = None


def no_updates(so: str, stream: str) -> Rejection:
    """A message that holds no updates at all: `[]`, or a columnar batch with no readings
    (neither accepted nor refused by the validator, so the callers say so with this)."""
    return Rejection(
        RejectReason.NO_UPDATES,
        f"{so}/{stream}: the message holds no updates (an empty list or columnar batch)",
        so,
        stream,
    )


class InvalidUpdate(ValueError):
    """Raised by the single-update APIs; batch APIs return `Rejection`s instead."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection

    @property
    def reason(self) -> RejectReason:
        return self.rejection.reason


# Containers are shown a few levels deep: repr() of a value nested 1,000 lists deep (valid
# JSON) recurses past Python's limit.
_SHOW = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxtuple = 4, 12, 12, 12
_SHOW.maxstring = _SHOW.maxother = _SHOW.maxlong = 200


def show_value(value: object, limit: int = 60) -> str:
    """A value as it should appear in an error message: its repr, cut to `limit` characters,
    whatever its size or depth."""
    if type(value) in (list, dict, tuple):
        text = _SHOW.repr(value)
    else:
        text = repr(value) if type(value) is not str or len(value) <= limit else repr(value[:limit])
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_DEAD_LETTER_PAYLOAD = 64 * 1024
"""Largest original payload a dead letter carries whole; a larger one is kept as an excerpt of
this many bytes with its size and SHA-256, so a hostile body cannot grow the unit or the topic."""


def dead_letter_record(
    rejection: Rejection,
    *,
    topic: str | None,
    payload: bytes,
    received_at: int,
    max_payload: int = MAX_DEAD_LETTER_PAYLOAD,
) -> bytes:
    """The JSON body published on the dead-letter topic: reason, message and original payload.

    The payload is carried as text when it is valid UTF-8 and as base64 otherwise, so that
    nothing of what the device sent is lost. Past `max_payload` bytes only an excerpt is
    carried (`payloadTruncated`), with `payloadSize` and `payloadSha256` of the whole; a topic
    past 1,024 characters is cut the same way (`topicTruncated`).
    """
    size = len(payload)
    body, encoding = _text(payload if size <= max_payload else payload[:max_payload], size)
    record: dict[str, object] = {
        "reason": rejection.reason.value,
        "message": rejection.message[:2048],
        "so": _cut(rejection.so_id),
        "stream": _cut(rejection.stream_id),
        "index": rejection.index,
        "topic": _cut(topic),
        "receivedAt": received_at,
        "payload": body,
        "payloadEncoding": encoding,
    }
    if topic is not None and len(topic) > MAX_SHOWN_TOPIC:
        record["topicTruncated"] = True
        record["topicSize"] = len(topic)
    if size > max_payload:
        record["payloadTruncated"] = True
        record["payloadSize"] = size
        record["payloadSha256"] = hashlib.sha256(payload).hexdigest()
    return orjson.dumps(record)


MAX_SHOWN_TOPIC = 1024


def _text(excerpt: bytes, size: int) -> tuple[str, str]:
    """The payload (or its excerpt) as UTF-8 text, else base64; an excerpt may end inside a
    character, so up to three trailing bytes may be left out of it."""
    for cut in range(4 if len(excerpt) < size else 1):
        try:
            return excerpt[: len(excerpt) - cut].decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            continue
    return base64.b64encode(excerpt).decode("ascii"), "base64"


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_SHOWN_TOPIC else text[:MAX_SHOWN_TOPIC]


def payload_of(record: dict[str, object]) -> bytes:
    """The original payload carried by a decoded dead-letter record."""
    body = record["payload"]
    assert isinstance(body, str)
    if record["payloadEncoding"] == "base64":
        return base64.b64decode(body)
    return body.encode("utf-8")
