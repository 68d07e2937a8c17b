"""Rule expressions: parsed (never eval'ed), type-checked, compiled to column operations.

``compile_expression`` runs three small stages:

1. parse the text with ``ast.parse`` and accept only a whitelist of node types;
2. turn that tree into a small typed tree (``Node``, ``engine.config.expressions.checker``), checking every name and type
   against the feature catalogue, so mistakes are reported at validation time with
   the character offset of the culprit;
3. compile the typed tree once into closures over whole numpy/pandas columns
   (``engine.config.expressions.columns``, which also documents how nulls behave).

This module is the public entry: ``Expression``, ``compile_expression``, ``all_of``,
``any_of``, ``FUNCTIONS`` and ``OPERATORS``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from engine.config.expressions.checker import FUNCTIONS, _Checker  # FUNCTIONS: public
from engine.config.expressions.columns import (  # FALSE is re-exported from its old home
    FALSE,
    Context,
    Program,
    describe_type,
    first_value,
    to_series,
)
from engine.config.expressions.tree import EXPLAINED, Node, post_order
from engine.errors import ExpressionError

MAX_LENGTH = 4000  # characters in one expression
MAX_DEPTH = 60  # levels of the syntax tree (brackets, operators, calls)
MAX_BRACKETS = 30  # nested brackets, checked before parsing

TYPES = ("number", "string", "bool", "date", "null", "any")


OPERATORS: list[str] = [
    "and", "or", "not",
    "==", "!=", "<", "<=", ">", ">=",
    "in", "not in", "is null", "is not null",
    "+", "-", "*", "/", "%",
]


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Expression:
    """A compiled expression: evaluate it over a frame of customers (one row each)."""

    text: str
    type: str
    names: frozenset[str]
    _root: Any = field(default=None, compare=False, repr=False)
    _program: Any = field(default=None, compare=False, repr=False)

    def evaluate(self, frame: pd.DataFrame, as_of: pd.Timestamp | None = None) -> pd.Series:
        """Value for every row: "boolean", "Float64", "string" or datetime64[ns] dtype."""
        context = Context(frame, as_of)
        value = self._program.run(self._root, context)
        return to_series(value, self.type, context)

    def mask(self, frame: pd.DataFrame, as_of: pd.Timestamp | None = None) -> np.ndarray:
        """Boolean numpy array, True only where the condition is definitely true."""
        if self.type != "bool":
            raise ExpressionError(f"`{self.text}` is {describe_type(self.type)}, not a condition", 0)
        context = Context(frame, as_of)
        true, _unknown = self._program.run(self._root, context)
        return np.array(np.broadcast_to(true, (context.n,)), dtype=bool)

    def explain(self, frame: pd.DataFrame, position: int,
                as_of: pd.Timestamp | None = None) -> list[tuple[str, object]]:
        """(text, value) for each name, call and condition inside, for one row, in source order."""
        context = Context(frame.iloc[[position]], as_of)
        seen: dict[str, object] = {}
        for node in post_order(self._root):
            if node.text in seen or (node.kind not in EXPLAINED and node is not self._root):
                continue
            seen[node.text] = first_value(self._program.run(node, context), node.type)
        return list(seen.items())


def compile_expression(text: str | bool | int | float, names: Mapping[str, str]) -> Expression:
    """Parse and type-check ``text`` against ``names`` (name -> type); raise ExpressionError."""
    for name, kind in names.items():
        if kind not in TYPES:
            raise ValueError(f"type of {name!r} must be one of {TYPES}, not {kind!r}")
    if isinstance(text, bool):
        text = "true" if text else "false"
    elif isinstance(text, (int, float)):
        text = repr(text)
    elif text is None:
        raise ExpressionError("the expression is empty", 0, hint=_EMPTY_HINT)
    elif not isinstance(text, str):
        raise ExpressionError(f"expected an expression, got {type(text).__name__}", 0)
    parsed = _parse(text)
    checker = _Checker(text, parsed.source, parsed.shift, names)
    root = checker.check(parsed.tree.body)
    return Expression(text, root.type, frozenset(checker.used), root, Program())


def all_of(exprs: list[Expression]) -> Expression:
    """All conditions must hold (the YAML ``all: [...]`` sugar)."""
    return _combine(list(exprs), "and")


def any_of(exprs: list[Expression]) -> Expression:
    """At least one condition must hold (the YAML ``any: [...]`` sugar)."""
    return _combine(list(exprs), "or")


def _combine(exprs: list[Expression], op: str) -> Expression:
    for expr in exprs:
        if expr.type != "bool":
            raise ExpressionError(f"`{expr.text}` is {describe_type(expr.type)}, not a condition", 0,
                                  hint="compare it, e.g. `x > 0`")
    if not exprs:
        value = op == "and"
        return compile_expression(value, {})
    if len(exprs) == 1:
        return exprs[0]
    text = f" {op} ".join(f"({e.text})" for e in exprs)
    root = Node("bool", "bool", text, 0, [e._root for e in exprs], op)
    names = frozenset().union(*(e.names for e in exprs))
    return Expression(text, "bool", names, root, Program())


# --------------------------------------------------------------------------- parsing

_EMPTY_HINT = "write a condition such as `orders_365d >= 3`, or `true`"


@dataclass(frozen=True)
class _Parsed:
    tree: ast.Expression
    source: str  # text with line breaks turned into spaces (same length)
    shift: int  # leading blanks removed before parsing


def _parse(text: str) -> _Parsed:
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"the expression is too long ({len(text)} characters, at most {MAX_LENGTH})",
                              MAX_LENGTH, hint="split it into named segments or custom features")
    if "\0" in text:
        raise ExpressionError("the expression contains a NUL character", text.index("\0"))
    source = re.sub(r"[\r\n\t\f\v]", " ", text)
    body = source.lstrip(" ")
    shift = len(source) - len(body)
    if not body.strip():
        raise ExpressionError("the expression is empty", 0, hint=_EMPTY_HINT)
    _check_brackets(source)
    _check_tokens(body, shift)
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as error:
        raise _syntax_error(body, shift, error) from None
    except (RecursionError, MemoryError):
        raise ExpressionError("the expression is nested too deeply", shift,
                              hint="split it into named segments or custom features") from None
    _check_depth(tree.body, body, shift)
    return _Parsed(tree, source, shift)


def _check_brackets(source: str) -> None:
    """Refuse deep bracket nesting before the parser sees it."""
    depth, quote, escaped = 0, "", False
    for index, char in enumerate(source):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
            if depth > MAX_BRACKETS:
                raise ExpressionError(f"brackets are nested too deeply (more than {MAX_BRACKETS} levels)",
                                      index, hint="split it into named segments or custom features")
        elif char in ")]}":
            depth -= 1


def _check_tokens(body: str, shift: int) -> None:
    """Refuse what Python's parser would silently drop or change before it sees the text.

    A `#` outside quotes starts a Python comment, so the rest of the expression would be
    ignored; and Python folds full-width or look-alike letters (NFKC) into ASCII, so
    `ｍｏｎｅｔａｒｙ_365d` would quietly mean `monetary_365d`. Text in quotes is left alone.
    """
    try:
        for token in tokenize.generate_tokens(io.StringIO(body).readline):
            if token.type == tokenize.ERRORTOKEN and token.string in "\"'":
                return  # an unclosed quote: the parser reports it
            offset = token.start[1] + shift
            if token.type == tokenize.COMMENT:
                raise ExpressionError(
                    "`#` is not allowed here: the rest of the expression would be ignored", offset,
                    hint='remove the note after it, or write it as a YAML comment on its own line; '
                         'inside quotes, as in "#1 store", # is fine')
            if token.type != tokenize.STRING and unicodedata.normalize("NFKC", token.string) != token.string:
                raise _look_alike(token.string, offset)
    except (tokenize.TokenError, SyntaxError):
        return  # the parser reports what the tokenizer could not read


def _look_alike(text: str, offset: int) -> ExpressionError:
    """A name or operator typed with full-width or other look-alike characters."""
    folded = unicodedata.normalize("NFKC", text)
    hint = f"type it with ASCII letters: `{folded}`" if folded.isascii() else "type it with ASCII letters"
    return ExpressionError(f"`{text}` is typed with full-width or look-alike characters", offset, hint=hint)


def _check_depth(root: ast.AST, body: str, shift: int) -> None:
    """Refuse syntax trees deeper than MAX_DEPTH, without recursion."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            offset = _char_offset(body, getattr(node, "col_offset", 0)) + shift
            raise ExpressionError(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)",
                                  offset, hint="split it into named segments or custom features")
        children = [c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.expr, ast.keyword))]
        stack.extend((child, depth + 1) for child in reversed(children))  # source order


