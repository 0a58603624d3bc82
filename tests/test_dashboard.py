"""The dashboard in headless Chromium: during a demo run the charts show data (as the charting
library holds it: series, marks and their labels), the health table and its rates show the
unit, the actuators, the plan and the latest values are there, and a screenshot is saved
(test-logs/screenshots/); alarms and their buttons; a command sent with a button, followed to
its final status; the token the page is signed in with."""

from __future__ import annotations

import html
import json
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cloudlet.demo import Demo, DemoSettings
from cloudlet.rig import Kafka, Mosquitto
from cloudlet.rig.browser import browser_page, rendered_dom, screenshot
from edge_objects.sdk import EdgeObject
from streams.transport.mqtt import MqttSettings
from tests.conftest import ROOT

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only


def _charts(dom: str) -> list[tuple[int, int, list[dict[str, object]]]]:
    """Each chart card: its points, its marks, and the series the chart library holds."""
    cards = re.findall(r'<div class="card chart" data-points="(\d+)" data-marks="(\d+)"'
                       r' data-drawn="([^"]*)">', dom)  # fmt: skip
    return [(int(p), int(m), json.loads(html.unescape(d))) for p, m, d in cards]


def _attribute(dom: str, element: str, name: str) -> str:
    found = re.search(rf'id="{element}"[^>]* data-{name}="([^"]*)"', dom)
    assert found is not None, f"no data-{name} on #{element}"
    return html.unescape(found.group(1))


@pytest.mark.mqtt
@pytest.mark.parametrize(("scenario", "speed"), [("irrigation", 3000.0), ("smart-city", 600.0)])
def test_the_dashboard_draws_live_charts(
    mosquitto: Mosquitto, tmp_path: Path, scenario: str, speed: float
) -> None:
    demo = Demo(DemoSettings(scenario, mosquitto.url, rate=10, speed=speed, faults=0.0,
                             steps=80, port=0, workdir=tmp_path / "demo"),
                progress=lambda _text: None)  # fmt: skip
    demo.start()
    assert demo.cloud is not None
    runner = threading.Thread(target=demo.run, args=(lambda: False, lambda: None))
    try:
        runner.start()
        deadline = time.monotonic() + 30
        while demo._stored() < 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        dom = rendered_dom(f"{demo.cloud.url}/")  # while devices keep reporting
        saved = ROOT / "test-logs" / "screenshots" / f"dashboard-{scenario}.png"
        shot = screenshot(f"{demo.cloud.url}/", saved)
    finally:
        runner.join(60)
        demo.stop()
    charts = _charts(dom)
    assert len(charts) == 4, dom[:2000]
    assert charts[0][0] > 0 and charts[1][0] > 0  # the first charts have lines
    lines = [s for s in charts[0][2] if s["points"]]
    assert len(lines) >= 2 and all(isinstance(s["name"], str) for s in lines), charts[0][2]
    assert "data-refreshed" in dom and "data-error" not in dom
    assert re.search(rf"<td>{scenario}-unit-[0-9-]+</td><td>yes</td>", dom)
    rates = json.loads(_attribute(dom, "rates", "series"))
    assert rates == ["received/s", "accepted/s", "forwarded/s"], rates  # one unit
    assert int(_attribute(dom, "latest-rows", "rows")) >= 4
    if scenario == "irrigation":  # its valves have buttons; its weather station a geo_point
        assert _attribute(dom, "actuator-rows", "actuators") == "4"
        places = json.loads(_attribute(dom, "plan-plot", "places"))
        assert places == [*(f"field-{i}-soil" for i in range(1, 5)), "weather-1"], places
        assert len(re.findall(r'<tr class="actuator"><td>field-\d-valve</td>', dom)) == 4
    assert shot.stat().st_size > 20_000  # a picture with something drawn, not a blank page


