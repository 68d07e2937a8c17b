"""Loading YAML rule files safely while remembering where every value was written.

PyYAML's SafeLoader is used for scanning and parsing; we compose the node graph
ourselves so that we can refuse aliases (alias bombs), cap nesting depth, report
duplicate keys and explicit tags (``!!python/name:...``, ``!custom``, ``!!float abc``:
a traceback or a silently dropped tag otherwise), and keep a source map from each
value's path to its line and column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent

from engine.errors import Problem

MAX_FILE_BYTES = 2_000_000
MAX_DEPTH = 64
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts as a line break

Path_ = tuple  # a path into the loaded data: ("campaigns", "winback", "reward")


@dataclass
class SourceMap:
    """Positions (1-based line and column) of every key and value in one YAML file."""

    file: str
    lines: list[str]
    values: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    keys: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    plain: dict[tuple, str] = field(default_factory=dict)  # raw text of plain scalars that are not strings
    quoted: dict[tuple, int] = field(default_factory=dict)  # path -> quote offset (1 when quoted)
    text: str = ""  # the whole file, to find characters inside multi-line, quoted or block scalars
    # path -> (scalar value, style, start index, end index, line, column) of every text scalar
    scalars: dict[tuple, tuple] = field(default_factory=dict)

    def value_position(self, path: tuple) -> tuple[int, int]:
        """The position of the value at ``path``, or of its nearest known parent."""
        path = tuple(path)
        while path not in self.values and path:
            path = path[:-1]
        return self.values.get(path, (1, 1))

    def key_position(self, path: tuple) -> tuple[int, int]:
        path = tuple(path)
        if path in self.keys:
            return self.keys[path]
        return self.value_position(path)

    def problem(self, path: tuple, message: str, hint: str = "", *, at_key: bool = False,
                offset: int = 0) -> Problem:
        if at_key:
            line, column = self.key_position(path)
        elif offset:
            line, column = self.position_in_value(path, offset)
        else:
            line, column = self.value_position(path)
        return Problem(self.file, line, column, message, hint, source_line=self.line_text(line))

    def position_in_value(self, path: tuple, offset: int) -> tuple[int, int]:
        """Line and column of the character at ``offset`` in the text value at ``path``.

        The value's characters are matched against its source text, which skips quotes,
        escapes, block-scalar headers, indentation and folded line breaks.
        """
        path = tuple(path)
        found = self.scalars.get(path)
        if found is not None:
            position = _find_in_source(self.text, found, offset)
            if position is not None:
                return position
        line, column = self.value_position(path)
        return line, column + offset + self.quoted.get(path, 0)

    def line_text(self, line: int) -> str:
        return self.lines[line - 1] if 0 < line <= len(self.lines) else ""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and deep nesting while composing, and notes explicit tags."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self.tagged: list[yaml.Mark] = []  # where each explicit tag (`!!str`, `!x`) was written

    def compose_node(self, parent, index):
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(
                None, None,
                "YAML aliases (*name) are not allowed in rule files",
                event.start_mark,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()
                raise yaml.MarkedYAMLError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels is not allowed", event.start_mark)
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if getattr(event, "tag", None) is not None:
                self.tagged.append(event.start_mark)
                node.explicit_tag = True  # read as if the tag were not there; reported by load_yaml
            return node
        finally:
            self._depth -= 1


def load_yaml(path: Path, display: str) -> tuple[Any, SourceMap, list[Problem]]:
    """Load one YAML file; return (data, source map, problems). Data is None on fatal errors."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, SourceMap(display, []), [Problem(display, 1, 1, f"cannot read file: {exc.strerror}")]
    if len(raw) > MAX_FILE_BYTES:
        return None, SourceMap(display, []), [Problem(
            display, 1, 1, f"file is larger than {MAX_FILE_BYTES // 1_000_000} MB",
            "split it into several rule files")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        lines = _LINE_BREAK.split(raw.decode("utf-8", errors="replace"))
        return None, SourceMap(display, lines), [Problem(
            display, line, column, f"file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
            "save it as UTF-8 in your editor", source_line=lines[line - 1] if line <= len(lines) else "")]
    smap = SourceMap(display, _LINE_BREAK.split(text), text=text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        return None, smap, [_yaml_problem(exc, smap)]
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error we know is marked
        return None, smap, [Problem(display, 1, 1, f"YAML error: {exc}")]
    except RecursionError:
        return None, smap, [Problem(display, 1, 1, "YAML nesting is too deep",
                                    "rule files need only a few levels; flatten the file")]
    finally:
        loader.dispose()
    if node is None:
        return {}, smap, []
    problems = [_tag_problem(mark, smap) for mark in loader.tagged]
    data = _construct(node, (), smap, loader, problems)
    return data, smap, problems


_TAG_TEXT = re.compile(r"!\S*")


def _tag_problem(mark: yaml.Mark, smap: SourceMap) -> Problem:
    """An explicit YAML tag: rule files hold plain values, and a tag either breaks loading
    (``!!python/name:...``, ``!!float abc``) or is silently dropped (``!custom``)."""
    found = _TAG_TEXT.search(smap.text, mark.index)  # after an anchor (`&a !!str x`) too
    tag = found.group(0) if found else "!"
    shown = tag if len(tag) <= 40 else tag[:37] + "..."
    line = mark.line + 1
    return Problem(smap.file, line, mark.column + 1, f"the YAML tag `{shown}` is not allowed",
                   "remove the tag; write the value itself", source_line=smap.line_text(line))


def _yaml_problem(exc: yaml.MarkedYAMLError, smap: SourceMap) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = exc.problem or exc.context or "invalid YAML"
    context = exc.context or ""
    opened = exc.context_mark
    hint = ""
    text = smap.line_text(line)
    quote = _unclosed_quote(smap.lines, opened.line + 1 if opened else 1, line)
    if "\t" in text[: max(column, 1)] or "'\\t'" in problem:
        problem, hint = "tab character in indentation", "indent with spaces, not tabs"
        column = text.find("\t") + 1 if "\t" in text else column
    elif "aliases" in problem:
        hint = "write the value out in full instead of referring to an anchor"
    elif "nesting deeper" in problem:
        hint = "rule files need only a few levels; flatten the file"
    elif quote is not None:
        line, column = quote
        text = smap.line_text(line)
        problem = "this quoted text is never closed"
        hint = f"add the closing {text[column - 1]} at the end of the value"
    elif "mapping values are not allowed" in problem:
        hint = "a value containing ': ' must be put in quotes"
    elif "could not find expected ':'" in problem:
        hint = "check the indentation and that every key ends with ':'"
    elif "found character" in problem and "that cannot start any token" in problem:
        hint = "put the value in quotes"
    elif ("flow sequence" in context or "flow mapping" in context) and opened is not None:
        bracket = "[" if "sequence" in context else "{"
        closing = "]" if bracket == "[" else "}"
        hint = (f"the {bracket} opened on line {opened.line + 1}, column {opened.column + 1} "
                f"is not closed with {closing}, or an item needs quotes")
    elif "expected <block end>" in problem:
        hint = "check the indentation of this line and of the lines above it"
    return Problem(smap.file, line, column, problem, hint, source_line=text)


_VALUE_QUOTE = re.compile(r"""(?:^|[:\-\[{,])\s*(["'])""")


def _unclosed_quote(lines: list[str], first: int, last: int) -> tuple[int, int] | None:
    """The first line in first..last where a quoted value is opened but not closed."""
    for number in range(max(first, 1), min(last, len(lines)) + 1):
        line = lines[number - 1]
        match = _VALUE_QUOTE.search(line)
        if match is None or line.lstrip().startswith("#"):
            continue
        quote, i = match.group(1), match.end()
        while i < len(line):
            if quote == '"' and line[i] == "\\":
                i += 2
                continue
            if line[i] == quote:
                if quote == "'" and line.startswith("''", i):
                    i += 2
                    continue
                break
            i += 1
        else:
            return number, match.end()
    return None


def _construct(node: yaml.Node, path: tuple, smap: SourceMap, loader: _Loader,
               problems: list[Problem]) -> Any:
    smap.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(smap.file, key_node.start_mark.line + 1,
                                        key_node.start_mark.column + 1, "keys must be plain names"))
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":
                problems.append(Problem(smap.file, key_node.start_mark.line + 1,
                                        key_node.start_mark.column + 1,
                                        "merge keys (<<) are not allowed in rule files",
                                        "write the keys out in full"))
                continue
            key = key_node.value
            key_path = path + (key,)
            position = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in result:
                first = smap.keys[key_path]
                problems.append(Problem(
                    smap.file, *position, f"duplicate key '{key}'",
                    f"it is already defined on line {first[0]}; YAML would silently keep only the last one",
                    source_line=smap.line_text(position[0])))
                continue
            smap.keys[key_path] = position
            result[key] = _construct(value_node, key_path, smap, loader, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(child, path + (i,), smap, loader, problems)
                for i, child in enumerate(node.value)]
    # scalar
    if getattr(node, "explicit_tag", False):  # reported already: read the value as if untagged
        implicit = (node.style is None, node.style is not None)
        node.tag = loader.resolve(yaml.ScalarNode, node.value, implicit)
    if node.style in ("'", '"'):
        smap.quoted[path] = 1
    if node.tag == "tag:yaml.org,2002:str":
        smap.scalars[path] = (node.value, node.style, node.start_mark.index, node.end_mark.index,
                              node.start_mark.line + 1, node.start_mark.column + 1)
    if node.tag == "tag:yaml.org,2002:timestamp":
        return node.value  # keep dates as text: the schema decides what they mean
    value = loader.construct_object(node, deep=True)
    if node.style is None and not isinstance(value, str) and value is not None:
        smap.plain[path] = node.value
    return value


def yaml11_hint(smap: SourceMap, path: tuple, expected: str) -> str:
    """Hint for a plain scalar YAML read as a number/bool where a string was expected."""
    raw = smap.plain.get(tuple(path))
    if raw is None:
        return ""
    article = "" if expected == "true/false" else "a "
    return f'YAML read `{raw}` as {article}{expected}; put it in quotes: "{raw}"'


def _find_in_source(text: str, scalar: tuple, offset: int) -> tuple[int, int] | None:
    """Where the ``offset``-th character of a scalar's value was written, or None if unsure."""
    value, style, start, end, line, column = scalar
    target = max(0, min(offset, len(value)))
    source = text[start:end]
    i = 0
    if style in ("|", ">"):  # skip the header line (`|`, `>-`, a comment) to the first content line
        header = _LINE_BREAK.search(source)
        if header is None:
            return None
        i, line, column = header.end(), line + 1, 1
    elif style in ("'", '"'):
        i, column = 1, column + 1
    matched = 0
    last = None
    while i < len(source) and matched <= target:
        char = source[i]
        is_break = char in "\r\n\x85\u2028\u2029"
        if matched < len(value) and (value[matched] == char or (value[matched] == "\n" and is_break)):
            if matched == target:
                return line, column
            last = (line, column)
            matched += 1
        if is_break:
            if source.startswith("\r\n", i):
                i += 1
            line, column = line + 1, 1
        else:
            column += 1
        i += 1
    if matched == len(value) == target and last is not None:
        return last[0], last[1] + 1  # just after the value, e.g. "unexpected end"
    return None
