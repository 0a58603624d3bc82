"""A unit whose input is Kafka instead of MQTT: the cloud tier, beyond one site.

It reads the cloudlets' forwarded records (`cloudlet.updates`, keyed by object id) in a
consumer group and runs the same engine as a site's unit, one engine per partition it owns:

- **State per partition, checkpointed with its offset.** Every `checkpoint_every` (and when
  a partition is taken away in a rebalance) a partition's engine state is written with the
  offset of the next record to a compacted topic (`<group>.checkpoints`, keyed by partition).
  A partition assigned to an instance (at start, or in a rebalance after another died) is
  restored from its last checkpoint and read from that offset, before anything else: what an
  instance computed after its last checkpoint is computed again, from the same state and the
  same records, so the same derived updates come out (Kafka Streams' and quix-streams' recipe).
- **Outputs exactly once in the store.** A derived update's message id is made from its
  content (object, stream, time, values): computed again, it is the same update, and the cloud
  store (`cloud_sync.store`, by message id) keeps it once. Outputs are acknowledged by Kafka
  before the checkpoint that follows them is written.
- **What one flow joins stays together.** The forwarders key records by object; a flow keyed
  otherwise (a city-wide average), or a composite stream reading a group, needs objects that
  may lie in different partitions. Such units repartition first: each record goes to
  `<group>.by-key`, keyed by its object's group (`streams.colocation`), in a Kafka transaction
  with the consumed offsets (exactly once), and the engines read that topic
  (`read_committed`).

Rules are not run here: they command devices through a site's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import orjson

from processors.chain import build_chain
from processors.config import ConfigError, KafkaSource, UnitConfig
from processors.engine import engine_of
from processors.engine.flows import FlowEngine
from processors.ingest import Ingest, RawMessage
from processors.pipeline import Pipeline
from streams import Problem, SensorUpdate, StreamKey, encode_update
from streams.catalog import Catalog
from streams.colocation import colocated

log = logging.getLogger(__name__)
FENCED_RECHECK = 1.0  # s: a fenced partition still assigned here is taken again after this
T = TypeVar("T")


@dataclass
class Partition:
    """One partition's engine and where it is in its topic."""

    pipeline: Pipeline
    engine: FlowEngine
    producer: Any  # transactional: outputs and checkpoints of this partition, fenced
    offset: int = 0  # the next record to process
    checkpointed: float = 0.0  # monotonic time of the last checkpoint
    dirty: bool = False  # processed records since the last checkpoint
    # routed records: the highest input offset applied, per input partition (`_fresh`)
    sources: dict[int, int] = field(default_factory=dict)


@dataclass
class KafkaCounts:
    consumed: int = 0
    routed: int = 0
    derived: int = 0
    unreadable: int = 0
    rejected: int = 0  # updates the objects' descriptors refuse (as a site's unit would)
    checkpoints: int = 0
    restored: int = 0
    routed_again: int = 0  # routed records seen before (a router re-read its input), skipped
    assigned: list[int] = field(default_factory=list)


def derived_id(key: StreamKey, body: bytes) -> str:
    """A derived update's message id: its content's (computed again, the same id)."""
    digest = hashlib.sha256(b"\0".join((key.so.encode(), key.stream.encode(), body)))
    return f"derived-{digest.hexdigest()[:32]}"


