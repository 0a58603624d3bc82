"""The plug-in API: what a processor is, and what the unit gives it.

A processor is a Python class with a pydantic `Config` and a batch lifecycle, run inside the
unit's process (no IPC, no serialisation per update):

```python
from pydantic import BaseModel
from processors.plugin import Output, Processor, Setup

class Smooth(Processor["Smooth.Config"]):
    class Config(BaseModel):
        channel: str
        alpha: float = 0.2

    def setup(self, ctx: Setup) -> None:        # once: check the config against the inputs
        ctx.produces({"smoothed": "number"})
        self.level: dict[str, float] = {}

    def process(self, batch, out: Output) -> None:  # a batch of (StreamKey, SensorUpdate)
        for key, update in batch:
            x = update.channels.get(self.config.channel)
            if x is None:
                continue
            s = self.level.get(key.so, x)
            self.level[key.so] = s = s + self.config.alpha * (x - s)
            out.emit(key, {"smoothed": s}, update.last_update)

    def snapshot(self):  return self.level         # plain data, saved with the checkpoint
    def restore(self, state):  self.level = dict(state)
```

Lifecycle: `setup` once; `process` per batch; `on_window_close` when windows the processor
opened with `ctx.window(...)` close; `snapshot` at every checkpoint and `restore` on start;
`teardown` at shutdown. If `process` raises, the unit rolls the processor back to its state
before the batch, replays the batch one update at a time, and dead-letters only the updates
that fail (reason `processor_failed`), so one bad update neither stops the unit nor corrupts
the processor's state.
"""

from __future__ import annotations

import fnmatch
import inspect
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from processors.engine.windows import WindowOperator
from streams.actuation import Actuation
from streams.codec import update_document
from streams.expressions import (
    CHANNEL_TYPES,
    CompiledExpression,
    ExpressionError,
    StreamScope,
    compile_expression,
)
from streams.expressions import Type as ExpressionType
from streams.expressions.scopes import channel_value_type
from streams.flows.model import WindowDefinition
from streams.objects import ChannelType, Stream
from streams.registry import Registry
from streams.updates import SensorUpdate, StreamKey
from streams.windows.aggregates import Aggregate
from streams.windows.model import Windowing


class Batch(list[tuple[StreamKey, SensorUpdate]]):
    """What `Processor.process` receives: the (key, update) rows it reads, in order (a list,
    as ever), which it may also read as columns (`columns`)."""

    __slots__ = ()

    def columns(self, *channels: str) -> Columns:
        """The batch by column: each update's stream and time, and the values of `channels`
        (None where an update lacks one), for a processor that works on whole columns."""
        keys: list[StreamKey] = []
        times: array[int] = array("q")
        cells: list[dict[str, Any]] = []
        for key, update in self:
            keys.append(key)
            times.append(update.last_update)
            cells.append(update.channels)
        return Columns(keys, times, {c: [u.get(c) for u in cells] for c in channels})


@dataclass(frozen=True, slots=True)
class Columns:
    """A batch read by column (`Batch.columns`): `keys[i]` and `times[i]` are the stream and
    time (ms) of update i, `values[channel][i]` its value of that channel or None."""

    keys: list[StreamKey]
    times: array[int]
    values: dict[str, list[Any]]


TYPE_OF_CHANNEL = {v: k for k, v in CHANNEL_TYPES.items()}


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProcessorError(Exception):
    """A processor cannot run as configured; the message says why (raised from `setup`)."""


class ProcessorOutputError(Exception):
    """A processor emitted something its declared output does not allow."""


C = TypeVar("C", bound=BaseModel)


class Processor(Generic[C]):
    """Base class of every processor. Subclasses set `Config` and override `process`."""

    Config: ClassVar[type[BaseModel]] = NoConfig
    emits: ClassVar[bool] = True  # False: needs no `into` (an actuation rule, say)

    def __init__(self, config: C, name: str) -> None:
        self.config = config
        self.name = name

    def setup(self, ctx: Setup) -> None:
        """Check the config against the inputs, compile what can be compiled, declare the
        output channels (`ctx.produces`); raise ProcessorError to refuse."""

    def process(self, batch: Batch, out: Output) -> None:
        raise NotImplementedError

    def on_window_close(self, closed: Sequence[ClosedWindow], out: Output) -> None:
        """Windows opened with `ctx.window` closed (in order of their end)."""

    def flush(self, out: Output) -> None:
        """Close whatever is still open and emit it (the end of an offline run)."""

    def snapshot(self) -> Any:
        """The processor's state as plain data (msgpack: dicts, lists, numbers, strings)."""
        return None

    def restore(self, state: Any) -> None:
        """Take back what `snapshot` returned (after a restart, or to roll back a batch)."""

    # A batch is all or nothing: if `process` raises, the chain undoes what it did to the
    # state and retries the batch's updates one at a time. By default it does so by copying
    # the state (`snapshot`, through msgpack) before every batch, which costs as much as the
    # state is large. A processor with a large state keeps an undo log instead, costing what
    # the batch changes; `processors.undo.TransactionalDict` is one for state kept per key
    # (the windows a processor opened undo themselves):

    def begin(self) -> bool:
        """A batch starts. Return True if this processor can undo it itself (`rollback`)
        until `commit`; False (the default) and the chain copies the state instead."""
        return False

    def commit(self) -> None:
        """The batch went through: forget its undo log."""

    def rollback(self) -> None:
        """The batch failed: put the state back as it was at `begin`."""

    def teardown(self) -> None:
        """Release what setup acquired."""


