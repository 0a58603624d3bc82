"""The forwarder: the outbox to Apache Kafka, in order, at least once, never losing a record.

It reads the outbox (the most urgent priority first), produces each record with aiokafka
(idempotent producer, acks=all, compression, batching and linger), waits for the whole batch
to be acknowledged, and only then acknowledges it in the outbox. A failure rewinds the outbox
to the first unacknowledged record and retries after a backoff with jitter, so a replay after
an outage is in order. A resent record keeps its message id, which makes the cloud side's
writes idempotent.

Record format (topic `cloudlet.updates` by default; key: the service object id, so each
object's updates stay in order on one partition):

    {"messageId": "<outbox>-<priority>-<seq>", "site": "<cloudlet id>", "so": "...",
     "stream": "...", "enqueued": ms, "update": {ServIoTicy sensor update}}

JSON by default, so any Kafka consumer can read it; msgpack with `codec: msgpack`. Headers:
`content-type` and `site`; with `kafka: {headers: full}` also `so`, `stream`, `message-id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import orjson

from cloud_sync.outbox import Outbox, Record
from cloud_sync.settings import ForwarderSettings

# imported where used: a unit forwarding to a store loads no aiokafka, one forwarding to Kafka
# no SQLite (1.5 MB at rest)
if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from cloud_sync.store import CloudStore

log = logging.getLogger(__name__)
IN_FLIGHT = 3  # reads of the outbox in Kafka's hands at once


class ForwarderCounts:
    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.retries = 0
        self.batches = 0
        self.dead_letters = 0  # records too large for Kafka: an excerpt dead-lettered


def encode_record(record: Record, site: str, codec: str, message_id: str | None = None) -> bytes:
    message_id = message_id or record.message_id(site)
    if codec == "msgpack":
        return msgpack.packb({
            "messageId": message_id, "site": site, "so": record.key.so,
            "stream": record.key.stream, "enqueued": record.enqueued,
            "update": orjson.loads(record.body),
        })  # fmt: skip
    return orjson.dumps({
        "messageId": message_id, "site": site, "so": record.key.so, "stream": record.key.stream,
        "enqueued": record.enqueued, "update": orjson.Fragment(record.body),
    })  # fmt: skip


def encode_records(records: Sequence[Record], site: str, codec: str) -> list[tuple[str, bytes]]:
    """(message id, value) of each record, as `encode_record` gives them. JSON is put
    together from pieces encoded once per object and stream (byte for byte what orjson
    makes of the whole document): the forwarder's cost per record is most of its CPU."""
    if codec != "json":
        return [(m := r.message_id(site), encode_record(r, site, codec, m)) for r in records]
    head = b'{"messageId":'
    middle = b',"site":' + orjson.dumps(site) + b',"so":'
    pieces: dict[tuple[str, str], bytes] = {}
    out = []
    for r in records:
        message_id = r.message_id(site)
        key = r.key
        piece = pieces.get(key)
        if piece is None:
            piece = pieces[key] = (orjson.dumps(key.so) + b',"stream":' + orjson.dumps(key.stream)
                                   + b',"enqueued":')  # fmt: skip
        value = b"".join((head, orjson.dumps(message_id), middle, piece,
                          str(r.enqueued).encode(), b',"update":', r.body, b"}"))  # fmt: skip
        out.append((message_id, value))
    return out


