"""Where a unit hands results for the cloud: the ResultSink interface, and a SQLite sink.

The cloud-sync outbox implements the same interface. A sink's `write` returns once the
results are durable; a slow sink makes the unit wait (backpressure), it never drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import orjson

from streams.codec import update_document
from streams.updates import SensorUpdate, StreamKey


class ResultSink(Protocol):
    def write(self, results: Sequence[tuple[StreamKey, SensorUpdate]]) -> None: ...

    def close(self) -> None: ...


class SQLiteSink:
    """Appends results to a SQLite table (WAL, one transaction per batch)."""

    def __init__(self, path: Path) -> None:
        import sqlite3  # here: a unit without this sink does not load SQLite (0.9 MB)

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS results ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " so TEXT NOT NULL, stream TEXT NOT NULL, last_update INTEGER NOT NULL,"
            " body BLOB NOT NULL)"
        )

    def write(self, results: Sequence[tuple[StreamKey, SensorUpdate]]) -> None:
        if not results:
            return
        rows = [
            (k.so, k.stream, u.last_update, orjson.dumps(update_document(u))) for k, u in results
        ]
        with self._db:  # one transaction
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO results (so, stream, last_update, body) VALUES (?, ?, ?, ?)", rows
            )

    def close(self) -> None:
        self._db.close()
