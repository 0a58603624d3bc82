"""Hostile input to a running unit over the real Mosquitto: every message a device can send
becomes accepted updates or dead letters carrying its reason and payload (or a bounded
excerpt); the unit stays alive and the next good update goes through."""

from __future__ import annotations

import hashlib
import queue
import random
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from processors.actuation import MAX_REMEMBERED
from processors.config import UnitConfig
from processors.unit import Unit
from streams.rejections import MAX_DEAD_LETTER_PAYLOAD, payload_of
from streams.transport.mqtt import MqttSettings, connect, content_type_properties, make_client

IRRIGATION = scenario_dir("irrigation")
SOIL = "field-1-soil/streams/soil"


class Device:
    """A plain MQTT v5 client that publishes anything with QoS 1 and records what the unit
    publishes back (echoes and dead letters)."""

    def __init__(self, broker: Mosquitto, name: str) -> None:
        self.got: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        ready = threading.Event()
        settings = MqttSettings(url=broker.url)
        self.client = make_client(settings, name)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("+/streams/+/updates", 1), ("cloudlet/dead-letter/#", 1)]
        )
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda _c, _u, m: self.got.put((m.topic, bytes(m.payload)))
        connect(self.client, settings, persistent=False)
        self.client.loop_start()
        assert ready.wait(10)
        self._json = content_type_properties("application/json")

    def send(self, topic: str, payload: bytes, content_type: bool = True) -> None:
        info = self.client.publish(
            topic, payload, qos=1, properties=self._json if content_type else None
        )
        info.wait_for_publish(30)

    def take(
        self, n: int, timeout: float = 30, until: bytes | None = None
    ) -> list[tuple[str, bytes]]:
        """`n` messages, or (with `until`) every message up to one carrying those bytes."""
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            try:
                out.append(self.got.get(timeout=0.2))
            except queue.Empty:
                continue
            if until is not None and until in out[-1][1]:
                # the rest of its batch (dead letters go out after the echoes): until quiet
                while True:
                    try:
                        out.append(self.got.get(timeout=1.0))
                    except queue.Empty:
                        return out
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _good(t: int, moisture: float = 30.0) -> bytes:
    return orjson.dumps({"channels": {"moisture": {"current-value": moisture}}, "lastUpdate": t})


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def unit(mosquitto: Mosquitto, tmp_path: Path) -> Any:
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({
        "name": f"u-hostile-{random.randrange(10**9)}",
        "objects": [str(IRRIGATION / "objects")],
        "mqtt": {"url": mosquitto.url},
        "http": {"port": 0},
    }))  # fmt: skip
    running = Unit(UnitConfig.load(path)).start()
    assert running.runtime.connected.wait(10)
    yield running
    running.stop()


def _letters(got: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(b) for t, b in got if t.startswith("cloudlet/dead-letter/")]


