"""The built-in processors, plug-ins like any other (entry points in pyproject.toml):
filter, derive, window, threshold and actuate here; dedupe, downsample and zscore, which keep
a history per stream, in `processors.cleaning`.

Expressions are the flow language (see the README), compiled once per input stream at setup.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from processors.engine.composite import CompositeEngine
from processors.engine.flows import FlowEngine
from processors.plugin import (
    TYPE_OF_CHANNEL,
    Batch,
    Output,
    Processor,
    ProcessorError,
    Setup,
)
from processors.undo import TransactionalDict
from streams.composite_plan import CompositePlan
from streams.expressions import NOT_AVAILABLE, CompiledExpression
from streams.flows.compile import compile_flows, compile_rules
from streams.flows.model import (
    ActDefinition,
    FlowDefinition,
    RuleDefinition,
    Watermark,
    WindowDefinition,
    duration_ms,
)
from streams.registry import Problem, Registry
from streams.updates import StreamKey


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# A config field holding a duration ("10m", "500ms" or milliseconds), said so in its schema
DURATION: dict[str, Any] = {"format": "duration", "description": 'milliseconds, or "10s", "5m"'}


def _duration(value: Any) -> int:
    return duration_ms(value)


def _number(value: Any, what: str) -> float | None:
    if value is NOT_AVAILABLE or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must give a number, got {value!r}")
    return float(value)


class Filter(Processor["Filter.Config"]):
    """Pass on the updates for which `where` is true (same channels as the input)."""

    class Config(_Config):
        where: str

    def setup(self, ctx: Setup) -> None:
        self.where = ctx.expression(self.config.where, expect="boolean", what="where")

    def process(self, batch: Batch, out: Output) -> None:
        for key, update in batch:
            if self.where[key].evaluate({"": update}) is True:
                out.emit(key, update.channels, update.last_update)


class Derive(Processor["Derive.Config"]):
    """New channels computed from each update (`keep` carries the input's channels too)."""

    class Config(_Config):
        channels: dict[str, str] = Field(min_length=1)
        keep: bool = False

    def setup(self, ctx: Setup) -> None:
        self.programs: dict[StreamKey, dict[str, CompiledExpression]] = {k: {} for k in ctx.inputs}
        types: dict[str, Any] = {}
        for name, text in self.config.channels.items():
            for key, expr in ctx.expression(text, what=f"channel {name!r}").items():
                self.programs[key][name] = expr
                kind = TYPE_OF_CHANNEL.get(expr.type)
                if kind is None:
                    raise ProcessorError(
                        f"channel {name!r}: cannot tell the type of {text!r} on"
                        f" {key.so}/{key.stream} ({expr.type.value})"
                    )
                if types.setdefault(name, kind) is not kind:
                    raise ProcessorError(f"channel {name!r} differs in type between inputs")
        if self.config.keep:
            for key in ctx.inputs:
                for channel, kind in ctx.channels(key).items():
                    if channel in types and channel not in self.config.channels:
                        if types[channel] is not kind:
                            raise ProcessorError(f"kept channel {channel!r} differs between inputs")
                    types.setdefault(channel, kind)
        ctx.produces(types)

    def process(self, batch: Batch, out: Output) -> None:
        for key, update in batch:
            env = {"": update}
            values: dict[str, Any] = dict(update.channels) if self.config.keep else {}
            for name, expr in self.programs[key].items():
                value = expr.evaluate(env)
                if value is not NOT_AVAILABLE and value is not None:
                    values[name] = value
            if values:
                out.emit(key, values, update.last_update)


def _refuse(problems: list[Problem]) -> None:
    """Problems from compiling a flow or a rule, raised as one ProcessorError."""
    if problems:
        raise ProcessorError("; ".join(p.message for p in problems))


def _engine(flows: list[Any], rules: list[Any]) -> FlowEngine:
    plan, _ = CompositePlan.build(Registry({}, {}))
    return FlowEngine(CompositeEngine(plan), flows, rules)


class _OnAnEngine:
    """A processor run by a flow engine: its batches are the engine's transactions (what a
    batch changed is saved as it changes, never a copy of all the state)."""

    engine: FlowEngine

    def begin(self) -> bool:
        self.engine.begin()
        return True

    def commit(self) -> None:
        self.engine.commit()

    def rollback(self) -> None:
        self.engine.rollback()


class Window(_OnAnEngine, Processor["Window.Config"]):
    """A windowed aggregate, exactly as a flow's (event time, same window kinds, aggregates,
    watermark and late-data handling), as a processor."""

    class Config(_Config):
        window: WindowDefinition
        aggregates: dict[str, str] = Field(min_length=1)
        where: str | None = None
        key: str = "so"
        watermark: Watermark = Watermark()
        emit_empty: bool = False

    def setup(self, ctx: Setup) -> None:
        if ctx.into is None:
            raise ProcessorError("a window needs into: the stream its results go to")
        c = self.config
        definition = FlowDefinition.model_validate({
            "from": [f"{k.so}/{k.stream}" for k in ctx.inputs], "where": c.where, "key": c.key,
            "window": c.window, "watermark": c.watermark, "emit_empty": c.emit_empty,
            "aggregates": c.aggregates, "into": ctx.into,
        })  # fmt: skip
        problems: list[Problem] = []
        _, flows = compile_flows(ctx.registry, [("", self.name, definition)], problems)
        _refuse(problems)
        ctx.produces(flows[0].output_channels)
        self.engine = _engine(flows, [])

    def process(self, batch: Batch, out: Output) -> None:
        result = self.engine.process(batch)
        for key, update in result.derived:
            out.emit(key.so, update.channels, update.last_update)
        for late in result.late:
            out.reject(late.key, late.update, late.rejection.message, late=True)
        for rejection in result.rejected:
            raise ProcessorError(rejection.message)

    def snapshot(self) -> Any:
        return self.engine.snapshot()

    def restore(self, state: Any) -> None:
        if state:
            self.engine.restore(state)

    def flush(self, out: Output) -> None:
        for key, update in self.engine.flush().derived:
            out.emit(key.so, update.channels, update.last_update)


class Actuate(_OnAnEngine, Processor["Actuate.Config"]):
    """An actuation rule: when `if` holds on an update, command `so` to `action` (at most once
    per `min_interval` of event time per target). `so` may be {so} or {customFields.<name>}."""

    emits = False

    class Config(_Config):
        condition: str = Field(alias="if")
        so: str
        action: str
        parameters: dict[str, Any] = {}
        min_interval: int = Field(0, json_schema_extra=DURATION)

        _interval = field_validator("min_interval", mode="before")(lambda cls, v: _duration(v))

    def setup(self, ctx: Setup) -> None:
        c = self.config
        definition = RuleDefinition.model_validate({
            "when": [f"{k.so}/{k.stream}" for k in ctx.inputs], "if": c.condition,
            "act": ActDefinition(so=c.so, action=c.action, parameters=c.parameters),
            "min_interval": c.min_interval,
        })  # fmt: skip
        problems: list[Problem] = []
        rules = compile_rules(ctx.registry, [("", self.name, definition)], problems)
        _refuse(problems)
        self.engine = _engine([], rules)

    def process(self, batch: Batch, out: Output) -> None:
        result = self.engine.process(batch)
        for rejection in result.rejected:
            raise ProcessorError(rejection.message)
        for command in result.actuations:
            out.act(command.so, command.action, command.parameters, command.issued_at)

    def snapshot(self) -> Any:
        return [[rule, target, t] for (rule, target), t in self.engine.last_command.items()]

    def restore(self, state: Any) -> None:
        self.engine.last_command = {(r, target): t for r, target, t in state or []}


class Threshold(Processor["Threshold.Config"]):
    """An alert stream with hysteresis: `active` turns true when `value` reaches `high`
    (direction above) and false only once it falls to `low`, so a value hovering at the limit
    does not flap. Direction below mirrors it (true at or under `low`, false at `high`)."""

    class Config(_Config):
        value: str
        high: float
        low: float
        direction: Literal["above", "below"] = "above"
        emit: Literal["changes", "all"] = "changes"

        @model_validator(mode="after")
        def _ordered(self) -> Threshold.Config:
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
            return self

    def setup(self, ctx: Setup) -> None:
        self.value = ctx.expression(self.config.value, expect="number", what="value")
        ctx.produces({"active": "boolean", "value": "number"})
        self.active: TransactionalDict[str, bool] = TransactionalDict()

    def process(self, batch: Batch, out: Output) -> None:
        c = self.config
        for key, update in batch:
            v = _number(self.value[key].evaluate({"": update}), "value")
            if v is None:
                continue
            name = f"{key.so}/{key.stream}"
            was = self.active.get(name)
            if c.direction == "above":
                now = v >= c.high if not was else v > c.low
            else:
                now = v <= c.low if not was else v < c.high
            self.active[name] = now
            if c.emit == "all" or was is None or now != was:
                out.emit(key, {"active": now, "value": v}, update.last_update)

    def begin(self) -> bool:
        return self.active.begin()

    def commit(self) -> None:
        self.active.commit()

    def rollback(self) -> None:
        self.active.rollback()

    def snapshot(self) -> Any:
        return self.active.data

    def restore(self, state: Any) -> None:
        self.active = TransactionalDict(state or {})
