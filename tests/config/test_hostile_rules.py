"""Hostile or surprising rule files (issue 18): YAML tags, `#` inside an expression, full-width
letters in names, and rule files that are links to files outside the workspace.

Each case is reproduced on the `loyalty init --example` workspace with the real command, and
checks what a marketer sees: the exit code, the file:line:col line, and that no file changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from engine.config.expressions import compile_expression
from engine.errors import ExpressionError

NEW_SEGMENT = "where: days_since_signup <= 30"      # one line of rules/segments.yaml
SEGMENTS = "rules/segments.yaml"
TAG_HINT = "(remove the tag; write the value itself)"


@pytest.fixture()
def workspace(example_copy) -> Path:
    return example_copy


def validate(root: Path):
    """`loyalty validate ROOT`, failing the test on a traceback."""
    return CliRunner().invoke(main, ["validate", str(root)], catch_exceptions=False)


def replace_line(root: Path, file: str, old: str, new: str) -> tuple[int, str]:
    """Replace the first ``old`` in ``file``; return the line number and text of the new line."""
    path = root / file
    text = path.read_text(encoding="utf-8")
    assert old in text
    text = text.replace(old, new, 1)
    path.write_text(text, encoding="utf-8")
    number = text[: text.index(new)].count("\n") + 1
    return number, text.splitlines()[number - 1]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_example_validates(workspace):
    assert validate(workspace).exit_code == 0


# --------------------------------------------------------------------------- YAML tags

@pytest.mark.parametrize("value, tag", [
    ("!!python/name:os.system days_since_signup <= 30", "!!python/name:os.system"),  # was a traceback
    ("!custom days_since_signup <= 30", "!custom"),                                  # was a traceback
    ("!!float abc", "!!float"),                                                      # was a traceback
    ("!custom {all: [days_since_signup <= 30]}", "!custom"),                         # was dropped silently
    ("!!str days_since_signup <= 30", "!!str"),                                      # was dropped silently
])
def test_a_yaml_tag_in_a_rule_file_is_an_error_at_the_tag(workspace, value, tag):
    line, text = replace_line(workspace, SEGMENTS, NEW_SEGMENT, "where: " + value)
    before = snapshot(workspace)
    result = validate(workspace)
    assert result.exit_code == 1
    column = text.index("!") + 1
    assert f"{SEGMENTS}:{line}:{column}: the YAML tag `{tag}` is not allowed {TAG_HINT}" in result.output
    assert "Traceback" not in result.output
    assert snapshot(workspace) == before


def test_every_tag_of_loyalty_yaml_is_reported(workspace):
    line, _ = replace_line(workspace, "loyalty.yaml", "  max_messages: 2", "  max_messages: !!int 2")
    replace_line(workspace, "loyalty.yaml", "  per: 7d", "  per: !days 7d")
    result = validate(workspace)
    assert result.exit_code == 1
    assert f"loyalty.yaml:{line}:17: the YAML tag `!!int` is not allowed {TAG_HINT}" in result.output
    assert f"loyalty.yaml:{line + 1}:8: the YAML tag `!days` is not allowed {TAG_HINT}" in result.output


# --------------------------------------------------------------------------- `#` in an expression

COMMENT_MESSAGE = "`#` is not allowed here: the rest of the expression would be ignored"


def test_a_hash_inside_a_quoted_expression_is_an_error_at_the_hash(workspace):
    line, text = replace_line(workspace, SEGMENTS, NEW_SEGMENT,
                              "where: 'days_since_signup <= 30 # and orders_total > 5'")
    result = validate(workspace)
    assert result.exit_code == 1
    assert f"{SEGMENTS}:{line}:{text.index('#') + 1}: {COMMENT_MESSAGE}" in result.output


def test_a_hash_inside_a_folded_expression_is_an_error_at_its_line(workspace):
    line, _ = replace_line(workspace, SEGMENTS, NEW_SEGMENT,
                           "where: >\n      days_since_signup <= 30\n      # and orders_total > 5\n"
                           "      and orders_total >= 0")
    result = validate(workspace)
    assert result.exit_code == 1
    assert f"{SEGMENTS}:{line + 2}:7: {COMMENT_MESSAGE}" in result.output


def test_a_hash_inside_a_text_value_is_fine(workspace):
    replace_line(workspace, SEGMENTS, NEW_SEGMENT,
                 "where: 'days_since_signup <= 30 and city != \"#1 store\"'")
    result = validate(workspace)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("text, offset", [
    ("x >= 5 # note", 7),
    ("x >= 5 # it's a note", 7),
    ("x >= 5 and\n  # a note\n  x < 9", 13),
    ("  x >= 5 #", 9),
])
def test_a_hash_outside_quotes_is_refused(text, offset):
    with pytest.raises(ExpressionError) as error:
        compile_expression(text, {"x": "number"})
    assert (error.value.message, error.value.offset) == (COMMENT_MESSAGE, offset)


@pytest.mark.parametrize("text", ['city == "#1 store"', "city in ['#1', '#2']", 'city != "a # b"'])
def test_a_hash_inside_quotes_stays_text(text):
    assert compile_expression(text, {"city": "string"}).type == "bool"


# --------------------------------------------------------------------------- full-width letters

def test_a_full_width_feature_name_is_an_error_at_its_position(workspace):
    line, text = replace_line(workspace, SEGMENTS, NEW_SEGMENT, "where: ｄａｙｓ_since_signup <= 30")
    result = validate(workspace)
    assert result.exit_code == 1
    assert (f"{SEGMENTS}:{line}:{text.index('ｄ') + 1}: `ｄａｙｓ_since_signup` is typed with full-width or "
            "look-alike characters (type it with ASCII letters: `days_since_signup`)") in result.output


@pytest.mark.parametrize("text, offset, culprit", [
    ("ｍｏｎｅｔａｒｙ_365d >= 5000", 0, "ｍｏｎｅｔａｒｙ_365d"),   # Python would read it as monetary_365d
    ("monetary_365d >= ５０００", 17, "５０００"),
    ("monetary_365d ＞ 5000", 14, "＞"),
    ("event.ａｍｏｕｎｔ > 1", 6, "ａｍｏｕｎｔ"),
    ("ﬁrst_order > 1", 0, "ﬁrst_order"),                       # a ligature
])
def test_look_alike_characters_are_refused(text, offset, culprit):
    names = {"monetary_365d": "number", "event.amount": "number", "first_order": "number"}
    with pytest.raises(ExpressionError) as error:
        compile_expression(text, names)
    assert error.value.offset == offset
    assert error.value.message == f"`{culprit}` is typed with full-width or look-alike characters"
    assert error.value.hint.startswith("type it with ASCII letters")


@pytest.mark.parametrize("text", ['城市 == "上海"', 'city == "ｍｏｎ"'])
def test_other_scripts_and_full_width_text_in_quotes_stay_fine(text):
    assert compile_expression(text, {"城市": "string", "city": "string"}).type == "bool"


def test_a_full_width_segment_name_is_refused_by_the_schema(workspace):
    """Names written as YAML keys never reach Python's parser: the schema's ASCII pattern refuses them."""
    line, _ = replace_line(workspace, SEGMENTS, "  new:\n", "  ｎｅｗ:\n")
    result = validate(workspace)
    assert result.exit_code == 1
    assert f"{SEGMENTS}:{line}:3: 'ｎｅｗ' is not a valid name" in result.output


# --------------------------------------------------------------------------- links

SECRET = "root:x:0:0:SECRET-LINE:/root:/bin/bash\nsegments: {a: {where: \"SECRET == 1\"}}\n"


def test_a_rule_file_linking_outside_the_workspace_is_refused_unread(workspace, tmp_path):
    outside = tmp_path / "elsewhere" / "secret.yaml"
    outside.parent.mkdir()
    outside.write_text(SECRET, encoding="utf-8")
    (workspace / "rules" / "zz.yaml").symlink_to(outside)
    result = validate(workspace)
    assert result.exit_code == 1
    assert ("rules/zz.yaml:1:1: this file is a link to a file outside the workspace; it was not read "
            "(copy the file into rules/ instead of linking to it)") in result.output
    assert "SECRET" not in result.output
    assert outside.read_text(encoding="utf-8") == SECRET


def test_a_rule_file_linking_inside_the_workspace_is_allowed(workspace):
    shared = workspace / "shared"
    shared.mkdir()
    (workspace / "rules" / "tiers.yaml").rename(shared / "tiers.yaml")
    (workspace / "rules" / "tiers.yaml").symlink_to(Path("..") / "shared" / "tiers.yaml")
    result = validate(workspace)
    assert result.exit_code == 0, result.output
