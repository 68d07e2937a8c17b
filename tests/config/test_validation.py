"""Validation of whole workspaces: every broken workspace is the scaffold with one file changed.

Each case names the exact file, line and column the marketer is sent to, and the words the
message (and hint) must contain. The table is the specification of `loyalty validate`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from engine.app.scaffold import init_workspace
from engine.app.validation import load_workspace, validate_workspace
from engine.errors import RuleError

RULES = "rules/programme.yaml"
SETTINGS = "loyalty.yaml"

SEGMENT_WHERE = "where: monetary_365d >= 5000 and orders_365d >= 3"   # rules/programme.yaml line 7
AT_RISK_ITEM = "        - orders_365d >= 1"                            # line 13
WINBACK_WHEN = "when: {inactive_for: 60d}"                             # line 25
VIP_REWARD = "reward: {points: {amount: floor(monetary_365d / 100)}}"  # line 36


def alias_bomb() -> str:
    """Billion laughs: 9 levels of 9 aliases, 387 million leaves once expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def block_nesting(levels: int) -> str:
    return "".join("  " * i + f"k{i}:\n" for i in range(levels)) + "  " * levels + "v\n"


# (id, {file: change}, (file, line, column, message words, hint words))
# change: (old, new) replaces the first occurrence in the scaffold's file; str/bytes replace
# the whole file; None deletes it.
CASES = [
    # --- YAML itself -------------------------------------------------------------------------
    ("yaml-unclosed-bracket", {RULES: ("name: 沉睡客唤醒", "name: [沉睡客唤醒")},
     (RULES, 23, 12, ["expected ',' or ']'"], ["line 22, column 11", "not closed"])),
    ("yaml-unclosed-quote", {RULES: ("name: 沉睡客唤醒", 'name: "沉睡客唤醒')},
     (RULES, 22, 11, ["quoted text is never closed"], ['closing "'])),
    ("yaml-colon-in-value", {RULES: ("name: 沉睡客唤醒", "name: 唤醒: 第二波")},
     (RULES, 22, 13, ["mapping values are not allowed"], ["quotes"])),
    ("yaml-tab-indentation", {RULES: ("    name: 沉睡客唤醒", "\tname: 沉睡客唤醒")},
     (RULES, 22, 1, ["tab character in indentation"], ["spaces"])),
    ("yaml-duplicate-key", {RULES: ("  at_risk:\n", "  high_value:\n    where: true\n  at_risk:\n")},
     (RULES, 8, 3, ["duplicate key 'high_value'"], ["line 5"])),
    ("yaml-merge-key", {RULES: ("  at_risk:\n", "  <<: {x: {where: true}}\n  at_risk:\n")},
     (RULES, 8, 3, ["merge keys (<<) are not allowed"], ["in full"])),
    ("yaml-alias-bomb", {RULES: alias_bomb()},
     (RULES, 2, 10, ["aliases", "not allowed"], ["in full"])),
    ("yaml-deep-flow-1000", {RULES: "a: " + "[" * 1000 + "]" * 1000 + "\n"},
     (RULES, 1, 67, ["nesting deeper than 64 levels"], ["flatten"])),
    ("yaml-deep-block-1000", {RULES: block_nesting(1000)},
     (RULES, 64, 127, ["nesting deeper than 64 levels"], ["flatten"])),
    ("yaml-not-utf8", {RULES: "segments:\n  x:\n    description: caf\xe9\n".encode("latin-1")},
     (RULES, 3, 21, ["not valid UTF-8", "0xe9"], ["UTF-8"])),
    ("file-is-a-list", {RULES: "- segments\n- campaigns\n"},
     (RULES, 1, 1, ["must be a mapping"], ["campaigns:"])),
    ("file-is-a-scalar", {RULES: "hello\n"},
     (RULES, 1, 1, ["must be a mapping"], [])),

    # --- schema: keys and types ----------------------------------------------------------------
    ("unknown-top-level-key", {RULES: ("segments:\n", "segment:\n")},
     (RULES, 4, 1, ["unknown key 'segment'"], ["did you mean 'segments'"])),
    ("unknown-campaign-key", {RULES: ("    cooldown: 30d", "    cooldwn: 30d")},
     (RULES, 30, 5, ["unknown key 'cooldwn'"], ["did you mean 'cooldown'"])),
    ("unknown-settings-key", {SETTINGS: ("holdout: 5%", "holdot: 5%")},
     (SETTINGS, 20, 1, ["unknown key 'holdot'"], ["did you mean 'holdout'"])),
    ("priority-not-a-number", {RULES: ("priority: 50", "priority: high")},
     (RULES, 29, 15, ["'priority' should be a whole number", "not text"], [])),
    ("template-yaml-number", {RULES: ("template: winback", "template: 2024")},
     (RULES, 28, 15, ["'template' should be text", "not a number"], ["put it in quotes", '"2024"'])),
    ("template-yaml-octal", {RULES: ("template: winback", "template: 0750")},
     (RULES, 28, 15, ["'template' should be text"], ["YAML read `0750`", "put it in quotes"])),
    ("name-yaml-no", {RULES: ("name: 沉睡客唤醒", "name: no")},
     (RULES, 22, 11, ["'name' should be text", "not true/false"], ["`no`", "put it in quotes"])),
    ("name-yaml-1.10", {RULES: ("name: 沉睡客唤醒", "name: 1.10")},
     (RULES, 22, 11, ["'name' should be text"], ["`1.10`", "put it in quotes"])),
    ("name-yaml-sexagesimal", {RULES: ("name: 沉睡客唤醒", "name: 9:30")},
     (RULES, 22, 11, ["'name' should be text"], ["`9:30`", "put it in quotes"])),
    ("quiet-hours-yaml-number", {SETTINGS: ('quiet_hours: "21:00-09:00"', "quiet_hours: 21:00")},
     (SETTINGS, 18, 16, ["'quiet_hours' should be text"], ['"21:00-09:00"', "in quotes"])),
    ("holdout-number", {SETTINGS: ("holdout: 5%", "holdout: 5")},
     (SETTINGS, 20, 10, ["'holdout' should be text"], ["percentages like 10%"])),
    ("cooldown-number", {RULES: ("cooldown: 30d", "cooldown: 30")},
     (RULES, 30, 15, ["'cooldown' should be text"], ["30d"])),
    ("bad-duration", {RULES: ("cooldown: 30d", "cooldown: 30 days")},
     (RULES, 30, 15, ["'30 days' is not a duration"], ["30d (days)"])),
    ("bad-percentage", {RULES: ("    cooldown: 30d\n", "    cooldown: 30d\n    holdout: ten%\n")},
     (RULES, 31, 14, ["'ten%' is not a percentage"], ["10%"])),
    ("exclude-not-a-list", {RULES: ("exclude: [high_value]", "exclude: high_value")},
     (RULES, 24, 14, ["'exclude' should be a list"], ["exclude: [high_value]"])),
    ("template-path", {RULES: ("template: winback", "template: ../winback")},
     (RULES, 28, 15, ["template '../winback' must be a name, not a path"], ["templates/NAME.CHANNEL.LOCALE.j2"])),
    ("variant-template-path",
     {RULES: ("    cooldown: 30d\n", "    cooldown: 30d\n    variants:\n      - {name: A, weight: 1, template: ../../x}\n")},
     (RULES, 32, 40, ["must be a name, not a path"], [])),
    ("missing-required-where", {RULES: ("  gold:   {where: monetary_365d >= 5000}", "  gold:   {benefits: [x]}")},
     (RULES, 16, 3, ["tier 'gold' needs where: (a computed tier) or qualify: (a stored tier)"], ["qualify:"])),
    ("invalid-segment-name", {RULES: ("  at_risk:\n", "  At-Risk:\n")},
     (RULES, 8, 3, ["'At-Risk' is not a valid name"], ["lower-case"])),
    ("unknown-version", {RULES: ("segments:\n", "version: 2\nsegments:\n")},
     (RULES, 4, 10, ["'version' must be 1"], [])),
    ("unknown-sender", {SETTINGS: ("sms:   {send: file", "sms:   {send: fax")},
     (SETTINGS, 23, 17, ["'fax' is not allowed for 'send'"], ["file", "webhook", "smtp"])),

    # --- conditions -----------------------------------------------------------------------------
    ("condition-is-a-number", {RULES: ("  gold:   {where: monetary_365d >= 5000}", "  gold:   {where: 5}")},
     (RULES, 16, 19, ["'5' is not a condition"], ["orders_365d >= 6"])),
    ("condition-is-empty", {RULES: ("  gold:   {where: monetary_365d >= 5000}", "  gold:   {where: }")},
     (RULES, 16, 18, ["'where' is empty"], [])),
    ("condition-unknown-key-in-list", {RULES: ("      all:\n", "      any:\n        - alll: [true]\n")},
     (RULES, 12, 11, ["unknown key 'alll' in a condition"], ["did you mean 'all'"])),
    ("condition-extra-key-beside-any", {RULES: (AT_RISK_ITEM, "        - any: [true]\n          foo: 1")},
     (RULES, 14, 11, ["unknown key 'foo' in a condition"], ["all:, any: or not:"])),

    # --- expressions: names, types, syntax, safety; columns point inside the expression --------
    ("unknown-feature", {RULES: (SEGMENT_WHERE, "where: monetary_365d >= 5000 and order_365d >= 3")},
     (RULES, 7, 38, ["unknown feature 'order_365d'"], ["did you mean `orders_365d`"])),
    ("unknown-feature-double-quoted", {RULES: (SEGMENT_WHERE, 'where: "monetary_365d >= 5000 and order_365d >= 3"')},
     (RULES, 7, 39, ["unknown feature 'order_365d'"], ["orders_365d"])),
    ("unknown-feature-after-escapes", {RULES: (SEGMENT_WHERE, r'where: "city == \"x\" and order_365d >= 3"')},
     (RULES, 7, 31, ["unknown feature 'order_365d'"], ["orders_365d"])),
    ("unknown-feature-single-quoted", {RULES: (SEGMENT_WHERE, "where: 'city == ''x'' and order_365d >= 3'")},
     (RULES, 7, 31, ["unknown feature 'order_365d'"], ["orders_365d"])),
    ("unknown-feature-folded-block",
     {RULES: (SEGMENT_WHERE, "where: >-\n      monetary_365d >= 5000 and\n      order_365d >= 3")},
     (RULES, 9, 7, ["unknown feature 'order_365d'"], ["orders_365d"])),
    ("unknown-feature-literal-block",
     {RULES: (SEGMENT_WHERE, "where: |\n      monetary_365d >= 5000 and\n\n      order_365d >= 3")},
     (RULES, 10, 7, ["unknown feature 'order_365d'"], ["orders_365d"])),
    ("unknown-feature-plain-multiline",
     {RULES: (SEGMENT_WHERE, "where: monetary_365d >= 5000 and\n        order_365d >= 3")},
     (RULES, 8, 9, ["unknown feature 'order_365d'"], ["orders_365d"])),
    ("unknown-feature-in-all-list", {RULES: (AT_RISK_ITEM, "        - order_365d >= 1")},
     (RULES, 13, 11, ["unknown feature 'order_365d'"], ["orders_365d"])),
    ("string-compared-with-number", {RULES: (AT_RISK_ITEM, "        - city > 5")},
     (RULES, 13, 11, ["cannot compare string with number"], ["`city` is a string"])),
    ("single-equals", {RULES: (AT_RISK_ITEM, "        - orders_365d = 1")},
     (RULES, 13, 23, ["`=` is not a comparison"], ["=="])),
    ("dunder-import", {RULES: (AT_RISK_ITEM, "        - __import__('os')")},
     (RULES, 13, 11, ["`__import__` is not allowed"], [])),
    ("dunder-attribute", {RULES: (AT_RISK_ITEM, "        - city.__class__")},
     (RULES, 13, 16, ["names starting with __ are not allowed"], [])),
    ("unknown-function", {RULES: ("amount: floor(", "amount: flor(")},
     (RULES, 36, 31, ["unknown function 'flor'"], ["did you mean `floor`"])),
    ("tier-condition-uses-tier",
     {RULES: ("  gold:   {where: monetary_365d >= 5000}", '  gold:   {where: monetary_365d >= 5000 and tier == "x"}')},
     (RULES, 16, 45, ["a tier condition cannot use `tier`"], [])),

    # --- references between segments, tiers, channels, templates -----------------------------
    ("same-segment-in-two-files", {"rules/zz_more.yaml": "segments:\n  at_risk:\n    where: true\n"},
     ("rules/zz_more.yaml", 2, 3, ["segment 'at_risk' is defined twice"], ["rules/programme.yaml:8"])),
    ("undefined-segment", {RULES: ("segment: at_risk", "segment: at_rsk")},
     (RULES, 23, 14, ["unknown segment 'at_rsk'"], ["did you mean 'at_risk'"])),
    ("undefined-excluded-segment", {RULES: ("exclude: [high_value]", "exclude: [high_valu]")},
     (RULES, 24, 15, ["unknown segment 'high_valu'"], ["did you mean 'high_value'"])),
    ("channel-not-configured", {RULES: ("channel: sms", "channel: push")},
     (RULES, 27, 14, ["channel 'push' is not configured in loyalty.yaml"], ["channels:"])),
    ("channel-near-miss", {RULES: ("channel: sms", "channel: sns")},
     (RULES, 27, 14, ["channel 'sns' is not configured"], ["did you mean 'sms'"])),
    ("template-missing", {RULES: ("template: winback", "template: winbak")},
     (RULES, 28, 15, ["no template 'winbak' for channel sms in locale zh-CN"], ["did you mean 'winback'"])),
    ("template-missing-default-locale", {"templates/winback.sms.zh-CN.j2": None},
     (RULES, 28, 15, ["no template 'winback' for channel sms in locale zh-CN"],
      ["templates/winback.sms.en-US.j2", "add templates/winback.sms.zh-CN.j2"])),
    ("tier-reward-unknown-tier", {RULES: (VIP_REWARD, "reward: {tier: {to: golde}}")},
     (RULES, 36, 25, ["unknown tier 'golde'"], ["did you mean 'gold'"])),

    # --- triggers ------------------------------------------------------------------------------
    ("unknown-trigger-kind", {RULES: (WINBACK_WHEN, "when: {inactive: 60d}")},
     (RULES, 25, 12, ["unknown key 'inactive'"], ["did you mean 'inactive_for'"])),
    ("two-triggers", {RULES: (WINBACK_WHEN, "when: {inactive_for: 60d, birthday: {days_before: 3}}")},
     (RULES, 25, 5, ["when: takes exactly one trigger"], ["split the campaign"])),
    ("trigger-where-without-event", {RULES: (WINBACK_WHEN, "when: {inactive_for: 60d, where: event.score < 5}")},
     (RULES, 25, 31, ["where: under when: only goes with event:"], [])),
    ("event-attribute-near-miss", {RULES: (WINBACK_WHEN, "when: {event: nps_response, where: event.scor <= 6}")},
     (RULES, 25, 40, ["unknown feature 'event.scor'"], ["event.score"])),
    ("becomes-not-a-condition", {RULES: ('when: {dates: ["12-25"]}', "when: {becomes: monetary_365d}")},
     (RULES, 35, 21, ["gives number, not true/false"], [])),
    ("dates-not-a-calendar-date", {RULES: ('when: {dates: ["12-25"]}', 'when: {dates: ["02-30"]}')},
     (RULES, 35, 20, ["'02-30' is not a calendar date"], ["MM-DD"])),
    ("anniversary-unknown-column", {RULES: ('when: {dates: ["12-25"]}', "when: {anniversary: signup_dat}")},
     (RULES, 35, 25, ["'signup_dat' is not a date column"], ["did you mean 'signup_date'"])),
    ("bad-cron-schedule", {RULES: ("    priority: 80\n", '    priority: 80\n    schedule: "61 10 * * *"\n')},
     (RULES, 40, 15, ["'61 10 * * *' is not a cron schedule"], ["five fields"])),

    # --- rewards -------------------------------------------------------------------------------
    ("coupon-percent-and-amount", {RULES: ("percent_off: 20,", "percent_off: 20, amount_off: 5,")},
     (RULES, 26, 40, ["percent_off or amount_off, not both"], ["remove one"])),
    ("coupon-without-discount", {RULES: ("{percent_off: 20, min_spend: 100, valid_days: 14}", "{min_spend: 100}")},
     (RULES, 26, 14, ["a coupon needs percent_off or amount_off"], ["percent_off: 20"])),
    ("points-amount-wrong-type", {RULES: ("amount: floor(monetary_365d / 100)", "amount: city")},
     (RULES, 36, 31, ["points amount must be a number", "`city` gives string"], [])),

    # --- features ------------------------------------------------------------------------------
    ("feature-cycle", {RULES: ("segments:\n", "features:\n  a: {expr: b + 1}\n  b: {expr: a + 1}\n\nsegments:\n")},
     (RULES, 5, 3, ["features depend on each other in a circle", "a -> b -> a"], ["break the circle"])),
    ("feature-unknown-column",
     {RULES: ("segments:\n", "features:\n  spend_30d: {sum: amout, from: orders, within: 30d}\n\nsegments:\n")},
     (RULES, 5, 20, ["orders has no column 'amout'"], ["did you mean 'amount'"])),
    ("feature-shadows-builtin", {RULES: ("segments:\n", "features:\n  orders_365d: {count: rows, from: orders}\n\nsegments:\n")},
     (RULES, 5, 3, ["'orders_365d' is already a built-in feature"], [])),

    # --- workspace and loyalty.yaml ------------------------------------------------------------
    ("empty-rules-dir", {RULES: None},
     ("rules", 1, 1, ["no rule files in rules/"], ["rules/*.yaml"])),
    ("missing-loyalty-yaml", {SETTINGS: None},
     (SETTINGS, 1, 1, ["no loyalty.yaml"], ["loyalty init"])),
    ("invalid-timezone", {SETTINGS: ("timezone: Asia/Shanghai", "timezone: Asia/Shangai")},
     (SETTINGS, 4, 13, ["unknown timezone 'Asia/Shangai'"], ["did you mean 'Asia/Shanghai'"])),
    ("invalid-locale", {SETTINGS: ("locale: zh-CN", "locale: chinese")},
     (SETTINGS, 6, 11, ["'chinese' is not a locale"], ["zh-CN"])),
    ("data-path-variable-unset", {SETTINGS: ("customers: {path: data/customers.csv}",
                                              'customers: {path: "${LOYALTY_TEST_UNSET}/customers.csv"}')},
     (SETTINGS, 9, 21, ["the environment variable LOYALTY_TEST_UNSET in '${LOYALTY_TEST_UNSET}/customers.csv' "
                        "is not set"], ["set it where loyalty runs"])),
    ("state-path-escapes", {SETTINGS: ("state: state/loyalty.db", "state: ../state.db")},
     (SETTINGS, 13, 8, ["'../state.db' is outside the workspace"], ["state database"])),
    ("outbox-path-escapes", {SETTINGS: ("path: outbox/sms.jsonl", "path: ../outbox/sms.jsonl")},
     (SETTINGS, 23, 29, ["'../outbox/sms.jsonl' is outside the workspace"], [])),
    ("quiet-hours-25", {SETTINGS: ('quiet_hours: "21:00-09:00"', 'quiet_hours: "25:00-09:00"')},
     (SETTINGS, 18, 16, ["'25:00' is not a time of day"], ["00 to 23"])),
    ("webhook-without-url", {SETTINGS: ("sms:   {send: file, path: outbox/sms.jsonl}", "sms:   {send: webhook}")},
     (SETTINGS, 23, 3, ["a webhook channel needs a url"], ["url:"])),
    ("settings-not-a-mapping", {SETTINGS: "- program\n"},
     (SETTINGS, 1, 1, ["must be a mapping"], [])),
]


