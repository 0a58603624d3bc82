"""Service object descriptors: the ServIoTicy object model as pydantic models.

A descriptor written for ServIoTicy loads unchanged: its hyphenated keys (`current-value`,
`pre-filter`), camel-case keys (`soIds`, `customFields`), string booleans (`"public": "false"`)
and any fields we do not model (`userId`, stream-level `type`, `properties`) are accepted, and
the unknown ones are kept so that a descriptor written back out is the one that came in.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

# Ids become MQTT topic levels and Kafka keys: no separators, wildcards or whitespace.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# Channel names appear inside expressions (`{$data.channels.<name>.current-value}`).
_CHANNEL_PATTERN = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]{0,63}$")

RESERVED_INPUT_NAMES = frozenset({"result"})
"""Names an expression reserves for itself; no stream or group may use them."""

SERVIOTICY_VERSIONS = ("0.1.0", "0.2.0")


def _check_id(value: str, what: str) -> str:
    if not _ID_PATTERN.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid id: use 1-128 letters, digits, '_', '.', ':' or '-',"
            " starting with a letter or digit (ids become MQTT topic levels)"
        )
    return value


def _check_object_id(value: str) -> str:
    return _check_id(value, "service object id")


def _check_stream_id(value: str) -> str:
    return _check_id(value, "stream id")


ObjectId = Annotated[str, AfterValidator(_check_object_id)]
StreamId = Annotated[str, AfterValidator(_check_stream_id)]


class ChannelType(StrEnum):
    NUMBER = "number"
    STRING = "string"
    BOOLEAN = "boolean"
    GEO_POINT = "geo_point"


class _Descriptor(BaseModel):
    """Common settings: ServIoTicy key spellings accepted, unknown fields kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    def to_servioticy(self) -> dict[str, Any]:
        """The descriptor as ServIoTicy JSON (its key spellings, unknown fields included)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Channel(_Descriptor):
    """One typed value of a stream; `current_value` makes it derived (an expression)."""

    type: ChannelType
    unit: str | None = None
    current_value: str | None = Field(default=None, alias="current-value")

    @field_validator("type", mode="before")
    @classmethod
    def _type_known(cls, value: Any) -> Any:
        allowed = ", ".join(t.value for t in ChannelType)
        if not isinstance(value, str) or value not in ChannelType._value2member_map_:
            raise ValueError(f"channel type {value!r} is not one of: {allowed}")
        return value

    @property
    def derived(self) -> bool:
        return self.current_value is not None


class Stream(_Descriptor):
    """A named sequence of sensor updates, raw (posted by a device) or derived (composite)."""

    channels: dict[str, Channel]
    description: str | None = None
    pre_filter: str | None = Field(default=None, alias="pre-filter")
    post_filter: str | None = Field(default=None, alias="post-filter")

    @field_validator("channels")
    @classmethod
    def _channel_names(cls, channels: dict[str, Channel]) -> dict[str, Channel]:
        if not channels:
            raise ValueError("a stream needs at least one channel")
        for name in channels:
            if not _CHANNEL_PATTERN.match(name):
                raise ValueError(
                    f"channel name {name!r} is not valid: use letters, digits, '_', '$' or '-',"
                    " starting with a letter, '_' or '$' (at most 64)"
                )
        return channels

    @model_validator(mode="after")
    def _derived_all_or_nothing(self) -> Stream:
        derived = [name for name, ch in self.channels.items() if ch.derived]
        if derived and len(derived) != len(self.channels):
            raw = [name for name, ch in self.channels.items() if not ch.derived]
            raise ValueError(
                f"a derived stream needs a current-value on every channel; missing on: "
                f"{', '.join(raw)}"
            )
        # ServIoTicy's own test objects put "pre-filter": "true" on device streams: a filter
        # that lets everything through is what a device stream does anyway, so it loads (and
        # does nothing); any other filter there would be silently ignored, so it is an error.
        filters = [f for f in (self.pre_filter, self.post_filter) if f is not None]
        if not derived and any(f.strip().lower() != "true" for f in filters):
            raise ValueError(
                "pre-filter and post-filter apply to derived streams only; this stream has no"
                ' channel with a current-value (on a device stream only "true", which lets'
                " everything through, is accepted)"
            )
        return self

    @property
    def derived(self) -> bool:
        return next(iter(self.channels.values())).derived


class Group(_Descriptor):
    """The latest update of `stream` on any of `so_ids`, used as one input by expressions."""

    so_ids: list[ObjectId] = Field(alias="soIds")
    stream: StreamId

    @field_validator("so_ids")
    @classmethod
    def _has_members(cls, so_ids: list[str]) -> list[str]:
        if not so_ids:
            raise ValueError("a group needs at least one service object in soIds")
        return so_ids


class Action(_Descriptor):
    """A command the device accepts (ServIoTicy actuation)."""

    name: StreamId
    description: str | None = None


class ServiceObject(_Descriptor):
    """A ServIoTicy service object: a device, a web object, or a composite of others.

    `id` may be absent in a ServIoTicy export; the registry then takes it from the file name.
    """

    id: ObjectId | None = None
    name: str | None = None
    description: str | None = None
    streams: dict[StreamId, Stream]
    groups: dict[StreamId, Group] = Field(default_factory=dict)
    actions: list[Action] = Field(default_factory=list)
    custom_fields: dict[str, Any] = Field(default_factory=dict, alias="customFields")
    public: bool = False
    version: str = "0.1.0"
    aliases: dict[str, str] = Field(default_factory=dict)

    @field_validator("streams")
    @classmethod
    def _has_streams(cls, streams: dict[str, Stream]) -> dict[str, Stream]:
        if not streams:
            raise ValueError("a service object needs at least one stream")
        return streams

    @field_validator("version")
    @classmethod
    def _version_known(cls, value: str) -> str:
        if value not in SERVIOTICY_VERSIONS:
            raise ValueError(
                f"version {value!r} is not a ServIoTicy descriptor version"
                f" ({' or '.join(SERVIOTICY_VERSIONS)})"
            )
        return value

    @field_validator("aliases", mode="before")
    @classmethod
    def _aliases_as_map(cls, value: Any) -> Any:
        # ServIoTicy wrote aliases as a list of one-entry maps: [{"@name@": "text"}, ...].
        if isinstance(value, list):
            merged: dict[Any, Any] = {}
            for i, entry in enumerate(value):
                if not isinstance(entry, dict):
                    raise ValueError(f"aliases[{i}] must be a map of alias to text")
                merged.update(entry)
            return merged
        return value

    @model_validator(mode="after")
    def _names_unambiguous(self) -> ServiceObject:
        # Expressions refer to streams and groups by bare name: the two share one namespace.
        clashes = sorted(set(self.streams) & set(self.groups))
        if clashes:
            raise ValueError(
                f"{', '.join(repr(c) for c in clashes)} is both a stream and a group;"
                " expressions could not tell them apart"
            )
        reserved = sorted((set(self.streams) | set(self.groups)) & RESERVED_INPUT_NAMES)
        if reserved:
            raise ValueError(
                f"{', '.join(repr(r) for r in reserved)} is reserved for the post-filter's result;"
                " rename the stream or group"
            )
        names = [a.name for a in self.actions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"action {', '.join(map(repr, duplicates))} is declared twice")
        return self

    def stream(self, stream_id: str) -> Stream:
        return self.streams[stream_id]

    def action(self, name: str) -> Action | None:
        return next((a for a in self.actions if a.name == name), None)
