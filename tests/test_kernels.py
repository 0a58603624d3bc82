"""The compiled kernels: loaded when they should be, and the same outputs as their pure-Python
twins (and as the row-by-row path they replace) on random batches."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import InvalidUpdate, SensorUpdate, kernels
from streams.accepted import MessageRun, Shape, Updates
from streams.kernels import _columnar_py, _echo_py
from streams.objects import Stream
from streams.updates import StreamValidator

STREAM = Stream.model_validate({"channels": {
    "t": {"type": "number"}, "label": {"type": "string"}, "on": {"type": "boolean"},
}})  # fmt: skip
T0 = 1_700_006_400_000


def test_the_compiled_kernels_are_in_use_unless_turned_off() -> None:
    if os.environ.get("CLOUDLET_NO_EXTENSIONS") == "1":
        assert not kernels.COMPILED
        assert kernels.columnar_updates is _columnar_py.columnar_updates
        assert kernels.row_updates is _columnar_py.row_updates
        assert kernels.fold_windows.__module__ == "streams.kernels._windows_py"
    else:
        assert kernels.COMPILED, "the compiled kernels did not load: pip install -e . failed?"
        assert kernels.columnar_updates.__module__ == "streams.kernels._columnar"
        assert kernels.row_updates.__module__ == "streams.kernels._columnar"
        assert kernels.split_frames.__module__ == "streams.kernels._frames"
        assert kernels.fold_windows.__module__ == "streams.kernels._windows"


values = st.one_of(
    st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
)  # fmt: skip
times = st.one_of(
    st.integers(T0, T0 + 10**9), st.integers(0, 2 * 10**9), st.floats(0, 2e12),
    st.just(10**18), st.text(max_size=3), st.none(),
)  # fmt: skip


@st.composite
def batches(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(0, 12))
    names = draw(st.lists(st.sampled_from(["t", "label", "on", "x"]), min_size=1, max_size=3,
                          unique=True))  # fmt: skip
    typed = {"t": st.one_of(st.floats(-1e6, 1e6), st.integers(-100, 100)),
             "label": st.text(max_size=4), "on": st.booleans(), "x": values}  # fmt: skip
    column = {name: draw(st.lists(st.one_of(typed[name], values), min_size=n, max_size=n))
              for name in names}  # fmt: skip
    return {"lastUpdate": draw(st.lists(st.one_of(st.integers(T0, T0 + 10**6), times),
                                        min_size=n, max_size=n)), "channels": column}  # fmt: skip


def _row_path(validator: StreamValidator, doc: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    rows = [{"lastUpdate": t,
             "channels": {n: {"current-value": c[i]} for n, c in doc["channels"].items()}}
            for i, t in enumerate(doc["lastUpdate"])]  # fmt: skip
    return validator._each(enumerate(rows))


@settings(max_examples=400, deadline=None)
@given(batches())
def test_compiled_twin_and_row_path_agree(doc: dict[str, Any]) -> None:
    validator = StreamValidator("s1", "data", STREAM)
    compiled = validator.document(doc)
    names = list(doc["channels"])
    if all(n in validator._kinds for n in names):
        twin = _columnar_py.columnar_updates(
            doc["lastUpdate"], names, list(doc["channels"].values()),
            [validator._kinds[n] for n in names], SensorUpdate,
            lambda i: validator.update(validator._row(doc["lastUpdate"], names,
                                                      list(doc["channels"].values()), i), i),
            InvalidUpdate,
        )  # fmt: skip
        assert compiled == twin
    assert compiled == _row_path(validator, doc)


channel_entries = st.one_of(
    st.builds(lambda v: {"current-value": v}, st.one_of(values, st.floats(-1e6, 1e6))),
    st.builds(lambda v: {"current-value": v, "unit": "C"}, st.integers(-5, 5)),
    st.just({}), st.none(), st.integers(),
)  # fmt: skip
row_docs = st.one_of(
    st.fixed_dictionaries({
        "lastUpdate": st.one_of(st.integers(T0, T0 + 10**6), times),
        "channels": st.dictionaries(st.sampled_from(["t", "label", "on", "x"]), channel_entries,
                                    max_size=3),
    }),
    st.fixed_dictionaries({"lastUpdate": st.integers(T0, T0 + 10), "channels": st.just({}),
                           "extra": st.just(1)}),
    values, st.lists(st.integers(), max_size=2),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(row_docs, max_size=8))
def test_row_kernel_compiled_twin_and_validator_agree(docs: list[Any]) -> None:
    """A document the row kernel takes gives the validator's SensorUpdate; the others are left
    to the validator (None), the same in both implementations."""
    validator = StreamValidator("s1", "data", STREAM)
    kinds = [validator.kinds] * len(docs)
    twin = _columnar_py.row_updates(docs, kinds, SensorUpdate)
    assert kernels.row_updates(docs, kinds, SensorUpdate) == twin
    for doc, fast in zip(docs, twin, strict=True):
        if fast is not None:
            assert validator.document(doc) == ([fast], [])


# Whole device messages: the ingest kernel ------------------------------------------------------

SENSORS = """\
id: s1
streams: {data: {channels: {t: {type: number}, label: {type: string}, "on": {type: boolean}}}}
---
id: s2
streams: {data: {channels: {t: {type: number}, where: {type: geo_point}}}}
"""


plain_docs = st.fixed_dictionaries({
    "channels": st.fixed_dictionaries({}, optional={
        "t": st.builds(lambda v: {"current-value": v},
                       st.one_of(st.floats(-1e9, 1e9), st.integers(-(2**63), 2**63 - 1),
                                 st.integers(2**63, 2**64))),
        "label": st.builds(lambda v: {"current-value": v}, st.text(max_size=6)),
        "on": st.builds(lambda v: {"current-value": v}, st.booleans()),
    }),
    "lastUpdate": st.integers(T0 - 10, T0 + 2 * 10**6),
})  # fmt: skip


def _body(draw: Any) -> bytes:
    columnar = st.builds(lambda n: {"lastUpdate": [T0] * n, "channels": {"t": [1.5] * n}},
                         st.integers(0, 2))  # fmt: skip
    doc = draw(st.one_of(plain_docs, row_docs, columnar))
    kind = draw(st.sampled_from(["json", "json", "json", "msgpack", "text", "bytes"]))
    if kind == "msgpack":
        import msgpack

        try:
            return bytes(msgpack.packb(doc))
        except (TypeError, ValueError, OverflowError):
            return b"\x80"
    if kind == "text":
        return draw(st.sampled_from([b"", b" {}", b"{", b'{"lastUpdate": 1e400}', b"[]",
                                     b'{"channels":{"t":{"current-value":NaN}},"lastUpdate":1}',
                                     b'{"channels":{"t":{"current-value":1}},"lastUpdate":'
                                     b"1700006400000,\"lastUpdate\":5}"]))  # fmt: skip
    if kind == "bytes":
        return bytes(draw(st.binary(max_size=20)))
    return _json(doc)


def _json(doc: Any) -> bytes:
    import orjson

    try:
        return bytes(orjson.dumps(doc))
    except TypeError:
        return b"{}"


@st.composite
def hostile(draw: Any) -> Any:
    from processors.ingest import RawMessage

    topic = draw(
        st.sampled_from(
            [
                "s1/streams/data",
                "s2/streams/data",
                "s3/streams/data",
                "s1/streams/nope",
                "s1/data",
                "s1/streams/data/extra",
            ]
        )
    )
    content_type = draw(
        st.sampled_from(
            [
                None,
                "application/json",
                "application/msgpack",
                "application/json; charset=utf-8",
                "text/plain",
            ]
        )
    )
    return RawMessage(topic, _body(draw), content_type, 1)


@st.composite
def good(draw: Any) -> Any:
    from processors.ingest import RawMessage

    form = draw(st.sampled_from(["json", "json", "list", "msgpack"]))
    if form == "msgpack":  # a plain update, or a list of them, in msgpack
        import msgpack

        doc = draw(st.one_of(plain_docs, st.lists(plain_docs, max_size=3)))
        try:
            body = bytes(msgpack.packb(doc))
        except (TypeError, ValueError, OverflowError):
            body = b"\x80"
        content_type = draw(st.sampled_from([None, "application/msgpack"]))
        return RawMessage("s1/streams/data", body, content_type, 1)
    content_type = draw(st.sampled_from([None, "application/json"]))
    doc = draw(st.lists(plain_docs, max_size=3)) if form == "list" else draw(plain_docs)
    return RawMessage("s1/streams/data", _json(doc), content_type, 1)


messages = st.one_of(good(), good(), hostile())


_REGISTRY: list[Any] = []


@settings(max_examples=400, deadline=None)
@given(
    st.lists(messages, max_size=10),
    st.sampled_from([None, 10**6, 0, None]),
    st.sampled_from([20, 70, 2**20, 2**20]),
)
def test_the_ingest_kernel_compiled_twin_and_validator_agree(
    tmp_path_factory: Any, batch: list[Any], max_future: int | None, max_bytes: int
) -> None:
    """A batch through the ingest kernel (compiled, then its twin) gives exactly what the
    validator alone gives: the same updates in the same order, the same dead letters."""
    from processors.ingest import Ingest
    from streams.catalog import Catalog

    if not _REGISTRY:
        folder = tmp_path_factory.mktemp("objects")
        (folder / "sensors.yaml").write_text(SENSORS)
        _REGISTRY.append(Catalog.load([folder]).registry)
    registry = _REGISTRY[0]
    runs = []
    for mode in ("compiled", "twin", "validator"):
        ingest = Ingest(registry, max_payload=max_bytes, max_future_ms=max_future,
                        clock=lambda: T0 / 1000)  # fmt: skip
        real = kernels.ingest_rows
        if mode == "twin":
            kernels.ingest_rows = _columnar_py.ingest_rows
        elif mode == "validator":
            kernels.ingest_rows = lambda messages, *_: ([], [], list(range(len(messages))), [])
        try:
            results = [ingest.batch(batch), ingest.batch(batch)]  # the second: routes known
        finally:
            kernels.ingest_rows = real
        runs.append(
            [
                (
                    r.accepted,
                    [id(o) for o in r.origins],
                    [(d.topic, d.body) for d in r.dead_letters],
                )
                for r in results
            ]
            + [ingest.counts]
        )
    assert runs[0] == runs[1] == runs[2]


ws = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])
json_numbers = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["-0", "0", "01", "-", "1.", ".5", "1e5", "1E+5", "2.5e-3", "-0.0", "1e400",
                     "123456789012345678", "1234567890123456789", "0.1000000000000000055511",
                     "9" * 40 + ".5", "1e", "1e+", "NaN", "Infinity", "0x10", "+1", "1_0"]),
)  # fmt: skip
json_strings = st.one_of(
    st.text(max_size=5).map(lambda s: '"' + s + '"'),  # raw: control characters, quotes
    st.text(max_size=5).map(lambda s: orjson.dumps(s).decode()),  # escaped where needed
    st.sampled_from(['"a\\u00e9"', '"\\"', '"é"', '"\\ud800"', "true", "null", "1"]),
)  # fmt: skip


@st.composite
def json_texts(draw: Any) -> bytes:
    """Text near the plain single-update shape, written by hand: whitespace, key order,
    number and string spellings, escapes, duplicates, extra members, garbage around it."""
    entries = []
    for name in draw(st.lists(st.sampled_from(["t", "label", "on", "x", "t"]), max_size=3)):
        w = [draw(ws) for _ in range(6)]
        value = draw(st.one_of(json_numbers, json_strings, st.sampled_from(["true", "false"])))
        inner = draw(st.sampled_from(['"current-value"', '"current-value"', '"unit"',
                                      '"current-value" : 1, "unit"']))  # fmt: skip
        key = draw(st.sampled_from([f'"{name}"', f'"{name}"', '"t\\u0000"', '"t\\n"']))
        entries.append(f"{w[0]}{key}{w[1]}:{w[2]}{{{w[3]}{inner}{w[4]}:{w[5]}{value}}}")
    channels = "{" + draw(ws) + ",".join(entries) + draw(ws) + "}"
    time = draw(st.one_of(st.integers(T0 - 5, T0 + 5).map(str), json_numbers))
    members = [f'"channels"{draw(ws)}:{draw(ws)}{channels}', f'"lastUpdate":{draw(ws)}{time}']
    members += draw(st.sampled_from([[], [], [], ['"lastUpdate": 5'], ['"extra": 1']]))
    if draw(st.booleans()):
        members.reverse()
    text = draw(ws) + "{" + draw(ws) + ("," + draw(ws)).join(members) + draw(ws) + "}"
    return (text + draw(st.sampled_from(["", "", " \n", "x", "}", "\x00"]))).encode()


@settings(max_examples=1500, deadline=None)
@given(st.lists(json_texts(), min_size=1, max_size=6))
def test_the_ingest_kernel_reads_json_text_exactly_as_orjson(texts: list[bytes]) -> None:
    """The compiled kernel reads the plain shape from the bytes itself; whatever the spelling,
    it must accept exactly what orjson and the row check accept, with the same values."""
    from processors.ingest import RawMessage
    from streams.objects import Stream

    kinds = StreamValidator("s1", "data", Stream.model_validate(
        {"channels": {"t": {"type": "number"}, "label": {"type": "string"},
                      "on": {"type": "boolean"}}})).kinds  # fmt: skip
    routes = {"s1/streams/data": ("s1/data", Shape(kinds))}
    batch = [RawMessage("s1/streams/data", text) for text in texts]
    args = (batch, routes, 1 << 20, None, SensorUpdate, orjson.loads)
    compiled, twin = kernels.ingest_rows(*args), _columnar_py.ingest_rows(*args)
    assert compiled[1:] == twin[1:]  # origins, slow messages, where each part starts
    # the same parts (message runs and rows), holding the same rows in the same columns
    assert [(type(p), len(p)) for p in compiled[0]] == [(type(p), len(p)) for p in twin[0]]
    for a, b in zip(compiled[0], twin[0], strict=True):
        if isinstance(a, MessageRun):
            assert (type(a.times), a.times) == (type(b.times), b.times)
            assert [(type(c), getattr(c, "typecode", None), [repr(v) for v in c])
                    for c in a.columns] == [(type(c), getattr(c, "typecode", None),
                                             [repr(v) for v in c]) for c in b.columns]  # fmt: skip
    rows = [_rows_of(parts) for parts in (compiled[0], twin[0])]
    assert rows[0] == rows[1]
    for (_, a), (_, b) in zip(*rows, strict=True):  # -0.0 == 0.0, and 1 == 1.0
        assert [(k, type(v), repr(v)) for k, v in a.channels.items()] == [
            (k, type(v), repr(v)) for k, v in b.channels.items()
        ]
    # and exactly what orjson and the row check accept, in the message's channel order
    expected = []
    for text in texts:
        if not text.startswith(b"{"):  # the slow path's to read
            continue
        with contextlib.suppress(orjson.JSONDecodeError):
            update = _columnar_py._row(orjson.loads(text), kinds, SensorUpdate)
            if update is not None:
                expected.append(("s1/data", update))
    assert [(k, list(u.channels.items()), u.last_update) for k, u in rows[0]] == [
        (k, list(u.channels.items()), u.last_update) for k, u in expected
    ]


_kind_values = {
    "t": st.one_of(st.floats(-1e9, 1e9).map(repr), st.integers(-1000, 1000).map(str),
                   json_numbers),
    "label": st.text(max_size=4).map(lambda s: orjson.dumps(s).decode()),
    "on": st.sampled_from(["true", "false"]),
    "x": st.just("1"),
}  # fmt: skip


@st.composite
def columnar_texts(draw: Any) -> bytes:
    """Text near the columnar form, written by hand: times and columns of numbers, strings and
    booleans in every spelling, lengths that differ, repeated or unknown channels; most of
    it good, so that the kernel's way is taken."""
    n = draw(st.sampled_from([1, 2, 3, 5, 0]))
    w = draw(ws)
    good_time = st.integers(T0 - 5, T0 + 5).map(str)
    times = [draw(good_time if draw(st.integers(0, 9)) else json_numbers) for _ in range(n)]
    entries = []
    names = draw(st.lists(st.sampled_from(["t", "label", "on", "t", "label", "on", "x"]),
                          min_size=1, max_size=3, unique=draw(st.booleans())))  # fmt: skip
    for name in names:
        length = n if draw(st.integers(0, 9)) else draw(st.sampled_from([n + 1, max(n - 1, 0)]))
        one_type = draw(st.sampled_from([st.floats(-1e9, 1e9).map(repr),
                                         st.integers(-10**18, 10**18).map(str)]))  # fmt: skip
        value = one_type if name == "t" and draw(st.booleans()) else _kind_values[name]
        wild = st.one_of(json_numbers, json_strings, st.sampled_from(["true", "null"]))
        cells = [draw(value if draw(st.integers(0, 15)) else wild) for _ in range(length)]
        entries.append(f'"{name}"{w}:{w}[{w}{("," + w).join(cells)}{w}]')
    members = [f'"lastUpdate":{w}[{",".join(times)}]', '"channels":{' + ",".join(entries) + "}"]
    if draw(st.booleans()):
        members.reverse()
    text = "{" + w + ("," + w).join(members) + w + "}"
    return (text + draw(st.sampled_from(["", "", "", "", "", " ", "x"]))).encode()


