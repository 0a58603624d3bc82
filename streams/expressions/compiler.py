"""Compile a syntax tree once into nested closures; evaluate by plain calls.

Types are checked at compile time wherever the channel types make them known; where they are
not (`any`), the closure checks at run time. A reference to an input that has not been seen yet
raises the private `_Unavailable`, which unwinds to the top and makes the result
`NOT_AVAILABLE`, unless `coalesce`, `is_null` or `available` catches it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from streams.expressions.functions import (
    FUNCTIONS,
    EvaluationError,
    Function,
    Type,
    describe,
    power,
    type_of,
    zone,
)
from streams.expressions.syntax import (
    Binary,
    Call,
    Compare,
    Conditional,
    ExpressionError,
    ListExpr,
    Literal,
    Logical,
    Node,
    Ref,
    Unary,
    parse,
)
from streams.objects import ChannelType
from streams.updates import SensorUpdate

Env = Mapping[str, SensorUpdate]
"""What an expression reads: the latest update of each input, by input name."""

Fn = Callable[[Env], Any]


class _NotAvailable:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_AVAILABLE"

    def __bool__(self) -> bool:
        return False


NOT_AVAILABLE: Any = _NotAvailable()
"""The result of an expression that reads an input or channel not seen yet."""


class _Unavailable(Exception):
    pass


_UNAVAILABLE = _Unavailable()

CHANNEL_TYPES = {
    ChannelType.NUMBER: Type.NUMBER,
    ChannelType.STRING: Type.STRING,
    ChannelType.BOOLEAN: Type.BOOLEAN,
    ChannelType.GEO_POINT: Type.GEO_POINT,
}


class Scope(Protocol):
    """Resolves a reference path to a getter and its static type; ExpressionError if unknown."""

    def resolve(self, path: tuple[str, ...], source: str, pos: int) -> tuple[str, str, Type]: ...


def getter(input_name: str, channel: str) -> Fn:
    """A closure reading one channel (or `lastUpdate`) of one input from the environment."""
    if channel == "lastUpdate":

        def get_time(env: Env) -> Any:
            update = env.get(input_name)
            if update is None:
                raise _UNAVAILABLE
            return update.last_update

        return get_time

    def get(env: Env) -> Any:
        try:
            return env[input_name].channels[channel]
        except KeyError:
            raise _UNAVAILABLE from None

    return get


@dataclass(frozen=True)
class CompiledExpression:
    source: str
    type: Type
    references: frozenset[tuple[str, str]]  # (input, channel or "lastUpdate")
    _fn: Fn

    @property
    def inputs(self) -> frozenset[str]:
        return frozenset(i for i, _ in self.references)

    def evaluate(self, env: Env) -> Any:
        """The value, NOT_AVAILABLE, or EvaluationError naming what failed and why."""
        try:
            return self._fn(env)
        except _Unavailable:
            return NOT_AVAILABLE
        except EvaluationError as exc:
            raise EvaluationError(f"{exc} (in {self.source!r})") from None
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise EvaluationError(f"{exc} (in {self.source!r})") from None


def compile_expression(
    source: str,
    scope: Scope,
    *,
    expect: Type | None = None,
    what: str = "the expression",
    node: Node | None = None,
) -> CompiledExpression:
    """Parse and compile `source` once; ExpressionError if it is invalid in `scope`.

    `node`, when given, is a part of `source` already parsed (an aggregate's argument, say):
    it is compiled instead, and `source` serves the error messages.
    """
    compiler = _Compiler(source, scope)
    fn, kind = compiler.node(parse(source) if node is None else node)
    if expect is not None and kind not in (expect, Type.ANY):
        if not (expect is Type.BOOLEAN and kind is Type.NULL):
            raise ExpressionError(
                f"{what} must give a {expect.value}, but gives a {kind.value}", source
            )
    if expect is not None and kind is Type.ANY:
        fn = _checked(fn, expect, f"{what} must give a {expect.value}")
    return CompiledExpression(source, kind, frozenset(compiler.references), fn)


def _checked(fn: Fn, want: Type, message: str) -> Fn:
    def check(env: Env) -> Any:
        value = fn(env)
        if type_of(value) is not want and value is not None:
            raise EvaluationError(f"{message}, got {describe(value)}")
        return value

    return check


def _need(fn: Fn, want: Type, what: str) -> Fn:
    """Wrap `fn` with a run-time type check (used only where the static type is `any`)."""

    def check(env: Env) -> Any:
        value = fn(env)
        if type_of(value) is not want:
            raise EvaluationError(f"{what} needs a {want.value}, got {describe(value)}")
        return value

    return check


def _equal(a: Any, b: Any) -> bool:
    # No coercion between types: true is not 1, "1" is not 1.
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta in (int, float) and tb in (int, float):
        return bool(a == b)
    return ta is tb and bool(a == b)


def _js_mod(a: Any, b: Any) -> Any:
    # The remainder takes the sign of the dividend, as in JavaScript (ServIoTicy's language).
    if b == 0:
        raise EvaluationError("remainder of a division by zero")
    if type(a) is int and type(b) is int:
        r = abs(a) % abs(b)
        return r if a >= 0 else -r
    return math.fmod(a, b)


def _divide(a: Any, b: Any) -> Any:
    if b == 0:
        raise EvaluationError("division by zero")
    return a / b


def _add(a: Any, b: Any) -> Any:
    ta, tb = type_of(a), type_of(b)
    if ta is tb and ta in (Type.NUMBER, Type.STRING):
        return a + b
    raise EvaluationError(
        f"'+' needs two numbers or two strings, got {describe(a)} and {describe(b)}"
    )


_ARITHMETIC: dict[str, Callable[[Any, Any], Any]] = {
    "-": operator.sub,
    "*": operator.mul,
    "/": _divide,
    "%": _js_mod,
    "**": power,
}
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class _Compiler:
    def __init__(self, source: str, scope: Scope) -> None:
        self.source = source
        self.scope = scope
        self.references: set[tuple[str, str]] = set()

    def error(self, message: str, node: Node) -> ExpressionError:
        return ExpressionError(message, self.source, node.pos)

    def node(self, node: Node) -> tuple[Fn, Type]:
        method: Callable[[Any], tuple[Fn, Type]] = getattr(self, type(node).__name__.lower())
        return method(node)

    def literal(self, node: Literal) -> tuple[Fn, Type]:
        value = node.value
        return (lambda env: value), type_of(value)

    def ref(self, node: Ref) -> tuple[Fn, Type]:
        input_name, channel, kind = self.scope.resolve(node.path, self.source, node.pos)
        self.references.add((input_name, channel))
        return getter(input_name, channel), kind

    def listexpr(self, node: ListExpr) -> tuple[Fn, Type]:
        items = [self.node(item)[0] for item in node.items]
        return (lambda env: [item(env) for item in items]), Type.LIST

    def unary(self, node: Unary) -> tuple[Fn, Type]:
        fn, kind = self.node(node.operand)
        if node.op == "not":
            fn = self._expect(fn, kind, Type.BOOLEAN, "'not'", node)
            return (lambda env: not fn(env)), Type.BOOLEAN
        fn = self._expect(fn, kind, Type.NUMBER, f"unary '{node.op}'", node)
        if node.op == "-":
            return (lambda env: -fn(env)), Type.NUMBER
        return fn, Type.NUMBER

    def binary(self, node: Binary) -> tuple[Fn, Type]:
        left, lt = self.node(node.left)
        right, rt = self.node(node.right)
        if node.op == "+":
            if lt is rt and lt in (Type.NUMBER, Type.STRING):
                return (lambda env: left(env) + right(env)), lt
            if Type.ANY not in (lt, rt):
                raise self.error(
                    f"'+' needs two numbers or two strings, not a {lt.value} and a {rt.value}",
                    node,
                )
            return (lambda env: _add(left(env), right(env))), Type.ANY
        left = self._expect(left, lt, Type.NUMBER, f"'{node.op}'", node)
        right = self._expect(right, rt, Type.NUMBER, f"'{node.op}'", node)
        op = _ARITHMETIC[node.op]
        return (lambda env: op(left(env), right(env))), Type.NUMBER

    def compare(self, node: Compare) -> tuple[Fn, Type]:
        left, lt = self.node(node.left)
        right, rt = self.node(node.right)
        if node.op in ("==", "!="):
            if node.op == "==":
                return (lambda env: _equal(left(env), right(env))), Type.BOOLEAN
            return (lambda env: not _equal(left(env), right(env))), Type.BOOLEAN
        if node.op in ("in", "not in"):
            if rt not in (Type.LIST, Type.STRING, Type.ANY):
                raise self.error(
                    f"'{node.op}' needs a list or a string on its right, not a {rt.value}", node
                )
            negate = node.op == "not in"

            def member(env: Env) -> bool:
                needle, haystack = left(env), right(env)
                if type(haystack) is str:
                    if type(needle) is not str:
                        raise EvaluationError(
                            f"'in' a string needs a string, got {describe(needle)}"
                        )
                    return (needle in haystack) != negate
                if type(haystack) is not list:
                    raise EvaluationError(
                        f"'in' needs a list or a string, got {describe(haystack)}"
                    )
                return any(_equal(needle, item) for item in haystack) != negate

            return member, Type.BOOLEAN
        order = _ORDER[node.op]
        if lt is rt and lt in (Type.NUMBER, Type.STRING):
            return (lambda env: order(left(env), right(env))), Type.BOOLEAN
        if Type.ANY not in (lt, rt):
            raise self.error(
                f"'{node.op}' compares two numbers or two strings,"
                f" not a {lt.value} and a {rt.value}",
                node,
            )

        def ordered(env: Env) -> bool:
            a, b = left(env), right(env)
            ta, tb = type_of(a), type_of(b)
            if ta is not tb or ta not in (Type.NUMBER, Type.STRING):
                raise EvaluationError(
                    f"'{node.op}' compares two numbers or two strings,"
                    f" got {describe(a)} and {describe(b)}"
                )
            return order(a, b)

        return ordered, Type.BOOLEAN

    def logical(self, node: Logical) -> tuple[Fn, Type]:
        left, lt = self.node(node.left)
        right, rt = self.node(node.right)
        left = self._expect(left, lt, Type.BOOLEAN, f"'{node.op}'", node)
        right = self._expect(right, rt, Type.BOOLEAN, f"'{node.op}'", node)
        if node.op == "and":
            return (lambda env: left(env) and right(env)), Type.BOOLEAN
        return (lambda env: left(env) or right(env)), Type.BOOLEAN

    def conditional(self, node: Conditional) -> tuple[Fn, Type]:
        cond, ct = self.node(node.condition)
        cond = self._expect(cond, ct, Type.BOOLEAN, "the condition of '?'", node)
        then, tt = self.node(node.then)
        other, ot = self.node(node.otherwise)
        kind = tt if tt is ot else (tt if ot is Type.NULL else ot if tt is Type.NULL else Type.ANY)
        return (lambda env: then(env) if cond(env) else other(env)), kind

    def call(self, node: Call) -> tuple[Fn, Type]:
        function = FUNCTIONS.get(node.name)
        if function is None:
            known = ", ".join(sorted(FUNCTIONS))
            raise self.error(f"unknown function {node.name!r} (known: {known})", node)
        count = len(node.args)
        least = len(function.params) - function.optional
        if count < least or (count > len(function.params) and not function.variadic):
            raise self.error(
                f"{function.signature} takes {self._arity(function)}, got {count}", node
            )
        compiled = [self.node(arg) for arg in node.args]
        if function.lazy:
            returns = function.returns
            if function.name == "coalesce":  # the common type of its non-null arguments
                kinds = {kind for _, kind in compiled} - {Type.NULL}
                returns = kinds.pop() if len(kinds) == 1 else Type.ANY
            return self._lazy(function, [fn for fn, _ in compiled]), returns
        args: list[Fn] = []
        for i, (fn, kind) in enumerate(compiled):
            want = function.params[min(i, len(function.params) - 1)]
            what = f"argument {i + 1} of {function.name}()"
            if want is not Type.ANY:
                fn = self._expect(fn, kind, want, what, node)
            args.append(fn)
        if function.name in ("hour", "minute", "weekday", "day", "month", "year") and count == 2:
            tz = node.args[1]
            if isinstance(tz, Literal) and type(tz.value) is str:
                try:
                    zone(tz.value)
                except EvaluationError as exc:
                    raise self.error(str(exc), tz) from None
        impl = function.impl
        if count == 1:
            (a,) = args
            return (lambda env: impl(a(env))), function.returns
        if count == 2:
            a, b = args
            return (lambda env: impl(a(env), b(env))), function.returns
        return (lambda env: impl(*[arg(env) for arg in args])), function.returns

    @staticmethod
    def _arity(function: Function) -> str:
        least = len(function.params) - function.optional
        if function.variadic:
            return f"at least {least} arguments"
        if function.optional:
            return f"{least} to {len(function.params)} arguments"
        return f"{least} argument{'s' if least != 1 else ''}"

    def _lazy(self, function: Function, args: list[Fn]) -> Fn:
        if function.name == "coalesce":

            def coalesce(env: Env) -> Any:
                for arg in args:
                    try:
                        value = arg(env)
                    except _Unavailable:
                        continue
                    if value is not None:
                        return value
                return None

            return coalesce
        (arg,) = args
        if function.name == "available":

            def available(env: Env) -> bool:
                try:
                    arg(env)
                except _Unavailable:
                    return False
                return True

            return available

        def is_null(env: Env) -> bool:
            try:
                return arg(env) is None
            except _Unavailable:
                return True

        return is_null

    def _expect(self, fn: Fn, kind: Type, want: Type, what: str, node: Node) -> Fn:
        if kind is want:
            return fn
        if kind is Type.ANY:
            return _need(fn, want, what)
        raise self.error(f"{what} needs a {want.value}, not a {kind.value}", node)
