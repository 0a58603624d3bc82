"""A flow's inputs read from a batch and folded, pure Python: the specification of
`_inputs.pyx`.

`column_inputs` and `take_inputs` read the inputs of a flow with a column plan from rows;
`fold_parts` takes a batch's rows, message runs and column runs (`_take_parts`) and folds what
it takes with `fold_windows`, in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from streams.kernels._windows_py import fold_windows

__all__ = ["column_inputs", "fold_parts", "take_inputs"]


LT, LE, GT, GE = 0, 1, 2, 3


def column_inputs(
    updates: Sequence[Any],
    where: tuple[str, int, Any] | None,
    channels: Sequence[str | None],
) -> tuple[list[int], list[list[Any]], list[int]]:
    """A flow's inputs read straight from the updates' channels, for flows whose `where` is
    `channel <op> number` (or absent) and whose aggregates read plain channels (None: count,
    which takes True). Returns (positions kept, their argument rows, positions whose `where`
    channel is not a number: the caller evaluates those the slow way). A missing channel
    leaves the update out (`where`) or gives None (an argument), as the expressions do."""
    kept: list[int] = []
    rows: list[list[Any]] = []
    slow: list[int] = []
    for i, update in enumerate(updates):
        values = update.channels
        verdict = _where(values, where)
        if verdict is _NOT_A_NUMBER:
            slow.append(i)
        elif verdict:
            kept.append(i)
            rows.append([True if ch is None else values.get(ch) for ch in channels])
    return kept, rows, slow


_NOT_A_NUMBER = object()


def _where(values: dict[str, Any], where: tuple[str, int, Any] | None) -> object:
    """Whether `where` (`channel <op> number`, or None) keeps an update with these channels;
    _NOT_A_NUMBER when the channel holds something else (the expression decides those)."""
    if where is None:
        return True
    v = values.get(where[0])
    if v is None:
        return False
    if type(v) is not int and type(v) is not float:
        return _NOT_A_NUMBER
    op, c = where[1], where[2]
    return v < c if op == LT else v <= c if op == LE else v > c if op == GT else v >= c


def take_inputs(
    batch: Sequence[tuple[Any, Any]],
    plans: dict[Any, Any],
    plan: Any,
    where: tuple[str, int, Any] | None,
    channels: Sequence[str | None],
    by_so: bool,
) -> tuple[list[int], list[str], list[int], list[list[Any]]] | None:
    """A flow's inputs from a whole batch when every update's key has `plan` or no plan (not
    read) in `plans`: (positions, window keys: the object or "", times, argument rows), read
    as `column_inputs` reads them. None when a key has another plan or none yet, or a `where`
    channel is not a number: the caller's general path."""
    index: list[int] = []
    groups: list[str] = []
    times: list[int] = []
    rows: list[list[Any]] = []
    for i, (key, update) in enumerate(batch):
        found = plans.get(key, _MISSING)
        if found is None:
            continue
        if found is not plan:
            return None
        values = update.channels
        verdict = _where(values, where)
        if verdict is _NOT_A_NUMBER:
            return None
        if not verdict:
            continue
        index.append(i)
        groups.append(key.so if by_so else "")
        times.append(update.last_update)
        rows.append([True if ch is None else values.get(ch) for ch in channels])
    return index, groups, times, rows


_MISSING = object()