@settings(max_examples=1500, deadline=None)
@given(st.lists(columnar_texts(), min_size=1, max_size=4))
def test_the_ingest_kernel_reads_columnar_text_exactly_as_orjson(texts: list[bytes]) -> None:
    """A columnar message read from its bytes into typed columns by the compiled kernel is
    exactly what orjson and the columnar check make of it: the same run, the same types."""
    from processors.ingest import RawMessage
    from streams.accepted import ColumnRun
    from streams.objects import Stream

    kinds = StreamValidator("s1", "data", Stream.model_validate(
        {"channels": {"t": {"type": "number"}, "label": {"type": "string"},
                      "on": {"type": "boolean"}}})).kinds  # fmt: skip
    routes = {"s1/streams/data": ("s1/data", Shape(kinds))}
    batch = [RawMessage("s1/streams/data", text) for text in texts]
    args = (batch, routes, 1 << 20, None, SensorUpdate, orjson.loads)
    compiled, twin = kernels.ingest_rows(*args), _columnar_py.ingest_rows(*args)
    assert compiled[1:] == twin[1:]
    assert [(type(p), len(p)) for p in compiled[0]] == [(type(p), len(p)) for p in twin[0]]
    for a, b in zip(compiled[0], twin[0], strict=True):
        if isinstance(a, ColumnRun):
            assert (type(a.times), a.times, a.names) == (type(b.times), b.times, b.names)
            assert [(type(c), getattr(c, "typecode", None), [repr(v) for v in c])
                    for c in a.columns] == [(type(c), getattr(c, "typecode", None),
                                             [repr(v) for v in c]) for c in b.columns]  # fmt: skip


