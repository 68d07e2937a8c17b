"""The typed tree of a rule expression: a whitelisted Python syntax tree checked, name by
name and type by type, against the feature catalogue (stage 2 of ``compile_expression``).

Each ``Node`` keeps its source text and offset, so a mistake is reported at the character
that caused it, with a hint in plain words.
"""

from __future__ import annotations

import ast
import datetime as dt
import difflib
import re
from collections.abc import Mapping

import numpy as np

from engine.config.expressions.columns import IMPLEMENTATIONS, describe_type
from engine.config.expressions.tree import Node
from engine.errors import ExpressionError

FUNCTIONS: dict[str, str] = {
    "abs": "abs(x): the absolute value of a number",
    "floor": "floor(x): round a number down to a whole number",
    "ceil": "ceil(x): round a number up to a whole number",
    "round": "round(x[, digits]): round to `digits` decimals (default 0); halves go away from zero",
    "min": "min(a, b, ...): the smallest of numbers or dates, ignoring nulls (null only if all are null)",
    "max": "max(a, b, ...): the largest of numbers or dates, ignoring nulls (null only if all are null)",
    "coalesce": "coalesce(a, b, ...): the first value that is not null",
    "date": 'date("2024-12-25"): a date, written YYYY-MM-DD',
    "today": "today(): the date of the run (as_of) in the programme's timezone",
    "days_since": "days_since(d): whole days from date d to today() (negative when d is in the future)",
    "days_until": "days_until(d): whole days from today() to date d (negative when d has passed)",
    "year": "year(d): the year of a date, e.g. 2024",
    "month": "month(d): the month of a date, 1-12",
    "day": "day(d): the day of the month of a date, 1-31",
    "lower": "lower(s): the string in lower case",
    "upper": "upper(s): the string in upper case",
    "len": "len(s): the number of characters in a string",
}
assert set(IMPLEMENTATIONS) == set(FUNCTIONS)  # every documented function has a column version


_COMPARE_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_ARITH_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%"}
_BAD_OPS = {
    ast.Pow: ("**", "multiply instead, e.g. x * x"),
    ast.FloorDiv: ("//", "use floor(a / b)"),
    ast.BitAnd: ("&", "use `and`"),
    ast.BitOr: ("|", "use `or`"),
    ast.BitXor: ("^", ""),
    ast.LShift: ("<<", ""),
    ast.RShift: (">>", ""),
    ast.MatMult: ("@", ""),
}
_UNSUPPORTED = {
    "Subscript": ("indexing with [...] is not supported", "write the feature name directly; [...] only lists values for `in`"),
    "Lambda": ("lambda is not supported", "expressions can only compare and compute values"),
    "ListComp": ("comprehensions are not supported", ""),
    "SetComp": ("comprehensions are not supported", ""),
    "DictComp": ("comprehensions are not supported", ""),
    "GeneratorExp": ("comprehensions are not supported", ""),
    "IfExp": ("`... if ... else ...` is not supported", "use coalesce(), or write two rules"),
    "Dict": ("{...} is not supported", "use [...] to list values for `in`"),
    "Set": ("{...} is not supported", "use [...] to list values for `in`"),
    "JoinedStr": ("f-strings are not supported", "use + to join strings"),
    "NamedExpr": ("`:=` is not supported", "use == to compare"),
    "Starred": ("`*` unpacking is not supported", ""),
}
_SIMPLE_FUNCTIONS = {  # name -> (parameter types, result type)
    "abs": (("number",), "number"), "floor": (("number",), "number"), "ceil": (("number",), "number"),
    "today": ((), "date"), "days_since": (("date",), "number"), "days_until": (("date",), "number"),
    "year": (("date",), "number"), "month": (("date",), "number"), "day": (("date",), "number"),
    "lower": (("string",), "string"), "upper": (("string",), "string"), "len": (("string",), "number"),
}
_NULL_HINT = "null can only be tested: write `x is null` or `x is not null`"


