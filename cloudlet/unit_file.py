"""A unit file: a processing unit's config (`processors.config.UnitConfig`) with the cloud-sync
outbox and forwarder it feeds. Apart from `cloudlet.units`, which runs it, so that a unit file
is read (and `cloudlet.unit_run` decides what the unit loads) before the runtime is imported.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from cloud_sync.outbox import OutboxSettings
from cloud_sync.settings import ForwarderSettings
from processors.config import UnitConfig


class UnitFile(UnitConfig):
    outbox: OutboxSettings | None = None
    forward: ForwarderSettings | None = None

    @model_validator(mode="after")
    def _forward_needs_outbox(self) -> UnitFile:
        if self.forward is not None and self.outbox is None:
            raise ValueError("forward needs an outbox: records go through it to Kafka")
        return self

    @classmethod
    def load(cls, path: Path) -> UnitFile:
        config = super().load(path)
        assert isinstance(config, UnitFile)
        if config.outbox is not None and not config.outbox.path.is_absolute():
            outbox = config.outbox.model_copy(update={"path": path.parent / config.outbox.path})
            config = config.model_copy(update={"outbox": outbox})
        forward = config.forward
        store = forward.store if forward is not None else None
        if forward is not None and store is not None and store.startswith("sqlite:///"):
            # a SQLite store's file, like every other path of the file: relative to it
            file = Path(store.removeprefix("sqlite:///"))
            if not file.is_absolute():
                forward = forward.model_copy(update={"store": f"sqlite:///{path.parent / file}"})
                config = config.model_copy(update={"forward": forward})
        if forward is not None and forward.registry is not None:  # read among the objects
            folder = path.parent / forward.registry
            folder.mkdir(parents=True, exist_ok=True)
            forward = forward.model_copy(update={"registry": folder})
            objects = [*config.objects, folder] if folder not in config.objects else config.objects
            config = config.model_copy(update={"forward": forward, "objects": objects})
        return config
