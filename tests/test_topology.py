"""Topologies, placement and export, without running anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cloudlet.export import compose, kubernetes
from cloudlet.placement import PlacementError, place
from cloudlet.rig.apt import compose_command
from cloudlet.topology import Location, Topology, TopologyError, memory_bytes, partitioning

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "cloudlet" / "scenarios" / "irrigation" / "topology.yaml"
FIELDS = Location(lat=41.6168, lon=0.6226)


def _write(tmp_path: Path, doc: dict) -> Path:
    (tmp_path / "unit.yaml").write_text("name: u\nobjects: [objects]\n")
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _site(lat: float, lon: float, **extra: object) -> dict:
    return {"location": {"lat": lat, "lon": lon}, **extra}


def test_the_example_topology_loads_and_places_near_the_fields() -> None:
    topology = Topology.load(EXAMPLE)
    assert list(topology.sites) == ["field", "town"]
    assert topology.order() == ["irrigation", "archive"]  # irrigation feeds archive
    plan = place(topology)
    assert plan.where() == {"irrigation-0": "field", "archive-0": "town"}
    first = plan.of("irrigation")[0].why
    assert "0.2 km from its 10 sources" in first and "arm64" in first
    assert "not field: label zone='farm' (needs 'town')" in plan.of("archive")[0].why


def test_errors_name_the_file_the_object_and_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, {
        "sites": {"a": {"arch": "sparc", "capacity": {"memory": "lots"}}},
        "units": {"u": {"config": "unit.yaml", "replicas": -1,
                        "placement": {"sites": ["nowhere"]}}},
    })  # fmt: skip
    with pytest.raises(TopologyError) as caught:
        Topology.load(path)
    text = str(caught.value)
    assert f"{path}: sites.a.arch: Input should be 'amd64', 'arm64' or 'armv7'" in text
    assert f"{path}: sites.a.capacity.memory: memory 'lots' must be a size such as 256Mi" in text
    assert f"{path}: units.u.replicas: Input should be greater than or equal to 0" in text


def test_references_cycles_and_missing_files_are_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, {
        "sites": {"a": {}},
        "units": {"u": {"config": "unit.yaml", "placement": {"sites": ["nowhere"]}}},
    })  # fmt: skip
    with pytest.raises(TopologyError, match=r"units.u.placement.sites: no site 'nowhere'"):
        Topology.load(path)
    path = _write(tmp_path, {
        "sites": {"a": {}},
        "units": {"u": {"config": "unit.yaml", "feeds": ["v"]},
                  "v": {"config": "unit.yaml", "feeds": ["u"]}},
    })  # fmt: skip
    with pytest.raises(TopologyError, match=r"units\.feeds: a cycle between u, v"):
        Topology.load(path)
    path = _write(tmp_path, {"sites": {"a": {}}, "units": {"u": {"config": "missing.yaml"}}})
    with pytest.raises(TopologyError, match=r"units.u.config: no such file: .*missing.yaml"):
        Topology.load(path)


def test_memory_sizes() -> None:
    assert memory_bytes("256Mi") == 256 * 2**20
    assert memory_bytes("2Gi") == 2 * 2**30
    assert memory_bytes("1G") == 10**9
    assert memory_bytes(1000) == 1000


def _topology(tmp_path: Path, sites: dict, units: dict) -> Topology:
    return Topology.load(_write(tmp_path, {"sites": sites, "units": units}))


def test_architecture_labels_and_capacity_constrain_placement(tmp_path: Path) -> None:
    topology = _topology(
        tmp_path,
        {"pi": _site(41.6, 0.62, arch="arm64", capacity={"cpu": 1, "memory": "1Gi"}),
         "dc": _site(41.7, 0.70, arch="amd64", zone="town")},
        {"edge": {"config": "unit.yaml", "replicas": 3, "resources": {"cpu": 0.5},
                  "placement": {"arch": ["arm64"], "near": "pi", "spread": False}}},
    )  # fmt: skip
    with pytest.raises(PlacementError) as caught:
        place(topology, locations={"edge": []})
    message = str(caught.value)
    assert message.startswith("unit 'edge': no site can take replica edge-2:")
    assert "pi: CPU full (1 of 1 used)" in message and "dc: amd64 (needs arm64)" in message


def test_spread_prefers_other_sites_then_distance(tmp_path: Path) -> None:
    topology = _topology(
        tmp_path,
        {"near": _site(41.6168, 0.6226), "far": _site(42.0, 1.0), "mid": _site(41.65, 0.65)},
        {"u": {"config": "unit.yaml", "replicas": 4}},
    )
    plan = place(topology, locations={"u": [FIELDS]})
    assert [a.site for a in plan.of("u")] == ["near", "mid", "far", "near"]
    assert "shares the site with another replica" in plan.of("u")[3].why


def test_a_fed_unit_goes_near_what_feeds_it(tmp_path: Path) -> None:
    topology = _topology(
        tmp_path,
        {"a": _site(41.0, 0.0), "b": _site(45.0, 5.0)},
        {"source": {"config": "unit.yaml", "feeds": ["sink"], "placement": {"near": "b"}},
         "sink": {"config": "unit.yaml"}},
    )  # fmt: skip
    plan = place(topology, locations={"source": [], "sink": []})
    assert plan.where() == {"source-0": "b", "sink-0": "b"}


def test_placed_replicas_stay_and_evacuated_sites_get_nothing(tmp_path: Path) -> None:
    topology = _topology(
        tmp_path,
        {"near": _site(41.6168, 0.6226), "far": _site(42.0, 1.0)},
        {"u": {"config": "unit.yaml", "replicas": 2}},
    )
    locations = {"u": [FIELDS]}
    kept = place(topology, {"u-0": "far", "u-1": "near"}, locations=locations)
    assert kept.where() == {"u-0": "far", "u-1": "near"}
    assert kept.of("u")[0].why.startswith("stays")
    moved = place(topology, kept.where(), excluded={"near"}, locations=locations)
    assert moved.where() == {"u-0": "far", "u-1": "far"}
    assert "near: evacuated" in moved.of("u")[1].why
    fresh = place(topology, locations=locations)
    assert fresh.where() == {"u-0": "near", "u-1": "far"}


def test_kubernetes_manifests_follow_the_placement_and_validate() -> None:
    """A StatefulSet per unit and site, pods on the site's nodes, a volume per replica, the
    pod's name as the replica id, the cluster's broker and registry as parameters, a checksum
    that rolls the pods when the unit's files change; plain YAML that the Kubernetes schemas
    (bundled by kubernetes-validate: offline) accept."""
    import kubernetes_validate

    from cloudlet.export import dump_all

    topology = Topology.load(EXAMPLE)
    docs = kubernetes(topology, place(topology), mqtt_url="mqtts://mqtt.farm.svc:8883",
                      registry="registry.farm.example:5000/cloudlet")  # fmt: skip
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert kinds == [
        ("ConfigMap", "irrigation-config"), ("Service", "irrigation-field"),
        ("StatefulSet", "irrigation-field"), ("ConfigMap", "archive-config"),
        ("Service", "archive-town"), ("StatefulSet", "archive-town"),
    ]  # fmt: skip
    text = dump_all(docs)
    assert "&id" not in text and "*id" not in text  # no anchors, no aliases
    for doc in yaml.safe_load_all(text):
        kubernetes_validate.validate(doc, "1.30", strict=True)  # raises on any error
    field = docs[2]["spec"]
    assert (field["replicas"], field["serviceName"]) == (1, "irrigation-field")
    assert field["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "1Gi"}  # fmt: skip
    pod = field["template"]["spec"]
    assert pod["nodeSelector"] == {"cloudlet.io/site": "field", "kubernetes.io/arch": "arm64"}
    container = pod["containers"][0]
    assert container["image"].startswith("registry.farm.example:5000/cloudlet/")
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "256Mi"}
    assert container["args"][3:5] == ["--replica", "$(POD_NAME)"]
    assert {"name": "state", "mountPath": "/var/lib/cloudlet"} in container["volumeMounts"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    unit = yaml.safe_load(docs[0]["data"]["unit.yaml"])
    assert unit["objects"] == ["/etc/cloudlet/objects"] and "share_group" not in unit
    assert unit["mqtt"]["url"] == "mqtts://mqtt.farm.svc:8883"
    assert (unit["mqtt"]["username"], unit["mqtt"]["password_file"]) == (
        "{instance}", "/etc/cloudlet/mqtt/{instance}")  # fmt: skip
    assert "objects__field-1.yaml" in docs[0]["data"]
    items = pod["volumes"][1]["configMap"]["items"]
    assert {"key": "objects__field-1.yaml", "path": "field-1.yaml"} in items
    # the unit's files change: the pods' checksum does, so they roll
    checksum = field["template"]["metadata"]["annotations"]["cloudlet.io/config-checksum"]
    again = kubernetes(topology, place(topology), mqtt_url="mqtt://other:1883")
    assert again[2]["spec"]["template"]["metadata"]["annotations"][
        "cloudlet.io/config-checksum"] != checksum  # fmt: skip
    same = kubernetes(topology, place(topology), mqtt_url="mqtts://mqtt.farm.svc:8883")
    assert same[2]["spec"]["template"]["metadata"]["annotations"][
        "cloudlet.io/config-checksum"] == checksum  # fmt: skip


def test_a_pods_name_is_its_replicas_instance() -> None:
    from processors.unit import instance_name

    assert instance_name("irrigation", "irrigation-field-0") == "irrigation-field-0"
    assert instance_name("irrigation", "1") == "irrigation-1"
    assert instance_name("irrigation", None) == "irrigation"


def test_compose_files_per_site(tmp_path: Path) -> None:
    topology = Topology.load(EXAMPLE)
    plan = place(topology)
    path = compose(topology, plan, "town", tmp_path / "town")
    done = subprocess.run([*compose_command(), "-f", str(path), "config"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr  # docker-compose itself accepts it
    doc = yaml.safe_load(path.read_text())
    assert list(doc["services"]) == ["site", "mosquitto", "archive-0"]
    service = doc["services"]["archive-0"]
    assert service["command"][:5] == ["unit", "run", "/etc/cloudlet/unit.yaml", "--replica", "0"]
    assert service["network_mode"] == "host" and service["cpus"] == 1.0
    assert service["mem_limit"] == "512Mi"
    assert service["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}
    site = doc["services"]["site"]  # provisions the broker's identities: one per replica
    assert site["build"]["dockerfile"] == "compose/Dockerfile"  # `up --build` on a checkout
    assert site["command"][:5] == ["site", "init", "/site", "--objects",
                                   "/etc/cloudlet/site-objects"]  # fmt: skip
    assert "unit:archive-0" in site["command"]
    assert (tmp_path / "town" / "site-objects" / "field-1.yaml").exists()
    assert doc["services"]["mosquitto"]["depends_on"] == {
        "site": {"condition": "service_completed_successfully"}}  # fmt: skip
    assert "allow_anonymous false" in (tmp_path / "town" / "mosquitto.conf").read_text()
    config = yaml.safe_load((tmp_path / "town" / "archive" / "archive-0.yaml").read_text())
    assert config["mqtt"] == {"url": "mqtt://127.0.0.1:1883", "username": "{instance}",
                              "password_file": "/site/secrets/{instance}"}  # fmt: skip
    assert config["derive"] is False and config["http"]["host"] == "127.0.0.1"
    assert "&id" not in path.read_text()


def test_replicas_of_a_unit_that_derives_are_partitioned_and_sharing_messages_is_refused(
    tmp_path: Path,
) -> None:
    """A unit with windows, composite streams or rules is deployed with partitions (at any
    replica count, so that scaling keeps its state); one that derives nothing shares the
    messages. A unit that keeps state and says `share_group` itself is refused, with why and
    what to do: each replica would see part of every device's readings."""
    from cloudlet.control import Controller

    units = EXAMPLE.parent / "units"
    path = _write(tmp_path, {
        "sites": {"a": {"capacity": {"cpu": 4, "memory": "4Gi"}}},
        "units": {"irrigation": {"config": str(units / "irrigation.yaml"), "replicas": 2},
                  "archive": {"config": str(units / "archive.yaml"), "replicas": 3}},
    })  # fmt: skip
    topology = Topology.load(path)
    control = Controller(tmp_path / "state", say=lambda _: None)
    rendered = {}
    for unit in ("irrigation", "archive"):
        config, _ = control._render(topology.units[unit], unit, tmp_path / unit, 9400)
        rendered[unit] = yaml.safe_load(config.read_text())
    assert rendered["irrigation"]["partitions"] == {"count": 16}
    assert "share_group" not in rendered["irrigation"]
    assert rendered["archive"]["share_group"] == "archive"
    assert "partitions" not in rendered["archive"]
    assert partitioning(units / "irrigation.yaml", 8) == (  # what `plan` says of it
        "irrigation: keyed (windows, composite streams or rules): 10 objects in 5 groups, 5 of"
        " 16 partitions in use; the largest group, kept together: field-1-soil, field-2-soil,"
        " field-3-soil, field-4-soil, rain-gauge-1, weather-1 (8 replicas: 3 will have no"
        " partition)"
    )
    assert partitioning(units / "archive.yaml", 3) is None

    sharing = tmp_path / "sharing.yaml"
    sharing.write_text(
        (units / "irrigation.yaml").read_text().replace("objects: [../objects]",
                                                         f"objects: [{units.parent / 'objects'}]")
        + "share_group: irrigation\n"
    )  # fmt: skip
    path = _write(tmp_path, {
        "sites": {"a": {"capacity": {"cpu": 4, "memory": "4Gi"}}},
        "units": {"irrigation": {"config": str(sharing), "replicas": 2},
                  "archive": {"config": str(units / "archive.yaml"), "replicas": 3}},
    })  # fmt: skip
    with pytest.raises(TopologyError) as caught:
        Topology.load(path)
    text = str(caught.value)
    assert (
        f"{path}: units.irrigation.replicas: 2 replicas sharing the messages (share_group:"
        " irrigation) of a unit with windows, composite streams or rules would each see part"
        " of every device's readings"
    ) in text
    assert "archive" not in text
