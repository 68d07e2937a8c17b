"""Running checked expressions: the typed tree compiled to closures over whole columns.

``engine.config.expressions`` parses and type-checks; this module turns each typed node into a
function of an evaluation ``Context`` (the frame, its length, the run's date) once, lazily,
and converts frame columns in and result series out.

Nulls follow SQL's three-valued logic: a comparison with null is unknown, ``not unknown``
is unknown, ``unknown and false`` is false, ``unknown or true`` is true. Internally a
condition is a pair of numpy arrays ``(true, unknown)`` where ``true`` is False wherever
``unknown`` is set; numbers are float64 with NaN for null, dates datetime64[D] with NaT,
strings pandas "string" arrays with NA.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import reduce
from typing import Any

import numpy as np
import pandas as pd

from engine.config.expressions.tree import Node
from engine.errors import DataError


def describe_type(kind: str) -> str:
    """How error messages name an expression type: "a number", "true/false", ..."""
    return {"number": "a number", "string": "a string", "bool": "true/false", "date": "a date",
            "null": "null", "any": "a value"}.get(kind, kind)


class Context:
    """One evaluation: the frame, its length, the run's date and a column cache."""

    def __init__(self, frame: pd.DataFrame, as_of: pd.Timestamp | None):
        self.frame = frame
        self.n = len(frame)
        self.as_of = as_of
        self.cache: dict[Any, Any] = {}

    @property
    def today(self) -> np.datetime64:
        if self.as_of is None:
            raise ValueError("this expression uses today's date: pass as_of")
        stamp = pd.Timestamp(self.as_of)
        if stamp.tzinfo is not None:
            stamp = stamp.tz_localize(None)
        return np.datetime64(stamp.date(), "D")


class Program:
    """Compiles typed nodes to closures once (lazily, per node) and runs them."""

    def __init__(self) -> None:
        self._compiled: dict[int, Callable[[Context], Any]] = {}
        self._keep: list[Node] = []  # keeps node ids stable

    def run(self, node: Node, context: Context) -> Any:
        return self.compiled(node)(context)

    def compiled(self, node: Node) -> Callable[[Context], Any]:
        function = self._compiled.get(id(node))
        if function is None:
            function = _COMPILERS[node.kind](node, self)
            if node.shared:
                function = _memoised(node, function)
            self._compiled[id(node)] = function
            self._keep.append(node)
        return function


def _memoised(node: Node, function):
    key = ("node", id(node))

    def run(context):
        if key not in context.cache:
            context.cache[key] = function(context)
        return context.cache[key]
    return run


FALSE = np.bool_(False)


def _compile_const(node: Node, program: Program):
    value = node.op
    if node.type == "bool":
        value = (np.bool_(value), FALSE)
    return lambda context: value


def _compile_name(node: Node, program: Program):
    name, kind = node.op, node.type
    key = (name, kind)

    def fetch(context):
        if key not in context.cache:
            context.cache[key] = _column(context.frame, name, kind)
        return context.cache[key]
    return fetch


def _compile_neg(node: Node, program: Program):
    operand = program.compiled(node.args[0])
    return lambda context: -operand(context)


def _compile_arith(node: Node, program: Program):
    left, right = (program.compiled(a) for a in node.args)
    op = node.op
    if node.args[0].type == "string":
        return lambda context: left(context) + right(context)  # "string" arrays propagate NA
    if node.args[0].type == "date":
        return lambda context: (left(context) - right(context)) / np.timedelta64(1, "D")
    function = {"+": np.add, "-": np.subtract, "*": np.multiply}.get(op)
    if function is not None:
        return lambda context: function(left(context), right(context))
    function = np.divide if op == "/" else np.mod

    def divide(context):
        a, b = left(context), right(context)
        with np.errstate(all="ignore"):
            return np.where(b == 0, np.nan, function(a, b))
    return divide


_CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
        ">": operator.gt, ">=": operator.ge}


def _compile_compare(node: Node, program: Program):
    left, right = (program.compiled(a) for a in node.args)
    function = _CMP[node.op]
    kind = node.args[0].type
    if kind == "bool":
        def compare_bools(context):
            (a, a_na), (b, b_na) = left(context), right(context)
            unknown = a_na | b_na
            return function(a, b) & ~unknown, unknown
        return compare_bools
    if kind == "string":
        return lambda context: _compare_strings(function, left(context), right(context))
    isnull = np.isnan if kind == "number" else np.isnat

    def compare(context):
        a, b = left(context), right(context)
        unknown = isnull(a) | isnull(b)
        with np.errstate(invalid="ignore"):
            return function(a, b) & ~unknown, unknown
    return compare


