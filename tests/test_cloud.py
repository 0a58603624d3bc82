"""Cloud objects: the store on SQLite and on the real PostgreSQL (idempotent writes, latest,
history paging, range and geo search), the REST API with its tokens, the consumer group over
the real Kafka, and the embedded default (outbox straight into the store)."""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from cloud_sync.cloud import CloudService, CloudSettings
from cloud_sync.forwarder import Forwarder
from cloud_sync.outbox import Outbox, OutboxSettings
from cloud_sync.settings import ForwarderSettings
from cloud_sync.store import CloudMessage, CloudStore, SQLiteStore, distance_m, open_store
from cloudlet.rig import Kafka
from streams import SensorUpdate, StreamKey

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

T0 = 1_700_006_400_000
# air stations around Barcelona's centre (41.3851, 2.1734)
STATIONS = {"air-centre": (41.3851, 2.1734), "air-north": (41.4200, 2.1800),
            "air-port": (41.3500, 2.1500), "air-far": (41.6000, 2.5000)}  # fmt: skip


def message(so: str, stream: str, at: int, /, **channels: Any) -> CloudMessage:
    update = {"channels": {c: {"current-value": v} for c, v in channels.items()}, "lastUpdate": at}
    return CloudMessage(f"x-5-{so}-{at}", "site-1", so, stream, at + 5, update)


def test_writes_are_idempotent_and_latest_is_by_event_time(store: CloudStore) -> None:
    a = message("s1", "data", T0, t=1.0)
    b = message("s1", "data", T0 + 10, t=2.0)
    assert store.write([a, b, a]) == 2
    assert store.write([b]) == 0  # a resend after a crash: stored once
    late = message("s1", "data", T0 + 5, t=9.0)  # a replay of something older
    assert store.write([late]) == 1
    assert store.last("s1", "data") == b.update
    assert store.count() == 3
    assert store.objects() == [{"id": "s1", "site": "site-1", "streams": ["data"],
                                "lastUpdate": T0 + 10}]  # fmt: skip


def test_history_pages_through_a_time_range(store: CloudStore) -> None:
    store.write([message("s1", "data", T0 + i, t=float(i)) for i in range(25)])
    store.write([message("s2", "data", T0 + i, t=0.0) for i in range(5)])
    got, cursor, pages = [], None, 0
    while True:
        page = store.history("s1", "data", start=T0 + 3, end=T0 + 20, limit=5, cursor=cursor)
        got += [u["lastUpdate"] - T0 for u in page.updates]
        pages += 1
        if page.next is None:
            break
        cursor = page.next
    assert got == list(range(3, 20)) and pages == 4
    with pytest.raises(ValueError, match="not one this API gave out"):
        store.history("s1", "data", cursor="garbage")


def test_search_by_range_and_by_place(store: CloudStore) -> None:
    for i, (so, (lat, lon)) in enumerate(STATIONS.items()):
        store.write([message(so, "air", T0 + i, pm25=10.0 + 5 * i, location=f"{lat},{lon}")])
    by_range = store.search("air", channel="pm25", minimum=14, maximum=21)
    assert sorted(u["so"] for u in by_range) == ["air-north", "air-port"]
    centre = STATIONS["air-centre"]
    near = store.search("air", channel="location", near=(*centre, 5_000))
    expected = [so for so, p in STATIONS.items() if distance_m(*centre, *p) <= 5_000]
    assert sorted(u["so"] for u in near) == sorted(expected) == ["air-centre", "air-north",
                                                                 "air-port"]  # fmt: skip
    box = store.search("air", channel="location", bbox=(41.37, 2.16, 41.43, 2.19))
    assert sorted(u["so"] for u in box) == ["air-centre", "air-north"]
    assert store.search("air", channel="pm25", minimum=0, objects=["air-far"])[0]["so"] == "air-far"


# the API ---------------------------------------------------------------------------------------


def get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


@pytest.fixture
def api(store: CloudStore) -> Iterator[CloudService]:
    """The API over each store (SQLite, and the real PostgreSQL)."""
    settings = CloudSettings.model_validate({
        "port": 0, "public": ["air-*"], "tokens": [{"token": "farm", "objects": ["field-*"]}],
    })  # fmt: skip
    service = CloudService(settings, store=store).start()
    service.store.write([message("field-1-soil", "soil", T0 + i, moisture=20.0 + i)
                         for i in range(3)])  # fmt: skip
    service.store.write([message("air-centre", "air", T0, pm25=12.0, location="41.3851,2.1734")])
    yield service
    service.stop()


