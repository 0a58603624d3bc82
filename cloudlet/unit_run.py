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


OPENSSL_MODULES = frozenset({"ssl", "_ssl", "_hashlib"})


class OpenSSLWithheld:
    """Keeps OpenSSL out of this process while installed (an import finder that refuses
    `ssl` and `_hashlib`, the standard library's two ways to it).

    A unit whose file configures no TLS, no SASL and no plug-in has no use for OpenSSL, yet
    the standard library loads it whenever it can: asyncio, `http.client` (under `http.server`)
    and `hashlib` each try `import ssl` or `_hashlib` and go without when it fails. Mapped and
    initialised, libcrypto, libssl and the `ssl` module were 4.1 MB of a unit at rest; without
    them asyncio serves plain connections, `hashlib` its built-in SHA-2 and BLAKE2, `hmac` its
    own constant-time comparison. `cloudlet unit run` installs it before reading the unit file
    and removes it (`release`) as soon as the file shows a use for OpenSSL
    (`needs_openssl`), before anything that would use it is imported."""

    def __init__(self) -> None:
        self.installed = not OPENSSL_MODULES & sys.modules.keys()  # too late otherwise
        if self.installed:
            sys.meta_path.insert(0, self)

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in OPENSSL_MODULES:
            raise ModuleNotFoundError(
                f"No module named {name!r}: this unit runs without OpenSSL, since nothing in"
                " its file uses it (no TLS, SASL, plug-in, registry follower or Kafka input)",
                name=name,
            )  # fmt: skip

    def release(self) -> None:
        """OpenSSL allowed again; `hashlib`, if loaded meanwhile, takes OpenSSL's hashes."""
        if self.installed:
            sys.meta_path.remove(self)
            self.installed = False
            if "hashlib" in sys.modules:
                import importlib

                importlib.reload(sys.modules["hashlib"])


def needs_openssl(config: Any) -> str | None:
    """What in a unit file needs OpenSSL (a reason to say), or None."""
    from processors.chain import foreign

    if config.input is not None:  # the cloud tier, where a few MB do not matter
        return "it reads Kafka"
    if config.mqtt.tls:
        return "its broker connection uses TLS"
    forward = config.forward
    if forward is not None:  # aiokafka itself imports no ssl: a plain connection goes without
        if forward.kafka is not None and forward.kafka.security_protocol != "PLAINTEXT":
            return f"its Kafka connection is {forward.kafka.security_protocol}"
        if forward.registry is not None:
            return "it follows the registry (aiokafka's admin client imports ssl)"
        if forward.store is not None and not forward.store.startswith("sqlite:"):
            return "its store is not SQLite"
        if forward.provision is not None:  # identities hashed as Mosquitto does (PBKDF2)
            return "it provisions device identities"
        if forward.command_mqtt is not None and forward.command_mqtt.tls:
            return "its command relay's broker connection uses TLS"
    plugins = foreign(p.use for p in config.processors)
    if plugins:
        return f"its plug-ins ({', '.join(plugins)}) may"
    return None


def run_unit(
    config_path: Path, replica: str | None = None, log_format: str = "text",
    *, withhold_openssl: bool = False,
) -> int:  # fmt: skip
    """Run a processing unit until SIGTERM or Ctrl-C, then drain, checkpoint and stop; the
    exit status (1: a bad config, or one of its threads died). `withhold_openssl`: a unit
    that has no use for OpenSSL runs without it (`OpenSSLWithheld`)."""
    withheld = OpenSSLWithheld() if withhold_openssl else None
    from cloudlet.unit_file import UnitFile
    from processors.config import ConfigError
    from streams.registry import RegistryError

    configure_logging(log_format)
    try:
        config = UnitFile.load(config_path)
        if withheld is not None and needs_openssl(config) is not None:
            withheld.release()
        elif withheld is not None and withheld.installed:
            logging.getLogger(__name__).info(
                "OpenSSL not loaded: nothing in the unit file uses it (no TLS, SASL, plug-in,"
                " registry follower or Kafka input)"
            )
        from cloudlet.units import CloudletUnit
        from processors.unit import tune_gc

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
    return run_unit(args.config, args.replica, args.log_format, withhold_openssl=True)
