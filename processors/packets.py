"""The pieces of MQTT v5 packets the unit's client builds and reads itself (the frame kernel
cuts and builds the bulk ones: PUBLISH and PUBACK)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from streams.kernels._frames_py import encode_varint
from streams.transport.mqtt import MqttSettings

if TYPE_CHECKING:
    import ssl

MQTT_MAX_PACKET = 268_435_455 + 5  # the largest remaining length a varint holds, + header


def mqtt_string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_varint(len(body)) + body


def property_block(props: bytes) -> bytes:
    return encode_varint(len(props)) + props


def content_type_property(content_type: str | None) -> bytes:
    """A PUBLISH property block (without its length) carrying `content_type`."""
    return b"" if content_type is None else b"\x03" + mqtt_string(content_type)


def read_properties(body: bytes, i: int) -> tuple[dict[int, Any], int]:
    """The properties at body[i:] of a CONNACK/SUBACK/DISCONNECT: the few we use, by id."""
    length = shift = 0
    while True:
        b = body[i]
        i += 1
        length |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    stop = i + length
    found: dict[int, Any] = {}
    widths = {0x11: 4, 0x21: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x27: 4, 0x13: 2, 0x28: 1,
              0x29: 1, 0x2A: 1, 0x01: 1, 0x02: 4, 0x17: 1, 0x19: 1}  # fmt: skip
    while i < stop:
        prop = body[i]
        i += 1
        if prop in widths:
            w = widths[prop]
            found[prop] = int.from_bytes(body[i : i + w], "big")
            i += w
        elif prop == 0x26:  # user property: two strings
            for _ in range(2):
                i += 2 + int.from_bytes(body[i : i + 2], "big")
        else:  # a string or binary: reason string, assigned client id, response info, ...
            size = int.from_bytes(body[i : i + 2], "big")
            found[prop] = body[i + 2 : i + 2 + size].decode(errors="replace")
            i += 2 + size
    return found, stop


def connect_packet(
    s: MqttSettings,
    client_id: str,
    persistent: bool,
    max_receive_packet: int | None,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """CONNECT: a persistent session (or a clean start), credentials, our receive maximum;
    with `will` (topic, payload), a retained will message, QoS 1 (published by the broker when
    the connection ends without a DISCONNECT: a membership that a dead process leaves)."""
    flags = 0 if persistent else 0x02
    payload = mqtt_string(client_id)
    if will is not None:
        flags |= 0x04 | 0x08 | 0x20  # will, QoS 1, retained
        payload += property_block(b"") + mqtt_string(will[0]) + mqtt_string(will[1])
    if s.username is not None:
        flags |= 0x80
        payload += mqtt_string(s.username)
        if s.password is not None:
            flags |= 0x40
            payload += mqtt_string(s.password.get_secret_value().encode())
    props = (
        b"\x11" + (s.session_expiry if persistent else 0).to_bytes(4, "big")
        + b"\x21" + s.receive_maximum.to_bytes(2, "big")
    )  # fmt: skip
    if max_receive_packet:
        props += b"\x27" + min(max_receive_packet, MQTT_MAX_PACKET).to_bytes(4, "big")
    body = mqtt_string("MQTT") + bytes([5, flags]) + s.keepalive.to_bytes(2, "big")
    return packet(0x10, body + property_block(props) + payload)


def subscribe_packet(subscriptions: Sequence[tuple[str, int]]) -> bytes:
    body = (1).to_bytes(2, "big") + property_block(b"")
    for topic, qos in subscriptions:
        body += mqtt_string(topic) + bytes([qos])
    return packet(0x82, body)


def unsubscribe_packet(topics: Sequence[str], packet_id: int) -> bytes:
    body = packet_id.to_bytes(2, "big") + property_block(b"")
    for topic in topics:
        body += mqtt_string(topic)
    return packet(0xA2, body)


def publish_packet_id(frame: bytes) -> int:
    """The packet id of a QoS 1 PUBLISH packet we built."""
    i = 1
    while frame[i] & 0x80:
        i += 1
    i += 1
    size = int.from_bytes(frame[i : i + 2], "big")
    i += 2 + size
    return int.from_bytes(frame[i : i + 2], "big")


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    import ssl  # loaded only where a connection uses TLS (4.6 MB)

    ca = str(settings.tls_ca) if settings.tls_ca else None
    context = ssl.create_default_context(cafile=ca)
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
