"""The column-expression kernel: a flow's `where` and arguments evaluated a column at a time must
give, reading by reading, exactly what the expressions give row by row (or hand the batch back
where the expressions would fail), and the compiled kernel exactly what its twin gives."""

from __future__ import annotations

import math
from array import array
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from processors.engine.columns import _BOOL, _FLOAT, Refs, _program
from streams import SensorUpdate
from streams.expressions import NOT_AVAILABLE, EvaluationError, Type, compile_expression, parse
from streams.expressions.scopes import StreamScope
from streams.kernels import _vector_py

try:
    from streams.kernels import _vector  # type: ignore[attr-defined]
except ImportError:  # the twins-only run: the twin against the expressions still holds
    _vector = None

SCOPE = StreamScope({"a": Type.NUMBER, "b": Type.NUMBER})
values = st.one_of(
    st.none(),  # the message lacks the channel
    st.floats(-1e6, 1e6),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, -3.5, 0.1, 1e300, -1e300, 5e-324]),
)
literals = st.sampled_from(["0", "1", "2", "-3", "0.5", "1.8", "32", "1e300", "2.5"])


def _numbers(depth: int) -> Any:
    leaf = st.one_of(st.sampled_from(["a", "b"]), literals)
    if depth == 0:
        return leaf
    sub, cond = _numbers(depth - 1), _booleans(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from(["+", "-", "*", "/", "%"]), sub).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        sub.map(lambda x: f"-({x})"),
        st.tuples(st.sampled_from(["abs", "sqrt"]), sub).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(["min", "max"]), st.lists(sub, min_size=2, max_size=3)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})"
        ),
        st.tuples(cond, sub, sub).map(lambda t: f"({t[0]} ? {t[1]} : {t[2]})"),
    )


def _booleans(depth: int) -> Any:
    sub = _numbers(max(depth - 1, 0))
    leaf = st.one_of(
        st.sampled_from(["true", "false", "available(a)", "available(b)"]),
        st.tuples(sub, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), sub).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
    )
    if depth == 0:
        return leaf
    inner = _booleans(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
        inner.map(lambda x: f"not ({x})"),
    )


def _row(source: str, a: float | None, b: float | None) -> Any:
    """What the expressions give on one reading: a value, NOT_AVAILABLE, or "error"."""
    expression = compile_expression(source, SCOPE)
    channels: dict[str, Any] = {k: v for k, v in (("a", a), ("b", b)) if v is not None}
    try:
        return expression.evaluate({"": SensorUpdate(channels, 0)})
    except EvaluationError:
        return "error"


def _column(items: list[float | None]) -> array[float]:
    return array("d", [math.nan if v is None else v for v in items])


def _same(x: Any, y: Any) -> bool:
    if x is None or y is None:
        return x is y
    (mx, vx), (my, vy) = x, y
    columns = [(mx, my), *zip(vx, vy, strict=True)]
    return all(
        (p is None and q is None)
        or (p is not None and q is not None and [repr(v) for v in p] == [repr(v) for v in q])
        for p, q in columns
    )


@settings(max_examples=400, deadline=None)
@given(source=_numbers(3), readings=st.lists(st.tuples(values, values), max_size=6))
def test_a_number_program_gives_what_the_expressions_give(
    source: str, readings: list[tuple[float | None, float | None]]
) -> None:
    refs = Refs()
    got = _program(parse(source), refs)
    if got is None or got[1] != _FLOAT:
        return  # not a column program (a whole-number result, say): the expressions' way
    program, inputs = got[0], list(refs)
    columns = [_column([r[0] if ch == "a" else r[1] for r in readings]) for ch in inputs]
    twin = _vector_py.derive_columns(None, [program], columns, len(readings))
    if _vector is not None:
        assert _same(_vector.derive_columns(None, [program], columns, len(readings)), twin)
    rows = [_row(source, a, b) for a, b in readings]
    if any(r == "error" or (type(r) is float and math.isnan(r)) for r in rows):
        assert twin is None  # the batch goes row by row, where the expressions reject it
        return
    assert twin is not None
    (column,) = twin[1]
    assert column is not None
    for r, v in zip(rows, column, strict=True):
        if r is NOT_AVAILABLE:
            assert math.isnan(v)
        else:
            assert type(r) is float and repr(r) == repr(v), (source, rows, list(column))


@settings(max_examples=400, deadline=None)
@given(source=_booleans(3), readings=st.lists(st.tuples(values, values), max_size=6))
def test_a_where_program_keeps_what_the_expressions_keep(
    source: str, readings: list[tuple[float | None, float | None]]
) -> None:
    refs = Refs()
    got = _program(parse(source), refs)
    if got is None:
        return
    assert got[1] == _BOOL
    program, inputs = got[0], list(refs)
    columns = [_column([r[0] if ch == "a" else r[1] for r in readings]) for ch in inputs]
    twin = _vector_py.derive_columns(program, [], columns, len(readings))
    if _vector is not None:
        assert _same(_vector.derive_columns(program, [], columns, len(readings)), twin)
    rows = [_row(source, a, b) for a, b in readings]
    if "error" in rows:
        assert twin is None
        return
    assert twin is not None and twin[0] is not None
    assert [v == 1.0 for v in twin[0]] == [r is True for r in rows], source


def test_programs_are_made_only_where_the_columns_give_the_same() -> None:
    def kind(source: str) -> str | None:
        got = _program(parse(source), Refs())
        return None if got is None else got[1]

    assert kind("a * 1.8 + 32") == _FLOAT and kind("a > 5 and b < 80") == _BOOL
    assert kind("available(b) ? b : a") == _FLOAT and kind("max(a, b, 0.5)") == _FLOAT
    # a whole number Python keeps as an int, which a double could not tell from a float
    assert kind("min(a, 0)") is None and kind("a > 0 ? 1 : 0") is None and kind("1 + 2") is None
    # strings, times, powers, other functions, big whole numbers: the expressions' way
    for source in ("a ** 2", "lastUpdate > 5", "floor(a)", "a + 9007199254740993", "a in [1]"):
        assert kind(source) is None, source


def test_columns_that_are_not_doubles_go_the_expressions_way() -> None:
    program = (_vector_py.ADD, (_vector_py.REF, 0), (_vector_py.NUM, 1.0))
    for module in (_vector_py, _vector):
        if module is None:
            continue
        assert module.derive_columns(None, [program], [[1.0, 2.0]], 2) is None
        assert module.derive_columns(None, [program], [array("q", [1, 2])], 2) is None
        mask, (column,) = module.derive_columns(None, [program], [None], 2)
        assert mask is None and all(math.isnan(v) for v in column)  # no reading has it
