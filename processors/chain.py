"""Processors named in a unit's config, resolved, checked and run in order.

```yaml
processors:
  - use: threshold                 # an entry point of group cloudlet.processors,
    name: congestion               #   or module:Class while developing
    from: "junction-*/traffic"     # so/stream patterns, as in flows
    into: "{so}/congestion"        # the stream it adds ({so}: the input's object)
    config: {value: vehicles, high: 40, low: 25}
```

Each processor reads the device updates, the flows' derived updates and the outputs of the
processors before it; its output stream is added to its service objects like a flow's, so the
ones after it, the cloud and the dashboard read it like any other stream.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from processors.engine.graph import Graph, Run
from processors.plugin import (
    Batch,
    ClosedWindow,
    Output,
    PluginWindow,
    Processor,
    ProcessorError,
    Setup,
    matches,
)
from streams.actuation import Actuation
from streams.expressions import EvaluationError
from streams.flows.model import StreamPatterns
from streams.objects import Channel, ChannelType, Stream
from streams.registry import Problem, Registry, validation_problems
from streams.rejections import Rejection, RejectReason
from streams.updates import SensorUpdate, StreamKey

ENTRY_POINT_GROUP = "cloudlet.processors"
log = logging.getLogger(__name__)


class ProcessorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    use: str
    name: str | None = None
    inputs: StreamPatterns = Field(alias="from")
    into: str | None = None
    config: dict[str, Any] = {}

    @field_validator("into")
    @classmethod
    def _into(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "/" not in value:
            value = "{so}/" + value
        if value.count("/") != 1 or not all(value.split("/")):
            raise ValueError(f"into {value!r} must be <stream>, {{so}}/<stream> or <so>/<stream>")
        return value

    @property
    def instance(self) -> str:
        return self.name or self.use


# discovery ---------------------------------------------------------------------------------


def installed() -> dict[str, str]:
    """Processor name -> where it comes from, for every installed plug-in (built-ins too)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def foreign(uses: Iterable[str]) -> list[str]:
    """Those of `uses` that load code other than cloudlet's own: module:Class, or a name some
    other distribution installs."""
    ours = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.dist is not None and ep.dist.name == "cloudlet"}  # fmt: skip
    theirs = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} - ours
    return [use for use in uses if use not in ours or use in theirs]


