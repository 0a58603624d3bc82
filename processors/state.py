"""Durable snapshots of a unit's state (latest values, open windows): msgpack, written to a
temporary file, fsynced, then renamed over the old one, so a crash leaves either the old or
the new snapshot, never a torn one."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger(__name__)


class StateStore:
    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.state"
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, state: Any) -> None:
        tmp = self.path.with_suffix(".state.tmp")
        with tmp.open("wb") as out:
            out.write(msgpack.packb(state, use_bin_type=True))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load(self) -> Any | None:
        """The last snapshot, or None (first start; or an unreadable file, which is kept
        aside as *.state.bad and logged, never fatal)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            aside = self.path.with_suffix(".state.bad")
            os.replace(self.path, aside)
            log.error("state snapshot %s is unreadable (%s); kept as %s, starting empty",
                      self.path, exc, aside)  # fmt: skip
            return None


class BrokerState:
    """A partition's snapshots, kept on the broker as a retained message published on the
    partition's own MQTT session (`processors.partitions`): whichever replica takes the
    session next finds the last one there.

    Why it is safe: a snapshot is published before the acknowledgements of the messages it
    covers, on the same connection, and the broker handles a connection's packets in order;
    a replica taking the session over closes the previous owner's connection first. So the
    retained snapshot a new owner reads covers every message acknowledged, and what it does
    not cover is redelivered by the session (those it covers but were not acknowledged come
    flagged DUP and are skipped, as after a restart)."""

    remote = True

    def __init__(self, topic: str, sync_topic: str) -> None:
        self.path = topic  # what the logs call it
        self.topic, self.sync_topic = topic, sync_topic
        self.client: Any = None  # the partition's WireClient, set by its runtime
        self._saved: Any | None = None
        self._nonce = b""
        self._synced = threading.Event()

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self.topic, 0), (self.sync_topic, 0)]

    def save(self, state: Any) -> None:
        self.client.publish([(self.topic, msgpack.packb(state, use_bin_type=True))], 1,
                            retain=True)  # fmt: skip

    def take(self, messages: list[Any]) -> list[Any]:
        """The messages that are not about the state (network thread)."""
        rest = []
        for m in messages:
            if m.topic == self.topic:
                if not self._synced.is_set():
                    self._saved = self._unpack(bytes(m.payload))
            elif m.topic == self.sync_topic:
                if bytes(m.payload) == self._nonce:
                    self._synced.set()
            else:
                rest.append(m)
        return rest

    def load(self, stopping: threading.Event, fenced: Callable[[], bool]) -> Any | None:
        """The retained snapshot, once connected: a marker published after subscribing comes
        back after the retained message, if there is one. Then the state topics are left
        (the partition's own later snapshots need not come back to it)."""
        while not stopping.is_set() and not fenced():
            if not self.client.connected.wait(0.2):
                continue
            self._nonce = os.urandom(8).hex().encode()
            self.client.publish([(self.sync_topic, self._nonce)], 0)
            if self._synced.wait(5):
                self.client.unsubscribe([self.topic, self.sync_topic])
                return self._saved
        return None

    def _unpack(self, data: bytes) -> Any | None:
        if not data:
            return None
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            log.error("the snapshot retained on %s is unreadable (%s); starting empty",
                      self.topic, exc)  # fmt: skip
            return None
