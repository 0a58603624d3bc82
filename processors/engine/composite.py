"""Composite (derived) streams: ServIoTicy 0.1.0 semantics, compiled once, evaluated in batches.

Semantics, for a derived stream D of service object O:

- D's inputs are the streams of O its expressions name, O's groups (the latest update of the
  group's stream on any member), and D itself (its previous output: the only state).
- An update of any input triggers D, evaluated with the latest value of every other input.
  A trigger whose lastUpdate is not newer than D's last output is discarded, and counted and
  reported as `stale`, never silently.
- pre-filter gates the inputs; then every channel is computed; post-filter gates the result
  (it may read `result`); a missing filter is true. An input never seen makes the result "not
  yet available": no output, counted, not an error.
- The output's lastUpdate is the newest of its inputs'. Outputs feed the derived streams that
  read them in the same pass (one input update: `processors.engine.graph`), in dependency
  order, each evaluated at most once per pass, on its newest trigger.
- Cycles (other than a stream reading itself) are rejected when the plan is built.
- A failed evaluation (division by zero, a value of the wrong type) rejects that one update
  with reason `expression_failed`; processing goes on.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from processors.engine import composite_columns
from streams.accepted import Updates
from streams.composite_plan import CompositePlan, DerivedStream, GroupKey
from streams.expressions import (
    NOT_AVAILABLE,
    CompiledExpression,
    EvaluationError,
    channel_value_type,
)
from streams.expressions.functions import describe
from streams.rejections import Rejection, RejectReason
from streams.updates import GeoPoint, SensorUpdate, StreamKey

if TYPE_CHECKING:
    from processors.engine.graph import Run

# Engine -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Discarded:
    """A trigger a derived stream did not act on, because it was not newer than its output."""

    key: StreamKey
    trigger: StreamKey
    last_update: int
    previous_output: int

    @property
    def message(self) -> str:
        return (
            f"{self.key.so}/{self.key.stream}: trigger from {self.trigger.so}/{self.trigger.stream}"
            f" at {self.last_update} is not newer than the last output at {self.previous_output};"
            " discarded"
        )


@dataclass(slots=True)
class CompositeResult:
    derived: list[tuple[StreamKey, SensorUpdate]] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    discarded: list[Discarded] = field(default_factory=list)


@dataclass(slots=True)
class CompositeCounts:
    derived: int = 0
    stale: int = 0
    filtered: int = 0
    not_available: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "derived": self.derived,
            "stale": self.stale,
            "filtered": self.filtered,
            "not_available": self.not_available,
            "failed": self.failed,
        }


def merge(previous: SensorUpdate | None, update: SensorUpdate) -> SensorUpdate:
    """The latest value of a stream after `update`: newer channel values win, channels an
    update leaves out keep their last value, and an old update never hides a newer one."""
    if previous is None:
        return update
    if update.last_update >= previous.last_update:
        return SensorUpdate({**previous.channels, **update.channels}, update.last_update)
    return SensorUpdate({**update.channels, **previous.channels}, previous.last_update)


class _Log:
    """The values a stream (or a group) takes over one run of the graph, each with the order
    (origin, rank, sequence) at which it took it: `at(origin)` is the as-of join.

    A stream read by columns (`composite_columns`) has a lazy log: its first order and its
    last value are known, the rest is worked out from the run's rows only if asked for."""

    __slots__ = ("_first", "_last", "_pending", "base", "orders", "origins", "values")

    def __init__(self, base: SensorUpdate | None) -> None:
        self.base = base  # the value before the run
        self.orders: list[tuple[int, int, int]] = []
        self.origins: list[int] = []
        self.values: list[SensorUpdate] = []
        self._pending: tuple[Run, StreamKey] | None = None
        self._first: tuple[int, int, int] | None = None
        self._last: SensorUpdate | None = None

    @classmethod
    def lazy(cls, base: SensorUpdate | None, run: Run, key: StreamKey,
             first: tuple[int, int, int] | None, last: SensorUpdate | None) -> _Log:  # fmt: skip
        log = cls(base)
        log._pending, log._first, log._last = (run, key), first, last
        return log

    def fill(self, run: Run, key: StreamKey) -> None:
        """`key`'s updates in the run, merged one after the other."""
        value = self.base
        for entry in run.inputs((key,)):
            value = merge(value, entry[4])
            self.add(entry[:3], value)

    def _materialize(self) -> None:
        if self._pending is not None:
            run, key = self._pending
            self._pending = None
            self.fill(run, key)

    def add(self, order: tuple[int, int, int], value: SensorUpdate) -> None:
        self._materialize()
        self.orders.append(order)
        self.origins.append(order[0])
        self.values.append(value)

    def at(self, origin: int) -> SensorUpdate | None:
        """The value once every update up to and including `origin` has been seen."""
        self._materialize()
        i = bisect_right(self.origins, origin)
        return self.values[i - 1] if i else self.base

    def changes(self) -> list[tuple[tuple[int, int, int], SensorUpdate]]:
        self._materialize()
        return list(zip(self.orders, self.values, strict=True))

    def first(self) -> tuple[int, int, int] | None:
        """The order of the first update of the run (None: none)."""
        if self._pending is not None:
            return self._first
        return self.orders[0] if self.orders else None

    def last(self) -> SensorUpdate | None:
        if self._pending is not None:
            return self._last
        return self.values[-1] if self.values else self.base