def test_tokens_keep_private_objects_private(api: CloudService) -> None:
    base = api.url
    assert [o["id"] for o in get(f"{base}/objects")[1]] == ["air-centre"]
    assert [o["id"] for o in get(f"{base}/objects", "farm")[1]] == ["air-centre", "field-1-soil"]
    status, body = get(f"{base}/objects/field-1-soil/streams/soil/lastUpdate")
    assert (status, body["error"]) == (404, "no service object 'field-1-soil' (or not yours to"
                                            " read)")  # fmt: skip
    status, body = get(f"{base}/objects/field-1-soil/streams/soil/lastUpdate", "farm")
    assert (status, body["lastUpdate"]) == (200, T0 + 2)
    assert get(f"{base}/objects", "stolen")[0] == 401
    assert get(f"{base}/search/soil?channel=moisture&min=0")[1] == {"updates": []}
    assert len(get(f"{base}/search/soil?channel=moisture&min=21", "farm")[1]["updates"]) == 2


def test_the_api_pages_searches_and_explains(api: CloudService) -> None:
    base = api.url
    status, page = get(f"{base}/objects/field-1-soil/streams/soil?limit=2", "farm")
    assert status == 200 and len(page["updates"]) == 2 and page["next"]
    more = get(f"{base}/objects/field-1-soil/streams/soil?limit=2&cursor="
               f"{urllib.parse.quote(page['next'])}", "farm")[1]  # fmt: skip
    assert [u["lastUpdate"] for u in more["updates"]] == [T0 + 2] and more["next"] is None
    near = get(f"{base}/search/air?channel=location&near=41.39,2.17,1000")[1]["updates"]
    assert [u["so"] for u in near] == ["air-centre"]
    status, body = get(f"{base}/search/air?near=41.39,2.17")
    assert (status, body["error"]) == (400, "near must be 3 comma-separated numbers, got"
                                            " '41.39,2.17'")  # fmt: skip
    assert get(f"{base}/objects/field-1-soil/streams/soil?cursor=zz", "farm")[0] == 400
    assert get(f"{base}/openapi.json")[1]["info"]["title"] == "cloudlet cloud objects"


def test_every_bad_query_is_a_4xx_that_names_the_problem(api: CloudService) -> None:
    base = f"{api.url}/objects/field-1-soil/streams/soil"
    huge = "99999999999999999999"
    status, body = get(f"{base}?from={huge}", "farm")
    assert status == 422 and "from" in str(body) and "less than or equal" in str(body)
    assert get(f"{base}?to=-{huge}", "farm")[0] == 422
    assert get(f"{api.url}/search/soil?from={huge}", "farm")[0] == 422
    assert get(f"{api.url}/search/soil?channel=moisture&min=inf", "farm")[0] == 422
    status, body = get(f"{api.url}/search/air?near=nan,2.17,10")
    assert (status, body["error"]) == (400, "near must be 3 comma-separated numbers, got"
                                            " 'nan,2.17,10'")  # fmt: skip
    cursors = [b'[100000000000000000000, "m"]', orjson.dumps(["t", 5]), b"\xff\xfe", b"[1]"]
    for raw in cursors:
        cursor = urllib.parse.quote(base64.urlsafe_b64encode(raw).decode())
        status, body = get(f"{base}?cursor={cursor}", "farm")
        assert status == 400 and "is not one this API gave out" in body["error"]


# the consumer group and the embedded default -----------------------------------------------------


@pytest.mark.kafka
def test_the_consumer_group_stores_each_record_once(kafka: Kafka, tmp_path: Path) -> None:
    topic = "cloudlet.cloud-test"
    records = [message("s1", "data", T0 + i, t=float(i)) for i in range(50)]

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        for m in [*records, *records[:10]]:  # the forwarder resent ten after a crash
            await producer.send_and_wait(topic, orjson.dumps({
                "messageId": m.message_id, "site": m.site, "so": m.so, "stream": m.stream,
                "enqueued": m.enqueued, "update": m.update}), key=m.so.encode())  # fmt: skip
        await producer.send_and_wait(topic, b'{"not": "a cloudlet record"}')
        await producer.stop()

    asyncio.run(produce())
    settings = CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0,
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": topic},
    })  # fmt: skip
    service = CloudService(settings).start()
    try:
        m = service.metrics

        def handled() -> float:  # each record stored, found a duplicate, or rejected
            return m.stored._value.get() + m.duplicates._value.get() + rejected(service)

        end = time.monotonic() + 60
        while handled() < 61 and time.monotonic() < end:
            time.sleep(0.1)
        assert service.store.count() == 50
        assert service.metrics.duplicates._value.get() == 10
        assert rejected(service) == 1
    finally:
        service.stop()


def rejected(service: CloudService, reason: str | None = None) -> float:
    """Records dead-lettered by the cloud's consumer (of one reason, or all)."""
    samples = service.metrics.rejected.collect()[0].samples
    return sum(
        s.value
        for s in samples
        if s.name.endswith("_total") and reason in (None, s.labels["reason"])
    )