class _Checker:
    """Turns a whitelisted Python syntax tree into a typed ``Node`` tree."""

    def __init__(self, text: str, source: str, shift: int, names: Mapping[str, str]):
        self.text = text
        self.source = source
        self.body = source[shift:]
        self.shift = shift
        self.names = dict(names)
        self.used: set[str] = set()
        encoded = self.body.encode("utf-8")
        self._chars = [0] * (len(encoded) + 1)  # byte offset -> character offset
        position = 0
        for index, char in enumerate(self.body):
            for _ in range(len(char.encode("utf-8"))):
                self._chars[position] = index
                position += 1
        self._chars[position] = len(self.body)

    # -- positions
    def start(self, node: ast.AST) -> int:
        return self._chars[node.col_offset] + self.shift

    def end(self, node: ast.AST) -> int:
        return self._chars[node.end_col_offset] + self.shift

    def segment(self, first: ast.AST, last: ast.AST | None = None) -> str:
        return self.source[self.start(first):self.end(last or first)]

    def fail(self, where: ast.AST | int, message: str, hint: str = "") -> ExpressionError:
        offset = where if isinstance(where, int) else self.start(where)
        return ExpressionError(message, offset, hint)

    def node(self, kind: str, type_: str, where: ast.AST, args=(), op=None, extra=None) -> Node:
        return Node(kind, type_, self.segment(where), self.start(where), list(args), op, extra)

    # -- dispatch
    def check(self, node: ast.AST) -> Node:
        result = self.visit(node)
        if result.type == "null":
            raise self.fail(node, "null on its own is not a value", _NULL_HINT)
        if result.type == "any":
            self.expect(result, "string")
        return result

    def visit(self, node: ast.AST) -> Node:
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            message, hint = _UNSUPPORTED.get(
                type(node).__name__, (f"`{self.segment(node)}` is not allowed in an expression", ""))
            raise self.fail(node, message, hint)
        return method(node)

    def value(self, node: ast.AST) -> Node:
        """A child that must be a real value (null literal only belongs in `is null`)."""
        result = self.visit(node)
        if result.type == "null":
            raise self.fail(node, "null cannot be used here", _NULL_HINT)
        return result

    def expect(self, node: Node, wanted: str) -> bool:
        """True if ``node`` has type ``wanted``; a name of type "any" takes that type."""
        if node.type == wanted:
            return True
        if node.type == "any" and node.kind == "name":
            node.type = wanted
            return True
        return False

    def unify(self, left: Node, right: Node) -> None:
        """Give untyped ("any") names the type of the other side."""
        if left.type == "any" and right.type == "any":
            self.expect(left, "string")
            self.expect(right, "string")
        elif left.type == "any":
            self.expect(left, right.type)
        elif right.type == "any":
            self.expect(right, left.type)

    # -- leaves
    def visit_Constant(self, node: ast.Constant) -> Node:
        value = node.value
        if isinstance(value, bool) or value is None:
            raise self.fail(node, f"unknown name '{value}'", "write true, false and null in lower case")
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:
                number = float("inf")
            if not np.isfinite(number) or abs(number) > 1e300:
                raise self.fail(node, "the number is too large", "")
            return self.node("const", "number", node, op=np.float64(number))
        if isinstance(value, str):
            return self.node("const", "string", node, op=value)
        raise self.fail(node, f"`{self.segment(node)}` is not a supported literal",
                        "use numbers, \"text\", true, false, null or date(\"2024-12-25\")")

    def visit_Name(self, node: ast.Name) -> Node:
        name = node.id
        if name in ("true", "false"):
            return self.node("const", "bool", node, op=np.bool_(name == "true"))
        if name == "null":
            return self.node("const", "null", node, op=None)
        if name.startswith("__"):
            raise self.fail(node, f"names starting with __ are not allowed (`{name}`)")
        return self.lookup(name, node)

    def visit_Attribute(self, node: ast.Attribute) -> Node:
        parts, current = [], node
        while isinstance(current, ast.Attribute):
            if current.attr.startswith("__"):
                offset = self.end(current) - len(current.attr)
                raise self.fail(offset, f"names starting with __ are not allowed (`{current.attr}`)")
            parts.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name) or current.id.startswith("__"):
            raise self.fail(node, "only dotted names such as `event.amount` are allowed",
                            "functions are written in front: lower(city), not city.lower()")
        parts.append(current.id)
        return self.lookup(".".join(reversed(parts)), node)

    def lookup(self, name: str, node: ast.AST) -> Node:
        if name in self.names:
            self.used.add(name)
            return self.node("name", self.names[name], node, op=name)
        if name in ("True", "False", "None"):
            raise self.fail(node, f"unknown name '{name}'", "write true, false and null in lower case")
        if name in FUNCTIONS:
            raise self.fail(node, f"`{name}` is a function", f"call it: {FUNCTIONS[name].split(':')[0]}")
        close = difflib.get_close_matches(name, list(self.names), n=1, cutoff=0.6)
        hint = (f"did you mean `{close[0]}`?" if close
                else "declare it under `features:` in a rule file, or check the spelling")
        raise self.fail(node, f"unknown feature '{name}'", hint)

    # -- logic
    def visit_BoolOp(self, node: ast.BoolOp) -> Node:
        op = "and" if isinstance(node.op, ast.And) else "or"
        args = [self.condition(child, f"`{op}`") for child in node.values]
        return self.node("bool", "bool", node, args, op)

    def condition(self, child: ast.AST, what: str) -> Node:
        result = self.value(child)
        if not self.expect(result, "bool"):
            example = {"number": f"{result.text} > 0", "string": f'{result.text} == "..."',
                       "date": f"{result.text} <= today()"}.get(result.type, result.text)
            raise self.fail(child, f"{what} needs true/false, but `{result.text}` is {describe_type(result.type)}",
                            f"compare it, e.g. `{example}`")
        return result

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Node:
        if isinstance(node.op, ast.Not):
            return self.node("not", "bool", node, [self.condition(node.operand, "`not`")], "not")
        if isinstance(node.op, ast.Invert):
            raise self.fail(node, "`~` is not supported", "use `not`")
        operand = self.value(node.operand)
        if not self.expect(operand, "number"):
            sign = "-" if isinstance(node.op, ast.USub) else "+"
            raise self.fail(node, f"`{sign}` needs a number, but `{operand.text}` is {describe_type(operand.type)}")
        if isinstance(node.op, ast.UAdd):
            return operand
        if operand.kind == "const":
            return self.node("const", "number", node, op=-operand.op)
        return self.node("neg", "number", node, [operand], "-")

    # -- arithmetic
    def visit_BinOp(self, node: ast.BinOp) -> Node:
        op_offset = self.operator_offset(node.left)
        if type(node.op) in _BAD_OPS:
            symbol, hint = _BAD_OPS[type(node.op)]
            raise self.fail(op_offset, f"`{symbol}` is not supported", hint)
        op = _ARITH_OPS[type(node.op)]
        left, right = self.value(node.left), self.value(node.right)
        self.unify_arith(left, right)
        types = (left.type, right.type)
        if types == ("number", "number"):
            result = "number"
        elif types == ("string", "string") and op == "+":
            result = "string"
        elif types == ("date", "date") and op == "-":
            result = "number"
        else:
            verb = {"+": "add", "-": "subtract", "*": "multiply", "/": "divide", "%": "take the remainder of"}[op]
            hint = "arithmetic works on numbers; + also joins two strings, and date - date gives days"
            if "date" in types:
                hint = "date - date gives days; use days_since(d) or days_until(d) to compare with a number"
            raise self.fail(op_offset, f"cannot {verb} {left.type} and {right.type}", hint)
        return self.node("arith", result, node, [left, right], op)

    def unify_arith(self, left: Node, right: Node) -> None:
        if left.type == "any" and right.type == "any":
            self.expect(left, "number")
            self.expect(right, "number")
        elif "any" in (left.type, right.type):
            self.unify(left, right)

    def operator_offset(self, left: ast.AST) -> int:
        position = self.end(left)
        while position < len(self.source) and self.source[position] in " )":
            position += 1
        return position

    # -- comparisons
    def visit_Compare(self, node: ast.Compare) -> Node:
        operands = [node.left, *node.comparators]
        pairs = []
        left = self.visit(node.left)
        for op, right_ast, left_ast in zip(node.ops, node.comparators, operands):
            if isinstance(op, (ast.In, ast.NotIn)):
                pair = self.membership(left, left_ast, op, right_ast)
                right = None
            else:
                right = self.visit(right_ast)
                pair = self.comparison(left, left_ast, op, right, right_ast)
            pairs.append(pair)
            if right is not None:
                left = right
                if len(node.ops) > 1 and right.kind not in ("name", "const"):
                    right.shared = True
        if len(pairs) == 1:
            return pairs[0]
        return self.node("bool", "bool", node, pairs, "and")

    def comparison(self, left: Node, left_ast, op, right: Node, right_ast) -> Node:
        text = self.segment(left_ast, right_ast)
        offset = self.start(left_ast)
        if isinstance(op, (ast.Is, ast.IsNot)):
            word = "is" if isinstance(op, ast.Is) else "is not"
            if right.type != "null":
                raise self.fail(offset, f"`{word}` only tests for null", "use == or != to compare values")
            return Node("isnull", "bool", text, offset, [left], word)
        symbol = _COMPARE_OPS[type(op)]
        if "null" in (left.type, right.type):
            fix = "use `is not null`" if symbol == "!=" else "use `is null`"
            raise self.fail(offset, f"comparing with null using `{symbol}` is never true", fix)
        self.unify(left, right)
        if left.type != right.type:
            hint = f"`{left.text}` is {describe_type(left.type)} and `{right.text}` is {describe_type(right.type)}"
            if {left.type, right.type} == {"date", "string"}:
                hint = 'write dates as date("2024-12-25")'
            elif {left.type, right.type} == {"number", "string"}:
                hint += "; numbers go without quotes, text in quotes"
            raise self.fail(offset, f"cannot compare {left.type} with {right.type}", hint)
        if left.type == "bool" and symbol not in ("==", "!="):
            raise self.fail(offset, f"true/false values cannot be compared with `{symbol}`", "use == or !=")
        return Node("compare", "bool", text, offset, [left, right], symbol)

    def membership(self, left: Node, left_ast, op, right_ast) -> Node:
        word = "in" if isinstance(op, ast.In) else "not in"
        offset = self.start(left_ast)
        if left.type == "null":
            raise self.fail(offset, "null cannot be used here", _NULL_HINT)
        if not isinstance(right_ast, (ast.List, ast.Tuple)):
            raise self.fail(right_ast, f"`{word}` needs a list of values in brackets",
                            'e.g. city in ["上海", "北京"]')
        values = []
        for element_ast in right_ast.elts:
            element = self.visit(element_ast)
            if element.kind != "const" or element.type == "null":
                hint = (f"write `{left.text} is null or {left.text} {word} [...]`" if element.type == "null"
                        else "list literal values: numbers, \"text\", true/false or date(...)")
                raise self.fail(element_ast, f"`{element.text}` cannot be listed after `{word}`", hint)
            self.expect(left, element.type)
            if element.type != left.type:
                raise self.fail(element_ast, f"list item `{element.text}` is {describe_type(element.type)} "
                                f"but `{left.text}` is {describe_type(left.type)}")
            values.append(element.op)
        text = self.segment(left_ast, right_ast)
        return Node("in", "bool", text, offset, [left], word, values)

    # -- calls
    def visit_Call(self, node: ast.Call) -> Node:
        if not isinstance(node.func, ast.Name):
            attr = getattr(node.func, "attr", "")
            hint = f"write {attr}(...) with the value inside" if attr in FUNCTIONS else ""
            raise self.fail(node, "only functions can be called, not methods", hint)
        name = node.func.id
        if name.startswith("__"):
            raise self.fail(node, f"`{name}` is not allowed", "see the list of functions in docs/expressions.md")
        if name not in FUNCTIONS:
            if name in self.names:
                raise self.fail(node, f"`{name}` is a feature, not a function", "remove the ()")
            close = difflib.get_close_matches(name, list(FUNCTIONS), n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else "functions: " + ", ".join(FUNCTIONS)
            raise self.fail(node, f"unknown function '{name}'", hint)
        if node.keywords:
            raise self.fail(node.keywords[0], f"{name}() takes no named arguments",
                            FUNCTIONS[name].split(":")[0])
        return getattr(self, "call_" + name, self.call_simple)(name, node)

    def arity(self, name: str, node: ast.Call, low: int, high: int | None) -> None:
        count = len(node.args)
        if count < low or (high is not None and count > high):
            wanted = (f"{low}" if low == high else f"{low} or {high}" if high is not None
                      else f"at least {low}")
            raise self.fail(node, f"{name}() takes {wanted} argument{'s' if wanted != '1' else ''}, "
                            f"got {count}", "usage: " + FUNCTIONS[name].split(":")[0])

    def argument(self, name: str, arg_ast: ast.AST, wanted: str) -> Node:
        arg = self.value(arg_ast)
        if not self.expect(arg, wanted):
            hint = 'write dates as date("2024-12-25")' if wanted == "date" and arg.type == "string" else ""
            raise self.fail(arg_ast, f"{name}() needs {describe_type(wanted)}, but `{arg.text}` is {describe_type(arg.type)}", hint)
        return arg

    def call_simple(self, name: str, node: ast.Call) -> Node:
        params, result = _SIMPLE_FUNCTIONS[name]
        self.arity(name, node, len(params), len(params))
        args = [self.argument(name, a, t) for a, t in zip(node.args, params)]
        return self.node("call", result, node, args, name)

    def call_round(self, name: str, node: ast.Call) -> Node:
        self.arity(name, node, 1, 2)
        args = [self.argument(name, node.args[0], "number")]
        digits = 0
        if len(node.args) == 2:
            given = self.visit(node.args[1])
            if given.kind != "const" or given.type != "number" or given.op != int(given.op) \
                    or not -10 <= given.op <= 10:
                raise self.fail(node.args[1], "round() digits must be a whole number from -10 to 10",
                                "e.g. round(x, 2)")
            digits = int(given.op)
        return self.node("call", "number", node, args, name, digits)

    def call_min(self, name: str, node: ast.Call) -> Node:
        self.arity(name, node, 2, None)
        args = [self.value(a) for a in node.args]
        kind = next((a.type for a in args if a.type != "any"), "number")
        if kind not in ("number", "date"):
            kind = "number"
        for arg, arg_ast in zip(args, node.args):
            if not self.expect(arg, kind):
                raise self.fail(arg_ast, f"{name}() needs all numbers or all dates, "
                                f"but `{arg.text}` is {describe_type(arg.type)}")
        return self.node("call", kind, node, args, name)

    call_max = call_min

    def call_coalesce(self, name: str, node: ast.Call) -> Node:
        self.arity(name, node, 2, None)
        args = [self.value(a) for a in node.args]
        kind = next((a.type for a in args if a.type != "any"), "string")
        for arg, arg_ast in zip(args, node.args):
            if not self.expect(arg, kind):
                raise self.fail(arg_ast, f"coalesce() needs values of one type, but `{args[0].text}` is "
                                f"{describe_type(kind)} and `{arg.text}` is {describe_type(arg.type)}")
        return self.node("call", kind, node, args, name)

    def call_date(self, name: str, node: ast.Call) -> Node:
        self.arity(name, node, 1, 1)
        arg = node.args[0]
        value = arg.value if isinstance(arg, ast.Constant) else None
        if not isinstance(value, str):
            raise self.fail(arg, "date() needs a date written in quotes", 'e.g. date("2024-12-25")')
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                raise ValueError(value)
            day = dt.date.fromisoformat(value)
        except ValueError:
            raise self.fail(arg, f"not a valid date: {value!r}", 'write it as YYYY-MM-DD, e.g. date("2024-12-25")') from None
        if not 1678 <= day.year <= 2261:
            raise self.fail(arg, f"date out of range: {value!r}", "use a year between 1678 and 2261")
        return self.node("const", "date", node, op=np.datetime64(day, "D"))
