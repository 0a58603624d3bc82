"""Actuation from the cloud: commands come down Kafka to the cloudlet, statuses go back up.

The cloud API produces each command to `cloudlet.commands` (key: the site). On each
cloudlet, the relay consumes that topic (a consumer group per site, so a command reaches its
site once, even across restarts), checks the action against the service object, and publishes
it to the device (`<so>/actions`, QoS 1). The device's status reports
(`<so>/actions/<id>/status`) go back to `cloudlet.command-status`, where the cloud records
them. A command older than `max_age` when it arrives is refused (`failed`, "expired"):
opening a valve on an hour-old request is worse than not opening it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from cloud_sync.settings import RelaySettings
from streams.actuation import Actuation, ActuationError, ActuationStatus, StatusReport
from streams.registry import Registry
from streams.topics import TopicScheme
from streams.transport.mqtt import (
    MqttSettings,
    connect,
    content_type_properties,
    make_client,
    refused,
    refused_because,
)

if TYPE_CHECKING:  # imported where used: a unit without the relay does not load aiokafka
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

log = logging.getLogger(__name__)


def command_record(command: Actuation, site: str) -> bytes:
    return orjson.dumps({"id": command.id, "site": site, "so": command.so,
                         "action": command.action, "parameters": command.parameters,
                         "issuedAt": command.issued_at})  # fmt: skip


def status_record(so: str, report: StatusReport) -> bytes:
    doc = {"id": report.id, "so": so, "status": report.status.value, "at": report.at}
    if report.message is not None:
        doc["message"] = report.message
    return orjson.dumps(doc)


def _is_so(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= 256 and not ({"/", "+", "#"} & set(value))


class CommandRelay:
    """Kafka commands to MQTT, MQTT status reports to Kafka, for one site."""

    def __init__(
        self,
        settings: RelaySettings,
        mqtt_settings: MqttSettings,
        registry: Registry | Callable[[], Registry],
        topics: TopicScheme | None = None,
        client_id: str | None = None,
    ) -> None:
        """`registry`: the site's, or what gives the one in force (a unit's, which a hot
        reload replaces)."""
        self.settings = settings
        self._registry = registry
        self.topics = topics or TopicScheme()
        self.ready = threading.Event()
        self.relayed = 0
        self.refused = 0
        self._reports: asyncio.Queue[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._mqtt_settings = mqtt_settings
        self._client_id = client_id or f"cloudlet-relay-{settings.site}"
        self._client = make_client(mqtt_settings, self._client_id)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_status
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                        name="cloudlet-command-relay", daemon=True)  # fmt: skip

    def _on_connect(self, client: Any, _u: object, _f: object, reason: object, _p: object) -> None:
        if refused(reason):
            log.error(
                "command relay: %s", refused_because(reason, self._mqtt_settings, self._client_id)
            )
            return
        client.subscribe(self.topics.action_status_filter, qos=1)

    @property
    def alive(self) -> bool:
        """The relay's thread runs (a relay that has not started counts as alive)."""
        return self._thread.is_alive() or not self._thread.ident

    def _on_status(self, _c: object, _u: object, msg: Any) -> None:
        about = self.topics.parse_action_status(msg.topic)
        if about is None or self._loop is None or self._reports is None:
            return
        try:
            report = StatusReport.from_json(bytes(msg.payload))
        except ActuationError as exc:
            self.refused += 1
            log.warning("status report on %.200s cannot be read: %s", msg.topic, exc)
            return
        self._loop.call_soon_threadsafe(self._reports.put_nowait,
                                        status_record(about[0], report))  # fmt: skip

    def start(self) -> CommandRelay:
        connect(self._client, self._mqtt_settings, persistent=False)
        self._client.loop_start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._client.disconnect()
        self._client.loop_stop()

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
        from aiokafka.errors import KafkaError

        self._loop = asyncio.get_running_loop()
        self._reports = asyncio.Queue()
        s = self.settings
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                s.topics.commands, bootstrap_servers=s.bootstrap_servers,
                group_id=f"cloudlet-relay-{s.site}", enable_auto_commit=False,
                auto_offset_reset="latest", metadata_max_age_ms=5_000,
            )  # fmt: skip
            producer = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, acks="all")
            try:
                await consumer.start()
                await producer.start()
                await self._wait_assigned(consumer)
                self.ready.set()
                while not self._stop.is_set():
                    batches = await consumer.getmany(timeout_ms=200)
                    for records in batches.values():
                        for r in records:
                            try:
                                await self._command(r.value, producer)
                            except KafkaError:
                                raise
                            except Exception:  # a bug on one record costs that record
                                self.refused += 1
                                log.exception("command %s[%d]@%d skipped", r.topic,
                                              r.partition, r.offset)  # fmt: skip
                    if batches:
                        await consumer.commit()
                    while not self._reports.empty():
                        report = self._reports.get_nowait()
                        await producer.send_and_wait(s.topics.status, report,
                                                     key=s.site.encode())  # fmt: skip
            except KafkaError as exc:
                log.warning("command relay: %s; reconnecting", exc)
                await asyncio.sleep(1.0)
            except Exception:  # never leave the site without its command path
                log.exception("command relay failed; starting again in 5 s")
                await asyncio.sleep(5.0)
            finally:
                await consumer.stop()
                await producer.stop()

    @staticmethod
    async def _wait_assigned(consumer: AIOKafkaConsumer) -> None:
        for _ in range(200):  # the group's first assignment, so "latest" means from now
            if consumer.assignment():
                for tp in consumer.assignment():
                    await consumer.position(tp)
                return
            await consumer.getmany(timeout_ms=100)

    async def _command(self, value: bytes, producer: AIOKafkaProducer) -> None:
        try:
            doc = orjson.loads(value)
            if doc.get("site") != self.settings.site:
                return  # another cloudlet's
            command = Actuation.from_json(doc.get("so"), value) if _is_so(doc.get("so")) else None
            if command is None:
                raise ValueError(f"so must be a service object id, got {doc.get('so')!r:.60}")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("a command that cannot be read: %s", exc)
            self.refused += 1
            return
        problem = self._problem(command)
        if problem is not None:
            self.refused += 1
            log.warning("command %s refused: %s", command.id, problem)
            report = StatusReport(command.id, ActuationStatus.FAILED, int(time.time() * 1000),
                                  problem)  # fmt: skip
            await producer.send_and_wait(self.settings.topics.status,
                                         status_record(command.so, report),
                                         key=self.settings.site.encode())  # fmt: skip
            return
        self._client.publish(self.topics.actions(command.so), command.to_json(), qos=1,
                             properties=content_type_properties("application/json"))  # fmt: skip
        self.relayed += 1
        log.info("command %s from the cloud: %s %s %s", command.id, command.so, command.action,
                 command.parameters)  # fmt: skip

    @property
    def registry(self) -> Registry:
        return self._registry if isinstance(self._registry, Registry) else self._registry()

    def _problem(self, command: Actuation) -> str | None:
        so = self.registry.objects.get(command.so)
        if so is None:
            return f"this cloudlet has no service object {command.so!r}"
        if so.action(command.action) is None:
            declared = ", ".join(a.name for a in so.actions) or "none"
            return f"{command.so!r} has no action {command.action!r} (its actions: {declared})"
        age = time.time() * 1000 - command.issued_at
        if age > self.settings.max_age:
            return f"expired: issued {age / 1000:.0f} s ago (max_age {self.settings.max_age} ms)"
        return None
