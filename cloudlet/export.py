"""The topology and its placement as files for sites run by other tools:
- docker-compose: one file per site, one service per replica placed there;
- Kubernetes (k3s on a cloudlet): per unit a ConfigMap (its unit file and descriptor files)
  and per unit and site a StatefulSet whose node selector is the placement's site (and the
  site's architecture): a volume per replica for state and outbox, the pod's name as the
  replica's identity, CPU and memory, probes on /healthz and /readyz.

The unit file inside is rewritten for the container: its descriptors under /etc/cloudlet/,
state under /var/lib/cloudlet/. Its HTTP endpoints stay private: on the host's loopback in
the compose export (host networking), on the pod's interfaces for the kubelet's probes in
Kubernetes, where no Service publishes them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from cloudlet.placement import Plan
from cloudlet.topology import DEFAULT_PARTITIONS, Topology, UnitSpec, keyed, show_memory

SITE_LABEL = "cloudlet.io/site"  # the node label a site's Kubernetes nodes carry
PORT = 9400
MQTT_SECRETS = "/etc/cloudlet/mqtt"  # each replica's MQTT secret, a file named as the pod


def _unit_files(spec: UnitSpec, replicas: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The unit file as the container reads it, and the descriptor files beside it
    (file name in the ConfigMap / mount -> text)."""
    doc = yaml.safe_load(spec.config.read_text())
    base = spec.config.parent
    files: dict[str, str] = {}  # "objects__<path with __ for />" -> text
    for entry in doc.get("objects", []):
        path = (base / entry).resolve()
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in found:
            if file.suffix in (".yaml", ".yml", ".json"):
                rel = file.name if path.is_file() else file.relative_to(path).as_posix()
                files["objects__" + rel.replace("/", "__")] = file.read_text()
    doc["objects"] = ["/etc/cloudlet/objects"]
    doc["state_dir"] = "/var/lib/cloudlet/state"
    doc["http"] = {**(doc.get("http") or {}), "host": "0.0.0.0", "port": PORT}
    if isinstance(doc.get("outbox"), dict):
        doc["outbox"] = {**doc["outbox"], "path": "/var/lib/cloudlet/outbox"}
    if isinstance(doc.get("sink"), dict):
        doc["sink"] = {"sqlite": "/var/lib/cloudlet/results.db"}
    if keyed(spec.config):  # state per object: replicas own partitions (and scale with it)
        doc.setdefault("partitions", {"count": DEFAULT_PARTITIONS})
    elif replicas > 1 and not doc.get("share_group"):
        doc["share_group"] = doc.get("name", "unit")
    return doc, files


def _probe(path: str) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": 5, "failureThreshold": 3}


