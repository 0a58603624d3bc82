"""The expression language: syntax, types, functions, errors, bounds, and fuzzing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.expressions import (
    NOT_AVAILABLE,
    EvaluationError,
    ExpressionError,
    InputsScope,
    StreamScope,
    Type,
    compile_expression,
    parse,
)
from streams.expressions.servioticy import native_equivalent
from streams.expressions.syntax import MAX_DEPTH, MAX_NODES, MAX_SOURCE
from streams.updates import GeoPoint, SensorUpdate

N, S, B, G = Type.NUMBER, Type.STRING, Type.BOOLEAN, Type.GEO_POINT
SCOPE = InputsScope(
    {
        "data": {"t": N, "name": S, "on": B, "where": G},
        "group1": {"temperature": N},
        "other": {"t": N},
    }
)
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z, a Tuesday
ENV = {
    "data": SensorUpdate(
        {"t": 21.5, "name": "Field One", "on": True, "where": GeoPoint(41.3851, 2.1734)}, T0
    ),
    "group1": SensorUpdate({"temperature": 21}, T0 - 1000),
}


def value(source: str, env: Any = ENV) -> Any:
    return compile_expression(source, SCOPE).evaluate(env)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("-2 ** 2", -4),
        ("2 ** 3 ** 2", 512),
        ("7 / 2", 3.5),
        ("-7 % 3", -1),  # sign of the dividend, as in JavaScript
        ("7.5 % 2", 1.5),
        ("data.t * 1.8 + 32", 70.7),
        ("{$group1.channels.temperature.current-value} * 1.8 + 32", 69.80000000000001),
        ("{$data.channels.t['current-value']} > 20", True),
        ('{$data.channels.t["current-value"]} > 20', True),
        ("{$data.lastUpdate} == data.lastUpdate", True),
        ("data.t > 20 && data.on", True),
        ("data.t > 20 and not data.on", False),
        ("!data.on || data.t < 0", False),
        ("data.t > 30 ? 'hot' : data.t > 15 ? 'mild' : 'cold'", "mild"),
        ("data.name == 'Field One'", True),
        ("data.name === 'Field One'", True),
        ("data.t != 21.5", False),
        ("1 == true", False),  # no coercion between types
        ("'1' == 1", False),
        ("data.t in [20, 21.5]", True),
        ("data.name not in ['a', 'b']", True),
        ("'One' in data.name", True),
        ("abs(-3) + min(4, 2, 9) + max(1, 5)", 10),
        ("round(2.5)", 3),
        ("round(-2.5)", -3),
        ("round(1.005, 2)", 1.01),
        ("floor(-1.5) + ceil(1.2)", 0),
        ("sqrt(16) + pow(2, 10) + exp(0)", 1029.0),
        ("log(100, 10)", 2.0),
        ("clamp(data.t, 0, 20)", 20),
        ("len(data.name) + len([1, 2])", 11),
        ("lower(data.name) + '|' + upper('x') + '|' + trim('  y ')", "field one|X|y"),
        ("contains(data.name, 'One') and startswith(data.name, 'F') and endswith('ab', 'b')", True),
        ("substr(data.name, 6) + substr('abcdef', 1, 2)", "Onebc"),
        ("str(data.t) + str(true) + str(null) + str(data.where)", "21.5truenull41.3851,2.1734"),
        ("num('12') + num('0.5')", 12.5),
        ("year(data.lastUpdate)", 2023),
        ("month(data.lastUpdate) * 100 + day(data.lastUpdate)", 1114),
        ("hour(data.lastUpdate) * 100 + minute(data.lastUpdate)", 2213),
        ("weekday(data.lastUpdate)", 2),
        ("hour(data.lastUpdate, 'Europe/Madrid')", 23),
        ("day(data.lastUpdate, 'Asia/Tokyo')", 15),
        ("seconds(1) + minutes(1) + hours(1) + days(1)", 90_061_000),
        ("data.lastUpdate - group1.lastUpdate == seconds(1)", True),
        ("round(distance(data.where, geo(48.8566, 2.3522)))", 830_912),  # Barcelona-Paris
        ("inside(data.where, 41, 2, 42, 3)", True),
        ("inside(geo(0, 179.5), -1, 179, 1, -179)", True),  # a box across the antimeridian
        ("inside(geo(0, 0), -1, 179, 1, -179)", False),
        ("lat(data.where) > 41 and lon(data.where) < 3", True),
        ("is_null(null) and not is_null(data.t)", True),
        ("coalesce(null, data.t, 0)", 21.5),
        ("coalesce(other.t, -1)", -1),
        ("available(data.t) and not available(other.t)", True),
        ("is_null(other.t)", True),
        ("data.t > 0 ? null : 1", None),
    ],
)
def test_evaluation(source: str, expected: Any) -> None:
    result = value(source)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    "source", ["other.t + 1", "data.t > other.t", "abs(other.t)", "[other.t]", "other.lastUpdate"]
)
def test_an_input_never_seen_makes_the_result_not_available(source: str) -> None:
    assert value(source) is NOT_AVAILABLE


def test_a_channel_missing_from_the_latest_update_is_not_available() -> None:
    assert value("data.t", {"data": SensorUpdate({"name": "x"}, T0)}) is NOT_AVAILABLE


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "the expression is empty in ''"),
        ("1 +", "the expression ends too early at column 4 in '1 +'"),
        ("(1", "expected ')', found the end of the expression at column 3 in '(1'"),
        ("1 2", "unexpected 2 at column 3 in '1 2'"),
        ("a = 1", "unexpected character '=' (use == to compare) at column 3 in 'a = 1'"),
        ("1 < 2 < 3", "comparisons cannot be chained; use 'and' (a < b and b < c) at column 7"
         " in '1 < 2 < 3'"),
        ("'open", "unterminated string at column 1 in \"'open\""),
        ("'a\\q'", "unknown escape in string at column 3 in \"'a\\\\q'\""),
        ("{$data.t}", "'{$data.t}' is not a ServIoTicy reference (expected"
         " {$<input>.channels.<channel>.current-value} or {$<input>.lastUpdate}) at column 1"
         " in '{$data.t}'"),
        ("a.", "expected a name after '.', found the end of the expression at column 3 in 'a.'"),
        ("x in", "the expression ends too early at column 5 in 'x in'"),
        ("and", "unexpected 'and' at column 1 in 'and'"),
    ],
)  # fmt: skip
def test_syntax_errors_say_what_and_where(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse(source)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("data.x", "input 'data' has no channel 'x' (it has: t, name, on, where) at column 1"
         " in 'data.x'"),
        ("nothing.t", "unknown input 'nothing' (inputs here: data, group1, other) at column 1"
         " in 'nothing.t'"),
        ("t", "'t' is not a reference; write <input>.<channel> with an input of: data, group1,"
         " other at column 1 in 't'"),
        ("data.t + data.name", "'+' needs two numbers or two strings, not a number and a string"
         " at column 8 in 'data.t + data.name'"),
        ("data.name * 2", "'*' needs a number, not a string at column 11 in 'data.name * 2'"),
        ("data.t and true", "'and' needs a boolean, not a number at column 8 in 'data.t and true'"),
        ("!data.t", "'not' needs a boolean, not a number at column 1 in '!data.t'"),
        ("data.name < 3", "'<' compares two numbers or two strings, not a string and a number at"
         " column 11 in 'data.name < 3'"),
        ("data.t ? 1 : 2", "the condition of '?' needs a boolean, not a number at column 8 in"
         " 'data.t ? 1 : 2'"),
        ("1 in 2", "'in' needs a list or a string on its right, not a number at column 3 in"
         " '1 in 2'"),
        ("sqrt(data.name)", "argument 1 of sqrt() needs a number, not a string at column 1 in"
         " 'sqrt(data.name)'"),
        ("distance(data.where, 1)", "argument 2 of distance() needs a geo_point, not a number at"
         " column 1 in 'distance(data.where, 1)'"),
        ("round(1, 2, 3)", "round(number, [number]) takes 1 to 2 arguments, got 3 at column 1 in"
         " 'round(1, 2, 3)'"),
        ("min(1)", "min(number, number, ...) takes at least 2 arguments, got 1 at column 1 in"
         " 'min(1)'"),
        ("hour(data.lastUpdate, 'Mars/Base')", "unknown time zone 'Mars/Base' (use an IANA name"
         " such as Europe/Madrid) at column 23 in \"hour(data.lastUpdate, 'Mars/Base')\""),
        ("eval('1')", "unknown function 'eval' (known: abs, available, ceil, clamp, coalesce,"
         " contains, day, days, distance, endswith, exp, floor, geo, hour, hours, inside,"
         " is_null, lat, len, log, lon, lower, max, min, minute, minutes, month, num, pow, round,"
         " seconds, sqrt, startswith, str, substr, trim, upper, weekday, year) at column 1 in"
         " \"eval('1')\""),
        ("data.t.__class__", "'data.t.__class__' is not a reference; write <input>.<channel> with"
         " an input of: data, group1, other at column 1 in 'data.t.__class__'"),
    ],
)  # fmt: skip
def test_type_and_name_errors_are_caught_when_compiling(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source, SCOPE)
    assert str(info.value) == message


def test_the_result_type_is_checked_against_what_is_expected() -> None:
    with pytest.raises(ExpressionError) as info:
        compile_expression("data.name", SCOPE, expect=N, what="current-value")
    assert str(info.value) == "current-value must give a number, but gives a string in 'data.name'"
    checked = compile_expression("data.t > 1 ? data.t : data.name", SCOPE, expect=N)
    assert checked.evaluate(ENV) == 21.5
    with pytest.raises(EvaluationError, match="must give a number, got string 'Field One'"):
        checked.evaluate({"data": SensorUpdate({"t": 0, "name": "Field One"}, T0)})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("data.t / 0", "division by zero (in 'data.t / 0')"),
        ("data.t % 0", "remainder of a division by zero (in 'data.t % 0')"),
        ("sqrt(0 - data.t)", "sqrt() of a negative number (-21.5) (in 'sqrt(0 - data.t)')"),
        ("log(data.t - 21.5)", "log() of a number that is not positive (0.0) (in"
         " 'log(data.t - 21.5)')"),
        ("exp(data.t * 1000)", "exp(21500.0) is too large (in 'exp(data.t * 1000)')"),
        ("num(data.name)", "num() cannot read a number from 'Field One' (in 'num(data.name)')"),
        ("(-8) ** 0.5", "-8 ** 0.5 is not a real number (in '(-8) ** 0.5')"),
        ("2 ** (2 ** (2 ** 10))", "2 ** 1024 is too large (in '2 ** (2 ** (2 ** 10))')"),
        ("0 ** -1", "0 ** -1: zero has no negative powers (in '0 ** -1')"),
        ("coalesce(data.name, 1) + 1", "'+' needs two numbers or two strings, got string"
         " 'Field One' and number 1 (in 'coalesce(data.name, 1) + 1')"),
    ],
)  # fmt: skip
def test_runtime_failures_name_the_expression_and_the_reason(source: str, message: str) -> None:
    with pytest.raises(EvaluationError) as info:
        value(source)
    assert str(info.value) == message


def test_stream_scope_uses_bare_channel_names() -> None:
    scope = StreamScope({"moisture": N, "temperature": N})
    expr = compile_expression("moisture < 20 and hour(lastUpdate) >= 6", scope, expect=B)
    assert expr.evaluate({"": SensorUpdate({"moisture": 12.0, "temperature": 1}, T0)}) is True
    with pytest.raises(ExpressionError, match="unknown channel 'humidity'"):
        compile_expression("humidity > 1", scope)


def test_compiled_once_and_reports_what_it_reads() -> None:
    expr = compile_expression("coalesce(data.t, other.t) + {$group1.lastUpdate}", SCOPE)
    assert expr.references == {("data", "t"), ("other", "t"), ("group1", "lastUpdate")}
    assert expr.inputs == {"data", "other", "group1"}


def test_bounds() -> None:
    with pytest.raises(ExpressionError, match=f"more than {MAX_SOURCE}"):
        parse("1+" * MAX_SOURCE + "1")
    with pytest.raises(ExpressionError, match=f"deeper than {MAX_DEPTH} levels"):
        parse("(" * 100 + "1" + ")" * 100)
    with pytest.raises(ExpressionError, match=f"more than {MAX_NODES} parts"):
        parse("+".join(["1"] * 600))


def test_servioticy_0_2_0_functions_translate_when_mechanical() -> None:
    assert (
        native_equivalent(
            "function(A,group){return A.channels.$['current-value']+"
            "group.channels.$['current-value']}"
        )
        == "A.$+group.$"
    )
    assert (
        native_equivalent("function(A){return A.channels.$['current-value']==-1?null:false;}")
        == "A.$==-1?null:false"
    )
    assert native_equivalent("function(A){ var x = 1; return x; }") is None


# Fuzzing ---------------------------------------------------------------------------------------

_atoms = st.sampled_from(
    ["data.t", "data.name", "data.on", "data.where", "other.t", "group1.temperature", "1", "0",
     "2.5", "-1", "'x'", "true", "null", "[1, 'a']", "data.lastUpdate",
     "{$data.channels.t.current-value}"]
)  # fmt: skip
_ops = st.sampled_from(
    ["+", "-", "*", "/", "%", "**", "==", "!=", "<", ">=", "and", "or", "&&", "||", "in"]
)
_calls = st.sampled_from(
    ["abs", "min", "max", "round", "sqrt", "log", "len", "str", "num", "hour", "distance",
     "coalesce", "is_null", "clamp", "substr"]
)  # fmt: skip


@st.composite
def _expressions(draw: st.DrawFn, depth: int = 0) -> str:
    if depth > 3 or draw(st.booleans()):
        return draw(_atoms)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return f"({draw(_expressions(depth + 1))} {draw(_ops)} {draw(_expressions(depth + 1))})"
    if kind == 1:
        args = draw(st.lists(_expressions(depth + 1), min_size=1, max_size=3))
        return f"{draw(_calls)}({', '.join(args)})"
    if kind == 2:
        return f"{draw(st.sampled_from(['-', '!', 'not ']))}{draw(_expressions(depth + 1))}"
    a, b, c = (draw(_expressions(depth + 1)) for _ in range(3))
    return f"({a} ? {b} : {c})"


@settings(max_examples=1500, deadline=None)
@given(source=_expressions())
def test_fuzz_structured_expressions_never_crash(source: str) -> None:
    """Any expression either fails to compile with ExpressionError, or evaluates to a value,
    NOT_AVAILABLE, or an EvaluationError: nothing else ever escapes."""
    try:
        compiled = compile_expression(source, SCOPE)
    except ExpressionError:
        return
    for env in (ENV, {}):
        try:
            compiled.evaluate(env)
        except EvaluationError:
            pass


@settings(max_examples=1500, deadline=None)
@given(
    source=st.text(
        alphabet=st.sampled_from(list("()[]{}$.,:?!=<>&|+-*/%'\" abdelnortu0129")), max_size=40
    )
)
def test_fuzz_random_text_never_crashes_the_parser(source: str) -> None:
    try:
        compile_expression(source, SCOPE)
    except ExpressionError:
        pass
