"""Column plans: the flow inputs read without evaluating expressions update by update.

A flow keyed by object (or not keyed) has a column plan when its `where` and its aggregates'
arguments are one of two shapes:
- plain: `where` is `channel <op> number` (or absent) and the aggregates read plain channels;
  the window kernel reads those channels itself (`kernels.column_inputs`, `kernels.fold_parts`:
  one call per batch, no closure per update);
- derived: arithmetic, comparisons and logic over number channels (`t * 1.8 + 32`,
  `t > 5 and h < 80`, `abs(a - b)`, `available(h) ? h : t`): compiled here into a program of
  the column-expression kernel (`kernels.derive_columns`), which makes the `where` and the
  arguments into columns of a run before the window kernel folds them.
Anything else (strings, `lastUpdate`, other functions, a key expression) keeps the expression
path, and so does any batch the columns cannot take exactly (a stream's values not all floats,
a division by zero to be rejected): a plan only ever takes what gives the same result either
way, and the expressions word the errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from streams.expressions import Type, parse
from streams.expressions.compiler import CompiledExpression
from streams.expressions.syntax import (
    Binary,
    Call,
    Compare,
    Conditional,
    Literal,
    Logical,
    Node,
    Ref,
    Unary,
)
from streams.flows.compile import CompiledFlow, InputProgram
from streams.kernels import _vector_py as vec

_OPS = {"<": 0, "<=": 1, ">": 2, ">=": 3}
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}


Program = tuple[Any, ...]  # a column-expression program (see `streams.kernels._vector_py`)


@dataclass(frozen=True, slots=True)
class Derivation:
    """The programs a derived plan evaluates over a run's columns, and what they read."""

    inputs: tuple[str, ...]  # the channels read, in the order the programs number them
    where: Program | None
    values: tuple[Program | None, ...]  # per aggregate; None: count()
    names: tuple[str, ...]  # the derived columns' names: the `where`'s first, if any


@dataclass(frozen=True, slots=True)
class ColumnPlan:
    where: tuple[str, int, Any] | None  # (channel, operator code, number)
    channels: tuple[str | None, ...]  # per aggregate: the channel it reads; None: count()
    # derived: `where` and `channels` name the columns the derivation makes
    derive: Derivation | None = None


def _channel(expression: CompiledExpression) -> str | None:
    """The channel a plain reference like `t` reads, or None."""
    (ref,) = expression.references if len(expression.references) == 1 else (None,)
    if ref is None or ref[0] != "" or ref[1] == "lastUpdate":
        return None
    return ref[1]


def _number(node: Any) -> float | int | None:
    if isinstance(node, Unary) and node.op == "-":
        value = _number(node.operand)
        return None if value is None else -value
    if isinstance(node, Literal) and type(node.value) in (int, float):
        return node.value  # type: ignore[no-any-return]
    return None


def column_plan(flow: CompiledFlow, program: InputProgram) -> ColumnPlan | None:
    if flow.key_mode not in ("so", "none"):
        return None
    return _plain_plan(flow, program) or _derived_plan(flow, program)


def _plain_plan(flow: CompiledFlow, program: InputProgram) -> ColumnPlan | None:
    where = None
    if program.where is not None:
        node = parse(program.where.source)
        channel = _channel(program.where)
        if not isinstance(node, Compare) or node.op not in _OPS or channel is None:
            return None
        op = node.op
        if isinstance(node.left, Ref) and _number(node.right) is not None:
            value = _number(node.right)
        elif isinstance(node.right, Ref) and _number(node.left) is not None:
            value, op = _number(node.left), _MIRROR[op]
        else:
            return None
        where = (channel, _OPS[op], value)
    channels: list[str | None] = []
    for arg, (_, aggregate) in zip(program.args, flow.aggregates, strict=True):
        if arg is None:
            channels.append(None)
            continue
        channel = _channel(arg)
        # a numeric aggregate of a channel not typed as a number checks each value: keep that
        node = parse(arg.source)  # the aggregate's call, e.g. avg(t): its argument counts
        if isinstance(node, Call) and len(node.args) == 1:
            node = node.args[0]
        if channel is None or not isinstance(node, Ref):
            return None
        if aggregate.numeric and arg.type is not Type.NUMBER:
            return None
        channels.append(channel)
    return ColumnPlan(where, tuple(channels))


_WHERE = "\x00where"  # a derived column's name: no channel's (names are checked at registration)
_FLOAT, _INT, _BOOL = "float", "int", "bool"  # static kinds: _INT is a whole-number literal
FLOAT, BOOL = _FLOAT, _BOOL
_ARITHMETIC = {"+": vec.ADD, "-": vec.SUB, "*": vec.MUL, "/": vec.DIV, "%": vec.MOD}
_COMPARE = {"<": vec.LT, "<=": vec.LE, ">": vec.GT, ">=": vec.GE, "==": vec.EQ, "!=": vec.NE}


class Refs(dict[str, int]):
    """The channels a program reads, numbered in the order it reads them first. A flow's
    expressions name channels bare (`t`); a composite stream's name them through its input
    (`data.t`): `input` is that name, and a reference to anything else (another input, a
    group) is not read by columns. `lastUpdate` never is."""

    def __init__(self, input_name: str = "") -> None:
        super().__init__()
        self.input = input_name

    def channel(self, path: tuple[str, ...]) -> str | None:
        if self.input:
            if len(path) != 2 or path[0] != self.input:
                return None
        elif len(path) != 1:
            return None
        return None if path[-1] == "lastUpdate" else path[-1]


