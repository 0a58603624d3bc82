"""The flow engine: composite streams and windowed flows over batches of stream updates.

A batch of accepted updates goes in; derived updates (from composite streams and from
windows, in the order they were produced), late updates and rejections come out. Window
results are updates of their flow's output stream, so they trigger composite streams and
other flows in the same pass. The clock is injected (processing-time windows read it), and
all state snapshots to plain data and restores exactly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from processors.engine.columns import ColumnPlan, column_plan
from processors.engine.composite import CompositeEngine, Discarded
from processors.engine.windows import WindowOperator
from streams import kernels
from streams.accepted import Updates
from streams.actuation import Actuation
from streams.expressions import NOT_AVAILABLE, EvaluationError
from streams.expressions.functions import to_text
from streams.flows.compile import CompiledFlow, CompiledRule
from streams.rejections import Rejection, RejectReason
from streams.updates import SensorUpdate, StreamKey
from streams.windows.model import LateUpdate, WindowResult

Clock = Callable[[], float]
_UNKNOWN, _SLOW = object(), object()


@dataclass(frozen=True, slots=True)
class Late:
    """An update a flow could not place in any open window: the late-data side output."""

    key: StreamKey
    update: SensorUpdate
    rejection: Rejection


@dataclass(slots=True)
class FlowResult:
    derived: list[tuple[StreamKey, SensorUpdate]] = field(default_factory=list)
    late: list[Late] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    discarded: list[Discarded] = field(default_factory=list)
    actuations: list[Actuation] = field(default_factory=list)
    # The input (its index in the batch) each derived update, late update and rejection came
    # from, so that a unit can dead-letter the right message; -1: none (a processing-time
    # window firing).
    derived_at: list[int] = field(default_factory=list)
    late_at: list[int] = field(default_factory=list)
    rejected_at: list[int] = field(default_factory=list)

    def _attribute(self, index: int) -> None:
        self.derived_at.extend([index] * (len(self.derived) - len(self.derived_at)))
        self.late_at.extend([index] * (len(self.late) - len(self.late_at)))
        self.rejected_at.extend([index] * (len(self.rejected) - len(self.rejected_at)))


class FlowEngine:
    def __init__(
        self,
        composite: CompositeEngine,
        flows: Iterable[CompiledFlow],
        rules: Iterable[CompiledRule] = (),
        *,
        clock: Clock = time.time,
    ) -> None:
        self.composite = composite
        self.flows = list(flows)
        self.rules = list(rules)
        self.last_command: dict[tuple[str, str], int] = {}  # (rule, target) -> event time
        self._rule_readers: dict[StreamKey, list[CompiledRule]] = {}
        for rule in self.rules:
            for key in rule.triggers:
                self._rule_readers.setdefault(key, []).append(rule)
        self.clock = clock
        self.operators = {f.name: WindowOperator(f.windowing, f.aggregates) for f in self.flows}
        self._readers: dict[StreamKey, list[CompiledFlow]] = {}
        for flow in self.flows:
            for key in flow.inputs:
                self._readers.setdefault(key, []).append(flow)
        self._processing = [f for f in self.flows if f.windowing.processing_time]
        self._idling = [
            f for f in self.flows if not f.windowing.processing_time and f.windowing.idle
        ]
        self._folding = self._foldable_flows()
        # every update, whatever its stream, can be folded: no composite stream, no rule
        self._all_fold = (
            not self.composite._watched
            and not self._rule_readers
            and all(f.name in self._folding for f in self.flows)
        )
        self._foldable_keys: dict[StreamKey, bool] = {}
        # per flow: input stream -> its column plan, _SLOW (expressions), or None (not read)
        self._key_plans: dict[str, dict[StreamKey, ColumnPlan | object | None]] = {}
        self._interned: dict[object, object] = {}
        self._undo_rules: dict[tuple[str, str], int | None] | None = None

    # Transactions ----------------------------------------------------------------------------

    def begin(self) -> None:
        """Open a transaction over all state (latest values, windows, rules' last commands):
        until `commit`, `rollback` puts it back as it was. Each part saves what it changes,
        when it first changes it; nothing is copied whole."""
        self.composite.begin()
        for operator in self.operators.values():
            operator.begin()
        self._undo_rules = {}

    def commit(self) -> None:
        self.composite.commit()
        for operator in self.operators.values():
            operator.commit()
        self._undo_rules = None

    def rollback(self) -> None:
        self.composite.rollback()
        for operator in self.operators.values():
            operator.rollback()
        undo, self._undo_rules = self._undo_rules, None
        for key, last in (undo or {}).items():
            if last is None:
                self.last_command.pop(key, None)
            else:
                self.last_command[key] = last

    def _foldable_flows(self) -> set[str]:
        """Flows a batch can go through in one kernel call (`kernels.fold_windows`): event-time
        tumbling or hopping windows whose results nothing else reads, so that no result has to
        cascade before the next update is added."""
        read = {*self._readers, *self._rule_readers, *self.composite._watched}
        folding = set()
        for flow in self.flows:
            w = flow.windowing
            if w.kind not in ("tumbling", "hopping") or w.emit_empty or w.processing_time:
                continue
            if any(k.stream == flow.into_stream and flow.into_so in (None, k.so) for k in read):
                continue
            folding.add(flow.name)
        return folding

    def _foldable(self, key: StreamKey) -> bool:
        known = self._foldable_keys.get(key)
        if known is None:
            known = self._foldable_keys[key] = (
                key not in self.composite._watched
                and key not in self._rule_readers
                and all(f.name in self._folding for f in self._readers.get(key, ()))
            )
        return known

    def process(self, batch: Iterable[tuple[StreamKey, SensorUpdate]]) -> FlowResult:
        """Run a batch; results say which input each came from (`FlowResult.derived_at`...)."""
        result = FlowResult()
        now = int(self.clock() * 1000)
        if not isinstance(batch, Updates):  # column runs stay columns on the folding path
            batch = list(batch)
        known = self._foldable_keys
        keys = batch.keys() if isinstance(batch, Updates) else {key for key, _ in batch}
        if self._all_fold or all(known.get(key) or self._foldable(key) for key in keys):
            self._fold(batch, result)
        else:
            for i, (key, update) in enumerate(batch):
                self._pass(key, update, now, result)
                result._attribute(i)
        self._advance(now, result)
        result._attribute(-1)
        return result

    def _fold(self, batch: Sequence[tuple[StreamKey, SensorUpdate]], result: FlowResult) -> None:
        """`_pass` for a batch whose updates only feed foldable flows: each flow takes its
        part of the batch in one kernel call. Results come out in the order `_pass` would give:
        by input, then by flow, late updates before window results."""
        events: list[tuple[int, int, int, int, Any]] = []
        for position, flow in enumerate(self.flows):
            if flow.name not in self._folding:
                continue
            folded = self._fold_parts(flow, batch) if isinstance(batch, Updates) else None
            if folded is None:
                taken = self._take(flow, batch, events, position)
                if taken is None:
                    continue
                index, groups, times, args = taken
                operator = self.operators[flow.name]
                operator.touch(groups)  # the kernel changes these keys' state
                by_index = kernels.fold_windows(operator, groups, times, args)
                folded = ([(index[j], w) for j, w in by_index[0]],
                          [(index[j], x) for j, x in by_index[1]])  # fmt: skip
            fired, late = folded
            for i, item in late:
                key, update = batch[i]
                events.append((i, position, 1, len(events),
                               Late(key, update, self._late(flow, key, item))))  # fmt: skip
            for i, window in fired:
                events.append((i, position, 2, len(events), (flow, window)))
        events.sort(key=lambda e: e[:4])
        for i, _, kind, _, what in events:
            if kind == 0:
                result.rejected.append(what)
            elif kind == 1:
                result.late.append(what)
            else:
                self._emit(what[0], [what[1]], result)
            result._attribute(i)

    def tick(self) -> FlowResult:
        """Fire processing-time windows that are due, and the windows of keys silent for
        their flow's `idle`, without new input."""
        result = FlowResult()
        now = int(self.clock() * 1000)
        self._advance(now, result)
        for flow in self._idling:
            for key, update in self._emit(flow, self.operators[flow.name].fire_idle(now), result):
                self._pass(key, update, now, result)
        return result

    def flush(self) -> FlowResult:
        """Close every open window (the end of an offline run), cascading as usual."""
        result = FlowResult()
        for flow in self.flows:
            for key, update in self._emit(flow, self.operators[flow.name].flush(), result):
                self._pass(key, update, int(self.clock() * 1000), result)
        return result

    def _advance(self, now: int, result: FlowResult) -> None:
        for flow in self._processing:
            fired = self.operators[flow.name].advance(now)
            for key, update in self._emit(flow, fired, result):
                self._pass(key, update, now, result)

    def _pass(self, key: StreamKey, update: SensorUpdate, now: int, result: FlowResult) -> None:
        """Run one update (an input, or a window result already in `result`) through the
        composite streams and flows that read it, and on through what they produce."""
        # The input first, then every window result it causes: each may trigger composite
        # streams and other flows.
        queue: deque[tuple[StreamKey, SensorUpdate]] = deque([(key, update)])
        while queue:
            k, u = queue.popleft()
            composite = self.composite.process([(k, u)])
            result.rejected.extend(composite.rejected)
            result.discarded.extend(composite.discarded)
            result.derived.extend(composite.derived)
            for source, produced in [(k, u), *composite.derived]:
                for rule in self._rule_readers.get(source, ()):
                    self._act(rule, source, produced, result)
                for flow in self._readers.get(source, ()):
                    queue.extend(self._feed(flow, source, produced, now, result))

    def _act(
        self, rule: CompiledRule, key: StreamKey, update: SensorUpdate, result: FlowResult
    ) -> None:
        condition, target = rule.triggers[key]
        try:
            verdict = condition.evaluate({"": update})
        except EvaluationError as exc:
            result.rejected.append(
                Rejection(
                    RejectReason.EXPRESSION_FAILED,
                    f"{key.so}/{key.stream}: rule {rule.name!r}: {exc}",
                    key.so,
                    key.stream,
                )
            )
            return
        if verdict is not True:
            return
        last = self.last_command.get((rule.name, target))
        if last is not None and update.last_update - last < rule.min_interval:
            return
        if self._undo_rules is not None and (rule.name, target) not in self._undo_rules:
            self._undo_rules[(rule.name, target)] = last
        self.last_command[(rule.name, target)] = update.last_update
        result.actuations.append(
            Actuation(target, rule.action, dict(rule.parameters), issued_at=update.last_update)
        )

    def _feed(
        self, flow: CompiledFlow, key: StreamKey, update: SensorUpdate, now: int, result: FlowResult
    ) -> list[tuple[StreamKey, SensorUpdate]]:
        try:
            fed = self._prepare(flow, key, update)
        except EvaluationError as exc:
            result.rejected.append(self._failed(flow, key, exc))
            return []
        if fed is None:
            return []
        group, args = fed
        at = now if flow.windowing.processing_time else update.last_update
        fired, late = self.operators[flow.name].process(group, at, args)
        for item in late:
            result.late.append(Late(key, update, self._late(flow, key, item)))
        return self._emit(flow, fired, result)

    def _fold_parts(
        self, flow: CompiledFlow, batch: Updates
    ) -> tuple[list[tuple[int, WindowResult]], list[tuple[int, LateUpdate]]] | None:
        """The batch folded into `flow`'s windows in one kernel call that reads column runs by
        column (`kernels.fold_parts`): (fired, late), each with its update's position. None,
        having folded nothing, unless every stream the flow reads in it has one column plan."""
        plans = self._key_plans.setdefault(flow.name, {})
        keys = batch.keys()
        for key in keys - plans.keys():
            self._plan(flow, plans, key)
        shapes = {plans[key] for key in keys} - {None}
        plan = next(iter(shapes)) if len(shapes) == 1 else None
        if not isinstance(plan, ColumnPlan):
            return None
        operator = self.operators[flow.name]
        by_so = flow.key_mode == "so"
        operator.touch({k.so for k in keys if plans[k] is plan} if by_so else [""])
        folded: Any = kernels.fold_parts(operator, batch.parts, plans, plan, plan.where,
                                         plan.channels, by_so)  # fmt: skip
        return folded  # type: ignore[no-any-return]

    def _take(
        self,
        flow: CompiledFlow,
        batch: Sequence[tuple[StreamKey, SensorUpdate]],
        events: list[tuple[int, int, int, int, Any]],
        position: int,
    ) -> tuple[list[int], list[str], list[int], list[list[Any]]] | None:
        """(indexes, window keys, times, argument rows) of the updates `flow` takes from the
        batch, in batch order. Inputs with a column plan (usually all of them, and all with the
        same plan) are read by one kernel call per plan; the rest evaluate expressions."""
        plans = self._key_plans.setdefault(flow.name, {})
        if isinstance(batch, Updates):  # not one column plan (_fold_parts): rows
            batch = batch.rows()  # made into rows once, for every flow after this one too
        if batch:  # the common case, one kernel call: every key read has the first's plan
            first = plans.get(batch[0][0])
            if isinstance(first, ColumnPlan):
                by_so = flow.key_mode == "so"
                taken = kernels.take_inputs(batch, plans, first, first.where, first.channels,
                                            by_so)  # fmt: skip
                if taken is not None:
                    return taken if taken[0] else None
        by_plan: dict[int, tuple[ColumnPlan, list[int]]] = {}
        fed: list[tuple[int, str, int, list[Any]]] = []
        last_key: StreamKey | None = None
        plan: Any = None
        last_plan: Any = _UNKNOWN
        positions: list[int] = []
        for i, (key, update) in enumerate(batch):
            if key is not last_key:  # a message of many readings: one key, many in a row
                last_key = key
                plan = plans.get(key, _UNKNOWN)
                if plan is _UNKNOWN:
                    plan = self._plan(flow, plans, key)
                if plan is not last_plan:  # most keys share one plan
                    last_plan = plan
                    if plan is not None and plan is not _SLOW:
                        positions = by_plan.setdefault(id(plan), (plan, []))[1]
            if plan is None:
                continue
            if plan is _SLOW:
                self._feed_one(flow, i, key, update, fed, events, position)
            else:
                positions.append(i)
        by_so = flow.key_mode == "so"
        for plan, positions in by_plan.values():
            updates = [batch[i][1] for i in positions]
            kept, rows, slow = kernels.column_inputs(updates, plan.where, plan.channels)
            if not fed and not slow and len(by_plan) == 1:  # the common case: no merging
                index = [positions[k] for k in kept]
                groups = [batch[i][0].so for i in index] if by_so else [""] * len(index)
                return index, groups, [batch[i][1].last_update for i in index], rows
            for k, row in zip(kept, rows, strict=True):
                key, update = batch[positions[k]]
                fed.append((positions[k], key.so if by_so else "", update.last_update, row))
            for k in slow:
                key, update = batch[positions[k]]
                self._feed_one(flow, positions[k], key, update, fed, events, position)
        if not fed:
            return None
        fed.sort(key=lambda f: f[0])
        return [f[0] for f in fed], [f[1] for f in fed], [f[2] for f in fed], [f[3] for f in fed]

    def _plan(self, flow: CompiledFlow, plans: dict[StreamKey, Any], key: StreamKey) -> Any:
        """How `flow` reads `key`'s updates: a column plan, _SLOW (expressions), or None (it
        does not read them); worked out once per key, one object per shape."""
        program = flow.inputs.get(key)
        plan = None if program is None else column_plan(flow, program) or _SLOW
        plans[key] = plan = self._interned.setdefault(plan, plan)
        return plan

    def _feed_one(
        self,
        flow: CompiledFlow,
        i: int,
        key: StreamKey,
        update: SensorUpdate,
        fed: list[tuple[int, str, int, list[Any]]],
        events: list[tuple[int, int, int, int, Any]],
        position: int,
    ) -> None:
        try:
            prepared = self._prepare(flow, key, update)
        except EvaluationError as exc:
            events.append((i, position, 0, len(events), self._failed(flow, key, exc)))
            return
        if prepared is not None:
            fed.append((i, prepared[0], update.last_update, prepared[1]))

    @staticmethod
    def _prepare(
        flow: CompiledFlow, key: StreamKey, update: SensorUpdate
    ) -> tuple[str, list[Any]] | None:
        """(window key, one argument per aggregate) of an update, or None when the flow's
        `where` leaves it out; raises EvaluationError."""
        program = flow.inputs[key]
        env = {"": update}
        if program.where is not None and program.where.evaluate(env) is not True:
            return None
        if flow.key_mode == "so":
            group = key.so
        elif flow.key_mode == "none":
            group = ""
        else:
            assert program.key is not None
            value = program.key.evaluate(env)
            if value is NOT_AVAILABLE:
                return None
            group = to_text(value)
        args: list[Any] = []
        for arg in program.args:
            if arg is None:
                args.append(True)  # count() and rate(): the update itself
                continue
            value = arg.evaluate(env)
            args.append(None if value is NOT_AVAILABLE else value)
        return group, args

    @staticmethod
    def _failed(flow: CompiledFlow, key: StreamKey, exc: EvaluationError) -> Rejection:
        return Rejection(
            RejectReason.EXPRESSION_FAILED,
            f"{key.so}/{key.stream}: flow {flow.name!r}: {exc}",
            key.so,
            key.stream,
        )

    def _late(self, flow: CompiledFlow, key: StreamKey, late: LateUpdate) -> Rejection:
        lateness = flow.windowing.allowed_lateness
        return Rejection(
            RejectReason.LATE,
            f"{key.so}/{key.stream}: flow {flow.name!r}: update at {late.time} is too late for"
            f" its window (watermark {late.watermark}, allowed lateness {lateness} ms)",
            key.so,
            key.stream,
        )

    def _emit(
        self, flow: CompiledFlow, fired: list[WindowResult], result: FlowResult
    ) -> list[tuple[StreamKey, SensorUpdate]]:
        out = []
        # A result's time is the window's last instant, so that flows reading it place it in
        # the same window: [start, end) ends at end - 1; sliding and count windows end on an
        # update's own time.
        inclusive = flow.windowing.kind in ("sliding", "count")
        for window in fired:
            values: dict[str, Any] = dict(window.values)
            if not values:
                continue
            if flow.key_mode == "expression":
                values["key"] = window.key
            key = flow.output_key(window.key)
            update = SensorUpdate(values, window.end if inclusive else window.end - 1)
            result.derived.append((key, update))
            out.append((key, update))
        return out

    # State -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "composite": self.composite.snapshot(),
            "windows": {name: op.snapshot() for name, op in self.operators.items()},
            "rules": [[rule, target, t] for (rule, target), t in self.last_command.items()],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.composite.restore(state["composite"])
        self.last_command = {(r, target): t for r, target, t in state.get("rules", [])}
        for name, data in state["windows"].items():
            if name in self.operators:
                self.operators[name].restore(data)
