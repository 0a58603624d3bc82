"""A unit as the control plane runs it: the processing unit (processors/) with the cloud-sync
outbox as its sink and the forwarder draining it to Kafka (cloud_sync/). The two packages do
not know each other; the unit file brings them together:

```yaml
name: irrigation-unit
objects: [objects/]
outbox: {path: outbox/, max_bytes: 1073741824, ttl: 7d, fsync: batch,
         streams: [{match: "*/irrigate", priority: 0}]}
forward: {site: farm-1, kafka: {bootstrap_servers: "kafka:9092", compression: zstd}}
```
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_sync.outbox import Outbox
from cloud_sync.settings import ProvisionSettings, RelaySettings
from cloudlet.unit_file import UnitFile
from processors.promtext import CounterMetricFamily, GaugeMetricFamily, Metric
from processors.unit import Unit

if TYPE_CHECKING:  # imported when configured: they load aiokafka (SQLite for a store)
    from cloud_sync.commands import CommandRelay
    from cloud_sync.forwarder import Forwarder
    from cloud_sync.registry_sync import RegistryFollower

log = logging.getLogger(__name__)


class CloudletUnit:
    """Start: outbox, forwarder, unit. Stop: unit (drains into the outbox), forwarder,
    outbox."""

    def __init__(
        self,
        config: UnitFile,
        *,
        replica: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.outbox = None
        if config.outbox is not None:
            settings = config.outbox
            if replica:  # each replica has an outbox of its own
                settings = settings.model_copy(update={"path": settings.path / replica})
            self.outbox = Outbox(settings, clock=clock)
        self.forwarder: Forwarder | None = None
        if self.outbox is not None and config.forward is not None:
            from cloud_sync.forwarder import Forwarder

            self.forwarder = Forwarder(self.outbox, config.forward)
        self.unit = Unit(config, replica=replica, clock=clock, sink=self.outbox)
        forward = config.forward
        relay_mqtt = (
            forward.command_mqtt or config.mqtt if forward is not None else config.mqtt
        ).for_instance(self.unit.instance)
        self.relay: CommandRelay | None = None
        if forward is not None and forward.kafka is not None and forward.commands:
            from cloud_sync.commands import CommandRelay

            self.relay = CommandRelay(
                RelaySettings(site=forward.site, bootstrap_servers=forward.kafka.bootstrap_servers,
                              topics=forward.command_topics, max_age=forward.command_max_age),
                relay_mqtt, lambda: self.unit.runtime.ingest.registry, config.topics,
                client_id=(forward.command_mqtt and relay_mqtt.username)
                or f"{self.unit.instance}-relay",
            )  # fmt: skip
        self.follower: RegistryFollower | None = None
        if forward is not None and forward.kafka is not None and forward.registry is not None:
            from cloud_sync.registry_sync import RegistryFollower

            self.follower = RegistryFollower(
                forward.registry, forward.site, forward.kafka.bootstrap_servers,
                f"cloudlet-registry-{self.unit.instance}", forward.registry_topic,
                forward.registry_changes_topic,
                *_provisioning(forward.provision, forward.registry, self.unit.instance),
                checked=config.objects,
            )  # fmt: skip
        if self.follower is not None:
            follower = self.follower
            self.unit.threads["registry follower"] = lambda: follower.alive
        if self.forwarder is not None:
            self.unit.threads["forwarder"] = lambda: self.forwarder is None or self.forwarder.alive
        if self.relay is not None:
            self.unit.threads["command relay"] = lambda: self.relay is None or self.relay.alive
        if self.outbox is not None:
            self.unit.metrics.registry.register(
                _CloudSyncCollector(self.unit.instance, self.outbox, self.forwarder)
            )

    def start(self) -> CloudletUnit:
        if self.forwarder is not None:
            self.forwarder.start()
        if self.relay is not None:
            self.relay.start()
        if self.follower is not None:
            self.follower.start()
        self.unit.start()
        return self

    def stop(self) -> None:
        self.unit.stop()  # closes the sink: the outbox
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.follower is not None:
            self.follower.stop()


class _CloudSyncCollector:
    def __init__(self, unit: str, outbox: Outbox, forwarder: Forwarder | None) -> None:
        self.unit, self.outbox, self.forwarder = unit, outbox, forwarder

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("cloudlet_outbox_depth", "Records waiting to be sent",
                                  labels=["unit", "priority"])  # fmt: skip
        for priority, n in sorted(self.outbox.depth_by_priority().items()):
            depth.add_metric([self.unit, str(priority)], n)
        yield depth
        yield GaugeMetricFamily("cloudlet_outbox_bytes", "Bytes of outbox segments on disk",
                                value=self.outbox.size(), labels=None)  # fmt: skip
        yield GaugeMetricFamily(
            "cloudlet_outbox_oldest_seconds", "Age of the oldest unsent record",
            value=self.outbox.oldest_age(),
        )  # fmt: skip
        c = self.outbox.counts
        for name, value, doc in (
            ("cloudlet_outbox_written", c.written, "Records written to the outbox"),
            ("cloudlet_outbox_rejected", c.rejected, "Records refused while full (reject-new)"),
            ("cloudlet_outbox_expired", c.expired, "Records older than the ttl, not sent"),
            ("cloudlet_outbox_truncated", c.truncated, "Torn records cut at start-up"),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        if self.forwarder is not None:
            f = self.forwarder.counts
            for name, value, doc in (
                ("cloudlet_forwarded_records", f.records, "Records acknowledged by Kafka"),
                ("cloudlet_forwarded_bytes", f.bytes, "Bytes of records acknowledged by Kafka"),
                ("cloudlet_forward_retries", f.retries, "Failed sends, retried after a backoff"),
                (
                    "cloudlet_forward_dead_letters",
                    f.dead_letters,
                    "Records too large for Kafka, sent as an excerpt to the dead-letter topic",
                ),
            ):
                yield CounterMetricFamily(name, doc, value=value)


def _provisioning(
    settings: ProvisionSettings | None, folder: Path, instance: str
) -> tuple[bytes | None, Callable[[str, str | None], None] | None]:
    """The site key and what makes or removes a registered object's device identity on the
    site's broker (as its administrator; each change in the copy's `.audit.jsonl`)."""
    if settings is None:
        return None, None
    from cloudlet.security import AuditLog, BrokerAdmin, Identities  # only when used

    admin_settings = settings.admin
    audit = AuditLog(folder / ".audit.jsonl")

    def identities(so: str, secret: str | None) -> None:
        with BrokerAdmin(admin_settings) as admin:
            ids = Identities(admin, audit=audit, actor=f"registry follower of {instance}")
            if secret is None:
                ids.remove_device(so)
            else:
                ids.set_device(so, secret)

    return settings.site_key.secret().encode(), identities
