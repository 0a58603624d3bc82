"""The MQTT v5 frame kernel, pure Python: the specification of `_frames.pyx`.

`split_frames` cuts the bytes a broker sent into packets, a read at a time: PUBLISH packets are
decoded into `Publish` records (topic, payload, QoS, DUP, packet id, content type), the others
are returned raw for the client. Anything malformed raises `FrameError` naming what is wrong;
the client then drops the connection, as MQTT requires (section 4.13), and the broker redelivers.
`publish_frames` and `puback_frames` encode what a unit sends in bulk.
"""

from __future__ import annotations

PUBLISH = 3
MAX_REMAINING = 268_435_455  # the largest remaining length a 4-byte varint can hold
# PUBLISH properties (MQTT v5 section 3.3.2.3): id -> how its value is laid out
_BYTE, _U16, _U32, _VARINT, _STRING, _BINARY, _PAIR = range(7)
PUBLISH_PROPERTIES = {
    0x01: _BYTE,  # payload format indicator
    0x02: _U32,  # message expiry interval
    0x03: _STRING,  # content type
    0x08: _STRING,  # response topic
    0x09: _BINARY,  # correlation data
    0x0B: _VARINT,  # subscription identifier
    0x23: _U16,  # topic alias (refused below: we allow none)
    0x26: _PAIR,  # user property
}


class FrameError(ValueError):
    """A packet from the broker that breaks the MQTT v5 format."""


class Publish:
    """One PUBLISH from the broker, with the time it was read (ms, from the caller's clock).
    Shaped like a `RawMessage`, so ingest takes it as it is."""

    __slots__ = ("content_type", "dup", "packet_id", "payload", "qos", "received_at", "topic")

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        dup: bool,
        packet_id: int,
        content_type: str | None,
        received_at: int,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.dup = dup
        self.packet_id = packet_id
        self.content_type = content_type
        self.received_at = received_at

    def __repr__(self) -> str:
        return (
            f"Publish({self.topic!r}, {len(self.payload)} bytes, qos={self.qos},"
            f" dup={self.dup}, packet_id={self.packet_id})"
        )


def split_frames(
    buf: bytes, received_at: int
) -> tuple[list[Publish], list[tuple[int, int, bytes]], int, int]:
    """(publishes, other packets as (type, flags, body), bytes consumed, bytes the next
    incomplete packet needs in all, or 0 when even its header is incomplete)."""
    publishes: list[Publish] = []
    others: list[tuple[int, int, bytes]] = []
    n = len(buf)
    pos = 0
    while pos < n:
        first = buf[pos]
        length = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= n:
                return publishes, others, pos, 0
            b = buf[i]
            i += 1
            length |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 21:
                raise FrameError("remaining length longer than 4 bytes")
        end = i + length
        if end > n:
            return publishes, others, pos, end - pos
        kind = first >> 4
        if kind == PUBLISH:
            publishes.append(_publish(buf, first & 0x0F, i, end, received_at))
        elif kind == 0:
            raise FrameError("reserved packet type 0")
        else:
            others.append((kind, first & 0x0F, buf[i:end]))
        pos = end
    return publishes, others, pos, 0


def _u16(buf: bytes, i: int, end: int, what: str) -> int:
    if i + 2 > end:
        raise FrameError(f"PUBLISH truncated in its {what}")
    return (buf[i] << 8) | buf[i + 1]


def _varint(buf: bytes, i: int, end: int, what: str) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if i >= end:
            raise FrameError(f"PUBLISH truncated in its {what}")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise FrameError(f"PUBLISH {what} longer than 4 bytes")


def _text(buf: bytes, start: int, stop: int, what: str) -> str:
    try:
        text = buf[start:stop].decode()
    except UnicodeDecodeError as exc:
        raise FrameError(f"PUBLISH {what} is not UTF-8 ({exc.reason})") from None
    if "\x00" in text:
        raise FrameError(f"PUBLISH {what} contains U+0000")
    return text


def _publish(buf: bytes, flags: int, i: int, end: int, received_at: int) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise FrameError("PUBLISH with QoS 3")
    size = _u16(buf, i, end, "topic")
    i += 2
    if i + size > end:
        raise FrameError("PUBLISH truncated in its topic")
    if size == 0:
        raise FrameError("PUBLISH with an empty topic (topic aliases are not accepted)")
    topic = _text(buf, i, i + size, "topic")
    i += size
    packet_id = 0
    if qos:
        packet_id = _u16(buf, i, end, "packet id")
        i += 2
        if packet_id == 0:
            raise FrameError("PUBLISH with QoS > 0 and packet id 0")
    length, i = _varint(buf, i, end, "properties length")
    stop = i + length
    if stop > end:
        raise FrameError("PUBLISH properties longer than the packet")
    content_type = None
    while i < stop:
        prop = buf[i]
        i += 1
        shape = PUBLISH_PROPERTIES.get(prop)
        if shape is None:
            raise FrameError(f"PUBLISH with unknown property 0x{prop:02x}")
        if prop == 0x23:
            raise FrameError("PUBLISH with a topic alias (this client allows none)")
        if shape == _BYTE:
            i += 1
        elif shape == _U16:
            i += 2
        elif shape == _U32:
            i += 4
        elif shape == _VARINT:
            _, i = _varint(buf, i, stop, "subscription identifier")
        else:
            size = _u16(buf, i, stop, "properties")
            i += 2 + size
            if prop == 0x03 and i <= stop:
                content_type = _text(buf, i - size, i, "content type")
            if shape == _PAIR:
                size = _u16(buf, i, stop, "properties")
                i += 2 + size
        if i > stop:
            raise FrameError("PUBLISH properties longer than declared")
    return Publish(topic, buf[stop:end], qos, bool(flags & 8), packet_id, content_type,
                   received_at)  # fmt: skip


def encode_varint(length: int) -> bytes:
    """MQTT's variable byte integer (remaining and property lengths)."""
    out = bytearray()
    while True:
        b = length & 0x7F
        length >>= 7
        out.append(b | 0x80 if length else b)
        if not length:
            return bytes(out)


def publish_frames(
    messages: list[tuple[str, bytes]], qos: int, packet_ids: list[int], properties: bytes
) -> list[bytes]:
    """One PUBLISH packet per (topic, payload); `packet_ids` has one id per message when
    `qos` > 0; `properties` is the encoded property block (without its length)."""
    frames = []
    props = encode_varint(len(properties)) + properties
    for k, (topic, payload) in enumerate(messages):
        name = topic.encode()
        head = len(name).to_bytes(2, "big") + name
        if qos:
            head += packet_ids[k].to_bytes(2, "big")
        size = len(head) + len(props) + len(payload)
        if size > MAX_REMAINING:
            raise FrameError(f"message for {topic} is {size} bytes, over MQTT's limit")
        frames.append(bytes([0x30 | qos << 1]) + encode_varint(size) + head + props + payload)
    return frames


def puback_frames(packet_ids: list[int]) -> bytes:
    """PUBACK (success) for each packet id, in one buffer."""
    return b"".join(b"\x40\x02" + p.to_bytes(2, "big") for p in packet_ids)
