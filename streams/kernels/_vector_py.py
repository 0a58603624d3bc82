"""The column-expression kernel, pure Python: the specification of `_vector.pyx`.

A flow's `where` and its aggregates' arguments, when they are arithmetic, comparisons and
logic over number channels (`t * 1.8 + 32`, `t > 5 and h < 80`, `abs(a - b)`), are compiled
once (`processors.engine.columns`) into a small program, a tree of tuples:

    (REF, i)          the i-th input column        (NUM, x)       a constant (a boolean: 1 or 0)
    (NEG, a)  (NOT, a)  (ABS, a)  (SQRT, a)  (AVAILABLE, a)
    (ADD|SUB|MUL|DIV|MOD|LT|LE|GT|GE|EQ|NE|AND|OR|MIN|MAX, a, b)       (COND, c, a, b)

`derive_columns` evaluates the programs over a run's double columns (NaN where a message lacks
the channel) and gives columns the window kernel folds: the `where` as 1.0 where it holds and
NaN where not, each argument as its value and NaN where it is not available. Each reading's
result is exactly what the row-by-row expressions give: a missing channel makes the expression
not available unless `and`, `or`, `?` or `available()` do not need it, IEEE doubles throughout
(Python's floats), a number compared or combined with a float as Python does. Where the
expressions would raise (a division by zero, the square root of a negative number) or make a
NaN that the columns could not tell from a missing value, it returns None and the caller takes
the readings the row-by-row way, which rejects with the expressions' own words.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import Any

__all__ = ["derive_columns"]

(REF, NUM, NEG, NOT, ABS, SQRT, AVAILABLE, ADD, SUB, MUL, DIV, MOD, LT, LE, GT, GE, EQ, NE,
 AND, OR, MIN, MAX, COND) = range(23)  # fmt: skip

_ABSENT, _ERROR = object(), object()  # a reading's result: a float, a bool, or one of these


def _eval(node: tuple[Any, ...], inputs: Sequence[Any], i: int) -> Any:
    op = node[0]
    if op == REF:
        column = inputs[node[1]]
        if column is None:
            return _ABSENT
        v = column[i]
        return _ABSENT if v != v else v  # NaN: the message did not carry the channel
    if op == NUM:
        return node[1]
    a = _eval(node[1], inputs, i)
    if op == AND or op == OR:  # the right side only when the left does not decide
        if a is _ABSENT or a is _ERROR or a is (op == OR):
            return a
        return _eval(node[2], inputs, i)
    if op == COND:
        if a is _ABSENT or a is _ERROR:
            return a
        return _eval(node[2] if a else node[3], inputs, i)
    if op == AVAILABLE:
        return a if a is _ERROR else a is not _ABSENT
    if a is _ABSENT or a is _ERROR:
        return a
    if op == NEG:
        return -a
    if op == NOT:
        return not a
    if op == ABS:
        return abs(a)
    if op == SQRT:
        return _ERROR if a < 0 else math.sqrt(a)
    b = _eval(node[2], inputs, i)
    if b is _ABSENT or b is _ERROR:
        return b
    if op == ADD:
        return a + b
    if op == SUB:
        return a - b
    if op == MUL:
        return a * b
    if op == DIV:
        return _ERROR if b == 0 else a / b
    if op == MOD:
        return _ERROR if b == 0 else math.fmod(a, b)
    if op == LT:
        return a < b
    if op == LE:
        return a <= b
    if op == GT:
        return a > b
    if op == GE:
        return a >= b
    if op == EQ:
        return a == b
    if op == NE:
        return a != b
    if op == MIN:
        return b if b < a else a
    if op == MAX:
        return b if b > a else a
    raise ValueError(f"unknown column operation {op}")


def _doubles(column: Any) -> bool:
    return column is None or (type(column) is array and column.typecode == "d")


def derive_columns(
    where: tuple[Any, ...] | None,
    values: Sequence[tuple[Any, ...] | None],
    inputs: Sequence[Any],
    n: int,
) -> tuple[array[float] | None, list[array[float] | None]] | None:
    """(the `where` column or None, one column per program of `values`, None for a None) over
    `n` readings whose channels are `inputs` (double arrays; None: a channel no reading has);
    None when an input is not a double column or a reading needs the row-by-row way."""
    if not all(_doubles(column) for column in inputs):
        return None
    nan = math.nan
    mask = array("d", [nan]) * n if where is not None else None
    out = [None if p is None else array("d", [nan]) * n for p in values]
    for i in range(n):
        if where is not None:
            kept = _eval(where, inputs, i)
            if kept is _ERROR:
                return None
            if kept is not True:
                continue
            assert mask is not None
            mask[i] = 1.0
        for program, column in zip(values, out, strict=True):
            if program is None or column is None:
                continue
            v = _eval(program, inputs, i)
            if v is _ERROR or (v is not _ABSENT and v != v):
                return None
            if v is not _ABSENT:
                column[i] = v
    return mask, out
