"""Real services for tests, benchmarks and local development, on free loopback ports.

`Mosquitto` and `Postgres` (the Debian packages, installed when missing) and `Kafka` (Apache
Kafka in KRaft mode, its jars resolved from Maven Central with `mvn` into a cache reused
across runs; `KafkaCluster`: three such nodes, replicated) are started in a work directory of
their own and stopped cleanly; their logs stay in that directory.
"""

from cloudlet.rig.kafka import Kafka, KafkaCluster, ensure_kafka
from cloudlet.rig.mosquitto import Mosquitto, ensure_mosquitto
from cloudlet.rig.postgres import Postgres, ensure_postgres
from cloudlet.rig.process import RigError

__all__ = [
    "Kafka", "KafkaCluster", "Mosquitto", "Postgres", "RigError", "ensure_kafka",
    "ensure_mosquitto", "ensure_postgres",
]  # fmt: skip