def test_device_strings_are_text_in_the_operators_browser(tmp_path: Path) -> None:
    """A parking bay whose zone is markup: the legend shows it as text, no element is made
    and no script runs."""
    from cloud_sync.cloud import CloudService, CloudSettings
    from cloud_sync.store import CloudMessage
    from cloudlet.demo import scenario_dir

    evil = '<img src=x onerror="document.body.dataset.owned=1">'
    settings = CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0, "public": ["*"],
        "dashboard": scenario_dir("smart-city") / "dashboard.yaml",
    })  # fmt: skip
    cloud = CloudService(settings).start()
    try:
        update = {"channels": {"free": {"current-value": 3}, "key": {"current-value": evil}},
                  "lastUpdate": 1_700_000_000_000}  # fmt: skip
        cloud.store.write([CloudMessage("m1", "s", "parking-zones", "free_1m", 1, update)])
        dom = rendered_dom(f"{cloud.url}/")
    finally:
        cloud.stop()
    assert "data-refreshed" in dom and "data-error" not in dom
    assert "data-owned" not in dom and "<img" not in dom
    assert "&lt;img src=x onerror=" in dom  # shown, as text


def test_the_api_pages_work_offline(tmp_path: Path) -> None:
    """/docs draws the OpenAPI operations with Swagger UI served by the API itself: with
    every other host unreachable (a site with no way out), the page still lists them."""
    from cloud_sync.cloud import CloudService, CloudSettings
    from cloudlet.rig.browser import _run

    store = f"sqlite:///{tmp_path / 'cloud.db'}"
    cloud = CloudService(CloudSettings.model_validate({"store": store, "port": 0})).start()
    try:
        html = urllib.request.urlopen(f"{cloud.url}/docs", timeout=10).read().decode()
        offline = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
        done = _run(f"{cloud.url}/docs", "--dump-dom", offline, wait_ms=8000)
    finally:
        cloud.stop()
    assert "/_docs/swagger-ui-bundle.js" in html and "cdn" not in html
    assert 'class="swagger-ui"' in done.stdout, done.stdout[:1500]
    paths = re.findall(r'data-path="([^"]+)"', done.stdout)
    assert "/objects" in paths and "/objects/{so}/streams/{stream}/lastUpdate" in paths


def test_the_dashboard_lists_the_active_alarms(tmp_path: Path) -> None:
    """An alert stream's alarm, as the page shows it: severity, object, rule, since, state."""
    from cloud_sync.cloud import CloudService, CloudSettings
    from cloud_sync.store import CloudMessage
    from cloudlet.demo import ALARMS, scenario_dir

    settings = CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0, "public": ["*"],
        "dashboard": scenario_dir("smart-city") / "dashboard.yaml",
        "alarms": ALARMS["smart-city"],
        "tokens": [{"token": "operator-secret-0123456789", "objects": ["*"], "name": "ops"}],
    })  # fmt: skip
    cloud = CloudService(settings).start()
    try:
        at = 1_700_000_000_000
        update = {"channels": {"alert": {"current-value": True}, "pm25": {"current-value": 22.5}},
                  "lastUpdate": at}  # fmt: skip
        cloud.store.write([CloudMessage("a1", "s", "air-north", "pm25_alert", 1, update)])
        assert cloud.alarms is not None
        deadline = time.monotonic() + 10
        while not cloud.store.alarms(True, 10) and time.monotonic() < deadline:
            time.sleep(0.1)
        dom = rendered_dom(f"{cloud.url}/")
        signed = rendered_dom(f"{cloud.url}/#token=operator-secret-0123456789")
        (alarm,) = cloud.store.alarms(True, 10)
    finally:
        cloud.stop()
    buttons = re.findall(r'<button data-step="(\w+)" data-alarm="([0-9a-f]+)">', signed)
    assert buttons == [("ack", alarm["id"]), ("clear", alarm["id"])]  # signed in: the steps
    assert 'data-alarms="1"' in dom
    row = re.search(r'<tr class="alarm major">(.*?)</tr>', dom)
    assert row is not None, dom[-3000:]
    cells = re.findall(r"<td>(.*?)</td>", row.group(1))
    assert cells == ["major", "air-north", "pm25", "2023-11-14 22:13", "unacknowledged", ""]


