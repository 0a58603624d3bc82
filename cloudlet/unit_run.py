"""`cloudlet unit run`, without the rest of the command line: a unit process loads only what a
unit uses (no typer, rich or the other commands' modules: about 6 MB less at rest). The
console script (`cloudlet.entry`) comes here for `cloudlet unit run CONFIG ...`; `--help`
and every other command go through the full CLI (`cloudlet.cli`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import orjson


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: what log collectors (Loki, Elastic, journald) ingest."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def run_unit(config_path: Path, replica: str | None = None, log_format: str = "text") -> int:
    """Run a processing unit until SIGTERM or Ctrl-C, then drain, checkpoint and stop; the
    exit status (1: a bad config, or one of its threads died)."""
    from cloudlet.units import CloudletUnit, UnitFile
    from processors.config import ConfigError
    from processors.unit import tune_gc
    from streams.registry import RegistryError

    configure_logging(log_format)
    try:
        config = UnitFile.load(config_path)
        if config.input is not None:  # the cloud tier: Kafka in, Kafka out
            return _run_kafka_unit(config)
        running = CloudletUnit(config, replica=replica)
        unit = running.unit
    except (ConfigError, RegistryError) as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    stop = threading.Event()  # set by SIGTERM and Ctrl-C: drain, checkpoint and stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    tune_gc()  # after building the unit: what it built is frozen out of the collector's scans
    running.start()
    if unit.status is not None:
        print(f"metrics on http://{config.http.host}:{unit.status.port}/metrics", flush=True)  # type: ignore[union-attr]
    while not stop.wait(0.5):
        if not unit.alive:
            dead = ", ".join(unit.dead_threads())
            running.stop()
            print(f"error: unit {unit.instance}: its {dead} stopped; see the log above",
                  file=sys.stderr)  # fmt: skip
            return 1
    running.stop()
    return 0


def _run_kafka_unit(config: Any) -> int:
    """A unit reading Kafka (`processors.kafka_source`) until SIGTERM or Ctrl-C; 1 when its
    input stopped on its own."""
    from processors.kafka_source import KafkaUnit

    unit = KafkaUnit(config).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        if not unit.alive:
            print(f"error: unit {config.name}: its Kafka input stopped; see the log above",
                  file=sys.stderr)  # fmt: skip
            return 1
    unit.stop()
    return 0


def bound_malloc_arenas(arenas: int = 1) -> bool:
    """At most `arenas` glibc malloc arenas in this process (unless `MALLOC_ARENA_MAX` says
    otherwise). glibc gives each thread that allocates an arena of its own, up to 8 per core,
    and an arena keeps its high-water mark (the network thread allocates what the worker
    frees). Draining 100-reading messages with the batched echo (bench/suite.py's ingest), the
    peak was 109 and 124 MB in two runs with glibc's default, 66-107 MB in nine with two
    arenas; draining 40,000 queued ones with the batched echo, 96-112 MB in six runs with two
    arenas and 82-92 MB in six with one, throughput within the runs' noise (the threads take
    turns on the GIL anyway). Called before any thread starts. False where the C library is
    not glibc (nothing to do)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False  # the operator's choice
    import ctypes  # 0.25 MB, only here

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl, macOS: no arenas of this kind
        return False
    m_arena_max = -8  # glibc's malloc.h
    return bool(mallopt(m_arena_max, arenas))


def main(argv: list[str]) -> int:
    """`cloudlet unit run` from its arguments (those after `unit run`)."""
    bound_malloc_arenas()
    parser = argparse.ArgumentParser(prog="cloudlet unit run")
    parser.add_argument("config", metavar="CONFIG", type=Path)
    parser.add_argument("--replica", default=None, help="this replica's id: the instance is"
                        " UNIT-REPLICA, or REPLICA itself when it starts with UNIT- (a pod's"
                        " name)")  # fmt: skip
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    args = parser.parse_args(argv)
    return run_unit(args.config, args.replica, args.log_format)
