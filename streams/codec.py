"""Wire codecs for sensor updates: JSON (orjson) and msgpack, single updates and batches.

Detection, in order:
1. the MQTT v5 / HTTP content type, when present: `application/json` or `application/msgpack`
   (also `application/x-msgpack`, `application/vnd.msgpack`); parameters such as `; charset=`
   are ignored; `text/plain` and `application/octet-stream` fall through to sniffing, any other
   type is refused;
2. otherwise the first byte: JSON bodies start with `{`, `[` or whitespace; msgpack bodies with
   a map or array header (0x80-0x9f, 0xdc-0xdf). Every update is an object or a list, so the two
   never overlap (those JSON bytes are bare integers in msgpack).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import msgpack
import orjson

from streams.rejections import InvalidUpdate, Rejection, RejectReason
from streams.updates import GeoPoint, SensorUpdate, Value

DEFAULT_MAX_PAYLOAD = 1024 * 1024
"""Largest message body accepted by default (1 MiB); larger ones are rejected as oversized."""


class Codec(StrEnum):
    JSON = "json"
    MSGPACK = "msgpack"

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPE[self]


_CONTENT_TYPE = {Codec.JSON: "application/json", Codec.MSGPACK: "application/msgpack"}
_BY_CONTENT_TYPE = {
    "application/json": Codec.JSON,
    "text/json": Codec.JSON,
    "application/msgpack": Codec.MSGPACK,
    "application/x-msgpack": Codec.MSGPACK,
    "application/vnd.msgpack": Codec.MSGPACK,
}
_SNIFF_CONTENT_TYPES = frozenset({"", "text/plain", "application/octet-stream"})
_JSON_FIRST = frozenset(b"{[ \t\r\n")
_MSGPACK_FIRST = frozenset(range(0x80, 0xA0)) | {0xDC, 0xDD, 0xDE, 0xDF}


def _malformed(reason: RejectReason, message: str) -> InvalidUpdate:
    return InvalidUpdate(Rejection(reason, message))


def detect(payload: bytes, content_type: str | None = None) -> Codec:
    """The codec of a message body; InvalidUpdate if it is neither JSON nor msgpack."""
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        codec = _BY_CONTENT_TYPE.get(media)
        if codec is not None:
            return codec
        if media not in _SNIFF_CONTENT_TYPES:
            raise _malformed(
                RejectReason.UNSUPPORTED_CONTENT_TYPE,
                f"content type {content_type!r} is not supported"
                " (use application/json or application/msgpack)",
            )
    if not payload:
        raise _malformed(RejectReason.MALFORMED, "the message body is empty")
    first = payload[0]
    if first in _JSON_FIRST:
        return Codec.JSON
    if first in _MSGPACK_FIRST:
        return Codec.MSGPACK
    raise _malformed(
        RejectReason.MALFORMED,
        f"the message body is neither a JSON object or array nor a msgpack map or array"
        f" (first byte 0x{first:02x})",
    )


def decode(
    payload: bytes, content_type: str | None = None, *, max_bytes: int = DEFAULT_MAX_PAYLOAD
) -> Any:
    """Decode a message body to plain Python values; InvalidUpdate naming what is wrong."""
    if len(payload) > max_bytes:
        raise _malformed(
            RejectReason.OVERSIZED,
            f"the message body is {len(payload)} bytes, more than the limit of {max_bytes}",
        )
    codec = detect(payload, content_type)
    try:
        if codec is Codec.JSON:
            return orjson.loads(payload)
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (orjson.JSONDecodeError, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _malformed(
            RejectReason.MALFORMED, f"the body is not valid {codec.value}: {exc}"
        ) from None


def _wire_value(value: Value) -> Any:
    return value.to_wire() if type(value) is GeoPoint else value


def update_document(update: SensorUpdate) -> dict[str, Any]:
    """A sensor update in the ServIoTicy shape, ready for either codec."""
    return {
        "channels": {
            name: {"current-value": _wire_value(v)} for name, v in update.channels.items()
        },
        "lastUpdate": update.last_update,
    }


def columnar_document(updates: Sequence[SensorUpdate]) -> dict[str, Any]:
    """A batch in the columnar form; every update must carry the same channels."""
    if not updates:
        raise ValueError("a columnar batch needs at least one update")
    names = list(updates[0].channels)
    for i, u in enumerate(updates):
        if u.channels.keys() != updates[0].channels.keys():
            raise ValueError(
                f"update {i} carries channels {list(u.channels)}, the first carries {names};"
                " the columnar form needs the same channels in every update"
            )
    return {
        "lastUpdate": [u.last_update for u in updates],
        "channels": {n: [_wire_value(u.channels[n]) for u in updates] for n in names},
    }


def encode(document: Any, codec: Codec = Codec.JSON) -> bytes:
    if codec is Codec.JSON:
        return orjson.dumps(document)
    return msgpack.packb(document, use_bin_type=True)


def encode_update(update: SensorUpdate, codec: Codec = Codec.JSON) -> bytes:
    return encode(update_document(update), codec)


def encode_batch(
    updates: Sequence[SensorUpdate], codec: Codec = Codec.JSON, *, columnar: bool = False
) -> bytes:
    """A batch as a list of updates, or in the columnar form for high-rate devices."""
    if columnar:
        return encode(columnar_document(updates), codec)
    return encode([update_document(u) for u in updates], codec)