def _char_offset(body: str, byte_offset: int) -> int:
    return len(body.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


def _syntax_error(body: str, shift: int, error: SyntaxError) -> ExpressionError:
    hinted = _operator_mistake(body)
    if hinted:
        message, offset, hint = hinted
        return ExpressionError(message, offset + shift, hint)
    msg = (error.msg or "invalid syntax").replace(" (detected at line 1)", "")
    if not error.offset:  # Python reports 0 when the text ends too early
        offset, msg = len(body.rstrip()), "the expression ends too early"
    else:
        offset = max(0, min(error.offset - 1, len(body)))
    offset += shift
    hint = "check for a missing operator, quote, comma or bracket"
    if "unterminated string" in msg:
        hint = "close the quote"
    elif "never closed" in msg:
        hint = "add the missing closing bracket"
    elif "unmatched" in msg or "does not match" in msg:
        hint = "remove the extra bracket or add its opening one"
    elif "indent" in msg:
        hint = "write the expression on one line"
    return ExpressionError(f"syntax error: {msg}", offset, hint)


def _operator_mistake(body: str) -> tuple[str, int, str] | None:
    """Spot operators from other languages: `=` for `==`, `&&`, `||`, `!`."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(body).readline)
                  if t.type not in (tokenize.NEWLINE, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError):
        return None
    for token, following in zip(tokens, tokens[1:] + [None]):
        col = token.start[1]
        if token.string == "=":
            return "`=` is not a comparison", col, "use == to compare"
        adjacent = following is not None and following.start[1] == token.end[1]
        if token.string in ("&", "|") and adjacent and following.string == token.string:
            word = "and" if token.string == "&" else "or"
            return f"`{token.string * 2}` is not an operator here", col, f"use `{word}`"
        if token.string == "!" and not (adjacent and following.string == "="):
            return "`!` is not an operator here", col, "use `not`, or != to compare"
        if token.string == "<>":
            return "`<>` is not an operator here", col, "use != to compare"
    return None
