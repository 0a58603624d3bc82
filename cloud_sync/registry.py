"""The fleet's registry in the cloud: service objects created, changed and removed at run time
through the REST API (`registry_api`), ServIoTicy's way, each change checked as `cloudlet so
validate` checks files and kept with who made it and when.

A change is checked against the whole registry: the object's own problems refuse it (422,
with the same messages as `cloudlet so validate`), and so does a change that would break
another object (a group or a composite stream that reads it: 409, naming what breaks). Every
change is a new version of the object; its history (`GET /{soId}/history`) keeps each version's
descriptor, who made it and when, deletions included.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from cloud_sync.local_registry import device_secret, said
from cloud_sync.store import CloudStore
from streams.catalog import Catalog
from streams.registry import Problem

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS registry (
        so TEXT PRIMARY KEY, site TEXT, descriptor TEXT NOT NULL, version BIGINT NOT NULL,
        token_hash TEXT NOT NULL, updated_at BIGINT NOT NULL, updated_by TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS registry_by_token ON registry (token_hash)",
    """CREATE TABLE IF NOT EXISTS registry_audit (
        so TEXT NOT NULL, version BIGINT NOT NULL, at BIGINT NOT NULL, who TEXT NOT NULL,
        action TEXT NOT NULL, descriptor TEXT, site TEXT, sent INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (so, version))""",
    "CREATE INDEX IF NOT EXISTS registry_unsent ON registry_audit (sent, at)",
    # every change a site made (`cloud_sync.local_registry`), with how it was settled; one not
    # taken sends the cloud's version of the object back to the sites (`sent` 0 until done)
    """CREATE TABLE IF NOT EXISTS registry_site_changes (
        change TEXT PRIMARY KEY, so TEXT NOT NULL, site TEXT, who TEXT NOT NULL,
        at BIGINT NOT NULL, settled BIGINT NOT NULL, base BIGINT NOT NULL, descriptor TEXT,
        outcome TEXT NOT NULL, reason TEXT, sent INTEGER NOT NULL DEFAULT 1)""",
    # an object's MQTT identity at its site: the nonce its secret is derived from
    # (`local_registry.device_secret`); the secret itself is never kept
    "CREATE TABLE IF NOT EXISTS registry_mqtt (so TEXT PRIMARY KEY, nonce TEXT NOT NULL)",
]


class Refused(Exception):
    """A change the registry does not take: `status` (422 or 409) and every reason."""

    def __init__(self, status: int, problems: list[str]) -> None:
        self.status = status
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    version: int
    api_token: str  # given once: only its hash is kept
    mqtt_secret: str | None = None  # its device identity's at its site, given once


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check(descriptors: Mapping[str, dict[str, Any]], flows: Sequence[Path] = ()) -> list[Problem]:
    """Every problem of a registry made of these descriptors, as the files would have them,
    with these flow files (`*.flows.yaml`: their flows and rules) over it."""
    with tempfile.TemporaryDirectory(prefix="cloudlet-registry-") as folder:
        for i, doc in enumerate(descriptors.values()):
            (Path(folder) / f"{i}.json").write_bytes(orjson.dumps(doc))
        _, problems = Catalog.check([folder, *flows])
    return problems


def _broken(problem: Problem) -> str:
    """A problem a change would make elsewhere, saying where: a flow, a rule, an object."""
    field = problem.field or ""
    what = ("a flow" if field.startswith("flows.") else "a rule" if field.startswith("rules.")
            else "another object")  # fmt: skip
    return f"this change would break {what}: {said(problem)}"


class FleetRegistry:
    """The registry's tables in the cloud store, and the rules of a change."""

    def __init__(self, store: CloudStore, site_keys: Mapping[str, bytes] | None = None,
                 flows: Sequence[Path] = ()) -> None:  # fmt: skip
        """`site_keys`: each site's key, from which the MQTT secrets of the devices created
        for it are derived (`local_registry.device_secret`). `flows`: the fleet's flow files
        (as deployed to the sites): a change that would break one of their flows or rules
        is refused like one that would break another object."""
        self.store = store
        self.site_keys = dict(site_keys or {})
        self.flows = list(flows)
        with store._transaction() as cur:
            for statement in SCHEMA:
                cur.execute(statement)

    # reads -------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        return [r[0] for r in self.store._query("SELECT so FROM registry ORDER BY so")]

    def get(self, so: str) -> dict[str, Any] | None:
        rows = self.store._query(
            "SELECT descriptor, version, site, updated_at, updated_by FROM registry WHERE so = ?",
            (so,),
        )
        if not rows:
            return None
        descriptor, version, site, at, who = rows[0]
        return {"descriptor": orjson.loads(descriptor), "version": version, "site": site,
                "updatedAt": at, "updatedBy": who}  # fmt: skip

    def by_token(self, token: str) -> str | None:
        """The object whose API token this is."""
        rows = self.store._query("SELECT so FROM registry WHERE token_hash = ?",
                                 (token_hash(token),))  # fmt: skip
        return rows[0][0] if rows else None

    def history(self, so: str) -> list[dict[str, Any]]:
        """Every version (with who made it and when), then every change a site made that was
        not taken (`conflict`, `refused`: version None, with the reason and the version it was
        made on), in the order the cloud settled them (`at`: when the site made it, by its
        clock)."""
        rows = self.store._query(
            "SELECT version, at, who, action, descriptor FROM registry_audit WHERE so = ?"
            " ORDER BY version",
            (so,),
        )
        out = [{"version": v, "at": at, "by": who, "action": action,
                "descriptor": orjson.loads(d) if d is not None else None}
               for v, at, who, action, d in rows]  # fmt: skip
        refused = self.store._query(
            "SELECT at, who, outcome, descriptor, reason, base FROM registry_site_changes"
            " WHERE so = ? AND outcome != 'accepted' ORDER BY settled, change",
            (so,),
        )
        out += [{"version": None, "at": at, "by": who, "action": outcome, "reason": reason,
                 "base": base, "descriptor": orjson.loads(d) if d is not None else None}
                for at, who, outcome, d, reason, base in refused]  # fmt: skip
        return out

    def pending(self) -> list[tuple[str, int, str | None, dict[str, Any] | None]]:
        """The changes not sent to the cloudlets yet, oldest first: (id, version, site,
        descriptor or None when removed). A site's change that was not taken stands for the
        object as the cloud has it now (its copy at the site is set back)."""
        rows = self.store._query(
            "SELECT so, version, site, descriptor FROM registry_audit WHERE sent = 0"
            " ORDER BY at, so, version"
        )
        out = [(so, v, site, orjson.loads(d) if d is not None else None)
               for so, v, site, d in rows]  # fmt: skip
        for (so,) in self.store._query(
            "SELECT DISTINCT so FROM registry_site_changes WHERE sent = 0 ORDER BY so"
        ):
            found = self.get(so)
            if found is not None:
                out.append((so, found["version"], found["site"], found["descriptor"]))
            else:
                out.append((so, self._last_version(so), None, None))
        return out

    def mark_sent(self, so: str, version: int) -> None:
        with self.store._transaction() as cur:
            cur.execute(self.store._q(
                "UPDATE registry_audit SET sent = 1 WHERE so = ? AND version = ?"),
                (so, version))  # fmt: skip
            cur.execute(
                self.store._q(
                    "UPDATE registry_site_changes SET sent = 1 WHERE so = ? AND sent = 0"
                ),
                (so,),
            )

    def _last_version(self, so: str) -> int:
        last = self.store._query("SELECT MAX(version) FROM registry_audit WHERE so = ?", (so,))
        return int(last[0][0] or 0)

    # changes made at the sites -------------------------------------------------------------

    def from_site(self, change: Mapping[str, Any]) -> str:
        """A change a site made while it was cut off (or not), settled by the rule of
        `cloud_sync.local_registry`: taken only if made on the cloud's current version of
        the object, and checked as any change; else kept as a `conflict` or `refused`, and the
        cloud's version goes back to the sites. The outcome; a change seen before (sent again
        after a restart) is not settled twice."""
        cid, so, base = str(change["change"]), str(change["id"]), int(change["base"])
        site = change.get("site")
        seen = self.store._query(
            "SELECT outcome FROM registry_site_changes WHERE change = ?", (cid,)
        )
        if seen:
            return str(seen[0][0])
        who = f"{change.get('by', 'unknown')}@{site}"
        at = int(time.time() * 1000)  # when the cloud took it: versions go out in this order
        descriptor = None if change.get("deleted") else change.get("descriptor")
        found = self.get(so)
        current = found["version"] if found is not None else self._last_version(so)
        outcome, reason = "accepted", None
        if base != current:
            outcome = "conflict"
            reason = (f"made at site {site} on version {base}; the cloud had version"
                      f" {current} (the cloud's stands)")  # fmt: skip
        else:
            try:
                if descriptor is None:
                    if found is not None:
                        self.delete(so, who, at)
                elif found is not None:
                    self.update(so, descriptor, who, at)
                else:
                    self.create({"id": so, **descriptor}, who, at, site=site)
            except Refused as exc:
                outcome, reason = "refused", "; ".join(exc.problems)
        with self.store._transaction() as cur:
            cur.execute(self.store._q(
                "INSERT INTO registry_site_changes (change, so, site, who, at, settled, base,"
                " descriptor, outcome, reason, sent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (cid, so, site, who, int(change.get("at") or 0), at, base,
                 orjson.dumps(descriptor).decode() if descriptor is not None else None,
                 outcome, reason, int(outcome == "accepted")))  # fmt: skip
        return outcome

    def _all(self) -> dict[str, dict[str, Any]]:
        rows = self.store._query("SELECT so, descriptor FROM registry ORDER BY so")
        return {so: orjson.loads(d) for so, d in rows}

    # changes -----------------------------------------------------------------------------

    def _checked(self, current: dict[str, dict[str, Any]], so: str,
                 descriptor: dict[str, Any] | None) -> None:  # fmt: skip
        """Refused unless the registry with this change has no problem of the object's and no
        new problem of another's."""
        before = {(p.object_id, p.field, p.message) for p in check(current, self.flows)}
        changed = dict(current)
        if descriptor is None:
            changed.pop(so, None)
        else:
            changed[so] = descriptor
        after = check(changed, self.flows)
        own = [said(p) for p in after if p.object_id == so]
        broken = [_broken(p) for p in after if p.object_id != so
                  and (p.object_id, p.field, p.message) not in before]  # fmt: skip
        if own or broken:  # 422: the object's own problems (and what else breaks); else 409
            raise Refused(422 if own else 409, own + broken)

    def nonce(self, so: str) -> str | None:
        """The nonce of the object's MQTT secret at its site (None: no identity made)."""
        rows = self.store._query("SELECT nonce FROM registry_mqtt WHERE so = ?", (so,))
        return str(rows[0][0]) if rows else None

    def create(self, descriptor: dict[str, Any], who: str, at: int,
               site: str | None = None, credentials: bool = False) -> Created:  # fmt: skip
        """A new object (an id made when the descriptor has none), with its API token; with
        `credentials`, and the site's key known, its MQTT secret at that site too."""
        if not isinstance(descriptor, dict):
            raise Refused(422, ["a service object descriptor is a JSON object"])
        so = descriptor.get("id")
        if so is None:
            so = uuid.uuid4().hex
            descriptor = {"id": so, **descriptor}
        if not isinstance(so, str):
            raise Refused(422, ["id must be a string"])
        current = self._all()
        if so in current:
            raise Refused(409, [f"service object {so!r} exists: PUT /{so} changes it"])
        self._checked(current, so, descriptor)
        token = secrets.token_urlsafe(24)
        # a removed object's history goes on under the same id
        last = self.store._query("SELECT MAX(version) FROM registry_audit WHERE so = ?", (so,))
        version = (last[0][0] or 0) + 1
        key = self.site_keys.get(site) if credentials and site is not None else None
        nonce = secrets.token_hex(12) if key is not None else None
        self._write(so, descriptor, version, who, at, "create", site, token_hash(token), nonce)
        return Created(so, version, token,
                       device_secret(key, so, nonce) if key and nonce else None)  # fmt: skip

    def update(self, so: str, descriptor: dict[str, Any], who: str, at: int) -> int:
        """A new version of an object (its id is the path's); the version number."""
        if not isinstance(descriptor, dict):
            raise Refused(422, ["a service object descriptor is a JSON object"])
        if descriptor.get("id", so) != so:
            raise Refused(422, [f"id {descriptor.get('id')!r} is not the object's ({so!r})"])
        current = self._all()
        found = self.get(so)
        if found is None:
            raise KeyError(so)
        descriptor = {"id": so, **{k: v for k, v in descriptor.items() if k != "id"}}
        self._checked(current, so, descriptor)
        version: int = found["version"] + 1
        self._write(so, descriptor, version, who, at, "update", found["site"], None)
        return version

    def delete(self, so: str, who: str, at: int) -> int:
        found = self.get(so)
        if found is None:
            raise KeyError(so)
        self._checked(self._all(), so, None)
        version: int = found["version"] + 1
        with self.store._transaction() as cur:
            cur.execute(self.store._q("DELETE FROM registry WHERE so = ?"), (so,))
            cur.execute(self.store._q("DELETE FROM registry_mqtt WHERE so = ?"), (so,))
            cur.execute(self.store._q(
                "INSERT INTO registry_audit (so, version, at, who, action, descriptor, site)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"),
                (so, version, at, who, "delete", None, found["site"]))  # fmt: skip
        return version

    def _write(self, so: str, descriptor: dict[str, Any], version: int, who: str, at: int,
               action: str, site: str | None, token: str | None,
               nonce: str | None = None) -> None:  # fmt: skip
        body = orjson.dumps(descriptor).decode()
        q = self.store._q
        with self.store._transaction() as cur:
            if nonce is not None:
                cur.execute(q("DELETE FROM registry_mqtt WHERE so = ?"), (so,))
                cur.execute(q("INSERT INTO registry_mqtt (so, nonce) VALUES (?, ?)"), (so, nonce))
            if token is not None:
                cur.execute(q(
                    "INSERT INTO registry (so, site, descriptor, version, token_hash,"
                    " updated_at, updated_by) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                    (so, site, body, version, token, at, who))  # fmt: skip
            else:
                cur.execute(q(
                    "UPDATE registry SET descriptor = ?, version = ?, updated_at = ?,"
                    " updated_by = ? WHERE so = ?"), (body, version, at, who, so))  # fmt: skip
            cur.execute(q(
                "INSERT INTO registry_audit (so, version, at, who, action, descriptor, site)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"),
                (so, version, at, who, action, body, site))  # fmt: skip
