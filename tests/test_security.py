"""Identities and access control, tried as an intruder would against the real Mosquitto with
the configuration the project generates (dynamic security plugin, deny by default)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from cloudlet.rig import Mosquitto
from cloudlet.security import AccessError, Identities
from processors.wire import WireClient
from streams.transport.mqtt import MqttSettings, make_client

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

OK = (0x00, 0x10)  # success, or "no matching subscribers"
DENIED = 0x87


class Probe:
    """A plain paho client: what the broker answers to each thing it tries."""

    def __init__(self, settings: MqttSettings, client_id: str) -> None:
        self.client = make_client(settings, client_id)
        self.connack: int | None = None
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.received: list[tuple[str, bytes]] = []
        self.disconnected = threading.Event()
        self._changed = threading.Condition()
        c = self.client
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = lambda *_: self.disconnected.set()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        with self._changed:
            self.connack = int(reason.value)
            self._changed.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._changed:
            self.acks[mid] = int(reason.value)
            self._changed.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        with self._changed:
            self.subacks[mid] = [int(r.value) for r in reasons]
            self._changed.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._changed:
            self.received.append((msg.topic, bytes(msg.payload)))
            self._changed.notify_all()

    def publish(self, topic: str, payload: bytes = b"{}") -> int:
        mid = self.client.publish(topic, payload, qos=1).mid
        with self._changed:
            assert self._changed.wait_for(lambda: mid in self.acks, 10), f"no PUBACK for {topic}"
            return self.acks[mid]

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        with self._changed:
            assert self._changed.wait_for(lambda: mid in self.subacks, 10), f"no SUBACK {topic}"
            return self.subacks[mid][0]

    def wait_messages(self, n: int, timeout: float = 10) -> list[tuple[str, bytes]]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.received) >= n, timeout)
            return list(self.received)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def probe(settings: MqttSettings, client_id: str, timeout: float = 10) -> Probe:
    """Connected (or refused: see .connack) within `timeout`."""
    p = Probe(settings, client_id)
    p.client.reconnect_delay_set(30, 30)  # one attempt is what we look at
    p.client.connect_async(settings.host, settings.port, clean_start=True)
    p.client.loop_start()
    with p._changed:
        p._changed.wait_for(lambda: p.connack is not None, timeout)
    return p


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("secure")).start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def site(broker: Mosquitto) -> Iterator[tuple[Identities, dict[str, MqttSettings]]]:
    """Two devices and one account of each role, as `cloudlet device|role add` makes them."""
    ids = broker.identities()
    with ids.admin:
        creds = {
            "field-1-valve": ids.add_device("field-1-valve"),
            "field-2-valve": ids.add_device("field-2-valve"),
            "unit": ids.add_role("unit", "irrigation"),
            "gateway": ids.add_role("gateway", "gateway"),
            "relay": ids.add_role("relay", "relay"),
            "operator": ids.add_role("operator", "ops"),
            "viewer": ids.add_role("viewer", "screen"),
        }
        yield (
            ids,
            {
                k: MqttSettings(url=c.url(broker.plain_url), reconnect_min_delay=0.2)
                for k, c in creds.items()
            },
        )


def test_anonymous_clients_and_wrong_secrets_are_refused(broker: Mosquitto, site: Any) -> None:
    _, settings = site
    anonymous = probe(MqttSettings(url=broker.plain_url), "anyone")
    wrong = probe(settings["field-1-valve"].model_copy(update={"password": SecretStr("guess")}),
                  "field-1-valve")  # fmt: skip
    try:
        assert anonymous.connack in (0x86, 0x87)
        assert wrong.connack in (0x86, 0x87)
    finally:
        anonymous.stop()
        wrong.stop()


def test_a_device_may_only_post_its_own_streams_and_read_its_own_commands(site: Any) -> None:
    _, settings = site
    device = probe(settings["field-1-valve"], "field-1-valve")
    try:
        assert device.connack == 0
        assert device.publish("field-1-valve/streams/state") in OK
        assert device.publish("field-1-valve/actions/c-1/status") in OK
        assert device.subscribe("field-1-valve/actions") in (0, 1)
        # everything else the issue lists: refused by the broker
        assert device.publish("field-2-valve/streams/state") == DENIED  # another device
        assert device.publish("field-1-valve/streams/state/updates") == DENIED  # forged derived
        assert device.publish("field-2-valve/streams/state/updates") == DENIED
        assert device.publish("cloudlet/dead-letter/field-2-valve/state") == DENIED
        assert device.publish("field-2-valve/actions") == DENIED  # command a valve
        assert device.publish("field-1-valve/actions") == DENIED  # even its own
        assert device.publish("field-2-valve/actions/c-1/status") == DENIED
        assert device.subscribe("#") == DENIED
        assert device.subscribe("+/streams/+") == DENIED
        assert device.subscribe("field-2-valve/actions") == DENIED
        assert device.subscribe("$share/x/+/streams/+") == DENIED
    finally:
        device.stop()


def test_nobody_connects_under_another_identitys_client_id(site: Any) -> None:
    _, settings = site
    for who, client_id in [("field-1-valve", "irrigation"), ("field-1-valve", "field-2-valve"),
                           ("gateway", "irrigation"), ("field-2-valve", "gateway"),
                           ("operator", "irrigation"), ("viewer", "ops")]:  # fmt: skip
        p = probe(settings[who], client_id)
        try:
            assert p.connack == DENIED, (who, client_id)
        finally:
            p.stop()


def test_what_each_role_may_do(site: Any) -> None:
    _, settings = site
    expectations: dict[str, tuple[str, list[tuple[str, str, int | tuple[int, ...]]]]] = {
        "unit": (
            "irrigation",
            [
                ("pub", "field-1-valve/streams/state/updates", OK),
                ("pub", "cloudlet/dead-letter/field-1-valve/state", OK),
                ("pub", "field-1-valve/actions", OK),
                ("pub", "field-1-valve/streams/state", DENIED),
                ("pub", "field-1-valve/actions/c-1/status", DENIED),
                ("sub", "+/streams/+", (0, 1)),
                ("sub", "$share/irrigation/+/streams/+", (0, 1)),
                ("sub", "+/actions/+/status", (0, 1)),
                ("sub", "+/actions", DENIED),
            ],
        ),
        "gateway": (
            "gateway",
            [
                ("pub", "weather-1/streams/weather", OK),
                ("pub", "weather-1/actions/c-1/status", OK),
                ("pub", "cloudlet/dead-letter/weather-1/weather", OK),
                ("pub", "weather-1/streams/weather/updates", DENIED),
                ("pub", "weather-1/actions", DENIED),
                ("sub", "+/actions", (0, 1)),
                ("sub", "#", DENIED),
            ],
        ),
        "relay": (
            "relay",
            [
                ("pub", "field-1-valve/actions", OK),
                ("pub", "field-1-valve/streams/state", DENIED),
                ("pub", "field-1-valve/streams/state/updates", DENIED),
                ("sub", "+/actions/+/status", (0, 1)),
                ("sub", "+/streams/+", DENIED),
            ],
        ),
        "operator": (
            "ops",
            [
                ("sub", "#", (0, 1)),
                ("pub", "field-1-valve/actions", OK),
                ("pub", "field-1-valve/streams/state", DENIED),
                ("pub", "field-1-valve/streams/state/updates", DENIED),
                ("pub", "cloudlet/dead-letter/x/y", DENIED),
            ],
        ),
        "viewer": (
            "screen",
            [
                ("sub", "#", (0, 1)),
                ("pub", "field-1-valve/actions", DENIED),
                ("pub", "field-1-valve/streams/state", DENIED),
            ],
        ),
    }
    for role, (client_id, checks) in expectations.items():
        p = probe(settings[role], client_id)
        try:
            assert p.connack == 0, role
            for what, topic, expected in checks:
                got = p.publish(topic) if what == "pub" else p.subscribe(topic)
                allowed = expected if isinstance(expected, tuple) else (expected,)
                assert got in allowed, (role, what, topic, hex(got))
        finally:
            p.stop()


def test_a_device_receives_its_own_commands_and_no_one_elses(site: Any) -> None:
    _, settings = site
    relay = probe(settings["relay"], "relay")
    valve = probe(settings["field-1-valve"], "field-1-valve")
    try:
        assert valve.subscribe("field-1-valve/actions") in (0, 1)
        assert relay.publish("field-2-valve/actions", b'{"id": "x"}') in OK
        assert relay.publish("field-1-valve/actions", b'{"id": "mine"}') in OK
        got = valve.wait_messages(1)
        time.sleep(0.3)
        assert valve.received == [("field-1-valve/actions", b'{"id": "mine"}')]
        assert got
    finally:
        relay.stop()
        valve.stop()


def test_a_units_session_cannot_be_taken_over(broker: Mosquitto, site: Any) -> None:
    """The intruder of the issue: a device's password, the unit's client id. The unit keeps
    its session and every update queued for it."""
    _, settings = site
    got: list[bytes] = []
    unit = WireClient(settings["unit"], "irrigation", subscriptions=[("+/streams/+", 1)],
                      on_messages=lambda ms: (got.extend(m.payload for m in ms),
                                              unit.ack([m.packet_id for m in ms])))  # fmt: skip
    unit.start()
    device = probe(settings["field-1-valve"], "field-1-valve")
    try:
        assert unit.connected.wait(10) and device.connack == 0
        for i in range(100):
            device.client.publish("field-1-valve/streams/state", str(i).encode(), qos=1)
            if i == 50:
                for who in ("field-1-valve", "field-2-valve", "gateway", "viewer"):
                    intruder = probe(settings[who], "irrigation")
                    assert intruder.connack == DENIED, who
                    intruder.stop()
        deadline = time.monotonic() + 10
        while len(got) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [str(i).encode() for i in range(100)]
        assert unit.connected.is_set()
    finally:
        unit.stop()
        device.stop()


def test_revoked_is_cut_off_and_new_is_admitted_within_5_s(broker: Mosquitto, site: Any) -> None:
    ids, _ = site
    started = time.monotonic()
    creds = ids.add_device("field-9-soil")
    settings = MqttSettings(url=creds.url(broker.plain_url))
    device = probe(settings, "field-9-soil", timeout=5)
    try:
        assert device.connack == 0 and time.monotonic() - started < 5
        assert device.publish("field-9-soil/streams/soil") in OK
        revoked = time.monotonic()
        ids.revoke("field-9-soil")
        assert device.disconnected.wait(5) and time.monotonic() - revoked < 5
    finally:
        device.stop()
    again = probe(settings, "field-9-soil", timeout=5)
    try:
        assert again.connack == DENIED
    finally:
        again.stop()
    with pytest.raises(AccessError, match="no identity 'field-9-soil'"):
        ids.show("field-9-soil")
    assert "field-9-soil" not in {i.name for i in ids.list()}


def test_rotating_a_secret_closes_the_old_ones_connections(broker: Mosquitto, site: Any) -> None:
    ids, settings = site
    old = probe(settings["field-2-valve"], "field-2-valve")
    try:
        assert old.connack == 0
        fresh = ids.rotate("field-2-valve")
        assert old.disconnected.wait(5)
    finally:
        old.stop()
    refused = probe(settings["field-2-valve"], "field-2-valve")
    admitted = probe(MqttSettings(url=fresh.url(broker.plain_url)), "field-2-valve")
    try:
        assert refused.connack == DENIED and admitted.connack == 0
    finally:
        refused.stop()
        admitted.stop()
    site[1]["field-2-valve"] = MqttSettings(url=fresh.url(broker.plain_url))


def test_identities_are_listed_and_every_change_is_audited(site: Any) -> None:
    ids, _ = site
    listed = {i.name: i for i in ids.list()}
    assert listed["field-1-valve"].kind == "device"
    assert listed["field-1-valve"].client_id == "field-1-valve"
    assert listed["irrigation"].kind == "unit" and listed["irrigation"].client_id == "irrigation"
    assert listed["ops"].kind == "operator" and listed["ops"].client_id == "ops"
    assert listed["cloudlet-admin"].kind == "administrator"
    entries = ids.audit.entries()
    assert [(e["what"], e["identity"]) for e in entries[:7]] == [
        ("add", n)
        for n in (
            "field-1-valve",
            "field-2-valve",
            "irrigation",
            "gateway",
            "relay",
            "ops",
            "screen",
        )
    ]
    assert all(e["who"] and isinstance(e["at"], int) for e in entries)
    text = ids.audit.path.read_text()
    for identity in ids.list():
        assert identity.name  # no secret is ever written: secrets are 43 URL-safe characters
    assert "password" not in text and "secret" not in text


def test_the_refusal_names_the_identity(
    site: Any, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    settings = site[1]["field-1-valve"].model_copy(update={"password": SecretStr("old")})
    client = WireClient(settings, "field-1-valve", subscriptions=[("field-1-valve/actions", 1)],
                        on_messages=lambda _: None)  # fmt: skip
    client.start()
    try:
        deadline = time.monotonic() + 10
        while client.refusals == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.refusals >= 1
    finally:
        client.stop()
    assert "the broker refused the credentials of 'field-1-valve'" in caplog.text
    assert "cannot reach" not in caplog.text


# mutual TLS: the certificate is the identity -------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("mtls"), tls=True, client_certs=True).start()
    try:
        ids = b.identities()
        with ids.admin:  # the administrator, too, logs in with its certificate
            ids.add_device("field-1-valve")
            ids.add_role("unit", "irrigation")
        yield b
    finally:
        b.stop()


def _with_cert(broker: Mosquitto, name: str, ca: tuple[Path, Path] | None = None) -> MqttSettings:
    cert, key = broker.issue_certificate(name, ca=ca)
    return MqttSettings(url=broker.plain_url, tls_ca=broker.ca_file, tls_cert=cert, tls_key=key,
                        reconnect_min_delay=0.2)  # fmt: skip


def _other_ca(tmp: Path) -> tuple[Path, Path]:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=someone else's CA", "-keyout", "other.key", "-out", "other.crt"],
                   cwd=tmp, check=True, capture_output=True)  # fmt: skip
    return tmp / "other.crt", tmp / "other.key"


def test_a_certificate_from_the_site_ca_is_the_identity(tls_broker: Mosquitto) -> None:
    device = probe(_with_cert(tls_broker, "field-1-valve"), "whatever-it-asks-for")
    try:
        assert device.connack == 0
        assert device.publish("field-1-valve/streams/state") in OK
        assert device.publish("field-2-valve/streams/state") == DENIED
        assert device.publish("field-1-valve/streams/state/updates") == DENIED
        assert device.subscribe("#") == DENIED
    finally:
        device.stop()


def test_a_certificate_cannot_take_over_a_units_session(tls_broker: Mosquitto) -> None:
    got: list[bytes] = []
    unit = WireClient(_with_cert(tls_broker, "irrigation"), "irrigation",
                      subscriptions=[("+/streams/+", 1)],
                      on_messages=lambda ms: (got.extend(m.payload for m in ms),
                                              unit.ack([m.packet_id for m in ms])))  # fmt: skip
    unit.start()
    try:
        assert unit.connected.wait(10)
        # asks for the unit's client id; the broker gives it its certificate's name instead
        intruder = probe(_with_cert(tls_broker, "field-1-valve"), "irrigation")
        try:
            assert intruder.connack == 0
            assert intruder.publish("field-1-valve/streams/state", b"1") in OK
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
            assert got == [b"1"] and unit.connected.is_set()
        finally:
            intruder.stop()
    finally:
        unit.stop()


def test_a_certificate_from_another_ca_or_none_is_refused(
    tls_broker: Mosquitto, tmp_path: Path
) -> None:
    other = _with_cert(tls_broker, "field-1-valve", ca=_other_ca(tmp_path))
    no_cert = MqttSettings(url=tls_broker.plain_url, tls_ca=tls_broker.ca_file,
                           username="field-1-valve", password="anything")  # fmt: skip
    for settings in (other, no_cert):
        p = probe(settings, "field-1-valve", timeout=5)
        try:
            assert p.connack in (None, 0x86, 0x87)  # the TLS handshake fails: no CONNACK
            assert p.connack != 0
        finally:
            p.stop()


# the gateway, the unit's HTTP and the cloud's ----------------------------------------------


def test_the_gateway_posts_for_web_objects_as_itself_and_says_when_refused(
    broker: Mosquitto, site: Any
) -> None:
    from edge_objects.gateway import Gateway, GatewaySettings
    from tests.test_gateway import GOOD, IRRIGATION, put

    _ids, settings = site
    reader = probe(settings["viewer"], "screen")
    assert reader.subscribe("+/streams/+") in (0, 1)

    def gateway_as(mqtt: MqttSettings) -> Gateway:
        return Gateway(GatewaySettings.model_validate({
            "objects": [IRRIGATION / "objects"], "port": 0,
            "mqtt": {"url": mqtt.url, "username": mqtt.username,
                     "password": mqtt.password.get_secret_value() if mqtt.password else None},
            "tokens": [{"token": "field-token", "objects": ["field-*"]}],
        })).start()  # fmt: skip

    good = gateway_as(settings["gateway"])  # client id: its username, the bound one
    try:
        assert good.client_id == "gateway" and good.connected.wait(10)
        assert put(good, "field-1-soil/streams/soil", GOOD)[0] == 202
        assert reader.wait_messages(1)[0][0] == "field-1-soil/streams/soil"
    finally:
        good.stop()
    # a gateway configured with a device's identity may post only for that device
    wrong = gateway_as(settings["field-1-valve"])
    try:
        assert wrong.connected.wait(10)
        status, body = put(wrong, "field-1-soil/streams/soil", GOOD)
        assert status == 502 and "refused" in body["message"]
    finally:
        wrong.stop()
        reader.stop()


def test_a_units_metrics_and_actuations_can_require_a_token(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from processors.config import UnitConfig
    from processors.unit import Unit
    from tests.test_gateway import IRRIGATION

    config = UnitConfig.model_validate({
        "name": "u-token", "objects": [IRRIGATION / "objects"],
        "mqtt": {"url": "mqtt://127.0.0.1:9"}, "http": {"port": 0, "token": {"token": "t0k"}},
    })  # fmt: skip
    unit = Unit(config)
    assert unit.status is not None
    unit.status.start()
    base = f"http://127.0.0.1:{unit.status.port}"

    def get(path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers),
                                        timeout=5) as r:  # fmt: skip
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert get("/metrics") == 401 and get("/actuations") == 401
        assert get("/metrics", "wrong") == 401
        assert get("/metrics", "t0k") == 200 and get("/actuations", "t0k") == 200
        assert get("/healthz") in (200, 503)  # open to probes, token or not
        assert config.http is not None and config.http.host == "127.0.0.1"
    finally:
        unit.status.stop()


def test_the_clouds_health_and_metrics_need_a_token(tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from cloud_sync.cloud import CloudService, CloudSettings

    service = CloudService(CloudSettings.model_validate({
        "store": f"sqlite:///{tmp_path / 'cloud.db'}", "port": 0, "public": ["air-*"],
        "tokens": [{"token": "farm", "objects": ["field-*"]}],
    })).start()  # fmt: skip

    def get(path: str, token: str | None = None) -> tuple[int, dict[str, str]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(service.url + path,
                                                               headers=headers),
                                        timeout=5) as r:  # fmt: skip
                return int(r.status), dict(r.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers)

    try:
        assert get("/api/health")[0] == 401 and get("/metrics")[0] == 401
        assert get("/api/health", "guess")[0] == 401
        assert get("/api/health", "farm")[0] == 200 and get("/metrics", "farm")[0] == 200
        status, headers = get("/")
        policy = headers["content-security-policy"]
        assert status == 200 and "script-src 'nonce-" in policy and "default-src 'none'" in policy
    finally:
        service.stop()


# the command line ------------------------------------------------------------------------------


def test_the_command_line_adds_lists_rotates_and_revokes_with_an_audit_trail(
    broker: Mosquitto, tmp_path: Path
) -> None:
    from tests.test_cli import CLOUDLET

    admin = broker.admin_settings()
    assert admin.password is not None
    admin_url = f"mqtt://{admin.username}:{admin.password.get_secret_value()}@{broker.host}:" + (
        str(broker.port)
    )
    audit = tmp_path / "audit.jsonl"
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "CLOUDLET_BROKER_ADMIN": admin_url,
           "CLOUDLET_AUDIT_LOG": str(audit)}  # fmt: skip

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLOUDLET, *args], capture_output=True, text=True, timeout=60,
                              env=env, check=False)  # fmt: skip

    added = cli("device", "add", "bay-z-1", "bay-z-2", "--json")
    assert added.returncode == 0, added.stderr
    creds = json.loads(added.stdout)
    assert set(creds) == {"bay-z-1", "bay-z-2"} and creds["bay-z-1"]["client_id"] == "bay-z-1"
    assert "secret" not in audit.read_text() and creds["bay-z-1"]["secret"] not in audit.read_text()
    role = cli("role", "add", "operator", "carol", "--secret-file", str(tmp_path / "carol.json"))
    assert role.returncode == 0, role.stderr
    assert oct((tmp_path / "carol.json").stat().st_mode)[-3:] == "600"
    listed = json.loads(cli("device", "list", "--json").stdout)
    assert {"name": "bay-z-1", "kind": "device", "client_id": "bay-z-1", "disabled": False} in (
        listed
    )
    device = MqttSettings(url=creds["bay-z-1"]["url"])
    assert _connack_of(device, "bay-z-1") == 0
    rotated = json.loads(cli("device", "rotate", "bay-z-1", "--json").stdout)
    assert _connack_of(device, "bay-z-1") == DENIED
    assert _connack_of(MqttSettings(url=rotated["bay-z-1"]["url"]), "bay-z-1") == 0
    revoked = cli("device", "revoke", "bay-z-1")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert _connack_of(MqttSettings(url=rotated["bay-z-1"]["url"]), "bay-z-1") == DENIED
    assert cli("device", "show", "bay-z-1").returncode == 1
    twice = cli("device", "add", "bay-z-2")
    assert twice.returncode == 1 and "bay-z-2" in twice.stderr
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(e["what"], e["identity"]) for e in entries] == [
        ("add", "bay-z-1"), ("add", "bay-z-2"), ("add", "carol"), ("rotate", "bay-z-1"),
        ("revoke", "bay-z-1"),
    ]  # fmt: skip
    # one identity's --secret-file holds the secret alone: a unit's mqtt.password_file
    assert cli("role", "add", "unit", "u9", "--secret-file", str(tmp_path / "u9")).returncode == 0
    u9 = MqttSettings(url=broker.plain_url, username="u9", password_file=tmp_path / "u9")
    assert _connack_of(u9, "u9") == 0
    # without the administrator's secret, nothing changes
    env["CLOUDLET_BROKER_ADMIN"] = f"mqtt://cloudlet-admin:guess@{broker.host}:{broker.port}"
    refused = cli("device", "add", "bay-z-9")
    assert refused.returncode == 1
    assert "the broker refused the credentials of 'cloudlet-admin'" in refused.stderr


def test_cloudlet_act_says_the_broker_refused_it(broker: Mosquitto, site: Any) -> None:
    from tests.test_cli import CLOUDLET
    from tests.test_gateway import IRRIGATION

    def act(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLOUDLET, "act", "field-1-valve", "open", "--objects",
                               str(IRRIGATION / "objects"), "--mqtt", url, "--wait", "1"],
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
                              check=False)  # fmt: skip

    wrong = act(f"mqtt://ops:guess@{broker.host}:{broker.port}")
    assert wrong.returncode == 1
    assert "the broker refused the credentials of 'ops'" in wrong.stderr
    assert "guess" not in wrong.stderr and "cannot reach" not in wrong.stderr


def _connack_of(settings: MqttSettings, client_id: str) -> int | None:
    p = probe(settings, client_id)
    try:
        return p.connack
    finally:
        p.stop()


def test_each_replica_of_a_unit_logs_in_as_itself(
    broker: Mosquitto, site: Any, tmp_path: Path
) -> None:
    from processors.config import UnitConfig
    from processors.unit import Unit
    from tests.test_gateway import IRRIGATION

    ids, _ = site
    for replica in ("0", "1"):
        creds = ids.add_role("unit", f"field-unit-{replica}")
        (tmp_path / f"field-unit-{replica}").write_text(creds.secret + "\n")
    config = UnitConfig.model_validate({
        "name": "field-unit", "objects": [IRRIGATION / "objects"], "http": None,
        "share_group": "field-unit",
        "mqtt": {"url": broker.plain_url, "username": "{instance}",
                 "password_file": str(tmp_path / "{instance}")},
    })  # fmt: skip
    units = [Unit(config, replica=r).start() for r in ("0", "1")]
    try:
        for unit in units:
            assert unit.runtime.connected.wait(10), unit.instance
    finally:
        for unit in units:
            unit.stop()


def test_the_partitions_of_a_unit_log_in_as_themselves(
    broker: Mosquitto, site: Any, tmp_path: Path
) -> None:
    """A unit with windows, composites and a rule, two replicas sharing its partitions on the
    secured broker: each replica and each partition with an identity of its own, the unit
    role enough to coordinate (members, owners, snapshots under cloudlet/units/)."""
    from processors.config import UnitConfig
    from processors.partitions import Partitions
    from processors.unit import Unit
    from tests.test_gateway import IRRIGATION

    ids, _ = site
    names = ["keyed-unit-0", "keyed-unit-1", *(f"keyed-unit-p{p:02d}" for p in range(8))]
    for name in names:
        (tmp_path / name).write_text(ids.add_role("unit", name).secret + "\n")
    config = UnitConfig.model_validate({
        "name": "keyed-unit", "objects": [IRRIGATION / "objects"], "http": None,
        "partitions": {"count": 8},
        "mqtt": {"url": broker.plain_url, "username": "{instance}",
                 "password_file": str(tmp_path / "{instance}")},
    })  # fmt: skip
    units = [Unit(config, replica=r).start() for r in ("0", "1")]
    try:
        deadline = time.monotonic() + 20
        while not all(u.runtime.ready for u in units) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(u.runtime.ready for u in units)
        owned = [set(u.runtime.owned) for u in units if isinstance(u.runtime, Partitions)]
        assert owned[0] | owned[1] == {0, 2, 4, 6, 7} and not owned[0] & owned[1]
    finally:
        for unit in units:
            unit.stop()


def test_the_control_plane_deploys_replicas_that_log_in_as_themselves(
    broker: Mosquitto, site: Any, tmp_path: Path
) -> None:
    """The example topology's way: `{instance}` identities, secrets beside the unit file; the
    control plane renders each replica's file elsewhere and the secret is still found."""
    import yaml
    from typer.testing import CliRunner

    from cloudlet.cli import app
    from cloudlet.control import Controller
    from tests.test_gateway import IRRIGATION

    ids, _ = site
    (tmp_path / "secrets").mkdir()
    for replica in ("farm-unit-0", "farm-unit-1"):
        (tmp_path / "secrets" / replica).write_text(ids.add_role("unit", replica).secret)
    (tmp_path / "unit.yaml").write_text(yaml.safe_dump({
        "name": "farm-unit", "objects": [str(IRRIGATION / "objects")],
        "mqtt": {"url": broker.plain_url, "username": "{instance}",
                 "password_file": "secrets/{instance}"},
        "http": {"host": "127.0.0.1"}, "derive": False,  # replicas sharing the messages
    }))  # fmt: skip
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump({
        "name": "secure-farm",
        "sites": {"here": {"location": {"lat": 41.6, "lon": 0.6},
                           "capacity": {"cpu": 4, "memory": "4Gi"}}},
        "units": {"farm-unit": {"config": "unit.yaml", "replicas": 2}},
    }))  # fmt: skip
    state = tmp_path / "state"
    try:
        result = CliRunner().invoke(app, ["deploy", str(tmp_path / "topology.yaml"), "--state",
                                          str(state)], catch_exceptions=False)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "deployed: every replica is ready" in result.output
    finally:
        Controller(state, say=lambda _: None).shutdown(timeout=10)


def test_a_devices_last_will_cannot_speak_for_another(site: Any) -> None:
    """A will is a publish made later on the client's behalf: the same ACL applies."""
    _, settings = site
    viewer = probe(settings["viewer"], "screen")
    assert viewer.subscribe("#") in (0, 1)
    liar = Probe(settings["field-1-valve"], "field-1-valve")
    liar.client.will_set("field-2-valve/streams/state", b'{"forged": true}', qos=1)
    liar.client.reconnect_delay_set(30, 30)
    liar.client.connect_async(settings["field-1-valve"].host, settings["field-1-valve"].port)
    liar.client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while liar.connack is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if liar.connack == 0:  # admitted: its will must still go nowhere
            liar.client.socket().close()  # dies without DISCONNECT: the broker sends the will
        time.sleep(1.5)
        assert not [t for t, _ in viewer.received if t == "field-2-valve/streams/state"]
    finally:
        liar.client.loop_stop()
        viewer.stop()
