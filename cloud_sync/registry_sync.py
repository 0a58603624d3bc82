"""The fleet's registry from the cloud to the cloudlets, over Kafka.

The cloud (`RegistryPublisher`) sends every change of its registry (`cloud_sync.registry`) to
the topic `cloudlet.registry`, compacted and keyed by object id: the last record of each object
is its current descriptor, or that it was removed. A change is marked sent only once Kafka has
it, so one made while Kafka is down goes when it returns, in order.

A cloudlet (`RegistryFollower`, started with its forwarder when `forward.registry` names a
folder) reads that topic from the start, in a consumer group of its own, and keeps a local copy
(`cloud_sync.local_registry`): one file per object of its site (or of every site: an object
registered without one), written whole or removed. Its units read that folder among their
`objects` and take each change within seconds (hot reload), and the copy stays when the link is
down: a cloudlet starts and works offline with what it last had. A record it cannot read is
logged, counted and skipped.

Changes made at a site (`cloudlet so add --local FOLDER`, `LocalRegistry.change`) are in its
copy at once and go to the cloud on `cloudlet.registry.changes` when the link is up; the cloud
settles each by the rule in `cloud_sync.local_registry` (made on the cloud's current version:
taken; else the cloud's version stands and goes back to the site).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from cloud_sync.local_registry import SAFE_ID, LocalRegistry, device_secret, said

if TYPE_CHECKING:  # a cloudlet's follower loads nothing of the cloud's
    from cloud_sync.registry import FleetRegistry

log = logging.getLogger(__name__)
Identities = Callable[[str, "str | None"], None]  # (id, secret; None: remove) on the broker
TOPIC = "cloudlet.registry"
CHANGES = "cloudlet.registry.changes"  # changes made at the sites, to the cloud


def record(so: str, version: int, site: str | None, descriptor: dict[str, Any] | None,
           nonce: str | None = None) -> bytes:  # fmt: skip
    """A registry change as the topic carries it (descriptor None: removed; `nonce`: the
    object's MQTT secret at its site is derived from it, `local_registry.device_secret`)."""
    doc: dict[str, Any] = {"id": so, "version": version, "site": site}
    if descriptor is None:
        doc["deleted"] = True
    else:
        doc["descriptor"] = descriptor
        if nonce is not None:
            doc["mqtt"] = {"nonce": nonce}
    return orjson.dumps(doc)


def _retrying(what: str, exc: Exception, kafka_error: type[Exception]) -> None:
    """Why a registry loop starts again: Kafka away (a warning), or anything else, the cloud's
    store or the site's disk failing or a bug of ours (with its traceback): the loop is
    retried with a back-off, never left to end its thread (a PostgreSQL restart ended the
    cloud's publisher, and so the cloud service, before)."""
    if isinstance(exc, kafka_error):
        log.warning("%s for Kafka (%s)", what, exc)
    else:
        log.error("%s: %s: %s; retrying", what, type(exc).__name__, exc, exc_info=exc)


class Worker:
    """A thread running one asyncio task (`_run`) until stopped; alive until it dies on its
    own (a stopped one counts as alive: it ended because it was asked to)."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name=name,
                                        daemon=True)  # fmt: skip

    def start(self) -> Worker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    @property
    def alive(self) -> bool:
        return self._stop.is_set() or self._thread.is_alive() or not self._thread.ident

    async def _run(self) -> None:
        raise NotImplementedError


class RegistryPublisher(Worker):
    """The cloud's side: what the registry has not sent yet, to the topic, in order; and the
    changes made at the sites, settled."""

    def __init__(self, registry: FleetRegistry, bootstrap_servers: str, topic: str = TOPIC,
                 changes: str = CHANGES) -> None:  # fmt: skip
        super().__init__("cloudlet-registry-publisher")
        self.registry = registry
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.changes = changes
        self.sent = 0
        self.settled: dict[str, int] = {}  # the sites' changes: accepted, conflict, refused
        self.unreadable = 0
        self.wake = threading.Event()  # a change was made: send it now

    async def _run(self) -> None:
        await asyncio.gather(self._publish(), self._receive())

    async def _publish(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        await self._create_topic()
        delay = 0.5
        while not self._stop.is_set():
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all",
                                        enable_idempotence=True)  # fmt: skip
            try:
                await producer.start()
                while not self._stop.is_set():
                    for so, version, site, descriptor in self.registry.pending():
                        nonce = self.registry.nonce(so) if descriptor is not None else None
                        await producer.send_and_wait(self.topic, record(
                            so, version, site, descriptor, nonce), key=so.encode())  # fmt: skip
                        self.registry.mark_sent(so, version)
                        self.sent += 1
                    delay = 0.5
                    await asyncio.to_thread(self.wake.wait, 0.5)
                    self.wake.clear()
            except Exception as exc:  # what is not sent stays pending, and goes later
                _retrying("registry changes wait", exc, KafkaError)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                await producer.stop()

    async def _receive(self) -> None:
        """The changes made at the sites, settled in the registry (`FleetRegistry.from_site`)
        in the order each site made them; one that cannot be read is logged and skipped."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.errors import KafkaError

        delay = 0.5
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                self.changes, bootstrap_servers=self.bootstrap_servers,
                group_id="cloudlet-cloud-registry", auto_offset_reset="earliest",
                enable_auto_commit=False, metadata_max_age_ms=2000,
            )  # fmt: skip
            try:
                await consumer.start()
                while not self._stop.is_set():
                    batches = await consumer.getmany(timeout_ms=300, max_records=200)
                    for records in batches.values():
                        for r in records:
                            await asyncio.to_thread(self._settle, r.value)
                    if batches:
                        await consumer.commit()
                        self.wake.set()  # what was not taken goes back to the sites now
                    delay = 0.5
            except Exception as exc:  # not committed: read again from the last commit
                _retrying("changes from the sites wait", exc, KafkaError)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                await consumer.stop()

    def _settle(self, value: bytes | None) -> None:
        try:
            change = orjson.loads(value or b"")
            outcome = self.registry.from_site(change)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.unreadable += 1
            log.error("a site's registry change that cannot be read, skipped: %s", exc)
            return
        self.settled[outcome] = self.settled.get(outcome, 0) + 1
        if outcome != "accepted":
            log.warning("registry change to %s from site %s %s", change.get("id"),
                        change.get("site"), outcome)  # fmt: skip

    async def _create_topic(self) -> None:
        """The topic, compacted: the last record of each object is what a new site reads."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic
        from aiokafka.errors import KafkaError

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            await admin.start()
            topics = await admin.list_topics()
            if self.topic not in topics:
                await admin.create_topics([NewTopic(self.topic, 1, 1, topic_configs={
                    "cleanup.policy": "compact"})])  # fmt: skip
            if self.changes not in topics:  # one partition: the sites' changes in one order
                await admin.create_topics([NewTopic(self.changes, 1, 1)])
        except KafkaError as exc:  # made by the first send instead, with the broker's defaults
            log.warning("registry topic %s not created compacted (%s)", self.topic, exc)
        finally:
            await admin.close()


class RegistryFollower(Worker):
    """A cloudlet's side: its local copy of the registry (`LocalRegistry`), kept from the
    topic; and the changes made at the site, sent to the cloud (`CHANGES`) when the link is up,
    in the order they were made."""

    def __init__(self, folder: Path, site: str, bootstrap_servers: str, group: str,
                 topic: str = TOPIC, changes: str = CHANGES, site_key: bytes | None = None,
                 identities: Identities | None = None,
                 checked: Sequence[Path] = ()) -> None:  # fmt: skip
        """`site_key` and `identities`: the registered objects' device identities made on
        the site's broker (`identities(id, secret)`; secret None: removed), their secrets
        derived from the key and the records' nonces (`local_registry.device_secret`).
        `checked`: the unit's objects paths (see `apply_all`)."""
        super().__init__("cloudlet-registry-follower")
        self.checked = list(checked)  # the unit's objects (with this copy) and flows
        self.site_key = site_key
        self.identities = identities
        self.identity_failures = 0
        self._retry_at = 0.0  # the broker's administrator failed: not before then
        self.copy = LocalRegistry(folder)
        self.folder = folder
        self.site = site
        self.bootstrap_servers = bootstrap_servers
        self.group = group
        self.topic = topic
        self.changes = changes
        self.applied = 0
        self.refused = 0
        self.sent = 0
        self.ready = threading.Event()  # reading the topic (its partitions assigned)

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.errors import KafkaError

        delay = 0.5
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                self.topic, bootstrap_servers=self.bootstrap_servers, group_id=self.group,
                auto_offset_reset="earliest", enable_auto_commit=False,
            )  # fmt: skip
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all",
                                        enable_idempotence=True)  # fmt: skip
            try:
                await consumer.start()
                await producer.start()
                while not self._stop.is_set():
                    for change in self.copy.pending():  # made here: to the cloud, in order
                        await producer.send_and_wait(
                            self.changes, orjson.dumps({**change, "site": self.site}),
                            key=change["id"].encode())  # fmt: skip
                        self.copy.sent(change)
                        self.sent += 1
                    batches = await consumer.getmany(timeout_ms=300, max_records=500)
                    if consumer.assignment():
                        self.ready.set()
                    values = [r.value for records in batches.values() for r in records]
                    if values:
                        await asyncio.to_thread(self.apply_all, values)
                    if batches:
                        await consumer.commit()
                    await self._provision()
                    delay = 0.5
            except Exception as exc:  # the local copy stays as it is meanwhile
                _retrying("registry updates wait", exc, KafkaError)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                await consumer.stop()
                await producer.stop()

    def apply_all(self, values: list[bytes | None]) -> None:
        """Records into the local copy, in order. With `checked` (the unit's objects and
        flows), a record that would give them a problem is refused, logged and counted, and
        the copy keeps what it had: a change the site cannot run never reaches its units,
        nor stops one that restarts (checked once for the batch, then one by one if any
        breaks)."""
        docs = [doc for doc in map(self._read, values) if doc is not None]
        if not self.checked or not self._breaks(docs):
            for doc in docs:
                self._apply(doc)
            return
        for doc in docs:
            problems = self._breaks([doc])
            if problems:
                self.refused += 1
                log.error("registry change to %s not taken at this site: %s", doc["id"],
                          "; ".join(problems))  # fmt: skip
            else:
                self._apply(doc)

    def apply(self, value: bytes | None) -> None:
        """One record (`apply_all`)."""
        self.apply_all([value])

    def _read(self, value: bytes | None) -> dict[str, Any] | None:
        """A record, or None (logged and counted) when it cannot be read."""
        try:
            doc = orjson.loads(value or b"")
            so, version = doc["id"], int(doc.get("version", 0))
            if not isinstance(so, str) or not SAFE_ID.match(so):
                raise ValueError(f"id {so!r} is not one a file can be named after")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self.refused += 1
            log.error("a registry record that cannot be read, skipped: %s", exc)
            return None
        return {**doc, "version": version}

    def _mine(self, doc: dict[str, Any]) -> bool:
        return not doc.get("deleted") and doc.get("site") in (None, self.site)

    def _breaks(self, docs: list[dict[str, Any]]) -> list[str]:
        """The problems these records would add to the unit's objects and flows."""
        from streams.catalog import Catalog

        if not docs:
            return []
        before = {(p.object_id, p.field, p.message) for p in Catalog.check(self.checked)[1]}
        changed = {doc["id"] for doc in docs}
        with tempfile.TemporaryDirectory(prefix="cloudlet-copy-") as folder:
            for path in self.folder.glob("*.json"):
                if path.stem not in changed:
                    (Path(folder) / path.name).write_bytes(path.read_bytes())
            for doc in docs:  # the last record of each object is what it becomes
                target = Path(folder) / f"{doc['id']}.json"
                if self._mine(doc):
                    target.write_bytes(orjson.dumps(doc.get("descriptor")))
                else:
                    target.unlink(missing_ok=True)
            others = [p for p in self.checked if p.resolve() != self.folder.resolve()]
            after = Catalog.check([*others, folder])[1]
        return [said(p) for p in after if (p.object_id, p.field, p.message) not in before]

    def _apply(self, doc: dict[str, Any]) -> None:
        so, version, mine = doc["id"], doc["version"], self._mine(doc)
        if self.copy.from_cloud(so, version, doc.get("descriptor") if mine else None):
            mqtt = doc.get("mqtt")
            nonce = mqtt.get("nonce") if mine and isinstance(mqtt, dict) else None
            if not mine or isinstance(nonce, str):  # made, changed or removed; else left
                self.copy.want_identity(so, nonce)
        self.applied += 1

    async def _provision(self) -> None:
        """The device identities the copy wants, made on the site's broker; what fails (the
        broker away, say) is logged, counted and tried again 5 s later."""
        if self.identities is None or self.site_key is None or time.monotonic() < self._retry_at:
            return
        for so, nonce in self.copy.identity_wanted():
            secret = device_secret(self.site_key, so, nonce) if nonce is not None else None
            try:
                await asyncio.to_thread(self.identities, so, secret)
            except Exception as exc:  # the broker's answer, whatever it is: never the thread
                self.identity_failures += 1
                self._retry_at = time.monotonic() + 5.0
                log.warning("the identity of %s waits for the broker's administrator: %s", so,
                            exc)  # fmt: skip
                return
            self.copy.identity_made(so, nonce)
            log.info("identity of %s %s on the site's broker", so,
                     "removed" if nonce is None else "made")  # fmt: skip