def test_the_embedded_default_drains_the_outbox_into_the_store(tmp_path: Path) -> None:
    outbox = Outbox(OutboxSettings(path=tmp_path / "outbox"))
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    settings = ForwarderSettings.model_validate({"site": "farm", "store": url})
    forwarder = Forwarder(outbox, settings).start()
    outbox.write([(StreamKey("s1", "data"), SensorUpdate({"t": float(i)}, T0 + i))
                  for i in range(100)])  # fmt: skip
    deadline = time.monotonic() + 20
    while outbox.depth() and time.monotonic() < deadline:
        time.sleep(0.05)
    forwarder.stop()
    store = SQLiteStore(tmp_path / "cloud.db")
    assert store.count() == 100 and store.last("s1", "data")["lastUpdate"] == T0 + 99  # type: ignore[index]
    store.close()


def test_cloud_serve_from_the_command_line(tmp_path: Path) -> None:
    import signal
    import subprocess

    from cloudlet.rig.process import free_port
    from tests.test_cli import CLOUDLET, run

    bad = tmp_path / "bad.yaml"
    bad.write_text("store: sqlite:///x.db\ntokens: [{objects: []}]\n")
    done = run("cloud", "serve", str(bad))
    assert done.returncode == 1
    assert f"{bad}: tokens[0].objects: List should have at least 1 item" in done.stderr
    port = free_port()
    good = tmp_path / "cloud.yaml"
    good.write_text(f"store: sqlite:///{tmp_path / 'cloud.db'}\nhttp: {{port: {port}}}\n"
                    "public: ['*']\n")  # fmt: skip
    server = subprocess.Popen([CLOUDLET, "cloud", "serve", str(good)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            try:
                status, body = get(f"http://127.0.0.1:{port}/objects")
                break
            except urllib.error.URLError:
                time.sleep(0.2)
        assert (status, body) == (200, [])
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(20) == 0


@pytest.mark.mqtt
def test_one_machine_runs_the_whole_chain_without_kafka(mosquitto: Any, tmp_path: Path) -> None:
    from cloudlet.unit_file import UnitFile
    from cloudlet.units import CloudletUnit
    from edge_objects.fleet import DeviceFleet
    from streams.transport.mqtt import MqttSettings
    from tests.test_processors import OBJECTS

    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "objects.yaml").write_text(OBJECTS)
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    (tmp_path / "unit.yaml").write_bytes(orjson.dumps({
        "name": "u-embedded", "objects": ["objects/"], "mqtt": {"url": mosquitto.url},
        "outbox": {"path": "outbox"}, "forward": {"site": "laptop", "store": url},
    }))  # fmt: skip
    running = CloudletUnit(UnitFile.load(tmp_path / "unit.yaml")).start()
    fleet = DeviceFleet(MqttSettings(url=mosquitto.url), client_id="fleet-embedded").start()
    cloud = CloudService(CloudSettings.model_validate({"store": url, "port": 0,
                                                       "public": ["*"]})).start()  # fmt: skip
    try:
        assert running.unit.runtime.connected.wait(10)
        for i in range(20):
            fleet.publish(StreamKey("s1", "data"), SensorUpdate({"t": float(i)}, T0 + i))
        deadline = time.monotonic() + 20
        while cloud.store.count() < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, last = get(f"{cloud.url}/objects/s1/streams/data/lastUpdate")
    finally:
        fleet.stop()
        running.stop()
        cloud.stop()
    assert (status, last["lastUpdate"]) == (200, T0 + 19)


def test_a_store_made_before_text_search_gains_it(tmp_path: Path) -> None:
    """A store whose channel_values predate match searches: opened, the column is added,
    and the updates stored from then on are found by their text."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE channel_values (message_id TEXT NOT NULL, so TEXT NOT NULL, stream"
            " TEXT NOT NULL, channel TEXT NOT NULL, last_update BIGINT NOT NULL, num DOUBLE"
            " PRECISION, lat DOUBLE PRECISION, lon DOUBLE PRECISION)"
        )
    store = open_store(f"sqlite:///{path}")
    store.write([message("w1", "weather", T0, sky="Partly cloudy")])
    found = store.search("weather", channel="sky", match="cloudy")
    assert [f["update"]["lastUpdate"] for f in found] == [T0]
    assert store.search("weather", channel="sky", match="rain") == []
    store.close()


def test_the_newest_updates_of_a_stream_for_every_object_in_one_query(store: CloudStore) -> None:
    """What a dashboard chart reads (one query per chart, not one per object): each object's
    newest `limit` updates of the stream, oldest first."""
    t = 1_700_000_000_000
    store.write([
        CloudMessage(f"{so}-{i}", "s", so, "air", 1,
                     {"channels": {"pm25": {"current-value": i}}, "lastUpdate": t + i * 1000})
        for so in ("air-north", "air-south") for i in range(5)
    ] + [CloudMessage("other", "s", "air-north", "traffic", 1,
                      {"channels": {"n": {"current-value": 1}}, "lastUpdate": t})])  # fmt: skip
    got = store.recent_of_stream("air", 3)
    assert sorted(got) == ["air-north", "air-south"]
    assert [u["lastUpdate"] - t for u in got["air-north"]] == [2000, 3000, 4000]
    assert got["air-south"] == store.recent("air-south", "air", 3)