# setup -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    key: str  # the group key given to `PluginWindow.add`
    start: int
    end: int
    values: list[Any]  # what was added, in order
    updated: bool = False  # fired again after a late value within the allowed lateness


_COLLECT = Aggregate(
    "collect",
    needs_argument=True,
    numeric=False,
    initial=list,
    add=lambda s, v, _t: [*s, v],
    merge=lambda a, b: [*a, *b],
    result=lambda s, _start, _end: list(s),
    returns=None,
)


class PluginWindow:
    """Windows kept by the unit for a processor: values go in with `add`, and the processor's
    `on_window_close` receives each window when the event-time watermark passes its end.
    The unit snapshots and restores them with the processor; late values are dead-lettered
    (reason `late`), never dropped silently."""

    def __init__(self, windowing: Windowing) -> None:
        self.operator = WindowOperator(windowing, [("values", _COLLECT)])
        self.closed: list[ClosedWindow] = []
        self.late: list[tuple[StreamKey, SensorUpdate, str]] = []

    def add(self, group: str, key: StreamKey, update: SensorUpdate, value: Any = None) -> None:
        """Add `value` (default: the update as plain data) to `group`'s windows at the
        update's event time."""
        if value is None:
            value = {"so": key.so, "stream": key.stream, **update_document(update)}
        fired, late = self.operator.process(group, update.last_update, [value])
        self._fired(fired)
        for item in late:
            self.late.append(
                (key, update, f"update at {item.time} is too late for its window"
                              f" (watermark {item.watermark})")
            )  # fmt: skip

    def _fired(self, fired: Sequence[Any]) -> None:
        for r in fired:
            self.closed.append(
                ClosedWindow(r.key, r.start, r.end, r.values.get("values", []), r.updated)
            )


