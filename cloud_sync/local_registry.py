"""A cloudlet's copy of the fleet's registry, and the changes made at the site.

The copy is a folder of descriptors, one `<id>.json` per object, that the site's units read
among their `objects` (and reload within seconds of a change). Beside the descriptors, in
folders the registry loader skips:
- `.versions/<id>`: the cloud's version of the object this copy holds (0: none);
- `.pending/<id>.change`: a change made here, not yet in Kafka's hands, with the version it
  was made on (`base`): the follower (`registry_sync.RegistryFollower`) sends it to the cloud
  when the link is up;
- `.mqtt/<id>`: the nonce of the device identity made on the site's broker for the object
  (`device_secret`), and `.mqtt/<id>.want` what it should become (made, changed or removed
  when the broker's administrator answers: retried until then).

A change made at the site is in the copy at once (the units take it, offline or not), and the
cloud settles it when it arrives: **the cloud's registry is the record, and a site's change is
taken only if it was made on the cloud's current version of the object** (optimistic
concurrency, no clocks compared). One made on an older version (the object was changed in the
cloud meanwhile, or created there under the same id) is refused as a conflict, kept in the
object's history with its descriptor, and the site's copy is set back to the cloud's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from streams.catalog import Catalog
from streams.registry import Problem

SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")  # what may become a file name


def device_secret(site_key: bytes, so: str, nonce: str) -> str:
    """A device's MQTT secret at a site: HMAC-SHA256 of its id and a nonce under the site's
    key, 256 bits, URL-safe. The cloud gives it once in the answer to a create; the registry's
    records carry only the nonce, and the site (which holds the same key) derives the secret
    to create the identity on its broker: no secret travels over Kafka."""
    mac = hmac.new(site_key, b"cloudlet-mqtt\0" + so.encode() + b"\0" + nonce.encode(),
                   hashlib.sha256)  # fmt: skip
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


class LocalRefused(Exception):
    """A change this site's copy does not take (the messages of `cloudlet so validate`)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def said(problem: Problem) -> str:
    """A problem as `cloudlet so validate` says it, without the file (a change has none)."""
    parts = [f"so {problem.object_id!r}"] if problem.object_id is not None else []
    if problem.field:
        parts.append(problem.field)
    return ": ".join([*parts, problem.message])


