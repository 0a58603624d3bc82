"""The topology and its placement as files for sites run by other tools:
- docker-compose: one file per site, one service per replica placed there;
- Kubernetes (k3s on a cloudlet): per unit a ConfigMap (its unit file and descriptor files)
  and per unit and site a Deployment whose node selector is the placement's site (and the
  site's architecture), with CPU and memory limits and probes on /healthz and /readyz.

The unit file inside is rewritten for the container: its descriptors under /etc/cloudlet/,
state under /var/lib/cloudlet/. Its HTTP endpoints stay private: on the host's loopback in
the compose export (host networking), on the pod's interfaces for the kubelet's probes in
Kubernetes, where no Service publishes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cloudlet.placement import Plan
from cloudlet.topology import Topology, UnitSpec

SITE_LABEL = "cloudlet.io/site"  # the node label a site's Kubernetes nodes carry
PORT = 9400


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
    if replicas > 1 and not doc.get("share_group"):
        doc["share_group"] = doc.get("name", "unit")
    return doc, files


def _probe(path: str) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": 5, "failureThreshold": 3}


def kubernetes(topology: Topology, plan: Plan) -> list[dict[str, Any]]:
    """Manifests: a ConfigMap per unit, a Deployment per unit and site."""
    out: list[dict[str, Any]] = []
    for name, spec in topology.units.items():
        assignments = plan.of(name)
        doc, files = _unit_files(spec, len(assignments))
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"{name}-config", "labels": {"app.kubernetes.io/name": name}},
                "data": {"unit.yaml": yaml.safe_dump(doc, sort_keys=False), **files},
            }
        )
        items = [{"key": k, "path": _rel(k)} for k in files]
        for site in sorted({a.site for a in assignments}):
            count = sum(1 for a in assignments if a.site == site)
            labels = {"app.kubernetes.io/name": name, SITE_LABEL: site}
            out.append(
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": f"{name}-{site}", "labels": labels},
                    "spec": {
                        "replicas": count,
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {
                                "nodeSelector": {
                                    SITE_LABEL: site,
                                    "kubernetes.io/arch": _k8s_arch(topology.sites[site].arch),
                                },
                                "containers": [
                                    {
                                        "name": "unit",
                                        "image": spec.image,
                                        "args": [
                                            "unit",
                                            "run",
                                            "/etc/cloudlet/unit.yaml",
                                            "--log-format",
                                            "json",
                                        ],
                                        "ports": [{"name": "http", "containerPort": PORT}],
                                        "resources": {
                                            "limits": {
                                                "cpu": f"{int(spec.resources.cpu * 1000)}m",
                                                "memory": str(spec.resources.memory),
                                            }
                                        },
                                        "livenessProbe": _probe("/healthz"),
                                        "readinessProbe": _probe("/readyz"),
                                        "volumeMounts": [
                                            {
                                                "name": "config",
                                                "mountPath": "/etc/cloudlet/unit.yaml",
                                                "subPath": "unit.yaml",
                                            },
                                            {
                                                "name": "objects",
                                                "mountPath": "/etc/cloudlet/objects",
                                            },
                                            {"name": "state", "mountPath": "/var/lib/cloudlet"},
                                        ],
                                    }
                                ],
                                "volumes": [
                                    {"name": "config", "configMap": {"name": f"{name}-config"}},
                                    {
                                        "name": "objects",
                                        "configMap": {"name": f"{name}-config", "items": items},
                                    },
                                    {"name": "state", "emptyDir": {}},
                                ],
                            },
                        },
                    },
                }
            )
    return out


def _rel(key: str) -> str:
    return key.removeprefix("objects__").replace("__", "/")


def _k8s_arch(arch: str) -> str:
    return "arm" if arch == "armv7" else arch


def compose(topology: Topology, plan: Plan, site: str, folder: Path) -> Path:
    """`folder/docker-compose.yaml` for `site`, with each unit's files written beside it."""
    services: dict[str, Any] = {}
    for name, spec in topology.units.items():
        here = [a for a in plan.of(name) if a.site == site]
        if not here:
            continue
        doc, files = _unit_files(spec, len(plan.of(name)))
        unit_dir = folder / name
        for key, text in files.items():
            target = unit_dir / "objects" / _rel(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        for a in here:
            index = a.replica.rsplit("-", 1)[1]
            port = PORT + len(services)
            # host networking: the unit's HTTP on the host's loopback only, not the site network
            replica_doc = {**doc, "http": {**doc["http"], "host": "127.0.0.1", "port": port}}
            config = unit_dir / f"{a.replica}.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump(replica_doc, sort_keys=False))
            probe = (f"import sys, urllib.request; sys.exit(urllib.request.urlopen("
                     f"'http://127.0.0.1:{port}/healthz', timeout=2).status != 200)")  # fmt: skip
            services[a.replica] = {
                "image": spec.image,
                "command": ["unit", "run", "/etc/cloudlet/unit.yaml", "--replica", index,
                            "--log-format", "json"],
                "network_mode": "host",
                "restart": "on-failure",
                "cpus": spec.resources.cpu,
                "mem_limit": spec.resources.memory,
                "labels": {"io.cloudlet.topology": topology.name, "io.cloudlet.unit": name,
                           "io.cloudlet.replica": a.replica, "io.cloudlet.site": site},
                "volumes": [f"./{name}/{a.replica}.yaml:/etc/cloudlet/unit.yaml:ro",
                            f"./{name}/objects:/etc/cloudlet/objects:ro",
                            f"{a.replica}-state:/var/lib/cloudlet"],
                "healthcheck": {"test": ["CMD", "python3", "-c", probe], "interval": "5s",
                                "timeout": "3s", "retries": 3},
            }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    out = {  # the project is named after the folder: the site
        "services": services,
        "volumes": {f"{r}-state": {} for r in services},
    }
    path = folder / "docker-compose.yaml"
    path.write_text(f"# site {site} of topology {topology.name}, from `cloudlet export compose`\n"
                    + yaml.safe_dump(out, sort_keys=False))  # fmt: skip
    return path