def test_marks_are_labelled_and_fire_on_an_update(tmp_path: Path) -> None:
    """Smart city's `zone full` mark (its stream speaks only when free == 0: `when: update`)
    is drawn, and the legend names each kind of mark with its count."""
    from cloud_sync.cloud import CloudService, CloudSettings
    from cloud_sync.store import CloudMessage
    from cloudlet.demo import scenario_dir

    settings = CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0, "public": ["*"],
        "dashboard": scenario_dir("smart-city") / "dashboard.yaml",
    })  # fmt: skip
    cloud = CloudService(settings).start()
    t = 1_700_000_000_000
    try:
        writes = []
        for i, free in enumerate([3, 1, 0, 2]):
            at = t + i * 60_000
            body = {"channels": {"free": {"current-value": free}, "key": {"current-value": "a"}},
                    "lastUpdate": at}  # fmt: skip
            writes.append(CloudMessage(f"f{i}", "s", "parking-zones", "free_1m", 1, body))
            if free == 0:
                writes.append(CloudMessage(f"full{i}", "s", "parking-zones", "full", 1, body))
        cloud.store.write(writes)
        dom = rendered_dom(f"{cloud.url}/")
    finally:
        cloud.stop()
    charts = _charts(dom)
    assert charts[1][:2] == (4, 1)  # the free bays: four points, one zone-full mark
    # the chart holds a series per kind of mark, named with its count, its marks labelled
    # with their object; the line of zone `a`
    assert {"name": "zone full (1)", "points": 0, "marks": ["parking-zones"]} in charts[1][2]
    assert {"name": "a", "points": 4, "marks": []} in charts[1][2], charts[1][2]


def test_the_page_follows_the_token_it_is_signed_in_with(tmp_path: Path) -> None:
    """A cloud with nothing public (the README's cloud.yaml): without a token the page asks
    to sign in; signed in (`#token=` in the address, then kept for the browser session) it
    shows what that token may read, and the token leaves the address."""
    from cloud_sync.cloud import CloudService, CloudSettings
    from cloud_sync.store import CloudMessage
    from cloudlet.demo import scenario_dir

    secret = "reader-secret-0123456789"
    settings = CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0,
        "tokens": [{"token": secret, "objects": ["junction-*"], "name": "reader"}],
        "dashboard": scenario_dir("smart-city") / "dashboard.yaml",
    })  # fmt: skip
    cloud = CloudService(settings).start()
    try:
        t = 1_700_000_000_000
        cloud.store.write([
            CloudMessage(f"{so}-{i}", "s", so, "vehicles_1m", 1,
                         {"channels": {"vehicles": {"current-value": 10 + i}}, "lastUpdate": t + i})
            for so in ("junction-1", "junction-2") for i in range(3)])  # fmt: skip
        anonymous = rendered_dom(f"{cloud.url}/")
        signed = rendered_dom(f"{cloud.url}/#token={secret}")
        wrong = rendered_dom(f"{cloud.url}/#token=not-a-token")
    finally:
        cloud.stop()
    assert 'data-signin="needed"' in anonymous and "data-error" not in anonymous
    assert "sign in with a token to see the charts" in anonymous
    charts = _charts(signed)
    assert charts[0][:2] == (6, 0) and "data-signin" not in signed and "signed in" in signed
    assert secret not in signed  # out of the address (and never in the page)
    assert 'data-signin="needed"' in wrong and "that token is not known here" in wrong