class CompositeEngine:
    """The composite streams of a plan: their state (the latest value of every stream they
    read, explicit: snapshot/restore, begin/commit/rollback) and one graph node per derived
    stream (`nodes`), which the flow engine's graph runs with everything else."""

    def __init__(self, plan: CompositePlan) -> None:
        self.plan = plan
        self.latest: dict[StreamKey, SensorUpdate] = {}
        self.group_latest: dict[GroupKey, SensorUpdate] = {}
        self.counts = CompositeCounts()
        # The streams whose latest value matters: read by a derived stream, in a group, or
        # derived. An update of any other stream passes through at the cost of a set lookup.
        self._watched = {
            *plan.readers, *plan.groups_of, *plan.derived,
            *(k for d in plan.derived.values() for k in d.streams.values()),
        }  # fmt: skip
        self._members: dict[GroupKey, list[StreamKey]] = {}
        for member, groups in plan.groups_of.items():
            for group in groups:
                self._members.setdefault(group, []).append(member)
        self._graph: Any = None  # `process` on its own: a graph of the composite streams only

        # The open transaction (`begin`): each latest value before its first change.
        self._undo: dict[StreamKey, SensorUpdate | None] | None = None
        self._undo_groups: dict[GroupKey, SensorUpdate | None] = {}
        self._undo_counts = CompositeCounts()

    def begin(self) -> None:
        """Open a transaction: until `commit`, `rollback` puts every latest value back."""
        self._undo, self._undo_groups = {}, {}
        c = self.counts
        self._undo_counts = CompositeCounts(c.derived, c.stale, c.filtered, c.not_available,
                                            c.failed)  # fmt: skip

    def commit(self) -> None:
        self._undo = None
        self._undo_groups = {}

    def rollback(self) -> None:
        undo, self._undo = self._undo, None
        if undo is None:
            return
        for key, value in undo.items():
            if value is None:
                self.latest.pop(key, None)
            else:
                self.latest[key] = value
        for group, latest in self._undo_groups.items():
            if latest is None:
                self.group_latest.pop(group, None)
            else:
                self.group_latest[group] = latest
        self._undo_groups = {}
        self.counts = self._undo_counts

    def nodes(self) -> list[DerivedNode]:
        """A graph node per derived stream, in dependency order."""
        plan = self.plan
        ordered = sorted(plan.derived.values(), key=lambda d: (plan.rank.get(d.key, 0), d.key))
        out = []
        interned: dict[composite_columns.Programs, composite_columns.Programs] = {}
        for d in ordered:
            triggers = {k for k in d.streams.values() if k != d.key}
            for group in d.groups.values():
                triggers.update(self._members.get(group, ()))
            triggers.discard(d.key)  # reading itself is state, not a trigger
            node = DerivedNode(self, d, triggers)
            node.columns = composite_columns.derivation(d, plan, interned)
            out.append(node)
        return out

    def process(self, updates: Iterable[tuple[StreamKey, SensorUpdate]]) -> CompositeResult:
        """The composite streams alone over a batch (the flow engine runs them in its graph)."""
        from processors.engine.graph import Graph  # the graph is built of this module's nodes

        if self._graph is None:
            self._graph = Graph(self.nodes())
        run = self._graph.run(list(updates), 0, settle=self.settle)
        return CompositeResult(
            [(e[3], e[4]) for e in run.derived],
            [r[3] for r in run.rejected],
            [d[3] for d in run.discarded],
        )

    # The values of one run ---------------------------------------------------------------

    def log(self, run: Run, key: StreamKey) -> _Log:
        """`key`'s latest value over the run (its updates merged one after the other)."""
        logs: dict[StreamKey, _Log] = run.memo.setdefault((self, "streams"), {})
        got = logs.get(key)
        if got is None:
            got = logs[key] = _Log(self.latest.get(key))
            got.fill(run, key)
        return got

    def group_log(self, run: Run, group: GroupKey) -> _Log:
        """A group's value over the run: the latest update of its stream on any member."""
        logs: dict[GroupKey, _Log] = run.memo.setdefault((self, "groups"), {})
        got = logs.get(group)
        if got is None:
            got = logs[group] = _Log(self.group_latest.get(group))
            changes: list[tuple[tuple[int, int, int], SensorUpdate]] = []
            for member in self._members.get(group, ()):
                changes.extend(self.log(run, member).changes())
            changes.sort(key=lambda c: c[0])
            current = got.base
            for order, value in changes:
                if current is None or value.last_update >= current.last_update:
                    current = value
                    got.add(order, current)
        return got

    def settle(self, run: Run) -> None:
        """The latest values once the run is over, kept (and saved for a rollback)."""
        watched = self._watched
        if not watched:
            return
        batch = run.batch
        raw = batch.keys() if isinstance(batch, Updates) else {k for k, _ in batch}
        touched = [(first, key, log) for key in {*raw, *run.produced} if key in watched
                   for log in (self.log(run, key),) if (first := log.first())]  # fmt: skip
        touched.sort(key=lambda t: t[0])  # new keys are kept in the order they came
        groups: dict[GroupKey, None] = {}
        undo = self._undo
        for _, key, log in touched:
            value = log.last()
            if value is None:
                continue
            if undo is not None and key not in undo:
                undo[key] = self.latest.get(key)
            self.latest[key] = value
            groups.update(dict.fromkeys(self.plan.groups_of.get(key, ())))
        for group in sorted(groups, key=lambda g: self.group_log(run, g).first() or ()):
            value = self.group_log(run, group).last()
            if value is None:
                continue
            if undo is not None and group not in self._undo_groups:
                self._undo_groups[group] = self.group_latest.get(group)
            self.group_latest[group] = value

    def evaluate(
        self,
        d: DerivedStream,
        source: StreamKey,
        at: int,
        previous: SensorUpdate | None,
        env: dict[str, SensorUpdate],
        problems: list[Rejection | Discarded],
    ) -> SensorUpdate | None:
        """D's output for a trigger from `source` at `at`, its inputs' values in `env` and
        its own last output `previous`; None when there is none (what went wrong, if anything,
        goes to `problems`)."""
        if previous is not None and at <= previous.last_update:
            self.counts.stale += 1
            problems.append(Discarded(d.key, source, at, previous.last_update))
            return None
        try:
            if d.pre_filter is not None and not self._passes(d.pre_filter, env):
                return None
            channels: dict[str, Any] = {}
            for name, expression, declared in d.channels:
                value = expression.evaluate(env)
                if value is NOT_AVAILABLE or value is None:
                    self.counts.not_available += 1
                    return None
                if not channel_value_type(value, declared):
                    raise EvaluationError(
                        f"channel {name!r} is a {declared.value}, but {expression.source!r}"
                        f" gave {describe(value)}"
                    )
                channels[name] = value
            newest = max((u.last_update for u in env.values()), default=at)
            output = SensorUpdate(channels, max(newest, at))
            if d.post_filter is not None and not self._passes(
                d.post_filter, {**env, "result": output}
            ):
                return None
        except EvaluationError as exc:
            self.counts.failed += 1
            problems.append(
                Rejection(
                    RejectReason.EXPRESSION_FAILED,
                    f"{d.key.so}/{d.key.stream}: {exc}",
                    d.key.so,
                    d.key.stream,
                )
            )
            return None
        self.counts.derived += 1
        return output

    def _passes(self, condition: CompiledExpression, env: Mapping[str, SensorUpdate]) -> bool:
        verdict = condition.evaluate(env)
        if verdict is NOT_AVAILABLE:
            self.counts.not_available += 1
            return False
        if verdict is not True:
            self.counts.filtered += 1
            return False
        return True

    # State -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain data (msgpack/JSON-ready) from which `restore` resumes exactly here."""
        return {
            "latest": [[k.so, k.stream, dump_update(u)] for k, u in self.latest.items()],
            "groups": [[g[0], g[1], dump_update(u)] for g, u in self.group_latest.items()],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.latest = {StreamKey(so, s): load_update(u) for so, s, u in state["latest"]}
        self.group_latest = {(so, g): load_update(u) for so, g, u in state["groups"]}


class DerivedNode:
    """One derived stream in the graph: triggered by its inputs' updates, evaluated at most
    once per input update of the batch (the newest trigger of that update wins), with the
    latest value of every input as of that update."""

    def __init__(self, engine: CompositeEngine, d: DerivedStream, triggers: set[StreamKey]) -> None:
        self.engine = engine
        self.derived = d
        self.triggers = triggers
        self.name = f"derived stream {d.key.so}/{d.key.stream}"
        self.rank = 0
        # how it is computed by columns, when it can be (`composite_columns`)
        self.columns: composite_columns.ColumnDerivation | None = None

    def reads(self) -> Collection[StreamKey]:
        return self.triggers

    def produces(self) -> Collection[StreamKey]:
        return (self.derived.key,)

    def timed(self) -> bool:
        return False

    def run(self, run: Run) -> None:
        if self.columns is not None and composite_columns.run_columns(self, run):
            return
        entries = run.inputs(self.triggers)
        if not entries:
            return
        engine, d, rank = self.engine, self.derived, self.rank
        own = engine.log(run, d.key)  # its own outputs: none produced yet in this run
        problems: list[Rejection | Discarded] = []
        i, n = 0, len(entries)
        while i < n:
            origin = entries[i][0]
            best = entries[i]
            i += 1
            while i < n and entries[i][0] == origin:
                if entries[i][4].last_update > best[4].last_update:
                    best = entries[i]
                i += 1
            previous = own.last()
            env: dict[str, SensorUpdate] = {}
            for name, key in d.streams.items():
                value = previous if key == d.key else engine.log(run, key).at(origin)
                if value is not None:
                    env[name] = value
            for name, group in d.groups.items():
                value = engine.group_log(run, group).at(origin)
                if value is not None:
                    env[name] = value
            at = best[4].last_update
            output = engine.evaluate(d, best[3], at, previous, env, problems)
            for problem in problems:
                if isinstance(problem, Discarded):
                    run.discarded.append((origin, rank, run.next(), problem))
                else:
                    run.reject(origin, rank, problem)
            problems.clear()
            if output is not None:
                run.produce(origin, rank, d.key, output)
                own.add(run.derived[-1][:3], merge(previous, output))


def dump_update(update: SensorUpdate) -> list[Any]:
    """An update as plain data for snapshots; geo points are tagged so they restore as such."""
    return [
        {
            k: ({"geo": [v.lat, v.lon]} if type(v) is GeoPoint else v)
            for k, v in update.channels.items()
        },
        update.last_update,
    ]


def load_update(data: Sequence[Any]) -> SensorUpdate:
    channels, last_update = data
    return SensorUpdate(
        {k: (GeoPoint(*v["geo"]) if type(v) is dict else v) for k, v in channels.items()},
        last_update,
    )