def _rows_of(parts: list[Any]) -> list[Any]:
    updates = Updates()
    for part in parts:
        updates.add_part(part)
    return updates.rows()


def test_the_kernels_key_state_behaves_as_its_twin() -> None:
    """`kernels.KeyState` (compiled: the kernel's own C structure) has its twin's fields and
    behaviour: a clone shares nothing changed in place, dump/load round trips (fired windows
    sorted), equality by value (across the two types too), idle."""
    from streams.windows.keys import KeyState as Twin

    for cls in {kernels.KeyState, Twin}:
        state = cls()
        assert state.idle() and state.windows == {} and state.fired == set()
        state.windows[(0, 10)] = [1, [2.0, 0.0], None]
        state.windows[(10, 20)] = [3, [4.0, 0.0], 7]
        state.fired.update({(10, 20), (0, 10)})
        state.due.append((20, 10))
        state.next_empty = 0
        copy = state.clone()
        copy.windows[(0, 10)][1][0] = 99.0
        copy.fired.clear()
        assert state.windows[(0, 10)][1][0] == 2.0 and len(state.fired) == 2
        dumped = state.dump()
        assert dumped["fired"] == [[0, 10], [10, 20]]
        again = cls.load(orjson.loads(orjson.dumps(dumped)))
        assert again.dump() == orjson.loads(orjson.dumps(dumped))
        assert not state.idle()
        twin = Twin(state.windows, state.fired, 0, [], 0, [], [(20, 10)], [])
        assert state == twin and twin == state


