"""A cloudlet's copy of the registry and the changes made at the site (`LocalRegistry`), and
how the cloud settles them (`FleetRegistry.from_site`), on SQLite and the real PostgreSQL: a
change made on the cloud's current version is taken; one made on an older version is a
conflict, the cloud's version stands, is sent back to the sites, and the site's change is kept
in the object's history; a bad one is refused with the words of `cloudlet so validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud_sync.local_registry import LocalRefused, LocalRegistry
from cloud_sync.registry import FleetRegistry
from cloud_sync.store import CloudStore

pytestmark = pytest.mark.infra  # not the kernels: the compiled pass only

PROBE = {"streams": {"data": {"channels": {"t": {"type": "number"}}}}}
WITH_H = {"streams": {"data": {"channels": {"t": {"type": "number"}, "h": {"type": "number"}}}}}
WITH_P = {"streams": {"data": {"channels": {"t": {"type": "number"}, "p": {"type": "number"}}}}}


def test_a_change_made_here_is_in_the_copy_at_once_and_queued_on_its_version(
    tmp_path: Path,
) -> None:
    copy = LocalRegistry(tmp_path)
    assert copy.from_cloud("shared", 3, {"id": "shared", **PROBE})
    first = copy.change("shared", WITH_H, by="tech")
    assert orjson.loads((tmp_path / "shared.json").read_bytes()) == {"id": "shared", **WITH_H}
    again = copy.change("shared", PROBE, by="tech")  # changed again before it was sent
    assert (first["base"], again["base"]) == (3, 3)
    assert [c["change"] for c in copy.pending()] == [again["change"]]
    # the cloud's version it was made on, come late: the copy keeps the site's change
    assert not copy.from_cloud("shared", 3, {"id": "shared", **WITH_P})
    copy.sent(first)  # an older send: still pending
    assert len(copy.pending()) == 1
    copy.sent(again)
    assert copy.pending() == []
    assert copy.from_cloud("shared", 4, {"id": "shared", **WITH_P})  # the cloud's answer
    assert not copy.from_cloud("shared", 2, {"id": "shared", **PROBE})  # an older record
    assert orjson.loads((tmp_path / "shared.json").read_bytes()) == {"id": "shared", **WITH_P}
    assert copy.version("shared") == 4
    removed = copy.change("shared", None, by="tech")
    assert removed["deleted"] and not (tmp_path / "shared.json").exists()
    # the loader and the reload see descriptors only, not the bookkeeping
    assert sorted(p.name for p in tmp_path.glob("*.json")) == []


def test_a_bad_change_here_is_refused_with_the_words_of_validate(tmp_path: Path) -> None:
    copy = LocalRegistry(tmp_path)
    with pytest.raises(LocalRefused) as refused:
        copy.change("bad", {"streams": {"data": {"channels": {"t": {"type": "numbr"}}}}}, "tech")
    assert refused.value.problems and all("bad" in p for p in refused.value.problems)
    assert "numbr" in " ".join(refused.value.problems)
    with pytest.raises(LocalRefused, match="not in this cloudlet's registry"):
        copy.change("absent", None, "tech")
    with pytest.raises(ValueError, match="file can be named after"):
        copy.change("../x", PROBE, "tech")
    assert copy.pending() == [] and not list(tmp_path.glob("*.json"))


@pytest.fixture
def fleet(store: CloudStore) -> FleetRegistry:
    registry = FleetRegistry(store)
    with store._transaction() as cur:
        for table in ("registry", "registry_audit", "registry_site_changes"):
            cur.execute(f"DELETE FROM {table}")
    return registry


def _change(copy: LocalRegistry, so: str, descriptor: dict[str, Any] | None) -> dict[str, Any]:
    return {**copy.change(so, descriptor, by="tech"), "site": "farm-1"}


def test_the_cloud_settles_the_sites_changes(fleet: FleetRegistry, tmp_path: Path) -> None:
    copy = LocalRegistry(tmp_path)
    made = fleet.create({"id": "shared", **PROBE}, "ops", 1, site="farm-1")
    copy.from_cloud("shared", made.version, {"id": "shared", **PROBE})
    for so, version, _, _ in fleet.pending():
        fleet.mark_sent(so, version)

    new = _change(copy, "local-new", PROBE)  # created at the site: the cloud never had it
    assert fleet.from_site(new) == "accepted"
    assert fleet.get("local-new") == {**fleet.get("local-new"), "site": "farm-1", "version": 1,
                                      "updatedBy": "tech@farm-1"}  # fmt: skip
    assert fleet.from_site(new) == "accepted"  # sent again: not settled twice
    assert [h["version"] for h in fleet.history("local-new")] == [1]
    copy.sent(new)  # as the follower does once Kafka has it; then the cloud's version comes
    assert copy.from_cloud("local-new", 1, {"id": "local-new", **PROBE})

    on_v1 = _change(copy, "shared", WITH_H)  # made at the site on version 1 ...
    fleet.update("shared", {"id": "shared", **WITH_P}, "ops", 2)  # ... while the cloud changed it
    assert fleet.from_site(on_v1) == "conflict"
    assert fleet.get("shared")["descriptor"] == {"id": "shared", **WITH_P}  # the cloud's stands
    conflict = fleet.history("shared")[-1]
    assert conflict == {**conflict, "version": None, "action": "conflict", "by": "tech@farm-1",
                        "base": 1, "descriptor": {"id": "shared", **WITH_H}}  # fmt: skip
    assert "version 1" in conflict["reason"] and "version 2" in conflict["reason"]
    # the cloud's version goes (back) to the sites
    assert ("shared", 2, "farm-1", {"id": "shared", **WITH_P}) in fleet.pending()

    bad = {**new, "change": "c-bad", "id": "local-bad", "base": 0,
           "descriptor": {"streams": {"d": {"channels": {"t": {"type": "numbr"}}}}}}  # fmt: skip
    assert fleet.from_site(bad) == "refused"
    assert fleet.get("local-bad") is None
    refused = fleet.history("local-bad")
    assert [h["action"] for h in refused] == ["refused"] and "numbr" in refused[0]["reason"]
    assert ("local-bad", 0, None, None) in fleet.pending()  # removed at the site again
    for so, version, _, _ in fleet.pending():
        fleet.mark_sent(so, version)
    assert fleet.pending() == []

    gone = _change(copy, "local-new", None)  # removed at the site, on the cloud's version
    assert fleet.from_site(gone) == "accepted" and fleet.get("local-new") is None
    assert [h["action"] for h in fleet.history("local-new")] == ["create", "delete"]


def test_cloudlet_so_local_changes_a_cloudlets_copy_offline(tmp_path: Path) -> None:
    import subprocess

    from tests.test_cli import CLOUDLET

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        # no cloud anywhere: --local needs none
        return subprocess.run([CLOUDLET, "so", *args, "--local", str(tmp_path / "copy"),
                               "--cloud", "http://127.0.0.1:9"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    probe = tmp_path / "probe-9.yaml"
    probe.write_text("id: probe-9\nstreams: {data: {channels: {t: {type: number}}}}\n")
    added = cli("add", str(probe))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("registered probe-9 at this cloudlet")
    copy = LocalRegistry(tmp_path / "copy")
    assert copy.descriptor("probe-9") == {"id": "probe-9", **PROBE}
    probe.write_text("id: probe-9\nstreams: {data: {channels: {t: {type: bogus}}}}\n")
    refused = cli("update", str(probe))
    assert refused.returncode == 1
    assert "so 'probe-9': streams.data.channels.t.type: channel type 'bogus'" in refused.stderr
    assert copy.descriptor("probe-9") == {"id": "probe-9", **PROBE}  # unchanged
    assert cli("rm", "probe-9").stdout == "removed probe-9 at this cloudlet\n"
    assert copy.descriptor("probe-9") is None
    assert [(c["id"], c.get("deleted"), c["base"]) for c in copy.pending()] == [
        ("probe-9", True, 0)]  # fmt: skip
