"""Many paho-mqtt clients served by one thread.

Why not paho's own `loop_start`: it is a thread per client and a `select()` per thread, and
`select()` cannot watch a descriptor numbered 1024 or above, so a simulation of about a
thousand devices (a client each, as each logs in as itself) fails to connect. Here one thread
waits on every client's socket with the platform's selector (epoll on Linux: no such limit)
through paho's documented external-loop API (`loop_read`, `loop_write`, `loop_misc` and the
`on_socket_*` callbacks), connects and reconnects them (with paho's own backoff settings), and
keeps them alive.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds between connection attempts of one client


class SharedLoop:
    """One network thread for many clients: `add` a client (after `connect_async`), `remove`
    it (after `disconnect`)."""

    def __init__(self, name: str = "mqtt-shared-loop") -> None:
        self._selector = selectors.DefaultSelector()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: dict[mqtt.Client, float] = {}  # client -> next connection attempt
        self._delay: dict[mqtt.Client, float] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._lock = threading.Lock()

    # any thread -------------------------------------------------------------------------------

    def add(self, client: mqtt.Client) -> None:
        """Serve `client` (its `connect_async` already called): connected from this loop."""
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()

        def serve() -> None:
            self._clients.setdefault(client, 0.0)
            self._attempt(client, time.monotonic())  # at once, not at the next keep-alive

        self._call(serve)

    def remove(self, client: mqtt.Client) -> None:
        """Stop serving `client` once what it queued (its DISCONNECT) is written."""

        def drop() -> None:
            self._clients.pop(client, None)
            self._delay.pop(client, None)
            sock = client.socket()
            if sock is not None:
                client.loop_write()  # what it still has to say (its DISCONNECT)
                self._unregister(sock)

        self._call(drop)

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._started:
            self._thread.join(10)

    def _call(self, what: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            what()
        else:
            self._calls.put(what)
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # its buffer is full: it is awake anyway
            pass

    # paho's callbacks (on the loop thread, or on a thread that publishes) -------------------

    def _opened(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._call(lambda: self._register(sock, selectors.EVENT_READ, client))

    def _closed(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._call(lambda: self._unregister(sock))

    def _want_write(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._call(lambda: self._register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                          client))  # fmt: skip

    def _done_writing(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._call(lambda: self._register(sock, selectors.EVENT_READ, client))

    # the loop thread ---------------------------------------------------------------------------

    def _register(self, sock: Any, events: int, client: mqtt.Client) -> None:
        try:
            self._selector.modify(sock, events, client)
        except KeyError:
            try:
                self._selector.register(sock, events, client)
            except (ValueError, OSError):  # closed meanwhile
                pass
        except (ValueError, OSError):
            pass

    def _unregister(self, sock: Any) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    def _run(self) -> None:
        last_misc = 0.0
        while not self._stopping:
            try:
                for key, mask in self._selector.select(timeout=0.5):
                    client = key.data
                    if client is None:  # woken
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                        continue
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE:
                        client.loop_write()
                while True:
                    try:
                        self._calls.get_nowait()()
                    except queue.Empty:
                        break
                now = time.monotonic()
                if now - last_misc >= 1.0:
                    last_misc = now
                    self._tend(now)
            except Exception:  # a bug of ours or of one client: said, and the others go on
                log.exception("MQTT shared loop")
                time.sleep(0.1)

    def _tend(self, now: float) -> None:
        """Keep-alives; connections (first ones, and again after a drop) when due."""
        for client, due in list(self._clients.items()):
            if client.socket() is not None:
                client.loop_misc()
                self._delay.pop(client, None)
                continue
            if now >= due:
                self._attempt(client, now)

    def _attempt(self, client: mqtt.Client, now: float) -> None:
        """Connect (again), the next attempt backed off if this one fails."""
        delay = min(self._delay.get(client, RETRY_MIN / 2) * 2, RETRY_MAX)
        self._delay[client] = delay
        self._clients[client] = now + delay
        try:
            client.reconnect()  # opens the socket (on_socket_open registers it)
        except OSError as exc:
            log.debug("%s: %s", client._client_id, exc)