def _take_parts(
    parts: Sequence[Any],
    plans: dict[Any, Any],
    plan: Any,
    where: tuple[str, int, Any] | None,
    channels: Sequence[str | None],
    by_so: bool,
) -> tuple[list[int], list[str], list[int], list[list[Any]]] | None:
    """`take_inputs` over `streams.accepted.Updates` parts: lists of (key, update) rows, and
    column runs (`key`, `times`, `names`, `columns`: every cell present) read by column,
    without an update object per reading. Positions count rows across the parts."""
    index: list[int] = []
    groups: list[str] = []
    times: list[int] = []
    rows: list[list[Any]] = []
    at = 0
    for part in parts:
        if type(part) is list:
            taken = take_inputs(part, plans, plan, where, channels, by_so)
            if taken is None:
                return None
            index.extend(at + i for i in taken[0])
            groups += taken[1]
            times += taken[2]
            rows += taken[3]
            at += len(part)
            continue
        if hasattr(part, "keys"):  # a message run: the stream of each message beside it
            taken = _take_messages(part, plans, plan, where, channels, by_so)
            if taken is None:
                return None
            index.extend(at + i for i in taken[0])
            groups += taken[1]
            times += taken[2]
            rows += taken[3]
            at += len(part.times)
            continue
        found = plans.get(part.key, _MISSING)
        if found is not None and found is not plan:
            return None
        n = len(part.times)
        if found is None:
            at += n
            continue
        column_of = dict(zip(part.names, part.columns, strict=True))
        args = [None if ch is None else column_of.get(ch) for ch in channels]
        test = None if where is None else column_of.get(where[0])
        group = part.key.so if by_so else ""
        for i in range(n):
            if where is not None:
                if test is None:  # the channel is not in this message: never kept
                    break
                v = test[i]
                if type(v) is not int and type(v) is not float:
                    return None
                op, c = where[1], where[2]
                if not (v < c if op == LT else v <= c if op == LE else v > c if op == GT
                        else v >= c):  # fmt: skip
                    continue
            index.append(at + i)
            groups.append(group)
            times.append(part.times[i])
            rows.append([True if ch is None else None if col is None else col[i]
                         for ch, col in zip(channels, args, strict=True)])  # fmt: skip
        at += n
    return index, groups, times, rows


def _take_messages(
    run: Any,
    plans: dict[Any, Any],
    plan: Any,
    where: tuple[str, int, Any] | None,
    channels: Sequence[str | None],
    by_so: bool,
) -> tuple[list[int], list[str], list[int], list[list[Any]]] | None:
    """`take_inputs` over a `streams.accepted.MessageRun`, read by column (None: absent)."""
    index: list[int] = []
    groups: list[str] = []
    times: list[int] = []
    rows: list[list[Any]] = []
    column_of = dict(zip(run.names, run.columns, strict=True))
    args = [None if ch is None else column_of.get(ch) for ch in channels]
    test = None if where is None else column_of.get(where[0])
    for i, key in enumerate(run.keys):
        found = plans.get(key, _MISSING)
        if found is None:
            continue
        if found is not plan:
            return None
        if where is not None:
            v = None if test is None else _cell(test, i)
            if v is None:
                continue
            if type(v) is not int and type(v) is not float:
                return None
            op, c = where[1], where[2]
            if not (v < c if op == LT else v <= c if op == LE else v > c if op == GT
                    else v >= c):  # fmt: skip
                continue
        index.append(i)
        groups.append(key.so if by_so else "")
        times.append(run.times[i])
        rows.append([True if ch is None else None if col is None else _cell(col, i)
                     for ch, col in zip(channels, args, strict=True)])  # fmt: skip
    return index, groups, times, rows


def _cell(column: Sequence[Any], i: int) -> Any:
    """A message run's cell as the value it stands for (NaN in doubles: absent, None)."""
    v = column[i]
    return None if v != v else v


def fold_parts(
    operator: Any,
    parts: Sequence[Any],
    plans: dict[Any, Any],
    plan: Any,
    where: tuple[str, int, Any] | None,
    channels: Sequence[str | None],
    by_so: bool,
) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]] | None:
    """`_take_parts`, then `fold_windows` over what it took: (fired, late), each tagged with
    the position of its update across the parts; None where `_take_parts` gives None (then
    nothing was folded)."""
    taken = _take_parts(parts, plans, plan, where, channels, by_so)
    if taken is None:
        return None
    index, groups, times, rows = taken
    fired, late = fold_windows(operator, groups, times, rows)
    return [(index[j], r) for j, r in fired], [(index[j], x) for j, x in late]
