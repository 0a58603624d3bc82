"""MQTT connection settings shared by devices, processing units and tools, and the paho client
they describe (paho-mqtt v2 callbacks, MQTT v5, reconnect with backoff)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

if TYPE_CHECKING:  # paho (and ssl with it: 8 MB) is loaded by what makes a paho client only
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties

_PUBLISH_PROPERTIES: dict[str, Properties] = {}
INSTANCE = "{instance}"


class MqttSettings(BaseModel):
    """Where the broker is and how to log in. `url` is mqtt://host:port or mqtts://host:port;
    credentials may ride in it (mqtt://user:secret@host:port, percent-encoded): they are moved
    to `username` / `password`, so the url that logs print never carries a secret."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(
        default=None, description="read the password from this file (a mounted secret)"
    )
    keepalive: int = Field(default=30, ge=5, le=3600)
    tls_ca: Path | None = None
    tls_insecure: bool = False
    tls_cert: Path | None = Field(
        default=None, description="client certificate (PEM) for brokers that require one"
    )
    tls_key: Path | None = Field(default=None, description="its private key (PEM)")
    session_expiry: int = Field(
        default=3600, ge=0, description="seconds the broker keeps a persistent session"
    )
    receive_maximum: int = Field(
        default=1000, ge=1, le=65535, description="unacknowledged QoS 1 messages in flight to us"
    )
    reconnect_min_delay: float = Field(default=0.5, gt=0)
    reconnect_max_delay: float = Field(default=30.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _password_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("password_file"):
            return data
        if data.get("password") is not None:
            raise ValueError("give password or password_file, not both")
        if INSTANCE in str(data["password_file"]):
            return data  # read once the instance is known: `for_instance`
        path = Path(data["password_file"])
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read password_file {path}: {exc.strerror}") from None
        if not secret:
            raise ValueError(f"password_file {path} is empty")
        return {**data, "password": secret}

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return data
        parts = urlsplit(data["url"])
        if parts.username is None and parts.password is None:
            return data
        data = dict(data)
        host = parts.netloc.rpartition("@")[2]
        data["url"] = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
        if parts.username and data.get("username") is None:
            data["username"] = unquote(parts.username)
        if parts.password is not None and data.get("password") is None:
            data["password"] = unquote(parts.password)
        return data

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                f"broker url {value!r} must look like mqtt://host:1883 or mqtts://host:8883"
                " (credentials may go before the host: mqtt://user:secret@host:1883)"
            )
        return value

    @model_validator(mode="after")
    def _key_with_certificate(self) -> MqttSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: a client certificate and its key")
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return (
            urlsplit(self.url).scheme == "mqtts"
            or self.tls_ca is not None
            or self.tls_cert is not None
        )

    def for_instance(self, instance: str) -> MqttSettings:
        """These settings for one instance of a program (a unit's replica): `{instance}` in
        the username and the password file becomes its name, so that each replica logs in
        with an identity of its own (`username: "{instance}"`, `password_file:
        "secrets/{instance}"`)."""
        if INSTANCE not in (self.username or "") and INSTANCE not in str(self.password_file or ""):
            return self
        data = self.model_dump()
        if self.username is not None:
            data["username"] = self.username.replace(INSTANCE, instance)
        if self.password_file is not None and INSTANCE in str(self.password_file):
            data["password_file"] = Path(str(self.password_file).replace(INSTANCE, instance))
            data["password"] = None
        return MqttSettings.model_validate(data)

    @property
    def who(self) -> str:
        """Whom the broker sees: the username, or the client certificate."""
        if self.username is not None:
            return repr(self.username)
        if self.tls_cert is not None:
            return f"the certificate {str(self.tls_cert)!r}"
        return "an anonymous client"


def refusal(code: int, settings: MqttSettings, client_id: str) -> str:
    """What a CONNACK refusal (MQTT v5 reason code) means, for the person reading the log."""
    if code in (0x86, 0x04):  # bad user name or password (v3: 4)
        return f"the broker refused the credentials of {settings.who}"
    if code in (0x87, 0x05):  # not authorized (v3: 5)
        if settings.username is None and settings.tls_cert is None:
            return (
                "the broker refused an anonymous client: give credentials (mqtt://user:secret@host)"
            )
        return (
            f"the broker refused the credentials of {settings.who} with client id"
            f" {client_id!r} (a wrong secret, a revoked identity, or a client id bound to"
            " another identity)"
        )
    if code == 0x85:
        return f"the broker refused the client id {client_id!r}"
    if code == 0x8A:
        return f"the broker has banned {settings.who}"
    return f"the broker refused the connection: reason 0x{code:02x}"


def make_client(settings: MqttSettings, client_id: str) -> mqtt.Client:
    """A paho client for the broker of `settings`, not yet connected."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    if settings.tls:
        import ssl  # only here: a unit without TLS may run without OpenSSL

        client.tls_set(
            ca_certs=str(settings.tls_ca) if settings.tls_ca else None,
            certfile=str(settings.tls_cert) if settings.tls_cert else None,
            keyfile=str(settings.tls_key) if settings.tls_key else None,
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
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
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
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        cached = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        cached.ContentType = content_type
        _PUBLISH_PROPERTIES[content_type] = cached
    return cached


def refused(reason: object) -> bool:
    """Whether a CONNACK reason (paho v2's on_connect argument) refuses the connection: bad
    credentials, not authorised, and so on."""
    return bool(getattr(reason, "is_failure", False))


def refused_because(reason: object, settings: MqttSettings, client_id: str) -> str:
    """`refusal` for paho v2's on_connect reason."""
    return refusal(int(getattr(reason, "value", 0x80)), settings, client_id)
