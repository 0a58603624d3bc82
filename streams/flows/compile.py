"""Resolve flow definitions against the registry and compile them once.

A flow's results are sensor updates of a stream it adds to a service object (`into`), so
composite streams and other flows can read them like any other stream; devices cannot post
to them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from streams.expressions import (
    CHANNEL_TYPES,
    CompiledExpression,
    ExpressionError,
    StreamScope,
    Type,
    compile_expression,
    parse,
)
from streams.expressions.syntax import Call, Literal
from streams.flows.model import FlowDefinition, FlowFile, RuleDefinition
from streams.objects import Channel, ChannelType, Stream
from streams.registry import FLOW_SUFFIXES, Problem, Registry, validation_problems
from streams.updates import StreamKey
from streams.windows.aggregates import AGGREGATES, Aggregate, percentile_aggregate
from streams.windows.model import Windowing

_TYPE_TO_CHANNEL = {v: k for k, v in CHANNEL_TYPES.items()}


@dataclass(frozen=True)
class InputProgram:
    """What a flow evaluates on each update of one of its input streams."""

    where: CompiledExpression | None
    key: CompiledExpression | None
    args: tuple[CompiledExpression | None, ...]  # one per aggregate; None takes no argument


@dataclass(frozen=True)
class CompiledFlow:
    name: str
    source: str
    inputs: dict[StreamKey, InputProgram]
    key_mode: str  # "so", "none" or "expression"
    windowing: Windowing
    aggregates: tuple[tuple[str, Aggregate], ...]
    into_so: str | None  # None: the key's own service object
    into_stream: str
    output_channels: dict[str, ChannelType]
    max_keys: int = 10_000  # keys with open windows at once (a key expression's)

    def output_key(self, key: str) -> StreamKey:
        return StreamKey(self.into_so if self.into_so is not None else key, self.into_stream)


def flow_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """The flow files named by `paths` (directories searched recursively), each once."""
    seen: set[Path] = set()
    for entry in map(Path, paths):
        found = sorted(entry.rglob("*")) if entry.is_dir() else [entry]
        for path in found:
            if path.name.endswith(FLOW_SUFFIXES) and path.resolve() not in seen:
                seen.add(path.resolve())
                yield path


@dataclass(frozen=True)
class CompiledRule:
    name: str
    source: str
    triggers: dict[StreamKey, tuple[CompiledExpression, str]]  # stream -> (condition, target)
    action: str
    parameters: dict[str, Any]
    min_interval: int


@dataclass
class FlowFiles:
    flows: list[tuple[str, str, FlowDefinition]]
    rules: list[tuple[str, str, RuleDefinition]]


def load_flow_files(paths: Iterable[Path | str], problems: list[Problem]) -> FlowFiles:
    """Every valid flow and rule, as (file, name, definition); problems for the others."""
    found = FlowFiles([], [])
    names: dict[str, str] = {}
    for path in flow_files(paths):
        source = str(path)
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            reason = str(exc).splitlines()[0]
            problems.append(Problem(source, f"cannot be read as yaml: {reason}"))
            continue
        try:
            parsed = FlowFile.model_validate(doc)
        except ValidationError as exc:
            problems.extend(validation_problems(exc, source))
            continue
        entries: list[tuple[str, str, Any]] = [
            *(("flows", n, d) for n, d in parsed.flows.items()),
            *(("rules", n, d) for n, d in parsed.rules.items()),
        ]
        for section, name, definition in entries:
            if name in names:
                problems.append(
                    Problem(source, f"{name!r} is already defined in {names[name]}", None,
                            f"{section}.{name}")
                )  # fmt: skip
                continue
            names[name] = source
            getattr(found, section).append((source, name, definition))
    return found


def compile_rules(
    registry: Registry, definitions: list[tuple[str, str, RuleDefinition]], problems: list[Problem]
) -> list[CompiledRule]:
    """Rules resolved against the registry: each trigger's condition and target object."""
    compiled = []
    for source, name, rule in definitions:
        field = f"rules.{name}"
        before = len(problems)
        inputs = _matches(registry, rule.when)
        if not inputs:
            problems.append(Problem(source, f"when {', '.join(rule.when)} matches no stream", None,
                                    f"{field}.when"))  # fmt: skip
            continue
        triggers: dict[StreamKey, tuple[CompiledExpression, str]] = {}
        for key in inputs:
            channels = registry.objects[key.so].streams[key.stream].channels
            scope = StreamScope({c: CHANNEL_TYPES[ch.type] for c, ch in channels.items()})
            try:
                condition = compile_expression(
                    rule.condition, scope, expect=Type.BOOLEAN, what="if"
                )
            except ExpressionError as exc:
                problems.append(
                    Problem(source, f"on {key.so}/{key.stream}: {exc}", None, f"{field}.if")
                )
                continue
            target = _target(registry, rule.act.so, key.so)
            if target is None:
                problems.append(Problem(source, f"on {key.so}/{key.stream}: {rule.act.so} names"
                                        " nothing (a customField that is not a string?)", None,
                                        f"{field}.act.so"))  # fmt: skip
                continue
            so = registry.objects.get(target)
            if so is None or so.action(rule.act.action) is None:
                what = (
                    f"unknown service object {target!r}" if so is None
                    else f"{target!r} has no action {rule.act.action!r} (its actions:"
                    f" {', '.join(a.name for a in so.actions) or 'none'})"
                )  # fmt: skip
                problems.append(Problem(source, f"on {key.so}/{key.stream}: {what}", None,
                                        f"{field}.act"))  # fmt: skip
                continue
            triggers[key] = (condition, target)
        if len(problems) == before:
            compiled.append(
                CompiledRule(name, source, triggers, rule.act.action, dict(rule.act.parameters),
                             rule.min_interval)
            )  # fmt: skip
    return compiled