class KafkaUnit:
    """A unit reading Kafka (see the module); `start`, `stop`, `alive` as a `Unit`'s."""

    def __init__(self, config: UnitConfig, *, clock: Callable[[], float] = time.time) -> None:
        if config.input is None:
            raise ConfigError([Problem(config.source, "no input.kafka", field="input")])
        self.config = config
        self.settings: KafkaSource = config.input.kafka
        self.group = self.settings.group or config.name
        self.clock = clock
        self.catalog = Catalog.load(config.objects)
        if self.catalog.rules:
            raise ConfigError([Problem(
                config.source, "rules command devices through a site's broker: run them in a"
                " site's unit, not one reading Kafka", field="input.kafka")])  # fmt: skip
        self.groups = colocated(self.catalog)
        joins = any(group != so for so, group in self.groups.items())
        self.repartition = joins if self.settings.repartition is None else self.settings.repartition
        self.by_key = f"{self.group}.by-key"
        self.checkpoints = f"{self.group}.checkpoints"
        self.counts = KafkaCounts()
        self.parts: dict[int, Partition] = {}
        self._taking: set[int] = set()  # partitions being taken (`_take_assigned`)
        self.ready = threading.Event()  # partitions assigned and restored
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="cloudlet-kafka-unit",
                                        daemon=True)  # fmt: skip
        self.status = self._status() if config.http is not None else None

    # lifecycle -----------------------------------------------------------------------------

    def _status(self) -> Any:
        """/metrics (its counts), /healthz (its input alive), /readyz (partitions restored)."""
        from processors.metrics import StatusServer, UnitMetrics

        http = self.config.http
        assert http is not None
        metrics = UnitMetrics(self.config.name)
        metrics.registry.register(_KafkaCollector(self))
        return StatusServer(
            metrics, http.host, http.port, healthy=lambda: self.alive,
            ready=self.ready.is_set,
            token=http.token.secret().encode() if http.token else None,
        )  # fmt: skip

    def start(self) -> KafkaUnit:
        if self.status is not None:
            self.status.start()
        self._thread.start()
        log.info("unit %s: Kafka %s, topic %s (group %s%s), %d objects, %d flows",
                 self.config.name, self.settings.bootstrap_servers, self.settings.topic,
                 self.group, ", repartitioned by group" if self.repartition else "",
                 len(self.catalog.registry), len(self.catalog.flows))  # fmt: skip
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Checkpoint every partition it owns, leave the group: within `stop_timeout` (and a
        margin), whatever the brokers do. Past it, what was not checkpointed is computed again
        by the partitions' next owners, to the same outputs (their ids are their content's)."""
        self._stop.set()
        budget = self.settings.stop_timeout / 1000
        self._thread.join(budget + 2.0 if timeout is None else timeout)
        if self._thread.is_alive():
            log.warning("unit %s: not stopped cleanly within %.0f s (a Kafka broker away?);"
                        " its partitions resume from their previous checkpoints",
                        self.config.name, budget)  # fmt: skip
        if self.status is not None:
            self.status.stop()

    @property
    def alive(self) -> bool:
        return self._stop.is_set() or self._thread.is_alive() or not self._thread.ident

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # said; `alive` turns false and the process exits 1
            self._error = exc
            log.exception("the Kafka input stopped")

    async def _run(self) -> None:
        asyncio.get_running_loop().set_exception_handler(_fenced_quietly)
        await self._create_topics()
        tasks = [self._process()]
        if self.repartition:
            tasks.append(self._route())
        await asyncio.gather(*tasks)

    async def _create_topics(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import KafkaError

        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap_servers)
        try:
            await admin.start()
            have = set(await admin.list_topics())
            brokers = len((await admin.describe_cluster()).get("brokers") or []) or 1
            replicas = min(3, brokers)  # as a production cluster's topics are
            wanted = []
            if self.checkpoints not in have:
                wanted.append(NewTopic(self.checkpoints, 1, replicas, topic_configs={
                    "cleanup.policy": "compact"}))  # fmt: skip
            if self.repartition and self.by_key not in have:
                described = await admin.describe_topics([self.settings.topic])
                count = len(described[0].get("partitions") or []) if described else 0
                wanted.append(NewTopic(self.by_key, max(1, count), replicas))
            if wanted:
                await admin.create_topics(wanted)
        except KafkaError as exc:  # made by their first use instead, with the broker's defaults
            log.warning("topics of unit %s not created (%s)", self.config.name, exc)
        finally:
            await admin.close()

    # the engines ---------------------------------------------------------------------------

    def _partition(self, producer: Any) -> Partition:
        config = self.config
        chain, registry, problems = build_chain(self.catalog.registry, config.processors,
                                                config.source)  # fmt: skip
        if problems:
            raise ConfigError(problems)
        ingest = Ingest(registry, config.topics, max_payload=config.max_payload,
                        max_future_ms=config.max_future, clock=self.clock)  # fmt: skip
        engine = engine_of(self.catalog, clock=self.clock, chain=chain)
        return Partition(Pipeline(ingest, engine, self.clock), engine, producer)

    def _message(self, value: bytes | None) -> RawMessage | None:
        """A forwarded record as a device message of its object's stream."""
        try:
            doc = orjson.loads(value or b"")
            so, stream, update = doc["so"], doc["stream"], doc["update"]
            if not isinstance(so, str) or not isinstance(stream, str):
                raise TypeError("so and stream are strings")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            self.counts.unreadable += 1
            log.error("a record that is not a cloudlet record, skipped: %s", exc)
            return None
        topic = self.config.topics.device_update(so, stream)
        return RawMessage(topic, orjson.dumps(update), "application/json",
                          int(self.clock() * 1000))  # fmt: skip

    async def _process(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.abc import ConsumerRebalanceListener

        topic = self.by_key if self.repartition else self.settings.topic
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers, group_id=self.group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", metadata_max_age_ms=5_000,
        )  # fmt: skip
        unit = self

        class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                rebalancing.set()  # the loop takes nothing until the new assignment
                for tp in revoked:
                    part = unit.parts.pop(tp.partition, None)
                    if part is not None:
                        await unit._release(tp, part)
                unit.counts.assigned = sorted(unit.parts)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                try:
                    await unit._take_assigned(consumer, assigned)
                finally:
                    rebalancing.clear()
                unit.ready.set()

        # Between a revocation and the next assignment, the consumer's assignment is still the
        # old one (and `getmany` may return, empty): the loop must not take those partitions.
        rebalancing = asyncio.Event()
        consumer.subscribe([topic], listener=Rebalance())
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
                taken: set[int] = set()
                if not rebalancing.is_set():  # any assigned not taken (a take that failed)
                    await self._drop_unassigned(consumer)
                    taken = await self._take_assigned(consumer, consumer.assignment())
                for tp, records in batches.items():
                    part = self.parts.get(tp.partition)
                    if part is None or tp.partition in taken:
                        # taken away meanwhile: its new owner reads them again; taken just now
                        # (after these were read): read again from its state's offset
                        continue
                    # what the partition's state already holds (fetched before a restore)
                    records = [r for r in records if r.offset >= part.offset]
                    if records:
                        await self._guarded(consumer, tp, part, self._handle(tp, part, records))
                every = self.settings.checkpoint_every / 1000
                for tp in list(consumer.assignment()):
                    part = self.parts.get(tp.partition)
                    if part and part.dirty and time.monotonic() - part.checkpointed >= every:
                        due = self._commit(part, tp.partition, [], checkpoint=True)
                        await self._guarded(consumer, tp, part, due)
            await self._bounded(self._last_checkpoints(), "the last checkpoints")
        finally:
            await self._bounded(consumer.stop(), "leaving the group")

    async def _guarded(self, consumer: Any, tp: Any, part: Partition, work: Any) -> None:
        """One partition's transaction (`_handle` or `_commit`), within `transaction_timeout`.
        Fenced: the partition is another instance's now. Stuck past it (a coordinator that
        died while its successor is not known to the client, which otherwise waits for it
        forever) or failed (a broker away past the client's retries; the producer closed by a
        rebalance's release beside the loop): the partition is taken again at the loop's next
        turn (`_take_assigned`), as a new owner would take it, its open transaction aborted by
        the fencing, from its last checkpoint. Only `part` is undone: a rebalance meanwhile
        may have released it and taken the partition again."""
        from aiokafka.errors import KafkaError

        budget = self.settings.transaction_timeout / 1000
        try:
            done = await _within(work, budget)
        except (TimeoutError, KafkaError) as exc:
            if self.parts.get(tp.partition) is not part:
                return  # released meanwhile (a rebalance): not this loop's to undo
            why = (f"a transaction did not finish in {budget:.0f} s (a Kafka broker away?)"
                   if isinstance(exc, TimeoutError)
                   else f"its transaction failed ({self._said(exc)})")  # fmt: skip
            log.warning("partition %d: %s; taken again from its last checkpoint",
                        tp.partition, why)  # fmt: skip
            del self.parts[tp.partition]
            await self._bounded(part.producer.stop(), "closing a stuck producer")
            return
        if done or self.parts.get(tp.partition) is not part:
            return
        # Fenced: another producer of the partition's transactional id started. Mostly the
        # partition's new owner; but an instance cut off from the group for a moment (a broker
        # killed) may take again a partition it held, fencing the owner the group gave it to:
        # left as it is, nobody would read that partition until the next rebalance. So once
        # a rebalance on its way had time to arrive, a partition still assigned here is taken
        # again (`_take_assigned`, at the loop's next turn), as a new owner takes it, from its
        # last checkpoint (fencing the other, whose own assignment then says it is not its own).
        del self.parts[tp.partition]
        await self._bounded(part.producer.stop(), "closing a fenced producer")
        await asyncio.sleep(FENCED_RECHECK)
        if tp in consumer.assignment() and tp.partition not in self.parts:
            log.warning("partition %d: fenced while still assigned here; taken again from its"
                        " last checkpoint", tp.partition)  # fmt: skip

    async def _last_checkpoints(self) -> None:
        """Stopping: every partition checkpointed, so that nothing is computed again."""
        for number, part in list(self.parts.items()):
            await self._commit(part, number, [], checkpoint=part.dirty)
            await part.producer.stop()

    async def _bounded(self, step: Any, what: str) -> None:
        """A step that must not hang whatever the brokers do (stopping, closing a stuck
        producer): within half of `stop_timeout`, said if it did not finish or failed."""
        try:
            await _within(step, self.settings.stop_timeout / 2000)
        except TimeoutError:
            log.warning("unit %s: %s did not finish in time", self.config.name, what)
        except Exception as exc:  # a broker away: said, and the next step runs
            log.warning("unit %s: %s failed: %s", self.config.name, what, exc)

    async def _take_assigned(self, consumer: Any, assigned: Any) -> set[int]:
        """Every partition of `assigned` still assigned and not taken yet, taken (`_own`).
        Called by the group's callback at an assignment and by the loop at each turn (which
        runs beside the callback: `_taking` keeps them off each other's partitions), so a
        take that failed (a broker away, a stuck transaction or a fencing given up) is
        tried again, not left unread until the next rebalance. Each within
        `transaction_timeout` (aiokafka retries a coordinator it cannot reach forever).
        Returns the partitions taken."""
        from aiokafka.errors import KafkaError

        todo = [tp for tp in assigned if tp.partition not in self.parts
                and tp.partition not in self._taking]  # fmt: skip
        self._taking.update(tp.partition for tp in todo)
        try:
            for tp in todo:
                if tp not in consumer.assignment():
                    continue  # given away meanwhile
                try:
                    await _within(self._own(consumer, tp), self.settings.transaction_timeout / 1000)
                    if tp not in consumer.assignment():  # revoked while taken: not ours
                        part = self.parts.pop(tp.partition)
                        await self._bounded(part.producer.stop(), "closing a partition's producer")
                except (TimeoutError, KafkaError) as exc:
                    log.warning("partition %d not taken (%s); again in a moment",
                                tp.partition, self._said(exc))  # fmt: skip
                    await asyncio.sleep(1.0)
        finally:
            self._taking.difference_update(tp.partition for tp in todo)
            self.counts.assigned = sorted(self.parts)
        return {tp.partition for tp in todo if tp.partition in self.parts}

    async def _drop_unassigned(self, consumer: Any) -> None:
        """A partition the loop finished taking while a rebalance revoked it (the consumer
        still reported the old assignment): not this instance's, its producer closed (its
        new owner's fences it anyway; nothing was processed, so nothing to checkpoint)."""
        mine = {tp.partition for tp in consumer.assignment()}
        for number in [n for n in self.parts if n not in mine and n not in self._taking]:
            part = self.parts.pop(number)
            await self._bounded(part.producer.stop(), "closing a partition's producer")
            self.counts.assigned = sorted(self.parts)

    def _said(self, exc: BaseException) -> str:
        """What a Kafka step that failed met, for the log."""
        if isinstance(exc, TimeoutError):
            return f"no answer from Kafka in {self.settings.transaction_timeout / 1000:g} s"
        text, name = str(exc), type(exc).__name__
        return text if text.startswith(name) else f"{name}: {text}" if text else name

    async def _own(self, consumer: Any, tp: Any) -> None:
        """A partition taken (`_take`) and read from the offset its state is at."""
        part = await self._take(tp)
        try:
            if part.offset:
                consumer.seek(tp, part.offset)
            else:
                await consumer.seek_to_beginning(tp)
        except BaseException:  # given up (a bound's cancellation too)
            await self._abandon(part.producer)
            raise
        self.parts[tp.partition] = part

    async def _take(self, tp: Any) -> Partition:
        """A partition given to this instance: its transactional producer first (which fences
        the instance that had it, if it still runs, and aborts what it had not committed),
        then its last committed checkpoint."""

        producer = self._transactional(f"{self.group}.{tp.topic}.{tp.partition}")
        try:
            await producer.start()
            found = (await self._saved()).get(tp.partition)
        except BaseException:  # given up (a bound's cancellation too)
            await self._abandon(producer)
            raise
        part = self._partition(producer)
        if found is not None:
            part.engine.restore(found["state"])
            part.offset = int(found["offset"])
            part.sources = {int(k): int(v) for k, v in (found.get("sources") or {}).items()}
            self.counts.restored += 1
            log.info("partition %d restored at offset %d (checkpointed by %s)", tp.partition,
                     part.offset, found.get("by"))  # fmt: skip
        else:
            log.info("partition %d: no checkpoint, from its beginning", tp.partition)
        part.checkpointed = time.monotonic()
        return part

    async def _resync(
        self, consumer: Any, producers: dict[int, Any], tp: Any, records: list[Any]
    ) -> None:
        """The router of `tp` made anew, then read from the offset its committed transactions
        reached. Making it fences any other producer of the partition's transactional id and
        has Kafka finish or abort that one's open transaction first, so what this instance or
        another routed meanwhile is read past, not routed twice (seeking back to the records
        in hand would route again those another instance committed). Within
        `transaction_timeout` (aiokafka retries a coordinator it cannot reach forever): a
        broker away, nothing of the partition is routed until this succeeds, tried again at
        its next fetch, which reads `records` (those in hand) again."""
        from aiokafka.errors import KafkaError

        async def steps() -> None:
            producers[tp.partition] = await self._router_producer(tp)
            committed = await consumer.committed(tp)
            if committed is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)

        await self._bounded(_drop(producers, tp.partition), "closing a router")
        try:
            await _within(steps(), self.settings.transaction_timeout / 1000)
        except (TimeoutError, KafkaError) as exc:
            await self._bounded(_drop(producers, tp.partition), "closing a router not made")
            if tp not in consumer.assignment():
                log.info("routing of partition %d is another instance's now", tp.partition)
                return
            log.warning("routing partition %d: %s; its router is made again at the next"
                        " fetch", tp.partition, self._said(exc))  # fmt: skip
            with contextlib.suppress(KafkaError):  # not left behind: no more may come
                consumer.seek(tp, records[0].offset)
            await asyncio.sleep(1.0)

    async def _router_producer(self, tp: Any) -> Any:
        """The transactional producer routing one input partition (started: a router that
        had the partition and still runs is fenced, what it had not committed aborted)."""
        producer = self._transactional(f"{self.group}.router.{tp.topic}.{tp.partition}")
        try:
            await producer.start()
        except BaseException:  # given up (a bound's cancellation too)
            await self._abandon(producer)
            raise
        return producer

    async def _abandon(self, producer: Any) -> None:
        """A producer whose start, or the take it was made for, was given up: closed within
        half of `stop_timeout`, whatever closing it raises (the caller raises its own)."""
        with contextlib.suppress(Exception):
            await _within(producer.stop(), self.settings.stop_timeout / 2000)

    def _transactional(self, transactional_id: str) -> Any:
        from aiokafka import AIOKafkaProducer

        return AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers, transactional_id=transactional_id,
            transaction_timeout_ms=self.settings.transaction_timeout, linger_ms=5,
        )  # fmt: skip

    async def _release(self, tp: Any, part: Partition) -> None:
        """A partition taken away: its state checkpointed (if it still may, within
        `transaction_timeout`: the group's rebalance waits for this), its producer closed."""
        with contextlib.suppress(Exception):
            due = self._commit(part, tp.partition, [], checkpoint=part.dirty)
            await _within(due, self.settings.transaction_timeout / 1000)
        await self._bounded(part.producer.stop(), "closing a released partition's producer")

    async def _handle(self, tp: Any, part: Partition, records: list[Any]) -> bool:
        """A batch of one partition through its engine, its outputs (and a checkpoint when
        due) in one transaction; False when this instance no longer has the partition."""
        part.offset = records[-1].offset + 1
        if self.repartition:  # reading <group>.by-key, which only our routers write
            records = self._fresh(part, records)
        messages = [m for m in map(self._message, (r.value for r in records)) if m is not None]
        self.counts.consumed += len(records)
        part.dirty = True
        derived: list[tuple[StreamKey, SensorUpdate]] = []
        if messages:
            _, outputs = part.pipeline.process(messages)
            if outputs.dead_letters:
                self.counts.rejected += sum(d.count for d in outputs.dead_letters)
                log.warning("%d forwarded updates refused, the first: %s", self.counts.rejected,
                            outputs.dead_letters[0].rejection.message)  # fmt: skip
            derived = outputs.derived
        due = time.monotonic() - part.checkpointed >= self.settings.checkpoint_every / 1000
        return await self._commit(part, tp.partition, derived, checkpoint=due)

    def _fresh(self, part: Partition, records: list[Any]) -> list[Any]:
        """The records not applied before: a routed record carries its input partition and
        offset (header `src`), and a router routes each input partition in order, so one
        seen at or below the highest offset applied from its input partition is a copy (a
        router that read its input again from a committed offset older than what it or
        another had routed: Kafka gives a consumer its group's committed offset before a
        transaction that committed more is applied to it). Checkpointed with the state, so
        records read again after a restore are applied again, consistently."""
        sources = part.sources
        fresh = []
        for r in records:
            src = next((v for k, v in r.headers or () if k == "src"), None)
            if src is not None:
                try:
                    number, offset = (int(x) for x in src.split(b":"))
                except ValueError:
                    fresh.append(r)
                    continue
                if offset <= sources.get(number, -1):
                    self.counts.routed_again += 1
                    continue
                sources[number] = offset
            fresh.append(r)
        return fresh

    async def _commit(self, part: Partition, number: int,
                      derived: list[tuple[StreamKey, SensorUpdate]], *,
                      checkpoint: bool) -> bool:  # fmt: skip
        """Outputs and (with `checkpoint`) the state and its offset, in one transaction of
        the partition's producer: all or nothing. False when fenced (another instance has
        the partition now)."""
        from aiokafka.errors import ProducerFenced

        if not derived and not checkpoint:
            return True
        try:
            async with part.producer.transaction():
                if derived and self.settings.outputs is not None:
                    await self._emit(part.producer, derived)
                if checkpoint:
                    state = msgpack.packb({"offset": part.offset, "by": self.config.name,
                                           "state": part.engine.snapshot(),
                                           "sources": {str(k): v for k, v in part.sources.items()}},
                                          use_bin_type=True)  # fmt: skip
                    await part.producer.send(self.checkpoints, state, key=str(number).encode())
        except ProducerFenced:
            log.warning("partition %d was given to another instance: left to it", number)
            return False
        if checkpoint:
            part.checkpointed, part.dirty = time.monotonic(), False
            self.counts.checkpoints += 1
        return True

    async def _emit(self, producer: Any, derived: list[tuple[StreamKey, SensorUpdate]]) -> None:
        """Derived updates to `outputs`, as the forwarders write records (their ids made from
        their content)."""
        assert self.settings.outputs is not None
        now = int(self.clock() * 1000)
        site = f"cloud:{self.group}"
        for key, update in derived:
            body = encode_update(update)
            value = orjson.dumps({"messageId": derived_id(key, body), "site": site,
                                  "so": key.so, "stream": key.stream, "enqueued": now,
                                  "update": orjson.Fragment(body)})  # fmt: skip
            await producer.send(self.settings.outputs, value, key=key.so.encode())
        self.counts.derived += len(derived)

    async def _saved(self) -> dict[int, dict[str, Any]]:
        """The last checkpoint of every partition (the compacted topic, read to its end)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        reader = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap_servers,
                                  enable_auto_commit=False,
                                  isolation_level="read_committed")  # fmt: skip
        await reader.start()
        try:
            tps = [TopicPartition(self.checkpoints, 0)]  # made with one partition
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            saved: dict[int, dict[str, Any]] = {}
            deadline = time.monotonic() + 60  # transactions still open: committed by then
            while [tp for tp in tps if await reader.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.checkpoints} could not be read to its end")
                for records in (await reader.getmany(timeout_ms=500)).values():
                    for r in records:
                        try:
                            saved[int(r.key)] = msgpack.unpackb(r.value, raw=False,
                                                                strict_map_key=False)  # fmt: skip
                        except (ValueError, TypeError, msgpack.UnpackException) as exc:
                            log.error("checkpoint %s unreadable, skipped: %s", r.key, exc)
            return saved
        finally:
            await reader.stop()

    # repartitioning ------------------------------------------------------------------------

    async def _route(self) -> None:
        """Records to `<group>.by-key`, keyed by their object's group, in transactions with
        the offsets they were read at: each record there exactly once. Each input partition
        has its own transactional producer (`<group>.router.<topic>.<partition>`): the
        instance given a partition fences a router that had it and still runs (cut off from
        the group), and aborts what that one had not committed.

        Only this loop makes and closes the routers, at its own pace: a partition's the first
        time its records come after it was given here (`_resync`), a partition given away's
        when the loop next sees the assignment. The group's callbacks run beside the loop,
        so routers made there raced the loop's own for the same partition (each fencing the
        other, one of them dropped unclosed) and a start that hung held the group's rebalance
        with nothing said."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.errors import KafkaError, ProducerFenced

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=f"{self.group}.router", enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed",
            metadata_max_age_ms=5_000,
        )  # fmt: skip
        producers: dict[int, Any] = {}
        consumer.subscribe([self.settings.topic])
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
                assigned = consumer.assignment()
                mine = {tp.partition for tp in assigned}
                for partition in [p for p in producers if p not in mine]:
                    await self._bounded(_drop(producers, partition), "closing a router given away")
                for tp, records in batches.items():
                    if tp not in assigned:
                        continue  # given away meanwhile: its new owner reads them again
                    producer = producers.get(tp.partition)
                    if producer is None:  # given here since, or given up: made first, then
                        await self._resync(consumer, producers, tp, records)  # what is committed
                        continue
                    try:
                        routed = _send_routed(self, producer, tp, records)
                        await _within(routed, self.settings.transaction_timeout / 1000)
                    except (TimeoutError, KafkaError) as exc:
                        # The transaction's outcome is unknown (stuck on a coordinator that
                        # died, a broker away), or another instance's producer for this
                        # partition started and may have routed some of these meanwhile.
                        await self._bounded(_drop(producers, tp.partition), "a stuck router")
                        if tp not in consumer.assignment():
                            log.info("routing of partition %d is another instance's now",
                                     tp.partition)  # fmt: skip
                            continue
                        why = (
                            "fenced while still assigned here"
                            if isinstance(exc, ProducerFenced)
                            else self._said(exc)
                        )
                        log.warning("routing partition %d: %s; again from what is committed",
                                    tp.partition, why)  # fmt: skip
                        if not isinstance(exc, ProducerFenced):
                            await asyncio.sleep(1.0)
                        await self._resync(consumer, producers, tp, records)
                        continue
                    self.counts.routed += len(records)
        finally:
            await self._bounded(consumer.stop(), "leaving the router's group")
            await self._bounded(_stop_all(producers), "closing the routers' producers")