class _Plain(yaml.SafeDumper):
    """YAML without anchors and aliases (a value used twice is written twice): what
    `kubectl`, Helm and a reviewer all read the same way."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_all(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Plain, sort_keys=False)


def _for_cluster(doc: dict[str, Any], mqtt_url: str) -> dict[str, Any]:
    """The unit file as a pod reads it: the cluster's broker, and each replica logging in as
    itself (`{instance}`: the pod's name) with its secret from the `<unit>-mqtt` Secret."""
    mqtt = {k: v for k, v in (doc.get("mqtt") or {}).items() if k not in ("password", "url")}
    mqtt.update({"url": mqtt_url, "username": "{instance}",
                 "password_file": MQTT_SECRETS + "/{instance}"})  # fmt: skip
    return {**doc, "mqtt": mqtt}


def _image(image: str, registry: str | None) -> str:
    """`image` from `registry` (a host, or host/path) unless it names a registry itself."""
    if registry is None:
        return image
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"{registry.rstrip('/')}/{image}"


def kubernetes(
    topology: Topology, plan: Plan, *, mqtt_url: str = "mqtt://mosquitto:1883",
    registry: str | None = None, storage: str = "1Gi",
) -> list[dict[str, Any]]:  # fmt: skip
    """Manifests: per unit a ConfigMap (its unit file and descriptors); per unit and site a
    headless Service and a StatefulSet whose pods run on the site's nodes, each with a volume
    of its own for state and outbox (`storage`), a stable name that is its replica id (MQTT
    client id and identity, state), the cluster's broker (`mqtt_url`) and images from
    `registry`; a checksum of the unit's files on the pods rolls them when those change."""
    out: list[dict[str, Any]] = []
    for name, spec in topology.units.items():
        assignments = plan.of(name)
        doc, files = _unit_files(spec, len(assignments))
        data = {"unit.yaml": yaml.dump(_for_cluster(doc, mqtt_url), Dumper=_Plain,
                                       sort_keys=False), **files}  # fmt: skip
        checksum = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        out.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config", "labels": {"app.kubernetes.io/name": name}},
            "data": data,
        })  # fmt: skip
        items = [{"key": k, "path": _rel(k)} for k in files]
        for site in sorted({a.site for a in assignments}):
            count = sum(1 for a in assignments if a.site == site)
            labels = {"app.kubernetes.io/name": name, SITE_LABEL: site}
            set_name = f"{name}-{site}"
            out.append({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": set_name, "labels": labels},
                "spec": {"clusterIP": "None", "selector": labels},  # the pods' stable names
            })  # fmt: skip
            container = {
                "name": "unit",
                "image": _image(spec.image, registry),
                "args": ["unit", "run", "/etc/cloudlet/unit.yaml", "--replica", "$(POD_NAME)",
                         "--log-format", "json"],
                "env": [{"name": "POD_NAME",
                         "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"name": "http", "containerPort": PORT}],
                "resources": {
                    "requests": {"cpu": _cpu(spec.resources.cpu),
                                 "memory": show_memory(spec.resources.memory)},
                    "limits": {"cpu": _cpu(spec.resources.cpu),
                               "memory": show_memory(spec.resources.memory)},
                },
                "livenessProbe": _probe("/healthz"),
                "readinessProbe": _probe("/readyz"),
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/cloudlet/unit.yaml",
                     "subPath": "unit.yaml"},
                    {"name": "objects", "mountPath": "/etc/cloudlet/objects"},
                    {"name": "mqtt", "mountPath": MQTT_SECRETS, "readOnly": True},
                    {"name": "state", "mountPath": "/var/lib/cloudlet"},
                ],
            }  # fmt: skip
            out.append({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": set_name, "labels": labels},
                "spec": {
                    "serviceName": set_name,
                    "replicas": count,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels,
                                     "annotations": {"cloudlet.io/config-checksum": checksum}},
                        "spec": {
                            "nodeSelector": {
                                SITE_LABEL: site,
                                "kubernetes.io/arch": _k8s_arch(topology.sites[site].arch),
                            },
                            "terminationGracePeriodSeconds": 60,  # drain and checkpoint
                            "containers": [container],
                            "volumes": [
                                {"name": "config", "configMap": {"name": f"{name}-config"}},
                                {"name": "objects",
                                 "configMap": {"name": f"{name}-config", "items": items}},
                                {"name": "mqtt",
                                 "secret": {"secretName": f"{name}-mqtt", "optional": True}},
                            ],
                        },
                    },
                    "volumeClaimTemplates": [{
                        "metadata": {"name": "state", "labels": labels},
                        "spec": {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": storage}}},
                    }],
                },
            })  # fmt: skip
    return out