def _target(registry: Registry, template: str, trigger_so: str) -> str | None:
    if template == "{so}":
        return trigger_so
    if template.startswith("{customFields.") and template.endswith("}"):
        value = registry.objects[trigger_so].custom_fields.get(template[14:-1])
        return value if isinstance(value, str) else None
    return template


def _matches(registry: Registry, patterns: list[str]) -> list[StreamKey]:
    keys = [StreamKey(so_id, s) for so_id, so in registry.objects.items() for s in so.streams]
    return sorted(
        k for k in keys if any(fnmatch.fnmatchcase(f"{k.so}/{k.stream}", p) for p in patterns)
    )


def _aggregate(text: str) -> tuple[Aggregate, Any]:
    """The aggregate an output names and its argument's syntax tree (None: no argument)."""
    node = parse(text)
    names = ", ".join(sorted({*AGGREGATES} - {"count_rate"} | {"percentile", "rate"}))
    if not isinstance(node, Call) or node.name not in {*AGGREGATES, "percentile"} - {"count_rate"}:
        raise ExpressionError(f"an aggregate must be a call of one of: {names}", text, 0)
    if node.name == "percentile":
        if (
            len(node.args) != 2
            or not isinstance(node.args[1], Literal)
            or not isinstance(node.args[1].value, int | float)
            or not 0 <= node.args[1].value <= 100
        ):
            raise ExpressionError(
                "percentile takes a value and a percentile 0..100: percentile(x, 90)",
                text,
                node.pos,
            )
        return percentile_aggregate(float(node.args[1].value)), node.args[0]
    if node.name == "rate" and not node.args:
        return AGGREGATES["count_rate"], None
    aggregate = AGGREGATES[node.name]
    if aggregate.needs_argument and len(node.args) != 1:
        raise ExpressionError(f"{node.name}() takes one value", text, node.pos)
    if not aggregate.needs_argument and node.args:
        raise ExpressionError(f"{node.name}() takes no argument", text, node.pos)
    return aggregate, (node.args[0] if node.args else None)


def compile_flows(
    registry: Registry,
    definitions: list[tuple[str, str, FlowDefinition]],
    problems: list[Problem],
) -> tuple[Registry, list[CompiledFlow]]:
    """The registry extended by every flow's output stream, and the compiled flows. A flow
    may read the outputs of the flows defined before it (an hourly average of 10-minute
    averages, say)."""
    objects = dict(registry.objects)
    produced: set[StreamKey] = set(registry.produced)
    compiled: list[CompiledFlow] = []
    for source, name, flow in definitions:
        field = f"flows.{name}"
        so_far = Registry(objects, registry.sources, produced=frozenset(produced))
        result = _compile(so_far, source, name, flow, problems)
        if result is None:
            continue
        outputs = (
            sorted({k.so for k in result.inputs}) if result.into_so is None else [result.into_so]
        )
        ok = True
        for so_id in outputs:
            so = objects.get(so_id)
            if so is None:
                problems.append(
                    Problem(
                        source,
                        f"into names unknown service object {so_id!r}",
                        None,
                        f"{field}.into",
                    )
                )
                ok = False
                continue
            key = StreamKey(so_id, result.into_stream)
            if result.into_stream in so.streams or key in produced:
                problems.append(
                    Problem(source, f"into {so_id}/{result.into_stream}: the stream already exists;"
                            " a flow adds its own output stream", None, f"{field}.into")
                )  # fmt: skip
                ok = False
                continue
            stream = Stream(
                channels={c: Channel(type=t) for c, t in result.output_channels.items()},
                description=f"{flow.description or 'produced'} (flow {name})",
            )
            objects[so_id] = so.model_copy(
                update={"streams": {**so.streams, result.into_stream: stream}}
            )
            produced.add(key)
        if ok:
            compiled.append(result)
    return Registry(objects, registry.sources, produced=frozenset(produced)), compiled


