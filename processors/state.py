"""Durable snapshots of a unit's state (latest values, open windows): msgpack, written to a
temporary file, fsynced, then renamed over the old one, so a crash leaves either the old or
the new snapshot, never a torn one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger(__name__)


class StateStore:
    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"{name}.state"
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, state: Any) -> None:
        tmp = self.path.with_suffix(".state.tmp")
        with tmp.open("wb") as out:
            out.write(msgpack.packb(state, use_bin_type=True))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load(self) -> Any | None:
        """The last snapshot, or None (first start; or an unreadable file, which is kept
        aside as *.state.bad and logged, never fatal)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            aside = self.path.with_suffix(".state.bad")
            os.replace(self.path, aside)
            log.error("state snapshot %s is unreadable (%s); kept as %s, starting empty",
                      self.path, exc, aside)  # fmt: skip
            return None
