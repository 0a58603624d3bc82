"""Composite streams on columns: a derived stream computed from one device stream of its
object, with number channels written as arithmetic, comparisons and logic over that stream's
number channels (`fahrenheit: {f: {type: number, current-value: "data.t * 1.8 + 32"}}`, a
`pre-filter` alike), is evaluated over the batch's runs by the column-expression kernel, one
call per run and program for every object that shares the definition, no row made.

What it gives is exactly what the update-by-update path (`DerivedNode`) gives, because it only
runs where the two cannot differ: the stream's readings in the batch all in runs, their times
rising (after the stream's last value and after the derived stream's last output: nothing
stale, every reading newer than the last), every channel an expression reads present in every
reading (no value carried over from an earlier update), and no reading on which an expression
fails or makes a NaN. Otherwise the node takes the batch update by update, which says what
failed with the expressions' own words. Groups, `post-filter`, the stream's own last output,
`lastUpdate`, strings and other functions keep the update-by-update path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from processors.engine.columns import BOOL, FLOAT, Program, Refs, program_of
from processors.engine.graph import RAW, Run
from streams import kernels
from streams.accepted import ColumnRun, MessageRun, Part, Updates
from streams.composite_plan import CompositePlan, DerivedStream
from streams.objects import ChannelType
from streams.updates import SensorUpdate, StreamKey

if TYPE_CHECKING:
    from processors.engine.composite import DerivedNode

_INDEX, _EVALUATED = object(), object()  # keys of a run's memo


@dataclass(frozen=True, slots=True)
class Programs:
    """What a derived stream's definition evaluates, shared by the objects that share it."""

    inputs: tuple[str, ...]  # the channels read, as the programs number them
    programs: tuple[Program, ...]  # the pre-filter's first (when `has_pre`), then a channel's
    has_pre: bool
    names: tuple[str, ...]  # the derived stream's channels


@dataclass(frozen=True, slots=True)
class ColumnDerivation:
    source: StreamKey  # the one stream the derived stream reads
    shared: Programs


def derivation(
    d: DerivedStream, plan: CompositePlan, interned: dict[Programs, Programs]
) -> ColumnDerivation | None:
    """How `d` is computed by columns, or None (the update-by-update path)."""
    if d.groups or d.post_filter is not None or len(d.streams) != 1:
        return None
    ((name, source),) = d.streams.items()
    if source == d.key or source in plan.derived:
        return None
    refs = Refs(name)
    programs: list[Program] = []
    if d.pre_filter is not None:
        pre = program_of(d.pre_filter.source, refs, BOOL)
        if pre is None:
            return None
        programs.append(pre)
    for _, expression, declared in d.channels:
        program = program_of(expression.source, refs, FLOAT)
        if program is None or declared is not ChannelType.NUMBER:
            return None
        programs.append(program)
    shared = Programs(tuple(refs), tuple(programs), d.pre_filter is not None,
                      tuple(c for c, _, _ in d.channels))  # fmt: skip
    return ColumnDerivation(source, interned.setdefault(shared, shared))


Segment = tuple[ColumnRun | MessageRun, int, Any]  # a run, where it starts, its readings of a key


def _index(run: Run, parts: list[Part]) -> dict[StreamKey, list[Segment] | None]:
    """Where each stream's readings are among the batch's runs (None: some are rows), worked
    out once per run."""
    got: dict[StreamKey, list[Segment] | None] | None = run.memo.get(_INDEX)
    if got is not None:
        return got
    index: dict[StreamKey, list[Segment] | None] = {}
    in_rows: set[StreamKey] = set()
    at = 0
    for part in parts:
        if isinstance(part, list):
            in_rows.update(k for k, _ in part)
        elif isinstance(part, ColumnRun):
            index.setdefault(part.key, []).append((part, at, range(len(part))))  # type: ignore[union-attr]
        else:
            local: dict[StreamKey, list[int]] = {}
            for i, key in enumerate(part.keys):
                got_key = local.get(key)
                if got_key is None:
                    local[key] = [i]
                else:
                    got_key.append(i)
            for key, positions in local.items():
                index.setdefault(key, []).append((part, at, positions))  # type: ignore[union-attr]
        at += len(part)
    for key in in_rows:
        index[key] = None
    run.memo[_INDEX] = index
    return index


def _evaluated(
    run: Run, shared: Programs, part: ColumnRun | MessageRun
) -> tuple[list[Any], list[Any]] | None:
    """The programs' columns over a whole run (once per run and definition, for every object
    that shares it), or None when the run cannot be taken by columns."""
    key = (_EVALUATED, id(shared), id(part))
    got: tuple[list[Any], list[Any]] | bool | None = run.memo.get(key)
    if got is None:
        column_of = dict(zip(part.names, part.columns, strict=True))
        inputs = [column_of.get(channel) for channel in shared.inputs]
        derived = None
        if all(column is not None for column in inputs):
            derived = kernels.derive_columns(None, shared.programs, inputs, len(part))
        got = run.memo[key] = (inputs, derived[1]) if derived is not None else False
    return got if isinstance(got, tuple) else None


