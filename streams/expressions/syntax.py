"""Tokenizer and parser of cloudlet's expression language.

We write our own small Pratt parser rather than reuse Python's `ast`: the language must accept
both ServIoTicy's JavaScript-flavoured operators (`&&`, `||`, `!`, `===`, `c ? a : b`) and a
readable native form (`group1.temperature * 1.8 + 32`, `and`, `or`, `not`, `in`), report errors
by column, and stay bounded in size and depth whatever text a user sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from streams.references import REFERENCE_PATTERN

MAX_SOURCE = 4096
MAX_NODES = 512
MAX_DEPTH = 64


class ExpressionError(ValueError):
    """A text that is not a valid expression; says what is wrong and where."""

    def __init__(self, message: str, source: str, pos: int | None = None) -> None:
        self.reason = message
        self.source = source
        self.pos = pos
        where = f" at column {pos + 1}" if pos is not None else ""
        shown = source if len(source) <= 120 else source[:117] + "..."
        super().__init__(f"{message}{where} in {shown!r}")


# Tokens -------------------------------------------------------------------------------------

NUM, STR, NAME, REF, OP, EOF = "number", "string", "name", "reference", "operator", "end"

_OPERATORS = (
    "===", "!==", "**", "==", "!=", "<=", ">=", "&&", "||",
    "+", "-", "*", "/", "%", "<", ">", "!", "?", ":", "(", ")", "[", "]", ",", ".",
)  # fmt: skip
_NUMBER = re.compile(r"(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r"}
KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false", "null"})


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    value: Any
    pos: int


def tokenize(source: str) -> list[Token]:
    if len(source) > MAX_SOURCE:
        raise ExpressionError(
            f"the expression is {len(source)} characters long, more than {MAX_SOURCE}", source[:60]
        )
    tokens: list[Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch.isspace():
            i += 1
            continue
        if source.startswith("{$", i):
            m = REFERENCE_PATTERN.match(source, i)
            if m is None:
                end = source.find("}", i)
                fragment = source[i : end + 1 if end >= 0 else n]
                raise ExpressionError(
                    f"{fragment!r} is not a ServIoTicy reference (expected"
                    " {$<input>.channels.<channel>.current-value} or {$<input>.lastUpdate})",
                    source,
                    i,
                )
            path = (m["input"], m["channel"] if m["channel"] is not None else "lastUpdate")
            tokens.append(Token(REF, path, i))
            i = m.end()
            continue
        if ch.isdigit() or (ch == "." and i + 1 < n and source[i + 1].isdigit()):
            m = _NUMBER.match(source, i)
            assert m is not None
            text = m.group(0)
            value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
            tokens.append(Token(NUM, value, i))
            i = m.end()
            continue
        if ch in "'\"":
            value_s, i2 = _string(source, i)
            tokens.append(Token(STR, value_s, i))
            i = i2
            continue
        m = _NAME.match(source, i)
        if m is not None:
            tokens.append(Token(NAME, m.group(0), i))
            i = m.end()
            continue
        for op in _OPERATORS:
            if source.startswith(op, i):
                tokens.append(Token(OP, op, i))
                i += len(op)
                break
        else:
            hint = " (use == to compare)" if ch == "=" else ""
            raise ExpressionError(f"unexpected character {ch!r}{hint}", source, i)
    tokens.append(Token(EOF, None, n))
    return tokens


def _string(source: str, start: int) -> tuple[str, int]:
    quote = source[start]
    out: list[str] = []
    i = start + 1
    while i < len(source):
        ch = source[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= len(source) or source[i + 1] not in _ESCAPES:
                raise ExpressionError("unknown escape in string", source, i)
            out.append(_ESCAPES[source[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise ExpressionError("unterminated string", source, start)


# Syntax tree --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    pos: int
    value: Any


@dataclass(frozen=True, slots=True)
class Ref:
    pos: int
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ListExpr:
    pos: int
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Unary:
    pos: int
    op: str  # "-", "+", "not"
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary:
    pos: int
    op: str  # + - * / % **
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Compare:
    pos: int
    op: str  # == != < <= > >= in "not in"
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Logical:
    pos: int
    op: str  # and, or
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Conditional:
    pos: int
    condition: Node
    then: Node
    otherwise: Node


@dataclass(frozen=True, slots=True)
class Call:
    pos: int
    name: str
    args: tuple[Node, ...]


Node = Literal | Ref | ListExpr | Unary | Binary | Compare | Logical | Conditional | Call

# Binding powers, loosest first.
_TERNARY, _OR, _AND, _NOT, _COMPARE, _SUM, _PRODUCT, _PREFIX, _POWER = range(10, 100, 10)
_INFIX = {
    "or": (_OR, "or"), "||": (_OR, "or"),
    "and": (_AND, "and"), "&&": (_AND, "and"),
    "==": (_COMPARE, "=="), "===": (_COMPARE, "=="), "!=": (_COMPARE, "!="),
    "!==": (_COMPARE, "!="), "<": (_COMPARE, "<"), "<=": (_COMPARE, "<="),
    ">": (_COMPARE, ">"), ">=": (_COMPARE, ">="), "in": (_COMPARE, "in"),
    "+": (_SUM, "+"), "-": (_SUM, "-"),
    "*": (_PRODUCT, "*"), "/": (_PRODUCT, "/"), "%": (_PRODUCT, "%"),
    "**": (_POWER, "**"),
}  # fmt: skip


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.i = 0
        self.depth = 0
        self.nodes = 0

    def error(self, message: str, token: Token | None = None) -> ExpressionError:
        token = token or self.tokens[self.i]
        return ExpressionError(message, self.source, token.pos)

    @property
    def token(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, op: str) -> Token:
        token = self.token
        if token.kind != OP or token.value != op:
            raise self.error(f"expected {op!r}, found {_describe(token)}")
        return self.advance()

    def count(self, node: Node) -> Node:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.error(f"the expression has more than {MAX_NODES} parts")
        return node

    def _infix_of(self, token: Token) -> tuple[int, str] | None:
        if token.kind == OP and token.value == "?":
            return (_TERNARY, "?")
        if token.kind == OP or (token.kind == NAME and token.value in ("and", "or", "in")):
            return _INFIX.get(token.value)
        if token.kind == NAME and token.value == "not":
            following = self.tokens[self.i + 1]
            if following.kind == NAME and following.value == "in":
                return (_COMPARE, "not in")
        return None

    def expression(self, min_power: int = 0) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"the expression nests deeper than {MAX_DEPTH} levels")
        left = self.prefix()
        while True:
            token = self.token
            infix = self._infix_of(token)
            if infix is None or infix[0] <= min_power:
                break
            power, op = infix
            self.advance()
            if op == "not in":
                self.advance()  # the "in"
            if op == "?":
                then = self.expression(0)
                self.expect(":")
                otherwise = self.expression(_TERNARY - 1)
                left = self.count(Conditional(token.pos, left, then, otherwise))
                continue
            right_power = power - 1 if op == "**" else power
            right = self.expression(right_power)
            if power == _COMPARE:
                if isinstance(left, Compare):
                    raise self.error(
                        "comparisons cannot be chained; use 'and' (a < b and b < c)", token
                    )
                left = self.count(Compare(token.pos, op, left, right))
            elif power in (_OR, _AND):
                left = self.count(Logical(token.pos, op, left, right))
            else:
                left = self.count(Binary(token.pos, op, left, right))
        self.depth -= 1
        return left

    def prefix(self) -> Node:
        token = self.advance()
        kind, value = token.kind, token.value
        if kind == NUM or kind == STR:
            return self.count(Literal(token.pos, value))
        if kind == REF:
            return self.count(Ref(token.pos, value))
        if kind == NAME:
            if value in ("true", "false"):
                return self.count(Literal(token.pos, value == "true"))
            if value == "null":
                return self.count(Literal(token.pos, None))
            if value == "not":
                return self.count(Unary(token.pos, "not", self.expression(_NOT)))
            if value in KEYWORDS:
                raise self.error(f"unexpected {value!r}", token)
            if self.token.kind == OP and self.token.value == "(":
                return self.call(token)
            path = [value]
            while self.token.kind == OP and self.token.value == ".":
                self.advance()
                part = self.advance()
                if part.kind != NAME:
                    raise self.error(f"expected a name after '.', found {_describe(part)}", part)
                path.append(part.value)
            return self.count(Ref(token.pos, tuple(path)))
        if kind == OP:
            if value == "(":
                inner = self.expression(0)
                self.expect(")")
                return inner
            if value == "[":
                items: list[Node] = []
                if not (self.token.kind == OP and self.token.value == "]"):
                    items.append(self.expression(0))
                    while self.token.kind == OP and self.token.value == ",":
                        self.advance()
                        items.append(self.expression(0))
                self.expect("]")
                return self.count(ListExpr(token.pos, tuple(items)))
            if value in ("-", "+"):
                return self.count(Unary(token.pos, value, self.expression(_PREFIX)))
            if value == "!":
                return self.count(Unary(token.pos, "not", self.expression(_PREFIX)))
        if kind == EOF:
            raise self.error("the expression ends too early", token)
        raise self.error(f"unexpected {_describe(token)}", token)

    def call(self, name: Token) -> Node:
        self.expect("(")
        args: list[Node] = []
        if not (self.token.kind == OP and self.token.value == ")"):
            args.append(self.expression(0))
            while self.token.kind == OP and self.token.value == ",":
                self.advance()
                args.append(self.expression(0))
        self.expect(")")
        return self.count(Call(name.pos, name.value, tuple(args)))


def _describe(token: Token) -> str:
    if token.kind == EOF:
        return "the end of the expression"
    if token.kind == REF:
        return "a reference"
    return repr(token.value) if token.kind != STR else "a string"


def parse(source: str) -> Node:
    """The syntax tree of `source`; ExpressionError saying what and where otherwise."""
    if not source.strip():
        raise ExpressionError("the expression is empty", source)
    parser = _Parser(source)
    node = parser.expression(0)
    if parser.token.kind != EOF:
        raise parser.error(f"unexpected {_describe(parser.token)}")
    return node