_finite = st.floats(allow_nan=False, allow_infinity=False)
_echo_values = {
    "number": st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                        st.integers(-(2**63), 2**63 - 1)),
    "string": st.text(st.characters(exclude_categories=("Cs",)), max_size=6),
    "boolean": st.booleans(),
}  # fmt: skip


@st.composite
def echo_parts(draw: Any) -> list[Any]:
    """Parts as the ingest kernel makes them (message runs and column runs, typed or lists,
    channels missing in message runs) and lists of rows, with any value a channel may hold."""
    from array import array

    from streams import StreamKey
    from streams.accepted import ColumnRun, MessageRun

    kinds = draw(st.lists(st.sampled_from(["number", "string", "boolean"]), min_size=1,
                          max_size=3))  # fmt: skip
    names = draw(st.lists(st.text(max_size=4), min_size=len(kinds), max_size=len(kinds),
                          unique=True))  # fmt: skip
    keys = [StreamKey("s1", "data"), StreamKey("s-2", "x y")]
    parts: list[Any] = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 5))
        times = [draw(st.integers(T0 - 10, T0 + 10)) for _ in range(n)]
        form = draw(st.sampled_from(["messages", "columns", "rows"]))
        columns: list[Any] = []
        for kind in kinds:
            floats = kind == "number" and draw(st.booleans())
            value = _finite if floats else _echo_values[kind]
            if form == "messages":
                cells = [draw(st.one_of(st.none(), value)) for _ in range(n)]
                if floats:
                    cells = array("d", [float("nan") if c is None else c for c in cells])
            else:
                ints = kind == "number" and not floats and draw(st.booleans())
                if ints:
                    value = st.integers(-(2**63), 2**63 - 1)
                cells = [draw(value) for _ in range(n)]
                if floats or ints:
                    cells = array("d" if floats else "q", cells)
            columns.append(cells)
        if form == "messages":
            run_keys = [draw(st.sampled_from(keys)) for _ in range(n)]
            parts.append(MessageRun(run_keys, array("q", times), names, columns))
        elif form == "columns":
            parts.append(ColumnRun(keys[0], array("q", times), names, columns))
        else:
            parts.append(ColumnRun(keys[1], times, names, columns).rows())
    return parts


