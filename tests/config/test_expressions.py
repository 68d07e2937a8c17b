"""Tests for engine/config/expressions.py: grammar, types, null logic, explain, and a reference evaluator."""

from __future__ import annotations

import datetime as dt
import functools
import math
import operator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config.expressions import FUNCTIONS, OPERATORS, Expression, all_of, any_of, compile_expression
from engine.errors import DataError, ExpressionError

AS_OF = pd.Timestamp("2024-12-25 10:00", tz="Asia/Shanghai")
NAMES = {
    "n": "number", "m": "number", "k": "number", "orders_365d": "number",
    "city": "string", "tier": "string", "vip": "bool", "flag": "bool", "d": "date",
    "event.amount": "number",
}
T, F, N = True, False, None


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "n": pd.Series([1.0, 5.0, None, -2.5], dtype="Float64"),
        "m": np.array([0.0, 2.0, 3.0, 4.0]),
        "k": pd.Series([3, None, 0, 10], dtype="Int64"),
        "orders_365d": [1, 2, 3, 4],
        "city": pd.Series(["上海", "北京", None, "Paris"]),
        "tier": pd.Series(["gold", "silver", "bronze", None], dtype="string"),
        "vip": pd.Series([True, False, None, True], dtype="boolean"),
        "flag": [True, False, True, False],
        "d": pd.to_datetime(["2024-12-20", "2023-02-28", None, "2025-01-05"]),
        "event.amount": [10.6, 3.2, np.nan, 0.5],
    })


def values(series: pd.Series) -> list:
    result = []
    for item in series.tolist():
        if item is pd.NA or item is None or item is pd.NaT or (isinstance(item, float) and math.isnan(item)):
            result.append(None)
        elif isinstance(item, pd.Timestamp):
            result.append(item.date())
        else:
            result.append(item)
    return result


