"""Golden tests: passing and failing fixtures, failures at the fixture's line with the deciding stage."""

import re
from pathlib import Path

import pytest

from engine.app.golden import run_golden_tests
from engine.data.sampledata import copy_example_programme, write_sample_workspace

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden") / "ws"
    write_sample_workspace(root, customers=10)
    copy_example_programme(root)
    return root


def test_the_example_programme_ships_golden_files_that_pass(workspace):
    shipped = sorted(p.name for p in (workspace / "tests").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (REPO / "tests" / "golden").glob("*.yaml"))
    assert {"winback.yaml", "birthday.yaml", "vip_tiers.yaml", "nps_and_complaints.yaml",
            "points.yaml", "contact_policy.yaml"} <= set(shipped)
    result = run_golden_tests(workspace)
    assert result.failed == [], "\n".join(str(f) for f in result.failed)
    assert result.passed >= 40 and len(result.files) == len(shipped)


FAILING = """\
as_of: 2026-11-23T10:00:00+08:00
customers:
  - id: F-1
    name: 王芳
    orders:
      - {days_ago: 75, amount: 320}
      - {days_ago: 120, amount: 180}
      - {days_ago: 150, amount: 260}
    contacts:
      - {campaign: winback_at_risk, days_ago: 10}
    expect: {offer: winback_at_risk}
  - id: F-2
    features: {days_since_last_order: 75, orders_last_90d: 0, orders_prev_90d: 2}
    expect:
      - {offer: winback_at_risk, text_contains: "好久不见"}
      - {suppressed_by: budget, campaign: winback_at_risk}
"""


def test_a_failure_names_the_fixture_line_and_the_deciding_stage(workspace):
    path = workspace / "tests" / "failing.yaml"
    path.write_text(FAILING, encoding="utf-8")
    try:
        result = run_golden_tests(workspace, [path])
    finally:
        path.unlink()
    assert result.passed == 1 and len(result.failed) == 2
    cooldown, budget = result.failed
    assert (cooldown.file, cooldown.line) == ("tests/failing.yaml", 11)
    assert "expected offer winback_at_risk, got no offer" in cooldown.message
    assert "winback_at_risk: stopped at cooldown [stage: cooldown]" in cooldown.trace
    assert any("days_since_last_order >= 60 = true" in line for line in cooldown.trace)
    assert str(cooldown).startswith("tests/failing.yaml:11: customer F-1:")
    assert budget.line == 16 and "stopped at budget" in budget.message
    assert any("[stage: offers]" in line for line in budget.trace)


@pytest.mark.parametrize("text, line, words", [
    ("as_of: 2026-11-23\ncustomers:\n  - id: X\n    expect: {offer: winbak_at_risk}\n", 4,
     "no campaign 'winbak_at_risk'"),
    ("as_of: 2026-11-23\ncustomers:\n  - id: X\n    expect: {suppressed_by: caps}\n", 4, "is not one of"),
    ("as_of: 2026-11-23\ncustomers:\n  - id: X\n    features: {order_365d: 3}\n    expect: no_offer\n", 4,
     "unknown feature 'order_365d' (did you mean 'orders_365d'?)"),
    ("customers: []\n", 1, "'as_of' is a required property"),
])
def test_bad_golden_files_are_reported_at_their_line(workspace, text, line, words):
    path = workspace / "tests" / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        result = run_golden_tests(workspace, [path])
    finally:
        path.unlink()
    assert len(result.failed) >= 1
    assert result.failed[0].line == line and words in result.failed[0].message, str(result.failed[0])


