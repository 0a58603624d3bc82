"""Alarms: what an alert stream raises, with a lifecycle an operator works through.

An alarm rule (`alarms:` in `cloud.yaml`) names alert streams (`from: "*/pm25_alert"`, an
object pattern and a stream: a threshold's, a post-filter's, a rule's) and the channel whose
value says "alerting" (`when: alert`: true, or a number above 0). Each object's alert raises
an **alarm** with the rule's severity when its channel turns true; the alarm is then

    active, unacknowledged -> acknowledged (by whom, when) -> cleared

cleared by the condition going away (the channel turning false: `by: condition`) or by hand
(by whom, when), acknowledged before or after. An alarm cleared by hand while the condition
holds stays cleared: the next alarm comes when the condition goes away and comes back. The
alarms and every transition are kept in the store (`alarms`), and each transition is
notified (an HTTP webhook, an MQTT topic) without ever holding the evaluation up.

The evaluation reads the store (the updates of the alert streams, in event time, after the
last one seen), so it covers every writer: the materializer of a cloud reading Kafka, and a
unit whose outbox drains straight into the store (the embedded default).
"""

from __future__ import annotations

import fnmatch
import logging
import queue
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloud_sync.store import CloudStore
from streams.transport.mqtt import MqttSettings

log = logging.getLogger(__name__)
Severity = Literal["critical", "major", "minor", "warning", "indeterminate"]
POLL = 0.5  # seconds between looks at the alert streams
# transitions waiting for their notification, at most: with a receiver away and an alert
# flapping, the oldest wait and the newest are counted as failed (the store has them all)
BACKLOG = 10_000


class AlarmRule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    source: str = Field(alias="from")  # "<object pattern>/<stream>"
    when: str  # the channel: true (or > 0) raises, false (or 0) clears
    severity: Severity = "major"

    @field_validator("source")
    @classmethod
    def _shape(cls, value: str) -> str:
        objects, _, stream = value.rpartition("/")
        if not objects or not stream or any(c in stream for c in "*?["):
            raise ValueError(
                f"from {value!r} must be <object pattern>/<stream>, such as */pm25_alert"
            )
        return value

    @property
    def stream(self) -> str:
        return self.source.rpartition("/")[2]

    @property
    def objects(self) -> str:
        return self.source.rpartition("/")[0]


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://")
    token: str | None = None  # sent as Authorization: Bearer <token>