def day(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


VALID = [
    # comparisons (every operator), nulls make the comparison unknown
    ("n > 2", [F, T, N, F]),
    ("n >= 5", [F, T, N, F]),
    ("n < 1", [F, F, N, T]),
    ("n <= 1", [T, F, N, T]),
    ("n == 5", [F, T, N, F]),
    ("n != 5", [T, F, N, T]),
    ("event.amount > 5", [T, F, N, F]),
    ('"上海" == city', [T, F, N, F]),
    ('tier == "gold"', [T, F, F, N]),
    ('tier < "c"', [F, F, T, N]),
    ("0 < m < 4", [F, T, T, F]),
    ("1 <= n <= 5", [T, T, N, F]),
    ("-1 < round(n, 1) <= 5", [T, T, N, F]),
    ("vip == flag", [T, T, N, F]),
    ("vip != true", [F, T, N, F]),
    ('d >= date("2024-12-01")', [T, F, N, T]),
    # and / or / not (Kleene)
    ("m == 0 and n > 0", [T, F, F, F]),
    ("n > 2 and m > 1", [F, T, N, F]),
    ("n > 2 or m > 2", [F, T, T, T]),
    ("n > 2 or m > 5", [F, T, N, F]),
    ("not (n > 2)", [T, F, N, T]),
    ("not flag", [F, T, F, T]),
    ("not vip", [F, T, N, F]),
    ("vip and flag", [T, F, N, F]),
    ("vip or flag", [T, F, T, T]),
    ("vip and not vip", [F, F, N, F]),
    ("vip", [T, F, N, T]),
    ("true", [T, T, T, T]),
    ("false", [F, F, F, F]),
    # in / not in
    ('city in ["上海", "北京"]', [T, T, N, F]),
    ('city not in ["上海"]', [F, T, N, T]),
    ("k in [0, 3]", [T, N, T, F]),
    ("n in (-2.5, 1)", [T, F, N, T]),
    ('d in [date("2024-12-20")]', [T, F, N, F]),
    ("vip in [true]", [T, F, N, T]),
    ("n in []", [F, F, F, F]),
    ("n not in []", [T, T, T, T]),
    # is null / is not null: never unknown
    ("n is null", [F, F, T, F]),
    ("n is not null", [T, T, F, T]),
    ("city is null", [F, F, T, F]),
    ("vip is null", [F, F, T, F]),
    ("d is not null", [T, T, F, T]),
    # arithmetic
    ("n + m", [1.0, 7.0, N, 1.5]),
    ("m - n", [-1.0, -3.0, N, 6.5]),
    ("n * 2", [2.0, 10.0, N, -5.0]),
    ("m / n", [0.0, 0.4, N, -1.6]),
    ("n / m", [N, 2.5, N, -0.625]),
    ("m % 3", [0.0, 2.0, 0.0, 1.0]),
    ("n % 2", [1.0, 1.0, N, 1.5]),
    ("m % 0", [N, N, N, N]),
    ("-n", [-1.0, -5.0, N, 2.5]),
    ("+m", [0.0, 2.0, 3.0, 4.0]),
    ("k * 1", [3.0, N, 0.0, 10.0]),
    ("1 + 2 * 3", [7.0] * 4),
    ("(1 + 2) * 3", [9.0] * 4),
    ('tier + "!"', ["gold!", "silver!", "bronze!", N]),
    ('d - date("2024-12-25")', [-5.0, -666.0, N, 11.0]),
    # functions
    ("abs(n)", [1.0, 5.0, N, 2.5]),
    ("floor(event.amount)", [10.0, 3.0, N, 0.0]),
    ("floor(event.amount) * 2", [20.0, 6.0, N, 0.0]),
    ("ceil(event.amount)", [11.0, 4.0, N, 1.0]),
    ("round(event.amount)", [11.0, 3.0, N, 1.0]),
    ("round(n)", [1.0, 5.0, N, -3.0]),
    ("round(event.amount, 1)", [10.6, 3.2, N, 0.5]),
    ("round(n * 111, -2)", [100.0, 600.0, N, -300.0]),
    ("min(n, m)", [0.0, 2.0, 3.0, -2.5]),
    ("max(n, m, 4)", [4.0, 5.0, 4.0, 4.0]),
    ("min(n, n)", [1.0, 5.0, N, -2.5]),
    ('max(d, date("2024-12-22"))', [day("2024-12-22"), day("2024-12-22"), day("2024-12-22"), day("2025-01-05")]),
    ("coalesce(n, m)", [1.0, 5.0, 3.0, -2.5]),
    ('coalesce(city, tier, "?")', ["上海", "北京", "bronze", "Paris"]),
    ("coalesce(vip, false)", [T, F, F, T]),
    ('coalesce(d, date("2000-01-01"))', [day("2024-12-20"), day("2023-02-28"), day("2000-01-01"), day("2025-01-05")]),
    ('date("2024-12-25")', [day("2024-12-25")] * 4),
    ("today()", [day("2024-12-25")] * 4),
    ("days_since(d)", [5.0, 666.0, N, -11.0]),
    ("days_until(d)", [-5.0, -666.0, N, 11.0]),
    ("year(d)", [2024.0, 2023.0, N, 2025.0]),
    ("month(d)", [12.0, 2.0, N, 1.0]),
    ("day(d)", [20.0, 28.0, N, 5.0]),
    ("lower(city)", ["上海", "北京", N, "paris"]),
    ("upper(tier)", ["GOLD", "SILVER", "BRONZE", N]),
    ("len(city)", [2.0, 2.0, N, 5.0]),
    ('lower("ABC")', ["abc"] * 4),
    # combined, as in rule files
    ('orders_365d >= 2 and city in ["上海", "北京"]', [F, T, N, F]),
    ("60 <= days_since(d) <= 1000", [F, T, N, F]),
    ('tier != "gold" and not (n > 2)', [F, F, N, N]),
]


@pytest.mark.parametrize("text, expected", VALID, ids=[case[0] for case in VALID])
def test_valid_expressions(frame, text, expected):
    expression = compile_expression(text, NAMES)
    result = expression.evaluate(frame, AS_OF)
    assert values(result) == pytest.approx(expected) if isinstance(expected[0], float) else values(result) == expected
    assert list(result.index) == list(frame.index)
    if expression.type == "bool":
        assert result.dtype == "boolean"
        assert expression.mask(frame, AS_OF).tolist() == [value is True for value in expected]


def test_every_operator_and_function_has_a_valid_case():
    texts = " ".join(text for text, _ in VALID)
    for name in FUNCTIONS:
        assert f"{name}(" in texts, name
    for symbol in OPERATORS:
        assert symbol in texts, symbol


INVALID = [
    # (text, words the message or hint must contain, offset)
    ("order_365d > 3", ["unknown feature 'order_365d'", "did you mean `orders_365d`?"], 0),
    ('city == "上海" and order_365d > 5', ["unknown feature", "`orders_365d`"], 17),
    ("qwertyuiop > 1", ["unknown feature", "declare it"], 0),
    ("event.amout > 1", ["unknown feature 'event.amout'", "`event.amount`"], 0),
    ('__import__("os")', ["`__import__` is not allowed"], 0),
    ("n.__class__", ["__class__", "not allowed"], 2),
    ("__builtins__", ["not allowed"], 0),
    ("[1][0]", ["indexing"], 0),
    ("n[0]", ["indexing"], 0),
    ("lambda: 1", ["lambda"], 0),
    ("a = 5", ["use == to compare"], 2),
    ('city == "上海" and = 5', ["use == to compare"], 17),
    ("n && m", ["use `and`"], 2),
    ("n || m", ["use `or`"], 2),
    ("!flag", ["use `not`"], 0),
    ("city > 5", ["cannot compare string with number"], 0),
    ('("上海" == city) and city > 5', ["cannot compare string with number"], 19),
    ('d > "2024-01-01"', ["cannot compare date with string", 'date("2024-12-25")'], 0),
    ("flag > vip", ["cannot be compared with `>`"], 0),
    ("n == null", ["use `is null`"], 0),
    ("n != null", ["use `is not null`"], 0),
    ("n > null", ["null"], 0),
    ("null", ["null"], 0),
    ("n + null", ["null cannot be used here"], 4),
    ("n is 5", ["only tests for null"], 0),
    ("n and flag", ["`and` needs true/false", "n > 0"], 0),
    ('flag or city', ["`or` needs true/false"], 8),
    ("not city", ["`not` needs true/false"], 4),
    ("city + 1", ["cannot add string and number"], 5),
    ("n - city", ["cannot subtract number and string"], 2),
    ("d + 1", ["cannot add date and number", "days_since"], 2),
    ('"上海" * 2', ["cannot multiply string and number"], 5),
    ("-city", ["needs a number"], 0),
    ("n ** 2", ["`**` is not supported"], 2),
    ("n // 2", ["`//`", "floor(a / b)"], 2),
    ("n & m", ["use `and`"], 2),
    ("~flag", ["`~` is not supported", "use `not`"], 0),
    ('city in "上海"', ["needs a list"], 8),
    ('city in ["上海", 5]', ["list item `5`"], 15),
    ("n in [1, null]", ["cannot be listed", "is null or"], 9),
    ("n in [m]", ["cannot be listed"], 6),
    ("foo(n)", ["unknown function 'foo'"], 0),
    ("flor(n)", ["did you mean `floor`?"], 0),
    ("n()", ["is a feature, not a function"], 0),
    ("city.lower()", ["methods", "lower(...)"], 0),
    ("abs(city)", ["abs() needs a number"], 4),
    ("abs(n, m)", ["takes 1 argument"], 0),
    ("today(1)", ["takes 0 argument"], 0),
    ("round(n, m)", ["digits"], 9),
    ("round(n, 1.5)", ["digits"], 9),
    ("round(n, digits=2)", ["no named arguments"], 9),
    ('date("2024-13-01")', ["not a valid date", "YYYY-MM-DD"], 5),
    ('date("24-1-1")', ["not a valid date"], 5),
    ('date("3000-01-01")', ["out of range"], 5),
    ("date(city)", ["in quotes"], 5),
    ('days_since("2024-01-01")', ["days_since() needs a date", 'date("2024-12-25")'], 11),
    ("year(n)", ["year() needs a date"], 5),
    ("today", ["is a function", "today()"], 0),
    ("min(n)", ["at least 2"], 0),
    ("min(city, n)", ["all numbers or all dates"], 4),
    ("coalesce(n, city)", ["one type"], 12),
    ("True", ["lower case"], 0),
    ("n is None", ["lower case"], 5),
    ("n if flag else m", ["not supported", "coalesce"], 0),
    ("{1, 2}", ["not supported"], 0),
    ('f"{n}"', ["f-strings"], 0),
    ("(n := 5)", ["`:=`"], 1),
    ('b"x"', ["not a supported literal"], 0),
    ("n > 1e999", ["too large"], 4),
    ("n > 5 and", ["syntax error", "ends too early"], 9),
    ("city == '上海", ["syntax error", "close the quote"], 8),
    ("(n > 5", ["never closed"], 0),
    ("n > 5)", ["unmatched"], 5),
    ('"上海" +* 3', ["syntax error"], 6),
    ("", ["empty"], 0),
    ("   ", ["empty"], 0),
    ('  n > "x"', ["cannot compare number with string"], 2),
    ('n > 1\n and city > 5', ["cannot compare string with number"], 11),
    ("n > 5\x00", ["NUL"], 5),
    ("(" * 40 + "n" + ")" * 40, ["nested too deeply"], 30),
    ("not " * 100 + "flag", ["nested too deeply"], 240),
    ("-" * 3999 + "n", ["nested too deeply"], 0),
    ("not " * 999 + "flag", ["nested too deeply"], 240),
    ("[" * 2000, ["nested too deeply"], 30),
    ("+".join(["n"] * 1500), ["nested too deeply"], 0),
    ("n" * 10_000, ["too long", "10000 characters"], 4000),
]


@pytest.mark.parametrize("text, words, offset", INVALID, ids=[repr(case[0][:30]) for case in INVALID])
def test_invalid_expressions(text, words, offset):
    with pytest.raises(ExpressionError) as caught:
        compile_expression(text, NAMES)
    error = caught.value
    full = f"{error.message} ({error.hint})"
    for word in words:
        assert word in full
    assert error.offset == offset


def test_none_is_an_empty_expression():
    with pytest.raises(ExpressionError, match="empty"):
        compile_expression(None, NAMES)


@pytest.mark.parametrize("value, kind, expected", [
    (True, "bool", [T, T, T, T]),
    (False, "bool", [F, F, F, F]),
    (3, "number", [3.0] * 4),
    (2.5, "number", [2.5] * 4),
])
def test_yaml_scalars_compile_to_constants(frame, value, kind, expected):
    expression = compile_expression(value, NAMES)
    assert expression.type == kind
    assert expression.names == frozenset()
    assert values(expression.evaluate(frame)) == expected


def test_expression_records_text_type_and_names():
    expression = compile_expression('n > 1 and event.amount > 2 and city in ["上海"]', NAMES)
    assert isinstance(expression, Expression)
    assert expression.text == 'n > 1 and event.amount > 2 and city in ["上海"]'
    assert expression.type == "bool"
    assert expression.names == {"n", "event.amount", "city"}
    assert compile_expression("floor(event.amount) * 2", NAMES).type == "number"
    assert compile_expression("upper(city)", NAMES).type == "string"
    assert compile_expression("today()", NAMES).type == "date"
    assert compile_expression("n > 1", NAMES) == compile_expression("n > 1", NAMES)


# --------------------------------------------------------------------------- null semantics

NULL_CASES = [
    # (condition on a row where x is null and y is 1, expected result)
    ("x > 5", N),
    ("not (x > 5)", N),  # with NaN this would silently become true
    ("x > 5 and y == 0", F),
    ("x > 5 and y == 1", N),
    ("x > 5 or y == 1", T),
    ("x > 5 or y == 0", N),
    ("x is null", T),
    ("x is not null", F),
    ("not (x is null)", F),
    ("x == x", N),
    ("x != 5", N),
    ("x in [1, 2]", N),
    ("x not in [1, 2]", N),
    ("coalesce(x, 0) > 5", F),
    ("x + 1 > 0", N),
    ("y / 0 is null", T),
    ("min(x, y) == 1", T),
    ("max(x, x) is null", T),
]


@pytest.mark.parametrize("text, expected", NULL_CASES, ids=[case[0] for case in NULL_CASES])
def test_three_valued_logic(text, expected):
    frame = pd.DataFrame({"x": pd.Series([None], dtype="Float64"), "y": [1.0]})
    expression = compile_expression(text, {"x": "number", "y": "number"})
    assert values(expression.evaluate(frame)) == [expected]
    assert expression.mask(frame).tolist() == [expected is True]


def test_nan_in_numpy_float_columns_is_null():
    frame = pd.DataFrame({"x": [np.nan, 7.0]})
    expression = compile_expression("not (x > 5)", {"x": "number"})
    assert values(expression.evaluate(frame)) == [None, False]
    assert expression.mask(frame).tolist() == [False, False]


def test_result_dtypes(frame):
    assert str(compile_expression("n + 1", NAMES).evaluate(frame).dtype) == "Float64"
    assert str(compile_expression("upper(city)", NAMES).evaluate(frame).dtype) == "string"
    assert str(compile_expression("d", NAMES).evaluate(frame).dtype) == "datetime64[ns]"
    assert isinstance(compile_expression("n > 1", NAMES).mask(frame), np.ndarray)


def test_results_keep_the_frame_index(frame):
    shuffled = frame.set_axis([10, 30, 20, 40])
    result = compile_expression("n > 2", NAMES).evaluate(shuffled)
    assert list(result.index) == [10, 30, 20, 40]
    assert values(result) == [F, T, N, F]


def test_mask_does_not_alias_the_frame(frame):
    data = frame.copy()
    mask = compile_expression("flag", NAMES).mask(data)
    mask[:] = False
    assert data["flag"].tolist() == [True, False, True, False]


def test_empty_frame(frame):
    empty = frame.iloc[:0]
    assert len(compile_expression("n > 1 or true", NAMES).evaluate(empty)) == 0
    assert compile_expression("true", NAMES).mask(empty).shape == (0,)


def test_today_needs_as_of(frame):
    with pytest.raises(ValueError, match="as_of"):
        compile_expression("days_since(d) > 3", NAMES).evaluate(frame)


def test_as_of_uses_its_local_date(frame):
    late = pd.Timestamp("2024-12-25 23:30", tz="Asia/Shanghai")
    assert values(compile_expression("today()", NAMES).evaluate(frame.iloc[:1], late)) == [day("2024-12-25")]


def test_missing_column_is_a_data_error(frame):
    expression = compile_expression("n > 1", {"n": "number"})
    with pytest.raises(DataError, match="no column 'n'"):
        expression.evaluate(frame.drop(columns=["n"]))


def test_unknown_type_in_catalogue_is_a_programming_error():
    with pytest.raises(ValueError):
        compile_expression("x > 1", {"x": "integer"})


def test_untyped_names_take_the_type_of_their_context():
    frame = pd.DataFrame({"event.score": ["9", "3", None], "event.kind": ["nps", "x", None]})
    names = {"event.score": "any", "event.kind": "any"}
    assert values(compile_expression("event.score >= 7", names).evaluate(frame)) == [T, F, N]
    assert values(compile_expression('event.kind == "nps"', names).evaluate(frame)) == [T, F, N]
    assert values(compile_expression("event.kind is null", names).evaluate(frame)) == [F, F, T]


# --------------------------------------------------------------------------- explain, all_of, any_of


def test_explain_lists_each_name_and_condition_in_source_order(frame):
    expression = compile_expression('n >= 5 and city in ["上海", "北京"]', NAMES)
    assert expression.explain(frame, 0, AS_OF) == [
        ("n", 1.0),
        ("n >= 5", False),
        ("city", "上海"),
        ('city in ["上海", "北京"]', True),
        ('n >= 5 and city in ["上海", "北京"]', False),
    ]
    assert expression.explain(frame, 2, AS_OF)[:2] == [("n", None), ("n >= 5", None)]


def test_explain_shows_calls_chains_and_computed_amounts(frame):
    chain = compile_expression("60 <= days_since(d) <= 1000", NAMES).explain(frame, 1, AS_OF)
    assert chain == [
        ("d", day("2023-02-28")),
        ("days_since(d)", 666.0),
        ("60 <= days_since(d)", True),
        ("days_since(d) <= 1000", True),
        ("60 <= days_since(d) <= 1000", True),
    ]
    amount = compile_expression("floor(event.amount) * 2", NAMES).explain(frame, 0)
    assert amount[0] == ("event.amount", 10.6)
    assert amount[-1] == ("floor(event.amount) * 2", 20.0)


def test_all_of_and_any_of(frame):
    high = compile_expression("n > 2", NAMES)
    member = compile_expression("vip", NAMES)
    both = all_of([high, member])
    either = any_of([high, member])
    assert values(both.evaluate(frame)) == [F, F, N, F]
    assert values(either.evaluate(frame)) == [T, T, N, T]
    assert both.names == {"n", "vip"} and both.type == "bool"
    assert both.text == "(n > 2) and (vip)"
    assert all_of([high]) is high
    assert values(all_of([]).evaluate(frame)) == [T] * 4
    assert values(any_of([]).evaluate(frame)) == [F] * 4
    assert ("n > 2", False) in both.explain(frame, 0)
    with pytest.raises(ExpressionError, match="not a condition"):
        all_of([compile_expression("n + 1", NAMES)])


def test_docs_mention_every_operator_and_function():
    text = (Path(__file__).resolve().parents[2] / "docs" / "expressions.md").read_text(encoding="utf-8")
    for entry in [*OPERATORS, *FUNCTIONS]:
        assert f"`{entry}" in text, entry


# --------------------------------------------------------------------------- reference evaluator
#
# Random expression trees are rendered to text, compiled by the module, and compared row by
# row with a slow, plain-Python evaluation of the same tree.

TODAY = dt.date(2024, 12, 25)
NUMBER_COLUMNS = ["n", "m", "k"]
STRING_COLUMNS = ["s", "t"]
NUMBERS = [-3.0, -2.5, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 7.0, 10.25, 100.0]
STRINGS = ["上海", "北京", "a", "B", "", "Paris"]
DATES = [dt.date(2024, 12, 25), dt.date(2024, 2, 29), dt.date(1999, 12, 31), dt.date(2025, 3, 1)]
REF_NAMES = {"n": "number", "m": "number", "k": "number", "s": "string", "t": "string",
             "b": "bool", "d": "date"}


def number_literal(value: float) -> str:
    return f"({value!r})" if value < 0 else repr(value)


def date_literal(value: dt.date) -> str:
    return f'date("{value.isoformat()}")'


def leaves(kind: str):
    if kind == "number":
        return st.one_of(st.sampled_from([("col", c) for c in NUMBER_COLUMNS]),
                         st.sampled_from(NUMBERS).map(lambda v: ("lit", v)))
    if kind == "string":
        return st.one_of(st.sampled_from([("col", c) for c in STRING_COLUMNS]),
                         st.sampled_from(STRINGS).map(lambda v: ("lit", v)))
    if kind == "date":
        return st.one_of(st.just(("col", "d")), st.just(("today",)),
                         st.sampled_from(DATES).map(lambda v: ("lit", v)))
    return st.one_of(st.just(("col", "b")), st.booleans().map(lambda v: ("lit", v)))


@functools.lru_cache(maxsize=None)
def trees(kind: str, depth: int):
    """Random typed expression trees (tuples) of at most ``depth`` levels."""
    if depth == 0:
        return leaves(kind)
    sub = lambda k: trees(k, depth - 1)  # noqa: E731
    options = [leaves(kind)]
    if kind == "number":
        options += [
            st.tuples(st.just("arith"), st.sampled_from("+-*/%"), sub("number"), sub("number")),
            st.tuples(st.just("neg"), sub("number")),
            st.tuples(st.just("call"), st.sampled_from(["abs", "floor", "ceil", "round"]),
                      st.tuples(sub("number"))),
            st.tuples(st.just("round2"), sub("number"), st.integers(-1, 2)),
            st.tuples(st.just("call"), st.sampled_from(["min", "max", "coalesce"]),
                      st.lists(sub("number"), min_size=2, max_size=3).map(tuple)),
            st.tuples(st.just("call"), st.just("len"), st.tuples(sub("string"))),
            st.tuples(st.just("call"), st.sampled_from(["days_since", "days_until", "year", "month", "day"]),
                      st.tuples(sub("date"))),
            st.tuples(st.just("arith"), st.just("-"), sub("date"), sub("date")),
        ]
    elif kind == "string":
        options += [
            st.tuples(st.just("arith"), st.just("+"), sub("string"), sub("string")),
            st.tuples(st.just("call"), st.sampled_from(["lower", "upper"]), st.tuples(sub("string"))),
            st.tuples(st.just("call"), st.just("coalesce"), st.lists(sub("string"), min_size=2, max_size=3).map(tuple)),
        ]
    elif kind == "date":
        options += [
            st.tuples(st.just("call"), st.sampled_from(["min", "max", "coalesce"]),
                      st.lists(sub("date"), min_size=2, max_size=2).map(tuple)),
        ]
    else:
        ordered = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
        compared = st.sampled_from(["number", "string", "date"])
        options += [
            compared.flatmap(lambda k: st.tuples(st.just("cmp"), ordered, sub(k), sub(k))),
            st.tuples(st.just("cmp"), st.sampled_from(["==", "!="]), sub("bool"), sub("bool")),
            st.tuples(st.just("chain"), ordered, ordered, sub("number"), sub("number"), sub("number")),
            st.tuples(st.sampled_from(["and", "or"]), sub("bool"), sub("bool")),
            st.tuples(st.just("not"), sub("bool")),
            st.tuples(st.just("isnull"), st.booleans(),
                      compared.flatmap(lambda k: sub(k))),
            st.tuples(st.just("in"), st.booleans(), sub("number"),
                      st.lists(st.sampled_from(NUMBERS), max_size=3)),
            st.tuples(st.just("in"), st.booleans(), sub("string"),
                      st.lists(st.sampled_from(STRINGS), max_size=3)),
        ]
    return st.one_of(*options)


def render(tree) -> str:
    tag = tree[0]
    if tag == "col":
        return tree[1]
    if tag == "today":
        return "today()"
    if tag == "lit":
        value = tree[1]
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return number_literal(value)
        if isinstance(value, dt.date):
            return date_literal(value)
        return '"' + value + '"'
    if tag == "arith":
        return f"({render(tree[2])}) {tree[1]} ({render(tree[3])})"
    if tag == "neg":
        return f"-({render(tree[1])})"
    if tag == "call":
        return f"{tree[1]}({', '.join(render(arg) for arg in tree[2])})"
    if tag == "round2":
        return f"round({render(tree[1])}, {tree[2]})"
    if tag == "cmp":
        return f"({render(tree[2])}) {tree[1]} ({render(tree[3])})"
    if tag == "chain":
        return f"({render(tree[3])}) {tree[1]} ({render(tree[4])}) {tree[2]} ({render(tree[5])})"
    if tag in ("and", "or"):
        return f"({render(tree[1])}) {tag} ({render(tree[2])})"
    if tag == "not":
        return f"not ({render(tree[1])})"
    if tag == "isnull":
        return f"({render(tree[2])}) is {'not ' if tree[1] else ''}null"
    if tag == "in":
        items = ", ".join(number_literal(v) if isinstance(v, float) else f'"{v}"' for v in tree[3])
        return f"({render(tree[2])}) {'not in' if tree[1] else 'in'} [{items}]"
    raise AssertionError(tree)


COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
           ">": operator.gt, ">=": operator.ge}


