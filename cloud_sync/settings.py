"""The cloud-sync settings a unit file names (`forward:`, the relay's), apart from the parts
they configure: reading a unit's config does not import the forwarder, the command relay or the
registry follower (a unit without cloud sync: 1 MB less at rest); they are imported only when
configured."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from streams.flows.model import duration_ms
from streams.transport.mqtt import MqttSettings
from streams.transport.web import Token


class CommandTopics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    commands: str = "cloudlet.commands"
    status: str = "cloudlet.command-status"


class RelaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    bootstrap_servers: str
    topics: CommandTopics = CommandTopics()
    max_age: int = Field(default=600_000, ge=1000)  # ms

    @field_validator("max_age", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int:
        return duration_ms(value)


class KafkaSettings(BaseModel):
    """Connection and producer settings, passed through to aiokafka."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str
    topic: str = "cloudlet.updates"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    compression: Literal["lz4", "zstd", "gzip", "none"] = "lz4"
    linger_ms: int = Field(default=20, ge=0)
    max_batch_size: int = Field(default=262_144, ge=1024)
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    # lean: content-type and site (the object is the key; the rest is in the document);
    # full: so, stream and message-id too, for consumers that route on headers (each costs
    # about a tenth of the forwarder's throughput)
    headers: Literal["lean", "full"] = "lean"
    # a record larger than this is not sent (Kafka would refuse it, message.max.bytes being
    # 1,048,588 by default, and the forwarder would retry it forever, holding up the records
    # after it): an excerpt goes to the dead-letter topic instead, counted and logged
    max_record_bytes: int = Field(default=1_000_000, ge=1024)
    dead_letter_topic: str = "cloudlet.updates.dead-letter"

    def producer_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "acks": "all",
            "enable_idempotence": True,
            "compression_type": None if self.compression == "none" else self.compression,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_size,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
        return options


class ProvisionSettings(BaseModel):
    """Device identities for the objects the cloud registers for this site: each one's MQTT
    secret derived from the site's key (the cloud holds the same key, `site_keys`) and created
    on the site's broker by its administrator (`admin`: the dynamic security plugin's)."""

    model_config = ConfigDict(extra="forbid")

    site_key: Token
    admin: MqttSettings


class ForwarderSettings(BaseModel):
    """Where the outbox drains: Kafka, or (the embedded default, one machine running the whole
    chain) straight into a cloud-object store (`store: sqlite:///cloud.db`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = "cloudlet"
    kafka: KafkaSettings | None = None
    store: str | None = None
    codec: Literal["json", "msgpack"] = "json"
    batch: int = Field(default=500, ge=1, le=100_000)
    retry_min: float = Field(default=0.5, gt=0)
    retry_max: float = Field(default=30.0, gt=0)
    # with kafka: relay the cloud's commands to this site's devices (cloud_sync/commands.py)
    commands: bool = True
    command_topics: CommandTopics = CommandTopics()
    # a folder kept as the local copy of the fleet's registry (the site's objects), from Kafka;
    # the unit reads it among its objects (hot reload takes each change)
    registry: Path | None = None
    registry_topic: str = "cloudlet.registry"
    # changes made at this site (`cloudlet so add --local`), to the cloud
    registry_changes_topic: str = "cloudlet.registry.changes"
    provision: ProvisionSettings | None = None  # MQTT identities of the registered objects
    command_max_age: int = 600_000  # ms: an older command is refused, not carried out
    # the relay's own MQTT identity (role relay; its username is its client id); default: the
    # unit's settings, which works only on a broker without identities
    command_mqtt: MqttSettings | None = None

    @field_validator("command_max_age", mode="before")
    @classmethod
    def _age(cls, value: Any) -> int:
        return duration_ms(value)

    @model_validator(mode="after")
    def _one_destination(self) -> ForwarderSettings:
        if (self.kafka is None) == (self.store is None):
            raise ValueError("forward needs exactly one of kafka or store")
        return self
