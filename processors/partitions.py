"""Keyed scale-out at a site: a unit's objects split into partitions, shared out between its
live replicas, each partition moved with its state when replicas come and go.

- **Partitions.** An object belongs to the partition of its group (`streams.colocation`:
  what one flow, composite stream or group joins stays together), CRC-32 of the group's name
  modulo `partitions.count`. A partition is an MQTT session of its own (client id
  `<unit>-p<NN>`), subscribed to its objects' topics, with its own flow engine and state, and
  its snapshot kept on the broker (`processors.state.BrokerState`).
- **Membership.** Each replica announces itself with a retained message on
  `<root>cloudlet/units/<unit>/members/<instance>`, cleared by its will if it dies and by
  itself when it stops. Every replica sees the same live members and shares the partitions
  out the same way: sorted members, partition `p` to member `p mod n`.
- **Handover.** A replica that loses a partition finishes what it received, checkpoints,
  acknowledges, clears the partition's retained owner and disconnects; the broker keeps the
  session and queues the partition's messages. The replica gaining it waits for that (at most
  `handover_timeout`), then connects with the partition's client id: the session resumes
  with what was queued, and the snapshot restored is the last one. A previous owner that did
  not let go (hung, or cut off) is fenced: the broker closes its connection when the new one
  takes the client id, and it stops. Nothing acknowledged is lost, nothing is counted twice
  (`processors.runtime`'s redelivery rules, as after a restart).

Why our own membership and not an MQTT shared subscription: a shared subscription splits by
message, so each replica would see part of every device's readings; and MQTT has no consumer
groups. The broker is what every replica already trusts, so it is also the coordinator.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from processors.actuation import ActuationLog
from processors.ingest import Ingest
from processors.metrics import UnitMetrics
from processors.promtext import CounterMetricFamily, GaugeMetricFamily, Metric
from processors.reload import Rebuilt
from processors.runtime import PublishCounts, UnitRuntime
from processors.sink import ResultSink
from processors.state import BrokerState
from processors.wire import WireClient
from streams.catalog import Catalog
from streams.colocation import colocated, partitions
from streams.topics import TopicScheme
from streams.transport.mqtt import MqttSettings
from streams.updates import SensorUpdate, StreamKey

log = logging.getLogger(__name__)
Clock = Callable[[], float]
# A partition's runtime, made for its objects from a catalog (the unit's build, its config).
MakeRuntime = Callable[[int, list[str], Catalog, BrokerState, Callable[[], bool]], UnitRuntime]
ACTIVE, LEAVING = b"1", b"leaving"  # a member's retained status; none: gone (or dead)
# After first seeing the members, how long a replica waits before taking partitions: replicas
# started together then see each other first (as Kafka's group.initial.rebalance.delay.ms),
# instead of the first taking everything and handing most of it over at once.
SETTLE = 1.0


def partition_client(unit: str, p: int) -> str:
    return f"{unit}-p{p:02d}"


class PartitionTopics:
    """Where a unit's replicas coordinate, under the topic root."""

    def __init__(self, topics: TopicScheme, unit: str) -> None:
        self.base = f"{topics.root}cloudlet/units/{unit}"

    def member(self, instance: str) -> str:
        return f"{self.base}/members/{instance}"

    @property
    def members(self) -> str:
        return f"{self.base}/members/+"

    def owner(self, p: int) -> str:
        return f"{self.base}/partitions/{p}/owner"

    @property
    def owners(self) -> str:
        return f"{self.base}/partitions/+/owner"

    def state(self, p: int) -> str:
        return f"{self.base}/partitions/{p}/state"

    def sync(self, name: str) -> str:
        return f"{self.base}/sync/{name}"