def kleene_and(a, b):
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def kleene_or(a, b):
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def kleene_not(a):
    return None if a is None else not a


def compare(op, a, b):
    return None if a is None or b is None else COMPARE[op](a, b)


def arithmetic(op, a, b):
    if a is None or b is None:
        return None
    if isinstance(a, dt.date):
        return float((a - b).days)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        return None
    result = a / b if op == "/" else a % b
    return None if math.isnan(result) else result


def round_away(x, digits):
    factor = 10.0 ** digits
    sign = 1 if x > 0 else -1 if x < 0 else 0
    return sign * math.floor(abs(x) * factor + 0.5) / factor


def call(name, args):
    if name == "coalesce":
        return next((a for a in args if a is not None), None)
    if name in ("min", "max"):
        present = [a for a in args if a is not None]
        return (min if name == "min" else max)(present) if present else None
    (x,) = args
    if x is None:
        return None
    return {
        "abs": lambda: abs(x), "floor": lambda: float(math.floor(x)), "ceil": lambda: float(math.ceil(x)),
        "round": lambda: round_away(x, 0), "len": lambda: float(len(x)),
        "lower": lambda: x.lower(), "upper": lambda: x.upper(),
        "days_since": lambda: float((TODAY - x).days), "days_until": lambda: float((x - TODAY).days),
        "year": lambda: float(x.year), "month": lambda: float(x.month), "day": lambda: float(x.day),
    }[name]()