def program_of(source: str, refs: Refs, kind: str) -> Program | None:
    """The program of an expression's text when it is one of `kind` (`FLOAT` or `BOOL`)."""
    got = _program(parse(source), refs)
    return got[0] if got is not None and got[1] == kind else None


def _derived_plan(flow: CompiledFlow, program: InputProgram) -> ColumnPlan | None:
    refs = Refs()
    where = None
    if program.where is not None:
        got = _program(parse(program.where.source), refs)
        if got is None or got[1] != _BOOL:
            return None
        where = got[0]
    values: list[Program | None] = []
    for arg in program.args:
        if arg is None:
            values.append(None)
            continue
        node = parse(arg.source)  # the aggregate's call: its one argument is the program
        if not isinstance(node, Call) or len(node.args) != 1:
            return None
        got = _program(node.args[0], refs)
        if got is None or got[1] != _FLOAT:
            return None
        values.append(got[0])
    names = ((_WHERE,) if where is not None else ()) + tuple(
        f"\x00{j}" for j, v in enumerate(values) if v is not None
    )
    derive = Derivation(tuple(refs), where, tuple(values), names)
    channels = tuple(None if v is None else f"\x00{j}" for j, v in enumerate(values))
    return ColumnPlan((_WHERE, _OPS[">"], 0) if where is not None else None, channels, derive)


def _program(node: Node, refs: Refs) -> tuple[Program, str] | None:
    """`node` as a program and its kind, or None when the columns cannot evaluate it exactly
    as the expressions do. A channel is taken to hold floats: the kernel checks that each run's
    columns are doubles, and takes none that are not. Every arithmetic or comparison has a
    float on one side at least (a whole-number literal on the other converts exactly, as
    Python's floats do), and `min`, `max` and `?` give floats only of floats: Python's `min(t,
    0)` can give the int 0, which a double cannot tell from 0.0."""
    if isinstance(node, Literal):
        v = node.value
        if type(v) is bool:
            return (vec.NUM, v), _BOOL
        if type(v) is float and math.isfinite(v):
            return (vec.NUM, v), _FLOAT
        if type(v) is int and abs(v) <= 2**53:
            return (vec.NUM, float(v)), _INT
        return None
    if isinstance(node, Ref):
        channel = refs.channel(node.path)
        if channel is None:
            return None
        return (vec.REF, refs.setdefault(channel, len(refs))), _FLOAT
    if isinstance(node, Unary):
        got = _program(node.operand, refs)
        if got is None or (got[1] == _BOOL) != (node.op == "not"):
            return None
        if node.op == "+":
            return got
        if got[1] == _INT:  # a whole number (a constant): negated as an int, -0 is 0
            return (vec.NUM, float(-int(got[0][1]))), _INT
        return (vec.NOT if node.op == "not" else vec.NEG, got[0]), got[1]
    if isinstance(node, Call):
        return _call(node, refs)
    if isinstance(node, Conditional):
        parts = [_program(n, refs) for n in (node.condition, node.then, node.otherwise)]
        if None in parts:
            return None
        (c, ck), (a, ak), (b, bk) = parts  # type: ignore[misc]
        if ck != _BOOL or ak != bk or ak == _INT:
            return None
        return (vec.COND, c, a, b), ak
    if not isinstance(node, (Binary, Compare, Logical)):
        return None
    left, right = _program(node.left, refs), _program(node.right, refs)
    if left is None or right is None:
        return None
    (a, ak), (b, bk) = left, right
    if isinstance(node, Logical):
        if ak != _BOOL or bk != _BOOL:
            return None
        return (vec.AND if node.op == "and" else vec.OR, a, b), _BOOL
    if _BOOL in (ak, bk) or _FLOAT not in (ak, bk):
        return None
    if isinstance(node, Compare):
        op = _COMPARE.get(node.op)
        return None if op is None else ((op, a, b), _BOOL)
    op = _ARITHMETIC.get(node.op)
    return None if op is None else ((op, a, b), _FLOAT)


def _call(node: Call, refs: Refs) -> tuple[Program, str] | None:
    args = [_program(n, refs) for n in node.args]
    if None in args or not args:
        return None
    programs = [a[0] for a in args if a is not None]
    kinds = {a[1] for a in args if a is not None}
    if node.name == "available" and len(args) == 1:
        return (vec.AVAILABLE, programs[0]), _BOOL
    if _BOOL in kinds:
        return None
    if node.name == "abs" and len(args) == 1:
        if kinds == {_INT}:  # a whole number stays one (a constant)
            return (vec.NUM, abs(programs[0][1])), _INT
        return (vec.ABS, programs[0]), _FLOAT
    if node.name == "sqrt" and len(args) == 1:
        return (vec.SQRT, programs[0]), _FLOAT
    if node.name in ("min", "max") and len(args) >= 2 and kinds == {_FLOAT}:
        op = vec.MIN if node.name == "min" else vec.MAX
        folded = programs[0]
        for p in programs[1:]:  # left to right, as Python's min and max
            folded = (op, folded, p)
        return folded, _FLOAT
    return None
