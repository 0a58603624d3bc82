"""Composite streams, compiled: the plan of every derived stream of the registry (its
inputs, groups, compiled expressions, and the order in which a pass evaluates them), built
once; `processors.engine.composite` runs it. Semantics: see there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams.expressions import (
    CHANNEL_TYPES,
    CompiledExpression,
    ExpressionError,
    InputsScope,
    Type,
    compile_expression,
)
from streams.expressions.servioticy import is_javascript_function, native_equivalent
from streams.objects import ChannelType, ServiceObject
from streams.references import expand_aliases
from streams.registry import Problem, Registry
from streams.updates import StreamKey

GroupKey = tuple[str, str]  # (service object id, group id)


class _AnyChannel(dict[str, Type]):
    """The channels of an input we cannot see: any name, any type."""

    def get(self, key: str, default: Any = None) -> Type:
        return Type.ANY


@dataclass(frozen=True)
class DerivedStream:
    key: StreamKey
    channels: tuple[tuple[str, CompiledExpression, ChannelType], ...]
    pre_filter: CompiledExpression | None
    post_filter: CompiledExpression | None
    streams: Mapping[str, StreamKey]  # input name -> stream read (same object, or itself)
    groups: Mapping[str, GroupKey]  # input name -> group read


@dataclass(frozen=True)
class CompositePlan:
    """Every derived stream of a registry, compiled, with who triggers whom."""

    derived: Mapping[StreamKey, DerivedStream]
    rank: Mapping[StreamKey, int]  # dependency order
    readers: Mapping[StreamKey, tuple[StreamKey, ...]]  # stream -> derived streams reading it
    group_readers: Mapping[GroupKey, tuple[StreamKey, ...]]
    groups_of: Mapping[StreamKey, tuple[GroupKey, ...]]  # member stream -> groups it is in

    @classmethod
    def build(cls, registry: Registry) -> tuple[CompositePlan, list[Problem]]:
        problems: list[Problem] = []
        derived: dict[StreamKey, DerivedStream] = {}
        for so_id, so in registry.objects.items():
            source = registry.sources.get(so_id, "<memory>")
            for stream_id, stream in so.streams.items():
                if stream.derived:
                    compiled = _compile_stream(registry, so, stream_id, source, problems)
                    if compiled is not None:
                        derived[compiled.key] = compiled
        groups_of: dict[StreamKey, list[GroupKey]] = {}
        for so_id, so in registry.objects.items():
            for group_id, group in so.groups.items():
                for member in group.so_ids:
                    groups_of.setdefault(StreamKey(member, group.stream), []).append(
                        (so_id, group_id)
                    )
        readers: dict[StreamKey, list[StreamKey]] = {}
        group_readers: dict[GroupKey, list[StreamKey]] = {}
        for d in derived.values():
            for stream_key in d.streams.values():
                readers.setdefault(stream_key, []).append(d.key)
            for group_key in d.groups.values():
                group_readers.setdefault(group_key, []).append(d.key)
        rank = _rank(derived, groups_of, registry, problems)
        plan = cls(
            derived,
            rank,
            {k: tuple(v) for k, v in readers.items()},
            {k: tuple(v) for k, v in group_readers.items()},
            {k: tuple(v) for k, v in groups_of.items()},
        )
        return plan, problems


def _compile_stream(
    registry: Registry, so: ServiceObject, stream_id: str, source: str, problems: list[Problem]
) -> DerivedStream | None:
    assert so.id is not None
    stream = so.streams[stream_id]
    inputs: dict[str, dict[str, Type]] = {
        name: {c: CHANNEL_TYPES[ch.type] for c, ch in s.channels.items()}
        for name, s in so.streams.items()
    }
    for group_id, group in so.groups.items():
        channels: dict[str, Type] = {}
        resolved = False
        for member in group.so_ids:
            member_so = registry.objects.get(member)
            if member_so is not None and group.stream in member_so.streams:
                resolved = True
                for c, ch in member_so.streams[group.stream].channels.items():
                    channels[c] = CHANNEL_TYPES[ch.type]
        # A group with no resolvable member has its own problem reported; do not add one per
        # reference to it.
        inputs[group_id] = channels if resolved else _AnyChannel()
    own = inputs[stream_id]
    scope = InputsScope(inputs)
    post_scope = InputsScope({**inputs, "result": own})
    ok = True

    def build(text: str, field: str, expect: Type, scope: InputsScope) -> CompiledExpression | None:
        nonlocal ok
        if so.version == "0.2.0" or is_javascript_function(text):
            native = native_equivalent(text)
            hint = f"; the equivalent native expression is: {native}" if native else ""
            problems.append(
                Problem(
                    source,
                    "ServIoTicy 0.2.0 JavaScript functions are not executed (cloudlet runs no"
                    f" user JavaScript){hint}",
                    so.id,
                    field,
                )
            )
            ok = False
            return None
        try:
            return compile_expression(
                expand_aliases(text, so.aliases),
                scope,
                expect=expect,
                what=field.rsplit(".", 1)[-1],
            )
        except (ExpressionError, ValueError) as exc:
            problems.append(Problem(source, str(exc), so.id, field))
            ok = False
            return None

    prefix = f"streams.{stream_id}"
    channel_exprs: list[tuple[str, CompiledExpression, ChannelType]] = []
    for name, channel in stream.channels.items():
        assert channel.current_value is not None
        compiled = build(
            channel.current_value,
            f"{prefix}.channels.{name}.current-value",
            CHANNEL_TYPES[channel.type],
            scope,
        )
        if compiled is not None:
            channel_exprs.append((name, compiled, channel.type))
    pre = (
        build(stream.pre_filter, f"{prefix}.pre-filter", Type.BOOLEAN, scope)
        if stream.pre_filter is not None
        else None
    )
    post = (
        build(stream.post_filter, f"{prefix}.post-filter", Type.BOOLEAN, post_scope)
        if stream.post_filter is not None
        else None
    )
    if not ok:
        return None
    used = set().union(*(e.inputs for _, e, _ in channel_exprs))
    for f in (pre, post):
        if f is not None:
            used |= f.inputs
    used.discard("result")
    return DerivedStream(
        key=StreamKey(so.id, stream_id),
        channels=tuple(channel_exprs),
        pre_filter=pre,
        post_filter=post,
        streams={n: StreamKey(so.id, n) for n in used if n in so.streams},
        groups={n: (so.id, n) for n in used if n in so.groups},
    )


def _rank(
    derived: Mapping[StreamKey, DerivedStream],
    groups_of: Mapping[StreamKey, list[GroupKey]],
    registry: Registry,
    problems: list[Problem],
) -> dict[StreamKey, int]:
    """Topological rank of every derived stream; cycles become problems."""
    group_members: dict[GroupKey, list[StreamKey]] = {}
    for member, groups in groups_of.items():
        for g in groups:
            group_members.setdefault(g, []).append(member)
    upstream: dict[StreamKey, set[StreamKey]] = {}
    for d in derived.values():
        ups = {k for k in d.streams.values() if k != d.key and k in derived}
        for g in d.groups.values():
            ups |= {m for m in group_members.get(g, []) if m in derived and m != d.key}
        upstream[d.key] = ups
    rank: dict[StreamKey, int] = {}
    visiting: list[StreamKey] = []

    def visit(key: StreamKey) -> int:
        if key in rank:
            return rank[key]
        if key in visiting:
            cycle = [*visiting[visiting.index(key) :], key]
            raise _Cycle(cycle)
        visiting.append(key)
        r = 1 + max((visit(u) for u in upstream[key]), default=0)
        visiting.pop()
        rank[key] = r
        return r

    reported: set[StreamKey] = set()
    for key in sorted(derived):
        try:
            visit(key)
        except _Cycle as cycle:
            visiting.clear()
            if not reported & set(cycle.path):
                path = " -> ".join(f"{k.so}/{k.stream}" for k in cycle.path)
                problems.append(
                    Problem(
                        registry.sources.get(key.so, "<memory>"),
                        f"derived streams form a cycle: {path}",
                        key.so,
                        f"streams.{key.stream}",
                    )
                )
            reported |= set(cycle.path)
            for k in cycle.path:
                rank.setdefault(k, 0)
    return rank


class _Cycle(Exception):
    def __init__(self, path: list[StreamKey]) -> None:
        self.path = path