class Forwarder:
    """Runs in a thread of its own with its own event loop (the unit is synchronous)."""

    def __init__(self, outbox: Outbox, settings: ForwarderSettings) -> None:
        self.outbox = outbox
        self.settings = settings
        self.counts = ForwarderCounts()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="cloudlet-forwarder", daemon=True)
        self._content_type = (
            b"application/msgpack" if settings.codec == "msgpack" else b"application/json"
        )
        self._of_so: dict[str, tuple[bytes, int]] = {}  # object -> (key, partition)
        self._partition_count = 0

    def start(self) -> Forwarder:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() or not self._thread.ident

    def _main(self) -> None:
        asyncio.run(self._run())

    def _transient(self) -> tuple[type[BaseException], ...]:
        """The errors of a destination that is away (retried quietly), for what is used."""
        errors: list[type[BaseException]] = [TimeoutError, OSError]
        if self.settings.store is not None:
            import sqlite3

            errors.append(sqlite3.Error)
        if self.settings.kafka is not None:
            from aiokafka.errors import KafkaError

            errors.append(KafkaError)
        if self.settings.store is not None and self.settings.store.startswith("postgres"):
            import psycopg

            errors.append(psycopg.Error)
        return tuple(errors)

    async def _run(self) -> None:
        transient = self._transient()
        delay = self.settings.retry_min
        producer: AIOKafkaProducer | None = None
        store: CloudStore | None = None
        in_flight: deque[tuple[Sequence[Record], asyncio.Future[Any], int]] = deque()
        # Woken by the unit's write, on this loop (no thread between them), not polling
        loop, wake = asyncio.get_running_loop(), asyncio.Event()

        def written() -> None:  # in the unit's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to wake
                loop.call_soon_threadsafe(wake.set)

        unwatch = self.outbox.watch(written)
        woken: asyncio.Task[Any] | None = None
        while not self._stop.is_set():
            try:
                if self.settings.store is not None:  # the embedded default: no Kafka
                    if store is None:
                        from cloud_sync.store import open_store

                        store = await asyncio.to_thread(open_store, self.settings.store)
                        self.connected.set()
                    records = await asyncio.to_thread(self.outbox.read, self.settings.batch, 0.25)
                    if not records:
                        if self.outbox.acks_due():  # acknowledgements stopped: made durable
                            await asyncio.to_thread(self.outbox.sync_acks)
                        continue
                    await asyncio.to_thread(self._store, store, records)
                    await asyncio.to_thread(self.outbox.ack, records)
                    continue
                if producer is None:
                    from aiokafka import AIOKafkaProducer

                    assert self.settings.kafka is not None
                    producer = AIOKafkaProducer(**self.settings.kafka.producer_options())
                    await producer.start()
                    self.connected.set()
                    log.info("forwarder connected to %s", self.settings.kafka.bootstrap_servers)
                # A record waits for no timer, nor for Kafka's acknowledgement of the records
                # before it: up to IN_FLIGHT reads are in Kafka's hands at once, acknowledged
                # in the outbox in order. Reads wait for nothing (a read under the outbox's
                # lock is a file read and a parse of what it returns).
                if in_flight and (len(in_flight) >= IN_FLIGHT or in_flight[0][1].done()):
                    await self._delivered(*in_flight.popleft())
                    delay = self.settings.retry_min
                    continue
                wake.clear()
                records = self.outbox.read(self.settings.batch)
                if records:
                    in_flight.append((records, *await self._send(producer, records)))
                else:  # a write, the oldest read delivered, or a look at the stop flag
                    if self.outbox.acks_due():  # acknowledgements stopped: made durable
                        await asyncio.to_thread(self.outbox.sync_acks)
                    if woken is None or woken.done():
                        woken = asyncio.ensure_future(wake.wait())
                    pending = (woken, in_flight[0][1]) if in_flight else (woken,)
                    await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                delay = self.settings.retry_min
            except Exception as exc:  # Kafka or the store away, or a bug: retry in order
                for _, delivered, _ in in_flight:  # resent from the outbox, in order
                    delivered.cancel()
                in_flight.clear()
                if not isinstance(exc, transient):
                    log.exception("forwarder failed unexpectedly; retrying")
                self.connected.clear()
                self.counts.retries += 1
                self.outbox.rewind()  # replay in order from the first unacknowledged record
                wait = min(self.settings.retry_max, delay) * random.uniform(0.5, 1.5)
                log.warning("forwarder: %s: %s; retrying in %.1f s (outbox depth %d)",
                            type(exc).__name__, exc, wait, self.outbox.depth())  # fmt: skip
                if producer is not None:
                    await _close(producer)
                    producer = None
                await asyncio.sleep(wait)
                delay = min(self.settings.retry_max, delay * 2)
        unwatch()
        if woken is not None:
            woken.cancel()
        try:  # stopping: what is in flight is acknowledged if it arrives soon (else resent)
            while in_flight:
                await asyncio.wait_for(self._delivered(*in_flight.popleft()), 10)
        except Exception as exc:
            log.info("forwarder stopping: %d reads in flight resent at the next start (%s)",
                     len(in_flight) + 1, type(exc).__name__)  # fmt: skip
        if producer is not None:
            await _close(producer)
        if store is not None:
            store.close()

    def _store(self, store: CloudStore, records: Sequence[Record]) -> None:
        from cloud_sync.store import CloudMessage

        site = self.settings.site
        store.write([
            CloudMessage(r.message_id(site), site, r.key.so, r.key.stream, r.enqueued,
                         orjson.loads(r.body))
            for r in records
        ])  # fmt: skip
        self.counts.records += len(records)
        self.counts.bytes += sum(len(r.body) for r in records)
        self.counts.batches += 1

    async def _send(
        self, producer: AIOKafkaProducer, records: Sequence[Record]
    ) -> tuple[asyncio.Future[Any], int]:
        """The records in Kafka's own batches, one per partition (the object id decides it,
        as the default partitioner would for each record; its murmur2 in Python is computed
        once per object, not once per record): a record costs its encoding, one hash for its
        message id and an append, not a send of its own."""
        from aiokafka.partitioner import murmur2

        assert self.settings.kafka is not None
        topic = self.settings.kafka.topic
        site, codec = self.settings.site, self.settings.codec
        kafka = self.settings.kafka
        partitions = sorted(await producer.partitions_for(topic))
        if len(partitions) != self._partition_count or len(self._of_so) > 100_000:
            self._of_so, self._partition_count = {}, len(partitions)  # (or bounded anew)
        of_so = self._of_so  # object -> (key, partition), kept between reads: one hash each
        fixed = [("content-type", self._content_type), ("site", site.encode())]
        lean = self.settings.kafka.headers == "lean"
        batches: dict[int, Any] = {}
        futures = []
        size = 0
        for r, (message_id, value) in zip(records, encode_records(records, site, codec),
                                          strict=True):  # fmt: skip
            so = r.key.so
            known = of_so.get(so)
            if known is None:
                key = so.encode()
                known = of_so[so] = (key, partitions[(murmur2(key) & 0x7FFFFFFF)
                                                     % len(partitions)])  # fmt: skip
            key, partition = known
            if len(value) > kafka.max_record_bytes:
                futures.append(await self._too_large(producer, r, message_id, key, len(value)))
                continue
            size += len(value)
            headers = fixed if lean else [*fixed, ("so", key), ("stream", r.key.stream.encode()),
                                          ("message-id", message_id.encode())]  # fmt: skip
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = producer.create_batch()  # the full one is sent
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise ValueError(f"a record of {len(value)} bytes is larger than a batch"
                                     f" ({self.settings.kafka.max_batch_size} bytes)")  # fmt: skip
        for partition, batch in batches.items():
            if batch.record_count():
                futures.append(await producer.send_batch(batch, topic, partition=partition))
        return asyncio.gather(*futures), size

    async def _too_large(
        self, producer: AIOKafkaProducer, r: Record, message_id: str, key: bytes, size: int
    ) -> asyncio.Future[Any]:
        """A record Kafka would refuse: its identity and an excerpt to the dead-letter topic
        (acknowledged in the outbox with the rest of its read once that is in Kafka)."""
        assert self.settings.kafka is not None
        self.counts.dead_letters += 1
        limit = self.settings.kafka.max_record_bytes
        log.error("outbox record %s of %d bytes is over max_record_bytes (%d): dead-lettered",
                  message_id, size, limit)  # fmt: skip
        letter = orjson.dumps({
            "reason": "too_large", "messageId": message_id, "site": self.settings.site,
            "so": r.key.so, "stream": r.key.stream, "enqueued": r.enqueued, "size": size,
            "excerpt": r.body[:1000].decode("utf-8", "replace"),
        })  # fmt: skip
        headers = [("reason", b"too_large"), ("site", self.settings.site.encode())]
        future: asyncio.Future[Any] = await producer.send(
            self.settings.kafka.dead_letter_topic, letter, key=key, headers=headers
        )
        return future

    async def _delivered(
        self, records: Sequence[Record], delivered: asyncio.Future[Any], size: int
    ) -> None:
        """Once every record of a read is acknowledged by all in-sync replicas: acknowledged
        in the outbox, and counted."""
        await delivered
        if self.outbox.acks_due():  # fsyncs to come: on a thread, the loop keeps going
            await asyncio.to_thread(self.outbox.ack, records)
        else:  # a position moved in memory: a hop to a thread and back cost more (at 1,000
            # updates/s, an acknowledgement per update: 6% of the unit's CPU, five runs each)
            self.outbox.ack(records)
        self.counts.records += len(records)
        self.counts.bytes += size
        self.counts.batches += 1
        self.connected.set()


async def _close(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), 10)
    except Exception as exc:  # closing a producer whose broker is gone may fail in many ways
        log.debug("closing the producer: %s", exc)