async def _within(
    work: Coroutine[Any, Any, T], budget: float, *, tries: int = 10, every: float = 1.0
) -> T:
    """`work` within `budget` seconds, else cancelled until it ends and TimeoutError. Not
    `asyncio.timeout` or `wait_for`: they cancel once, and aiokafka answers a cancellation
    inside a transaction by aborting it and waiting for the abort without a bound (a
    coordinator gone and no successor known), so the one cancellation is absorbed and the
    step hangs for ever (the cluster test: a partition silent for minutes after a broker was
    killed, its unit unable to stop). Each further cancellation (`tries`, `every` seconds
    apart) ends such a wait."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=budget)
        if done:
            return task.result()
        for _ in range(tries):
            task.cancel()
            if (await asyncio.wait({task}, timeout=every))[0]:
                break
        else:  # refuses to end: left to end on its own, said
            log.warning("a Kafka step given up after %.0f s does not end when cancelled", budget)
            _abandoned.add(task)
            task.add_done_callback(_forget)
            raise TimeoutError
    except BaseException:  # this one cancelled (stopping): the work too, not left behind
        task.cancel()
        raise
    if not task.cancelled() and task.exception() is not None:
        log.debug("a step given up ended with %r", task.exception())
    raise TimeoutError


_abandoned: set[asyncio.Future[Any]] = set()  # referenced until they end (asyncio keeps none)


def _forget(task: asyncio.Future[Any]) -> None:
    _abandoned.discard(task)
    if not task.cancelled() and task.exception() is not None:  # retrieved: not logged as lost
        log.debug("a step left to end on its own ended with %r", task.exception())


def _fenced_quietly(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """aiokafka leaves a fenced transaction's second future unread, and asyncio logs it as an
    error with a traceback when it is collected; the fence itself is handled and said (once,
    as a warning) where it is met. Anything else goes to asyncio's own handler."""
    from aiokafka.errors import ProducerFenced

    if isinstance(context.get("exception"), ProducerFenced) and "future" in context:
        log.debug("a fenced transaction's unread future: %s", context["exception"])
        return
    loop.default_exception_handler(context)


