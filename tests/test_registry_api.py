"""The fleet's registry over the cloud's REST API, ServIoTicy's way, on SQLite and on the real
PostgreSQL: a client registers an object (its id made when absent) and gets its API token,
reads, changes and removes it; a bad descriptor is refused with the words of `cloudlet so
validate`, a change that would break another object is refused naming it, and every change is
kept with who made it and when."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_sync.cloud import CloudService, CloudSettings
from cloud_sync.registry import FleetRegistry
from cloud_sync.store import CloudStore
from streams.catalog import Catalog
from tests.test_cli import CLOUDLET
from tests.test_cloud import T0, message

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

PROBE = {"name": "soil probe", "streams": {"soil": {"channels": {"moisture": {"type": "number"}}}}}


@pytest.fixture
def cloud(store: CloudStore) -> Iterator[CloudService]:
    """The API over each store (`store`: SQLite, and the real PostgreSQL), registry empty."""
    FleetRegistry(store)
    with store._transaction() as cur:  # a clean slate per test
        cur.execute("DELETE FROM registry")
        cur.execute("DELETE FROM registry_audit")
        cur.execute("DELETE FROM registry_site_changes")
    settings = CloudSettings.model_validate({"port": 0, "tokens": [
        {"token": "ops-secret", "objects": ["*"], "register": ["*"], "name": "ops"},
        {"token": "field-secret", "objects": ["field-*"], "register": ["field-*"]},
        {"token": "reader", "objects": ["*"]},
    ]})  # fmt: skip
    service = CloudService(settings, store=store).start()
    yield service
    service.stop()


def call(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, orjson.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, orjson.loads(raw) if raw else None


def test_a_client_registers_reads_changes_and_removes_an_object(cloud: CloudService) -> None:
    base = cloud.url
    assert call("POST", f"{base}/", None, PROBE)[0] == 401
    assert call("POST", f"{base}/", "reader", PROBE)[0] == 403
    assert call("POST", f"{base}/", "field-secret", PROBE)[0] == 403  # an id yet to be made

    status, made = call("POST", f"{base}/", "ops-secret", PROBE)  # ServIoTicy's create
    assert status == 201 and made["version"] == 1 and len(made["id"]) == 32
    so, token = made["id"], made["api_token"]
    status, descriptor = call("GET", f"{base}/{so}", token)  # its own token reads it
    assert (status, descriptor) == (200, {"id": so, **PROBE})
    assert call("GET", f"{base}/", "reader") == (200, [so])
    assert call("GET", f"{base}/", None) == (200, [])  # nothing public

    changed = {
        **PROBE,
        "streams": {
            "soil": {
                "channels": {"moisture": {"type": "number"}, "temperature": {"type": "number"}}
            }
        },
    }
    assert call("PUT", f"{base}/{so}", token, changed) == (200, {"id": so, "version": 2})
    assert call("PUT", f"{base}/{so}", "reader", changed)[0] == 403
    assert call("GET", f"{base}/{so}", "reader")[1]["streams"] == changed["streams"]

    assert call("DELETE", f"{base}/{so}", "ops-secret") == (204, None)
    assert call("GET", f"{base}/{so}", "ops-secret")[0] == 404
    status, history = call("GET", f"{base}/{so}/history", "ops-secret")
    assert status == 200
    assert [(h["version"], h["action"], h["by"]) for h in history] == [
        (1, "create", "ops"),
        (2, "update", f"so {so}"),
        (3, "delete", "ops"),
    ]
    assert all(isinstance(h["at"], int) for h in history)
    assert history[1]["descriptor"] == {"id": so, **changed} and history[2]["descriptor"] is None


def test_a_bad_descriptor_is_refused_with_the_validators_words(
    cloud: CloudService, tmp_path: Path
) -> None:
    bad = {"id": "field-9", "streams": {"soil": {"channels": {"moisture": {"type": "bogus"}}}}}
    status, body = call("POST", f"{cloud.url}/", "field-secret", bad)
    (tmp_path / "field-9.json").write_bytes(orjson.dumps(bad))  # what the files would say
    _, problems = Catalog.check([tmp_path])
    said = [str(p).split(": ", 1)[1] for p in problems]  # `cloudlet so validate`, no file
    assert (status, body["problems"]) == (422, said) and said
    assert call("GET", f"{cloud.url}/field-9", "ops-secret")[0] == 404
    assert call("POST", f"{cloud.url}/", "ops-secret", [1, 2])[0] == 422
    assert call("POST", f"{cloud.url}/", "field-secret", {**PROBE, "id": "air-1"})[0] == 403


def test_a_change_that_breaks_another_object_is_refused(cloud: CloudService) -> None:
    base = cloud.url
    assert call("POST", f"{base}/", "ops-secret", {"id": "gauge", **{"streams": {
        "rain": {"channels": {"mm": {"type": "number"}}}}}})[0] == 201  # fmt: skip
    reader = {
        "id": "field-1",
        "groups": {"rain": {"soIds": ["gauge"], "stream": "rain"}},
        "streams": {
            "wet": {"channels": {"now": {"type": "boolean", "current-value": "rain.mm > 0"}}}
        },
    }
    assert call("POST", f"{base}/", "ops-secret", reader)[0] == 201
    assert call("POST", f"{base}/", "ops-secret", {"id": "gauge", **PROBE})[0] == 409
    status, body = call("DELETE", f"{base}/gauge", "ops-secret")
    assert status == 409 and body["problems"]
    assert all(
        p.startswith("this change would break another object: so 'field-1'")
        for p in body["problems"]
    ), body
    renamed = {"id": "gauge", "streams": {"rainfall": {"channels": {"mm": {"type": "number"}}}}}
    assert call("PUT", f"{base}/gauge", "ops-secret", renamed)[0] == 409
    assert call("GET", f"{base}/gauge", "reader")[1]["streams"] == {
        "rain": {"channels": {"mm": {"type": "number"}}}}  # fmt: skip


def test_cloudlet_so_add_update_rm_use_the_api(cloud: CloudService, tmp_path: Path) -> None:
    env = {**os.environ, "CLOUDLET_CLOUD": cloud.url, "OPS": "ops-secret"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLOUDLET, "so", *args, "--token-env", "OPS"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    probe = tmp_path / "field-7.yaml"
    probe.write_text("id: field-7\nstreams: {soil: {channels: {moisture: {type: number}}}}\n")
    added = cli("add", str(probe))
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines()[0] == "registered field-7 (version 1)"
    assert added.stdout.splitlines()[1].startswith("api token: ")
    probe.write_text("id: field-7\nstreams: {soil: {channels: {moisture: {type: bogus}}}}\n")
    refused = cli("update", str(probe))
    assert refused.returncode == 1
    assert "so 'field-7': streams.soil.channels.moisture.type: channel type 'bogus'" in (
        refused.stderr)  # fmt: skip
    assert cli("rm", "field-7").stdout == "removed field-7\n"
    history = cli("history", "field-7").stdout.split()
    assert history[2::4] == ["create", "delete"] and history[3::4] == ["ops", "ops"]


def test_servioticy_data_paths_read_what_the_cloudlets_forwarded(cloud: CloudService) -> None:
    """A ServIoTicy client, in its order: create, (its updates reach the cloud from its site),
    read the last update, read the stream, search it, with the object's own bare token."""
    base = cloud.url
    station = {"id": "air-7", "streams": {"air": {"channels": {
        "pm25": {"type": "number"}, "location": {"type": "geo_point"}}}}}  # fmt: skip
    token = call("POST", f"{base}/", "ops-secret", station)[1]["api_token"]
    cloud.store.write([message("air-7", "air", T0 + i, pm25=10.0 + i, location="41.3851,2.1734")
                       for i in range(5)])  # fmt: skip

    def servioticy(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = orjson.dumps(body) if body is not None else None
        request = urllib.request.Request(
            f"{base}{path}", data=data, method=method, headers={"Authorization": token}
        )  # ServIoTicy's form
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())

    status, last = servioticy("GET", "/air-7/streams/air/lastUpdate")
    assert (status, last["lastUpdate"], last["channels"]["pm25"]) == (
        200, T0 + 4, {"current-value": 14.0})  # fmt: skip
    assert [u["lastUpdate"] for u in servioticy("GET", "/air-7/streams/air")[1]["data"]] == [
        T0 + i for i in range(5)]  # fmt: skip
    searches = [
        ({"numericrange": True, "numericrangefield": "channels.pm25.current-value",
          "rangefrom": 11, "rangeto": 12}, [T0 + 2, T0 + 1]),
        ({"timerange": True, "rangefrom": T0 + 3, "rangeto": T0 + 4}, [T0 + 4, T0 + 3]),
        ({"geodistance": True, "pointlat": 41.39, "pointlon": 2.17, "geodistancevalue": 2,
          "geodistanceunit": "km"}, [T0 + i for i in range(4, -1, -1)]),
        ({"geodistance": True, "pointlat": 41.6, "pointlon": 2.5, "geodistancevalue": 2}, []),
        ({"geoboundingbox": True, "geoboxupperleftlat": 41.4, "geoboxupperleftlon": 2.1,
          "geoboxbottomrightlat": 41.3, "geoboxbottomrightlon": 2.2},
         [T0 + i for i in range(4, -1, -1)]),
    ]  # fmt: skip
    for body, want in searches:
        status, found = servioticy("POST", "/air-7/streams/air/search", body)
        assert [u["lastUpdate"] for u in found["data"]] == want, body
    assert call("POST", f"{base}/air-7/streams/air/search", "reader", {"bogus": True})[0] == 400
    assert call("POST", f"{base}/air-7/streams/air/search", "reader", {"match": True})[0] == 400
    assert call("GET", f"{base}/air-7/streams/air/lastUpdate", None)[0] == 404  # not public


