"""The template sandbox: what a message template may do, and how much work one message may take.

Templates are written by marketers and reviewed in git, yet a run must survive a broken or
hostile one. ``MessageEnvironment`` is an immutable Jinja sandbox plus a syntax-tree check
(no ``**``, no big repetitions or ranges, no recursive loops, no paths outside the templates
folder) and, inside ``message_budget``, limits on loop steps, text size and time.
``engine.messages.rendering`` builds the one environment from it and renders with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import string
import time
from collections.abc import Iterator
from pathlib import Path

import jinja2
from jinja2 import FileSystemLoader, nodes, pass_context
from jinja2.compiler import CodeGenerator, generate
from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from engine.errors import TemplateError


def _require_jinja(version: str) -> None:
    """Older Jinja2 releases let a template escape the sandbox (CVE-2024-56201, CVE-2025-27516)."""
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if numbers < (3, 1, 6):
        raise TemplateError(
            "jinja2", f"Jinja2 {version} is installed; loyalty needs Jinja2 >= 3.1.6 because older "
            "versions let templates escape the sandbox (CVE-2024-56201, CVE-2025-27516): "
            "pip install -U 'jinja2>=3.1.6'")


_require_jinja(jinja2.__version__)

# Per-message limits. A message is short; these leave a wide margin for honest templates.
MAX_STEPS = 10_000                # loop iterations plus calls while rendering one message
MAX_WORK_CHARS = 1_000_000        # text produced while rendering one message, buffers included
MAX_VALUE_CHARS = 100_000         # any one string or list built by a template
MAX_REPEAT = 1_000                # `'-' * 20`, `|center(40)`, `range(10)`: small fixed counts only
MAX_INT_BITS = 4_096              # numbers a template may build by multiplying
MAX_TEMPLATE_CHARS = 256 * 1024   # one template file


def _check_include_path(name: str) -> str | None:
    """Why an include/extends/import name is refused, or None when it stays inside the folder."""
    if not name or name.startswith(("/", "~")) or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return f"'{name}' is not a template name inside the templates folder"
    if ".." in name.split("/"):
        return f"'{name}' reaches outside the templates folder ('..' is not allowed)"
    return None


class _ResourceLimit(SecurityError):
    """A template tried to do more work than one message may."""


class RefusedSyntax(TemplateSyntaxError):
    """The syntax-tree check refused a construct."""


class _Budget:
    """Work done while rendering one message: loop steps and calls, characters, time."""

    __slots__ = ("steps", "chars", "seconds", "deadline", "max_steps")

    def __init__(self, seconds: float, max_steps: int = MAX_STEPS):
        self.steps = 0
        self.chars = 0
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.max_steps = max_steps

    def step(self, chars: int = 0) -> None:
        self.steps += 1
        self.chars += chars
        if self.steps > self.max_steps:
            raise _ResourceLimit(f"the template makes more than {self.max_steps:,} loop steps or "
                                 "calls for one message")
        if self.chars > MAX_WORK_CHARS:
            raise _ResourceLimit(f"the template produces more than {MAX_WORK_CHARS:,} "
                                 "characters of text for one message")
        if not self.steps & 63:
            self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _ResourceLimit(f"rendering one message took longer than {self.seconds:g} s")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


@contextlib.contextmanager
def message_budget(seconds: float, max_steps: int = MAX_STEPS) -> Iterator[_Budget]:
    """The work one message may do while it renders inside this block."""
    budget = _Budget(seconds, max_steps)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def check_time() -> None:
    """Raise when the message being rendered has run out of time."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_time()


def _step(chars: int = 0) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step(chars)


def _check_value(value):
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_VALUE_CHARS:
        raise _ResourceLimit(f"the template builds a text or list longer than "
                             f"{MAX_VALUE_CHARS:,}; messages are short")
    return value


