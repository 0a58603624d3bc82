"""The built-in processors, plug-ins like any other (entry points in pyproject.toml):
filter, derive, window, threshold, dedupe, downsample, zscore and actuate.

Expressions are the flow language (see the README), compiled once per input stream at setup.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from typing import Any, Literal

import orjson
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
from streams.codec import update_document
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

_NEW, _NONE = object(), object()  # ZScore's undo log: a new stream; nothing pushed out


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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
        min_interval: int = 0

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


class Dedupe(Processor["Dedupe.Config"]):
    """Drop repeats: an update equal to one seen on the same stream within `within` of event
    time (by default equal = same lastUpdate and same channel values, the duplicate a QoS 1
    redelivery or a device's retry makes; `by` compares only the channels named). Memory is
    bounded by `max_entries` per stream: the oldest are forgotten first."""

    class Config(_Config):
        by: list[str] | None = None
        within: int = 3_600_000
        max_entries: int = Field(default=10_000, ge=1)

        _within = field_validator("within", mode="before")(lambda cls, v: _duration(v))

    def setup(self, ctx: Setup) -> None:
        for key in ctx.inputs:
            missing = set(self.config.by or ()) - set(ctx.channels(key))
            if missing:
                raise ProcessorError(f"by: {key.so}/{key.stream} has no channel"
                                     f" {', '.join(sorted(missing))}")  # fmt: skip
        # stream -> fingerprint -> (event time, entry number), and the entries in the order
        # they were made; an entry whose number is no longer its fingerprint's is stale
        self.seen: dict[str, dict[str, tuple[int, int]]] = {}
        self.order: dict[str, deque[tuple[str, int, int]]] = {}
        self._made = 0
        # While a batch may still be undone: what it changed, to take back in reverse. A copy
        # of the whole state per batch would cost max_entries x streams (0.8 s at 200 streams).
        self._undo: list[tuple[Any, ...]] | None = None

    def _fingerprint(self, update: Any) -> str:
        doc = update_document(update)
        if self.config.by is None:
            shown = [doc["lastUpdate"], doc["channels"]]
        else:
            shown = [doc["channels"].get(c) for c in self.config.by]
        data = orjson.dumps(shown, option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(data, digest_size=12).hexdigest()

    def process(self, batch: Batch, out: Output) -> None:
        undo = self._undo
        within, most = self.config.within, self.config.max_entries
        for key, update in batch:
            stream = f"{key.so}/{key.stream}"
            seen = self.seen.get(stream)
            if seen is None:
                seen = self.seen[stream] = {}
                order = self.order[stream] = deque()
                if undo is not None:
                    undo.append(("stream", stream))
            else:
                order = self.order[stream]
            t = update.last_update
            fp = self._fingerprint(update)
            last = seen.get(fp)
            if last is not None and abs(t - last[0]) <= within:
                continue
            self._made += 1
            seen[fp] = (t, self._made)
            order.append((fp, t, self._made))
            if undo is not None:
                undo.append(("seen", stream, fp, last))
            horizon = t - within
            while order:  # forget the oldest while too many, or too old
                entry = order[0]
                live = seen.get(entry[0]) == (entry[1], entry[2])  # else seen again since
                if live and len(seen) <= most and entry[1] >= horizon:
                    break
                order.popleft()
                if undo is not None:
                    undo.append(("popped", stream, entry))
                if live:
                    del seen[entry[0]]
                    if undo is not None:
                        undo.append(("forgot", stream, entry))
            if undo is None:
                self._compact(stream)
            out.emit(key, update.channels, t)

    def _compact(self, stream: str) -> None:
        """Keep stale entries from outgrowing the live ones (a stream whose updates repeat
        outside `within` re-enters the same fingerprints)."""
        order, seen = self.order[stream], self.seen[stream]
        if len(order) > 2 * len(seen) + 64:
            self.order[stream] = deque(e for e in order if seen.get(e[0]) == (e[1], e[2]))

    def begin(self) -> bool:
        self._undo = []
        return True

    def commit(self) -> None:
        undo, self._undo = self._undo or [], None
        for stream in {step[1] for step in undo}:
            if stream in self.order:
                self._compact(stream)

    def rollback(self) -> None:
        undo, self._undo = self._undo or [], None
        for step in reversed(undo):
            kind, stream = step[0], step[1]
            if kind == "stream":
                del self.seen[stream], self.order[stream]
            elif kind == "seen":
                fp, last = step[2], step[3]
                self.order[stream].pop()
                if last is None:
                    del self.seen[stream][fp]
                else:
                    self.seen[stream][fp] = last
            elif kind == "popped":
                self.order[stream].appendleft(step[2])
            else:  # "forgot"
                fp, t, n = step[2]
                self.seen[stream][fp] = (t, n)

    def snapshot(self) -> Any:
        # fingerprint -> event time, oldest first (the order they would be forgotten in)
        return {
            stream: {fp: t for fp, t, n in self.order[stream] if seen.get(fp) == (t, n)}
            for stream, seen in self.seen.items()
        }

    def restore(self, state: Any) -> None:
        self.seen, self.order, self._undo, self._made = {}, {}, None, 0
        for stream, entries in (state or {}).items():
            order: deque[tuple[str, int, int]] = deque()
            for fp, t in entries.items():
                self._made += 1
                order.append((fp, t, self._made))
            self.order[stream] = order
            self.seen[stream] = {fp: (t, n) for fp, t, n in order}


class Downsample(Processor["Downsample.Config"]):
    """At most one update per stream per `every` of event time: the first of each aligned
    interval (align: true), or the first at least `every` after the last one passed
    (align: false, a rate limit)."""

    class Config(_Config):
        every: int
        align: bool = True

        _every = field_validator("every", mode="before")(lambda cls, v: _duration(v))

        @field_validator("every")
        @classmethod
        def _positive(cls, value: int) -> int:
            if value <= 0:
                raise ValueError("every must be a positive duration")
            return value

    def setup(self, ctx: Setup) -> None:
        self.last: TransactionalDict[str, int] = TransactionalDict()

    def process(self, batch: Batch, out: Output) -> None:
        every = self.config.every
        for key, update in batch:
            name = f"{key.so}/{key.stream}"
            t = update.last_update
            mark = t - t % every if self.config.align else t
            last = self.last.get(name)
            if last is not None and (mark <= last if self.config.align else mark - last < every):
                continue
            self.last[name] = mark
            out.emit(key, update.channels, t)

    def begin(self) -> bool:
        return self.last.begin()

    def commit(self) -> None:
        self.last.commit()

    def rollback(self) -> None:
        self.last.rollback()

    def snapshot(self) -> Any:
        return self.last.data

    def restore(self, state: Any) -> None:
        self.last = TransactionalDict(state or {})


class ZScore(Processor["ZScore.Config"]):
    """Anomalies by z-score: each value against the mean and standard deviation of the
    stream's previous `samples` values; |z| >= `threshold` is an anomaly. Emits anomalies only
    (emit: anomalies) or every scored value (emit: all)."""

    class Config(_Config):
        value: str
        samples: int = Field(default=100, ge=2, le=100_000)
        threshold: float = Field(default=3.0, gt=0)
        min_samples: int = Field(default=10, ge=2)
        emit: Literal["anomalies", "all"] = "anomalies"

    def setup(self, ctx: Setup) -> None:
        self.value = ctx.expression(self.config.value, expect="number", what="value")
        ctx.produces({"value": "number", "mean": "number", "stddev": "number",
                      "zscore": "number", "anomaly": "boolean"})  # fmt: skip
        self.history: dict[str, deque[float]] = {}
        # While a batch may still be undone: per value added, its stream and what it pushed
        # out of the full history (_NEW: the stream's first value; _NONE: nothing)
        self._undo: list[tuple[str, Any]] | None = None

    def process(self, batch: Batch, out: Output) -> None:
        c = self.config
        for key, update in batch:
            v = _number(self.value[key].evaluate({"": update}), "value")
            if v is None or not math.isfinite(v):
                continue
            name = f"{key.so}/{key.stream}"
            history = self.history.get(name)
            if history is None:
                history = self.history[name] = deque(maxlen=c.samples)
                if self._undo is not None:
                    self._undo.append((name, _NEW))
            if len(history) >= c.min_samples:
                n = len(history)
                mean = math.fsum(history) / n
                std = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / (n - 1))
                # A constant history: any other value is an anomaly, its z-score unbounded.
                z = (v - mean) / std if std else None
                anomaly = abs(z) >= c.threshold if z is not None else v != mean
                if anomaly or c.emit == "all":
                    out.emit(key, {"value": v, "mean": mean, "stddev": std, "zscore": z,
                                   "anomaly": anomaly}, update.last_update)  # fmt: skip
            if self._undo is not None:
                self._undo.append((name, history[0] if len(history) == c.samples else _NONE))
            history.append(v)

    def begin(self) -> bool:
        self._undo = []
        return True

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        undo, self._undo = self._undo or [], None
        for name, before in reversed(undo):
            if before is _NEW:
                del self.history[name]
                continue
            history = self.history[name]
            history.pop()
            if before is not _NONE:
                history.appendleft(before)

    def snapshot(self) -> Any:
        return {k: list(v) for k, v in self.history.items()}

    def restore(self, state: Any) -> None:
        n = self.config.samples
        self.history = {k: deque(v, maxlen=n) for k, v in (state or {}).items()}
        self._undo = None
