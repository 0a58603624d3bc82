"""The MQTT topic scheme shared by devices, processing units and tools.

With the default empty `root`:

| topic                                         | who publishes     | body                       |
|-----------------------------------------------|-------------------|----------------------------|
| `{so}/streams/{stream}`                       | devices           | sensor update(s)           |
| `{so}/streams/{stream}/updates`               | processing units  | accepted / derived update  |
| `{so}/actions`                                | cloudlet          | actuation command          |
| `{so}/actions/{actuation}/status`             | devices           | actuation status report    |
| `cloudlet/dead-letter/{so}/{stream}`          | processing units  | rejection + original body  |

The device path mirrors ServIoTicy's REST path (`PUT /{so}/streams/{stream}`) and its pub/sub
topic (`.../{so}/streams/{stream}/updates`). System topics sit under `cloudlet/`, whose second
level never is `streams` or `actions`, so they cannot collide with any object's topics, even
one whose id is `cloudlet`. A non-empty root (such as `site-7/`) prefixes every topic, to share
a broker between cloudlets.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from streams.updates import StreamKey

_WILDCARDS = frozenset("+#")


MAX_LEVEL = 256
"""Longest id used as a level of a topic the cloudlet publishes (dead letters); a longer one,
which only a hostile or broken client sends, becomes `_` so the topic stays well inside MQTT's
65,535-byte limit (the dead letter's body carries the original topic)."""


def _level(value: str) -> str:
    """A topic level for a possibly unknown id: dead letters must still be publishable."""
    if (
        not value
        or len(value) > MAX_LEVEL
        or "/" in value
        or "\x00" in value
        or _WILDCARDS & set(value)
    ):
        return "_"
    return value


class TopicScheme(BaseModel):
    model_config = ConfigDict(frozen=True)

    root: str = ""

    @field_validator("root")
    @classmethod
    def _root_shape(cls, value: str) -> str:
        if value and not value.endswith("/"):
            value += "/"
        if _WILDCARDS & set(value) or value.startswith("/") or value.startswith("$"):
            raise ValueError(f"topic root {value!r} must not contain + or #, nor start with / or $")
        return value

    # Devices -> cloudlet
    def device_update(self, so: str, stream: str) -> str:
        return f"{self.root}{so}/streams/{stream}"

    @property
    def device_updates_filter(self) -> str:
        return f"{self.root}+/streams/+"

    def parse_device_update(self, topic: str) -> StreamKey | None:
        """The (so, stream) a device topic addresses, or None if it is not one."""
        if not topic.startswith(self.root):
            return None
        levels = topic[len(self.root) :].split("/")
        if len(levels) != 3 or levels[1] != "streams" or not levels[0] or not levels[2]:
            return None
        return StreamKey(levels[0], levels[2])

    # Cloudlet -> subscribers
    def updates(self, so: str, stream: str) -> str:
        return f"{self.root}{so}/streams/{stream}/updates"

    @property
    def updates_filter(self) -> str:
        return f"{self.root}+/streams/+/updates"

    # Actuations
    def actions(self, so: str) -> str:
        return f"{self.root}{so}/actions"

    def action_status(self, so: str, actuation_id: str) -> str:
        return f"{self.root}{so}/actions/{actuation_id}/status"

    @property
    def action_status_filter(self) -> str:
        return f"{self.root}+/actions/+/status"

    def parse_action_status(self, topic: str) -> tuple[str, str] | None:
        """The (so, actuation id) a status-report topic is about, or None if it is not one."""
        if not topic.startswith(self.root):
            return None
        levels = topic[len(self.root) :].split("/")
        if len(levels) != 4 or levels[1] != "actions" or levels[3] != "status":
            return None
        if not levels[0] or not levels[2]:
            return None
        return levels[0], levels[2]

    # Rejected input
    def dead_letter(self, so: str | None, stream: str | None) -> str:
        return f"{self.root}cloudlet/dead-letter/{_level(so or '')}/{_level(stream or '')}"

    @property
    def dead_letter_filter(self) -> str:
        return f"{self.root}cloudlet/dead-letter/#"
