"""A windowed flow as a node of the graph: its inputs taken from a batch in one call, folded
into its windows by the kernel where its windows allow it (event-time tumbling and hopping),
update by update otherwise, with the same results either way."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from processors.engine.columns import ColumnPlan, Derivation, column_plan
from processors.engine.graph import Row, Run
from processors.engine.windows import WindowOperator
from streams import kernels
from streams.accepted import ColumnRun, MessageRun, Part, Updates
from streams.expressions import NOT_AVAILABLE, EvaluationError
from streams.expressions.functions import to_text
from streams.flows.compile import CompiledFlow
from streams.rejections import Rejection, RejectReason
from streams.updates import SensorUpdate, StreamKey
from streams.windows.model import LateUpdate, WindowResult

_UNKNOWN, _SLOW = object(), object()
Taken = tuple[list[int], list[str], list[int], list[list[Any]]]
log = logging.getLogger(__name__)


class TooManyKeys(Exception):
    """An update whose key expression gives a key beyond the flow's `max_keys`."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


@dataclass(frozen=True, slots=True)
class Late:
    """An update a flow could not place in any open window: the late-data side output."""

    key: StreamKey
    update: SensorUpdate
    rejection: Rejection


class WindowNode:
    """One flow: its window operator, and how it reads each input stream."""

    def __init__(self, flow: CompiledFlow, interned: dict[object, object]) -> None:
        self.flow = flow
        self.name = f"flow {flow.name!r}"
        self.rank = 0
        self.operator = WindowOperator(flow.windowing, flow.aggregates)
        w = flow.windowing
        # the kernel folds event-time tumbling and hopping windows; the others go update by
        # update (sliding, session and count windows, processing time, empty windows)
        self.fold = w.kind in ("tumbling", "hopping") and not w.emit_empty and not w.processing_time
        self.raw_only = True  # reads no node's results (the graph says, once it is built)
        # per input stream: its column plan, _SLOW (expressions), or None (not read)
        self.plans: dict[StreamKey, Any] = {}
        self._interned = interned
        # keys a key expression gave in this batch that have no window open yet: within
        # max_keys with the operator's open ones (they open when the batch is folded)
        self._opening: set[str] = set()
        self._refused = 0  # updates refused for max_keys, in all (logged at the first)

    def reads(self) -> Collection[StreamKey]:
        return self.flow.inputs.keys()

    def produces(self) -> Collection[StreamKey]:
        f = self.flow
        return {StreamKey(f.into_so or k.so, f.into_stream) for k in f.inputs}

    def timed(self) -> bool:
        return self.flow.windowing.processing_time

    def run(self, run: Run) -> None:
        if self.raw_only:  # the batch's own updates only (a tick or a flush has none)
            if run.batch:
                self._take_batch(run)
        else:  # and what the nodes before made of them
            entries = run.inputs(self.flow.inputs.keys())
            if entries:
                self._take_rows(run, [(e[3], e[4]) for e in entries], [e[0] for e in entries])
        operator, end, w = self.operator, run.end, self.flow.windowing
        if run.mode == "flush":  # the end of an offline run: every window closes
            self._emit(run, end, operator.flush())
        elif w.processing_time:
            self._emit(run, end, operator.advance(run.now))
        elif run.mode == "tick" and w.idle:  # keys silent for `idle`
            self._emit(run, end, operator.fire_idle(run.now))

    def _take_batch(self, run: Run) -> None:
        """The batch's own updates (this flow reads no node's results): column runs straight
        into the kernel when every stream read has one column plan; rows otherwise."""
        batch = run.batch
        if self.fold and isinstance(batch, Updates) and self._fold_parts(run, batch):
            return
        rows = run.rows()
        self._take_rows(run, rows, None)

    def _take_rows(self, run: Run, rows: Sequence[Row], origins: list[int] | None) -> None:
        """`rows` (origins: where each came from; None: the batch itself) into the windows."""
        self._opening.clear()
        if not self.fold:
            for j, (key, update) in enumerate(rows):
                self._feed(run, key, update, j if origins is None else origins[j])
            return
        taken = self._take(run, rows, origins)
        if taken is None:
            return
        index, groups, times, args = taken
        self.operator.touch(groups)  # the kernel changes these keys' state
        fired, late = kernels.fold_windows(self.operator, groups, times, args)
        at = index if origins is None else [origins[i] for i in index]
        for j, item in late:
            key, update = rows[index[j]]
            run.late.append((at[j], self.rank, run.next(),
                             Late(key, update, self._late(key, item))))  # fmt: skip
        for j, window in fired:
            self._emit(run, at[j], [window])

    def _fold_parts(self, run: Run, batch: Updates) -> bool:
        """The batch folded into the windows in one kernel call that reads column runs by
        column (`kernels.fold_parts`). False, having folded nothing, unless every stream the
        flow reads in it has one column plan."""
        plans, plan, groups = self.plans, None, set()
        for key in batch.keys():  # one plan (by identity: plans are interned) or none
            found = plans.get(key, _UNKNOWN)
            if found is _UNKNOWN:
                found = self._plan(key)
            if found is None:
                continue
            if plan is None:
                plan = found
            elif found is not plan:
                return False
            groups.add(key.so)
        if not isinstance(plan, ColumnPlan):
            return False
        parts: list[Part] | None = batch.parts
        if plan.derive is not None:
            parts = self._derived(batch.parts, plan.derive)
            if parts is None:
                return False
        by_so = self.flow.key_mode == "so"
        self.operator.touch(groups if by_so else [""])
        folded: Any = kernels.fold_parts(self.operator, parts, plans, plan, plan.where,
                                         plan.channels, by_so)  # fmt: skip
        if folded is None:
            return False
        fired, late = folded
        for i, item in late:
            key, update = batch[i]
            run.late.append((i, self.rank, run.next(), Late(key, update, self._late(key, item))))
        for i, window in fired:
            self._emit(run, i, [window])
        return True

    def _derived(self, parts: list[Part], derive: Derivation) -> list[Part] | None:
        """The batch's runs with the derivation's columns in place of the channels (one kernel
        call per run), or None when a run cannot be taken that way (values not all floats, an
        expression that fails on a reading) or rows of the flow's are not in runs: the batch
        then goes update by update, through the expressions."""
        plans = self.plans
        out: list[Part] = []
        for part in parts:
            if isinstance(part, list):
                if any(plans.get(key) is not None for key, _ in part):
                    return None
                out.append(part)
                continue
            if isinstance(part, ColumnRun) and plans.get(part.key) is None:
                out.append(part)  # not the flow's: left as it is
                continue
            column_of = dict(zip(part.names, part.columns, strict=True))
            inputs = [column_of.get(channel) for channel in derive.inputs]
            got = kernels.derive_columns(derive.where, derive.values, inputs, len(part))
            if got is None:
                return None
            mask, values = got
            columns = ([] if mask is None else [mask]) + [v for v in values if v is not None]
            names = list(derive.names)
            if isinstance(part, ColumnRun):
                out.append(ColumnRun(part.key, part.times, names, columns))
            else:
                out.append(MessageRun(part.keys, part.times, names, columns, part.distinct))
        return out

    def _take(self, run: Run, rows: Sequence[Row], origins: list[int] | None) -> Taken | None:
        """(positions in `rows`, window keys, times, argument rows) of the updates the flow
        takes, in order. Inputs with a column plan (usually all, and all with the same plan)
        are read by one kernel call per plan; the rest evaluate expressions."""
        flow, plans = self.flow, self.plans
        by_so = flow.key_mode == "so"
        if rows:  # the common case, one kernel call: every key read has the first's plan
            first = plans.get(rows[0][0])
            if isinstance(first, ColumnPlan) and first.derive is None:
                taken = kernels.take_inputs(rows, plans, first, first.where, first.channels,
                                            by_so)  # fmt: skip
                if taken is not None:
                    return taken if taken[0] else None
        by_plan: dict[int, tuple[ColumnPlan, list[int]]] = {}
        fed: list[tuple[int, str, int, list[Any]]] = []
        last_key: StreamKey | None = None
        plan: Any = None
        last_plan: Any = _UNKNOWN
        positions: list[int] = []
        for i, (key, update) in enumerate(rows):
            if key is not last_key:  # a message of many readings: one key, many in a row
                last_key = key
                plan = plans.get(key, _UNKNOWN)
                if plan is _UNKNOWN:
                    plan = self._plan(key)
                if isinstance(plan, ColumnPlan) and plan.derive is not None:
                    plan = _SLOW  # rows: a derived plan's expressions one by one
                if plan is not last_plan:  # most keys share one plan
                    last_plan = plan
                    if plan is not None and plan is not _SLOW:
                        positions = by_plan.setdefault(id(plan), (plan, []))[1]
            if plan is None:
                continue
            if plan is _SLOW:
                self._prepare_one(run, i, key, update, fed, origins)
            else:
                positions.append(i)
        for plan, positions in by_plan.values():
            updates = [rows[i][1] for i in positions]
            kept, args, slow = kernels.column_inputs(updates, plan.where, plan.channels)
            if not fed and not slow and len(by_plan) == 1:  # the common case: no merging
                index = [positions[k] for k in kept]
                groups = [rows[i][0].so for i in index] if by_so else [""] * len(index)
                return index, groups, [rows[i][1].last_update for i in index], args
            for k, row in zip(kept, args, strict=True):
                key, update = rows[positions[k]]
                fed.append((positions[k], key.so if by_so else "", update.last_update, row))
            for k in slow:
                key, update = rows[positions[k]]
                self._prepare_one(run, positions[k], key, update, fed, origins)
        if not fed:
            return None
        fed.sort(key=lambda f: f[0])
        return [f[0] for f in fed], [f[1] for f in fed], [f[2] for f in fed], [f[3] for f in fed]

    def _plan(self, key: StreamKey) -> Any:
        """How the flow reads `key`'s updates: a column plan, _SLOW (expressions), or None (it
        does not read them); worked out once per key, one object per shape."""
        program = self.flow.inputs.get(key)
        plan = None if program is None else column_plan(self.flow, program) or _SLOW
        self.plans[key] = plan = self._interned.setdefault(plan, plan)
        return plan

    def _prepare_one(
        self,
        run: Run,
        i: int,
        key: StreamKey,
        update: SensorUpdate,
        fed: list[tuple[int, str, int, list[Any]]],
        origins: list[int] | None,
    ) -> None:
        try:
            prepared = self._prepare(key, update)
        except EvaluationError as exc:
            run.reject(i if origins is None else origins[i], self.rank, self._failed(key, exc))
            return
        except TooManyKeys as exc:
            run.reject(i if origins is None else origins[i], self.rank, exc.rejection)
            return
        if prepared is not None:
            fed.append((i, prepared[0], update.last_update, prepared[1]))

    def _feed(self, run: Run, key: StreamKey, update: SensorUpdate, origin: int) -> None:
        """One update into the windows (the flows the kernel does not fold)."""
        if key not in self.flow.inputs:
            return
        try:
            prepared = self._prepare(key, update)
        except EvaluationError as exc:
            run.reject(origin, self.rank, self._failed(key, exc))
            return
        except TooManyKeys as exc:
            run.reject(origin, self.rank, exc.rejection)
            return
        if prepared is None:
            return
        group, args = prepared
        at = run.now if self.flow.windowing.processing_time else update.last_update
        fired, late = self.operator.process(group, at, args)
        self._opening.clear()  # opened (or fired and closed) already: the operator's count
        for item in late:
            run.late.append((origin, self.rank, run.next(),
                             Late(key, update, self._late(key, item))))  # fmt: skip
        self._emit(run, origin, fired)

    def _prepare(self, key: StreamKey, update: SensorUpdate) -> tuple[str, list[Any]] | None:
        """(window key, one argument per aggregate) of an update, or None when the flow's
        `where` leaves it out; raises EvaluationError."""
        flow = self.flow
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
            if group not in self.operator.keys and group not in self._opening:
                if len(self.operator.keys) + len(self._opening) >= flow.max_keys:
                    raise TooManyKeys(self._too_many(key, group))
                self._opening.add(group)
        args: list[Any] = []
        for arg in program.args:
            if arg is None:
                args.append(True)  # count() and rate(): the update itself
                continue
            value = arg.evaluate(env)
            args.append(None if value is NOT_AVAILABLE else value)
        return group, args

    def _too_many(self, key: StreamKey, group: str) -> Rejection:
        flow = self.flow
        self._refused += 1
        if self._refused == 1:
            log.warning("flow %r: %d keys have open windows, its max_keys: updates for other"
                        " keys are dead-lettered too_many_keys until windows close",
                        flow.name, flow.max_keys)  # fmt: skip
        return Rejection(
            RejectReason.TOO_MANY_KEYS,
            f"{key.so}/{key.stream}: flow {flow.name!r}: key {group[:100]!r} would be one more"
            f" than its max_keys ({flow.max_keys}) with open windows",
            key.so,
            key.stream,
        )

    def _failed(self, key: StreamKey, exc: EvaluationError) -> Rejection:
        return Rejection(
            RejectReason.EXPRESSION_FAILED,
            f"{key.so}/{key.stream}: flow {self.flow.name!r}: {exc}",
            key.so,
            key.stream,
        )

    def _late(self, key: StreamKey, late: LateUpdate) -> Rejection:
        lateness = self.flow.windowing.allowed_lateness
        return Rejection(
            RejectReason.LATE,
            f"{key.so}/{key.stream}: flow {self.flow.name!r}: update at {late.time} is too late"
            f" for its window (watermark {late.watermark}, allowed lateness {lateness} ms)",
            key.so,
            key.stream,
        )

    def _emit(self, run: Run, origin: int, fired: list[WindowResult]) -> None:
        """Window results as updates of the flow's output stream."""
        flow = self.flow
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
            update = SensorUpdate(values, window.end if inclusive else window.end - 1)
            run.produce(origin, self.rank, flow.output_key(window.key), update)
