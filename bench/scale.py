"""6. scale-out: how throughput grows with a unit's replicas at a site (partitions over MQTT)
and with a cloud-tier unit's instances (partitions of a Kafka topic).

Each run drains the same backlog with 1, 2, ... processes of the unit (the bench's minute
average keyed by object, 100 objects, 8 partitions): readings/s from the first processed to the
last, and the CPU per reading of all the processes together. The reference is the run with
one process: the ratio is the speed-up. On a machine with few cores the processes, the broker
(or Kafka) and the publisher share them; the speed-up says what that leaves.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from in_process import objects, payloads, readings
from measure import cpu_seconds

from cloud_sync.forwarder import Forwarder
from cloud_sync.outbox import Outbox, OutboxSettings
from cloud_sync.settings import ForwarderSettings
from cloudlet.demo import unit_metrics
from cloudlet.rig import Kafka, Mosquitto
from cloudlet.rig.process import free_port
from streams.transport.mqtt import MqttSettings, connect, make_client

PARTITIONS = 8


def _start(config: Path, log: Path, replica: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cloudlet.entry", "unit", "run", str(config), "--replica", replica],
        stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    )  # fmt: skip


def _total(ports: list[int], metric: str) -> float:
    total = 0.0
    for port in ports:
        try:
            total += unit_metrics(f"http://127.0.0.1:{port}/metrics").get(metric, 0.0)
        except OSError:
            pass  # still starting
    return total


def _drain(
    procs: list[subprocess.Popen[bytes]], ports: list[int], metric: str, n: int, log: Path,
    server: int,
) -> tuple[float, float, float]:  # fmt: skip
    """Readings/s, CPU µs per reading of the units and of the server (the broker, Kafka),
    from the first processed to the last."""
    first: tuple[float, float, float, float] | None = None
    done = 0.0
    deadline = time.monotonic() + 600
    while done < n and time.monotonic() < deadline:
        time.sleep(0.02)
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a unit exited:\n{log.read_text()[-2000:]}")
        done = _total(ports, metric)
        if first is None and done:
            first = (time.perf_counter(), done, sum(cpu_seconds(p.pid) for p in procs),
                     cpu_seconds(server))  # fmt: skip
    assert first is not None and done >= n, f"{done} of {n}"
    timed = done - first[1]
    rate = timed / (time.perf_counter() - first[0])
    cpu = (sum(cpu_seconds(p.pid) for p in procs) - first[2]) / timed
    return rate, cpu * 1e6, (cpu_seconds(server) - first[3]) / timed * 1e6


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)


def _publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    # a connection for each 50,000: past 65,535 packet ids this paho stalls (ids wrap)
    for i in range(0, len(messages), 50_000):
        _publish_some(broker, messages[i : i + 50_000])


def _publish_some(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    settings = MqttSettings(url=broker.url)
    pub = make_client(settings, f"scale-publisher-{time.monotonic_ns()}")
    up, done, count = threading.Event(), threading.Event(), [0]

    def published(*_: object) -> None:
        count[0] += 1
        if count[0] == len(messages):
            done.set()

    pub.on_publish = published
    pub.on_connect = lambda *_: up.set()
    connect(pub, settings, persistent=False)
    pub.loop_start()
    assert up.wait(10), "no connection to the broker"
    for topic, payload in messages:
        pub.publish(topic, payload, qos=1)
    assert done.wait(300), f"the broker took {count[0]} of {len(messages)} messages"
    pub.disconnect()
    pub.loop_stop()


def site(work: Path, n: int, counts: tuple[int, ...] = (1, 2, 3)) -> list[dict[str, Any]]:
    """Replicas of a partitioned unit at one site draining a backlog queued in the
    partitions' sessions (each run a unit of its own, so its own sessions)."""
    broker = Mosquitto(work / "mosquitto-scale", superuser=True, site=True).start()
    folder = objects(work / "objects")
    messages = payloads(readings(n), 1)
    rates: dict[int, tuple[float, float, float]] = {}
    assert broker.process is not None
    try:
        for count in counts:
            name = f"scale-{count}"
            ports = [free_port() for _ in range(count)]
            log = work / f"{name}.log"
            configs = []
            for i, port in enumerate(ports):
                config = work / f"{name}-{i}.yaml"
                config.write_bytes(orjson.dumps({
                    "name": name, "objects": [str(folder)],
                    "mqtt": {"url": broker.url, "receive_maximum": 1000}, "batch_size": 1000,
                    "http": {"port": port}, "partitions": {"count": PARTITIONS},
                    "checkpoint": {"every": "1s", "messages": 5000},
                }))  # fmt: skip
                configs.append(config)
            # the partitions' sessions made (taken once, handed back), then the backlog queued
            procs = [_start(c, log, str(i)) for i, c in enumerate(configs)]
            deadline = time.monotonic() + 60
            while _total(ports, "cloudlet_partitions_owned") < PARTITIONS:
                assert time.monotonic() < deadline, f"{name}: partitions not taken"
                time.sleep(0.1)
            _stop(procs)
            _publish(broker, messages)
            procs = [_start(c, log, str(i)) for i, c in enumerate(configs)]
            try:
                rates[count] = _drain(procs, ports, "cloudlet_messages_received_total", n, log,
                                      broker.process.pid)  # fmt: skip
            finally:
                _stop(procs)
    finally:
        broker.stop()
    return [_row(f"site replicas: {c} ({PARTITIONS} partitions, MQTT)", rates, c) for c in counts]


