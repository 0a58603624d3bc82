"""Devices publish in the order they post, whatever the connection does: while connecting, and
across a broker restart while they keep posting (paho alone sends a publish made while it
connects ahead of those it queued, and event-time windows then count the earlier as late)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import orjson
import pytest

from cloudlet.rig import Mosquitto
from edge_objects.fleet import DeviceFleet
from edge_objects.publisher import OrderedPublisher
from edge_objects.sdk import EdgeObject
from streams import SensorUpdate, StreamKey
from streams.transport.mqtt import MqttSettings, connect, make_client

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

T0 = 1_700_000_000_000


class Subscriber:
    """The times of the updates of `topic`, as the broker delivers them."""

    def __init__(self, broker: Mosquitto, topic: str, name: str) -> None:
        self.times: queue.SimpleQueue[int] = queue.SimpleQueue()
        ready = threading.Event()
        self.client = make_client(MqttSettings(url=broker.url), name)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = lambda _c, _u, m: self.times.put(
            orjson.loads(m.payload)["lastUpdate"]
        )
        connect(self.client, MqttSettings(url=broker.url), persistent=True)
        self.client.loop_start()
        assert ready.wait(10)

    def take(self, sent: list[int], timeout: float = 30) -> list[int]:
        """What arrived until every time in `sent` did (at least once: a restart may repeat
        what the broker had not acknowledged yet)."""
        got: list[int] = []
        missing = set(sent)
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            try:
                t = self.times.get(timeout=0.2)
            except queue.Empty:
                continue
            got.append(t)
            missing.discard(t)
        return got

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _first_arrivals(got: list[int]) -> list[int]:
    return list(dict.fromkeys(got))


@pytest.mark.mqtt
def test_updates_posted_while_the_sdk_connects_arrive_in_order(mosquitto: Mosquitto) -> None:
    subscriber = Subscriber(mosquitto, "probe/streams/data", "order-sdk-subscriber")
    try:
        for run in range(8):  # before the fix, about 3 runs in 10 came out of order
            device = EdgeObject("probe", MqttSettings(url=mosquitto.url), client_id=f"p-{run}")
            device.start()  # and post at once, while it connects
            sent = [T0 + run * 10_000 + i for i in range(3_000)]
            try:
                for t in sent:
                    device.publish("data", {"n": 1}, last_update=t)
                got = subscriber.take(sent)
            finally:
                device.stop()
            assert got == sent, f"run {run}: out of order or missing"
    finally:
        subscriber.close()


@pytest.mark.mqtt
def test_a_fleet_keeps_each_device_in_order_while_it_connects(mosquitto: Mosquitto) -> None:
    subscriber = Subscriber(mosquitto, "+/streams/soil", "order-fleet-subscriber")
    try:
        for run in range(5):
            fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id=f"order-fleet-{run}")
            fleet.start()
            sent = [T0 + run * 10_000 + i for i in range(3_000)]
            try:
                for t in sent:
                    fleet.publish(StreamKey("field-1-soil", "soil"), SensorUpdate({"m": 1}, t))
                assert fleet.flush(30)
                got = subscriber.take(sent)
            finally:
                fleet.stop()
            assert got == sent, f"run {run}: out of order or missing"
            assert fleet.sent["update"] == 3_000 and not fleet.refused
    finally:
        subscriber.close()


def test_a_device_posting_through_a_broker_restart_stays_in_order(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", superuser=True).start()
    subscriber = Subscriber(broker, "probe/streams/data", "restart-subscriber")
    device = EdgeObject(
        "probe", MqttSettings(url=broker.url, reconnect_max_delay=1), buffer_limit=100_000
    ).start()
    sent = [T0 + i for i in range(4_000)]
    posted = threading.Event()

    def post() -> None:
        for i, t in enumerate(sent):
            device.publish("data", {"n": 1}, last_update=t)
            if i % 20 == 0:
                time.sleep(0.002)  # a steady device, posting on through the outage
        posted.set()

    try:
        assert device.connected.wait(10)
        poster = threading.Thread(target=post)
        poster.start()
        time.sleep(0.3)
        broker.stop()  # messages in flight, unacknowledged, and more being posted
        time.sleep(0.5)
        broker.start()  # same port, same persistence: both sessions come back
        poster.join(60)
        assert posted.is_set()
        got = subscriber.take(sent, timeout=60)
    finally:
        device.stop()
        subscriber.close()
        broker.stop()
    first = _first_arrivals(got)
    assert sorted(first) == sent, f"{len(sent) - len(first)} updates never arrived"
    assert first == sent  # each update first arrived after every earlier one


def test_the_publisher_refuses_what_mqtt_cannot_carry_and_bounds_its_queue() -> None:
    client = make_client(MqttSettings(url="mqtt://127.0.0.1:1"), "never-connected")
    publisher = OrderedPublisher(client, limit=2)
    with pytest.raises(ValueError, match="'a/#' is not a topic one can publish to"):
        publisher.publish("a/#", b"{}")
    publisher.publish("a/b", b"1")
    publisher.publish("a/b", b"2")  # both wait: never connected
    assert publisher.outstanding == 2
    with pytest.raises(Exception, match="2 messages are waiting for the broker"):
        publisher.publish("a/b", b"3")