class MqttNotify(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    topic: str = "cloudlet/alarms"  # each transition on <topic>/<rule>/<object>


class NotifySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    webhook: WebhookSettings | None = None
    mqtt: MqttNotify | None = None


def alerting(update: dict[str, Any], channel: str) -> bool | None:
    """Whether an update of an alert stream says "alerting" (None: it does not say)."""
    value = (update.get("channels", {}).get(channel) or {}).get("current-value")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value > 0
    return None


class Notifier:
    """Each transition to the webhook and the MQTT topic, from a thread of its own: a slow
    or absent receiver delays its notifications (retried three times, then counted as
    failed), never the alarms."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(BACKLOG)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudlet-alarm-notifier",
                                        daemon=True)  # fmt: skip
        self._mqtt: Any = None

    def start(self) -> Notifier:
        self._thread.start()
        return self

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)  # after what waits: sent first
        except queue.Full:  # a receiver away for long: leave after the one being sent
            self._stop.set()
        self._thread.join(15)
        if self._mqtt is not None:
            self._mqtt.loop_stop()
            self._mqtt.disconnect()

    def notify(self, transition: str, alarm: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait({"transition": transition, "alarm": alarm})
        except queue.Full:
            self.failed += 1
            log.warning("alarm %s %s: not notified, %d notifications wait already",
                        alarm["id"], transition, BACKLOG)  # fmt: skip

    def _run(self) -> None:
        while (event := self._queue.get()) is not None and not self._stop.is_set():
            body = orjson.dumps(event)
            targets: list[tuple[Callable[[dict[str, Any], bytes], None], bool]] = [
                (self._post, self.settings.webhook is not None),
                (self._publish, self.settings.mqtt is not None),
            ]
            for send, wanted in targets:  # each its own tries: one away repeats not the other
                if not wanted:
                    continue
                for attempt in range(3):
                    try:
                        send(event["alarm"], body)
                        self.sent += 1
                        break
                    except Exception as exc:  # a receiver away: again, then given up, counted
                        if attempt == 2:
                            self.failed += 1
                            log.warning("alarm notification not delivered: %s", exc)
                        else:
                            time.sleep(0.5 * (attempt + 1))

    def _post(self, _alarm: dict[str, Any], body: bytes) -> None:
        hook = self.settings.webhook
        assert hook is not None
        headers = {"Content-Type": "application/json"}
        if hook.token:
            headers["Authorization"] = f"Bearer {hook.token}"
        request = urllib.request.Request(hook.url, body, headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def _publish(self, alarm: dict[str, Any], body: bytes) -> None:
        target = self.settings.mqtt
        assert target is not None
        topic = f"{target.topic}/{alarm['rule']}/{alarm['so']}"
        info = self._client(target).publish(topic, body, qos=1)
        info.wait_for_publish(10)
        if not info.is_published():
            raise OSError(f"the broker at {target.url} did not take {topic}")

    def _client(self, target: MqttNotify) -> Any:
        """The MQTT client, connected (made at the first notification)."""
        if self._mqtt is None:
            from streams.transport.mqtt import connect, make_client

            settings = MqttSettings(url=target.url)
            client = make_client(settings, f"cloudlet-alarms-{uuid.uuid4().hex[:8]}")
            up = threading.Event()
            client.on_connect = lambda *_: up.set()
            connect(client, settings, persistent=False)
            client.loop_start()
            self._mqtt = client
            if not up.wait(10):
                raise OSError(f"no connection to {settings.url} in 10 s")
        return self._mqtt


class AlarmWatcher:
    """Evaluates the rules on what the alert streams receive (a thread of its own; a bug on
    one update is logged and costs that update, never the thread)."""

    def __init__(
        self, store: CloudStore, rules: list[AlarmRule], notifier: Notifier | None,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.store, self.rules, self.notifier, self.clock = store, rules, notifier, clock
        self.evaluated = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudlet-alarms", daemon=True)

    def start(self) -> AlarmWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(15)

    @property
    def alive(self) -> bool:
        return self._stop.is_set() or self._thread.is_alive() or not self._thread.ident

    def poke(self) -> None:
        """Look now (updates were just stored)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.evaluate()
            except Exception as exc:  # the store away, or a bug of ours: said, and tried again
                if self.store.transient(exc):  # busy (SQLite locked by a writer) or away
                    log.warning("alarms: the store is busy or away (%s); trying again", exc)
                else:
                    log.exception("alarms: evaluation failed; trying again")
            self._wake.wait(POLL)
            self._wake.clear()

    def evaluate(self) -> int:
        """Every update of the alert streams not seen yet, in event time: the transitions it
        makes. How many updates later than those seen before were looked at."""
        seen = 0
        for rule in self.rules:
            # from the last instant seen, included: an update of that instant stored after
            # the last look is taken too (one already taken changes nothing: alarm_condition)
            start = cursor = self.store.alarm_cursor(rule.name)
            for so, last_update, body in self.store.updates_after(rule.stream, start, 1000):
                seen += last_update > start
                cursor = max(cursor, last_update)
                if not fnmatch.fnmatchcase(so, rule.objects):
                    continue
                try:
                    value = alerting(orjson.loads(body), rule.when)
                except Exception:  # an update that is not a document: it says nothing
                    log.exception("alarms: update of %s/%s unreadable", so, rule.stream)
                    continue
                if value is not None:
                    self._apply(rule, so, last_update, value, body)
            self.store.set_alarm_cursor(rule.name, cursor)
        self.evaluated += seen
        return seen

    def _apply(self, rule: AlarmRule, so: str, at: int, value: bool, body: str) -> None:
        changed = self.store.alarm_condition(
            rule.name, so, rule.stream, rule.severity, value, at, body, uuid.uuid4().hex
        )
        if changed is not None and self.notifier is not None:
            self.notifier.notify(*changed)