def reference(tree, row: dict):
    tag = tree[0]
    if tag == "col":
        return row[tree[1]]
    if tag == "today":
        return TODAY
    if tag == "lit":
        return tree[1]
    if tag == "arith":
        return arithmetic(tree[1], reference(tree[2], row), reference(tree[3], row))
    if tag == "neg":
        value = reference(tree[1], row)
        return None if value is None else -value
    if tag == "call":
        return call(tree[1], [reference(arg, row) for arg in tree[2]])
    if tag == "round2":
        value = reference(tree[1], row)
        return None if value is None else round_away(value, tree[2])
    if tag == "cmp":
        return compare(tree[1], reference(tree[2], row), reference(tree[3], row))
    if tag == "chain":
        a, b, c = (reference(tree[i], row) for i in (3, 4, 5))
        return kleene_and(compare(tree[1], a, b), compare(tree[2], b, c))
    if tag == "and":
        return kleene_and(reference(tree[1], row), reference(tree[2], row))
    if tag == "or":
        return kleene_or(reference(tree[1], row), reference(tree[2], row))
    if tag == "not":
        return kleene_not(reference(tree[1], row))
    if tag == "isnull":
        missing = reference(tree[2], row) is None
        return not missing if tree[1] else missing
    if tag == "in":
        value, items = reference(tree[2], row), tree[3]
        found = False if not items else (None if value is None else value in items)
        return kleene_not(found) if tree[1] else found
    raise AssertionError(tree)


