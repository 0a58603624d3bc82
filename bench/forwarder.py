"""The forwarder against Kafka's own producer, side by side on one Kafka (4.1.1, KRaft, local).

    .venv/bin/python bench/forwarder.py [--records 100000]

Fills an outbox with sensor updates, drains it to Kafka with the forwarder (idempotent,
acks=all, lz4), then has Kafka's ProducerPerformance (Java) send as many records of the same
size with the same settings. Prints both rates and their ratio. Bounded: one topic each, the
given number of records, loopback only.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from pathlib import Path

from cloud_sync.forwarder import Forwarder, ForwarderSettings
from cloud_sync.outbox import Outbox, OutboxSettings
from cloudlet.rig import Kafka
from streams import SensorUpdate, StreamKey, encode_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    n = args.records
    work = Path(tempfile.mkdtemp(prefix="cloudlet-bench-"))
    kafka = Kafka(work / "kafka", heap="1g").start()
    try:
        outbox = Outbox(OutboxSettings(path=work / "outbox", fsync="never"))
        updates = [
            (StreamKey(f"field-{i % 100}-soil", "soil"),
             SensorUpdate({"moisture": 20.0 + i % 7, "temperature": 14.5}, 1_700_000_000_000 + i))
            for i in range(n)
        ]  # fmt: skip
        for i in range(0, n, 1000):
            outbox.write(updates[i : i + 1000])
        size = len(encode_update(updates[0][1])) + 120  # the envelope around the update
        settings = ForwarderSettings.model_validate(
            {"site": "bench", "batch": 5000,
             "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": "bench.forwarder",
                       "compression": "lz4"}}
        )  # fmt: skip
        forwarder = Forwarder(outbox, settings).start()
        started = time.perf_counter()
        while outbox.depth() > 0:
            time.sleep(0.01)
        ours = n / (time.perf_counter() - started)
        forwarder.stop()
        done = subprocess.run(
            kafka.java("org.apache.kafka.tools.ProducerPerformance", "--topic", "bench.java",
                       "--num-records", str(n), "--record-size", str(size), "--throughput", "-1",
                       "--producer-props", f"bootstrap.servers={kafka.bootstrap_servers}",
                       "acks=all", "enable.idempotence=true", "compression.type=lz4",
                       "linger.ms=20", "batch.size=262144"),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        found = re.search(r"([\d.]+) records/sec", lines[-1] if lines else "")
        theirs = float(found.group(1)) if found else float("nan")
        print(f"forwarder (Python, aiokafka): {ours:>10,.0f} records/s")
        print(f"ProducerPerformance (Java):   {theirs:>10,.0f} records/s  ({size}-byte records)")
        print(f"ratio: {ours / theirs:.2f}")
    finally:
        kafka.stop()


if __name__ == "__main__":
    main()