def _echoes(got: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [orjson.loads(b) for t, b in got if t == f"{SOIL}/updates"]  # not derived ones


@pytest.mark.mqtt
def test_each_poison_message_is_a_dead_letter_and_the_unit_goes_on(
    mosquitto: Mosquitto, unit: Unit
) -> None:
    device = Device(mosquitto, "hostile-device")
    now = int(time.time() * 1000)
    deep = (
        b'{"channels": {"moisture": {"current-value": ' + b"[" * 1000 + b"1" + b"]" * 1000
        + b'}}, "lastUpdate": ' + str(now).encode() + b"}"
    )  # fmt: skip
    long_so = "x" * 65_000
    cases: list[tuple[str, bytes, str]] = [
        (SOIL, deep, "wrong_type"),
        ("field-1-valve/actions/a1/status", b'{"id": ["a"], "status": "done", "at": 1}',
         "bad_status_report"),
        ("field-1-valve/actions/a2/status", b'{"id": "a2", "status": "done", "at": "soon"}',
         "bad_status_report"),
        (f"{long_so}/streams/soil", _good(now), "unknown_object"),
        (SOIL, b"[]", "no_updates"),
        (SOIL, b'{"lastUpdate": [], "channels": {"moisture": []}}', "no_updates"),
        (SOIL, _good(now + 86_400_000), "future_timestamp"),
        (SOIL, b"\xff\xfe\x00garbage", "malformed"),
        (SOIL, msgpack.packb({"channels": {"moisture": {"current-value": _nested(200)}},
                              "lastUpdate": now}), "wrong_type"),
    ]  # fmt: skip
    try:
        for i, (topic, payload, reason) in enumerate(cases):
            device.send(topic, payload, content_type=not payload.startswith(b"\x82"))
            device.send(SOIL, _good(now + i))  # the next good update
            got = device.take(2)
            letters, echoes = _letters(got), _echoes(got)
            assert [x["reason"] for x in letters] == [reason], (topic[:60], got)
            assert payload_of(letters[0]) == payload
            assert [e["lastUpdate"] for e in echoes] == [now + i]
            assert unit.runtime.alive
        metrics = _metrics(unit)
        for reason in ("wrong_type", "bad_status_report", "no_updates"):
            rejected = (
                f'cloudlet_updates_rejected_total{{reason="{reason}",unit="{unit.instance}"}}'
            )
            assert f"{rejected} 2.0" in metrics
        assert f'cloudlet_internal_errors_total{{unit="{unit.instance}"}} 0.0' in metrics
    finally:
        device.close()


@pytest.mark.mqtt
def test_the_long_topic_letter_fits_and_names_the_topic(mosquitto: Mosquitto, unit: Unit) -> None:
    device = Device(mosquitto, "hostile-topic")
    topic = "y" * 65_000 + "/streams/soil"
    try:
        device.send(topic, _good(1_700_000_000_000))
        ((letter_topic, body),) = device.take(1)
        assert letter_topic == "cloudlet/dead-letter/_/soil"
        letter = orjson.loads(body)
        assert letter["reason"] == "unknown_object"
        assert letter["topicTruncated"] is True and letter["topicSize"] == len(topic)
        assert letter["topic"] == topic[:1024]
        assert len(letter["message"]) <= 2048
    finally:
        device.close()


@pytest.mark.mqtt
def test_an_oversize_body_is_kept_as_an_excerpt_and_a_huge_one_never_reaches_the_unit(
    mosquitto: Mosquitto, unit: Unit
) -> None:
    device = Device(mosquitto, "hostile-size")
    over = b'{"channels": {"moisture": {"current-value": "' + b"z" * (1024 * 1024) + b'"}}}'
    # over max_payload and its 70,000 bytes of topic, within a site broker's 4 MiB: the broker
    # acknowledges it to the device, so the unit must see it (it announced 1.07 MiB before,
    # and the broker dropped these for it unseen)
    large = b'{"channels": {"moisture": {"current-value": "' + b"y" * (3 << 20) + b'"}}}'
    huge = b"[" + b"1," * (20 * 1024 * 1024) + b"1]"  # 40 MiB: over the unit's packet size
    try:
        for body in (over, large):
            device.send(SOIL, body)
            letters = _letters(device.take(1))
            assert [x["reason"] for x in letters] == ["oversized"]
            letter = letters[0]
            assert letter["payloadTruncated"] is True
            assert letter["payloadSize"] == len(body)
            assert letter["payloadSha256"] == hashlib.sha256(body).hexdigest()
            assert letter["payload"].encode() == body[:MAX_DEAD_LETTER_PAYLOAD]
        for _ in range(3):
            device.send(SOIL, huge)
        device.send(SOIL, _good(1_700_000_000_001))
        echoes = _echoes(device.take(1))
        assert [e["lastUpdate"] for e in echoes] == [1_700_000_000_001]
        assert unit.runtime.alive
        rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])
        assert rss < 1024 * 1024  # kB: the test process, unit included, stays under 1 GiB
    finally:
        device.close()


@pytest.mark.mqtt
def test_forged_status_reports_are_kept_within_bounds(mosquitto: Mosquitto, unit: Unit) -> None:
    device = Device(mosquitto, "hostile-reports")
    n = MAX_REMEMBERED + 500
    try:
        for i in range(n):
            device.client.publish(
                f"field-1-valve/actions/forged-{i}/status",
                orjson.dumps({"id": f"forged-{i}", "status": "done", "at": i}), qos=1,
            )  # fmt: skip
        device.send(SOIL, _good(1_700_000_000_002))
        echoes = _echoes(device.take(1, timeout=60))
        assert [e["lastUpdate"] for e in echoes] == [1_700_000_000_002]
        recent = unit.runtime.actuations.recent(n)
        assert len(recent) == MAX_REMEMBERED
        assert recent[-1]["id"] == f"forged-{n - 1}"
    finally:
        device.close()


