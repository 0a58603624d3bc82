"""A real single-node Apache Kafka in KRaft mode on loopback ports, run on the local JVM.

The broker's jars are resolved from Maven Central with `mvn` into a cache directory
(`$CLOUDLET_CACHE`, default `~/.cache/cloudlet`) and reused across runs; the storage is
formatted afresh for each start in the service's own work directory.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from cloudlet.rig.process import RigError, Service, free_port, port_open

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>cloudlet.rig</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {logfile}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache
logger.apache.level = WARN
"""


def cache_dir() -> Path:
    return Path(os.environ.get("CLOUDLET_CACHE", Path.home() / ".cache" / "cloudlet"))


def ensure_kafka(version: str = KAFKA_VERSION) -> Path:
    """The directory of Kafka's jars, resolving them with `mvn` on first use."""
    home = cache_dir() / f"kafka-{version}"
    libs = home / "libs"
    marker = home / ".complete"
    if marker.exists():
        return libs
    for tool in ("mvn", "java"):
        if shutil.which(tool) is None:
            raise RigError(f"{tool} is not installed; the Kafka rig needs Maven and a JDK (17+)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_VERSION))
    if libs.exists():
        shutil.rmtree(libs)  # an earlier resolution was interrupted
    argv = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(home / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={libs}",
        "-DincludeScope=runtime",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        raise RigError(
            f"resolving Kafka {version} from Maven Central failed ({' '.join(argv)}):\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    marker.write_text(version + "\n")
    return libs


def _cluster_id() -> str:
    while True:  # one in 64 starts with "-", which Kafka's StorageTool reads as an option
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not found.startswith("-"):
            return found


async def _produce_once(bootstrap: str) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait("_rig_ready", b"ready"), timeout=10)
    finally:
        await producer.stop()


def _accepts_produce(bootstrap: str) -> bool:
    try:
        asyncio.run(_produce_once(bootstrap))
    except Exception:
        return False
    return True


class Kafka(Service):
    """Kafka (broker + controller in one JVM) on 127.0.0.1:`port`."""

    name = "kafka"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        node_id: int = 1,
    ) -> None:
        super().__init__(workdir)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.controller_port = free_port(avoid={self.port})
        self.version = version
        self.heap = heap
        self.node_id = node_id
        self.libs: Path | None = None
        self._argv: list[str] = []
        # a node of a cluster (`KafkaCluster`): its voters and the replication it asks for
        self.voters = f"{node_id}@{self.host}:{self.controller_port}"
        self.replication = 1
        self.cluster_id: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def java(self, main_class: str, *args: str) -> list[str]:
        """A command line running `main_class` from the broker's jars (e.g. Kafka's own tools)."""
        if self.libs is None:
            self.libs = ensure_kafka(self.version)
        return ["java", "-cp", f"{self.libs}/*", main_class, *args]

    def _configure(self) -> Path:
        data = self.workdir / "data"
        if data.exists():
            shutil.rmtree(data)
        config = self.workdir / "server.properties"
        rf = str(self.replication)
        isr = str(min(2, self.replication))
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "listeners": f"PLAINTEXT://{self.host}:{self.port},"
            f"CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": "0",
        }
        config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.workdir / "log4j2.properties").write_text(
            _LOG4J2.format(logfile=self.workdir / "server.log")
        )
        return config

    def start(self, timeout: float = 120.0) -> Kafka:
        self._prepare()
        return self.resume(timeout)

    def _prepare(self) -> None:
        """Configured, its storage formatted, its command line ready (not started)."""
        self.libs = ensure_kafka(self.version)
        config = self._configure()
        log4j = f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}"
        fmt = subprocess.run(
            [
                "java",
                log4j,
                "-cp",
                f"{self.libs}/*",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                self.cluster_id or _cluster_id(),
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise RigError(f"formatting Kafka storage failed:\n{(fmt.stdout + fmt.stderr)[-3000:]}")
        self._argv = [
            "java",
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            log4j,
            "-cp",
            f"{self.libs}/*",
            "kafka.Kafka",
            str(config),
        ]

    def resume(self, timeout: float = 120.0) -> Kafka:
        """Start the broker again after `stop`, with its data (an outage, not a new cluster)."""
        self._spawn(self._argv)
        self._wait(lambda: port_open(self.host, self.port), timeout, "listening")
        self._wait(self._accepts_produce, timeout, "accepting a produce")
        return self

    def _accepts_produce(self) -> bool:
        return _accepts_produce(self.bootstrap_servers)


class KafkaCluster:
    """`nodes` Kafka nodes in KRaft mode (each a broker and a controller voter) on loopback,
    as a production cluster is replicated: topics with `nodes` replicas (at most 3) and
    `min.insync.replicas` 2, so a write acknowledged by all in-sync replicas survives the
    loss of one node. `kill(i)` and `resume(i)` take one node away and bring it back."""

    def __init__(self, workdir: Path, nodes: int = 3, *, heap: str = "384m",
                 version: str = KAFKA_VERSION) -> None:  # fmt: skip
        if nodes < 1:
            raise RigError("a cluster has at least one node")
        self.nodes = [Kafka(Path(workdir) / f"node-{i + 1}", heap=heap, version=version,
                            node_id=i + 1) for i in range(nodes)]  # fmt: skip
        taken: set[int] = set()  # every node's two ports distinct from the others' too
        for node in self.nodes:
            if node.port in taken:
                node.port = free_port(avoid=taken | {node.controller_port})
            taken.add(node.port)
            if node.controller_port in taken:
                node.controller_port = free_port(avoid=taken)
            taken.add(node.controller_port)
        voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in self.nodes)
        cluster_id = _cluster_id()
        for node in self.nodes:
            node.voters, node.cluster_id = voters, cluster_id
            node.replication = min(3, nodes)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.bootstrap_servers for n in self.nodes)

    def java(self, main_class: str, *args: str) -> list[str]:
        return self.nodes[0].java(main_class, *args)

    def start(self, timeout: float = 180.0) -> KafkaCluster:
        for node in self.nodes:
            node._prepare()
        for node in self.nodes:  # the quorum needs a majority up before any node is ready
            node._spawn(node._argv)
        for node in self.nodes:
            node._wait(lambda n=node: port_open(n.host, n.port), timeout, "listening")  # type: ignore[misc]
        self.nodes[0]._wait(self._accepts_produce, timeout, "accepting a replicated produce")
        return self

    def _accepts_produce(self) -> bool:
        return _accepts_produce(self.bootstrap_servers)

    def kill(self, index: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.nodes[index].kill()

    def resume(self, index: int, timeout: float = 120.0) -> None:
        node = self.nodes[index]
        node._spawn(node._argv)
        node._wait(lambda: port_open(node.host, node.port), timeout, "listening")

    def stop(self, timeout: float = 15.0) -> None:
        """Every node at once: stopped one after another, the last ones wait for a quorum
        that is gone (a controlled shutdown asks the controllers), 30 s each."""
        running = [n for n in self.nodes if n.running]
        for node in running:
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()
                node.process.wait(10)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