def test_previous_runs_feed_triggers_and_cooldowns(workspace):
    """Earlier runs replayed in memory: a firing already acted on does not fire again (stopped
    at the trigger, and the trace says by which run), a new firing inside the campaign's
    cooldown is stopped at cooldown, and `becomes:` compares with the previous run."""
    path = workspace / "tests" / "history.yaml"
    path.write_text("""\
as_of: 2026-11-23T10:00:00+08:00
previous_runs: [2026-11-22T10:00:00+08:00]
campaigns: [spending_milestone, winback_at_risk, nps_detractor_recovery]
customers:
  - id: H-1                    # crossed 10,000 lifetime spend since yesterday's run
    orders:
      - {days_ago: 400, amount: 9000}
      - {days_ago: 0.5, amount: 1500}
    expect: {offer: spending_milestone, points: 2000}
  - id: H-2                    # got the win-back offer yesterday for the same last order
    orders:
      - {days_ago: 76, amount: 320}
      - {days_ago: 120, amount: 180}
      - {days_ago: 150, amount: 260}
    expect: {suppressed_by: trigger, campaign: winback_at_risk}
  - id: H-3                    # a second low NPS score today, a week inside the 30-day cooldown
    events:
      - {type: nps_response, score: 3, days_ago: 1.5}
      - {type: nps_response, score: 2, days_ago: 0.5}
    expect: {suppressed_by: cooldown, campaign: nps_detractor_recovery}
  - id: H-4                    # the same customer as H-2, wrongly expected to get it again
    orders:
      - {days_ago: 76, amount: 320}
      - {days_ago: 120, amount: 180}
      - {days_ago: 150, amount: 260}
    expect: {offer: winback_at_risk}
""", encoding="utf-8")
    try:
        result = run_golden_tests(workspace, [path])
    finally:
        path.unlink()
    assert result.passed == 3, "\n".join(str(f) for f in result.failed)
    [failure] = result.failed
    assert failure.line == 26 and "expected offer winback_at_risk, got no offer" in failure.message
    assert ("winback_at_risk: stopped at trigger [stage: trigger] (the same firing "
            "winback_at_risk:H-4:2026-09-08 was already acted on by the run at 2026-11-22T10:00:00+08:00)"
            ) in failure.trace, failure.trace


def test_the_golden_files_in_the_docs_pass(workspace, tmp_path):
    """Every golden test file shown in docs/testing.md runs, and passes, against the example programme."""
    text = (REPO / "docs" / "testing.md").read_text(encoding="utf-8")
    snippets = [m.group(1) for m in re.finditer(r"```yaml\n(.*?)```", text, re.S) if "customers:" in m.group(1)]
    assert len(snippets) >= 2
    for n, snippet in enumerate(snippets):
        path = tmp_path / f"docs_{n}.yaml"
        path.write_text(snippet, encoding="utf-8")
        result = run_golden_tests(workspace, [path])
        assert result.failed == [] and result.passed >= 2, "\n".join(str(f) for f in result.failed)


AT_RISK = """\
as_of: 2026-11-23T10:00:00+08:00
defaults: {locale: zh-CN}
customers:
  - id: W-1001
    name: 王芳
    orders: [{days_ago: 75, amount: 320}, {days_ago: 120, amount: 180}, {days_ago: 150, amount: 260}]
    contacts: CONTACTS
    expect: EXPECT
"""


@pytest.mark.parametrize("contacts, expect, message", [
    ("[]", "{offer: winback_at_risk, variant: B}", "expected winback_at_risk variant B, got A"),
    ("[]", "{offer: winback_at_risk, channel: email}", "expected winback_at_risk channel email, got sms"),
    ("[]", "{offer: winback_at_risk, text_excludes: 好久不见}", "the winback_at_risk message contains '好久不见'"),
    ("[]", "{offer: winback_at_risk, text_contains: [王芳, 生日快乐]}",
     "the winback_at_risk message does not contain '生日快乐'"),
    ("[]", "no_offer", "expected no offer, got winback_at_risk"),
    ("[]", "{no_offer: [vip_perks, winback_at_risk]}", "expected no offer from winback_at_risk, got winback_at_risk"),
    ("[]", "{suppressed_by: frequency_cap}",
     "expected a campaign to be stopped at frequency_cap, but none that fired was stopped "
     "(offers: winback_at_risk)"),
    ("[{campaign: holiday_greetings, days_ago: 1}, {campaign: welcome_pack, days_ago: 2}]",
     "{offer: winback_at_risk}", "expected offer winback_at_risk, got no offer"),
])
def test_each_kind_of_expectation_fails_in_plain_words(workspace, contacts, expect, message):
    path = workspace / "tests" / "kinds.yaml"
    path.write_text(AT_RISK.replace("CONTACTS", contacts).replace("EXPECT", expect), encoding="utf-8")
    try:
        result = run_golden_tests(workspace, [path])
    finally:
        path.unlink()
    [failure] = result.failed
    assert failure.line == 8 and failure.message.startswith(f"customer W-1001: {message}"), str(failure)


def test_suppressed_by_without_a_campaign_accepts_any_campaign(workspace):
    path = workspace / "tests" / "any.yaml"
    path.write_text(AT_RISK.replace("CONTACTS", "[{campaign: holiday_greetings, days_ago: 1}, "
                                                "{campaign: welcome_pack, days_ago: 2}]")
                    .replace("EXPECT", "[no_offer, {suppressed_by: frequency_cap}]"), encoding="utf-8")
    try:
        result = run_golden_tests(workspace, [path])
    finally:
        path.unlink()
    assert result.failed == [] and result.passed == 2, "\n".join(str(f) for f in result.failed)