@pytest.mark.kafka
@pytest.mark.mqtt
def test_a_command_button_sends_the_command_and_shows_its_final_status(
    mosquitto: Mosquitto, kafka: Kafka, tmp_path: Path
) -> None:
    """Irrigation's valves as an operator sees them: signed in with a token that may actuate,
    each valve has its buttons; `open 10 min` goes through Kafka, the cloudlet's relay and the
    broker to the valve, and the row follows it to `done` with the valve's message; `close`,
    which this valve does not handle, ends `failed` with its reason. A token that may only
    read gets no buttons."""
    from cloud_sync.cloud import CloudService, CloudSettings
    from cloudlet.demo import scenario_dir
    from tests.test_cloud_commands import _unit_with_relay

    topics = {"commands": "dash.commands", "status": "dash.command-status"}
    cloud = CloudService(CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0,
        "kafka": {"bootstrap_servers": kafka.bootstrap_servers, "topic": "dash.updates",
                  "group": "cloud-dashboard", "commands": topics},
        "dashboard": scenario_dir("irrigation") / "dashboard.yaml",
        "tokens": [{"token": "farmer-0123456789", "objects": ["*"], "actuate": ["field-*-valve"]},
                   {"token": "viewer-0123456789", "objects": ["*"]}],
    })).start()  # fmt: skip
    unit = _unit_with_relay(tmp_path, mosquitto, kafka, topics, "u-dash", "dash.updates")
    opened: list[dict[str, Any]] = []
    valve = EdgeObject("field-2-valve", MqttSettings(url=mosquitto.url), client_id="valve-dash")

    @valve.action("open")
    def open_(parameters: dict[str, Any]) -> str:
        opened.append(parameters)
        return f"open for {parameters['minutes']} minutes"

    valve.start()
    try:
        assert unit.relay is not None and unit.relay.ready.wait(30)
        assert valve.connected.wait(10) and unit.unit.runtime.connected.wait(10)
        valve.publish("state", {"open": False})  # the cloud learns which cloudlet has it
        deadline = time.monotonic() + 30
        while cloud.store.site_of("field-2-valve") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with browser_page() as page:
            page.goto(f"{cloud.url}/#token=viewer-0123456789")
            page.wait_for_selector('#actuator-rows[data-actuators="1"]')
            assert page.locator("button[data-action]").count() == 0  # may read, not actuate
            page.evaluate("sessionStorage.clear()")
            page.goto("about:blank")  # a new document: a change of hash alone would not load it
            page.goto(f"{cloud.url}/#token=farmer-0123456789")
            row = page.locator("tr.actuator", has_text="field-2-valve")
            assert row.locator("td.state").inner_text(timeout=15_000) == "open: false"
            row.locator('button[data-action="open"]').click()
            status = row.locator("td.command")
            page.wait_for_selector('td.command[data-status="done"]', timeout=45_000)
            done = status.inner_text()
            row.locator('button[data-action="close"]').click()
            page.wait_for_selector('td.command[data-status="failed"]', timeout=45_000)
            failed = status.inner_text()
    finally:
        valve.stop()
        unit.stop()
        cloud.stop()
    assert done == "open: done (open for 10 minutes)"
    assert opened == [{"minutes": 10}]
    assert failed == "close: failed (no handler for action 'close' (handled: open))"


def test_the_units_rates_over_time_are_kept_by_the_service() -> None:
    """Sampled every few seconds by a thread of its own: rates per second between samples, a
    counter that went back (the unit restarted) is 0 for that step, a unit that does not
    answer keeps no sample, and a sample that fails costs that sample, not the thread."""
    from cloud_sync.dashboard import HealthHistory

    now = [1_000.0]
    answers: list[Any] = [
        [{"url": "u", "up": True, "received": 100, "accepted": 90, "forwarded": 80}],
        [{"url": "u", "up": True, "received": 150, "accepted": 140, "forwarded": 80}],
        [{"url": "u", "up": False}],
        [{"url": "u", "up": True, "received": 10, "accepted": 10, "forwarded": 5}],
    ]

    def fetch(_urls: list[str]) -> list[dict[str, Any]]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    history = HealthHistory(["u"], every=0.01, clock=lambda: now[0], fetch=fetch)
    for _ in range(4):  # at 1000, 1005, 1010 (down) and 1015 s
        history.sample()
        now[0] += 5
    answers.append([{"url": "u", "up": True, "received": 12, "accepted": 11, "forwarded": 6}])
    (entry,) = history.health()  # the counters now, not kept: the thread's samples are
    assert entry["received"] == 12
    assert entry["rates"] == [[1_005_000, 10.0, 10.0, 0.0], [1_015_000, 0.0, 0.0, 0.0]]
    # the thread: a unit answering garbage costs that sample, not the thread
    up = {"url": "u", "up": True, "received": 30, "accepted": 30, "forwarded": 30}
    answers.extend([ValueError("not the exposition format"), [up]])
    now[0] = 1_020.0
    history.start()
    try:
        deadline = time.monotonic() + 10
        while answers and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert history.alive and not answers
    finally:
        history.stop()
    assert history.rates("u")[-1] == [1_020_000, 4.0, 4.0, 5.0]