def test_a_body_too_large_is_refused_and_never_held(cloud: CloudService) -> None:
    huge = {"id": "field-big", "description": "x" * (1 << 20), **PROBE}
    assert call("POST", f"{cloud.url}/", None, huge)[0] == 413  # read (bounded) before all
    status, body = call("POST", f"{cloud.url}/", "ops-secret", huge)
    assert (status, body["error"]) == (413, "the body is over 1048576 bytes")
    assert call("GET", f"{cloud.url}/field-big", "ops-secret")[0] == 404


def test_a_servioticy_client_works_unchanged_create_post_read_search(
    cloud: CloudService,
) -> None:
    """ServIoTicy's calls in its order, its bodies and its bare Authorization header: create
    (no id: one is made), post sensor updates (PUT, one and a batch), read the last update,
    search; a bad update is refused naming the channel, and a resend is stored once."""
    base = cloud.url

    def servioticy(method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"{base}{path}", data=orjson.dumps(body) if body is not None else None,
            method=method, headers={"Authorization": key, "Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                return response.status, orjson.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read() or b"null")

    channels = {"temperature": {"type": "number", "unit": "C"}, "sky": {"type": "string"}}
    status, made = servioticy("POST", "/", "ops-secret", {
        "name": "weather", "streams": {"weather": {"channels": channels}}})  # fmt: skip
    assert status == 201 and len(made["id"]) == 32
    so, key = made["id"], made["api_token"]
    one = {"channels": {"temperature": {"current-value": 21.5}}, "lastUpdate": T0}
    assert servioticy("PUT", f"/{so}/streams/weather", key, one) == (202, {"stored": 1})
    batch = [{"channels": {"temperature": {"current-value": 22.0 + i},
                           "sky": {"current-value": "clear"}}, "lastUpdate": T0 + 1000 * i}
             for i in (1, 2)]  # fmt: skip
    assert servioticy("PUT", f"/{so}/streams/weather", key, batch) == (202, {"stored": 2})
    assert servioticy("PUT", f"/{so}/streams/weather", key, one) == (202, {"stored": 0})
    status, last = servioticy("GET", f"/{so}/streams/weather/lastUpdate", key)
    assert (status, last) == (200, {"channels": {"temperature": {"current-value": 24.0},
                                                 "sky": {"current-value": "clear"}},
                                    "lastUpdate": T0 + 2000})  # fmt: skip
    status, found = servioticy("POST", f"/{so}/streams/weather/search", key, {
        "numericrange": True, "numericrangefield": "channels.temperature.current-value",
        "rangefrom": 21, "rangeto": 23})  # fmt: skip
    assert [u["lastUpdate"] for u in found["data"]] == [T0 + 1000, T0]
    match = {"match": True, "matchfield": "channels.sky.current-value", "matchstring": "CLEAR"}
    status, found = servioticy("POST", f"/{so}/streams/weather/search", key, match)
    assert [u["lastUpdate"] for u in found["data"]] == [T0 + 2000, T0 + 1000]
    status, found = servioticy("POST", f"/{so}/streams/weather/search", key,
                               {**match, "limit": True, "limitcount": 1})  # fmt: skip
    assert [u["lastUpdate"] for u in found["data"]] == [T0 + 2000]
    for literal in ("%", "_", "cl_ar"):  # LIKE's characters are matched as themselves
        status, found = servioticy("POST", f"/{so}/streams/weather/search", key,
                                   {**match, "matchstring": literal})  # fmt: skip
        assert (status, found["data"]) == (200, [])
    status, refused = servioticy("PUT", f"/{so}/streams/weather", key, {
        "channels": {"temperature": {"current-value": "warm"}}, "lastUpdate": T0 + 5})  # fmt: skip
    assert status == 422 and "temperature" in refused["problems"][0]
    assert servioticy("PUT", f"/{so}/streams/nope", key, one)[0] == 404
    assert servioticy("PUT", f"/{so}/streams/weather", "reader", one)[0] == 403
    assert servioticy("PUT", f"/{so}/streams/weather", "nobody", one)[0] == 401
    assert servioticy("GET", f"/{so}/streams/weather", key)[1]["data"][0] == one


def test_a_change_that_would_break_a_flow_or_a_rule_is_refused_naming_it(
    store: CloudStore,
) -> None:
    """With the fleet's flow files (`flows`), the irrigation site's objects registered: what
    would break a flow's aggregates, its `from`, or a group reading the object is refused."""
    import yaml

    irrigation = Path(__file__).resolve().parent.parent / "cloudlet/scenarios/irrigation/objects"
    FleetRegistry(store)
    with store._transaction() as cur:
        for table in ("registry", "registry_audit", "registry_site_changes", "registry_mqtt"):
            cur.execute(f"DELETE FROM {table}")
    settings = CloudSettings.model_validate({"port": 0, "flows": [
        str(irrigation / "irrigation.flows.yaml")], "tokens": [
        {"token": "ops-secret", "objects": ["*"], "register": ["*"], "name": "ops"}]})  # fmt: skip
    service = CloudService(settings, store=store).start()
    try:
        docs = [
            d
            for f in sorted(irrigation.glob("*.yaml"))
            if not f.name.endswith(".flows.yaml")
            for d in yaml.safe_load_all(f.read_text())
        ]
        # what the fields' groups and the rule read, first
        docs.sort(key=lambda d: (d["id"].endswith("-soil"), d["id"]))
        for doc in docs:
            status, made = call("POST", f"{service.url}/", "ops-secret", doc)
            assert status == 201, (doc["id"], made["problems"])
        soil = call("GET", f"{service.url}/field-1-soil", "ops-secret")[1]
        dry = {**soil, "streams": {**soil["streams"], "soil": {"channels": {
            "temperature": {"type": "number"}}}}}  # fmt: skip
        status, refused = call("PUT", f"{service.url}/field-1-soil", "ops-secret", dry)
        assert status == 422
        assert ("this change would break a flow: flows.soil-moisture-10min.aggregates.moisture:"
                " on field-1-soil/soil: unknown channel 'moisture'") in " ".join(
                    refused["problems"])  # fmt: skip
        status, refused = call("DELETE", f"{service.url}/rain-gauge-1", "ops-secret")
        assert status == 409
        assert refused["problems"][0] == (
            "this change would break a flow: flows.rain-last-hour"
            ".from: from rain-gauge-1/rain matches no stream"
        )
        assert (
            "this change would break another object: so 'field-2-soil': groups.rain.soIds[0]:"
            " unknown service object 'rain-gauge-1'"
        ) in refused["problems"]
        assert call("GET", f"{service.url}/rain-gauge-1", "ops-secret")[0] == 200  # still there
        status, refused = call("DELETE", f"{service.url}/field-1-valve", "ops-secret")
        assert (status, refused["problems"]) == (409, [
            "this change would break a rule: rules.water-dry-fields.act: on field-1-soil/irrigate:"
            " unknown service object 'field-1-valve'"])  # fmt: skip
        # a change that breaks nothing is taken
        wetter = {**soil, "name": "Field 1 soil probe (moved)"}
        assert call("PUT", f"{service.url}/field-1-soil", "ops-secret", wetter)[0] == 200
    finally:
        service.stop()
