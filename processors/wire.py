"""A lean MQTT v5 client for a processing unit's data plane, on asyncio and the frame kernel.

Why not paho here: paho decodes every packet in Python and calls back once per message, which
caps a unit at a few thousand messages a second while everything after it runs far faster.
This client reads the socket in large chunks, cuts them into packets with the compiled frame
kernel (`streams.kernels.split_frames`) and hands the unit whole lists of PUBLISHes; it encodes
outgoing PUBLISHes and PUBACKs in bulk the same way. It speaks just what a unit needs: QoS 0/1,
persistent sessions, acknowledgements sent when the caller says so (after its checkpoint),
shared subscriptions, TLS, passwords, keep-alive, reconnect with backoff and jitter, and the
broker's receive maximum for what we publish. Devices and tools keep paho
(`streams.transport.mqtt`).

Threads: asyncio runs in a thread of its own; `publish`, `flush`, `ack` and `stop` are safe
to call from any other thread. `on_messages` is called on the network thread and must not block.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from processors.packets import (
    MQTT_MAX_PACKET,
    connect_packet,
    content_type_property,
    publish_packet_id,
    read_properties,
    subscribe_packet,
    tls_context,
    unsubscribe_packet,
)
from streams import kernels
from streams.kernels import FrameError
from streams.transport.mqtt import MqttSettings, refusal

log = logging.getLogger(__name__)

CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP, DISCONNECT = 2, 4, 9, 11, 13, 14
SESSION_TAKEN_OVER = 0x8E  # DISCONNECT reason: a connection with our client id came
PINGREQ = b"\xc0\x00"
CONNECT_TIMEOUT = 10.0
MAX_TOPIC = 65_535  # bytes: a topic's length is a 16-bit field
PUBLISH_OVERHEAD = 64  # fixed header, packet id and properties of a PUBLISH we build


class WireError(Exception):
    """The broker refused us, or broke the protocol."""


class _Protocol(asyncio.Protocol):
    def __init__(self, client: WireClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data: bytes) -> None:
        # A packet larger than one read arrives in pieces: join them once it is complete.
        self._chunks.append(data)
        self._have += len(data)
        if self._have < self._need:
            return
        buf = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        client = self.client
        client._last_read = time.monotonic()
        try:
            publishes, others, used, need = kernels.split_frames(buf, int(client.clock() * 1000))
        except FrameError as exc:
            log.error("malformed packet from the broker, reconnecting: %s", exc)
            client.metrics_malformed += 1
            self._chunks, self._have, self._need = [], 0, 0
            assert self.transport is not None
            self.transport.abort()
            return
        rest = buf[used:] if used < len(buf) else b""
        self._chunks = [rest] if rest else []
        self._have = len(rest)
        self._need = need
        acks: list[bytes] = []  # PUBACKs handled together: one lock, not one per packet
        for kind, flags, body in others:
            if kind == PUBACK:
                acks.append(body)
                continue
            if acks:  # in order with the other packets
                client._pubacks(acks)
                acks = []
            client._packet(kind, flags, body)
        if acks:
            client._pubacks(acks)
        if client._freed:  # PUBACKs made room: what waits goes out in one write, not one each
            client._freed = False
            client._drain()
        if publishes:
            client.on_messages(publishes)


class WireClient:
    """Connects, subscribes on every connect, delivers PUBLISH lists, publishes in bulk."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]],
        on_messages: Callable[[list[Any]], None],
        on_connection: Callable[[bool], None] = lambda _up: None,
        on_confirmed: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        persistent: bool = True,
        max_packet: int = 0,
        will: tuple[str, bytes] | None = None,
        on_taken_over: Callable[[], None] = lambda: None,
        may_reconnect: Callable[[], bool] = lambda: True,
    ) -> None:
        """`max_packet` (bytes, 0 for none) is told to the broker (MQTT v5's Maximum Packet
        Size): it does not send us anything larger, so no client can make us hold a huge body."""
        self.settings = settings
        self.max_receive_packet = max_packet
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.on_messages = on_messages
        self.on_connection = on_connection
        self.on_confirmed = on_confirmed
        self.clock = clock
        self.persistent = persistent
        self.will = will
        # Another connection took our client id (a replica taking over a partition's session):
        # we do not reconnect, or the two would take it from each other in turn.
        self.taken_over = False
        self.on_taken_over = on_taken_over
        # Asked before each reconnect: a partition's session is not taken back from the
        # replica that owns it now (Mosquitto 2.0 closes the old connection of a taken-over
        # session without always telling it why).
        self.may_reconnect = may_reconnect
        self.connected = threading.Event()  # connected and subscribed
        self.metrics_malformed = 0  # malformed packets from the broker (each a reconnect)
        self.refused_publishes = 0  # PUBACKs with a failure reason code
        self.refusals = 0  # CONNACKs refusing us: credentials, authorisation
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{client_id}", daemon=True)
        self._protocol: _Protocol | None = None
        self._stopping = False
        self._last_read = self._last_write = time.monotonic()
        self._server_receive_max = 65535
        self._server_max_packet = 0
        self._keepalive = settings.keepalive
        # Outgoing: queued batches, then at most `receive maximum` QoS 1 packets in flight.
        self._pending: deque[tuple[list[tuple[str, bytes]], int, bytes, int, bool]] = deque()
        self._inflight: dict[int, bytes] = {}
        self._next_id = 0
        self._outstanding = 0  # QoS 1 publishes not yet acknowledged (guarded by _acked)
        self._outstanding_bytes = 0  # and their payloads' bytes (guarded by _acked)
        self._acked = threading.Condition()
        # QoS 1 publishes are numbered in the order of `publish` calls; `confirmed` is the
        # highest number up to which the broker has acknowledged every one (guarded by _acked).
        self._published = 0
        self._confirmed = 0
        self._done: set[int] = set()  # acknowledged past the first gap
        self._seq_of: dict[int, int] = {}  # packet id in flight -> its number
        self._bytes_of: dict[int, int] = {}  # packet id in flight -> its payload's bytes
        self._wake_at: float = float("inf")  # call on_confirmed once confirmed reaches this
        self._thresholds: Counter[int] = Counter()  # of the threads in wait_below
        self._freed = False  # PUBACKs in the read being handled made room in flight
        self._notify_below = 0
        self._bytes_thresholds: Counter[int] = Counter()  # of the threads in wait_below
        self._notify_bytes = 0
        self._handshake: asyncio.Future[tuple[bool, dict[int, Any]]] | None = None
        self._suback: asyncio.Future[bytes] | None = None

    # any thread ------------------------------------------------------------------------------

    def start(self) -> WireClient:
        self._thread.start()
        return self

    def publish(
        self,
        messages: list[tuple[str, bytes]],
        qos: int = 1,
        content_type: str | None = None,
        *,
        retain: bool = False,
    ) -> list[tuple[str, bytes]]:
        """Queue `messages` (topic, payload); QoS 1 ones count for `flush` until the broker
        acknowledges them. Queued while disconnected, sent after reconnecting. Returns those
        refused, not sent: over MQTT's limits (`sendable`)."""
        if not messages:
            return []
        refused: list[tuple[str, bytes]] = []
        if not all(self.sendable(t, p) for t, p in messages):
            # Encoded, a topic over 65,535 bytes would wrap its 16-bit length and the broker
            # would drop us (and we would resend it forever): never put one on the wire.
            refused = [(t, p) for t, p in messages if not self.sendable(t, p)]
            self.refused_publishes += len(refused)
            log.error("not publishing %d messages over MQTT's limits (first to %.100r...)",
                      len(refused), refused[0][0])  # fmt: skip
            messages = [(t, p) for t, p in messages if self.sendable(t, p)]
            if not messages:
                return refused
        first = 0
        if qos:
            size = sum([len(p) for _, p in messages])
            with self._acked:
                self._outstanding += len(messages)
                self._outstanding_bytes += size
                first = self._published + 1
                self._published += len(messages)
        self._loop.call_soon_threadsafe(
            self._queue, messages, qos, content_type_property(content_type), first, retain
        )
        return refused

    @property
    def published(self) -> int:
        """How many QoS 1 messages `publish` has taken so far (each one's number)."""
        return self._published

    @property
    def confirmed(self) -> int:
        """Every QoS 1 message numbered up to this one is acknowledged by the broker (or
        refused as too large for it, and counted)."""
        return self._confirmed

    def wake_when_confirmed(self, number: int) -> None:
        """Call `on_confirmed` (on the network thread) once `confirmed` reaches `number`."""
        with self._acked:
            if self._confirmed >= number:
                wake = True
            else:
                self._wake_at, wake = min(self._wake_at, number), False
        if wake:
            self.on_confirmed()

    def wait_below(
        self, count: int, timeout: float | None = None, nbytes: int | None = None
    ) -> bool:
        """Wait until fewer than `count` QoS 1 publishes are unacknowledged (and, with
        `nbytes`, fewer than that many bytes of their payloads). (Waiters are woken when the
        count falls below the highest of their thresholds, not on every acknowledgement: a
        thousand wake-ups per window cost more than the window.)"""
        limit = nbytes if nbytes is not None else 1 << 62
        with self._acked:
            self._thresholds[count] += 1
            self._notify_below = max(self._thresholds)
            if nbytes is not None:
                self._bytes_thresholds[nbytes] += 1
                self._notify_bytes = max(self._bytes_thresholds)
            try:
                return self._acked.wait_for(
                    lambda: self._outstanding < count and self._outstanding_bytes < limit,
                    timeout,
                )
            finally:
                self._thresholds[count] -= 1
                if not self._thresholds[count]:
                    del self._thresholds[count]
                self._notify_below = max(self._thresholds, default=0)
                if nbytes is not None:
                    self._bytes_thresholds[nbytes] -= 1
                    if not self._bytes_thresholds[nbytes]:
                        del self._bytes_thresholds[nbytes]
                    self._notify_bytes = max(self._bytes_thresholds, default=0)

    @property
    def max_packet(self) -> int:
        """The largest packet we may send: the broker's maximum, or MQTT's."""
        return self._server_max_packet or MQTT_MAX_PACKET

    def sendable(self, topic: str, payload: bytes) -> bool:
        """Whether (topic, payload) can be published as is: the topic within MQTT's 65,535
        bytes and the packet within the broker's maximum packet size."""
        if len(topic) * 4 + len(payload) + PUBLISH_OVERHEAD <= min(MAX_TOPIC, self.max_packet):
            return True  # the common case, without encoding the topic
        size = len(topic.encode("utf-8", "surrogatepass"))
        return size <= MAX_TOPIC and size + len(payload) + PUBLISH_OVERHEAD <= self.max_packet

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the broker has acknowledged every QoS 1 message published so far."""
        return self.wait_below(1, timeout)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def outstanding_bytes(self) -> int:
        """The payload bytes of the QoS 1 publishes not yet acknowledged."""
        return self._outstanding_bytes

    def ack(self, packet_ids: list[int]) -> None:
        """PUBACK these received QoS 1 messages (the broker then forgets them)."""
        if packet_ids:
            self._loop.call_soon_threadsafe(self._write, kernels.puback_frames(packet_ids))

    def unsubscribe(self, topics: list[str]) -> None:
        """Stop receiving these (and leave them out of the subscriptions of later connects)."""
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t not in topics]
        if topics:
            self._loop.call_soon_threadsafe(
                lambda: self._write(unsubscribe_packet(topics, self._packet_id()))
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly (the persistent session stays on the broker) and end the thread."""
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(timeout)

    # network thread --------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    def _shutdown(self) -> None:
        self._stopping = True
        if self._protocol is not None and self._protocol.transport is not None:
            self._write(b"\xe0\x00")  # DISCONNECT, normal: the session is kept
            self._protocol.transport.close()

    async def _main(self) -> None:
        delay = self.settings.reconnect_min_delay * random.uniform(1.0, 2.0)
        keepalive = asyncio.ensure_future(self._keep_alive())
        try:
            while not self._stopping:
                try:
                    await self._session()
                    delay = self.settings.reconnect_min_delay * random.uniform(1.0, 2.0)
                except (OSError, WireError, TimeoutError) as exc:
                    log.warning("broker %s: %s", self.settings.url, exc)
                except Exception:  # a bug of ours: say so, and keep the unit connected
                    log.exception("MQTT client %s failed; reconnecting", self.client_id)
                finally:
                    self._down()
                if self._stopping:
                    break
                await asyncio.sleep(delay)
                if not self.may_reconnect():
                    log.info("%s: this session belongs to another connection now; not"
                             " reconnecting", self.client_id)  # fmt: skip
                    self.taken_over = self._stopping = True
                    self.on_taken_over()
                    break
                delay = min(delay * 2, self.settings.reconnect_max_delay)
        finally:
            keepalive.cancel()

    def _down(self) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self._protocol = None
        if was:
            self.on_connection(False)

    async def _session(self) -> None:
        loop = self._loop
        context = tls_context(self.settings) if self.settings.tls else None
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Protocol(self),
                self.settings.host,
                self.settings.port,
                ssl=context,
                server_hostname=self.settings.host if context else None,
            ),
            CONNECT_TIMEOUT,
        )
        self._protocol = protocol
        self._handshake = loop.create_future()
        self._write(
            connect_packet(
                self.settings, self.client_id, self.persistent, self.max_receive_packet, self.will
            )
        )
        present, props = await self._answer(self._handshake, protocol, "CONNACK")
        self._server_receive_max = props.get(0x21, 65535)
        self._server_max_packet = props.get(0x27, 0)
        self._keepalive = props.get(0x13, self.settings.keepalive)
        if self.subscriptions:  # (a client that only publishes, or ends a session: none)
            self._suback = loop.create_future()
            self._write(subscribe_packet(self.subscriptions))
            codes = await self._answer(self._suback, protocol, "SUBACK")
            subscribed = zip(self.subscriptions, codes, strict=False)
            refused = [(t, c) for (t, _), c in subscribed if c >= 0x80]
            if refused:
                raise WireError(
                    "subscription refused: "
                    + ", ".join(f"{t} (reason 0x{c:02x})" for t, c in refused)
                )
        # What was in flight when the connection dropped goes again, flagged DUP.
        for frame in self._inflight.values():
            self._write(bytes([frame[0] | 0x08]) + frame[1:])
        self._last_read = time.monotonic()
        self.connected.set()
        self.on_connection(True)
        log.info("connected to %s (session %s)", self.settings.url,
                 "resumed" if present else "new")  # fmt: skip
        self._drain()
        exc = await protocol.closed
        if not self._stopping:
            raise WireError(f"connection lost ({exc or 'closed by the broker'})")

    async def _answer(self, future: asyncio.Future[Any], protocol: _Protocol, what: str) -> Any:
        """The broker's answer, unless the connection drops or it takes too long."""
        done, _ = await asyncio.wait(
            [future, protocol.closed], timeout=CONNECT_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        if future in done:
            return future.result()
        future.cancel()
        if protocol.closed in done:
            raise WireError(f"connection lost waiting for {what} ({protocol.closed.result()})")
        raise WireError(f"no {what} from the broker in {CONNECT_TIMEOUT:.0f} s")

    def _packet(self, kind: int, flags: int, body: bytes) -> None:
        """A packet other than PUBLISH, from the protocol."""
        if kind == PUBACK:
            self._puback(body)
        elif kind in (PINGRESP, UNSUBACK):
            return
        elif kind == CONNACK and self._handshake is not None and not self._handshake.done():
            if len(body) < 2:
                self._handshake.set_exception(WireError("CONNACK too short"))
                return
            if body[1] >= 0x80:
                props, _ = read_properties(body, 2) if len(body) > 2 else ({}, 0)
                reason = props.get(0x1F, "")
                text = refusal(body[1], self.settings, self.client_id)
                self.refusals += 1
                self._handshake.set_exception(WireError(f"{text} {reason}".rstrip()))
                return
            props, _ = read_properties(body, 2) if len(body) > 2 else ({}, 0)
            self._handshake.set_result((bool(body[0] & 1), props))
        elif kind == SUBACK and self._suback is not None and not self._suback.done():
            _, i = read_properties(body, 2)
            self._suback.set_result(body[i:])
        elif kind == DISCONNECT:
            reason = body[0] if body else 0
            if reason == SESSION_TAKEN_OVER:
                log.info("%s: another connection took over this session", self.client_id)
                self.taken_over = self._stopping = True
                self.on_taken_over()
            else:
                log.warning("broker disconnected us: reason 0x%02x", reason)
            self._abort()
        else:
            log.error("unexpected packet type %d from the broker, reconnecting", kind)
            self._abort()

    def _abort(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    def _puback(self, body: bytes) -> None:
        self._pubacks([body])

    def _pubacks(self, bodies: list[bytes]) -> None:
        """The PUBACKs of one read of the socket."""
        inflight, seq_of, bytes_of, seqs, freed = (
            self._inflight, self._seq_of, self._bytes_of, [], 0
        )  # fmt: skip
        for body in bodies:
            if len(body) < 2:
                log.error("PUBACK too short, reconnecting")
                self._abort()
                break
            packet_id = (body[0] << 8) | body[1]
            if inflight.pop(packet_id, None) is None:
                continue  # a late duplicate after a resend
            if len(body) > 2 and body[2] >= 0x80:
                self.refused_publishes += 1
                log.error("broker refused a publish: reason 0x%02x", body[2])
            seqs.append(seq_of.pop(packet_id, 0))
            freed += bytes_of.pop(packet_id, 0)
        if seqs:
            self._confirm_seqs(seqs, freed)
            self._freed = True  # drained once the whole read is handled (data_received)

    def _confirm(self, packet_id: int) -> None:
        """A QoS 1 publish is done with (acknowledged, or refused before sending)."""
        self._confirm_seqs([self._seq_of.pop(packet_id, 0)], self._bytes_of.pop(packet_id, 0))

    def _confirm_seqs(self, seqs: list[int], nbytes: int = 0) -> None:
        """QoS 1 publishes done with, by their sequence numbers (0: not counted in order), and
        the bytes of their payloads."""
        with self._acked:
            self._outstanding -= len(seqs)
            self._outstanding_bytes -= nbytes
            done = self._done
            done.update(seq for seq in seqs if seq)
            while self._confirmed + 1 in done:
                self._confirmed += 1
                done.discard(self._confirmed)
            if self._outstanding < self._notify_below or (
                nbytes and self._outstanding_bytes < self._notify_bytes
            ):
                self._acked.notify_all()
            wake = self._confirmed >= self._wake_at
            if wake:
                self._wake_at = float("inf")
        if wake:
            self.on_confirmed()

    def _write(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.write(data)
            self._last_write = time.monotonic()

    def _queue(
        self, messages: list[tuple[str, bytes]], qos: int, props: bytes, first: int, retain: bool
    ) -> None:
        self._pending.append((messages, qos, props, first, retain))
        if self.connected.is_set():
            self._drain()

    def _drain(self) -> None:
        """Send what is queued, keeping QoS 1 packets in flight within the receive maximum."""
        if not self.connected.is_set():
            return
        out: list[bytes] = []
        while self._pending:
            messages, qos, props, first, retain = self._pending[0]
            if qos:
                room = self._server_receive_max - len(self._inflight)
                if room <= 0:
                    break
                take, keep = messages[:room], messages[room:]
                ids = [self._packet_id() for _ in take]
                frames = kernels.publish_frames(take, 1, ids, props)
                self._inflight.update(zip(ids, frames, strict=True))
                self._seq_of.update(zip(ids, range(first, first + len(take)), strict=True))
                self._bytes_of.update(zip(ids, [len(p) for _, p in take], strict=True))
            else:
                take, keep = messages, []
                frames = kernels.publish_frames(take, 0, [], props)
            if retain:  # the RETAIN flag, bit 0 of the fixed header
                frames = [bytes([f[0] | 0x01]) + f[1:] for f in frames]
                if qos:
                    self._inflight.update(zip(ids, frames, strict=True))
            out.extend(self._fits(frames, take))
            if keep:
                self._pending[0] = (keep, qos, props, first + len(take), retain)
            else:
                self._pending.popleft()
        if out:
            self._write(b"".join(out))

    def _fits(self, frames: list[bytes], messages: list[tuple[str, bytes]]) -> list[bytes]:
        """Leave out (and log) packets over the broker's maximum packet size: sent anyway,
        the broker would drop the connection."""
        limit = self._server_max_packet
        if not limit:
            return frames
        keep = []
        for frame, (topic, _) in zip(frames, messages, strict=True):
            if len(frame) <= limit:
                keep.append(frame)
                continue
            self.refused_publishes += 1
            log.error("not publishing %d bytes to %s: over the broker's maximum packet size"
                      " (%d)", len(frame), topic, limit)  # fmt: skip
            packet_id = publish_packet_id(frame) if frame[0] & 0x06 else 0
            if packet_id and self._inflight.pop(packet_id, None) is not None:
                self._confirm(packet_id)
        return keep

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight:
                return self._next_id

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self._keepalive / 4))
            if not self.connected.is_set():
                continue
            now = time.monotonic()
            if now - self._last_read > self._keepalive * 1.5:
                log.warning("broker silent for %.0f s, reconnecting", now - self._last_read)
                self._abort()
            elif now - self._last_write >= self._keepalive / 2:
                self._write(PINGREQ)