def _compare_strings(function, a, b):
    if isinstance(a, str) and isinstance(b, str):
        return np.bool_(function(a, b)), FALSE
    result = function(a, b)
    unknown = np.asarray(result.isna())
    return result.to_numpy(dtype=bool, na_value=False), unknown


def _compile_bool(node: Node, program: Program):
    parts = [program.compiled(a) for a in node.args]
    combine = _and if node.op == "and" else _or
    return lambda context: reduce(combine, (part(context) for part in parts))


def _and(a, b):
    (a_true, a_na), (b_true, b_na) = a, b
    a_false, b_false = ~(a_true | a_na), ~(b_true | b_na)
    return a_true & b_true, (a_na | b_na) & ~(a_false | b_false)


def _or(a, b):
    (a_true, a_na), (b_true, b_na) = a, b
    true = a_true | b_true
    return true, (a_na | b_na) & ~true


def _compile_not(node: Node, program: Program):
    operand = program.compiled(node.args[0])

    def negate(context):
        true, unknown = operand(context)
        return ~(true | unknown), unknown
    return negate


def _compile_isnull(node: Node, program: Program):
    operand = program.compiled(node.args[0])
    negate = node.op == "is not"

    def test(context):
        missing = _missing(operand(context), node.args[0].type)
        return (~missing if negate else missing), FALSE
    return test


def _missing(value, kind: str):
    if value is None:
        return np.bool_(True)
    if kind == "bool":
        return value[1]
    if kind == "number":
        return np.isnan(value)
    if kind == "date":
        return np.isnat(value)
    if isinstance(value, str):
        return FALSE
    return np.asarray(pd.isna(value))


def _compile_in(node: Node, program: Program):
    operand = program.compiled(node.args[0])
    kind = node.args[0].type
    values = list(node.extra)
    negate = node.op == "not in"

    def member(context):
        value = operand(context)
        if kind == "bool":
            value, unknown = value
        else:
            unknown = _missing(value, kind)
        if not values:
            found, unknown = FALSE, FALSE
        elif kind == "string":
            found = (np.bool_(value in values) if isinstance(value, str)
                     else np.asarray(value.isin(values)))
        else:
            found = np.isin(value, np.array(values))
            if np.ndim(value) == 0:
                found = np.bool_(found)
        found = found & ~unknown
        if negate:
            return ~(found | unknown), unknown
        return found, unknown
    return member


def _compile_call(node: Node, program: Program):
    args = [program.compiled(a) for a in node.args]
    implementation = IMPLEMENTATIONS[node.op]
    if node.op == "round":
        factor = 10.0 ** node.extra
        return lambda context: _round(args[0](context), factor)
    if node.op in ("min", "max", "coalesce"):
        kind = node.type
        return lambda context: implementation([a(context) for a in args], kind)
    return lambda context: implementation(context, *(a(context) for a in args))


def _round(x, factor: float):
    return np.sign(x) * np.floor(np.abs(x) * factor + 0.5) / factor


def _extreme(function):
    def pick(values, kind):
        return reduce(function, values)
    return pick


def _coalesce(values, kind):
    def first(a, b):
        if kind == "number":
            return np.where(np.isnan(a), b, a)
        if kind == "date":
            return np.where(np.isnat(a), b, a)
        if kind == "bool":
            (a_true, a_na), (b_true, b_na) = a, b
            return np.where(a_na, b_true, a_true), a_na & b_na
        if isinstance(a, str):
            return a
        other = b if isinstance(b, str) else pd.Series(b, copy=False)
        return pd.Series(a, copy=False).fillna(other).array
    return reduce(first, values)


def _string_function(python, method):
    def apply(context, value):
        if isinstance(value, str):
            return python(value)
        result = getattr(pd.Series(value, copy=False).str, method)()
        if method == "len":
            return result.to_numpy(dtype=np.float64, na_value=np.nan)
        return result.array
    return apply


def _date_part(part: str):
    def apply(context, value):
        missing = np.isnat(value)
        if part == "year":
            number = value.astype("datetime64[Y]").astype(np.int64) + 1970
        elif part == "month":
            number = value.astype("datetime64[M]").astype(np.int64) % 12 + 1
        else:
            number = (value - value.astype("datetime64[M]")).astype("timedelta64[D]").astype(np.int64) + 1
        return np.where(missing, np.nan, number.astype(np.float64))
    return apply


