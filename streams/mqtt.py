"""MQTT connection settings shared by devices, processing units and tools, and the paho client
they describe (paho-mqtt v2 callbacks, MQTT v5, reconnect with backoff)."""

from __future__ import annotations

import random
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

_PUBLISH_PROPERTIES: dict[str, Properties] = {}


class MqttSettings(BaseModel):
    """Where the broker is and how to log in. `url` is mqtt://host:port or mqtts://host:port."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    tls_ca: Path | None = None
    tls_insecure: bool = False
    session_expiry: int = Field(
        default=3600, ge=0, description="seconds the broker keeps a persistent session"
    )
    receive_maximum: int = Field(
        default=1000, ge=1, le=65535, description="unacknowledged QoS 1 messages in flight to us"
    )
    reconnect_min_delay: float = Field(default=0.5, gt=0)
    reconnect_max_delay: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                f"broker url {value!r} must look like mqtt://host:1883 or mqtts://host:8883"
            )
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.tls_ca is not None


def make_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """A paho client for the broker of `settings`, not yet connected."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    if settings.tls:
        client.tls_set(
            ca_certs=str(settings.tls_ca) if settings.tls_ca else None,
            cert_reqs=ssl.CERT_NONE if settings.tls_insecure else ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(settings.tls_insecure)
    # Jitter: each client starts its exponential backoff from a random delay in [min, 2 min],
    # so a fleet does not reconnect in lockstep after a broker restart.
    first = settings.reconnect_min_delay * random.uniform(1.0, 2.0)
    client.reconnect_delay_set(
        min_delay=max(1, round(first)),
        max_delay=max(1, int(settings.reconnect_max_delay)),
    )
    client.max_inflight_messages_set(settings.receive_maximum)
    client.max_queued_messages_set(0)  # unlimited: our own callers bound what they hand in
    return client


def connect(client: mqtt.Client, settings: MqttSettings, *, persistent: bool) -> None:
    """Connect asynchronously (the network loop retries until the broker answers).

    `persistent` keeps the session, and the QoS 1 messages queued for it, on the broker across
    disconnects for `session_expiry` seconds.
    """
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = settings.session_expiry if persistent else 0
    properties.ReceiveMaximum = settings.receive_maximum
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=settings.keepalive,
        clean_start=not persistent,
        properties=properties,
    )


def content_type_properties(content_type: str) -> Properties:
    """PUBLISH properties carrying a content type (cached: they are immutable in practice)."""
    cached = _PUBLISH_PROPERTIES.get(content_type)
    if cached is None:
        cached = Properties(PacketTypes.PUBLISH)
        cached.ContentType = content_type
        _PUBLISH_PROPERTIES[content_type] = cached
    return cached


def refused(reason: object) -> bool:
    """Whether a CONNACK reason (paho v2's on_connect argument) refuses the connection: bad
    credentials, not authorised, and so on."""
    return bool(getattr(reason, "is_failure", False))