class Membership:
    """The unit's live replicas and each partition's owner, as the broker's retained messages
    say; this replica among them while it runs."""

    def __init__(
        self, settings: MqttSettings, topics: PartitionTopics, instance: str,
        on_change: Callable[[], None],
    ) -> None:  # fmt: skip
        self.topics, self.instance, self.on_change = topics, instance, on_change
        self.members: set[str] = set()  # active: partitions are shared out between them
        self.leaving: set[str] = set()  # still handing theirs over
        self.owners: dict[int, str] = {}
        self.synced = threading.Event()  # every retained message read since connecting
        self.status = ACTIVE  # said again on every connect
        self._nonce = b""
        self._sync = topics.sync(instance)
        self._lock = threading.Lock()
        self.client = WireClient(
            settings,
            instance,
            subscriptions=[(topics.members, 0), (topics.owners, 0), (self._sync, 0)],
            on_messages=self._on_messages,
            on_connection=self._on_connection,
            persistent=False,
            will=(topics.member(instance), b""),  # cleared by the broker if we die
        )

    def start(self) -> Membership:
        self.client.start()
        return self

    def leave(self) -> None:
        """Say we are going: the others take our partitions as we hand them over."""
        self.status = LEAVING
        self.client.publish([(self.topics.member(self.instance), LEAVING)], 1, retain=True)
        self.client.flush(5.0)

    def stop(self) -> None:
        """Gone: every partition of ours handed over."""
        self.client.publish([(self.topics.member(self.instance), b"")], 1, retain=True)
        self.client.flush(5.0)
        self.client.stop()

    def view(self) -> tuple[list[str], dict[int, str]]:
        with self._lock:
            return sorted(self.members), dict(self.owners)

    def alive(self, member: str) -> bool:
        """Active, or leaving (handing its partitions over)."""
        with self._lock:
            return member in self.members or member in self.leaving

    # network thread -------------------------------------------------------------------------

    def _on_connection(self, up: bool) -> None:
        self.synced.clear()
        if up:
            self._nonce = os.urandom(8).hex().encode()
            self.client.publish([(self.topics.member(self.instance), self.status)], 1,
                                retain=True)  # fmt: skip
            self.client.publish([(self._sync, self._nonce)], 0)

    def _on_messages(self, messages: list[Any]) -> None:
        members_prefix = self.topics.member("")
        owner_prefix = f"{self.topics.base}/partitions/"
        with self._lock:
            for m in messages:
                topic, payload = m.topic, bytes(m.payload)
                if topic == self._sync:
                    if payload == self._nonce:
                        self.synced.set()
                elif topic.startswith(members_prefix):
                    name = topic[len(members_prefix) :]
                    self.members.discard(name)
                    self.leaving.discard(name)
                    if payload == LEAVING:
                        self.leaving.add(name)
                    elif payload:
                        self.members.add(name)
                elif topic.startswith(owner_prefix) and topic.endswith("/owner"):
                    number = topic[len(owner_prefix) : -len("/owner")]
                    if not number.isdigit():  # not ours to read: a message costs itself only
                        log.warning("ignoring %s: not a partition's owner", topic[:200])
                        continue
                    p = int(number)
                    if payload:
                        self.owners[p] = payload.decode(errors="replace")
                    else:
                        self.owners.pop(p, None)
        self.on_change()


class _SharedSink:
    """The replica's sink (its outbox), written by every partition, closed once by the
    replica (a partition that moves away must not close it)."""

    def __init__(self, sink: ResultSink) -> None:
        self.sink = sink
        self._lock = threading.Lock()

    def write(self, results: Sequence[tuple[StreamKey, SensorUpdate]]) -> None:
        with self._lock:
            self.sink.write(results)

    def close(self) -> None:
        pass