def resolve(use: str) -> type[Processor[Any]]:
    """The processor class `use` names: an installed entry point, or module:Class."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == use]
    try:
        if found:
            target = found[0].load()
        elif ":" in use:
            module, _, attr = use.partition(":")
            target = getattr(importlib.import_module(module), attr)
        else:
            names = ", ".join(sorted(installed())) or "none"
            raise ProcessorError(f"unknown processor {use!r} (installed: {names}; or module:Class)")
    except ProcessorError:
        raise
    except Exception as exc:  # a plug-in's import can fail in any way: say which and why
        what = f"{type(exc).__name__}: {exc}"
        raise ProcessorError(f"cannot load processor {use!r}: {what}") from None
    if not (isinstance(target, type) and issubclass(target, Processor)):
        raise ProcessorError(f"{use!r} is not a Processor subclass (got {target!r})")
    return target


# running -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Item:
    key: StreamKey
    update: SensorUpdate
    origin: Any = None  # what it came from (the runtime's device message), for dead letters


@dataclass(slots=True)
class Failure:
    item: Item
    rejection: Rejection


@dataclass(slots=True)
class ChainResult:
    derived: list[Item] = field(default_factory=list)
    actuations: list[Actuation] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)


@dataclass(slots=True)
class StageCounts:
    received: int = 0
    emitted: int = 0
    failed: int = 0
    seconds: float = 0.0


class Stage:
    """One configured processor with its output and windows."""

    def __init__(self, spec: ProcessorSpec, processor: Processor[Any], inputs: set[StreamKey],
                 output: Output, windows: list[PluginWindow]) -> None:  # fmt: skip
        self.spec = spec
        self.name = spec.instance
        self.processor = processor
        self.inputs = inputs
        self._output = output
        self.windows = windows
        self.counts = StageCounts()
        self.last_saved: Any = None  # the last state that could be saved

    def output(self) -> Output:
        o = self._output
        return Output(o.into_so, o.into_stream, o.channels, o.registry)

    def run(self, items: Sequence[Item], result: ChainResult) -> list[Item]:
        """Run the processor over the items it reads; what it emitted, as new items."""
        mine = [it for it in items if it.key in self.inputs]
        if not mine:
            return []
        started = time.perf_counter()
        self.counts.received += len(mine)
        try:
            undo = self._begin()
        except Exception as exc:  # state that cannot be saved: this batch cannot be undone
            for item in mine:
                self._failed(item, SnapshotError(f"its state cannot be saved: {exc}"), result)
            return []
        try:
            emitted = self._call(mine, result, origin=mine[0].origin if len(mine) == 1 else None)
            self._commit(undo)
        except Exception:
            # Roll back and find the updates that fail, one at a time; keep the others.
            self._rollback(undo)
            emitted = []
            for item in mine:
                before = self._begin()
                try:
                    emitted += self._call([item], result, origin=item.origin)
                    self._commit(before)
                except Exception as exc:
                    self._rollback(before)
                    self._failed(item, exc, result)
        self.counts.emitted += len(emitted)
        self.counts.seconds += time.perf_counter() - started
        return emitted

    _OWN_UNDO = object()  # the processor keeps its own undo log for this batch

    def _begin(self) -> Any:
        """What undoes the coming batch: the processor's own log (and its windows' own), or
        a copy of the state."""
        if self.processor.begin():
            for w in self.windows:
                w.operator.begin()
            return Stage._OWN_UNDO
        return self.save()

    def _commit(self, undo: Any) -> None:
        if undo is Stage._OWN_UNDO:
            self.processor.commit()
            for w in self.windows:
                w.operator.commit()

    def _rollback(self, undo: Any) -> None:
        if undo is Stage._OWN_UNDO:
            self.processor.rollback()
            for w in self.windows:
                w.operator.rollback()
        else:
            self.load(undo)
        for w in self.windows:  # what the failed batch closed or found late is undone too
            w.closed, w.late = [], []

    def _call(self, items: list[Item], result: ChainResult, origin: Any) -> list[Item]:
        out = self.output()
        by_id = {id(it.update): it for it in items}
        self.processor.process(Batch((it.key, it.update) for it in items), out)
        late = self._close_windows(out)
        result.actuations.extend(out.actuations)
        rejected = [*((k, u, m, True) for k, u, m in late), *out.rejected]
        for key, update, message, is_late in rejected:
            item = by_id.get(id(update), Item(key, update, origin))
            reason = RejectReason.LATE if is_late else RejectReason.PROCESSOR_FAILED
            self.counts.failed += 1
            result.failed.append(Failure(item, Rejection(
                reason, f"{key.so}/{key.stream}: processor {self.name!r}: {message}",
                key.so, key.stream)))  # fmt: skip
        return [Item(k, u, origin) for k, u in out.derived]

    def _close_windows(self, out: Output) -> list[tuple[StreamKey, SensorUpdate, str]]:
        closed: list[ClosedWindow] = []
        late = []
        for w in self.windows:
            closed += w.closed
            late += w.late
            w.closed, w.late = [], []
        if closed:
            closed.sort(key=lambda c: c.end)
            self.processor.on_window_close(closed, out)
        return late

    def _failed(self, item: Item, exc: Exception, result: ChainResult) -> None:
        self.counts.failed += 1
        k = item.key
        if isinstance(exc, EvaluationError):
            reason, what = RejectReason.EXPRESSION_FAILED, str(exc)
        else:
            reason, what = RejectReason.PROCESSOR_FAILED, f"{type(exc).__name__}: {exc}"
        message = f"{k.so}/{k.stream}: processor {self.name!r} failed: {what}"
        log.warning("%s", message)
        result.failed.append(Failure(item, Rejection(reason, message, k.so, k.stream)))

    def flush(self, result: ChainResult) -> list[Item]:
        """Close every open window (the end of an offline run)."""
        for w in self.windows:
            w._fired(w.operator.flush())
        out = self.output()
        try:
            self._close_windows(out)
            self.processor.flush(out)
        except Exception as exc:
            log.error("processor %r failed closing its windows: %s: %s", self.name,
                      type(exc).__name__, exc)  # fmt: skip
            return []
        result.actuations.extend(out.actuations)
        return [Item(k, u) for k, u in out.derived]

    def save(self) -> Any:
        # Through msgpack: a real copy (so a rollback is one), and proof it can be saved.
        state = {
            "state": self.processor.snapshot(),
            "windows": [w.operator.snapshot() for w in self.windows],
        }
        saved = msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False,
                                strict_map_key=False)  # fmt: skip
        self.last_saved = saved
        return saved

    def load(self, saved: Any) -> None:
        for w, data in zip(self.windows, saved.get("windows", []), strict=False):
            w.operator.restore(data)
        self.processor.restore(saved.get("state"))


class SnapshotError(Exception):
    """A processor's snapshot() is not plain data."""


