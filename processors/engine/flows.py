"""The flow engine: composite streams, windowed flows, rules and a unit's processors over
batches of stream updates, as one graph of batch operators (`processors.engine.graph`).

A batch of accepted updates goes in; derived updates (from composite streams and from
windows), late updates, rejections and actuations come out, each saying which input it came
from. Window results are updates of their flow's output stream, so they trigger composite
streams, other flows and rules in the same run. The clock is injected (processing-time windows
read it), all state snapshots to plain data and restores exactly, and a batch is a transaction
(`begin`, `commit`, `rollback`) that saves what it changes as it changes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from processors.engine.composite import CompositeEngine, Discarded
from processors.engine.graph import Graph, Node, Run
from processors.engine.window_node import Late, WindowNode
from processors.engine.windows import WindowOperator
from streams.accepted import Updates
from streams.actuation import Actuation
from streams.expressions import EvaluationError
from streams.flows.compile import CompiledFlow, CompiledRule
from streams.rejections import Rejection, RejectReason
from streams.updates import SensorUpdate, StreamKey

Clock = Callable[[], float]
__all__ = ["Clock", "FlowEngine", "FlowResult", "Late"]


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
    # Updates a processor failed on, with why; -1: the update is one no input caused, and
    # it is what a dead letter carries.
    failed: list[tuple[StreamKey, SensorUpdate, Rejection]] = field(default_factory=list)
    failed_at: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, run: Run) -> FlowResult:
        end = run.end
        return cls(
            [(e[3], e[4]) for e in run.derived],
            [x[3] for x in run.late],
            [x[3] for x in run.rejected],
            [x[3] for x in run.discarded],
            [x[3] for x in run.actuations],
            [e[0] if e[0] < end else -1 for e in run.derived],
            [x[0] if x[0] < end else -1 for x in run.late],
            [x[0] if x[0] < end else -1 for x in run.rejected],
            [x[3] for x in run.failed],
            [x[0] if x[0] < end else -1 for x in run.failed],
        )


class RuleNode:
    """A rule in the graph: its condition on each update of its trigger streams, in order; a
    command to its target when it holds (at most one per `min_interval` of event time)."""

    def __init__(self, rule: CompiledRule, engine: FlowEngine) -> None:
        self.rule = rule
        self.engine = engine
        self.name = f"rule {rule.name!r}"
        self.rank = 0

    def reads(self) -> Collection[StreamKey]:
        return self.rule.triggers.keys()

    def produces(self) -> Collection[StreamKey]:
        return ()

    def timed(self) -> bool:
        return False

    def run(self, run: Run) -> None:
        if not run.batch and not run.produced:
            return
        for origin, _, _, key, update in run.inputs(self.rule.triggers.keys()):
            self._act(run, origin, key, update)

    def _act(self, run: Run, origin: int, key: StreamKey, update: SensorUpdate) -> None:
        rule, engine = self.rule, self.engine
        condition, target = rule.triggers[key]
        try:
            verdict = condition.evaluate({"": update})
        except EvaluationError as exc:
            run.reject(origin, self.rank, Rejection(
                RejectReason.EXPRESSION_FAILED,
                f"{key.so}/{key.stream}: rule {rule.name!r}: {exc}", key.so, key.stream,
            ))  # fmt: skip
            return
        if verdict is not True:
            return
        last = engine.last_command.get((rule.name, target))
        if last is not None and update.last_update - last < rule.min_interval:
            return
        undo = engine._undo_rules
        if undo is not None and (rule.name, target) not in undo:
            undo[(rule.name, target)] = last
        engine.last_command[(rule.name, target)] = update.last_update
        actuation = Actuation(target, rule.action, dict(rule.parameters),
                              issued_at=update.last_update)  # fmt: skip
        run.actuations.append((origin, self.rank, run.next(), actuation))


class FlowEngine:
    def __init__(
        self,
        composite: CompositeEngine,
        flows: Iterable[CompiledFlow],
        rules: Iterable[CompiledRule] = (),
        *,
        clock: Clock = time.time,
        processors: Sequence[Node] = (),
    ) -> None:
        """`processors`: a unit's processors as nodes (`Chain.nodes`), after everything else
        in the graph."""
        self.composite = composite
        self.flows = list(flows)
        self.rules = list(rules)
        self.last_command: dict[tuple[str, str], int] = {}  # (rule, target) -> event time
        self.clock = clock
        interned: dict[object, object] = {}  # one column plan object per shape, for all flows
        self.windows = {f.name: WindowNode(f, interned) for f in self.flows}
        self.operators: dict[str, WindowOperator] = {
            name: node.operator for name, node in self.windows.items()
        }
        nodes: list[Node] = [*composite.nodes(), *self.windows.values(),
                             *(RuleNode(r, self) for r in self.rules), *processors]  # fmt: skip
        self.graph = Graph(nodes)
        produced = {k for node in self.graph.nodes for k in node.produces()}
        for node in self.windows.values():
            node.raw_only = not any(k in produced for k in node.reads())
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

    # Runs --------------------------------------------------------------------------------

    def process(self, batch: Iterable[tuple[StreamKey, SensorUpdate]]) -> FlowResult:
        """Run a batch through the graph; results say which input each came from
        (`FlowResult.derived_at`...)."""
        if type(batch) is not list and not isinstance(batch, Updates):
            batch = list(batch)  # (a list subclass too); column runs stay columns
        return self._run(batch, "batch")

    def tick(self) -> FlowResult:
        """Fire processing-time windows that are due, and the windows of keys silent for
        their flow's `idle`, without new input."""
        return self._run([], "tick")

    def flush(self) -> FlowResult:
        """Close every open window (the end of an offline run), cascading as usual."""
        return self._run([], "flush")

    def _run(self, batch: list[tuple[StreamKey, SensorUpdate]] | Updates, mode: str) -> FlowResult:
        now = int(self.clock() * 1000)
        return FlowResult.of(self.graph.run(batch, now, mode, settle=self.composite.settle))

    # State -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "composite": self.composite.snapshot(),
            "windows": {name: op.snapshot() for name, op in self.operators.items()},
            "rules": [[rule, target, t] for (rule, target), t in self.last_command.items()],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.composite.restore(state["composite"])
        self.last_command.clear()
        self.last_command.update({(r, target): t for r, target, t in state.get("rules", [])})
        for name, data in state["windows"].items():
            if name in self.operators:
                self.operators[name].restore(data)
