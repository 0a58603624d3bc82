"""Publishing over paho in the order of the calls, across connects and reconnects.

paho sends what was published while it was offline from its CONNACK handler, after the
on_connect callback has run; a publish from another thread in that gap goes out at once, ahead
of them (and ahead of the unacknowledged messages paho resends). A device posting readings in
time order then reaches the broker with later readings first, and event-time windows count the
earlier ones as late: measured, 3 of 10 runs of 3,000 updates posted while connecting came out
of order. Other MQTT clients had the same bug (paho.mqtt.golang #731, MQTT.js #450).

`OrderedPublisher` hands paho a message only when paho holds nothing older that it still has to
send: until then messages wait here, in order, and the queue is bounded.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

Done = Callable[[Any, bool], None]  # (the tag given to publish, refused by the broker)
MAX_PAYLOAD = 268_435_455  # MQTT's largest packet


class BufferFull(Exception):
    """`limit` messages wait or are unacknowledged already; this one was not queued."""


class OrderedPublisher:
    """Publishes through `client` in call order. The owner forwards three callbacks:
    `connected()` from on_connect (when the broker accepted), `disconnected()` from
    on_disconnect, `acknowledged(mid, reason)` from on_publish."""

    def __init__(self, client: mqtt.Client, *, limit: int = 0, on_done: Done | None = None):
        self._client = client
        self._limit = limit  # 0: unbounded (the caller bounds what it hands in)
        self._on_done = on_done
        # Never held while calling paho: paho runs on_publish under its own message lock.
        self._state = threading.Lock()
        # Held by the one thread handing messages to paho, so that they go in order.
        self._sending = threading.Lock()
        self._waiting: deque[tuple[str, bytes, int, Properties | None, Any]] = deque()
        self._unacked: dict[int, Any] = {}  # packet id -> tag: in paho, not yet acknowledged
        self._early: dict[int, bool] = {}  # acknowledged before publish() returned the id
        self._older: set[int] = set()  # unacknowledged when the connection came up
        self._connected = False
        self._live = False  # connected, and paho has nothing older left to resend

    @property
    def outstanding(self) -> int:
        """Messages waiting here or unacknowledged in paho."""
        with self._state:
            return len(self._waiting) + len(self._unacked)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        properties: Properties | None = None,
        tag: Any = None,
    ) -> None:
        """Queue one message; it goes out after everything published before it. Raises
        BufferFull when `limit` messages are outstanding, ValueError for a message MQTT
        cannot carry."""
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"{topic!r} is not a topic one can publish to")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"a payload of {len(payload)} bytes is larger than MQTT allows")
        with self._state:
            if self._limit and len(self._waiting) + len(self._unacked) >= self._limit:
                raise BufferFull(f"{self._limit} messages are waiting for the broker")
            self._waiting.append((topic, payload, qos, properties, tag))
        self._pump(block=True)

    def connected(self) -> None:
        # Taking the send lock first: no message is between paho and our books while we look.
        with self._sending:
            with self._state:
                self._connected = True
                self._older = set(self._unacked)  # paho resends these right after on_connect
                self._live = not self._older
        self._pump(block=True)

    def disconnected(self) -> None:
        with self._state:
            self._connected = self._live = False

    def acknowledged(self, mid: int, reason: Any) -> None:
        failed = bool(getattr(reason, "is_failure", False))
        with self._state:
            known = mid in self._unacked
            tag = self._unacked.pop(mid, None)
            if not known:
                self._early[mid] = failed
            self._older.discard(mid)
            woke = self._connected and not self._live and not self._older
            if woke:
                self._live = True
        if known and self._on_done is not None:
            self._on_done(tag, failed)
        if woke:
            self._pump(block=False)  # paho's thread, inside paho's lock: never wait here

    def _pump(self, *, block: bool) -> None:
        """Hand paho what waits, in order, while live. Whoever holds the send lock does it;
        one that finds it taken leaves the work to the holder, which looks again once it has
        let go."""
        while True:
            if not self._sending.acquire(blocking=block):
                return
            try:
                self._hand_over()
            finally:
                self._sending.release()
            with self._state:
                if not (self._live and self._waiting):
                    return
            block = False

    def _hand_over(self) -> None:
        while True:
            with self._state:
                if not (self._live and self._waiting):
                    return
                topic, payload, qos, properties, tag = self._waiting.popleft()
            try:
                mid = self._client.publish(topic, payload, qos=qos, properties=properties).mid
            except Exception:  # checked in publish(); anything else costs this message only
                log.exception("could not publish to %s", topic)
                if self._on_done is not None:
                    self._on_done(tag, True)
                continue
            with self._state:
                failed = self._early.pop(mid, None)
                if failed is None:
                    self._unacked[mid] = tag
            if failed is not None and self._on_done is not None:
                self._on_done(tag, failed)
