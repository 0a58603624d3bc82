"""Codecs: detection, limits, clear errors, and round trips as properties."""

from __future__ import annotations

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import (
    Codec,
    GeoPoint,
    InvalidUpdate,
    RejectReason,
    SensorUpdate,
    ServiceObject,
    decode,
    detect,
    encode_batch,
    encode_update,
)
from streams.codec import columnar_document
from streams.updates import StreamValidator

SO = ServiceObject.model_validate(
    {
        "id": "probe",
        "streams": {
            "s": {
                "channels": {
                    "n": {"type": "number"},
                    "s": {"type": "string"},
                    "b": {"type": "boolean"},
                    "g": {"type": "geo_point"},
                }
            }
        },
    }
)
VALIDATOR = StreamValidator("probe", "s", SO.streams["s"])
DOC = {"channels": {"n": {"current-value": 1.5}}, "lastUpdate": 1_700_000_000_000}


@pytest.mark.parametrize(
    ("payload", "content_type", "codec"),
    [
        (orjson.dumps(DOC), None, Codec.JSON),
        (b"  \n" + orjson.dumps(DOC), None, Codec.JSON),
        (orjson.dumps([DOC]), None, Codec.JSON),
        (msgpack.packb(DOC), None, Codec.MSGPACK),
        (msgpack.packb([DOC]), None, Codec.MSGPACK),
        (msgpack.packb([DOC] * 20), None, Codec.MSGPACK),  # array 16 header 0xdc
        (orjson.dumps(DOC), "application/json; charset=utf-8", Codec.JSON),
        (msgpack.packb(DOC), "application/msgpack", Codec.MSGPACK),
        (msgpack.packb(DOC), "application/x-msgpack", Codec.MSGPACK),
        (msgpack.packb(DOC), "Application/Vnd.Msgpack", Codec.MSGPACK),
        (orjson.dumps(DOC), "text/plain", Codec.JSON),  # sniffed
        (msgpack.packb(DOC), "application/octet-stream", Codec.MSGPACK),  # sniffed
    ],
)
def test_detection(payload: bytes, content_type: str | None, codec: Codec) -> None:
    assert detect(payload, content_type) is codec
    assert decode(payload, content_type) in (DOC, [DOC], [DOC] * 20)


@pytest.mark.parametrize(
    ("payload", "content_type", "reason", "message"),
    [
        (b"", None, RejectReason.MALFORMED, "the message body is empty"),
        (
            b"hello",
            None,
            RejectReason.MALFORMED,
            "the message body is neither a JSON object or array nor a msgpack map or array"
            " (first byte 0x68)",
        ),
        (
            b'{"channels": ',
            None,
            RejectReason.MALFORMED,
            "the body is not valid json: unexpected end of data: line 1 column 14 (char 13)",
        ),
        (
            b"\x81\xa1a",
            None,
            RejectReason.MALFORMED,
            "the body is not valid msgpack: Unpack failed: incomplete input",
        ),
        (
            b"\x81\x01\x02",
            None,
            RejectReason.MALFORMED,
            "the body is not valid msgpack: int is not allowed for map key when"
            " strict_map_key=True",
        ),
        (
            msgpack.packb(DOC) + b"\x01",
            None,
            RejectReason.MALFORMED,
            "the body is not valid msgpack: unpack(b) received extra data.",
        ),
        (
            orjson.dumps(DOC),
            "application/cbor",
            RejectReason.UNSUPPORTED_CONTENT_TYPE,
            "content type 'application/cbor' is not supported (use application/json or"
            " application/msgpack)",
        ),
        (
            b"[" + b" " * 2000 + b"]",
            None,
            RejectReason.OVERSIZED,
            "the message body is 2002 bytes, more than the limit of 1024",
        ),
    ],
)
def test_undecodable_bodies_are_rejected_with_a_reason(
    payload: bytes, content_type: str | None, reason: RejectReason, message: str
) -> None:
    with pytest.raises(InvalidUpdate) as info:
        decode(payload, content_type, max_bytes=1024)
    assert (info.value.reason, str(info.value)) == (reason, message)


