"""Alarms (`cloud_sync.alarms`): raised by an alert stream, acknowledged and cleared through
the API with who and when, cleared by the condition, their history queryable, each
transition notified to a webhook and an MQTT topic; on SQLite and the real PostgreSQL, with
the real Mosquitto."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from cloud_sync.alarms import AlarmRule, alerting
from cloud_sync.cloud import CloudService, CloudSettings
from cloud_sync.store import CloudMessage, CloudStore, PostgresStore, open_store
from cloudlet.rig import Mosquitto
from streams.transport.mqtt import MqttSettings, connect, make_client

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

T = 1_700_000_000_000
OPS, VIEWER = "ops-secret-0123456789", "viewer-secret-0123456789"


class Hook:
    """A webhook receiver: every POST's JSON, in order."""

    def __init__(self) -> None:
        self.got: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.auth: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.auth.append(self.headers.get("Authorization", ""))
                hook.got.put(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alarms"

    def take(self, n: int) -> list[tuple[str, str]]:
        events = [self.got.get(timeout=15) for _ in range(n)]
        self.last = [(e["transition"], e["alarm"]["id"][:6], e["alarm"]["history"]) for e in events]
        return [(e["transition"], e["alarm"]["state"]) for e in events]


def _call(cloud: CloudService, method: str, path: str, token: str | None = None) -> Any:
    request = urllib.request.Request(f"{cloud.url}{path}", method=method, data=b"" if
                                     method == "POST" else None)  # fmt: skip
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return orjson.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code


def _alert(store: CloudStore, at: int, value: bool, so: str = "air-north") -> None:
    update = {"channels": {"alert": {"current-value": value}, "pm25": {"current-value": 20.0}},
              "lastUpdate": at}  # fmt: skip
    store.write([CloudMessage(f"m-{so}-{at}-{value}", "s1", so, "pm25_alert", at, update)])


def _settle(cloud: CloudService) -> None:
    assert cloud.alarms is not None
    cloud.alarms.poke()
    deadline = time.monotonic() + 10
    while cloud.alarms.evaluate() and time.monotonic() < deadline:
        pass


def _service(
    store: CloudStore | str, hook: Hook, broker: Mosquitto
) -> CloudService:  # fmt: skip
    """A cloud with an alarm rule on the air stations' PM2.5 alert, on `store` (a store, or
    its URL)."""
    url = store if isinstance(store, str) else "sqlite:///unused.db"
    return CloudService(CloudSettings.model_validate({
        "port": 0, "store": url,
        "tokens": [{"token": OPS, "objects": ["*"], "name": "ops"},
                   {"token": VIEWER, "objects": ["bay-*"], "name": "viewer"}],
        "alarms": [{"name": "pm25", "from": "air-*/pm25_alert", "when": "alert",
                    "severity": "major"}],
        "notify": {"webhook": {"url": hook.url, "token": "hook-token"},
                   "mqtt": {"url": broker.url, "topic": "cloudlet/alarms"}},
    }), store=None if isinstance(store, str) else store).start()  # fmt: skip


@pytest.mark.mqtt
def test_an_alarm_lifecycle_through_the_api(store: CloudStore, mosquitto: Mosquitto) -> None:
    hook = Hook()
    seen: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    settings = MqttSettings(url=mosquitto.url)
    sub = make_client(settings, "alarm-watcher")
    ready = threading.Event()
    sub.on_connect = lambda c, *_: c.subscribe("cloudlet/alarms/#", 1)
    sub.on_subscribe = lambda *_: ready.set()
    sub.on_message = lambda _c, _u, m: seen.put((m.topic, orjson.loads(m.payload)["transition"]))
    connect(sub, settings, persistent=False)
    sub.loop_start()
    assert ready.wait(10)
    cloud = _service(store, hook, mosquitto)
    try:
        _alert(store, T + 1, False)
        _alert(store, T + 2, True)  # raised
        _alert(store, T + 2, True, so="bay-a-1")  # not an air-* object: no alarm
        _settle(cloud)
        (first,) = _call(cloud, "GET", "/alarms", OPS)
        assert (first["so"], first["severity"], first["state"], first["raisedAt"]) == (
            "air-north", "major", "active_unack", T + 2)  # fmt: skip
        assert first["update"]["channels"]["pm25"] == {"current-value": 20.0}
        assert _call(cloud, "GET", "/alarms") == []  # nothing public
        assert _call(cloud, "GET", "/alarms", VIEWER) == []  # not an object it may read
        assert _call(cloud, "GET", f"/alarms/{first['id']}", VIEWER) == 404
        assert _call(cloud, "POST", f"/alarms/{first['id']}/ack") == 401
        assert _call(cloud, "POST", f"/alarms/{first['id']}/ack", VIEWER) == 404
        before = int(time.time() * 1000)
        acked = _call(cloud, "POST", f"/alarms/{first['id']}/ack", OPS)
        assert acked["state"] == "active_ack"
        assert acked["history"][0] == {"status": "raised", "at": T + 2, "by": "condition"}
        assert acked["history"][1]["status"] == "acknowledged"
        assert acked["history"][1]["by"] == "ops" and acked["history"][1]["at"] >= before
        assert _call(cloud, "POST", f"/alarms/{first['id']}/ack", OPS) == acked  # again: same
        _alert(store, T + 3, False)  # the condition goes away: cleared
        _settle(cloud)
        cleared = _call(cloud, "GET", f"/alarms/{first['id']}", OPS)
        assert (cleared["state"], cleared["clearedAt"]) == ("cleared_ack", T + 3)
        assert cleared["history"][-1] == {"status": "cleared", "at": T + 3, "by": "condition"}

        _alert(store, T + 4, True)  # a second alarm, cleared by hand
        _settle(cloud)
        (second,) = _call(cloud, "GET", "/alarms", OPS)
        assert second["id"] != first["id"]
        by_hand = _call(cloud, "POST", f"/alarms/{second['id']}/clear", OPS)
        assert by_hand["state"] == "cleared_unack" and by_hand["history"][-1]["by"] == "ops"
        _alert(store, T + 5, True)  # still alerting: it stays cleared
        _alert(store, T + 3, True, so="air-north")  # late (older than seen): changes nothing
        _settle(cloud)
        assert _call(cloud, "GET", "/alarms", OPS) == []
        _alert(store, T + 6, False)
        _alert(store, T + 7, True)  # away and back: a third alarm
        _settle(cloud)
        (third,) = _call(cloud, "GET", "/alarms", OPS)
        everything = _call(cloud, "GET", "/alarms?state=all", OPS)
        assert [a["id"] for a in everything] == [third["id"], second["id"], first["id"]]
        assert len(_call(cloud, "GET", "/alarms?state=cleared", OPS)) == 2

        transitions = [("raised", "active_unack"), ("acknowledged", "active_ack"),
                       ("cleared", "cleared_ack"), ("raised", "active_unack"),
                       ("cleared", "cleared_unack"), ("raised", "active_unack")]  # fmt: skip
        took = hook.take(6)
        assert took == transitions, hook.last
        assert set(hook.auth) == {"Bearer hook-token"}
        mqtt = [seen.get(timeout=15) for _ in range(6)]
        assert mqtt == [("cloudlet/alarms/pm25/air-north", t) for t, _ in transitions]
    finally:
        cloud.stop()
        sub.loop_stop()
        sub.disconnect()


@pytest.mark.mqtt
@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_restarted_cloud_raises_nothing_twice(
    db: str, mosquitto: Mosquitto, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """How far each rule has read and each object's condition are in the store: a restart
    neither raises the active alarm again nor misses what came while it was down."""
    if db == "sqlite":
        url = f"sqlite:///{tmp_path / 'cloud.db'}"
    else:
        url = request.getfixturevalue("postgres").url
        with PostgresStore(url)._transaction() as cur:
            cur.execute("TRUNCATE updates, channel_values, latest, alarms, alarm_state,"
                        " alarm_cursors")  # fmt: skip
    hook = Hook()
    cloud = _service(url, hook, mosquitto)
    try:
        _alert(cloud.store, T + 1, True)
        _settle(cloud)
        assert hook.take(1) == [("raised", "active_unack")]
    finally:
        cloud.stop()
    down = open_store(url)
    _alert(down, T + 2, True)
    _alert(down, T + 3, False)  # while the cloud is down
    down.close()
    again = _service(url, hook, mosquitto)
    try:
        _settle(again)
        assert hook.take(1) == [("cleared", "cleared_unack")]
        assert len(_call(again, "GET", "/alarms?state=all", OPS)) == 1
    finally:
        again.stop()


def test_what_counts_as_alerting_and_a_rule_that_names_no_stream() -> None:
    def update(value: Any) -> dict[str, Any]:
        return {"channels": {"a": {"current-value": value}}}

    assert [alerting(update(v), "a") for v in (True, False, 3, 0, -1.5, "x")] == [
        True, False, True, False, False, None]  # fmt: skip
    assert alerting({"channels": {}}, "a") is None
    with pytest.raises(ValidationError, match="must be <object pattern>/<stream>"):
        AlarmRule.model_validate({"name": "r", "from": "*", "when": "a"})
