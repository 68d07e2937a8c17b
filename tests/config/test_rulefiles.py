"""The YAML loader: source map, refused aliases and merge keys, duplicate keys, depth and size caps."""

from __future__ import annotations

import time

import pytest

from engine.config import rulefiles
from engine.config.rulefiles import MAX_DEPTH, load_yaml, yaml11_hint


def load(tmp_path, text: str | bytes, name: str = "rules/x.yaml"):
    path = tmp_path / "x.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return load_yaml(path, name)


def test_data_and_source_map(tmp_path):
    data, smap, problems = load(tmp_path, "segments:\n  vip:\n    where: x > 1\n    tags: [a, b]\n")
    assert problems == []
    assert data == {"segments": {"vip": {"where": "x > 1", "tags": ["a", "b"]}}}
    assert smap.key_position(("segments", "vip")) == (2, 3)
    assert smap.value_position(("segments", "vip", "where")) == (3, 12)
    assert smap.value_position(("segments", "vip", "tags", 1)) == (4, 15)
    # unknown paths fall back to the nearest known parent
    assert smap.value_position(("segments", "vip", "nope", 3)) == (3, 5)
    assert smap.line_text(3) == "    where: x > 1"
    assert smap.line_text(99) == ""


def test_empty_file_is_an_empty_mapping(tmp_path):
    assert load(tmp_path, "# only a comment\n")[0] == {}


def test_byte_order_mark_is_accepted(tmp_path):
    data, _, problems = load(tmp_path, "\ufeffa: 1\n".encode("utf-8"))
    assert problems == [] and data == {"a": 1}


def test_duplicate_key_keeps_the_first_and_reports_the_second(tmp_path):
    data, _, problems = load(tmp_path, "a: 1\nb: 2\na: 3\n")
    assert data == {"a": 1, "b": 2}
    [problem] = problems
    assert (problem.file, problem.line, problem.column) == ("rules/x.yaml", 3, 1)
    assert problem.message == "duplicate key 'a'"
    assert "line 1" in problem.hint


def test_merge_key_refused(tmp_path):
    data, _, problems = load(tmp_path, "a:\n  <<: {x: 1}\n  y: 2\n")
    assert data == {"a": {"y": 2}}
    assert problems[0].message.startswith("merge keys (<<) are not allowed")
    assert (problems[0].line, problems[0].column) == (2, 3)


def test_complex_key_refused(tmp_path):
    _, _, problems = load(tmp_path, "? [a, b]\n: 1\n")
    assert problems[0].message == "keys must be plain names"


def test_alias_refused(tmp_path):
    data, _, problems = load(tmp_path, "a: &x 1\nb: *x\n")
    assert data is None
    assert (problems[0].line, problems[0].column) == (2, 4)
    assert "aliases" in problems[0].message


def test_anchor_alone_is_fine(tmp_path):
    data, _, problems = load(tmp_path, "a: &x 1\n")
    assert problems == [] and data == {"a": 1}


def test_alias_bomb_fails_fast(tmp_path):
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    started = time.perf_counter()
    data, _, problems = load(tmp_path, "\n".join(lines) + "\n")
    assert time.perf_counter() - started < 1.0
    assert data is None and "aliases" in problems[0].message


def test_depth_cap(tmp_path):
    ok = "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    assert load(tmp_path, ok)[2] == []
    too_deep = "a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n"
    data, _, problems = load(tmp_path, too_deep)
    assert data is None and "nesting deeper than" in problems[0].message


@pytest.mark.parametrize("levels", [1_000, 100_000])
def test_very_deep_nesting_is_a_clear_error(tmp_path, levels):
    data, _, problems = load(tmp_path, "[" * levels + "]" * levels + "\n")
    assert data is None
    assert "nesting deeper than" in problems[0].message
    assert (problems[0].line, problems[0].column) == (1, MAX_DEPTH + 1)


def test_recursion_error_is_reported(tmp_path, monkeypatch):
    def boom(self):
        raise RecursionError
    monkeypatch.setattr(rulefiles._Loader, "get_single_node", boom)
    data, _, problems = load(tmp_path, "a: 1\n")
    assert data is None and problems[0].message == "YAML nesting is too deep"


def test_file_size_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(rulefiles, "MAX_FILE_BYTES", 100)
    data, _, problems = load(tmp_path, "a: " + "x" * 200 + "\n")
    assert data is None and "larger than" in problems[0].message


def test_missing_file(tmp_path):
    data, _, problems = load_yaml(tmp_path / "nope.yaml", "rules/nope.yaml")
    assert data is None and problems[0].message.startswith("cannot read file")