def test_encoding_follows_the_servioticy_shape() -> None:
    update = SensorUpdate({"n": 2, "g": GeoPoint(41.5, 2.25), "b": True}, 1_700_000_000_000)
    assert orjson.loads(encode_update(update)) == {
        "channels": {
            "n": {"current-value": 2},
            "g": {"current-value": "41.5,2.25"},
            "b": {"current-value": True},
        },
        "lastUpdate": 1_700_000_000_000,
    }
    assert msgpack.unpackb(encode_update(update, Codec.MSGPACK)) == orjson.loads(
        encode_update(update)
    )
    assert orjson.loads(encode_batch([update, update], columnar=True)) == {
        "lastUpdate": [1_700_000_000_000, 1_700_000_000_000],
        "channels": {"n": [2, 2], "g": ["41.5,2.25", "41.5,2.25"], "b": [True, True]},
    }


def test_columnar_needs_the_same_channels_in_every_update() -> None:
    with pytest.raises(ValueError, match=r"update 1 carries channels \['b'\], the first carries"):
        columnar_document([SensorUpdate({"n": 1}, 1), SensorUpdate({"b": True}, 2)])


# Properties -----------------------------------------------------------------------------------

_numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)
_geo = st.builds(
    GeoPoint,
    st.floats(min_value=-90, max_value=90, allow_nan=False),
    st.floats(min_value=-180, max_value=180, allow_nan=False),
)
_times = st.integers(min_value=100_000_000_000, max_value=253_402_300_799_999)
_updates = st.builds(
    SensorUpdate,
    st.fixed_dictionaries(
        {},
        optional={"n": _numbers, "s": st.text(), "b": st.booleans(), "g": _geo},
    ).filter(bool),
    _times,
)


@settings(max_examples=300, deadline=None)
@given(update=_updates, codec=st.sampled_from(Codec))
def test_single_update_round_trip(update: SensorUpdate, codec: Codec) -> None:
    payload = encode_update(update, codec)
    assert detect(payload) is codec
    assert VALIDATOR.update(decode(payload)) == update


@settings(max_examples=200, deadline=None)
@given(updates=st.lists(_updates, min_size=1, max_size=20), codec=st.sampled_from(Codec))
def test_list_batch_round_trip(updates: list[SensorUpdate], codec: Codec) -> None:
    assert VALIDATOR.document(decode(encode_batch(updates, codec))) == (updates, [])


@settings(max_examples=200, deadline=None)
@given(
    channels=st.sets(st.sampled_from(["n", "s", "b", "g"]), min_size=1),
    data=st.data(),
    codec=st.sampled_from(Codec),
)
def test_columnar_batch_round_trip(channels: set[str], data: st.DataObject, codec: Codec) -> None:
    value = {"n": _numbers, "s": st.text(), "b": st.booleans(), "g": _geo}
    row = st.fixed_dictionaries({name: value[name] for name in sorted(channels)})
    updates = data.draw(st.lists(st.builds(SensorUpdate, row, _times), min_size=1, max_size=20))
    payload = encode_batch(updates, codec, columnar=True)
    assert VALIDATOR.document(decode(payload)) == (updates, [])


@settings(max_examples=500, deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b: b"{" + b, st.binary(max_size=100)),
        st.builds(lambda b: b"\x81" + b, st.binary(max_size=100)),
        st.recursive(
            st.none() | st.booleans() | _numbers | st.text(max_size=10),
            lambda kids: (
                st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4)
            ),
            max_leaves=20,
        ).map(orjson.dumps),
    )
)
def test_any_bytes_either_validate_or_are_rejected_with_a_reason(payload: bytes) -> None:
    """Fuzz: no input escapes as anything but a Rejection."""
    try:
        doc = decode(payload)
    except InvalidUpdate as exc:
        assert exc.reason in RejectReason
        return
    accepted, rejected = VALIDATOR.document(doc)
    assert all(isinstance(u, SensorUpdate) for u in accepted)
    assert all(r.reason in RejectReason and r.message.startswith("probe/s") for r in rejected)
