"""Round trips through the real Mosquitto and the real Kafka that the rig starts."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import uuid

import orjson
import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloudlet.rig import Kafka, Mosquitto
from cloudlet.rig.mosquitto import find_mosquitto
from streams import Codec, GeoPoint, Registry, SensorUpdate, TopicScheme, decode, encode_update
from tests.conftest import SERVIOTICY

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

DEVICE = "1396461657731411aa73c28444ecf9a8c803e62312fd1"
SERVIOTICY_UPDATE = {
    "channels": {
        "temperature": {"current-value": 21.5, "unit": "degrees"},
        "location": {"current-value": "41.3879,2.16992"},
    },
    "lastUpdate": 1700000000000,
}


def _subscriber(broker: Mosquitto, topic: str) -> tuple[mqtt.Client, queue.Queue[mqtt.MQTTMessage]]:
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = queue.Queue[bool]()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        c.subscribe(topic, qos=1)  # inside on_connect, so it survives reconnects

    client.on_connect = on_connect
    client.username_pw_set(*broker.credentials or ("", ""))
    client.on_subscribe = lambda *_: subscribed.put(True)
    client.on_message = lambda _c, _u, msg: received.put(msg)
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert subscribed.get(timeout=10)
    return client, received


@pytest.mark.mqtt
def test_paho_round_trip_of_a_servioticy_update(mosquitto: Mosquitto) -> None:
    topics = TopicScheme()
    registry = Registry.load([SERVIOTICY])
    subscriber, received = _subscriber(mosquitto, topics.device_updates_filter)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.username_pw_set(*mosquitto.credentials or ("", ""))
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    try:
        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = "application/json"
        info = publisher.publish(
            topics.device_update(DEVICE, "data"),
            orjson.dumps(SERVIOTICY_UPDATE),
            qos=1,
            properties=properties,
        )
        info.wait_for_publish(timeout=10)
        msg = received.get(timeout=10)
    finally:
        publisher.loop_stop()
        subscriber.loop_stop()
        publisher.disconnect()
        subscriber.disconnect()

    key = topics.parse_device_update(msg.topic)
    assert key == (DEVICE, "data")
    assert msg.qos == 1
    content_type = getattr(msg.properties, "ContentType", None)
    assert content_type == "application/json"
    update = registry.validator(*key).update(decode(msg.payload, content_type))
    assert update == SensorUpdate(
        {"temperature": 21.5, "location": GeoPoint(41.3879, 2.16992)}, 1700000000000
    )


@pytest.mark.mqtt
def test_a_plain_mosquitto_pub_is_enough_to_post_an_update(mosquitto: Mosquitto) -> None:
    mosquitto_pub = find_mosquitto()
    assert mosquitto_pub is not None
    pub = mosquitto_pub.replace("sbin/mosquitto", "bin/mosquitto_pub")
    topic = TopicScheme().device_update(DEVICE, "data")
    subscriber, received = _subscriber(mosquitto, topic)
    try:
        body = '{"channels": {"temperature": {"current-value": 19}}, "lastUpdate": 1700000000}'
        subprocess.run(
            [
                pub,
                "-h",
                mosquitto.host,
                "-p",
                str(mosquitto.port),
                *mosquitto.cli_auth,
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                body,
            ],
            check=True,
            timeout=10,
        )
        msg = received.get(timeout=10)
    finally:
        subscriber.loop_stop()
        subscriber.disconnect()
    update = Registry.load([SERVIOTICY]).validator(DEVICE, "data").update(decode(msg.payload))
    # seconds from an old ServIoTicy-style device become milliseconds
    assert update == SensorUpdate({"temperature": 19}, 1700000000000)


@pytest.mark.kafka
def test_aiokafka_round_trip(kafka: Kafka) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    update = SensorUpdate(
        {"temperature": 21.5, "location": GeoPoint(41.3879, 2.16992)}, 1700000000000
    )
    sent = [encode_update(update, Codec.JSON), encode_update(update, Codec.MSGPACK)]

    async def round_trip() -> list[tuple[bytes | None, bytes]]:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            for body in sent:
                await producer.send_and_wait(topic, body, key=DEVICE.encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka.bootstrap_servers,
            auto_offset_reset="earliest",
            group_id=f"smoke-{topic}",
        )
        await consumer.start()
        try:
            got: list[tuple[bytes | None, bytes]] = []
            async with asyncio.timeout(30):
                async for record in consumer:
                    assert record.value is not None
                    got.append((record.key, record.value))
                    if len(got) == len(sent):
                        return got
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(round_trip())
    assert got == [(DEVICE.encode(), body) for body in sent]
    registry = Registry.load([SERVIOTICY])
    for _, body in got:
        assert registry.validator(DEVICE, "data").update(decode(body)) == update