@pytest.fixture(scope="module")
def scaffold(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scaffold") / "ws"
    init_workspace(root)
    return root


def make_workspace(scaffold: Path, target: Path, changes: dict) -> Path:
    shutil.copytree(scaffold, target)
    for name, change in changes.items():
        path = target / name
        if change is None:
            path.unlink()
        elif isinstance(change, tuple):
            old, new = change
            text = path.read_text(encoding="utf-8")
            assert old in text, f"{old!r} is not in the scaffold's {name}"
            path.write_text(text.replace(old, new, 1), encoding="utf-8")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(change, bytes):
                path.write_bytes(change)
            else:
                path.write_text(change, encoding="utf-8")
    return target


def test_scaffold_is_clean(scaffold):
    result = validate_workspace(scaffold)
    assert result.problems == []
    assert result.ok and result.workspace is not None


@pytest.mark.parametrize("changes, expected", [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_broken_workspace(scaffold, tmp_path, changes, expected):
    file, line, column, words, hint_words = expected
    root = make_workspace(scaffold, tmp_path / "ws", changes)
    started = time.perf_counter()
    result = validate_workspace(root)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"validation took {elapsed:.2f}s"
    report = "\n".join(str(p) for p in result.problems)
    assert not result.ok and result.workspace is None, report
    first = result.errors[0]
    assert (first.file, first.line, first.column) == (file, line, column), report
    for word in words:
        assert word in first.message, report
    for word in hint_words:
        assert word in first.hint, report


def test_the_table_is_big_enough():
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES)


def test_quiet_hours_unquoted_range_is_fine(scaffold, tmp_path):
    """`21:00-09:00` is not sexagesimal for YAML (the dash), so it stays a string."""
    root = make_workspace(scaffold, tmp_path / "ws",
                          {SETTINGS: ('quiet_hours: "21:00-09:00"', "quiet_hours: 21:00-09:00")})
    result = validate_workspace(root)
    assert result.ok, [str(p) for p in result.problems]
    assert result.workspace.settings.contact_policy.quiet_start == "21:00"


def test_problem_quotes_its_source_line(scaffold, tmp_path):
    root = make_workspace(scaffold, tmp_path / "ws", {RULES: ("cooldown: 30d", "cooldwn: 30d")})
    problem = validate_workspace(root).errors[0]
    assert problem.source_line == "    cooldwn: 30d"
    assert str(problem) == "rules/programme.yaml:30:5: unknown key 'cooldwn' (did you mean 'cooldown'?)"


# --- everything in one validation --------------------------------------------------------------

def two_broken_files(scaffold: Path, target: Path) -> Path:
    return make_workspace(scaffold, target, {
        RULES: ("cooldown: 30d", "cooldwn: 30d"),
        "rules/a_segments.yaml": "segments:\n  loyal:\n    where: order_365d > 1\n",
    })


def test_all_files_reported_sorted(scaffold, tmp_path):
    result = validate_workspace(two_broken_files(scaffold, tmp_path / "ws"))
    positions = [(p.file, p.line, p.column) for p in result.problems]
    assert positions == [("rules/a_segments.yaml", 3, 12), (RULES, 30, 5)]
    assert positions == sorted(positions)


def test_rule_files_checked_even_when_settings_are_broken(scaffold, tmp_path):
    root = make_workspace(scaffold, tmp_path / "ws", {
        SETTINGS: ("timezone: Asia/Shanghai", "timezone: 5"),
        RULES: ("cooldown: 30d", "cooldwn: 30d"),
    })
    result = validate_workspace(root)
    assert [(p.file, p.line) for p in result.problems] == [(SETTINGS, 4), (RULES, 30)]


def test_a_broken_file_does_not_cascade(scaffold, tmp_path):
    """Names defined in a file with schema errors still count as defined elsewhere."""
    root = make_workspace(scaffold, tmp_path / "ws", {
        "rules/a.yaml": ("features:\n  spend_x: {sum: amount, from: orders, bogus: 1}\n"
                         "segments:\n  extra:\n    where: true\n    wher: 1\n"),
        "rules/b.yaml": ("segments:\n  z:\n    where: spend_x > 1\ncampaigns:\n  zc:\n    segment: extra\n"
                         "    reward: {message: true}\n    channel: sms\n    template: winback\n"),
    })
    result = validate_workspace(root)
    assert {p.file for p in result.problems} == {"rules/a.yaml"}, [str(p) for p in result.problems]
    assert len(result.problems) == 2


def test_every_problem_of_one_file(scaffold, tmp_path):
    root = make_workspace(scaffold, tmp_path / "ws", {
        RULES: ("segment: at_risk\n    exclude: [high_value]", "segment: at_rsk\n    exclude: [high_valu]"),
    })
    result = validate_workspace(root)
    assert [(p.line, p.column) for p in result.problems] == [(23, 14), (24, 15)]


def test_load_workspace_raises_rule_error(scaffold, tmp_path):
    root = two_broken_files(scaffold, tmp_path / "ws")
    with pytest.raises(RuleError) as caught:
        load_workspace(root)
    assert len(caught.value.problems) == 2
    assert str(caught.value).startswith("rules/a_segments.yaml:3:12: unknown feature 'order_365d'")
    assert load_workspace(scaffold).program.campaigns.keys() == {"winback", "vip_thanks"}


# --- the command line ----------------------------------------------------------------------------

def test_cli_clean_exit_0(scaffold):
    result = CliRunner().invoke(main, ["validate", str(scaffold)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK:")


def test_cli_text_exit_1_with_caret(scaffold, tmp_path):
    root = make_workspace(scaffold, tmp_path / "ws", {RULES: ("cooldown: 30d", "cooldwn: 30d")})
    result = CliRunner().invoke(main, ["validate", str(root)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "rules/programme.yaml:30:5: unknown key 'cooldwn' (did you mean 'cooldown'?)"
    assert lines[1] == "        cooldwn: 30d"
    assert lines[2] == "        ^"
    assert lines[-1] == "1 error(s)."


def test_cli_json(scaffold, tmp_path):
    root = two_broken_files(scaffold, tmp_path / "ws")
    result = CliRunner().invoke(main, ["validate", str(root), "--format", "json"])
    assert result.exit_code == 1
    problems = json.loads(result.output)
    assert [set(p) for p in problems] == [{"file", "line", "column", "severity", "message", "hint"}] * 2
    assert problems[0] == {
        "file": "rules/a_segments.yaml", "line": 3, "column": 12, "severity": "error",
        "message": "unknown feature 'order_365d'", "hint": "did you mean `orders_365d`?"}
    assert problems[1]["file"] == RULES and problems[1]["line"] == 30


def test_cli_json_clean(scaffold):
    result = CliRunner().invoke(main, ["validate", str(scaffold), "--format", "json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == []


def test_cli_github(scaffold, tmp_path):
    root = two_broken_files(scaffold, tmp_path / "ws")
    result = CliRunner().invoke(main, ["validate", str(root), "--format", "github"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "::error file=rules/a_segments.yaml,line=3,col=12::unknown feature 'order_365d' "
        "(did you mean `orders_365d`?)",
        "::error file=rules/programme.yaml,line=30,col=5::unknown key 'cooldwn' (did you mean 'cooldown'?)",
    ]


@pytest.mark.parametrize("changes, expected", [
    pytest.param({RULES: ("cooldown: 30d", "cooldown: 12h")}, (RULES, 30, 15), id="cooldown"),
    pytest.param({RULES: (WINBACK_WHEN, "when: {inactive_for: 36h}")}, (RULES, 25, 26), id="inactive_for"),
    pytest.param({SETTINGS: ("per: 7d", "per: 12h")}, (SETTINGS, 17, 8), id="contact-policy"),
    pytest.param({RULES: ("segments:\n", "features:\n  s: {sum: amount, from: orders, within: 6h}\n\nsegments:\n")},
                 (RULES, 5, 42), id="feature-window"),
])
def test_durations_are_whole_days(scaffold, tmp_path, changes, expected):
    """Days are whole calendar days: `12h` must not silently become 0 days."""
    result = validate_workspace(make_workspace(scaffold, tmp_path / "ws", changes))
    [problem] = result.problems
    assert (problem.file, problem.line, problem.column) == expected, str(problem)
    assert "is not a whole number of days" in problem.message


def test_durations_in_hours_that_make_whole_days_are_fine(scaffold, tmp_path):
    root = make_workspace(scaffold, tmp_path / "ws", {RULES: ("cooldown: 30d", "cooldown: 48h")})
    result = validate_workspace(root)
    assert result.ok, [str(p) for p in result.problems]
    assert result.workspace.program.campaigns["winback"].cooldown_days == 2
