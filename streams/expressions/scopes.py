"""Where an expression's names come from: one stream's channels (`StreamScope`), or several
named inputs (`InputsScope`); and whether a computed value fits a declared channel type."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams.expressions.functions import Type
from streams.expressions.syntax import ExpressionError
from streams.objects import ChannelType
from streams.updates import GeoPoint


@dataclass(frozen=True)
class StreamScope:
    """Expressions over one stream's update: bare channel names and `lastUpdate`."""

    channels: Mapping[str, Type]
    input_name: str = ""

    def resolve(self, path: tuple[str, ...], source: str, pos: int) -> tuple[str, str, Type]:
        if len(path) == 1:
            (name,) = path
            if name == "lastUpdate":
                return self.input_name, name, Type.NUMBER
            if name in self.channels:
                return self.input_name, name, self.channels[name]
        declared = ", ".join(self.channels) or "none"
        shown = ".".join(path)
        raise ExpressionError(
            f"unknown channel {shown!r} (channels here: {declared}; and lastUpdate)", source, pos
        )


@dataclass(frozen=True)
class InputsScope:
    """Expressions over several named inputs: `input.channel` and `input.lastUpdate`."""

    inputs: Mapping[str, Mapping[str, Type]]

    def resolve(self, path: tuple[str, ...], source: str, pos: int) -> tuple[str, str, Type]:
        shown = ".".join(path)
        if len(path) != 2:
            raise ExpressionError(
                f"{shown!r} is not a reference; write <input>.<channel> with an input of:"
                f" {', '.join(self.inputs)}",
                source,
                pos,
            )
        name, channel = path
        channels = self.inputs.get(name)
        if channels is None:
            raise ExpressionError(
                f"unknown input {name!r} (inputs here: {', '.join(self.inputs)})", source, pos
            )
        if channel == "lastUpdate":
            return name, channel, Type.NUMBER
        kind = channels.get(channel)
        if kind is None:
            raise ExpressionError(
                f"input {name!r} has no channel {channel!r}"
                f" (it has: {', '.join(channels) or 'none'})",
                source,
                pos,
            )
        return name, channel, kind


def channel_value_type(value: Any, declared: ChannelType) -> bool:
    """Whether a computed value fits a declared channel type."""
    kind = type(value)
    if declared is ChannelType.NUMBER:
        return kind is int or kind is float
    if declared is ChannelType.GEO_POINT:
        return kind is GeoPoint
    if declared is ChannelType.BOOLEAN:
        return kind is bool
    return kind is str
