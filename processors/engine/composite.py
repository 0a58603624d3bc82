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
  read them in the same pass, in dependency order, each evaluated at most once per pass.
- Cycles (other than a stream reading itself) are rejected when the plan is built.
- A failed evaluation (division by zero, a value of the wrong type) rejects that one update
  with reason `expression_failed`; processing goes on.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class CompositeEngine:
    """Runs a plan over a sequence of stream updates; state is explicit (snapshot/restore)."""

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

    def process(self, updates: Iterable[tuple[StreamKey, SensorUpdate]]) -> CompositeResult:
        result = CompositeResult()
        for key, update in updates:
            self._pass(key, update, result)
        return result

    def _observe(self, key: StreamKey, update: SensorUpdate) -> None:
        previous = self.latest.get(key)
        undo = self._undo
        if undo is not None and key not in undo:
            undo[key] = previous
        self.latest[key] = merged = merge(previous, update)
        for group in self.plan.groups_of.get(key, ()):
            current = self.group_latest.get(group)
            if current is None or merged.last_update >= current.last_update:
                if undo is not None and group not in self._undo_groups:
                    self._undo_groups[group] = current
                self.group_latest[group] = merged

    def _pass(self, key: StreamKey, update: SensorUpdate, result: CompositeResult) -> None:
        if key not in self._watched:
            return
        plan = self.plan
        self._observe(key, update)
        pending: list[tuple[int, StreamKey]] = []
        triggers: dict[StreamKey, tuple[StreamKey, int]] = {}

        def trigger(source: StreamKey, last_update: int) -> None:
            readers = list(plan.readers.get(source, ()))
            for group in plan.groups_of.get(source, ()):
                readers.extend(plan.group_readers.get(group, ()))
            for reader in readers:
                if reader == source:
                    continue  # reading itself is state, not a trigger
                best = triggers.get(reader)
                if best is None:
                    heapq.heappush(pending, (plan.rank.get(reader, 0), reader))
                if best is None or last_update > best[1]:
                    triggers[reader] = (source, last_update)

        trigger(key, update.last_update)
        while pending:
            _, target = heapq.heappop(pending)
            source, at = triggers.pop(target)
            output = self._evaluate(plan.derived[target], source, at, result)
            if output is not None:
                result.derived.append((target, output))
                self._observe(target, output)
                trigger(target, output.last_update)

    def _evaluate(
        self, d: DerivedStream, source: StreamKey, at: int, result: CompositeResult
    ) -> SensorUpdate | None:
        previous = self.latest.get(d.key)
        if previous is not None and at <= previous.last_update:
            self.counts.stale += 1
            result.discarded.append(Discarded(d.key, source, at, previous.last_update))
            return None
        env: dict[str, SensorUpdate] = {}
        for name, stream_key in d.streams.items():
            value = self.latest.get(stream_key)
            if value is not None:
                env[name] = value
        for name, group_key in d.groups.items():
            value = self.group_latest.get(group_key)
            if value is not None:
                env[name] = value
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
            result.rejected.append(
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
