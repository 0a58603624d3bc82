"""A processing unit's configuration: one validated YAML file per unit.

```yaml
name: irrigation-unit            # also the MQTT client id and the state file's name
objects: [objects/]              # descriptors and flow files, relative to this file
mqtt: {url: mqtt://127.0.0.1:1883, username: unit, password: secret}
share_group: irrigation          # replicas with the same group split the device traffic
partitions: {count: 16}          # or: replicas split the objects by key, state and all
state_dir: state/                # snapshots of windows and latest values (msgpack)
checkpoint: {every: 5s, messages: 500}
max_future: 5m                   # updates dated later than now + this are dead letters
sink: {sqlite: results.db}       # accepted and derived updates for the cloud side
http: {host: 127.0.0.1, port: 9400}   # /metrics, /healthz, /readyz
processors:                      # plug-ins, run in order after the flows
  - use: threshold
    from: "field-*-soil/soil"
    into: dry
    config: {value: moisture, high: 25, low: 20, direction: below}
```
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from processors.chain import ProcessorSpec
from streams.codec import DEFAULT_MAX_PAYLOAD
from streams.flows.model import duration_ms
from streams.registry import Problem, validation_problems, yaml_mapping
from streams.topics import TopicScheme
from streams.transport.mqtt import MqttSettings
from streams.transport.web import Token

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Checkpoint(_Strict):
    """How often state is snapshotted; device messages are acknowledged only after the
    snapshot that covers them is on disk, so a killed unit loses nothing."""

    every: int = 5_000  # ms
    messages: int = Field(default=500, ge=1)

    @field_validator("every", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int:
        return duration_ms(value)


class SinkSettings(_Strict):
    sqlite: Path


class RepublishSettings(_Strict):
    """What the unit publishes back on MQTT (`<so>/streams/<stream>/updates`). Accepted device
    updates are echoed for local subscribers; a site whose consumers are the cloud (through
    the outbox) can turn that off and spare the broker and the unit most of their work.
    Derived updates, dead letters and commands are always published."""

    updates: bool = True
    qos: int = Field(default=1, ge=0, le=1)  # of the echoed device updates
    # one echo per device message (its updates as they came: one update, or a list of them
    # in ServIoTicy's batch form), per update, or per stream and batch (a list of updates)
    per: Literal["message", "update", "stream"] = "message"
    batch: bool = False  # the same as `per: stream` (configs written before `per`)

    @property
    def mode(self) -> str:
        return "stream" if self.batch else self.per


class HttpSettings(_Strict):
    """The unit's HTTP endpoints: on loopback unless told otherwise. With `token` (inline or
    `token_env`), /metrics and /actuations need `Authorization: Bearer <token>`; /healthz and
    /readyz stay open for probes (they say only up or down)."""

    host: str = "127.0.0.1"
    port: int = Field(default=9400, ge=0, le=65535)  # 0 picks a free port
    token: Token | None = None


class KafkaSource(_Strict):
    """A unit's input from Kafka instead of MQTT (see `processors.kafka_source`): the
    cloudlets' forwarded records (`cloudlet.updates`, keyed by object id) in a consumer group,
    state per partition, derived updates to `outputs`."""

    bootstrap_servers: str
    topic: str = "cloudlet.updates"
    group: str | None = None  # the consumer group: the unit's name by default
    outputs: str | None = "cloudlet.derived"  # derived updates, as the forwarders write them
    # how often each partition's state is checkpointed with its offset (a compacted topic)
    checkpoint_every: int = 1_000
    # what a flow or a group joins goes through a topic keyed by its group first (exactly
    # once: Kafka transactions); null: when the flows and groups join objects
    repartition: bool | None = None
    transaction_timeout: int = 10_000  # ms: how long a dead instance's transaction holds
    # how long stopping may take (last checkpoints, leaving the group); past it, a partition
    # resumes from its previous checkpoint and computes the same outputs again
    stop_timeout: int = Field(default=10_000, ge=0)

    @field_validator("checkpoint_every", "transaction_timeout", "stop_timeout", mode="before")
    @classmethod
    def _ms(cls, value: Any) -> int:
        return duration_ms(value)


class Source(_Strict):
    kafka: KafkaSource


class Partitioning(_Strict):
    count: int = Field(default=16, ge=1, le=256)
    # how long a replica waits for the previous owner to hand a partition over (its last
    # snapshot, its acknowledgements) before taking its session anyway, fencing it off
    handover_timeout: int = 15_000

    @field_validator("handover_timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> int:
        return duration_ms(value)


class UnitConfig(_Strict):
    name: str
    objects: list[Path] = Field(min_length=1)
    mqtt: MqttSettings = MqttSettings()
    topics: TopicScheme = TopicScheme()
    share_group: str | None = None
    batch_size: int = Field(default=500, ge=1, le=10_000)
    # a batch also ends past this many bytes of payload: 500 messages of 100 readings each
    # would be 50,000 readings (and their outputs) in memory at once
    batch_bytes: int = Field(default=256 * 1024, ge=1024)
    # how long a batch smaller than batch_size waits for more after its first message (ms or
    # a duration, "5ms"; 0: not at all, a message is processed the moment it comes): at low
    # rates, fewer and larger batches, so less CPU per message (a batch's fsync,
    # acknowledgements and Kafka request shared) for at most this much more latency; for
    # sites short of CPU, like a Raspberry Pi
    linger: int = Field(default=0, ge=0, le=1000)
    max_payload: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=64)
    # what received messages not processed yet may take in memory (partitions share it out);
    # beyond it, which only a broker overrunning the receive maximum (or a flood of QoS 0)
    # causes, the rest waits in an unlinked file in state_dir (or the system's temporary
    # folder) until processed (`processors.inbox`)
    inbox_bytes: int = Field(default=8 << 20, ge=1 << 20)
    # updates dated further ahead of the unit's clock are dead-lettered future_timestamp;
    # null turns the check off (a site replaying a recorded future, say)
    max_future: int | None = 5 * 60_000
    state_dir: Path | None = None
    checkpoint: Checkpoint = Checkpoint()
    sink: SinkSettings | None = None
    http: HttpSettings | None = None
    processors: list[ProcessorSpec] = []
    republish: RepublishSettings = RepublishSettings()
    # false: validate, store and forward what devices send, and compute nothing of the
    # objects' composite streams, the flow files' flows and rules (an archive beside the unit
    # that derives and acts: it would compute every window and send every command again)
    derive: bool = True
    # keyed scale-out: the objects split into `count` partitions by group
    # (`streams.colocation`), each with its own MQTT session and state; the live replicas
    # share them out and hand them over with their state (`processors.partitions`)
    partitions: Partitioning | None = None
    # where the input comes from: the MQTT broker (`mqtt`, the default), or Kafka
    input: Source | None = None
    # how often the objects folders are looked at for changes, taken without a restart
    # (hot reload); null: only at start
    reload: int | None = 2_000
    source: str = Field(default="<memory>", exclude=True)  # the file it was read from

    @field_validator("reload", mode="before")
    @classmethod
    def _reload(cls, value: Any) -> int | None:
        if value is None:
            return None
        ms = duration_ms(value)
        if ms < 100:
            raise ValueError(f"reload {value!r} is too often: at least 100ms (or null: off)")
        return ms

    @field_validator("max_future", mode="before")
    @classmethod
    def _future(cls, value: Any) -> int | None:
        return None if value is None else duration_ms(value)

    @field_validator("linger", mode="before")
    @classmethod
    def _linger(cls, value: Any) -> int:
        return duration_ms(value)

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"unit name {value!r} must be 1-64 letters, digits, '_', '.' or '-'"
                " (it is the MQTT client id and the state file's name)"
            )
        return value

    @field_validator("share_group")
    @classmethod
    def _group_shape(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"share_group {value!r} must be 1-64 letters, digits, '_', '.' or '-'")
        return value

    @model_validator(mode="after")
    def _one_way_to_split(self) -> UnitConfig:
        if self.partitions is not None and self.share_group is not None:
            raise ValueError(
                "partitions and share_group both split the devices' traffic between replicas:"
                " keep partitions for a unit with windows, composite streams or rules (each"
                " object's readings stay together), share_group for one without"
            )
        return self

    @classmethod
    def load(cls, path: Path) -> UnitConfig:
        """The config in `path`; paths in it are taken relative to its folder.
        ConfigError lists every problem, each naming the file and the field."""
        source = str(path)
        doc, problem = yaml_mapping(path, "a unit config")
        if problem is not None:
            raise ConfigError([problem])
        base = path.parent
        try:
            config = cls.model_validate(_anchored(doc, base))
        except ValidationError as exc:
            raise ConfigError(validation_problems(exc, source)) from None
        return config.model_copy(
            update={
                "source": source,
                "objects": [base / p for p in config.objects],
                "state_dir": base / config.state_dir if config.state_dir else None,
                "sink": SinkSettings(sqlite=base / config.sink.sqlite) if config.sink else None,
            }
        )

    @property
    def subscription(self) -> str:
        """The device-topic filter, shared between replicas when a group is set."""
        device = self.topics.device_updates_filter
        return f"$share/{self.share_group}/{device}" if self.share_group else device


_FILES = frozenset({"password_file", "tls_ca", "tls_cert", "tls_key"})


def _anchored(doc: Any, base: Path) -> Any:
    """The config with its credential files (at any depth: `mqtt`, `forward.command_mqtt`)
    taken relative to the config's folder, like its other paths."""
    if isinstance(doc, dict):
        return {k: str(base / v) if k in _FILES and isinstance(v, str) and not Path(v).is_absolute()
                else _anchored(v, base) for k, v in doc.items()}  # fmt: skip
    if isinstance(doc, list):
        return [_anchored(v, base) for v in doc]
    return doc


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
