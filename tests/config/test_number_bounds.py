"""Numbers in rule files and loyalty.yaml: finite, and within the bounds the schemas document.

YAML reads `.nan` and `.inf` as floats, and jsonschema's `minimum`/`maximum` let NaN through;
these tests run the real `loyalty` command on the workspace `loyalty init` writes, with one
value changed, and check the `file:line:col: message (hint)` a marketer sees.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from engine.config.schema import MAX_DURATION_DAYS, duration_pattern, load_schema

AS_OF = "2026-12-25T10:00:00+08:00"
RULES = "rules/programme.yaml"
SETTINGS = "loyalty.yaml"
NAN_HINT = "(write an ordinary number, e.g. 20)"
DURATION_HINT = "(durations go up to 3650d (10 years), 521w or 87600h)"
SHARE_HINT = "(a share of customers goes from 0% to 100%)"
HUGE = "1" + "0" * 40


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def edit(workspace: Path, file: str, old: str | None, new: str, value: str) -> str:
    """Replace ``old`` by ``new`` in one file (append ``new`` when ``old`` is None); return the
    ``line:col`` where ``value``, the last occurrence inside ``new``, now starts."""
    path = workspace / file
    text = path.read_text(encoding="utf-8")
    if old is None:
        text = text.rstrip("\n") + "\n" + new + "\n"
    else:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    at = text.index(new) + new.rindex(value)
    return f"{text[:at].count(chr(10)) + 1}:{at - text.rfind(chr(10), 0, at)}"


# (file, old text, new text, the value the column points at, message with hint)
REFUSED = {
    "smtp port too big": (SETTINGS, "email: {send: file, path: outbox/email.jsonl}",
                          "email: {send: smtp, host: localhost, port: 70000, sender: rewards@example.com}", "70000",
                          "'port' is 70000; it must be at most 65,535"),
    "webhook retries": (SETTINGS, "sms:   {send: file, path: outbox/sms.jsonl}",
                        "sms:   {send: webhook, url: 'http://127.0.0.1:9/sms', retries: 1000}", "1000",
                        "'retries' is 1000; it must be at most 10"),
    "percent_off .nan": (RULES, "percent_off: 20", "percent_off: .nan", ".nan",
                         f"'percent_off' is .nan, which YAML reads as not a number {NAN_HINT}"),
    "percent_off .inf": (RULES, "percent_off: 20", "percent_off: .inf", ".inf",
                         f"'percent_off' is .inf, which YAML reads as infinity {NAN_HINT}"),
    "min_spend .inf": (RULES, "min_spend: 100", "min_spend: .inf", ".inf",
                       f"'min_spend' is .inf, which YAML reads as infinity {NAN_HINT}"),
    "amount_off -.inf": (RULES, "percent_off: 20", "amount_off: -.inf", "-.inf",
                         f"'amount_off' is -.inf, which YAML reads as infinity {NAN_HINT}"),
    "amount_off too big": (RULES, "percent_off: 20", "amount_off: 20000000000", "20000000000",
                           "'amount_off' is 20000000000; it must be at most 1,000,000,000"),
    "priority 1e40": (RULES, "priority: 50", "priority: 1.0e+40", "1.0e+40",
                      "'priority' is 1.0e+40; it must be at most 1,000,000"),
    "priority -10**40": (RULES, "priority: 50", f"priority: -{HUGE}", f"-{HUGE}",
                         f"'priority' is -{HUGE}; it must be at least -1,000,000"),
    "cooldown 999999999999d": (RULES, "cooldown: 30d", "cooldown: 999999999999d", "999999999999d",
                               f"'999999999999d' is longer than 3650 days {DURATION_HINT}"),
    "inactive_for 3651d": (RULES, "inactive_for: 60d", "inactive_for: 3651d", "3651d",
                           f"'3651d' is longer than 3650 days {DURATION_HINT}"),
    "within 87601h": (RULES, None, "features:\n  spend:\n    sum: amount\n    from: orders\n    within: 87601h",
                      "87601h", f"'87601h' is longer than 3650 days {DURATION_HINT}"),
    "campaign holdout 250%": (RULES, "cooldown: 30d", "cooldown: 30d\n    holdout: 250%", "250%",
                              f"'250%' is more than 100% {SHARE_HINT}"),
    "points 1e300": (RULES, "floor(monetary_365d / 100)", "1.0e+300", "1.0e+300",
                     "'amount' is 1.0e+300; it must be at most 1,000,000,000"),
    "points .nan": (RULES, "floor(monetary_365d / 100)", ".nan", ".nan",
                    f"'amount' is .nan, which YAML reads as not a number {NAN_HINT}"),
    "variant weight .nan": (RULES, "cooldown: 30d", "cooldown: 30d\n    variants: [{name: A, weight: .nan}]",
                            ".nan", f"'weight' is .nan, which YAML reads as not a number {NAN_HINT}"),
    "max_cost .inf": (RULES, "cooldown: 30d", "cooldown: 30d\n    budget: {max_cost: .inf}", ".inf",
                      f"'max_cost' is .inf, which YAML reads as infinity {NAN_HINT}"),
    "feature expr .nan": (RULES, None, "features:\n  constant:\n    expr: .nan", ".nan",
                          f"'expr' is .nan, which YAML reads as not a number {NAN_HINT}"),
    "holdout 250%": (SETTINGS, "holdout: 5%", "holdout: 250%", "250%",
                     f"'250%' is more than 100% {SHARE_HINT}"),
    "per 999999999999d": (SETTINGS, "per: 7d", "per: 999999999999d", "999999999999d",
                          f"'999999999999d' is longer than 3650 days {DURATION_HINT}"),
    "max_messages 10**40": (SETTINGS, "max_messages: 2", f"max_messages: {HUGE}", HUGE,
                            f"'max_messages' is {HUGE}; it must be at most 1,000"),
    "point_value .nan": (SETTINGS, "holdout: 5%", "holdout: 5%\ncosts: {point_value: .nan}", ".nan",
                         f"'point_value' is .nan, which YAML reads as not a number {NAN_HINT}"),
    "shipping .inf": (SETTINGS, "holdout: 5%", "holdout: 5%\ncosts: {shipping: .inf}", ".inf",
                      f"'shipping' is .inf, which YAML reads as infinity {NAN_HINT}"),
}


@pytest.mark.parametrize("file,old,new,value,message", REFUSED.values(), ids=REFUSED.keys())
def test_unusable_number_is_reported_at_file_line_col(workspace, file, old, new, value, message):
    where = edit(workspace, file, old, new, value)
    result = invoke("validate", str(workspace))
    assert result.exit_code == 1, result.output
    assert f"{file}:{where}: {message}" in result.output.splitlines(), result.output


@pytest.mark.parametrize("case", ["percent_off .nan", "holdout 250%", "cooldown 999999999999d",
                                  "points 1e300", "priority 1e40"])
def test_run_with_an_unusable_number_records_and_sends_nothing(workspace, case):
    file, old, new, value, message = REFUSED[case]
    where = edit(workspace, file, old, new, value)
    result = invoke("run", str(workspace), "--as-of", AS_OF)
    assert result.exit_code == 1
    assert f"{file}:{where}: {message}" in result.output.splitlines()
    assert not (workspace / "state" / "loyalty.db").exists()
    assert not (workspace / "outbox").exists()


ACCEPTED = {
    "cooldown 3650d": (RULES, "cooldown: 30d", "cooldown: 3650d"),
    "cooldown 521w": (RULES, "cooldown: 30d", "cooldown: 521w"),
    "per 87600h": (SETTINGS, "per: 7d", "per: 87600h"),
    "holdout 100%": (SETTINGS, "holdout: 5%", "holdout: 100%"),
    "campaign holdout 0.5%": (RULES, "cooldown: 30d", "cooldown: 30d\n    holdout: 0.5%"),
    "percent_off 100": (RULES, "percent_off: 20", "percent_off: 100"),
    "priority 1000000": (RULES, "priority: 50", "priority: 1000000"),
    "priority -1000000": (RULES, "priority: 50", "priority: -1000000"),
    "points 1000000000": (RULES, "floor(monetary_365d / 100)", "1000000000"),
    "max_cost 1e12": (RULES, "cooldown: 30d", "cooldown: 30d\n    budget: {max_cost: 1000000000000}"),
}


@pytest.mark.parametrize("file,old,new", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_numbers_at_their_bounds_are_accepted(workspace, file, old, new):
    edit(workspace, file, old, new, new)
    result = invoke("validate", str(workspace))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("text,valid", [
    ("0d", True), ("3650d", True), ("3651d", False), ("521w", True), ("522w", False),
    ("87600h", True), ("87601h", False), ("999999999999d", False), ("30d", True), ("12h", True),
])
def test_duration_pattern_stops_at_ten_years(text, valid):
    assert bool(re.match(duration_pattern(), text)) is valid


@pytest.mark.parametrize("text,valid", [
    ("0%", True), ("5%", True), ("99.9%", True), ("100%", True), ("100.0%", True),
    ("100.5%", False), ("250%", False), ("1000%", False), ("-5%", False),
])
def test_percentage_pattern_goes_from_0_to_100(text, valid):
    pattern = load_schema("rules")["$defs"]["percentage"]["pattern"]
    assert bool(re.match(pattern, text)) is valid
    assert load_schema("loyalty")["properties"]["holdout"]["pattern"] == pattern


def test_both_schemas_share_one_duration_pattern():
    per = load_schema("loyalty")["properties"]["contact_policy"]["properties"]["per"]
    assert per["pattern"] == duration_pattern()
    assert MAX_DURATION_DAYS == 3650


def _numbers(schema, where: str):
    """(where, property schema) of every number or integer property, at any depth."""
    if isinstance(schema, list):
        for item in schema:
            yield from _numbers(item, where)
        return
    if not isinstance(schema, dict):
        return
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "number" in kinds or "integer" in kinds:
        yield where, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _numbers(sub, f"{where}.{key}")
    for keyword in ("items", "additionalProperties", "anyOf"):
        if keyword in schema:
            yield from _numbers(schema[keyword], f"{where}/{keyword}")


def _bounded_numbers():
    rules = load_schema("rules")
    yield from _numbers(rules["$defs"], "rules")
    settings = load_schema("loyalty")["properties"]
    for section in ("holdout", "contact_policy", "costs", "engine", "coupons", "channels"):
        yield from _numbers(settings[section], f"loyalty.{section}")


@pytest.mark.parametrize("where,schema", list(_bounded_numbers()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_number_is_bounded_and_its_description_says_so(where, schema):
    assert "maximum" in schema and ("minimum" in schema or "exclusiveMinimum" in schema), where
    words = schema["description"]
    for bound in (schema["maximum"], schema.get("minimum", schema.get("exclusiveMinimum"))):
        assert f"{bound:,}" in words or str(bound) in words, (where, bound, words)


@pytest.mark.parametrize("as_of,message", [
    ("9999-12-31", "error: --as-of '9999-12-31' is out of range (use a date from 1980-01-01 to 2199-12-31)"),
    ("2200-01-01", "error: --as-of '2200-01-01' is out of range (use a date from 1980-01-01 to 2199-12-31)"),
    ("1899-12-31", "error: --as-of '1899-12-31' is out of range (use a date from 1980-01-01 to 2199-12-31)"),
    ("0001-01-01T00:00:00+00:00",
     "error: --as-of '0001-01-01T00:00:00+00:00' is out of range (use a date from 1980-01-01 to 2199-12-31)"),
])
@pytest.mark.parametrize("command", ["preview", "run"])
def test_as_of_out_of_range_is_a_clear_error(workspace, command, as_of, message):
    result = invoke(command, str(workspace), "--as-of", as_of)
    assert result.exit_code == 1
    assert message in result.output.splitlines()
    assert not (workspace / "outbox").exists()
    assert not (workspace / "state" / "loyalty.db").exists() or _no_runs(workspace)


def _no_runs(workspace: Path) -> bool:
    with sqlite3.connect(workspace / "state" / "loyalty.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0] == 0 and \
            db.execute("select count(*) from offers").fetchone()[0] == 0


@pytest.mark.parametrize("as_of", ["1980-01-01T12:00:00+08:00", "2199-12-31T12:00:00+08:00"])
def test_as_of_at_the_ends_of_the_range_runs(workspace, as_of):
    result = invoke("preview", str(workspace), "--as-of", as_of, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["campaigns"]