async def _topic(bootstrap: str, name: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def cloud(
    kafka: Kafka, work: Path, n: int, counts: tuple[int, ...] = (1, 2)
) -> list[dict[str, Any]]:
    """Instances of a unit reading Kafka draining a topic of `n` forwarded readings (each run
    a consumer group of its own, from the start)."""
    topic = "bench.scale"
    asyncio.run(_topic(kafka.bootstrap_servers, topic, PARTITIONS))
    outbox = Outbox(OutboxSettings(path=work / "scale-outbox", fsync="never"))
    data = readings(n)
    for i in range(0, n, 1000):
        outbox.write(data[i : i + 1000])
    fwd = Forwarder(outbox, ForwarderSettings.model_validate({
        "site": "bench", "batch": 5000, "commands": False,
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic},
    })).start()  # fmt: skip
    while outbox.depth() > 0:
        time.sleep(0.05)
    fwd.stop()
    folder = objects(work / "objects")
    rates: dict[int, tuple[float, float, float]] = {}
    assert kafka.process is not None
    for count in counts:
        name = f"scale-cloud-{count}"
        ports = [free_port() for _ in range(count)]
        log = work / f"{name}.log"
        procs = []
        for i, port in enumerate(ports):
            config = work / f"{name}-{i}.yaml"
            config.write_bytes(orjson.dumps({
                "name": name, "objects": [str(folder)], "http": {"port": port},
                "input": {"kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic,
                                    "outputs": f"{name}.derived"}},
            }))  # fmt: skip
            procs.append(_start(config, log, str(i)))
        try:
            rates[count] = _drain(procs, ports, "cloudlet_kafka_records_total", n, log,
                                  kafka.process.pid)  # fmt: skip
        finally:
            _stop(procs)
    return [_row(f"cloud instances: {c} ({PARTITIONS} partitions, Kafka)", rates, c)
            for c in counts]  # fmt: skip


def _row(scenario: str, rates: dict[int, tuple[float, float, float]], count: int) -> dict[str, Any]:
    one = min(rates)
    return {
        "scenario": scenario,
        "ours": rates[count][0],
        "reference": rates[one][0],
        "reference_is": f"{one} process",
        "unit": "readings/s",
        "ratio": rates[count][0] / rates[one][0],
        "cpu_us_per_message": rates[count][1],
        "broker_cpu_us_per_message": rates[count][2],
        "note": "speed-up over one process; CPU per reading of all the units' processes, and"
        " of the broker (Kafka's JVM for the cloud)",
    }
