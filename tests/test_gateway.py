"""The HTTP ingest gateway over the real Mosquitto: what is accepted reaches the device topic
(and a unit), what is not is answered with its status and reason, dead-lettered and counted."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from cloudlet.demo import scenario_dir
from cloudlet.rig import Mosquitto
from cloudlet.rig.process import free_port
from edge_objects.gateway import Gateway, GatewayConfigError, GatewaySettings
from processors.config import UnitConfig
from processors.unit import Unit
from streams.codec import decode
from tests.test_unit import Collector

IRRIGATION = scenario_dir("irrigation")
T0 = 1_700_006_400_000
FIELD = "field-1-soil/streams/soil"
GOOD = orjson.dumps(
    {"channels": {"moisture": {"current-value": 21.5}, "temperature": {"current-value": 14.0}},
     "lastUpdate": T0}
)  # fmt: skip


def put(gateway: Gateway, path: str, body: bytes, token: str | None = "field-token",
        content_type: str = "application/json") -> tuple[int, dict[str, Any]]:  # fmt: skip
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{gateway.url}/{path}", body, headers, method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def settings(broker_url: str, **extra: Any) -> GatewaySettings:
    return GatewaySettings.model_validate({
        "objects": [IRRIGATION / "objects"], "mqtt": {"url": broker_url}, "port": 0,
        "tokens": [{"token": "field-token", "objects": ["field-*"]},
                   {"token_env": "WEATHER_TOKEN", "objects": ["weather-1"]}],
        "client_id": extra.pop("client_id", "gateway-test"), **extra,
    })  # fmt: skip


@pytest.fixture
def gateway(mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setenv("WEATHER_TOKEN", "weather-token")
    g = Gateway(settings(mosquitto.url)).start()
    assert g.connected.wait(10)
    yield g
    g.stop()


@pytest.fixture
def device_topics(mosquitto: Mosquitto) -> Iterator[Collector]:
    """What arrives on the device topics, decoded whatever the codec."""
    collector = Collector(mosquitto, "collector-gateway")
    collector.client.on_message = lambda _c, _u, m: collector.messages.put(
        (m.topic, decode(m.payload))
    )
    collector.client.subscribe([("+/streams/+", 1)])
    yield collector
    collector.close()


@pytest.mark.mqtt
def test_an_accepted_update_is_on_the_device_topic_as_sent(
    gateway: Gateway, device_topics: Collector
) -> None:
    assert put(gateway, FIELD, GOOD) == (202, {"accepted": 1, "topic": FIELD})
    batch = msgpack.packb([{"channels": {"temperature": {"current-value": 20 + i}},
                            "lastUpdate": T0 + i} for i in range(3)])  # fmt: skip
    status, body = put(gateway, "weather-1/streams/weather", batch, token="weather-token",
                       content_type="application/msgpack")  # fmt: skip
    assert (status, body["accepted"]) == (202, 3)
    device = ("field-1-soil/streams/soil", "weather-1/streams/weather")
    got = device_topics.take(lambda g: len([t for t, _ in g if t in device]) >= 2)
    sent = [(t, b) for t, b in got if t in device]
    assert sent[0] == (FIELD, orjson.loads(GOOD))
    assert sent[1][0] == "weather-1/streams/weather"
    assert [u["lastUpdate"] for u in sent[1][1]] == [T0, T0 + 1, T0 + 2]


@pytest.mark.mqtt
@pytest.mark.parametrize(
    ("path", "body", "token", "content_type", "status", "reason"),
    [
        (FIELD, GOOD, None, "application/json", 401, "unauthorized"),
        (FIELD, GOOD, "weather-token", "application/json", 403, "forbidden"),
        (FIELD, GOOD, "nonsense", "application/json", 403, "forbidden"),
        ("field-9-soil/streams/soil", GOOD, "field-token", "application/json", 404,
         "unknown_object"),
        ("field-1-soil/streams/wind", GOOD, "field-token", "application/json", 404,
         "unknown_stream"),
        ("field-1-soil/streams/irrigate", GOOD, "field-token", "application/json", 409,
         "derived_stream"),
        (FIELD, b'{"channels": {"moisture": {"current-value": "wet"}}, "lastUpdate": 1}',
         "field-token", "application/json", 422, "wrong_type"),
        (FIELD, b"{not json", "field-token", "application/json", 400, "malformed"),
        (FIELD, GOOD, "field-token", "text/csv", 415, "unsupported_content_type"),
        (FIELD, b"[" + b" " * 2_000_000 + b"]", "field-token", "application/json", 413,
         "oversized"),
    ],
)  # fmt: skip
def test_refusals_say_why(
    gateway: Gateway, mosquitto: Mosquitto, path: str, body: bytes, token: str | None,
    content_type: str, status: int, reason: str,
) -> None:  # fmt: skip
    letters = Collector(mosquitto, f"collector-letters-{status}-{reason}")
    try:
        got_status, answer = put(gateway, path, body, token=token, content_type=content_type)
        assert (got_status, answer["error"]) == (status, reason), answer
        assert answer["message"]
        dead = letters.take(lambda g: len(g) >= 1, timeout=1 if status in (401, 403) else 10)
    finally:
        letters.close()
    if status in (401, 403):  # not device data: answered and counted, not dead-lettered
        assert dead == []
    else:
        assert [(d["reason"], d["topic"]) for _, d in dead] == [(reason, f"PUT /{path}")]
    metrics = urllib.request.urlopen(f"{gateway.url}/metrics").read().decode()
    assert f'cloudlet_gateway_requests_total{{status="{status}"}} 1.0' in metrics


@pytest.mark.mqtt
def test_a_unit_takes_what_the_gateway_accepts(
    gateway: Gateway, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    path = tmp_path / "unit.yaml"
    path.write_bytes(orjson.dumps({"name": "u-gateway", "objects": [str(IRRIGATION / "objects")],
                                   "mqtt": {"url": mosquitto.url}}))  # fmt: skip
    unit = Unit(UnitConfig.load(path)).start()
    collector = Collector(mosquitto, "collector-gateway-unit")
    try:
        assert unit.runtime.connected.wait(10)
        assert put(gateway, FIELD, GOOD)[0] == 202
        got = collector.take(lambda g: any(t == f"{FIELD}/updates" for t, _ in g))
    finally:
        collector.close()
        unit.stop()
    assert [b for t, b in got if t == f"{FIELD}/updates"] == [orjson.loads(GOOD)]


def test_without_a_broker_nothing_is_published_and_the_answer_is_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEATHER_TOKEN", "weather-token")
    g = Gateway(settings(f"mqtt://127.0.0.1:{free_port()}", client_id="gateway-nobroker"))
    g.start()
    try:
        status, answer = put(g, FIELD, GOOD)
        assert (status, answer["error"]) == (503, "unavailable")
        big_and_bad = b'{"channels": 1, "x": "' + b"z" * 900_000 + b'"}'
        for _ in range(5):  # answered, but their dead letters do not pile up in paho's queue
            assert put(g, FIELD, big_and_bad)[0] == 400
        metrics = urllib.request.urlopen(f"{g.url}/metrics").read().decode()
        assert "cloudlet_gateway_dead_letters_dropped_total 5.0" in metrics
        assert len(g.client._out_messages) == 0
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{g.url}/readyz")
        assert caught.value.code == 503
        assert urllib.request.urlopen(f"{g.url}/openapi.json").status == 200
    finally:
        g.stop()


def test_a_gateway_without_tokens_must_say_it_is_open(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("objects: [objects/]\nhttp: {port: 8080}\n")
    with pytest.raises(GatewayConfigError) as caught:
        GatewaySettings.load(path)
    assert "no tokens: list tokens" in str(caught.value)
    path.write_text("objects: [objects/]\nallow_anonymous: true\ntokens: [{objects: [a]}]\n")
    with pytest.raises(GatewayConfigError) as caught:
        GatewaySettings.load(path)
    assert str(caught.value) == (
        f"{path}: tokens[0]: a token grant needs exactly one of token or token_env"
    )


@pytest.mark.mqtt
def test_hostile_bodies_are_4xx_with_dead_letters(gateway: Gateway, mosquitto: Mosquitto) -> None:
    letters = Collector(mosquitto, "collector-gateway-letters")
    try:
        deep = (b'{"channels": {"moisture": {"current-value": ' + b"[" * 1000 + b"1"
                + b"]" * 1000 + b'}}, "lastUpdate": 1700006400000}')  # fmt: skip
        status, answer = put(gateway, FIELD, deep)
        assert (status, answer["error"]) == (422, "wrong_type")
        status, answer = put(gateway, FIELD, b"[]")
        assert (status, answer["error"]) == (422, "no_updates")
        status, answer = put(gateway, FIELD, b'{"lastUpdate": [], "channels": {"moisture": []}}')
        assert (status, answer["error"]) == (422, "no_updates")
        got = letters.take(lambda g: len(g) >= 3, timeout=10)
        assert [b["reason"] for _, b in got] == ["wrong_type", "no_updates", "no_updates"]
    finally:
        letters.close()


@pytest.mark.mqtt
def test_a_503_retried_is_published_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker stalls (SIGSTOP): the gateway answers 503, paho still holds the message and
    delivers it once the broker is back; the client's retry of the same body must not make a
    second copy."""
    monkeypatch.setenv("WEATHER_TOKEN", "weather-token")
    broker = Mosquitto(tmp_path / "broker", superuser=True).start()
    g = Gateway(settings(broker.url, client_id="gateway-stall", publish_timeout=1.0)).start()
    device = Collector(broker, "collector-stall")
    device.client.subscribe([("+/streams/+", 1)])
    time.sleep(0.5)
    try:
        assert g.connected.wait(10)
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)
        status, answer = put(g, FIELD, GOOD)
        assert (status, answer["error"]) == (503, "unavailable")
        assert "it will not be published twice" in answer["message"]
        broker.process.send_signal(signal.SIGCONT)
        for _ in range(10):  # the client retries, as told, until it is accepted
            status, answer = put(g, FIELD, GOOD)
            if status == 202:
                break
            assert status == 503
        assert status == 202
        other = GOOD.replace(b"21.5", b"22.5")
        assert put(g, FIELD, other)[0] == 202
        got = device.take(lambda m: len(m) >= 3, timeout=5)
        assert [t for t, _ in got] == [FIELD, FIELD]  # once each
    finally:
        if broker.process is not None:
            broker.process.send_signal(signal.SIGCONT)
        device.close()
        g.stop()
        broker.stop()


@pytest.mark.mqtt
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_turns_red_when_the_gateways_mqtt_thread_dies(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEATHER_TOKEN", "weather-token")
    g = Gateway(settings(mosquitto.url, client_id="gateway-dies", publish_timeout=2)).start()
    try:
        assert g.connected.wait(10) and g.alive
        assert urllib.request.urlopen(f"{g.url}/healthz", timeout=5).status == 200

        def bug(*_: Any) -> None:  # a bug of ours on an acknowledgement: the thread dies
            raise RuntimeError("a bug in on_publish")

        g.client.on_publish = bug
        put(g, FIELD, GOOD)  # its PUBACK reaches the bug (never confirmed: 503 after 2 s)
        deadline = time.monotonic() + 10
        while g.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not g.alive
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"{g.url}/healthz", timeout=5)
        assert answer.value.code == 503 and answer.value.read() == b"the MQTT thread stopped"
        other = GOOD.replace(str(T0).encode(), str(T0 + 1).encode())  # not a retry of the first
        status, body = put(g, FIELD, other)  # refused at once: nothing can reach the broker
        assert status == 503 and "MQTT thread" in body["message"]
    finally:
        g.stop()
