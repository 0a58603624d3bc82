"""The pieces of MQTT v5 packets the unit's client builds and reads itself (the frame kernel
cuts and builds the bulk ones: PUBLISH and PUBACK)."""

from __future__ import annotations

from typing import Any

from streams.kernels._frames_py import encode_varint


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