class Partitions:
    """A replica's share of a partitioned unit: the runtime of each partition it owns, taken
    and handed over as the live replicas change. Stands where a unit's one runtime would."""

    def __init__(
        self,
        *,
        unit: str,
        instance: str,
        count: int,
        catalog: Catalog,
        ingest: Ingest,
        topics: TopicScheme,
        settings: MqttSettings,
        make: MakeRuntime,
        partition_settings: Callable[[str], MqttSettings] | None = None,
        metrics: UnitMetrics,
        sink: ResultSink | None,
        handover_timeout: float = 15.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.unit, self.instance, self.count = unit, instance, count
        self.catalog, self.ingest, self.make = catalog, ingest, make
        # a partition session's settings, from its client id (its `{instance}` credentials)
        self.partition_settings = partition_settings or (lambda _client: settings)
        self.metrics = metrics
        self.actuations = ActuationLog()
        self.sink = sink
        self.shared_sink = _SharedSink(sink) if sink is not None else None
        self.handover_timeout = handover_timeout
        self.clock = clock
        self.topics = PartitionTopics(topics, unit)
        self.owned: dict[int, UnitRuntime] = {}
        self.connected = threading.Event()  # every partition of ours taken and restored
        self.moves = 0  # partitions taken or handed over (a rebalance moves some)
        self._objects = partitions(colocated(catalog), count)
        self._done = PublishCounts()  # of the runtimes handed over
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._rebuilt: Rebuilt | None = None
        self._waiting: dict[int, float] = {}  # partition -> since when we wait for it
        self._lost: dict[int, tuple[str, ...]] = {}  # fenced: not taken back in that view
        self._settled: float | None = None  # when the first view may be acted on
        self.membership = Membership(settings, self.topics, instance, self._changed.set)
        metrics.registry.register(_PartitionCollector(self))
        self._thread = threading.Thread(target=self._run, name="cloudlet-partitions",
                                        daemon=True)  # fmt: skip

    # what a unit's runtime offers --------------------------------------------------------------

    def start(self) -> Partitions:
        self.membership.start()
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and all(  # a partition being handed over is not dead
            rt.alive or rt.fenced or rt.stopping for rt in list(self.owned.values())
        )

    @property
    def ready(self) -> bool:
        return (
            self.membership.client.connected.is_set()
            and self.connected.is_set()
            and all(rt.ready for rt in list(self.owned.values()))
        )

    @property
    def published(self) -> PublishCounts:
        total = PublishCounts()
        total.add(self._done)
        for rt in list(self.owned.values()):
            total.add(rt.published)
        return total

    def replace(self, rebuilt: Rebuilt) -> None:
        """A registry change: every partition of ours is handed over to ourselves (its state
        checkpointed on the broker, then restored into runtimes built from the new catalog,
        subscribed to the new objects)."""
        self._rebuilt = rebuilt
        self._changed.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Leave (the others take our partitions as we hand them over), hand over, stop."""
        self.membership.leave()
        self._stopping.set()
        self._changed.set()
        self._thread.join(timeout + 5 * max(1, len(self.owned)))
        for p in list(self.owned):
            self._release(p, timeout)
        self.membership.stop()
        if self.sink is not None:
            self.sink.close()

    # the replica's partitions thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._changed.wait(0.5)
            self._changed.clear()
            if self._stopping.is_set():
                return
            try:
                self._rebalance()
            except Exception:  # a bug of ours: said, and tried again at the next change
                log.exception("partitions of %s: rebalancing failed", self.instance)
                time.sleep(1.0)

    def _rebalance(self) -> None:
        for p, rt in list(self.owned.items()):
            if rt.fenced:  # another replica took it: not ours in this view of the members
                log.warning("partition %d of %s was taken over by another replica", p,
                            self.unit)  # fmt: skip
                rt.stop(1.0)
                self._retire(p)
                self._lost[p] = tuple(self.membership.view()[0])
        if self._rebuilt is not None:
            rebuilt, self._rebuilt = self._rebuilt, None
            released = list(self.owned)
            for p in released:
                self._release(p)
            self.catalog, self.ingest = rebuilt.catalog, rebuilt.ingest
            self._objects = partitions(colocated(rebuilt.catalog), self.count)
            for p in released:
                if p not in self._objects:  # no object of it left: its session goes
                    self._forget(p)
            self.metrics.reloads.inc()
        if not self.membership.synced.is_set():
            return
        members, owners = self.membership.view()
        if self.instance not in members:
            return  # our own announcement is on its way
        if self._settled is None:
            self._settled = self.clock() + SETTLE
        if self.clock() < self._settled:
            self._changed.set()
            time.sleep(0.05)
            return
        wanted = {p for p in self._objects if members[p % len(members)] == self.instance}
        for p in sorted(set(self.owned) - wanted):
            self._release(p)
        waiting = False  # for a previous owner to hand one over
        for p in sorted(wanted - set(self.owned)):
            if self._lost.get(p) == tuple(members):
                continue
            owner = owners.get(p)
            if owner and owner != self.instance and self.membership.alive(owner):
                since = self._waiting.setdefault(p, self.clock())
                if self.clock() - since < self.handover_timeout:
                    waiting = True
                    continue
                log.warning("partition %d: %s did not hand it over in %.0f s; taking it", p,
                            owner, self.handover_timeout)  # fmt: skip
            self._take(p)
        if not waiting and all(rt.ready for rt in self.owned.values()):
            self.connected.set()
        else:  # look again soon
            self._changed.set()
            time.sleep(0.05)

    def _take(self, p: int) -> None:
        state = BrokerState(self.topics.state(p), self.topics.sync(partition_client(self.unit, p)))
        rt = self.make(p, self._objects[p], self.catalog, state, lambda: self._ours(p))
        rt.start()
        self.owned[p] = rt
        self._waiting.pop(p, None)
        self.moves += 1
        # ours now (said once the session is ours, on its own connection)
        rt._client.publish([(self.topics.owner(p), self.instance.encode())], 1, retain=True)
        log.info("partition %d of %s taken by %s: %d objects", p, self.unit, self.instance,
                 len(self._objects[p]))  # fmt: skip

    def _forget(self, p: int) -> None:
        """End partition p's session on the broker (a clean start, then away) and clear its
        snapshot: what it queued or held for objects that are another partition's now must
        never be processed late."""
        client_id = partition_client(self.unit, p)
        client = WireClient(self.partition_settings(client_id), client_id, subscriptions=[],
                            on_messages=lambda _m: None, persistent=False)  # fmt: skip
        client.start()
        if client.connected.wait(10):  # and its snapshot and owner with it
            client.publish([(self.topics.state(p), b""), (self.topics.owner(p), b"")], 1,
                           retain=True)  # fmt: skip
            client.flush(5.0)
            log.info("partition %d of %s has no object left: its session ended", p, self.unit)
        else:
            log.warning("partition %d of %s: its session could not be ended", p, self.unit)
        client.stop()

    def _ours(self, p: int) -> bool:
        """Whether partition p's session is still ours to reconnect: no other live replica
        has said it took it."""
        owner = self.membership.view()[1].get(p)
        return not owner or owner == self.instance or not self.membership.alive(owner)

    def _release(self, p: int, timeout: float = 10.0) -> None:
        rt = self.owned[p]
        rt.stop(timeout, farewell=[(self.topics.owner(p), b"")])
        self._retire(p)
        self.moves += 1
        log.info("partition %d of %s handed over by %s", p, self.unit, self.instance)

    def _retire(self, p: int) -> None:
        self._done.add(self.owned.pop(p).published)
        self.connected.clear()


def partition_subscriptions(topics: TopicScheme, objects: list[str]) -> list[tuple[str, int]]:
    """A partition's topics: its objects' streams and status reports."""
    subs = []
    for so in objects:
        subs.append((topics.device_update(so, "+"), 1))
        subs.append((f"{topics.root}{so}/actions/+/status", 1))
    return subs


class _PartitionCollector:
    def __init__(self, partitions: Partitions) -> None:
        self.p = partitions

    def collect(self) -> Iterator[Metric]:
        p, unit = self.p, self.p.metrics.unit
        members = p.membership.view()[0]
        owned = GaugeMetricFamily("cloudlet_partitions_owned", "Partitions this replica runs",
                                  labels=["unit"])  # fmt: skip
        owned.add_metric([unit], len(p.owned))
        yield owned
        live = GaugeMetricFamily("cloudlet_partition_members", "Live replicas sharing them",
                                 labels=["unit"])  # fmt: skip
        live.add_metric([unit], len(members))
        yield live
        moves = CounterMetricFamily("cloudlet_partition_moves", "Partitions taken or handed over",
                                    labels=["unit"])  # fmt: skip
        moves.add_metric([unit], p.moves)
        yield moves