class LocalRegistry:
    """One cloudlet's copy (see the module). Changes from the cloud and from the site may
    come from different processes: each file is replaced whole, never half written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        for sub in (folder, folder / ".versions", folder / ".pending", folder / ".mqtt"):
            sub.mkdir(parents=True, exist_ok=True)

    # the copy --------------------------------------------------------------------------------

    def path(self, so: str) -> Path:
        if not SAFE_ID.match(so):
            raise ValueError(f"id {so!r} is not one a file can be named after")
        return self.folder / f"{so}.json"

    def descriptor(self, so: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = orjson.loads(self.path(so).read_bytes())
        except FileNotFoundError:
            return None
        return doc

    def version(self, so: str) -> int:
        """The cloud's version of the object this copy holds (0: none)."""
        try:
            return int((self.folder / ".versions" / so).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def from_cloud(self, so: str, version: int, descriptor: dict[str, Any] | None) -> bool:
        """The cloud's version of an object into the copy; False when the copy has a later
        one, or a change made here on this version waits for the cloud's answer."""
        pending = self.pending_change(so)
        if version < self.version(so) or (pending is not None and version <= pending["base"]):
            return False  # older than what the copy has, or than what it made
        self._put(so, descriptor)
        _replace(self.folder / ".versions" / so, str(version).encode())
        return True

    # changes made here -------------------------------------------------------------------------

    def change(self, so: str, descriptor: dict[str, Any] | None, by: str) -> dict[str, Any]:
        """Create, change (a descriptor) or remove (None) an object here: checked against the
        copy as `cloudlet so validate` checks files, in the copy at once, and queued for the
        cloud; the change as it will be sent."""
        path = self.path(so)
        if descriptor is not None:
            descriptor = {"id": so, **{k: v for k, v in descriptor.items() if k != "id"}}
            self._check(so, descriptor)
        elif not path.exists():
            raise LocalRefused([f"so {so!r}: not in this cloudlet's registry"])
        earlier = self.pending_change(so)
        change: dict[str, Any] = {
            "change": uuid.uuid4().hex,
            "id": so,
            # the version it was made on: the first unsent change's, when changed again
            "base": earlier["base"] if earlier is not None else self.version(so),
            "by": by,
            "at": int(time.time() * 1000),
        }
        if descriptor is None:
            change["deleted"] = True
        else:
            change["descriptor"] = descriptor
        self._put(so, descriptor)
        _replace(self._pending_path(so), orjson.dumps(change))
        return change

    def pending(self) -> list[dict[str, Any]]:
        """The changes made here and not yet sent, oldest first."""
        out = []
        for path in (self.folder / ".pending").glob("*.change"):
            try:
                out.append(orjson.loads(path.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue  # being replaced: read at the next look
        return sorted(out, key=lambda c: (c["at"], c["id"]))

    def pending_change(self, so: str) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = orjson.loads(self._pending_path(so).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return doc

    def sent(self, change: dict[str, Any]) -> None:
        """Kafka has this change: no longer pending (unless changed again meanwhile)."""
        path = self._pending_path(change["id"])
        current = self.pending_change(change["id"])
        if current is not None and current["change"] == change["change"]:
            path.unlink(missing_ok=True)

    # device identities on the site's broker ---------------------------------------------------

    def identity(self, so: str) -> str | None:
        """The nonce of the identity made for the object (None: none made)."""
        try:
            return (self.folder / ".mqtt" / so).read_text() or None
        except FileNotFoundError:
            return None

    def want_identity(self, so: str, nonce: str | None) -> None:
        """The object's identity should be the one of `nonce` (None: removed)."""
        want = self.folder / ".mqtt" / f"{so}.want"
        if nonce == self.identity(so):
            want.unlink(missing_ok=True)
        else:
            _replace(want, (nonce or "").encode())

    def identity_wanted(self) -> list[tuple[str, str | None]]:
        out = []
        for path in sorted((self.folder / ".mqtt").glob("*.want")):
            try:
                out.append((path.name.removesuffix(".want"), path.read_text() or None))
            except FileNotFoundError:
                continue
        return out

    def identity_made(self, so: str, nonce: str | None) -> None:
        """The broker has the identity of `nonce` for the object (None: removed)."""
        applied = self.folder / ".mqtt" / so
        if nonce is None:
            applied.unlink(missing_ok=True)
        else:
            _replace(applied, nonce.encode())
        want = self.folder / ".mqtt" / f"{so}.want"
        try:
            if (want.read_text() or None) == nonce:
                want.unlink()
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------------------------------

    def _pending_path(self, so: str) -> Path:
        return self.folder / ".pending" / f"{so}.change"

    def _put(self, so: str, descriptor: dict[str, Any] | None) -> None:
        if descriptor is None:
            self.path(so).unlink(missing_ok=True)
        else:
            _replace(self.path(so), orjson.dumps(descriptor, option=orjson.OPT_INDENT_2))

    def _check(self, so: str, descriptor: dict[str, Any]) -> None:
        """Refused when the object has a problem in the copy with this change."""
        others = [p for p in sorted(self.folder.glob("*.json")) if p.name != f"{so}.json"]
        with tempfile.TemporaryDirectory(prefix="cloudlet-local-") as folder:
            changed = Path(folder) / f"{so}.json"
            changed.write_bytes(orjson.dumps(descriptor))
            _, problems = Catalog.check([*others, changed])
        own = [said(p) for p in problems if p.object_id == so]
        if own:
            raise LocalRefused(own)


def _replace(path: Path, data: bytes) -> None:
    """Written whole under a name no reader takes (a leading dot), then renamed over."""
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_bytes(data)
    temporary.replace(path)
