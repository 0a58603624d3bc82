"""Actuations: commands to devices and their status reports (ServIoTicy actions, fixed).

A command goes to `{so}/actions` carrying a unique id; the device reports on
`{so}/actions/{id}/status` as it goes: submitted -> accepted -> done | failed. (ServIoTicy
never sent the id to the device, so its status reports could not say which command they
were about.)

    command: {"id": "a1b2...", "action": "open", "parameters": {"minutes": 30}, "issuedAt": ms}
    status:  {"id": "a1b2...", "status": "done", "at": ms, "message": "opened for 30 minutes"}
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from streams.objects import ServiceObject


class ActuationStatus(StrEnum):
    SUBMITTED = "submitted"
    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (ActuationStatus.DONE, ActuationStatus.FAILED)


class ActuationError(ValueError):
    """A command or status report that cannot be sent or understood; the message says why."""


@dataclass(frozen=True, slots=True)
class Actuation:
    so: str
    action: str
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    issued_at: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"id": self.id, "action": self.action, "parameters": self.parameters,
             "issuedAt": self.issued_at}
        )  # fmt: skip

    @classmethod
    def from_json(cls, so: str, payload: bytes) -> Actuation:
        """A command as a device receives it; ActuationError naming what is wrong (never any
        other exception: the device SDK calls this on its network thread)."""
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ActuationError(f"{so}: the command is not JSON ({exc})") from None
        if not isinstance(doc, dict) or not _is_id(doc.get("id")):
            raise ActuationError(
                f"{so}: a command needs a string id of 1-{MAX_ID} characters without / + #"
            )
        if not isinstance(doc.get("action"), str):
            raise ActuationError(f"{so}: command {doc['id']} names no action")
        parameters = doc.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ActuationError(f"{so}: the parameters of command {doc['id']} must be an object")
        return cls(so, doc["action"], parameters, doc["id"], _time(doc.get("issuedAt"), so))


MAX_ID = 128
"""Longest command id accepted: ids are topic levels (`<so>/actions/<id>/status`)."""
MAX_MESSAGE = 1024
"""Longest status message kept; a longer one is cut (a device cannot grow the log)."""


def _is_id(value: object) -> bool:
    return (
        type(value) is str
        and 0 < len(value) <= MAX_ID
        and not ({"/", "+", "#", "\x00"} & set(value))
    )


def _time(value: object, so: str) -> int:
    if value is None:
        return 0
    if type(value) is int and 0 <= value < 2**63:
        return value
    if type(value) is float and value.is_integer() and 0 <= value < 2**63:
        return int(value)
    raise ActuationError(f"{so}: issuedAt must be milliseconds since the epoch, got {value!r:.60}")


def checked(so: ServiceObject, action: str, parameters: dict[str, Any], *, at: int) -> Actuation:
    """A command for `so`, after checking that it declares `action`."""
    if so.action(action) is None:
        declared = ", ".join(a.name for a in so.actions) or "none"
        raise ActuationError(
            f"service object {so.id!r} has no action {action!r} (its actions: {declared})"
        )
    assert so.id is not None
    return Actuation(so.id, action, dict(parameters), issued_at=at)


@dataclass(frozen=True, slots=True)
class StatusReport:
    id: str
    status: ActuationStatus
    at: int
    message: str | None = None

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"id": self.id, "status": self.status.value, "at": self.at}
        if self.message is not None:
            doc["message"] = self.message
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, payload: bytes) -> StatusReport:
        """A device's status report; ActuationError naming what is wrong, never another
        exception, whatever the payload."""
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ActuationError(f"a status report must be a JSON object: {exc}") from None
        statuses = ", ".join(ActuationStatus)
        if not isinstance(doc, dict):
            raise ActuationError(
                f"a status report must be a JSON object with id, status ({statuses}) and at"
            )
        if not _is_id(doc.get("id")):
            raise ActuationError(
                f"a status report's id must be a string of 1-{MAX_ID} characters without / + #"
            )
        try:
            status = ActuationStatus(str(doc.get("status")))
        except ValueError:
            raise ActuationError(
                f"a status report's status must be one of {statuses}, got {doc.get('status')!r:.60}"
            ) from None
        at = doc.get("at")
        if type(at) is not int or not 0 <= at < 2**63:
            raise ActuationError(
                f"a status report's at must be milliseconds since the epoch, got {at!r:.60}"
            )
        message = doc.get("message")
        if message is not None and type(message) is not str:
            raise ActuationError("a status report's message must be a string")
        return cls(doc["id"], status, at, None if message is None else message[:MAX_MESSAGE])