def _corpus(seed: int, now: int) -> list[tuple[str, bytes]]:
    """Hostile messages: random bytes, nesting at many depths, every JSON and msgpack type
    in every position of an update, long ids, non-UTF-8."""
    rng = random.Random(seed)
    values: list[Any] = [None, True, False, 0, -1, 2**63, 2**64, -(2**63) - 1, 1.5, 1e308,
                         -1e308, "", "x" * 5000, "é\u2028\U0001f600", [], {}, [1, "a"],
                         {"current-value": 1}, _nested(50), _nested(200)]  # fmt: skip
    out: list[tuple[str, bytes]] = []

    def body(doc: Any) -> list[bytes]:
        encoded = []
        for encode in (orjson.dumps, msgpack.packb):
            try:
                encoded.append(encode(doc))
            except (OverflowError, ValueError, TypeError):
                pass  # not every value has both encodings (orjson: 64-bit integers only)
        return encoded

    for v in values:
        for doc in (
            v,
            {"channels": v, "lastUpdate": now},
            {"channels": {"moisture": v}, "lastUpdate": now},
            {"channels": {"moisture": {"current-value": v}}, "lastUpdate": now},
            {"channels": {"moisture": {"current-value": 20}}, "lastUpdate": v},
            {"channels": {"moisture": {"current-value": 20, "unit": v}}, "lastUpdate": now},
            [{"channels": {"moisture": {"current-value": v}}, "lastUpdate": now}],
            {"channels": {"moisture": [v]}, "lastUpdate": [now]},
        ):
            out.extend((SOIL, b) for b in body(doc))
    for _ in range(40):
        out.append((SOIL, rng.randbytes(rng.randrange(1, 300))))
    for depth in (10, 100, 500, 1000, 1023, 1100):
        deep = b"[" * depth + b"1" + b"]" * depth
        out.append((SOIL, b'{"channels": {"moisture": {"current-value": ' + deep
                    + b'}}, "lastUpdate": ' + str(now).encode() + b"}"))  # fmt: skip
        out.append((SOIL, b"[" * depth + b"]" * depth))
        out.append((SOIL, b"{" + b'"a":{' * depth + b"}" * depth + b"}"))
    out.append(("z" * 3000 + "/streams/soil", _good(now)))
    out.append(("field-1-soil/streams/" + "s" * 3000, _good(now)))
    out.append(("field-1-valve/actions/" + "i" * 3000 + "/status", b'{"id": 1}'))
    return out


@pytest.mark.mqtt
def test_fuzz_every_hostile_message_is_accounted_for(mosquitto: Mosquitto, unit: Unit) -> None:
    device = Device(mosquitto, "hostile-fuzz")
    now = int(time.time() * 1000)
    corpus = _corpus(7, now)
    try:
        for topic, payload in corpus:
            device.client.publish(topic, payload, qos=1)
        device.send(SOIL, _good(now + 1, 33.0))
        got = device.take(10**9, timeout=60, until=b"33.0")
        echoes, letters = _echoes(got), _letters(got)
        assert any(e["lastUpdate"] == now + 1 for e in echoes)  # the next good update
        assert unit.runtime.alive
        # every message is an echo or dead letters carrying it; a few corpus entries are valid
        # (an update dated 1970 is accepted, echoed, and late for the flows' windows)
        carried = Counter((x["topic"], payload_of(x)) for x in letters if x["reason"] != "late")
        missing = [p for t, p in corpus if not carried[t[:1024], p]]
        assert len(missing) == len(echoes) - 1, missing[:5]
        assert all(x["reason"] != "internal_error" for x in letters), [
            x["message"] for x in letters if x["reason"] == "internal_error"
        ]
        data = sum(1 for t, _ in corpus if not t.endswith("/status")) + 1
        _wait_metric(unit, f'cloudlet_messages_received_total{{unit="{unit.instance}"}} {data}.0')
    finally:
        device.close()


def _wait_metric(unit: Unit, line: str, timeout: float = 10) -> None:
    """Counters are updated just after a batch's outputs go out: wait for `line`."""
    deadline = time.monotonic() + timeout
    while line not in _metrics(unit) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in _metrics(unit), [m for m in _metrics(unit).splitlines() if line[:30] in m]


def _metrics(unit: Unit) -> str:
    assert unit.status is not None
    url = f"http://127.0.0.1:{unit.status.port}/metrics"
    return str(urllib.request.urlopen(url).read().decode())


# defined edges of the value model (broker-free) ------------------------------------------------


def test_number_channels_hold_doubles_and_signed_64_bit_integers() -> None:
    from processors.ingest import Ingest, RawMessage
    from streams.catalog import Catalog

    ingest = Ingest(Catalog.load([IRRIGATION / "objects"]).registry, max_future_ms=None)

    def outcome(value: bytes) -> Any:
        body = b'{"channels": {"moisture": {"current-value": %s}}, "lastUpdate": 1700000000000}'
        got = ingest.batch([RawMessage(SOIL, body % value)])
        if got.accepted:
            return got.accepted[0][1].channels["moisture"]
        return got.dead_letters[0].rejection.message.split(": ", 1)[1]

    assert outcome(b"9223372036854775807") == 2**63 - 1
    assert outcome(b"-9223372036854775808") == -(2**63)
    assert outcome(b"9223372036854775808") == (
        "channel 'moisture' expects a number within the signed 64-bit integer range, got"
        " 9223372036854775808 (send larger values as floats)"
    )
    assert outcome(b"1e308") == 1e308
    # beyond 64 bits the JSON decoder reads the nearest double, as JavaScript does
    assert outcome(b"123456789012345678901234567890") == 1.2345678901234568e29
    assert outcome(b'1, "current-value": 2') == 2  # a duplicate key: the last one wins


