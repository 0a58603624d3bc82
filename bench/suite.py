"""The benchmark suite: each scenario beside its reference, in one run; ratios, not absolutes.

    make bench                      (= .venv/bin/python bench/suite.py)
    .venv/bin/python bench/suite.py --only kernel,ingest --quick

Writes bench/results/<time>.json and .md (with the machine described) and prints the table.
Scenarios:
1. kernel: readings/s per core of decode + validate + filter + 1-minute tumbling average keyed by
   service object (the unit's own Ingest and FlowEngine), compiled kernels beside their
   pure-Python twins, one reading per message and 100 (columnar); and the same flow written
   with expressions (`avg(t * 1.8 + 32)`), and with a composite stream per object besides
   (`data.t * 1.8 + 32`), columns beside the expressions update by update;
2. ingest: updates/s from a real Mosquitto into a unit running that flow, beside the C client
   `mosquitto_sub` draining the same backlog; one reading per message, and 100; the CPU per
   message of each client and of the broker while it serves each; and (backlog) 40,000 queued
   100-reading messages, which Mosquitto 2.0.11 sends beyond the unit's receive maximum;
3. forwarder: records/s from the outbox to Kafka, beside Kafka's ProducerPerformance;
4. latency: device publish to a Kafka consumer on the cloud side, p50 and p99, at a fixed rate,
   and the CPU per update of the unit and of the broker while it holds;
5. memory: peak RSS of the unit process during the ingest scenario; at rest (rest), beside an
   interpreter with only what any unit loads (asyncio, pydantic, http.server, PyYAML);
6. scale: throughput with 1, 2, 3 replicas of a partitioned unit at a site, and with 1 and 2
   instances of a unit reading Kafka (`bench/scale.py`).
Every run is bounded in count and time, and talks to loopback only. The workload and the
in-process scenarios are in `bench/in_process.py`.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import scale  # noqa: E402
from cloud import forwarder, latency  # noqa: E402
from in_process import (  # noqa: E402
    columnar,
    kernel,
    objects,
    payloads,
    readings,
    windows,
)
from measure import cpu_seconds, peak_rss_kb, private_kb, proportional_kb, rss_kb  # noqa: E402

from cloudlet.demo import unit_metrics  # noqa: E402
from cloudlet.rig import Kafka, Mosquitto  # noqa: E402
from cloudlet.rig.process import free_port  # noqa: E402
from streams.transport.mqtt import MqttSettings, connect, make_client  # noqa: E402


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1) if found else model
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(),
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# 2. ingest and 5. memory -----------------------------------------------------------------------


def _queue(broker: Mosquitto, client_id: str, payloads: list[tuple[str, bytes]]) -> None:
    """Make `client_id` a persistent subscriber, then queue `payloads` on the broker for it."""
    settings = MqttSettings(url=broker.url)
    sub = make_client(settings, client_id)
    ready = threading.Event()
    sub.on_connect = lambda c, *_: c.subscribe("+/streams/+", 1)
    sub.on_subscribe = lambda *_: ready.set()
    connect(sub, settings, persistent=True)
    sub.loop_start()
    assert ready.wait(10)
    sub.disconnect()
    sub.loop_stop()
    pub = make_client(settings, f"{client_id}-publisher")
    done = threading.Event()
    count = [0]

    def published(*_: object) -> None:
        count[0] += 1
        if count[0] == len(payloads):
            done.set()

    pub.on_publish = published
    up = threading.Event()
    pub.on_connect = lambda *_: up.set()
    connect(pub, settings, persistent=False)
    pub.loop_start()
    # Connected first: paho sends what is published during its CONNACK handling out of order
    # (tests/test_publish_order.py), and the unit would count the readings overtaken as late.
    assert up.wait(10), "no connection to the broker"
    for topic, payload in payloads:
        pub.publish(topic, payload, qos=1)
    assert done.wait(120), "the broker did not take the backlog"
    pub.disconnect()
    pub.loop_stop()


def ingest(
    work: Path, n: int, per_message: int, echo: bool = True, batch: bool = False, tag: str = ""
) -> dict[str, Any]:
    """`tag`: said in the scenario's name (and its folders), for a variant of the same run."""
    run = f"{per_message}-{echo}-{batch}{tag and '-'}{tag}"
    broker = Mosquitto(
        work / f"mosquitto-{run}", superuser=True, site=True
    ).start()  # configured as a site's broker is
    try:
        messages = payloads(readings(n), per_message)
        # the C client, draining its backlog
        _queue(broker, "bench-c", messages)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert broker.process is not None
        broker_pid = broker.process.pid
        broker_before = cpu_seconds(broker_pid)
        started = time.perf_counter()
        subprocess.run(
            [
                "mosquitto_sub",
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                *broker.cli_auth,
                "-i",
                "bench-c",
                "-c",
                "-q",
                "1",
                "-t",
                "+/streams/+",
                "-C",
                str(len(messages)),
            ],
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=300,
        )
        c_rate = n / (time.perf_counter() - started)
        c_broker = (cpu_seconds(broker_pid) - broker_before) / len(messages)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        c_cpu = (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / len(
            messages
        )
        # our unit, draining the same backlog (a process of its own, as deployed)
        unit_dir = work / f"unit-{run}"
        unit_dir.mkdir()
        config = unit_dir / "unit.yaml"
        config.write_bytes(
            orjson.dumps(
                {
                    "name": "bench-unit",
                    "objects": [str(objects(work / "objects"))],
                    "mqtt": {"url": broker.url, "receive_maximum": 1000},
                    "batch_size": 1000,
                    "http": {"port": (port := free_port())},
                    "republish": {"updates": echo, "batch": batch},
                }
            )
        )
        _queue(broker, "bench-unit", messages)
        log = (unit_dir / "unit.log").open("wb")
        started = time.perf_counter()
        unit = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloudlet.entry",
                "unit",
                "run",
                str(config),
                "--log-format",
                "json",
            ],
            stderr=log,
            stdout=subprocess.DEVNULL,
        )
        expected = len(messages)
        processed = letters = 0
        peak = 0
        # when the unit had started, its count, its CPU seconds and the broker's then
        first: tuple[float, int, float, float] | None = None
        deadline = time.monotonic() + 300
        while processed < expected and time.monotonic() < deadline:
            time.sleep(0.02)
            if unit.poll() is not None:
                tail = (unit_dir / "unit.log").read_text()[-2000:]
                raise RuntimeError(f"the unit exited ({unit.returncode}):\n{tail}")
            peak = max(peak, peak_rss_kb(unit.pid))
            try:
                metrics = unit_metrics(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                continue  # still starting
            processed = int(metrics.get("cloudlet_messages_received_total", 0))
            letters = int(metrics.get("cloudlet_dead_letters_total", 0))
            if first is None and processed:
                first = (time.perf_counter(), processed, cpu_seconds(unit.pid),
                         cpu_seconds(broker_pid))  # fmt: skip
        assert first is not None and processed == expected, f"{processed} of {expected}"
        # a reading dead-lettered (late, say) is not a reading ingested: the row would lie
        assert letters == 0, f"the unit dead-lettered {letters} readings"
        start_up = first[0] - started
        timed = expected - first[1]  # the messages after the first poll that saw any
        cpu = (cpu_seconds(unit.pid) - first[2]) / timed if timed else float("nan")
        # the broker's too: taking the unit's echo and acknowledgements is its work
        broker_cpu = (cpu_seconds(broker_pid) - first[3]) / timed if timed else float("nan")
        if timed < expected // 2:  # drained before we could time it: a count too small
            ours = float("nan")
        else:
            ours = timed * per_message / (time.perf_counter() - first[0])
        unit.terminate()
        unit.wait(30)
        return {
            "scenario": f"ingest ({per_message} per message"
            f"{'' if echo else ', no echo'}{', batched echo' if batch else ''}"
            f"{tag and ', '}{tag})",
            "ours": ours,
            "reference": c_rate,
            "reference_is": "mosquitto_sub (C)",
            "unit": "readings/s",
            "ratio": ours / c_rate,
            "peak_rss_mb": peak / 1024,
            "cpu_us_per_message": cpu * 1e6,
            "reference_cpu_us_per_message": c_cpu * 1e6,
            "broker_cpu_us_per_message": broker_cpu * 1e6,
            "reference_broker_cpu_us_per_message": c_broker * 1e6,
            "note": "drained before the first poll: too few messages to time (leave out --quick)"
            if ours != ours  # NaN
            else f"from its first message; start-up {start_up:.1f} s not counted",
        }
    finally:
        broker.stop()


# -----------------------------------------------------------------------------------------------


# what any unit loads whatever it does: asyncio (its MQTT client), pydantic and a model (its
# config), http.server (its status server), PyYAML (its files); without OpenSSL, as a unit
# without TLS, Kafka or plug-ins runs (cloudlet.unit_run.OpenSSLWithheld)
FLOOR = (
    "import sys\nsys.modules.update(ssl=None, _hashlib=None)\n"
    "import asyncio, http.server, yaml, pydantic\n"
    "class Config(pydantic.BaseModel):\n    name: str = ''\n"
    "Config(name='x'); print('ready', flush=True); sys.stdin.read()"
)


def rest(work: Path) -> dict[str, Any]:
    """A unit at rest (connected and subscribed, nothing received, no cloud sync) beside the
    floor: an interpreter with only what any unit loads."""
    broker = Mosquitto(work / "mosquitto-rest", superuser=True, site=True).start()
    floor = subprocess.Popen([sys.executable, "-c", FLOOR], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert floor.stdout is not None and floor.stdout.readline().startswith(b"ready")
        floor_rss = rss_kb(floor.pid) / 1024
        config = work / "rest.yaml"
        config.write_bytes(orjson.dumps({"name": "bench-rest", "mqtt": {"url": broker.url},
                                         "objects": [str(objects(work / "objects"))],
                                         "http": {"port": (port := free_port())}}))  # fmt: skip
        unit = subprocess.Popen([sys.executable, "-m", "cloudlet.entry", "unit", "run",
                                 str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:  # up: it serves its metrics once connected
                try:
                    unit_metrics(f"http://127.0.0.1:{port}/metrics")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the unit did not start"
                    time.sleep(0.1)
            time.sleep(2.0)
            rss, own, share = (f(unit.pid) / 1024 for f in (rss_kb, private_kb, proportional_kb))
        finally:
            unit.terminate()
            unit.wait(30)
    finally:
        floor.kill()
        floor.wait()
        broker.stop()
    return {
        "scenario": "unit at rest (MQTT, no cloud sync)",
        "ours": rss,
        "reference": floor_rss,
        "reference_is": "an interpreter with asyncio, pydantic, http.server and PyYAML only,"
        " no OpenSSL",
        "unit": "MB RSS",
        "ratio": rss / floor_rss,
        "note": f"its own pages (USS) {own:.0f} MB, its share of shared pages counted (PSS)"
        f" {share:.0f} MB",
    }


def table(results: list[dict[str, Any]], about: dict[str, Any]) -> str:
    lines = [
        f"Machine: {about['cpu']}, {about['cores']} cores, Python {about['python']}, {about['at']}",
        "",
        "| scenario | ours | reference | ratio | notes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "ours" in r:
            notes = ", ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                for k, v in r.items()
                if k
                in (
                    "peak_rss_mb",
                    "rest_rss_mb",
                    "cpu_us_per_message",
                    "reference_cpu_us_per_message",
                    "broker_cpu_us_per_message",
                    "reference_broker_cpu_us_per_message",
                    "derived",
                    "note",
                )
            )
            lines.append(
                f"| {r['scenario']} | {r['ours']:,.0f} {r['unit']} | {r['reference']:,.0f}"
                f" ({r['reference_is']}) | {r['ratio']:.2f} | {notes} |"
            )
        else:
            lines.append(
                f"| {r['scenario']} | p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
                f" | - | - | {r['arrived']}/{r['sent']} arrived; unit CPU"
                f" {r['cpu_us_per_message']:.0f} µs/update, broker"
                f" {r['broker_cpu_us_per_message']:.0f}; {r['note']} |"
            )
    return "\n".join(lines) + "\n"


PACKAGES = ("streams", "processors", "cloud_sync", "cloudlet", "edge_objects")


def byte_compile() -> None:
    """Our modules byte-compiled, as `pip install` leaves them in an image: where a shell sets
    PYTHONDONTWRITEBYTECODE, an editable install's tree keeps no current .pyc of a module
    changed since, each unit the suite starts compiled those from source, and the compiler's
    high-water mark stayed in its heap (0.6 MB more at rest, measured)."""
    import compileall

    root = Path(__file__).resolve().parent.parent
    for package in PACKAGES:
        compileall.compile_dir(root / package, quiet=1)


def _keep(results: list[dict[str, Any]], run: Callable[[], dict[str, Any]]) -> None:
    results.append(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default="kernel,columnar,windows,rest,ingest,backlog,forwarder,latency,scale"
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    scale_of = 0.1 if args.quick else 1.0
    byte_compile()
    about = machine()
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="cloudlet-bench-"))
    steps: list[tuple[str, Callable[[], None]]] = []
    kafka: Kafka | None = None
    try:
        if "kernel" in only:
            steps.append(
                ("kernel 1", lambda: results.append(kernel(work, int(200_000 * scale_of), 1)))
            )
            steps.append(
                ("kernel 100", lambda: results.append(kernel(work, int(1_000_000 * scale_of), 100)))
            )

            def derived(per: int, variant: str) -> None:  # written with expressions
                n = int(200_000 * per**0.5 * scale_of)
                results.append(kernel(work, n, per, variant))

            # (the composite stream with one reading per message only: the 100-reading messages
            # of this workload carry 100 readings of one instant, stale triggers but the first)
            for per, variant in ((1, "derived flow"), (100, "derived flow"), (1, "composite")):
                kernel_step = functools.partial(derived, per, variant)
                steps.append((f"kernel {variant} {per}", kernel_step))
        if "windows" in only:
            steps.append(("windows", lambda: results.append(windows(int(500_000 * scale_of)))))
        if "columnar" in only:
            steps.append(("columnar", lambda: results.append(columnar(int(500_000 * scale_of)))))
        if "rest" in only:
            steps.append(("rest", lambda: results.append(rest(work))))
        if "ingest" in only:
            steps.append(
                ("ingest 1", lambda: results.append(ingest(work, int(50_000 * scale_of), 1)))
            )
            steps.append(
                ("ingest 100", lambda: results.append(ingest(work, int(500_000 * scale_of), 100)))
            )
            steps.append(
                (
                    "ingest 1, no echo",
                    lambda: results.append(ingest(work, int(50_000 * scale_of), 1, echo=False)),
                )
            )
            steps.append(
                (
                    "ingest 100, batched echo",
                    lambda: results.append(ingest(work, int(500_000 * scale_of), 100, batch=True)),
                )
            )
        if "backlog" in only:
            # a backlog Mosquitto 2.0.11 drains beyond the unit's receive maximum (37,000 of
            # 40,000 at once): the peak is what the inbox's inbox_bytes holds to

            n = int(40_000 * scale_of)
            run = functools.partial(ingest, work, n * 100, 100, tag=f"{n:,} queued")
            steps.append(("ingest 100, a large backlog", functools.partial(_keep, results, run)))
            run = functools.partial(ingest, work, n * 100, 100, batch=True, tag=f"{n:,} queued")
            steps.append(
                (
                    "ingest 100, batched echo, a large backlog",
                    functools.partial(_keep, results, run),
                )
            )
        if "scale" in only:
            steps.append(
                (
                    "scale: site replicas",
                    lambda: results.extend(scale.site(work, int(100_000 * scale_of))),
                )
            )
        if only & {"forwarder", "latency", "scale"}:
            kafka = cluster = Kafka(work / "kafka", heap="1g").start()
            if "forwarder" in only:
                steps.append(
                    (
                        "forwarder",
                        lambda: results.append(forwarder(cluster, work, int(100_000 * scale_of))),
                    )
                )
            if "latency" in only:
                # the target: p99 under 50 ms at 10,000/s; and at 1,000/s with the
                # unit's linger, which trades a few ms for CPU at low rates
                for rate, linger in ((1000, 0), (10_000, 0), (1000, 5)):
                    run = functools.partial(latency, cluster, work, rate, 10 * scale_of + 2,
                                            linger)  # fmt: skip
                    steps.append((f"latency {rate}/s{f', linger {linger} ms' if linger else ''}",
                                  functools.partial(_keep, results, run)))  # fmt: skip
            if "scale" in only:
                steps.append(
                    (
                        "scale: cloud instances",
                        lambda: results.extend(scale.cloud(cluster, work, int(200_000 * scale_of))),
                    )
                )
        for name, step in steps:
            print(f"running {name} ...", flush=True)
            step()
    finally:
        if kafka is not None:
            kafka.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.json").write_bytes(
        orjson.dumps({"machine": about, "results": results}, option=orjson.OPT_INDENT_2)
    )
    text = table(results, about)
    (out / f"{stamp}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
