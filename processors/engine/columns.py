"""Column plans: the flow inputs simple enough to read without evaluating expressions.

A flow whose `where` is `channel <op> number` (or absent), keyed by object (or not keyed), whose
aggregates read plain channels, takes a batch through `kernels.column_inputs`: one call, no
closure per update. Anything else (other operators, arithmetic, functions, `lastUpdate`,
a key expression) keeps the expression path. A plan only ever takes the shapes whose result is
the same either way: a `where` channel that turns out not to be a number goes back to the
expressions, which word the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streams.expressions import Type, parse
from streams.expressions.compiler import CompiledExpression
from streams.expressions.syntax import Call, Compare, Literal, Ref, Unary
from streams.flows.compile import CompiledFlow, InputProgram

_OPS = {"<": 0, "<=": 1, ">": 2, ">=": 3}
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}


@dataclass(frozen=True, slots=True)
class ColumnPlan:
    where: tuple[str, int, Any] | None  # (channel, operator code, number)
    channels: tuple[str | None, ...]  # per aggregate: the channel it reads; None: count()


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