class Setup:
    """What a processor learns at setup: its name, its inputs and their channels; and what
    it can ask for: compiled expressions, windows, its output's channels."""

    def __init__(self, name: str, inputs: Mapping[StreamKey, Stream], registry: Registry,
                 into: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.inputs = dict(inputs)  # the streams it reads, in order
        self.registry = registry  # every service object, with the streams added so far
        self.into = into  # "{so}/<stream>" or "<so>/<stream>", as configured
        self.windows: list[PluginWindow] = []
        self.output_channels: dict[str, ChannelType] | None = None

    def channels(self, key: StreamKey) -> dict[str, ChannelType]:
        return {c: ch.type for c, ch in self.inputs[key].channels.items()}

    def expression(
        self, text: str, *, expect: str | None = None, what: str = "the expression"
    ) -> dict[StreamKey, CompiledExpression]:
        """`text` compiled once per input stream (over that stream's channels, bare names
        and lastUpdate); ProcessorError naming the stream and the problem otherwise."""
        want = ExpressionType(expect) if expect else None
        out = {}
        for key in self.inputs:
            scope = StreamScope({c: CHANNEL_TYPES[t] for c, t in self.channels(key).items()})
            try:
                out[key] = compile_expression(text, scope, expect=want, what=what)
            except ExpressionError as exc:
                raise ProcessorError(f"on {key.so}/{key.stream}: {exc}") from None
        return out

    def produces(self, channels: Mapping[str, ChannelType | str]) -> None:
        """Declare the channels of the output stream (default: the inputs' channels)."""
        try:
            self.output_channels = {c: ChannelType(t) for c, t in channels.items()}
        except ValueError as exc:
            raise ProcessorError(
                f"output channels: {exc} (types: {', '.join(t.value for t in ChannelType)})"
            ) from None

    def window(self, window: WindowDefinition | Mapping[str, Any], *, lateness: int = 0,
               delay: int = 0) -> PluginWindow:  # fmt: skip
        """Event-time windows ({tumbling: 10m}, {hopping: 1h, every: 10m}, {sliding: 5m},
        {session: 5m}, {count: 100}) whose closing calls `on_window_close`."""
        spec = window if isinstance(window, WindowDefinition) else WindowDefinition(**window)
        opened = PluginWindow(
            Windowing(
                kind=spec.kind, size=spec.size, hop=spec.step,
                gap=spec.size if spec.kind == "session" else 0,
                delay=delay, allowed_lateness=lateness,
            )
        )  # fmt: skip
        self.windows.append(opened)
        return opened

    def action(self, so: str, action: str) -> None:
        """Check that `so` exists and declares `action`; ProcessorError otherwise."""
        found = self.registry.objects.get(so)
        if found is None:
            raise ProcessorError(f"unknown service object {so!r}")
        if found.action(action) is None:
            declared = ", ".join(a.name for a in found.actions) or "none"
            raise ProcessorError(f"{so!r} has no action {action!r} (its actions: {declared})")


# output ------------------------------------------------------------------------------------


@dataclass
class Output:
    """Where a processor puts what it produces during one call."""

    into_so: str | None  # None: the object of the stream an output derives from
    into_stream: str | None
    channels: Mapping[str, ChannelType]
    registry: Registry
    derived: list[tuple[StreamKey, SensorUpdate]] = field(default_factory=list)
    actuations: list[Actuation] = field(default_factory=list)
    rejected: list[tuple[StreamKey, SensorUpdate, str, bool]] = field(default_factory=list)

    def reject(self, key: StreamKey, update: SensorUpdate, message: str, *, late: bool = False
               ) -> None:  # fmt: skip
        """Dead-letter an input update with a reason (`late`, or `processor_failed`), and go
        on with the rest of the batch."""
        self.rejected.append((key, update, message, late))

    def emit(self, source: StreamKey | str, channels: Mapping[str, Any], at: int) -> None:
        """An update of the output stream at event time `at` (ms), for the object of
        `source` (a StreamKey or an object id) unless the output names a fixed object."""
        if self.into_stream is None:
            raise ProcessorOutputError("this processor has no output stream (no `into`)")
        so = self.into_so or (source.so if isinstance(source, StreamKey) else source)
        for name, value in channels.items():
            declared = self.channels.get(name)
            if declared is None:
                raise ProcessorOutputError(
                    f"emitted channel {name!r}, which the output does not declare"
                    f" (it has: {', '.join(self.channels)})"
                )
            if value is not None and not channel_value_type(value, declared):
                raise ProcessorOutputError(
                    f"emitted {value!r} for channel {name!r}, declared {declared.value}"
                )
        values = {k: v for k, v in channels.items() if v is not None}
        if not values:
            raise ProcessorOutputError("emitted an update without any channel value")
        self.derived.append((StreamKey(so, self.into_stream), SensorUpdate(values, int(at))))

    def act(self, so: str, action: str, parameters: Mapping[str, Any], at: int) -> None:
        """A command for a device: `action` of service object `so`, issued at `at` (ms)."""
        found = self.registry.objects.get(so)
        if found is None or found.action(action) is None:
            raise ProcessorOutputError(
                f"commanded {so!r} to {action!r}, which it does not declare"
                if found is not None
                else f"commanded unknown service object {so!r}"
            )
        self.actuations.append(Actuation(so, action, dict(parameters), issued_at=int(at)))


# decorated functions -----------------------------------------------------------------------


def processor(
    _fn: Callable[..., Any] | None = None,
    *,
    config: type[BaseModel] = NoConfig,
    produces: Mapping[str, str] | None = None,
) -> Any:
    """A processor from a function of one update, for the stateless simple case:

    ```python
    @processor(config=Scale, produces={"fahrenheit": "number"})
    def to_fahrenheit(key, update, config):
        c = update.channels.get("temperature")
        return None if c is None else {"fahrenheit": c * 9 / 5 + 32}
    ```

    It returns the output's channels (a dict), or None to emit nothing; the output update
    keeps the input's lastUpdate. An exception dead-letters that update.
    """

    def wrap(fn: Callable[..., Any]) -> type[Processor[Any]]:
        takes_config = len(inspect.signature(fn).parameters) >= 3

        class FunctionProcessor(Processor[Any]):
            Config = config

            def setup(self, ctx: Setup) -> None:
                if produces is not None:
                    ctx.produces(produces)

            def process(self, batch: Batch, out: Output) -> None:
                for key, update in batch:
                    values = fn(key, update, self.config) if takes_config else fn(key, update)
                    if values is not None:
                        out.emit(key, values, update.last_update)

        FunctionProcessor.__name__ = FunctionProcessor.__qualname__ = fn.__name__
        FunctionProcessor.__doc__ = fn.__doc__
        FunctionProcessor.__module__ = fn.__module__
        return FunctionProcessor

    return wrap(_fn) if _fn is not None else wrap


def matches(key: StreamKey, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(f"{key.so}/{key.stream}", p) for p in patterns)