def _compile(
    registry: Registry, source: str, name: str, flow: FlowDefinition, problems: list[Problem]
) -> CompiledFlow | None:
    field = f"flows.{name}"
    before = len(problems)
    inputs = _matches(registry, flow.inputs)
    if not inputs:
        problems.append(
            Problem(
                source, f"from {', '.join(flow.inputs)} matches no stream", None, f"{field}.from"
            )
        )
        return None
    into_so, into_stream = flow.into.split("/")
    if into_so == "{so}":
        if flow.key != "so":
            problems.append(Problem(source, "into {so}/... needs key: so", None, f"{field}.into"))
        into: str | None = None
    else:
        into = into_so
    key_mode = flow.key if flow.key in ("so", "none") else "expression"
    try:
        aggregates = [(out, *_aggregate(text)) for out, text in flow.aggregates.items()]
    except ExpressionError as exc:
        problems.append(Problem(source, str(exc), None, f"{field}.aggregates"))
        return None
    programs: dict[StreamKey, InputProgram] = {}
    output_types: dict[str, ChannelType] = {}
    for key in inputs:
        channels = registry.objects[key.so].streams[key.stream].channels
        scope = StreamScope({c: CHANNEL_TYPES[ch.type] for c, ch in channels.items()})
        where = None
        path = "where"
        try:
            path = "where"
            where = (
                compile_expression(flow.where, scope, expect=Type.BOOLEAN, what="where")
                if flow.where
                else None
            )
            path = "key"
            key_expr = (
                compile_expression(flow.key, scope, what="key")
                if key_mode == "expression"
                else None
            )
            args: list[CompiledExpression | None] = []
            for out, aggregate, arg in aggregates:
                path = f"aggregates.{out}"
                if arg is None:
                    args.append(None)
                    continue
                expr = compile_expression(
                    flow.aggregates[out], scope, node=arg,
                    expect=Type.NUMBER if aggregate.numeric else None, what=f"{aggregate.name}()",
                )  # fmt: skip
                args.append(expr)
                kind = Type.NUMBER if aggregate.returns is not None else expr.type
                if kind not in _TYPE_TO_CHANNEL:
                    raise ExpressionError(
                        f"cannot tell the type of {out!r} ({kind.value})", flow.aggregates[out]
                    )
                if (
                    output_types.setdefault(out, _TYPE_TO_CHANNEL[kind])
                    is not _TYPE_TO_CHANNEL[kind]
                ):
                    raise ExpressionError(
                        f"{out!r} has different types on different inputs", flow.aggregates[out]
                    )
        except ExpressionError as exc:
            problems.append(
                Problem(source, f"on {key.so}/{key.stream}: {exc}", None, f"{field}.{path}")
            )
            continue
        programs[key] = InputProgram(where, key_expr, tuple(args))
    for out, aggregate, _ in aggregates:
        if aggregate.returns is not None:
            output_types[out] = ChannelType.NUMBER
    if key_mode == "expression":
        output_types["key"] = ChannelType.STRING
    if len(problems) > before:
        return None
    window = flow.window
    windowing = Windowing(
        kind=window.kind,
        size=window.size,
        hop=window.step,
        gap=window.size if window.kind == "session" else 0,
        delay=flow.watermark.delay,
        allowed_lateness=flow.watermark.lateness,
        idle=flow.watermark.idle,
        processing_time=flow.time == "processing",
        emit_empty=flow.emit_empty,
    )
    return CompiledFlow(
        name, source, programs, key_mode, windowing,
        tuple((out, agg) for out, agg, _ in aggregates),
        into, into_stream, output_types, flow.max_keys,
    )  # fmt: skip