@settings(max_examples=600, deadline=None)
@given(echo_parts(), st.integers(0, 12), st.integers(0, 12))
def test_the_echo_kernel_writes_what_orjson_writes(parts: list[Any], start: int, n: int) -> None:
    """The compiled echo writes a run's updates from its columns: byte for byte what
    `encode_update` (orjson) makes of each row, topics included, for any value."""
    from streams import encode_update

    def topic_of(key: Any) -> str:
        return f"{key.so}/streams/{key.stream}/updates"

    args = (parts, start, start + n)
    compiled = kernels.echo_updates(*args, {}, topic_of, encode_update)
    twin = _echo_py.echo_updates(*args, {}, topic_of, encode_update)
    assert compiled == twin
    assert len(compiled) == max(0, min(start + n, sum(map(len, parts))) - start)
    # per device message: consecutive rows of one message (and stream) as one list
    total = sum(map(len, parts))
    messages = [object() for _ in range(total)]
    origins = [messages[min(i // 3, total - 1)] for i in range(total)]  # 3 rows a message
    by_message = kernels.echo_updates(*args, {}, topic_of, encode_update, origins)
    assert by_message == _echo_py.echo_updates(*args, {}, topic_of, encode_update, origins)
    grouped: list[tuple[str, list[bytes], object]] = []
    for (topic, body), origin in zip(compiled, origins[start : start + n], strict=False):
        if grouped and grouped[-1][0] == topic and grouped[-1][2] is origin:
            grouped[-1][1].append(body)
        else:
            grouped.append((topic, [body], origin))
    assert by_message == [(t, b[0] if len(b) == 1 else b"[" + b",".join(b) + b"]")
                          for t, b, _ in grouped]  # fmt: skip
    # a list ends once it holds max_list bytes: the next row starts another
    for max_list in (1, 60, 200):
        capped = kernels.echo_updates(*args, {}, topic_of, encode_update, origins, False, max_list)
        assert capped == _echo_py.echo_updates(*args, {}, topic_of, encode_update, origins, False,
                                               max_list)  # fmt: skip
        longest = max((len(body) for _, body in compiled), default=0)
        assert all(len(body) <= max_list + longest + 2 for _, body in capped)
        unrolled = [b for _, body in capped for b in _unlisted(body)]
        assert unrolled == [body for _, body in compiled]
    # by stream: consecutive rows of one stream, whatever their message
    by_stream = kernels.echo_updates(*args, {}, topic_of, encode_update, None, True)
    assert by_stream == _echo_py.echo_updates(*args, {}, topic_of, encode_update, None, True)
    stretches: list[tuple[str, list[bytes]]] = []
    for topic, body in compiled:
        if stretches and stretches[-1][0] == topic:
            stretches[-1][1].append(body)
        else:
            stretches.append((topic, [body]))
    assert by_stream == [(t, b[0] if len(b) == 1 else b"[" + b",".join(b) + b"]")
                         for t, b in stretches]  # fmt: skip
    # the batched echo joins a stream's bodies into a list: that is `encode_batch` of them
    from streams.codec import encode_batch

    rows = _rows_of(parts)[start : start + n]
    for key in {k for k, _ in rows}:
        ours = [body for (k, _), (_, body) in zip(rows, compiled, strict=True) if k == key]
        assert b"[" + b",".join(ours) + b"]" == encode_batch([u for k, u in rows if k == key])


def _unlisted(body: bytes) -> list[bytes]:
    """The update documents of an echo body (a list of them, or one)."""
    import orjson

    doc = orjson.loads(body)
    return [orjson.dumps(d) for d in doc] if isinstance(doc, list) else [body]