async def _stop_all(producers: dict[int, Any]) -> None:
    for partition in list(producers):
        await _drop(producers, partition)


async def _drop(producers: dict[int, Any], partition: int) -> None:
    producer = producers.pop(partition, None)
    if producer is not None:
        with contextlib.suppress(Exception):
            await producer.stop()


async def _send_routed(unit: KafkaUnit, producer: Any, tp: Any, records: list[Any]) -> None:
    """One input partition's records to `<group>.by-key` with their offsets, one transaction."""
    from aiokafka import TopicPartition

    async with producer.transaction():
        for r in records:
            so = _object_of(r.value)
            key = unit.groups.get(so, so) if so is not None else "unreadable"
            await producer.send(
                unit.by_key,
                r.value,
                key=key.encode(),
                headers=[("src", b"%d:%d" % (tp.partition, r.offset))],
            )
        offsets = {TopicPartition(tp.topic, tp.partition): records[-1].offset + 1}
        await producer.send_offsets_to_transaction(offsets, f"{unit.group}.router")


def _object_of(value: bytes | None) -> str | None:
    try:
        so = orjson.loads(value or b"").get("so")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return so if isinstance(so, str) else None


class _KafkaCollector:
    """A Kafka-reading unit's counts, as Prometheus metrics."""

    def __init__(self, unit: KafkaUnit) -> None:
        self.unit = unit

    def collect(self) -> Any:
        from processors.promtext import CounterMetricFamily, GaugeMetricFamily

        c, name = self.unit.counts, self.unit.config.name
        for metric, value, doc in (
            ("cloudlet_kafka_records", c.consumed, "Forwarded records processed"),
            ("cloudlet_kafka_routed", c.routed, "Records repartitioned by group"),
            ("cloudlet_kafka_derived", c.derived, "Derived updates written"),
            ("cloudlet_kafka_unreadable", c.unreadable, "Records that are not cloudlet records"),
            ("cloudlet_kafka_rejected", c.rejected, "Updates the descriptors refuse"),
            ("cloudlet_kafka_checkpoints", c.checkpoints, "Partition checkpoints written"),
            ("cloudlet_kafka_restored", c.restored, "Partitions restored from a checkpoint"),
            (
                "cloudlet_kafka_routed_again",
                c.routed_again,
                "Routed records seen before (a router read its input again), skipped",
            ),
        ):
            family = CounterMetricFamily(metric, doc, labels=["unit"])
            family.add_metric([name], value)
            yield family
        owned = GaugeMetricFamily("cloudlet_partitions_owned", "Partitions this instance runs",
                                  labels=["unit"])  # fmt: skip
        owned.add_metric([name], len(self.unit.parts))
        yield owned