def _cpu(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def _rel(key: str) -> str:
    return key.removeprefix("objects__").replace("__", "/")


def _k8s_arch(arch: str) -> str:
    return "arm" if arch == "armv7" else arch


BROKER_CONF = """\
# The site's broker (from `cloudlet export compose`): identities and ACLs on, deny by default;
# the `site` service provisions them before it first starts. Host networking: on the host's
# port 1883, where the site's devices reach it.
listener 1883
allow_anonymous false
plugin /usr/lib/mosquitto_dynamic_security.so
plugin_opt_config_file /mosquitto/security/dynamic-security.json
persistence true
persistence_location /mosquitto/data/
max_queued_messages 1000000
max_inflight_messages 1000
# refused at the device over 4 MiB; the units take up to this and dead-letter what is too large
max_packet_size 4194304
"""


def _build(image: str) -> dict[str, str] | None:
    """How `docker compose up` builds the project's image, when this is the project's
    checkout (its Dockerfile beside): else the image is pulled."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "compose" / "Dockerfile").is_file():
        return None
    return {"context": str(root), "dockerfile": "compose/Dockerfile"}


def compose(topology: Topology, plan: Plan, site: str, folder: Path) -> Path:
    """`folder/docker-compose.yaml` for `site`, with each unit's files written beside it: the
    site's broker (secure by default: an identity per device and per replica, provisioned by
    a one-shot `site` service before it starts), and a service per replica placed there."""
    services: dict[str, Any] = {}
    roles: list[str] = []
    units_here = [n for n in topology.units if any(a.site == site for a in plan.of(n))]
    images = {topology.units[n].image for n in units_here}
    image = sorted(images)[0] if images else "cloudlet:dev"
    for name in units_here:
        spec = topology.units[name]
        here = [a for a in plan.of(name) if a.site == site]
        doc, files = _unit_files(spec, len(plan.of(name)))
        unit_dir = folder / name
        for key, text in files.items():
            target = unit_dir / "objects" / _rel(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        for key, text in files.items():  # the site's devices: every unit's, once each
            shared = folder / "site-objects" / _rel(key)
            if not shared.exists():
                shared.parent.mkdir(parents=True, exist_ok=True)
                shared.write_text(text)
        if "partitions" in doc and here:  # each partition's session logs in as itself
            count = int((doc["partitions"] or {}).get("count", DEFAULT_PARTITIONS))
            roles += [x for p in range(count) for x in ("--role", f"unit:{name}-p{p:02d}")]
        for a in here:
            index = a.replica.rsplit("-", 1)[1]
            roles += ["--role", f"unit:{name}-{index}"]
            port = PORT + len(services)
            # host networking: the unit's HTTP on the host's loopback only, not the site network
            mqtt = {k: v for k, v in (doc.get("mqtt") or {}).items() if k not in ("password",)}
            mqtt.update({"url": "mqtt://127.0.0.1:1883", "username": "{instance}",
                         "password_file": "/site/secrets/{instance}"})  # fmt: skip
            replica_doc = {**doc, "mqtt": mqtt,
                           "http": {**doc["http"], "host": "127.0.0.1", "port": port}}  # fmt: skip
            config = unit_dir / f"{a.replica}.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.dump(replica_doc, Dumper=_Plain, sort_keys=False))
            probe = (f"import sys, urllib.request; sys.exit(urllib.request.urlopen("
                     f"'http://127.0.0.1:{port}/healthz', timeout=2).status != 200)")  # fmt: skip
            services[a.replica] = {
                "image": spec.image,
                "command": ["unit", "run", "/etc/cloudlet/unit.yaml", "--replica", index,
                            "--log-format", "json"],
                "network_mode": "host",
                "restart": "on-failure",
                "cpus": spec.resources.cpu,
                "mem_limit": show_memory(spec.resources.memory),
                "labels": {"io.cloudlet.topology": topology.name, "io.cloudlet.unit": name,
                           "io.cloudlet.replica": a.replica, "io.cloudlet.site": site},
                "volumes": [f"./{name}/{a.replica}.yaml:/etc/cloudlet/unit.yaml:ro",
                            f"./{name}/objects:/etc/cloudlet/objects:ro",
                            f"{a.replica}-state:/var/lib/cloudlet", "site:/site:ro"],
                "depends_on": {"mosquitto": {"condition": "service_healthy"}},
                "healthcheck": {"test": ["CMD", "python3", "-c", probe], "interval": "5s",
                                "timeout": "3s", "retries": 3},
            }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mosquitto.conf").write_text(BROKER_CONF)
    provision: dict[str, Any] = {
        "image": image,
        "user": "root",
        "command": ["site", "init", "/site", "--objects", "/etc/cloudlet/site-objects", *roles,
                    "--owner", "1883:1883", "--secrets-owner", "cloudlet"],
        "volumes": ["site:/site", "./site-objects:/etc/cloudlet/site-objects:ro"],
        "restart": "no",
    }  # fmt: skip
    build = _build(image)
    if build is not None:  # `docker compose up --build` on a checkout; else pulled
        provision["build"] = build
    admin = ("mosquitto_pub -h 127.0.0.1 -q 1 -u cloudlet-admin -P"
             " \"$$(cat /mosquitto/security/secrets/cloudlet-admin)\""
             " -t '$$CONTROL/dynamic-security/v1' -m '{\"commands\": []}'")  # fmt: skip
    broker = {
        "image": "eclipse-mosquitto:2",
        "network_mode": "host",
        "volumes": ["./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro",
                    "mosquitto-data:/mosquitto/data", "site:/mosquitto/security"],
        "depends_on": {"site": {"condition": "service_completed_successfully"}},
        "healthcheck": {"test": ["CMD-SHELL", admin], "interval": "5s", "timeout": "5s",
                        "retries": 12},
        "restart": "unless-stopped",
    }  # fmt: skip
    out = {  # the project is named after the folder: the site
        "services": {"site": provision, "mosquitto": broker, **services},
        "volumes": {"site": {}, "mosquitto-data": {}, **{f"{r}-state": {} for r in services}},
    }
    path = folder / "docker-compose.yaml"
    path.write_text(f"# site {site} of topology {topology.name}, from `cloudlet export compose`:\n"
                    f"#   docker compose -f {path.name} up --build\n"
                    + yaml.dump(out, Dumper=_Plain, sort_keys=False))  # fmt: skip
    return path