def test_an_aggregate_past_the_double_range_leaves_its_channel_out() -> None:
    from processors.engine.windows import WindowOperator
    from streams.windows.aggregates import AGGREGATES
    from streams.windows.model import Windowing, WindowResult

    op = WindowOperator(Windowing("tumbling", 1_000), [("avg", AGGREGATES["avg"]),
                                                       ("n", AGGREGATES["count"])])  # fmt: skip
    op.process("k", 0, [1e308, True])
    op.process("k", 1, [1e308, True])
    fired, _ = op.process("k", 1_000, [1.0, True])
    assert fired == [WindowResult("k", 0, 1_000, {"n": 2})]


@pytest.mark.mqtt
def test_a_bug_costs_one_message_as_an_internal_error(
    mosquitto: Mosquitto, unit: Unit, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streams.updates import StreamValidator

    real = StreamValidator.document

    def buggy(self: StreamValidator, doc: Any) -> Any:
        if isinstance(doc, list) and doc and doc[0] == "boom":
            raise KeyError("a bug of ours")
        return real(self, doc)

    monkeypatch.setattr(StreamValidator, "document", buggy)
    device = Device(mosquitto, "hostile-bug")
    try:
        device.send(SOIL, b'["boom"]')
        device.send(SOIL, _good(1_700_000_000_003))
        got = device.take(2)
        letters = _letters(got)
        assert [(x["reason"], x["payload"]) for x in letters] == [("internal_error", '["boom"]')]
        assert letters[0]["message"] == (
            "field-1-soil/soil: the message could not be handled (KeyError: 'a bug of ours')"
        )
        assert [e["lastUpdate"] for e in _echoes(got)] == [1_700_000_000_003]
        # the flows failing on a batch: its messages are dead-lettered, the unit goes on
        engine = unit.runtime.engine
        assert engine is not None
        failing = engine.process
        calls = iter([True])
        monkeypatch.setattr(engine, "process", lambda batch: (
            (_ for _ in ()).throw(RuntimeError("flow bug")) if next(calls, False)
            else failing(batch)))  # fmt: skip
        device.send(SOIL, _good(1_700_000_000_004))
        assert [x["reason"] for x in _letters(device.take(1))] == ["internal_error"]
        device.send(SOIL, _good(1_700_000_000_005))
        assert [e["lastUpdate"] for e in _echoes(device.take(1))] == [1_700_000_000_005]
        assert unit.runtime.alive
        _wait_metric(unit, f'cloudlet_internal_errors_total{{unit="{unit.instance}"}} 2.0')
    finally:
        device.close()


def test_outputs_over_mqtts_limits_become_dead_letters_that_fit(tmp_path: Path) -> None:
    from processors.ingest import Ingest
    from processors.runtime import UnitRuntime
    from streams.catalog import Catalog

    ingest = Ingest(Catalog.load([IRRIGATION / "objects"]).registry)
    runtime = UnitRuntime(ingest, MqttSettings(url="mqtt://127.0.0.1:1"), client_id="u-limits")
    client = runtime._client
    client._server_max_packet = 4096  # as the broker's CONNACK said
    fine = ("a/streams/b/updates", b"x" * 100)
    assert client.publish([fine]) == []
    huge = ("a/streams/b/updates", b"y" * 5000)
    assert client.publish([fine, huge]) == [huge]  # refused, never queued
    topic, body = runtime._unpublishable(*huge)
    letter = orjson.loads(body)
    assert topic == "cloudlet/dead-letter/_/_" and client.sendable(topic, body)
    assert letter["reason"] == "unpublishable"
    assert letter["payloadSize"] == 5000 and letter["payload"] == "y" * 1024
    assert letter["message"] == (
        "an output of 5019 bytes to 'a/streams/b/updates' cannot be published: it is over"
        " MQTT's limits (topics up to 65,535 bytes, packets up to 4096)"
    )
    # a topic over 65,535 bytes is never encoded (its 16-bit length would wrap)
    client._server_max_packet = 0
    assert not client.sendable("t" * 65_536, b"") and client.sendable("t" * 65_000, b"")
    assert client.publish([("t" * 70_000, b"x")]) == [("t" * 70_000, b"x")]
    assert client.refused_publishes == 2 and client.outstanding == 2  # `fine` twice, unsent
