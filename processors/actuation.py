"""The commands a unit sent and what their devices reported, queryable by id
(`GET /actuations/<id>` on the unit's status endpoint)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from streams.actuation import Actuation, ActuationStatus, StatusReport

MAX_REMEMBERED = 10_000
MAX_HISTORY = 20  # status reports kept per command (the latest ones)


class ActuationLog:
    """The last MAX_REMEMBERED commands and the latest status of each."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def sent(self, command: Actuation) -> None:
        with self._lock:
            self._entries[command.id] = {
                "id": command.id, "so": command.so, "action": command.action,
                "parameters": command.parameters, "issuedAt": command.issued_at,
                "status": ActuationStatus.SUBMITTED.value, "history": [],
            }  # fmt: skip
            while len(self._entries) > MAX_REMEMBERED:
                self._entries.popitem(last=False)

    def reported(self, so: str, report: StatusReport) -> None:
        """Record a device's report. Reports about commands never seen here (the CLI's, the
        cloud's, or forged) are kept too, within the same bound as the rest: the oldest
        entries go first, and each keeps its last MAX_HISTORY reports."""
        with self._lock:
            entry = self._entries.get(report.id)
            if entry is None:
                entry = self._entries[report.id] = {"id": report.id, "so": so, "history": []}
                while len(self._entries) > MAX_REMEMBERED:
                    self._entries.popitem(last=False)
            elif entry["so"] != so:
                return  # another object's command: a device reports only its own
            entry["status"] = report.status.value
            history = entry["history"]
            history.append(
                {"status": report.status.value, "at": report.at, "message": report.message}
            )
            if len(history) > MAX_HISTORY:
                del history[: len(history) - MAX_HISTORY]

    def get(self, actuation_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(actuation_id)
            return None if entry is None else dict(entry)

    def recent(self, n: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in list(self._entries.values())[-n:]]
