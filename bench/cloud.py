"""The benchmark suite's cloud-side scenarios: 3. forwarder (outbox to Kafka, beside Kafka's
ProducerPerformance) and 4. latency (device publish to a Kafka consumer, at a fixed rate)."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from in_process import SENSORS, objects, readings
from measure import cpu_seconds, private_kb, rss_kb

from cloud_sync.forwarder import Forwarder
from cloud_sync.outbox import Outbox, OutboxSettings
from cloud_sync.settings import ForwarderSettings
from cloudlet.demo import unit_metrics
from cloudlet.rig import Kafka, Mosquitto
from cloudlet.rig.process import free_port
from streams import SensorUpdate, encode_update
from streams.transport.mqtt import MqttSettings, connect, make_client

ROOT = Path(__file__).resolve().parent.parent


# 3. forwarder ----------------------------------------------------------------------------------


def forwarder(kafka: Kafka, work: Path, n: int) -> dict[str, Any]:
    outbox = Outbox(OutboxSettings(path=work / "outbox", fsync="never"))
    data = readings(n)
    for i in range(0, n, 1000):
        outbox.write(data[i : i + 1000])
    settings = ForwarderSettings.model_validate(
        {
            "site": "bench",
            "batch": 5000,
            "commands": False,
            "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": "bench.forwarder"},
        }
    )
    fwd = Forwarder(outbox, settings).start()
    started = time.perf_counter()
    while outbox.depth() > 0:
        time.sleep(0.01)
    ours = n / (time.perf_counter() - started)
    fwd.stop()
    size = len(encode_update(data[0][1])) + 120
    done = subprocess.run(
        kafka.java(
            "org.apache.kafka.tools.ProducerPerformance",
            "--topic",
            "bench.java",
            "--num-records",
            str(n),
            "--record-size",
            str(size),
            "--throughput",
            "-1",
            "--producer-props",
            f"bootstrap.servers={kafka.bootstrap_servers}",
            "acks=all",
            "enable.idempotence=true",
            "compression.type=lz4",
            "linger.ms=20",
            "batch.size=262144",
        ),
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"([\d.]+) records/sec", done.stdout.strip().splitlines()[-1])
    theirs = float(found.group(1)) if found else float("nan")
    return {
        "scenario": "forwarder",
        "ours": ours,
        "reference": theirs,
        "reference_is": "Kafka ProducerPerformance (Java)",
        "unit": "records/s",
        "ratio": ours / theirs,
    }


# 4. latency ------------------------------------------------------------------------------------


WARM_UP = 3.0  # s at the scenario's rate before what is measured


def latency(kafka: Kafka, work: Path, rate: int, seconds: float, linger: int = 0) -> dict[str, Any]:
    """`linger` (ms): the unit's, as its file would set it (0, the default: none). The devices
    publish at `rate` for WARM_UP seconds first, not measured: the first seconds at a new rate
    on a freshly started Kafka (its JIT compiling the paths of that load) are what a
    long-running cluster does not see. Measured, the first of four runs at 10,000/s on a fresh
    Kafka had the worst p99 of the four in each of four sessions (59-109 ms)."""
    run = f"{rate}-{linger}" if linger else f"{rate}"

    broker = Mosquitto(work / f"mosquitto-latency-{run}", superuser=True, site=True).start()
    topic = f"bench.latency.{run}"
    config = work / f"latency-{run}.yaml"
    config.write_bytes(
        orjson.dumps(
            {
                "name": "bench-latency",
                "objects": [str(objects(work / "objects"))],
                "mqtt": {"url": broker.url},
                "http": {"port": (port := free_port())},
                "outbox": {"path": str(work / f"latency-outbox-{run}")},
                "linger": linger,
                "forward": {
                    "site": "bench",
                    "commands": False,
                    "batch": 2000,
                    "kafka": {
                        "bootstrap_servers": kafka.bootstrap_servers,
                        "topic": topic,
                        "linger_ms": 1,
                    },
                },
            }
        )
    )
    # the unit in a process of its own, as deployed (in this one it would share the GIL with
    # the publishing devices and the consumer)
    unit = subprocess.Popen(
        [sys.executable, "-m", "cloudlet.entry", "unit", "run", str(config)],
        stdout=subprocess.DEVNULL, stderr=(work / f"latency-{run}.log").open("wb"),
    )  # fmt: skip
    # the consumer in a process of its own too: beside the devices' publisher in this one, it
    # starved paho's network thread, and the devices' own queue became what was measured
    ctx = multiprocessing.get_context("fork")
    since = ctx.Value("d", float("inf"))  # ms: the updates measured are those from then on
    seen, counted, stop = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Event()
    lags_out, lags_in = ctx.Pipe(duplex=False)
    consumer = ctx.Process(
        target=_latency_consumer,
        args=(kafka.bootstrap_servers, topic, since, seen, counted, stop, lags_in),
    )
    consumer.start()
    settings = MqttSettings(url=broker.url)
    pub = make_client(settings, "bench-latency-devices")
    # one client stands in for many devices: paho's default of 20 QoS 1 messages in flight
    # would make the devices' own queue the latency measured
    pub.max_inflight_messages_set(1000)
    connect(pub, settings, persistent=False)
    pub.loop_start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # up: it serves its metrics once connected
            try:
                unit_metrics(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)
        # connected, forwarder up, nothing received yet
        rest, rest_private = rss_kb(unit.pid) / 1024, private_kb(unit.pid) / 1024
        # warm-up: the forwarder and the consumer find the topic (Kafka creates it on first
        # use, which takes seconds), and the first updates are not what is measured
        for i in range(50):
            u = SensorUpdate({"t": 20.0}, int(time.time() * 1000))
            pub.publish(f"sensor-{i % SENSORS}/streams/data", encode_update(u), qos=1)
        deadline = time.monotonic() + 60
        while seen.value < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        # the devices in a process of their own (beside the publisher of the warm-up here,
        # their own queue would be what is measured); DEVICE_PROCESSES connections. The first
        # sets `since` when its warm-up at the rate is over
        counts = [ctx.Value("q", 0) for _ in range(DEVICE_PROCESSES)]
        devices = [ctx.Process(target=_latency_devices,
                               args=(broker.url, i, rate / DEVICE_PROCESSES, seconds,
                                     counts[i], since))
                   for i in range(DEVICE_PROCESSES)]  # fmt: skip
        assert broker.process is not None
        for d in devices:
            d.start()
        deadline = time.monotonic() + WARM_UP + 30
        while since.value == float("inf") and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu_before = cpu_seconds(unit.pid), cpu_seconds(broker.process.pid)
        for d in devices:
            d.join(WARM_UP + seconds + 60)
        sent = sum(c.value for c in counts)
        deadline = time.monotonic() + 30
        while counted.value < sent and time.monotonic() < deadline:
            time.sleep(0.1)
        # CPU per update while the rate held (and the last ones drained): the fixed costs of a
        # batch show at low rates, where a batch is a message or a few
        unit_cpu = (cpu_seconds(unit.pid) - cpu_before[0]) / max(1, sent)
        broker_cpu = (cpu_seconds(broker.process.pid) - cpu_before[1]) / max(1, sent)
    finally:
        stop.set()
        arrivals: list[tuple[float, float]] = lags_out.recv() if lags_out.poll(15) else []
        consumer.join(10)
        pub.loop_stop()
        unit.terminate()
        unit.wait(30)
        broker.stop()
    ordered = sorted(total for total, _ in arrivals)
    # where the time goes: device to the forwarder's send (broker, unit, outbox) and from
    # there to the consumer (Kafka's acknowledgement, its fetch, the consumer's own queue)
    sending = sorted(sent for _, sent in arrivals)
    after = sorted(total - sent for total, sent in arrivals)
    return {
        "scenario": f"latency at {rate}/s" + (f", linger {linger} ms" if linger else ""),
        "p50_ms": statistics.median(ordered),
        "p99_ms": _p99(ordered),
        "sent": sent,
        "arrived": len(arrivals),
        "unit": "ms, device publish to Kafka consumer",
        "cpu_us_per_message": unit_cpu * 1e6,
        "broker_cpu_us_per_message": broker_cpu * 1e6,
        "note": f"ms clock resolution; no window waits (raw updates); the unit at rest"
        f" {rest:.0f} MB RSS ({rest_private:.0f} MB its own, USS); device to the forwarder's"
        f" send p50 {statistics.median(sending):.0f}"
        f" p99 {_p99(sending):.0f} ms, then to the consumer p50 {statistics.median(after):.0f}"
        f" p99 {_p99(after):.0f} ms",
    }


def _p99(ordered: list[float]) -> float:
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


DEVICE_PROCESSES = 1


def _latency_devices(
    url: str, index: int, rate: float, seconds: float, count: Any, since: Any
) -> None:
    """Devices of the latency scenario: one connection publishing `rate` updates/s, each dated
    when it is published, for WARM_UP seconds (the first device then sets `since`, in whole ms
    as the updates are dated) and `seconds` more; `count`: those dated `since` or later. On
    the unit's wire client (the frame kernel, one write for what is due each millisecond), not
    paho: the harness shares the two cores with what it measures, and four paho clients took
    88% of a core at 10,000/s (their Python per message) where this takes a fraction; the
    broker sees the same QoS 1 PUBLISHes either way."""
    from processors.wire import WireClient

    client = WireClient(
        MqttSettings(url=url), f"bench-latency-devices-{index}", subscriptions=[],
        on_messages=lambda _publishes: None, persistent=False,
    ).start()  # fmt: skip
    if not client.connected.wait(10):
        raise RuntimeError(f"the latency devices could not reach {url}")
    sent = measured = 0
    started = time.monotonic()
    while time.monotonic() - started < WARM_UP + seconds:
        due = int((time.monotonic() - started) * rate)
        if due > sent:
            now = int(time.time() * 1000)
            if index == 0 and since.value == float("inf") and \
                    time.monotonic() - started >= WARM_UP:  # fmt: skip
                since.value = now
            # the update as encode_update writes it, dated now
            body = b'{"channels":{"t":{"current-value":20.0}},"lastUpdate":%d}' % now
            client.publish([(f"sensor-{(n * DEVICE_PROCESSES + index) % SENSORS}/streams/data",
                             body) for n in range(sent, due)])  # fmt: skip
            if now >= since.value:
                measured += due - sent
            sent = due
        time.sleep(0.001)
    count.value = measured
    client.flush(30)  # all taken by the broker
    client.stop()


def _latency_consumer(
    bootstrap: str, topic: str, since: Any, seen: Any, counted: Any, stop: Any, out: Any
) -> None:
    """Kafka consumer of the latency scenario (a process of its own): device publish to
    arrival here, in ms, for the raw updates dated `since` or later."""
    from aiokafka import AIOKafkaConsumer

    lags: list[tuple[float, float]] = []  # (publish to here, publish to the forwarder's send)

    async def consume() -> None:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            metadata_max_age_ms=1000,
        )  # fmt: skip
        await consumer.start()
        try:
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    now = time.time() * 1000
                    for r in records:
                        doc = orjson.loads(r.value)
                        if doc["stream"] != "data":
                            continue
                        seen.value += 1
                        published = doc["update"]["lastUpdate"]
                        if published >= since.value:
                            # r.timestamp: when the forwarder built the record (CreateTime)
                            lags.append((now - published, r.timestamp - published))
                            counted.value += 1
        finally:
            await consumer.stop()

    asyncio.run(consume())
    out.send(lags)