def maybe(values):
    return st.one_of(st.none(), st.sampled_from(values))


rows = st.fixed_dictionaries({
    "n": maybe(NUMBERS), "m": maybe(NUMBERS), "k": maybe([-3, 0, 1, 2, 7]),
    "s": maybe(STRINGS), "t": maybe(STRINGS), "b": st.one_of(st.none(), st.booleans()), "d": maybe(DATES),
})


def build_frame(records: list[dict]) -> pd.DataFrame:
    column = lambda name: [r[name] for r in records]  # noqa: E731
    return pd.DataFrame({
        "n": pd.Series(column("n"), dtype="Float64"),
        "m": np.array([np.nan if v is None else v for v in column("m")], dtype=float),
        "k": pd.Series(column("k"), dtype="Int64"),
        "s": pd.Series(column("s"), dtype="str"),
        "t": pd.Series(column("t"), dtype="string"),
        "b": pd.Series(column("b"), dtype="boolean"),
        "d": pd.to_datetime(pd.Series([None if v is None else pd.Timestamp(v) for v in column("d")],
                                      dtype="object")),
    })


def same(actual, expected) -> bool:
    if expected is None or actual is None:
        return actual is None and expected is None
    if isinstance(expected, float):
        return actual == expected or math.isclose(actual, expected, rel_tol=1e-12, abs_tol=1e-12)
    return actual == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["bool", "bool", "number", "string", "date"]).flatmap(
           lambda k: st.tuples(st.just(k), trees(k, 3))),
       records=st.lists(rows, min_size=1, max_size=8))
def test_vectorised_evaluation_matches_reference(kind, records):
    expected_type, tree = kind
    text = render(tree)
    expression = compile_expression(text, REF_NAMES)
    assert expression.type == expected_type, text
    frame = build_frame(records)
    actual = values(expression.evaluate(frame, AS_OF))
    expected = [reference(tree, record) for record in records]
    assert all(same(a, e) for a, e in zip(actual, expected)), (text, actual, expected)
    if expected_type == "bool":
        assert expression.mask(frame, AS_OF).tolist() == [e is True for e in expected], text
