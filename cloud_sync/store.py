"""Cloud objects: what the cloudlets forwarded, per service object and stream, queryable.

One schema, two databases: SQLite (embedded, the default) and PostgreSQL (real deployments).
Writes are idempotent on the message id, so the at-least-once transport (a record resent
after a crash or an outage) becomes exactly-once here. Tables:

- `updates`: every update (message id, site, object, stream, lastUpdate, document).
- `channel_values`: each channel's value, numeric, geo or text, for range, geo and match
  searches.
- `latest`: the newest update per object and stream (by lastUpdate: a late replay never
  overwrites a newer value).
"""

from __future__ import annotations

import base64
import math
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS updates (
        message_id TEXT PRIMARY KEY, site TEXT NOT NULL, so TEXT NOT NULL,
        stream TEXT NOT NULL, last_update BIGINT NOT NULL, enqueued BIGINT NOT NULL,
        body TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS updates_by_stream ON updates (so, stream, last_update)",
    "CREATE INDEX IF NOT EXISTS updates_by_time ON updates (stream, last_update)",
    """CREATE TABLE IF NOT EXISTS channel_values (
        message_id TEXT NOT NULL, so TEXT NOT NULL, stream TEXT NOT NULL,
        channel TEXT NOT NULL, last_update BIGINT NOT NULL,
        num DOUBLE PRECISION, lat DOUBLE PRECISION, lon DOUBLE PRECISION, txt TEXT,
        PRIMARY KEY (message_id, channel))""",
    "CREATE INDEX IF NOT EXISTS values_by_num ON channel_values (stream, channel, num)",
    "CREATE INDEX IF NOT EXISTS values_by_geo ON channel_values (stream, channel, lat, lon)",
    """CREATE TABLE IF NOT EXISTS latest (
        so TEXT NOT NULL, stream TEXT NOT NULL, message_id TEXT NOT NULL,
        last_update BIGINT NOT NULL, site TEXT NOT NULL, PRIMARY KEY (so, stream))""",
    """CREATE TABLE IF NOT EXISTS commands (
        id TEXT PRIMARY KEY, site TEXT NOT NULL, so TEXT NOT NULL, action TEXT NOT NULL,
        parameters TEXT NOT NULL, issued_at BIGINT NOT NULL, status TEXT NOT NULL,
        history TEXT NOT NULL)""",
    # alarms (cloud_sync.alarms): each with its lifecycle; each rule's condition per object;
    # how far each rule has read its alert stream
    """CREATE TABLE IF NOT EXISTS alarms (
        id TEXT PRIMARY KEY, rule TEXT NOT NULL, so TEXT NOT NULL, stream TEXT NOT NULL,
        severity TEXT NOT NULL, active INTEGER NOT NULL, acknowledged INTEGER NOT NULL,
        raised_at BIGINT NOT NULL, cleared_at BIGINT, body TEXT NOT NULL,
        history TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS alarms_by_time ON alarms (raised_at)",
    # at most one open alarm per rule and object, whoever evaluates (two clouds on one store)
    "CREATE UNIQUE INDEX IF NOT EXISTS alarms_one_open ON alarms (rule, so) WHERE active = 1",
    """CREATE TABLE IF NOT EXISTS alarm_state (
        rule TEXT NOT NULL, so TEXT NOT NULL, last_update BIGINT NOT NULL,
        alerting INTEGER NOT NULL, PRIMARY KEY (rule, so))""",
    """CREATE TABLE IF NOT EXISTS alarm_cursors (
        rule TEXT PRIMARY KEY, last_update BIGINT NOT NULL)""",
]
ALARM_COLUMNS = ("id, rule, so, stream, severity, active, acknowledged, raised_at, cleared_at,"
                 " body, history")  # fmt: skip


@dataclass(frozen=True, slots=True)
class CloudMessage:
    """One forwarded update, as the forwarder writes it to Kafka."""

    message_id: str
    site: str
    so: str
    stream: str
    enqueued: int
    update: dict[str, Any]

    @classmethod
    def from_record(cls, doc: Any) -> CloudMessage:
        """A record as the forwarder writes it; ValueError saying what is wrong with any
        other (never another exception)."""
        if type(doc) is not dict:
            raise ValueError("not a cloudlet record: not a JSON object")
        names = ("messageId", "site", "so", "stream")
        for name in names:
            value = doc.get(name)
            if type(value) is not str or not 0 < len(value) <= 1024 or "\x00" in value:
                raise ValueError(f"not a cloudlet record: {name} must be a string, got"
                                 f" {value!r:.60}")  # fmt: skip
        enqueued, update = doc.get("enqueued"), doc.get("update")
        if type(enqueued) is not int or not 0 <= enqueued < 2**63:
            raise ValueError(f"not a cloudlet record: enqueued must be ms, got {enqueued!r:.60}")
        if type(update) is not dict:
            raise ValueError(f"not a cloudlet record: update must be an object, got {update!r:.60}")
        last, channels = update.get("lastUpdate"), update.get("channels")
        if type(last) is not int or not 0 <= last < 2**63:
            raise ValueError(
                f"not a cloudlet record: update.lastUpdate must be ms, got {last!r:.60}"
            )
        if type(channels) is not dict:
            raise ValueError("not a cloudlet record: update.channels must be an object")
        return cls(doc["messageId"], doc["site"], doc["so"], doc["stream"], enqueued, update)

    @property
    def last_update(self) -> int:
        return int(self.update["lastUpdate"])


MAX_TEXT = 1000  # characters of a string channel kept for match searches


def _alarm(r: Sequence[Any]) -> dict[str, Any]:
    active, acknowledged = bool(r[5]), bool(r[6])
    return {
        "id": r[0], "rule": r[1], "so": r[2], "stream": r[3], "severity": r[4],
        "state": f"{'active' if active else 'cleared'}_{'ack' if acknowledged else 'unack'}",
        "active": active, "acknowledged": acknowledged, "raisedAt": int(r[7]),
        "clearedAt": None if r[8] is None else int(r[8]), "update": orjson.loads(r[9]),
        "history": orjson.loads(r[10]),
    }  # fmt: skip


def _channel_rows(m: CloudMessage) -> list[tuple[Any, ...]]:
    rows = []
    for name, channel in (m.update.get("channels") or {}).items():
        value = channel.get("current-value") if isinstance(channel, dict) else None
        num = lat = lon = None
        if isinstance(value, bool):
            num = float(value)
        elif isinstance(value, int | float):
            num = float(value)
        elif isinstance(value, str) and value.count(",") == 1:
            try:  # a geo_point travels as "lat,lon"
                lat, lon = (float(x) for x in value.split(","))
            except ValueError:
                pass
        txt = value[:MAX_TEXT] if isinstance(value, str) and lat is None else None
        if num is not None or lat is not None or txt is not None:
            rows.append((m.message_id, m.so, m.stream, name, m.last_update, num, lat, lon, txt))
    return rows


@dataclass(frozen=True)
class Page:
    updates: list[dict[str, Any]]
    next: str | None  # the cursor of the next page, None at the end


def _cursor(last_update: int, message_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([last_update, message_id])).decode()


def _uncursor(cursor: str) -> tuple[int, str]:
    try:
        t, mid = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        if type(t) is not int or not -(2**63) <= t < 2**63 or type(mid) is not str:
            raise ValueError
        return t, mid
    except (ValueError, TypeError, orjson.JSONDecodeError, UnicodeError):
        raise ValueError(f"cursor {cursor!r} is not one this API gave out") from None


EARTH_RADIUS_M = 6_371_008.8


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine), metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


class CloudStore:
    """The SQL both databases share; subclasses give the connection and the placeholder."""

    placeholder = "?"
    row_lock = ""  # PostgreSQL locks the rows read for a change (SQLite: one writer anyway)

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        raise NotImplementedError

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._transaction() as cur:
            cur.execute(self._q(sql), args)
            return list(cur.fetchall())

    def create(self) -> None:
        with self._transaction() as cur:
            for statement in SCHEMA:
                cur.execute(statement)
        if "txt" not in self._columns("channel_values"):  # a store made before match search
            with self._transaction() as cur:
                cur.execute("ALTER TABLE channel_values ADD COLUMN txt TEXT")

    def _columns(self, table: str) -> set[str]:
        raise NotImplementedError

    def write(self, messages: Sequence[CloudMessage]) -> int:
        """Store what is new (by message id); how many were new."""
        if not messages:
            return 0
        new = 0
        with self._transaction() as cur:
            for m in messages:
                cur.execute(self._q(
                    "INSERT INTO updates (message_id, site, so, stream, last_update, enqueued,"
                    " body) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING"),
                    (m.message_id, m.site, m.so, m.stream, m.last_update, m.enqueued,
                     orjson.dumps(m.update).decode()))  # fmt: skip
                if cur.rowcount != 1:
                    continue  # seen before: the transport's duplicate
                new += 1
                rows = _channel_rows(m)
                if rows:
                    cur.executemany(self._q(
                        "INSERT INTO channel_values (message_id, so, stream, channel,"
                        " last_update, num, lat, lon, txt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT DO NOTHING"), rows)  # fmt: skip
                cur.execute(self._q(
                    "INSERT INTO latest (so, stream, message_id, last_update, site)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (so, stream) DO UPDATE SET"
                    " message_id = excluded.message_id, last_update = excluded.last_update,"
                    " site = excluded.site WHERE excluded.last_update >= latest.last_update"),
                    (m.so, m.stream, m.message_id, m.last_update, m.site))  # fmt: skip
        return new

    # queries ---------------------------------------------------------------------------------

    def objects(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT so, stream, site, last_update FROM latest ORDER BY so, stream")
        out: dict[str, dict[str, Any]] = {}
        for so, stream, site, last in rows:
            entry = out.setdefault(so, {"id": so, "site": site, "streams": [], "lastUpdate": 0})
            entry["streams"].append(stream)
            entry["lastUpdate"] = max(entry["lastUpdate"], last)
        return list(out.values())

    def site_of(self, so: str) -> str | None:
        """The cloudlet an object's updates came from most recently."""
        rows = self._query(
            "SELECT site FROM latest WHERE so = ? ORDER BY last_update DESC LIMIT 1", (so,)
        )
        return rows[0][0] if rows else None

    def add_command(self, id: str, site: str, so: str, action: str, parameters: dict[str, Any],
                    issued_at: int) -> None:  # fmt: skip
        history = [{"status": "submitted", "at": issued_at}]
        with self._transaction() as cur:
            cur.execute(self._q(
                "INSERT INTO commands (id, site, so, action, parameters, issued_at, status,"
                " history) VALUES (?, ?, ?, ?, ?, ?, 'submitted', ?)"),
                (id, site, so, action, orjson.dumps(parameters).decode(), issued_at,
                 orjson.dumps(history).decode()))  # fmt: skip

    def command_status(self, id: str, status: str, at: int, message: str | None) -> bool:
        """Record a status report; False if the command is not known here. A final status
        (done, failed) is not overwritten by a late report."""
        with self._transaction() as cur:
            cur.execute(self._q("SELECT status, history FROM commands WHERE id = ?"), (id,))
            row = cur.fetchone()
            if row is None:
                return False
            history = orjson.loads(row[1])
            entry = {"status": status, "at": at, **({"message": message} if message else {})}
            if entry in history:
                return True  # the same report again
            history.append(entry)
            current = row[0] if row[0] in ("done", "failed") else status
            cur.execute(self._q("UPDATE commands SET status = ?, history = ? WHERE id = ?"),
                        (current, orjson.dumps(history).decode(), id))  # fmt: skip
        return True

    def command(self, id: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT id, site, so, action, parameters, issued_at, status, history FROM commands"
            " WHERE id = ?",
            (id,),
        )
        if not rows:
            return None
        r = rows[0]
        return {"id": r[0], "site": r[1], "so": r[2], "action": r[3],
                "parameters": orjson.loads(r[4]), "issuedAt": r[5], "status": r[6],
                "history": orjson.loads(r[7])}  # fmt: skip

    def count(self) -> int:
        return int(self._query("SELECT count(*) FROM updates")[0][0])

    # alarms (cloud_sync.alarms) --------------------------------------------------------------

    def updates_after(self, stream: str, since: int, limit: int) -> list[tuple[str, int, str]]:
        """(object, lastUpdate, document) of a stream's updates at `since` or later, in event
        time."""
        rows = self._query(
            "SELECT so, last_update, body FROM updates WHERE stream = ? AND last_update >= ?"
            " ORDER BY last_update, so, message_id LIMIT ?",
            (stream, since, limit),
        )
        return [(r[0], int(r[1]), r[2]) for r in rows]

    def alarm_cursor(self, rule: str) -> int:
        rows = self._query("SELECT last_update FROM alarm_cursors WHERE rule = ?", (rule,))
        return int(rows[0][0]) if rows else 0

    def set_alarm_cursor(self, rule: str, at: int) -> None:
        with self._transaction() as cur:
            cur.execute(self._q(
                "INSERT INTO alarm_cursors (rule, last_update) VALUES (?, ?) ON CONFLICT (rule)"
                " DO UPDATE SET last_update = excluded.last_update"), (rule, at))  # fmt: skip

    def alarm_condition(
        self, rule: str, so: str, stream: str, severity: str, alerting: bool, at: int,
        body: str, new_id: str,
    ) -> tuple[str, dict[str, Any]] | None:  # fmt: skip
        """An alert stream's update for a rule and an object: the transition it makes
        ("raised", "cleared" by the condition, with the alarm), or None. An update not later
        than the last one seen for the object changes nothing."""
        with self._transaction() as cur:
            cur.execute(self._q("SELECT last_update, alerting FROM alarm_state WHERE rule = ?"
                                f" AND so = ?{self.row_lock}"), (rule, so))  # fmt: skip
            state = cur.fetchone()
            if state is not None and at <= int(state[0]):
                return None
            was = bool(state[1]) if state is not None else False
            cur.execute(self._q(
                "INSERT INTO alarm_state (rule, so, last_update, alerting) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (rule, so) DO UPDATE SET last_update = excluded.last_update,"
                " alerting = excluded.alerting WHERE excluded.last_update >"
                " alarm_state.last_update"), (rule, so, at, int(alerting)))  # fmt: skip
            if cur.rowcount != 1:  # another evaluator took a later update meanwhile
                return None
            if alerting and not was:
                history = [{"status": "raised", "at": at, "by": "condition"}]
                cur.execute(self._q(
                    f"INSERT INTO alarms ({ALARM_COLUMNS}) VALUES (?, ?, ?, ?, ?, 1, 0, ?, NULL,"
                    " ?, ?) ON CONFLICT (rule, so) WHERE active = 1 DO NOTHING"),
                    (new_id, rule, so, stream, severity, at, body,
                     orjson.dumps(history).decode()))  # fmt: skip
                if cur.rowcount != 1:  # one is open already
                    return None
                transition, found = "raised", new_id
            elif was and not alerting:
                cur.execute(self._q("SELECT id FROM alarms WHERE rule = ? AND so = ? AND"
                                    f" active = 1{self.row_lock}"), (rule, so))  # fmt: skip
                row = cur.fetchone()
                if row is None:  # cleared by hand already
                    return None
                self._alarm_step(cur, row[0], "cleared", at, "condition")
                transition, found = "cleared", row[0]
            else:
                return None
            changed = self._alarm_row(cur, found)
            assert changed is not None
            return transition, changed

    def alarm_step(
        self, id: str, step: str, at: int, by: str
    ) -> tuple[bool, dict[str, Any]] | None:
        """Acknowledge or clear an alarm by hand: (whether it changed, the alarm), or None for
        an unknown alarm. Acknowledging an acknowledged alarm, or clearing a cleared one,
        changes nothing."""
        with self._transaction() as cur:
            alarm = self._alarm_row(cur, id, lock=True)
            if alarm is None:
                return None
            done = alarm["acknowledged"] if step == "acknowledged" else not alarm["active"]
            if done:
                return False, alarm
            self._alarm_step(cur, id, step, at, by)
            stepped = self._alarm_row(cur, id)
            assert stepped is not None
            return True, stepped

    def _alarm_step(self, cur: Any, id: str, step: str, at: int, by: str) -> None:
        cur.execute(self._q("SELECT history FROM alarms WHERE id = ?"), (id,))
        history = orjson.loads(cur.fetchone()[0])
        history.append({"status": step, "at": at, "by": by})
        sets = "acknowledged = 1" if step == "acknowledged" else "active = 0, cleared_at = ?"
        args = (() if step == "acknowledged" else (at,)) + (orjson.dumps(history).decode(), id)
        cur.execute(self._q(f"UPDATE alarms SET {sets}, history = ? WHERE id = ?"), args)

    def _alarm_row(self, cur: Any, id: str, lock: bool = False) -> dict[str, Any] | None:
        suffix = self.row_lock if lock else ""
        cur.execute(self._q(f"SELECT {ALARM_COLUMNS} FROM alarms WHERE id = ?{suffix}"), (id,))
        row = cur.fetchone()
        return _alarm(row) if row is not None else None

    def alarm(self, id: str) -> dict[str, Any] | None:
        rows = self._query(f"SELECT {ALARM_COLUMNS} FROM alarms WHERE id = ?", (id,))
        return _alarm(rows[0]) if rows else None

    def alarms(self, active: bool | None, limit: int) -> list[dict[str, Any]]:
        """The alarms (active ones, cleared ones, or all), newest first."""
        where = "" if active is None else f" WHERE active = {int(active)}"
        rows = self._query(f"SELECT {ALARM_COLUMNS} FROM alarms{where} ORDER BY raised_at DESC,"
                           " id LIMIT ?", (limit,))  # fmt: skip
        return [_alarm(r) for r in rows]

    def last(self, so: str, stream: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT u.body FROM latest l JOIN updates u ON u.message_id = l.message_id"
            " WHERE l.so = ? AND l.stream = ?",
            (so, stream),
        )
        return orjson.loads(rows[0][0]) if rows else None

    def history(
        self, so: str, stream: str, *, start: int | None = None, end: int | None = None,
        limit: int = 100, cursor: str | None = None,
    ) -> Page:  # fmt: skip
        """Updates in [start, end) by lastUpdate, oldest first, `limit` a page."""
        where: list[str] = ["so = ?", "stream = ?"]
        args: list[Any] = [so, stream]
        if start is not None:
            where.append("last_update >= ?")
            args.append(start)
        if end is not None:
            where.append("last_update < ?")
            args.append(end)
        if cursor is not None:
            t, mid = _uncursor(cursor)
            where.append("(last_update > ? OR (last_update = ? AND message_id > ?))")
            args += [t, t, mid]
        rows = self._query(
            f"SELECT last_update, message_id, body FROM updates WHERE {' AND '.join(where)}"
            " ORDER BY last_update, message_id LIMIT ?",
            [*args, limit + 1],
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return Page([orjson.loads(r[2]) for r in rows],
                    _cursor(rows[-1][0], rows[-1][1]) if more else None)  # fmt: skip

    def recent(self, so: str, stream: str, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` updates of a stream, oldest first."""
        rows = self._query(
            "SELECT body FROM updates WHERE so = ? AND stream = ?"
            " ORDER BY last_update DESC, message_id DESC LIMIT ?",
            (so, stream, limit),
        )
        return [orjson.loads(r[0]) for r in reversed(rows)]

    def recent_of_stream(self, stream: str, limit: int) -> dict[str, list[dict[str, Any]]]:
        """The newest `limit` updates of a stream for each object that has it, oldest first:
        one query for every object (a chart), not one each."""
        rows = self._query(
            "SELECT so, body FROM (SELECT so, body, last_update, message_id, ROW_NUMBER() OVER"
            " (PARTITION BY so ORDER BY last_update DESC, message_id DESC) AS n FROM updates"
            " WHERE stream = ?) AS r WHERE n <= ? ORDER BY so, last_update, message_id",
            (stream, limit),
        )
        out: dict[str, list[dict[str, Any]]] = {}
        for so, body in rows:
            out.setdefault(so, []).append(orjson.loads(body))
        return out

    def latest_updates(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(object, stream, its newest update) for every object and stream: one query."""
        rows = self._query(
            "SELECT l.so, l.stream, u.body FROM latest l JOIN updates u"
            " ON u.message_id = l.message_id ORDER BY l.so, l.stream"
        )
        return [(so, stream, orjson.loads(body)) for so, stream, body in rows]

    def places(self) -> list[tuple[str, str, str, float, float, int]]:
        """(object, stream, channel, lat, lon, lastUpdate): the geo_point values of each
        object's newest updates (one per stream), newest first per object; one query, through
        `latest` and the values' primary key (not a scan of every value ever stored)."""
        rows = self._query(
            "SELECT l.so, l.stream, v.channel, v.lat, v.lon, l.last_update FROM latest l"
            " JOIN channel_values v ON v.message_id = l.message_id"
            " WHERE v.lat IS NOT NULL AND v.lon IS NOT NULL"
            " ORDER BY l.so, l.last_update DESC, l.stream, v.channel"
        )
        return [(r[0], r[1], r[2], float(r[3]), float(r[4]), int(r[5])) for r in rows]

    def search(
        self, stream: str, *, channel: str | None = None, minimum: float | None = None,
        maximum: float | None = None, near: tuple[float, float, float] | None = None,
        bbox: tuple[float, float, float, float] | None = None, start: int | None = None,
        end: int | None = None, objects: Sequence[str] | None = None, limit: int = 1000,
        match: str | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Updates of `stream` whose `channel` is within [minimum, maximum], or whose geo
        channel lies within `near` (lat, lon, metres) or `bbox` (min lat, min lon, max lat,
        max lon), or whose text channel contains `match` (case-insensitive); newest first."""
        where: list[str] = ["v.stream = ?"]
        args: list[Any] = [stream]
        if match is not None:  # LIKE's own characters are matched as themselves
            escaped = match.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("LOWER(v.txt) LIKE ? ESCAPE '\\'")
            args.append(f"%{escaped}%")
        if channel is not None:
            where.append("v.channel = ?")
            args.append(channel)
        if minimum is not None:
            where.append("v.num >= ?")
            args.append(minimum)
        if maximum is not None:
            where.append("v.num <= ?")
            args.append(maximum)
        box = bbox
        if near is not None:  # a box around the circle first; the exact distance after
            lat, lon, radius = near
            dlat = math.degrees(radius / EARTH_RADIUS_M)
            dlon = dlat / max(0.01, math.cos(math.radians(lat)))
            box = (lat - dlat, lon - dlon, lat + dlat, lon + dlon)
        if box is not None:
            where.append("v.lat BETWEEN ? AND ? AND v.lon BETWEEN ? AND ?")
            args += [box[0], box[2], box[1], box[3]]
        if start is not None:
            where.append("v.last_update >= ?")
            args.append(start)
        if end is not None:
            where.append("v.last_update < ?")
            args.append(end)
        if objects is not None:
            if not objects:
                return []
            where.append(f"v.so IN ({', '.join('?' for _ in objects)})")
            args += list(objects)
        rows = self._query(
            "SELECT DISTINCT u.message_id, u.so, u.last_update, u.body, v.lat, v.lon"
            " FROM channel_values v JOIN updates u ON u.message_id = v.message_id"
            f" WHERE {' AND '.join(where)} ORDER BY u.last_update DESC, u.message_id LIMIT ?",
            [*args, limit * 4 if near else limit],
        )
        out = []
        seen = set()
        for mid, so, _t, body, lat, lon in rows:
            if near is not None and distance_m(near[0], near[1], lat, lon) > near[2]:
                continue
            if mid in seen:
                continue
            seen.add(mid)
            out.append({"so": so, "stream": stream, "update": orjson.loads(body)})
            if len(out) >= limit:
                break
        return out

    def close(self) -> None:
        raise NotImplementedError

    def transient(self, exc: BaseException) -> bool:
        """Whether `exc` is the store being away (retry) rather than a record it refuses."""
        raise NotImplementedError


class SQLiteStore(CloudStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self.create()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _columns(self, table: str) -> set[str]:
        return {str(row[1]) for row in self._query(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        self._db.close()

    def transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError)  # locked, disk I/O: try again


class PostgresStore(CloudStore):
    placeholder = "%s"
    row_lock = " FOR UPDATE"

    def __init__(self, dsn: str) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self._psycopg = psycopg
        self._pool = ConnectionPool(dsn, min_size=1, max_size=8, open=True)
        self.create()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    def _columns(self, table: str) -> set[str]:
        rows = self._query("SELECT column_name FROM information_schema.columns"
                           " WHERE table_name = ?", (table,))  # fmt: skip
        return {str(row[0]) for row in rows}

    def close(self) -> None:
        self._pool.close()

    def transient(self, exc: BaseException) -> bool:
        # a dropped connection (the pool replaces it), a server restarting or shutting down
        return isinstance(exc, self._psycopg.OperationalError | self._psycopg.InterfaceError)


def open_store(url: str) -> CloudStore:
    """sqlite:///path/to.db or postgresql://user@host:port/db."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise ValueError(f"store {url!r}: use sqlite:///path/to.db or postgresql://user@host/db")