_PERCENT_SPEC = re.compile(r"%[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_format_string(fmt: str) -> None:
    """Refuse widths and precisions such as ``%999999999d`` or ``{:>999999999}``."""
    widths = [w for pair in _PERCENT_SPEC.findall(fmt) for w in pair if w]
    try:
        widths += [w for _, _, spec, _ in string.Formatter().parse(fmt) if spec
                   for w in re.findall(r"\d+|\{", spec)]
    except ValueError:
        pass  # not a str.format pattern; % specs were checked above
    for width in widths:
        if width in ("*", "{") or int(width) > MAX_REPEAT:
            raise _ResourceLimit(f"format widths above {MAX_REPEAT} (or taken from a value) "
                                 "are not allowed")


def _check_text_call(name: str, text: str, args: tuple) -> None:
    """Estimate the size of a str method's result before running it."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        size = args[0]
    elif name == "expandtabs":
        size = len(text) + text.count("\t") * (args[0] if args and isinstance(args[0], int) else 8)
    elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
        hits = len(text) + 1 if not args[0] else text.count(str(args[0]))
        size = len(text) + hits * len(args[1])
    elif name == "join" and args:
        items = args[0] if hasattr(args[0], "__len__") else ()
        size = len(text) * len(items)
    else:
        return
    if size > MAX_VALUE_CHARS:
        raise _ResourceLimit(f"str.{name} would build a text longer than {MAX_VALUE_CHARS:,}")


def _check_filter_args(name: str, args: tuple, kwargs: dict) -> None:
    value, rest = (args[0] if args else None), list(args[1:]) + list(kwargs.values())
    if name == "format" and isinstance(value, str):
        _check_format_string(value)
    elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
        _check_text_call("replace", value, (str(rest[0]), str(rest[1])))
    elif name == "join" and rest and hasattr(value, "__len__"):
        if len(str(rest[0])) * len(value) > MAX_VALUE_CHARS:
            raise _ResourceLimit(f"join would build a text longer than {MAX_VALUE_CHARS:,}")
    else:  # center, indent, batch, slice: a size argument
        for arg in rest:
            too_big = (type(arg) is int and arg > MAX_REPEAT) or (
                isinstance(arg, str) and len(arg) > MAX_REPEAT)
            if too_big:
                raise _ResourceLimit(f"|{name} with a size above {MAX_REPEAT} is not allowed")


_SIZED_FILTERS = frozenset({"center", "indent", "batch", "slice", "format", "replace", "join"})


def _guard_filter(name: str, func):
    """Wrap a built-in filter: check size arguments first, check the result's size after."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) else 0

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        if name in _SIZED_FILTERS:
            _check_filter_args(name, args[skip:], kwargs)
        return _check_value(func(*args, **kwargs))

    return guarded


@pass_context
def _bounded_loop(context, iterable, weight: int = 0):
    """Every loop iteration costs a step and the loop body's literal text."""
    budget = _BUDGET.get()
    if iterable is None or budget is None:
        return iterable
    return _counted(iterable, budget, weight)


def _counted(iterable, budget: _Budget, weight: int):
    for item in iterable:
        budget.step(weight)
        yield item


def _bounded_range(*args):
    steps = range(*args)
    if len(steps) > MAX_STEPS:
        raise _ResourceLimit(f"range() with more than {MAX_STEPS:,} numbers is not allowed")
    return steps


def tree_problems(tree: nodes.Template) -> list[tuple[int, str]]:
    """(line, message) for constructs that could exhaust time or memory, or reach outside."""
    found = []
    for node in tree.find_all((nodes.Pow, nodes.Mul, nodes.Call, nodes.For, nodes.Include,
                               nodes.Extends, nodes.Import, nodes.FromImport)):
        line = node.lineno
        if isinstance(node, nodes.Pow):
            found.append((line, "the ** operator is not allowed in templates (it can build "
                                "numbers too big to print)"))
        elif isinstance(node, nodes.Mul):
            operands = (node.left, node.right)
            sequence = any(isinstance(o, (nodes.List, nodes.Tuple)) or (
                isinstance(o, nodes.Const) and isinstance(o.value, (str, list, tuple)))
                for o in operands)
            small = any(isinstance(o, nodes.Const) and type(o.value) is int
                        and abs(o.value) <= MAX_REPEAT for o in operands)
            if sequence and not small:
                found.append((line, f"repeating text or a list with * is allowed only by a "
                                    f"fixed count up to {MAX_REPEAT}, as in '-' * 20"))
        elif isinstance(node, nodes.Call):
            args = node.args
            if (isinstance(node.node, nodes.Name) and node.node.name == "range" and args
                    and all(isinstance(a, nodes.Const) and type(a.value) is int for a in args)):
                try:
                    size = len(range(*(a.value for a in args)))
                except (ValueError, TypeError, OverflowError):
                    size = MAX_STEPS + 1
                if size > MAX_STEPS:
                    found.append((line, f"range() with more than {MAX_STEPS:,} numbers is not "
                                        "allowed"))
        elif isinstance(node, nodes.For):
            if node.recursive:
                found.append((line, "recursive loops are not allowed in message templates"))
        elif isinstance(node.template, nodes.Const) and isinstance(node.template.value, str):
            reason = _check_include_path(node.template.value)
            if reason:
                found.append((line, reason))
    return sorted(found)


def _literal_size(body: list[nodes.Node]) -> int:
    return sum(len(n.data) for b in body for n in b.find_all(nodes.TemplateData)) + sum(
        len(n.value) for b in body for n in b.find_all(nodes.Const) if isinstance(n.value, str))


class _GuardTransformer(NodeTransformer):
    """Route loop iterables and ``~`` results through the per-message budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        weight = nodes.Const(_literal_size(node.body), lineno=node.lineno)
        node.iter = nodes.Filter(node.iter, "_bounded_loop", [weight], [], None, None,
                                 lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, "_bounded_value", [], [], None, None, lineno=node.lineno)


class _CountingCodeGenerator(CodeGenerator):
    """Count every printed value, including those printed into macros and ``{% set %}`` blocks."""

    def _output_child_pre(self, node, frame, finalize) -> None:
        self.write("environment.count_output(")
        super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node, frame, finalize) -> None:
        super()._output_child_post(node, frame, finalize)
        self.write(")")


class MessageEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus our syntax-tree check and per-message resource limits."""

    code_generator_class = _CountingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options):
        super().__init__(**options)
        self.globals.pop("lipsum", None)
        self.globals["range"] = _bounded_range
        self.filters = {name: _guard_filter(name, func) for name, func in self.filters.items()}
        self.filters.update(_bounded_loop=_bounded_loop, _bounded_value=_check_value)

    def _generate(self, source, name, filename, defer_init=False):
        problems = tree_problems(source)
        if problems:
            line, message = problems[0]
            raise RefusedSyntax(message, line, name, filename)
        tree = _GuardTransformer().visit(source)
        tree.set_environment(self)
        return generate(tree, self, name, filename, defer_init=defer_init,
                        optimized=self.optimized)

    def getattr(self, obj, attribute):
        # Dict keys first: `reward.items` is the reward's "items" field, not dict.items.
        if type(obj) is dict:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is not None:
            _check_format_string(value.__self__)
        return wrapper

    def call(self, context, obj, /, *args, **kwargs):
        _step()
        if isinstance(getattr(obj, "__self__", None), str) and callable(obj):
            _check_text_call(getattr(obj, "__name__", ""), obj.__self__, args)
        return _check_value(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            raise _ResourceLimit("the ** operator is not allowed in templates")
        if operator == "%" and isinstance(left, str):
            _check_format_string(left)
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    if len(seq) * count > MAX_VALUE_CHARS:
                        raise _ResourceLimit(f"* would build a text or list longer than "
                                             f"{MAX_VALUE_CHARS:,}")
            if (isinstance(left, int) and isinstance(right, int)
                    and left.bit_length() + right.bit_length() > MAX_INT_BITS):
                raise _ResourceLimit("the template builds a number too big to print")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and hasattr(right, "__len__"):
            if len(left) + len(right) > MAX_VALUE_CHARS:
                raise _ResourceLimit(f"+ would build a text or list longer than "
                                     f"{MAX_VALUE_CHARS:,}")
        return self.binop_table[operator](left, right)

    @staticmethod
    def count_output(text: str) -> str:
        budget = _BUDGET.get()
        if budget is not None:
            budget.chars += len(text)
            if budget.chars > MAX_WORK_CHARS:
                budget.step()  # raises with the message
        return text


class ConfinedLoader(FileSystemLoader):
    """Loads only files inside the templates folder, by relative name."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        super().__init__(str(self.root), encoding="utf-8", followlinks=False)

    def get_source(self, environment, template):
        reason = _check_include_path(template)
        if reason:
            raise TemplateNotFound(template, reason)
        source, filename, uptodate = super().get_source(environment, template)
        if not Path(filename).resolve().is_relative_to(self.root):
            raise TemplateNotFound(template, f"'{template}' links outside the templates folder")
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateSyntaxError(f"template file is larger than {MAX_TEMPLATE_CHARS:,} "
                                      "characters", 1, template, filename)
        return source, filename, uptodate