class StageNode:
    """A processor as a node of the graph: each batch, every update it reads (the devices',
    the flows', the processors' before it) in order, in one call; what it emits carries the
    input it came from when it came from one (a batch of one), else none."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.name = f"processor {stage.name!r}"
        self.rank = 0
        o = stage._output
        self._produces = (
            set()
            if o.into_stream is None
            else {StreamKey(o.into_so or k.so, o.into_stream) for k in stage.inputs}
        )

    def reads(self) -> Collection[StreamKey]:
        return self.stage.inputs

    def produces(self) -> Collection[StreamKey]:
        return self._produces

    def timed(self) -> bool:
        return False

    def run(self, run: Run) -> None:
        result = ChainResult()
        entries = run.inputs(self.stage.inputs)
        emitted = self.stage.run([Item(e[3], e[4], e[0]) for e in entries], result)
        if run.mode == "flush":  # the end of an offline run: what it still holds
            emitted += self.stage.flush(result)
        end, rank = run.end, self.rank
        for it in emitted:
            run.produce(end if it.origin is None else it.origin, rank, it.key, it.update)
        for actuation in result.actuations:
            run.actuations.append((end, rank, run.next(), actuation))
        for f in result.failed:
            at = end if f.item.origin is None else f.item.origin
            run.failed.append((at, rank, run.next(), (f.item.key, f.item.update, f.rejection)))


class Chain:
    """The unit's processors, in config order: graph nodes (`nodes`) that the flow engine runs
    after its own, or a graph of their own (`process`)."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = stages
        self._graph: Graph | None = None

    def __len__(self) -> int:
        return len(self.stages)

    def nodes(self) -> list[StageNode]:
        return [StageNode(stage) for stage in self.stages]

    def process(self, items: Sequence[Item]) -> ChainResult:
        """The processors alone over `items` (each item's origin comes back on what it
        caused)."""
        return self._run(items, "batch")

    def flush(self) -> ChainResult:
        """Close every open window (the end of an offline run)."""
        return self._run([], "flush")

    def _run(self, items: Sequence[Item], mode: str) -> ChainResult:
        if self._graph is None:
            self._graph = Graph(self.nodes())
        run = self._graph.run([(it.key, it.update) for it in items], 0, mode)

        def origin(at: int) -> Any:
            return items[at].origin if at < len(items) else None

        result = ChainResult()
        result.derived = [Item(e[3], e[4], origin(e[0])) for e in run.derived]
        result.actuations = [a[3] for a in run.actuations]
        result.failed = [Failure(Item(k, u, origin(at)), rejection)
                         for at, _, _, (k, u, rejection) in run.failed]  # fmt: skip
        return result

    def snapshot(self) -> dict[str, Any]:
        out = {}
        for stage in self.stages:
            try:
                out[stage.name] = stage.save()
            except Exception as exc:  # keep the checkpoint going with the last good state
                log.error("processor %r: its state cannot be saved (%s: %s); the checkpoint"
                          " keeps its last good state", stage.name, type(exc).__name__,
                          exc)  # fmt: skip
                if stage.last_saved is not None:
                    out[stage.name] = stage.last_saved
        return out

    def restore(self, data: dict[str, Any]) -> None:
        for stage in self.stages:
            if stage.name in data:
                stage.load(data[stage.name])

    def teardown(self) -> None:
        for stage in self.stages:
            try:
                stage.processor.teardown()
            except Exception as exc:
                log.error("processor %r failed in teardown: %s", stage.name, exc)


# building ----------------------------------------------------------------------------------


