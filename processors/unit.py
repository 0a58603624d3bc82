"""A processing unit assembled from its config: catalog, ingest, flows, runtime, state, sink,
metrics and status endpoints. `cloudlet unit run CONFIG` runs one."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable

from processors.chain import build_chain
from processors.config import ConfigError, UnitConfig
from processors.engine import engine_of
from processors.ingest import Ingest
from processors.metrics import StatusServer, UnitMetrics
from processors.partitions import Partitions, partition_client, partition_subscriptions
from processors.reload import Rebuilt, RegistryWatcher
from processors.runtime import CheckpointPolicy, UnitRuntime
from processors.sink import ResultSink, SQLiteSink
from processors.state import BrokerState, StateStore
from streams.catalog import Catalog
from streams.composite_plan import CompositePlan

log = logging.getLogger(__name__)


EMPTY_PLAN = CompositePlan(derived={}, rank={}, readers={}, group_readers={}, groups_of={})


def instance_name(unit: str, replica: str | None) -> str:
    """A replica's instance name: `unit-replica`, or the replica's id itself when it starts
    with `unit-` (a Kubernetes pod's name, `irrigation-field-0`)."""
    if not replica:
        return unit
    return replica if replica.startswith(f"{unit}-") else f"{unit}-{replica}"


class Unit:
    def __init__(
        self,
        config: UnitConfig,
        *,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
        sink: ResultSink | None = None,
    ) -> None:
        """`sink` (the cloud-sync outbox, say) takes the place of the config's."""
        self.config = config
        # Each replica has its own persistent session and its own state.
        self.instance = instance_name(config.name, replica)
        self.clock = clock
        built = self._build(Catalog.load(config.objects))
        self.catalog, self.chain = built.catalog, built.chain
        self.metrics = UnitMetrics(self.instance)
        self.metrics.watch(self.chain)
        self.runtime: UnitRuntime | Partitions
        if config.partitions is not None:
            self.runtime = self._partitioned(built, sink)
        else:
            self.runtime = self._runtime(built, sink)
        self.status = (
            StatusServer(
                self.metrics,
                config.http.host,
                config.http.port,
                healthy=lambda: self.alive,
                ready=lambda: self.runtime.ready,
                actuations=self.runtime.actuations,
                token=config.http.token.secret().encode() if config.http.token else None,
            )
            if config.http
            else None
        )

        # the unit's background threads, by name: /healthz is 503 as soon as one has died
        self.threads: dict[str, Callable[[], bool]] = {"worker": lambda: self.runtime.alive}
        self.watcher: RegistryWatcher | None = None
        if config.reload:  # hot reload: changes of the objects folders taken as they come
            watcher = self.watcher = RegistryWatcher(
                config.objects, self._build, self.runtime.replace, config.reload / 1000,
                self.metrics.reload_failures.inc,
            )  # fmt: skip
            self.threads["registry watcher"] = lambda: watcher.alive

    def _runtime(self, built: Rebuilt, sink: ResultSink | None) -> UnitRuntime:
        config = self.config
        return UnitRuntime(
            built.ingest,
            config.mqtt.for_instance(self.instance),
            engine=built.engine,
            chain=self.chain if len(self.chain) else None,
            client_id=self.instance,
            subscription=config.subscription,
            batch_size=config.batch_size,
            batch_bytes=config.batch_bytes,
            linger=config.linger / 1000,
            state=StateStore(config.state_dir, self.instance) if config.state_dir else None,
            checkpoint=CheckpointPolicy(config.checkpoint.every, config.checkpoint.messages),
            sink=sink or (SQLiteSink(config.sink.sqlite) if config.sink else None),
            metrics=self.metrics,
            clock=self.clock,
            republish=config.republish,
            inbox_bytes=config.inbox_bytes,
            spill_dir=config.state_dir,
        )

    def _partitioned(self, built: Rebuilt, sink: ResultSink | None) -> Partitions:
        """This replica's share of the unit's partitions (`processors.partitions`)."""
        config = self.config
        assert config.partitions is not None
        # the replica's bound on received messages in memory, shared: it may hold them all
        inbox = max(config.inbox_bytes // config.partitions.count, 256 << 10)

        def make(
            p: int, objects: list[str], catalog: Catalog, state: BrokerState,
            still_ours: Callable[[], bool],
        ) -> UnitRuntime:  # fmt: skip
            client = partition_client(config.name, p)
            part = self._build(catalog)
            return UnitRuntime(
                part.ingest,
                config.mqtt.for_instance(client),
                engine=part.engine,
                chain=part.chain if len(part.chain) else None,
                client_id=client,
                subscriptions=partition_subscriptions(config.topics, objects),
                batch_size=config.batch_size,
                batch_bytes=config.batch_bytes,
                linger=config.linger / 1000,
                state=state,
                checkpoint=CheckpointPolicy(config.checkpoint.every, config.checkpoint.messages),
                sink=partitioned.shared_sink,
                metrics=self.metrics,
                clock=self.clock,
                republish=config.republish,
                actuations=partitioned.actuations,
                still_ours=still_ours,
                inbox_bytes=inbox,
                spill_dir=config.state_dir,
            )

        partitioned = Partitions(
            unit=config.name,
            instance=self.instance,
            count=config.partitions.count,
            catalog=built.catalog,
            ingest=built.ingest,
            topics=config.topics,
            settings=config.mqtt.for_instance(self.instance),
            make=make,
            partition_settings=config.mqtt.for_instance,
            metrics=self.metrics,
            sink=sink or (SQLiteSink(config.sink.sqlite) if config.sink else None),
            handover_timeout=config.partitions.handover_timeout / 1000,
        )
        return partitioned

    def _build(self, catalog: Catalog) -> Rebuilt:
        """The ingest, graph and processors of a catalog (at start, and on a reload)."""
        config = self.config
        chain, registry, problems = build_chain(catalog.registry, config.processors,
                                                config.source)  # fmt: skip
        if problems:
            raise ConfigError(problems)
        ingest = Ingest(registry, config.topics, max_payload=config.max_payload,
                        max_future_ms=config.max_future, clock=self.clock)  # fmt: skip
        if not config.derive:  # validate, store, forward: nothing computed, nothing sent
            catalog = dataclasses.replace(catalog, plan=EMPTY_PLAN, flows=(), rules=())
        engine = engine_of(catalog, clock=self.clock, chain=chain)
        return Rebuilt(catalog, ingest, engine, chain)

    @property
    def alive(self) -> bool:
        return all(alive() for alive in self.threads.values())

    def dead_threads(self) -> list[str]:
        return [name for name, alive in self.threads.items() if not alive()]

    def start(self) -> Unit:
        if self.status is not None:
            self.status.start()
        self.runtime.start()
        if self.watcher is not None:
            self.watcher.start()
        log.info(
            "unit %s: broker %s, subscription %s, %d objects, %d flows, %d processors",
            self.instance, self.config.mqtt.url, self.config.subscription,
            len(self.catalog.registry), len(self.catalog.flows), len(self.chain),
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Drain what was received, checkpoint, acknowledge, disconnect."""
        if self.watcher is not None:
            self.watcher.stop()
        self.runtime.stop()
        if self.status is not None:
            self.status.stop()
        log.info(
            "unit %s stopped after %d messages", self.instance, self.runtime.published.messages
        )


GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Tune CPython's cyclic garbage collector for a unit's process (the `cloudlet unit run`
    command calls this; a library user may too).

    The data path allocates a few containers per reading (a decoded document, a SensorUpdate,
    its channels, the pairs of a batch), and reference counting frees nearly all of them: the
    collector finds almost nothing, yet with CPython's defaults it scans the young generation
    every 700 allocations. Measured on the kernel scenario of `bench/suite.py`, that scanning
    was 40-50% of the CPU of ingest and flows. Objects alive once the unit is built (imports,
    the registry, the compiled flows) are frozen out of every scan, and the young generation
    is collected every 50,000 allocations: still bounded, just not per message."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
