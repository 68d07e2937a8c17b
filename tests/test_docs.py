"""The docs cannot rot: every YAML snippet in README and docs/ is checked against the schemas,
and every condition in it compiles against the feature catalogue."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.config.catalogue import BUILTIN_FEATURES, CUSTOMER_COLUMNS, EVENT_COLUMNS, ORDER_COLUMNS, expression_type
from engine.config.expressions import compile_expression
from engine.config.rulefiles import load_yaml
from engine.config.schema import validate_document

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RULE_KEYS = {"features", "segments", "tiers", "tier_review", "campaigns", "points"}
CONDITION_KEYS = {"where", "becomes", "expr", "rank_by", "qualify", "retain"}


def snippets():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"```yaml\n(.*?)```", text, re.S):
            line = text[: match.start()].count("\n") + 2
            yield pytest.param(doc, line, match.group(1), id=f"{doc.name}:{line}")


SNIPPETS = list(snippets())


def test_docs_have_rule_snippets():
    assert len(SNIPPETS) >= 8


def _conditions(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CONDITION_KEYS and isinstance(value, str):
                yield path + (key,), value
            elif key in ("all", "any") and isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, str):
                        yield path + (key, i), item
                    else:
                        yield from _conditions(item, path + (key, i))
            else:
                yield from _conditions(value, path + (key,))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _conditions(item, path + (i,))


@pytest.mark.parametrize("doc, line, text", SNIPPETS)
def test_snippet_is_valid(tmp_path, doc, line, text):
    source = tmp_path / "snippet.yaml"
    source.write_text(text, encoding="utf-8")
    data, smap, problems = load_yaml(source, f"{doc.name}:{line}")
    assert not problems, problems
    if not isinstance(data, dict):
        pytest.skip("not a mapping")
    if set(data) <= RULE_KEYS | {"where"}:
        if "where" not in data:
            assert validate_document("rules", data, smap) == []
        names = {name: spec[0] for name, spec in BUILTIN_FEATURES.items()}
        names.update(CUSTOMER_COLUMNS)
        names.update({n: "number" for n in data.get("features", {})})
        event_names = {f"event.{c}": "number" for c in ("score", "amount")}
        for table in (ORDER_COLUMNS, EVENT_COLUMNS):   # columns usable in custom features' where:
            for column, kind in table.items():
                event_names.setdefault(column, expression_type(kind))
        event_names.update({f"order.{c}": expression_type(t) for c, t in ORDER_COLUMNS.items()})
        event_names.update({f"event.{c}": expression_type(t) for c, t in EVENT_COLUMNS.items() if c != "score"})
        for path, condition in _conditions(data):
            compile_expression(condition, {**names, **event_names})
    elif "customers" in data and "as_of" in data:       # a golden test file (docs/testing.md)
        from engine.app.golden import validate_golden_document
        assert validate_golden_document(data, smap) == []
    else:
        problems = [p for p in validate_document("loyalty", data, smap) if "missing required" not in p.message]
        assert problems == []


def test_every_promise_in_operations_names_a_test_that_exists():
    """docs/operations.md "What we promise and how it is tested": each row's tests are real."""
    section = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8").split("## What we promise", 1)[1]
    named = 0
    for row in (line for line in section.splitlines() if line.startswith("| ") and "::" in line):
        module = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?::\w+)`", row):
            if not ref.startswith("::"):
                module = ref.split("::")[0]
            assert module is not None, row
            name = ref.rsplit("::", 1)[1]
            assert f"def {name}(" in (ROOT / module).read_text(encoding="utf-8"), f"{module}::{name}"
            named += 1
    assert named >= 30


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """README "From Python": the front door does what the text says, on the tutorial workspace."""
    from engine import init_workspace

    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    init_workspace(tmp_path / "my-programme")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)      # noqa: S102 - our own documentation
    assert scope["preview"].total_offers > 0 and scope["result"].new_offers == scope["preview"].total_offers
    assert (tmp_path / "my-programme" / "state" / "loyalty.db").is_file()