IMPLEMENTATIONS: dict[str, Callable] = {
    "abs": lambda context, x: np.abs(x),
    "floor": lambda context, x: np.floor(x),
    "ceil": lambda context, x: np.ceil(x),
    "round": None,
    "min": _extreme(np.fmin),
    "max": _extreme(np.fmax),
    "coalesce": _coalesce,
    "date": None,  # folded into a constant when checked
    "today": lambda context: context.today,
    "days_since": lambda context, d: (context.today - d) / np.timedelta64(1, "D"),
    "days_until": lambda context, d: (d - context.today) / np.timedelta64(1, "D"),
    "year": _date_part("year"),
    "month": _date_part("month"),
    "day": _date_part("day"),
    "lower": _string_function(str.lower, "lower"),
    "upper": _string_function(str.upper, "upper"),
    "len": _string_function(lambda s: np.float64(len(s)), "len"),
}

_COMPILERS = {
    "const": _compile_const, "name": _compile_name, "neg": _compile_neg, "arith": _compile_arith,
    "compare": _compile_compare, "bool": _compile_bool, "not": _compile_not,
    "isnull": _compile_isnull, "in": _compile_in, "call": _compile_call,
}

# --------------------------------------------------------------------------- columns in, series out

_STRING = pd.StringDtype()


def _column(frame: pd.DataFrame, name: str, kind: str):
    """A frame column in the internal representation of ``kind``."""
    if name not in frame.columns:
        raise DataError("expression", f"no column '{name}' in the customer data", column=name,
                        hint="compute the feature before evaluating the rule")
    series = frame[name]
    try:
        if kind == "number":
            return _numbers(series)
        if kind == "bool":
            if series.dtype == bool:
                return series.to_numpy(), FALSE
            flags = series.astype("boolean")
            return flags.to_numpy(dtype=bool, na_value=False), flags.isna().to_numpy()
        if kind == "string":
            return series.array.astype(_STRING)
        if kind == "date":
            return _dates(series)
    except (TypeError, ValueError) as error:
        raise DataError("expression", f"column '{name}' is not {describe_type(kind)}: {error}", column=name) from None
    return series  # "any" names only reach `is null`


def _numbers(series: pd.Series) -> np.ndarray:
    if series.dtype.kind in "fiub":
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    if series.dtype == object or isinstance(series.dtype, pd.StringDtype):
        series = pd.to_numeric(series, errors="coerce")
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def _dates(series: pd.Series) -> np.ndarray:
    if not isinstance(series.dtype, pd.DatetimeTZDtype) and series.dtype.kind != "M":
        series = pd.to_datetime(series, errors="coerce")
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_localize(None)
    return series.to_numpy().astype("datetime64[D]")


def _broadcast(value, n: int, dtype=None) -> np.ndarray:
    return np.array(np.broadcast_to(value, (n,)), dtype=dtype)


def to_series(value, kind: str, context: Context) -> pd.Series:
    n, index = context.n, context.frame.index
    if kind == "bool":
        true, unknown = value
        array = pd.arrays.BooleanArray(_broadcast(true, n, bool), _broadcast(unknown, n, bool))
        return pd.Series(array, index=index)
    if kind == "number":
        numbers = _broadcast(value, n, np.float64)
        return pd.Series(pd.arrays.FloatingArray(numbers, np.isnan(numbers)), index=index)
    if kind == "date":
        return pd.Series(_broadcast(value, n).astype("datetime64[ns]"), index=index)
    if isinstance(value, str):
        return pd.Series([value] * n, index=index, dtype=_STRING)
    return pd.Series(value, index=index, dtype=_STRING, copy=True)


def first_value(value, kind: str) -> object:
    """The single row's value as a plain Python object (None for null)."""
    if kind == "bool":
        true, unknown = (np.ravel(v)[0] for v in value)
        return None if unknown else bool(true)
    item = value if isinstance(value, str) or np.ndim(value) == 0 else value[0]
    if item is None or item is pd.NA or (isinstance(item, float) and np.isnan(item)):
        return None
    if kind == "number":
        return float(item)
    if kind == "date":
        return None if np.isnat(item) else pd.Timestamp(item).date()
    if kind == "string":
        return str(item)
    return item