def test_not_utf8_points_at_the_byte(tmp_path):
    data, _, problems = load(tmp_path, "a: 1\nb: gr\xfcn\n".encode("latin-1"))
    assert data is None
    assert (problems[0].line, problems[0].column) == (2, 6)
    assert "0xfc" in problems[0].message
    assert problems[0].source_line == "b: gr\ufffdn"


def test_dates_stay_text_and_yaml11_numbers_are_remembered(tmp_path):
    data, smap, _ = load(tmp_path, "d: 2024-12-25\nt: 9:30\nq: '9:30'\nb: off\n")
    assert data == {"d": "2024-12-25", "t": 570, "q": "9:30", "b": False}
    assert yaml11_hint(smap, ("t",), "number") == 'YAML read `9:30` as a number; put it in quotes: "9:30"'
    assert yaml11_hint(smap, ("b",), "true/false") == 'YAML read `off` as true/false; put it in quotes: "off"'
    assert yaml11_hint(smap, ("q",), "number") == ""


@pytest.mark.parametrize("label, text, position", [
    ("plain", "w: a >= 1 and bad > 2\n", (1, 15)),
    ("double-quoted", 'w: "a >= 1 and bad > 2"\n', (1, 16)),
    ("double-quoted-escapes", 'w: "x == \\"q\\" and bad > 2"\n', (1, 20)),
    ("single-quoted-escapes", "w: 'x == ''q'' and bad > 2'\n", (1, 20)),
    ("plain-multiline", "w: a >= 1 and\n     bad > 2\n", (2, 6)),
    ("double-quoted-multiline", 'w: "a >= 1 and\n    bad > 2"\n', (2, 5)),
    ("literal", "w: |\n  a >= 1 and\n  bad > 2\n", (3, 3)),
    ("literal-with-comment", "w: |  # a comment\n  a >= 1 and\n  bad > 2\n", (3, 3)),
    ("folded-strip", "w: >-\n    a >= 1 and\n    bad > 2\n", (3, 5)),
    ("folded-blank-line", "w: >\n  a >= 1 and\n\n  bad > 2\n", (4, 3)),
    ("crlf", "w: |\r\n  a >= 1 and\r\n  bad > 2\r\n", (3, 3)),
    ("in-flow-list", "w: [ok, 'a >= 1 and bad > 2']\n", (1, 21)),
    ("unicode", "w: 城市 == 1 and bad > 2\n", (1, 16)),  # columns count characters
])
def test_position_inside_a_value(tmp_path, label, text, position):
    data, smap, problems = load(tmp_path, text)
    assert problems == []
    value = data["w"] if label != "in-flow-list" else data["w"][1]
    path = ("w",) if label != "in-flow-list" else ("w", 1)
    offset = value.index("bad")
    problem = smap.problem(path, "unknown feature 'bad'", offset=offset)
    assert (problem.line, problem.column) == position, value
    assert smap.line_text(problem.line)[problem.column - 1:].startswith("bad")


def test_position_at_the_end_of_a_value(tmp_path):
    _, smap, _ = load(tmp_path, 'w: "a >="\n')
    problem = smap.problem(("w",), "unexpected end", offset=4)
    assert (problem.line, problem.column) == (1, 9)  # just after the last character, before the quote


def test_position_of_a_key(tmp_path):
    _, smap, _ = load(tmp_path, "campaigns:\n  c:\n    cooldwn: 1d\n")
    problem = smap.problem(("campaigns", "c", "cooldwn"), "unknown key", at_key=True)
    assert (problem.line, problem.column) == (3, 5)
    assert problem.source_line == "    cooldwn: 1d"


@pytest.mark.parametrize("text, position, words, hint", [
    ("a: [1, 2\nb: 3\n", (2, 2), "expected ',' or ']'", "line 1, column 4"),
    ("a: {x: 1\nb: 3\n", (2, 2), "expected ',' or '}'", "line 1, column 4"),
    ('a: "open\nb: 3\nc: "x"\n', (1, 4), "never closed", 'closing "'),
    ("a: b: c\n", (1, 5), "mapping values are not allowed", "quotes"),
    ("a:\n\tb: 1\n", (2, 1), "tab character in indentation", "spaces"),
    ("a: @x\n", (1, 4), "cannot start any token", "quotes"),
    ("a:\n  b: 1\n c: 2\n", (3, 2), "expected <block end>", "indentation"),
])
def test_yaml_syntax_errors(tmp_path, text, position, words, hint):
    data, _, problems = load(tmp_path, text)
    assert data is None
    [problem] = problems
    assert (problem.line, problem.column) == position, str(problem)
    assert words in problem.message
    assert hint in problem.hint
