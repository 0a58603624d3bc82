"""The one graph: composite streams, windowed flows, rules and processors, compiled once into
batch operators in dependency order, and the one path that runs a batch through them.

Every node reads stream keys and may produce updates of other stream keys. The graph is a DAG
(the catalog refuses cycles), so a batch goes through it node by node in topological order:
each node takes, in one call, every update of the keys it reads, the batch's own and what the
nodes before it produced from the batch, and produces its results tagged with the input they
came from. A window node folds its part of a batch with one kernel call whether or not other
nodes read its results; what they read comes after it in the order.

Order. Everything carries its origin (the position in the batch of the update it came from;
`end`, past the batch, for what no update caused: processing-time windows, idle keys, a flush),
the rank of the node that made it, and a sequence number. A node sees its inputs in that order,
which is the order in which one update after the other would have reached it, and results come
out in it. A derived stream is evaluated at most once per input update (its newest trigger
wins), with the latest value of each of its inputs as of that update (an as-of join by origin).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from operator import itemgetter
from typing import Any, Protocol

from streams.actuation import Actuation
from streams.rejections import Rejection
from streams.updates import SensorUpdate, StreamKey

Row = tuple[StreamKey, SensorUpdate]
# (origin, node rank, sequence, key, update): an update on its way through the graph
Entry = tuple[int, int, int, StreamKey, SensorUpdate]
RAW = -1  # the rank of the batch's own updates
_ORDER = itemgetter(0, 1, 2)


class Node(Protocol):
    """A batch operator of the graph."""

    rank: int
    name: str

    def reads(self) -> Collection[StreamKey]: ...

    def produces(self) -> Collection[StreamKey]: ...

    def run(self, run: Run) -> None: ...

    def timed(self) -> bool:
        """Whether the node acts without input (processing-time windows)."""
        ...


class Run:
    """One batch on its way through the graph (or a tick, or a flush: no batch), and what the
    nodes produce from it, tagged with its order."""

    def __init__(self, batch: Sequence[Row], now: int, mode: str = "batch") -> None:
        self.batch = batch
        self.now = now
        self.mode = mode  # "batch", "tick" (idle keys too) or "flush" (close every window)
        self.end = len(batch)  # the origin of what no update of the batch caused
        self.produced: dict[StreamKey, list[Entry]] = {}
        self.derived: list[Entry] = []
        self.late: list[tuple[int, int, int, Any]] = []
        self.rejected: list[tuple[int, int, int, Rejection]] = []
        self.discarded: list[tuple[int, int, int, Any]] = []
        self.actuations: list[tuple[int, int, int, Actuation]] = []
        # (key, update, rejection): updates a processor failed on
        self.failed: list[tuple[int, int, int, tuple[StreamKey, SensorUpdate, Rejection]]] = []
        self.memo: dict[object, Any] = {}  # per-run caches of the nodes (composite values)
        self._seq = 0
        self._by_key: dict[StreamKey, list[int]] | None = None

    def next(self) -> int:
        self._seq += 1
        return self._seq

    def rows(self) -> Sequence[Row]:
        """The batch as (key, SensorUpdate) rows (column runs made into rows once)."""
        rows = getattr(self.batch, "rows", None)
        return rows() if rows is not None else self.batch

    def _positions(self) -> dict[StreamKey, list[int]]:
        """Where each stream's updates are in the batch (worked out once)."""
        if self._by_key is None:
            by_key: dict[StreamKey, list[int]] = {}
            for i, (k, _) in enumerate(self.rows()):
                got = by_key.get(k)
                if got is None:
                    by_key[k] = [i]
                else:
                    got.append(i)
            self._by_key = by_key
        return self._by_key

    def inputs(self, keys: Collection[StreamKey]) -> list[Entry]:
        """Every update of `keys`, the batch's and the ones produced so far, in order."""
        by_key, produced = self._positions(), self.produced
        if len(keys) > len(by_key) + len(produced):  # a flow reading many streams
            keys = [k for k in {*by_key, *produced} if k in keys]
        rows = self.rows()
        entries: list[Entry] = []
        sources = 0
        for key in keys:
            positions = by_key.get(key)
            if positions is not None:
                entries.extend((i, RAW, 0, key, rows[i][1]) for i in positions)
                sources += 1
            got = produced.get(key)
            if got is not None:
                entries.extend(got)
                sources += 1
        if sources > 1:
            entries.sort(key=_ORDER)
        return entries

    def produce(self, origin: int, rank: int, key: StreamKey, update: SensorUpdate) -> None:
        entry = (origin, rank, self.next(), key, update)
        self.derived.append(entry)
        got = self.produced.get(key)
        if got is None:
            self.produced[key] = [entry]
        else:
            got.append(entry)

    def produce_all(
        self, origins: Sequence[int], rank: int, key: StreamKey, updates: Sequence[SensorUpdate]
    ) -> None:
        """`produce` for each of `updates` (of one key, in order) at once."""
        seq = self._seq
        pairs = enumerate(zip(origins, updates, strict=True), seq + 1)
        entries = [(origin, rank, k, key, update) for k, (origin, update) in pairs]
        self._seq = seq + len(entries)
        self.derived.extend(entries)
        got = self.produced.get(key)
        if got is None:
            self.produced[key] = entries[:]
        else:
            got.extend(entries)

    def reject(self, origin: int, rank: int, rejection: Rejection) -> None:
        self.rejected.append((origin, rank, self.next(), rejection))


class Graph:
    """Nodes in dependency order; `run` takes a batch through all of them."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = _ordered(nodes)
        for rank, node in enumerate(self.nodes):
            node.rank = rank
        # what each node reads, and whether it runs without input too
        self._reads = [frozenset(n.reads()) for n in self.nodes]
        self._timed = [n.timed() for n in self.nodes]

    def run(self, batch: Sequence[Row], now: int, mode: str = "batch",
            settle: Callable[[Run], None] | None = None) -> Run:  # fmt: skip
        run = Run(batch, now, mode)
        keys = getattr(batch, "keys", None)
        present = set(keys()) if keys is not None else {k for k, _ in batch}
        produced = run.produced
        seen = 0
        for node, reads, timed in zip(self.nodes, self._reads, self._timed, strict=True):
            if len(produced) != seen:
                present.update(produced)
                seen = len(produced)
            if mode != "batch" or timed or not present.isdisjoint(reads):
                node.run(run)
        if settle is not None:
            settle(run)
        for tagged in (run.derived, run.late, run.rejected, run.discarded, run.actuations,
                       run.failed):  # fmt: skip
            if len(tagged) > 1:
                tagged.sort(key=_ORDER)
        return run


def _ordered(nodes: Sequence[Node]) -> list[Node]:
    """Topological order (Kahn), ties kept in the order given: a node comes after every node
    whose results it reads. The catalog has refused cycles; one here is a bug of ours."""
    producers: dict[StreamKey, list[int]] = {}
    for i, node in enumerate(nodes):
        for key in node.produces():
            producers.setdefault(key, []).append(i)
    after: list[set[int]] = [set() for _ in nodes]  # i -> the nodes reading its results
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for key in node.reads():
            for p in producers.get(key, ()):
                if p != i and i not in after[p]:
                    after[p].add(i)
                    waiting[i] += 1
    ready = sorted(i for i, w in enumerate(waiting) if w == 0)
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in sorted(after[i]):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
                ready.sort()
    if len(order) != len(nodes):
        stuck = [nodes[i].name for i in range(len(nodes)) if i not in order]
        raise ValueError(f"the processing graph has a cycle through {', '.join(stuck)}")
    return [nodes[i] for i in order]
