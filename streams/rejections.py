"""Why input was refused: machine-readable reasons, readable messages, dead-letter records.

Bad input from a device is data, not an exception that escapes: each refusal becomes a
`Rejection` that is counted by its `reason` and published on the dead-letter topic together
with the original payload.
"""

from __future__ import annotations

import base64
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
    PROCESSOR_FAILED = "processor_failed"


@dataclass(frozen=True, slots=True)
class Rejection:
    """One refused update (or a whole refused message when `index` is None)."""

    reason: RejectReason
    message: str
    so_id: str | None = None
    stream_id: str | None = None
    index: int | None = None


class InvalidUpdate(ValueError):
    """Raised by the single-update APIs; batch APIs return `Rejection`s instead."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection

    @property
    def reason(self) -> RejectReason:
        return self.rejection.reason


def show_value(value: object, limit: int = 60) -> str:
    """A value as it should appear in an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dead_letter_record(
    rejection: Rejection, *, topic: str | None, payload: bytes, received_at: int
) -> bytes:
    """The JSON body published on the dead-letter topic: reason, message and original payload.

    The payload is carried as text when it is valid UTF-8 and as base64 otherwise, so that
    nothing of what the device sent is lost.
    """
    try:
        body: str = payload.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(payload).decode("ascii")
        encoding = "base64"
    record = {
        "reason": rejection.reason.value,
        "message": rejection.message,
        "so": rejection.so_id,
        "stream": rejection.stream_id,
        "index": rejection.index,
        "topic": topic,
        "receivedAt": received_at,
        "payload": body,
        "payloadEncoding": encoding,
    }
    return orjson.dumps(record)


def payload_of(record: dict[str, object]) -> bytes:
    """The original payload carried by a decoded dead-letter record."""
    body = record["payload"]
    assert isinstance(body, str)
    if record["payloadEncoding"] == "base64":
        return base64.b64decode(body)
    return body.encode("utf-8")