def build_chain(
    registry: Registry, specs: Sequence[ProcessorSpec], source: str
) -> tuple[Chain, Registry, list[Problem]]:
    """Resolve, configure and set up each processor against the registry (extended, as it
    goes, by each one's output stream). Problems name the file, the processor and the field."""
    problems: list[Problem] = []
    objects = dict(registry.objects)
    produced = set(registry.produced)
    stages: list[Stage] = []
    names: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"processors[{i}]"

        def problem(message: str, at: str = "", where: str = where, spec: ProcessorSpec = spec
                    ) -> None:  # fmt: skip
            problems.append(Problem(source, f"processor {spec.instance!r}: {message}", None,
                                    f"{where}{at}"))  # fmt: skip

        if spec.instance in names:
            problem("the name is used twice (set name: to tell them apart)", ".name")
            continue
        names.add(spec.instance)
        try:
            cls = resolve(spec.use)
        except ProcessorError as exc:
            problem(str(exc), ".use")
            continue
        try:
            config = cls.Config.model_validate(spec.config)
        except ValidationError as exc:
            for p in validation_problems(exc, source):
                problems.append(Problem(source, f"processor {spec.instance!r}: {p.message}", None,
                                        f"{where}.config.{p.field}".rstrip(".")))  # fmt: skip
            continue
        current = Registry(objects, registry.sources, produced=frozenset(produced))
        inputs = {
            StreamKey(so_id, s): stream
            for so_id, so in sorted(objects.items())
            for s, stream in so.streams.items()
            if matches(StreamKey(so_id, s), spec.inputs)
        }
        if not inputs:
            problem(f"from {', '.join(spec.inputs)} matches no stream", ".from")
            continue
        processor = cls(config, spec.instance)
        ctx = Setup(spec.instance, inputs, current, spec.into)
        try:
            processor.setup(ctx)
        except (ProcessorError, ValueError) as exc:
            problem(str(exc), ".config")
            continue
        except Exception as exc:  # a plug-in's bug must not hide the other problems
            problem(f"setup failed: {type(exc).__name__}: {exc}")
            continue
        try:
            Stage(spec, processor, set(), Output(None, None, {}, current), ctx.windows).save()
        except Exception as exc:
            problem(f"its snapshot() is not plain data (msgpack): {type(exc).__name__}: {exc}")
            continue
        channels = ctx.output_channels
        if channels is None:
            shapes = {tuple(sorted((c, ch.type) for c, ch in s.channels.items()))
                      for s in inputs.values()}  # fmt: skip
            if len(shapes) > 1 and cls.emits:
                problem("its inputs have different channels; the processor must declare its"
                        " output's (ctx.produces)", ".from")  # fmt: skip
                continue
            channels = dict(next(iter(shapes))) if shapes else {}
        into_so: str | None = None
        into_stream: str | None = None
        if spec.into is not None:
            so_part, into_stream = spec.into.split("/")
            into_so = None if so_part == "{so}" else so_part
            ok = True
            for so_id in [into_so] if into_so else sorted({k.so for k in inputs}):
                so = objects.get(so_id)
                if so is None:
                    problem(f"into names unknown service object {so_id!r}", ".into")
                    ok = False
                    continue
                if into_stream in so.streams:
                    problem(f"into {so_id}/{into_stream}: the stream already exists; a processor"
                            " adds its own output stream", ".into")  # fmt: skip
                    ok = False
                    continue
                stream = Stream(
                    channels={c: Channel(type=ChannelType(t)) for c, t in channels.items()},
                    description=f"produced by processor {spec.instance} ({spec.use})",
                )
                objects[so_id] = so.model_copy(
                    update={"streams": {**so.streams, into_stream: stream}}
                )
                produced.add(StreamKey(so_id, into_stream))
            if not ok:
                continue
        elif cls.emits:
            problem("needs into: the stream its results go to (e.g. {so}/alerts)", ".into")
            continue
        output = Output(into_so, into_stream, dict(channels), current)
        stages.append(Stage(spec, processor, set(inputs), output, ctx.windows))
    extended = Registry(objects, registry.sources, produced=frozenset(produced))
    for stage in stages:
        stage._output.registry = extended
    return Chain(stages), extended, problems