def run_columns(node: DerivedNode, run: Run) -> bool:
    """The derived stream over the batch by columns; False, having done nothing, where the
    update-by-update path must take it."""
    c = node.columns
    batch = run.batch
    if c is None or not isinstance(batch, Updates) or c.source in run.produced:
        return False
    d, engine = node.derived, node.engine
    segments = _index(run, batch.parts).get(c.source)
    logs: dict[StreamKey, Any] = run.memo.setdefault((engine, "streams"), {})
    if not segments or d.key in logs or d.key in batch.keys():
        return False
    latest = engine.latest.get(c.source)
    previous = engine.latest.get(d.key)
    newest = max(latest.last_update - 1 if latest is not None else -(2**63),
                 previous.last_update if previous is not None else -(2**63))  # fmt: skip
    taken = []
    for part, start, positions in segments:
        got = _evaluated(run, c.shared, part)
        if got is None:
            return False
        inputs, columns = got
        times = part.times
        for i in positions:  # rising times: else update by update
            t = times[i]
            if t <= newest:
                return False
            newest = t
        for column in inputs:  # every channel read present: no value carried over
            for i in positions:
                v = column[i]
                if v != v:
                    return False
        taken.append((part, start, positions, columns))
    _produce(node, run, taken, previous, logs)
    _log_source(run, c.source, latest, taken, logs)
    return True


def _produce(
    node: DerivedNode,
    run: Run,
    taken: list[tuple[ColumnRun | MessageRun, int, Any, list[Any]]],
    previous: SensorUpdate | None,
    logs: dict[StreamKey, Any],
) -> None:
    from processors.engine.composite import _Log  # the composite engine's log of a stream

    d, engine, rank = node.derived, node.engine, node.rank
    counts, shared = engine.counts, node.columns.shared  # type: ignore[union-attr]
    names, has_pre = shared.names, shared.has_pre
    width, produced = len(names), len(run.derived)
    origins: list[int] = []
    updates: list[SensorUpdate] = []
    for part, start, positions, columns in taken:
        times = part.times
        pre = columns[0] if has_pre else None
        values = columns[1:] if has_pre else columns
        for i in positions:
            if pre is not None:
                p = pre[i]
                if p != p:
                    counts.not_available += 1
                    continue
                if p == 0.0:
                    counts.filtered += 1
                    continue
            channels = {}
            for j in range(width):
                v = values[j][i]
                if v != v:
                    counts.not_available += 1
                    break
                channels[names[j]] = v
            else:
                origins.append(start + i)
                updates.append(SensorUpdate(channels, times[i]))
    run.produce_all(origins, rank, d.key, updates)
    counts.derived += len(updates)
    first = run.derived[produced][:3] if updates else None
    last = previous
    if updates:  # a derived stream's outputs carry all its channels: the merge is the last
        last = updates[-1]
        if previous is not None and not previous.channels.keys() <= last.channels.keys():
            last = _merge(previous, last)
    # its log, lazy: the rest made from the run if a node reads the stream update by update
    logs[d.key] = _Log.lazy(previous, run, d.key, first, last)


def _merge(previous: SensorUpdate, update: SensorUpdate) -> SensorUpdate:
    from processors.engine.composite import merge

    return merge(previous, update)


def _log_source(
    run: Run,
    source: StreamKey,
    latest: SensorUpdate | None,
    taken: list[tuple[ColumnRun | MessageRun, int, Any, list[Any]]],
    logs: dict[StreamKey, Any],
) -> None:
    """The source stream's log over the run, lazy: its last value (the readings merged in
    order, from the columns) for the engine to keep; the rest made from rows if a node asks."""
    from processors.engine.composite import _Log

    if source in logs:
        return
    channels: dict[str, Any] = dict(latest.channels) if latest is not None else {}
    part, _, positions, _ = taken[-1]
    t = part.times[positions[-1]]
    for name in {n: None for p, _, _, _ in taken for n in p.names}:  # each channel's newest
        for part, _, positions, _ in reversed(taken):
            column = dict(zip(part.names, part.columns, strict=True)).get(name)
            v = None
            if column is not None:
                for i in reversed(positions):
                    v = column[i]
                    if v is not None and v == v:  # absent: None in a list, NaN in doubles
                        break
                    v = None
            if v is not None:
                channels[name] = v
                break
    _, first_start, first_positions, _ = taken[0]
    first = (first_start + first_positions[0], RAW, 0)
    logs[source] = _Log.lazy(latest, run, source, first, SensorUpdate(channels, t))
