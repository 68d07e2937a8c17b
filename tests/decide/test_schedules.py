"""`schedule:` (cron in the programme's timezone) and `loyalty run --due`.

A scheduler may call `run --due` as often as it likes: a campaign runs once per tick of
its own schedule, a missed window is caught up by one run (not one per missed tick), and
campaigns without a schedule run on every run (the documented choice).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cli import main
from engine import Workspace

TZ = "Asia/Shanghai"

SETTINGS = """\
program: {name: Schedules, timezone: Asia/Shanghai, currency: CNY, locale: en-US}
data:
  customers: {path: data/customers.csv}
  orders:    {path: data/orders.csv}
state: state/loyalty.db
holdout: 0%
channels:
  sms:   {send: file, path: outbox/sms.jsonl}
  email: {send: file, path: outbox/email.jsonl}
"""

RULES = """\
segments:
  odd:  {where: orders_total >= 1}
  even: {where: orders_total == 0}
campaigns:
  daily_deal:
    name: Daily deal
    segment: odd
    reward: {message: true}
    channel: sms
    template: deal
    schedule: "0 10 * * *"        # every day at 10:00, Shanghai time
  monday_digest:
    name: Monday digest
    segment: even
    reward: {message: true}
    channel: sms
    template: deal
    priority: 50
    schedule: "30 9 * * 1"        # Mondays at 09:30
  always_on:
    name: Always on
    segment: even
    reward: {message: true}
    channel: email
    template: note
    priority: 10
"""

TEMPLATES = {
    "deal.sms.en-US.j2": "Hi {{ customer.name }}, today's deal is waiting.\n",
    "note.email.en-US.j2": "{% block subject %}Hello {{ customer.name }}{% endblock %}\n"
                           "{% block text %}A note for you.{% endblock %}\n",
}


@pytest.fixture()
def workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    for folder in ("rules", "templates", "data"):
        (root / folder).mkdir(parents=True)
    (root / "loyalty.yaml").write_text(SETTINGS, encoding="utf-8")
    (root / "rules" / "programme.yaml").write_text(RULES, encoding="utf-8")
    for name, text in TEMPLATES.items():
        (root / "templates" / name).write_text(text, encoding="utf-8")
    customers = pd.DataFrame([{"customer_id": f"S{i}", "name": f"Member {i}", "email": f"s{i}@example.com",
                               "phone": f"1390000{i:04d}", "locale": "en-US",
                               "email_opt_in": "true", "sms_opt_in": "true"} for i in range(6)])
    customers.to_csv(root / "data" / "customers.csv", index=False)
    orders = pd.DataFrame([{"order_id": f"O{i}", "customer_id": f"S{i}", "timestamp": "2026-01-10 12:00:00",
                            "amount": 50} for i in range(1, 6, 2)])
    orders.to_csv(root / "data" / "orders.csv", index=False)
    assert Workspace(root).validate().ok
    return root


def local(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz=TZ)


def due_run(workspace: Path, as_of) -> set[str]:
    """Run ``--due`` at ``as_of``; the campaigns it evaluated."""
    result = Workspace(workspace).run(as_of, due=True, deliver=False)
    return set(result.funnels)


def offer_dates(workspace: Path, campaign: str) -> list[str]:
    """The local dates of the campaign's recorded offers, one per batch."""
    with sqlite3.connect(workspace / "state" / "loyalty.db") as conn:
        rows = conn.execute("SELECT DISTINCT substr(as_of, 1, 10) FROM offers WHERE campaign = ? "
                            "ORDER BY 1", [campaign]).fetchall()
    return [row[0] for row in rows]


def test_a_daily_campaign_runs_once_per_day_however_often_due_runs(workspace):
    # 2026-03-02 is a Monday; the scheduler wakes up five times a day
    ran: dict[str, list[str]] = {}
    assert due_run(workspace, local("2026-03-02 10:07")) == {"daily_deal", "monday_digest", "always_on"}
    for day in ("2026-03-03", "2026-03-04", "2026-03-05"):
        for clock in ("08:00", "09:59", "10:07", "14:30", "23:59"):
            for campaign in due_run(workspace, local(f"{day} {clock}")):
                ran.setdefault(campaign, []).append(f"{day} {clock}")
    assert ran["daily_deal"] == ["2026-03-03 10:07", "2026-03-04 10:07", "2026-03-05 10:07"]
    assert "monday_digest" not in ran, "a weekly campaign is not due on Tuesday to Thursday"
    # campaigns without a schedule run on every run
    assert len(ran["always_on"]) == 15
    assert offer_dates(workspace, "daily_deal") == ["2026-03-02", "2026-03-03", "2026-03-04", "2026-03-05"]
    with sqlite3.connect(workspace / "state" / "loyalty.db") as conn:
        per_day = conn.execute("SELECT substr(as_of, 1, 10), count(*) FROM offers "
                               "WHERE campaign = 'daily_deal' GROUP BY 1").fetchall()
    assert {count for _, count in per_day} == {3}, "one offer per odd customer per day"


def test_the_schedule_is_read_in_the_programme_timezone(workspace):
    assert "daily_deal" in due_run(workspace, local("2026-03-02 10:07"))
    # 01:59 UTC is 09:59 in Shanghai: before the day's tick
    assert "daily_deal" not in due_run(workspace, pd.Timestamp("2026-03-03T01:59:00Z"))
    # 10:00 UTC would be the tick if cron were read in UTC; it is 18:00 in Shanghai, long after
    assert "daily_deal" in due_run(workspace, pd.Timestamp("2026-03-03T02:01:00Z"))
    assert "daily_deal" not in due_run(workspace, pd.Timestamp("2026-03-03T10:00:00Z"))


def test_a_missed_window_is_caught_up_once_not_once_per_missed_tick(workspace):
    assert due_run(workspace, local("2026-03-02 10:07")) >= {"daily_deal", "monday_digest"}
    # the scheduler was down for several days (and over two Mondays)
    assert due_run(workspace, local("2026-03-17 15:00")) >= {"daily_deal", "monday_digest"}
    for clock in ("16:00", "20:00", "23:59"):
        assert due_run(workspace, local(f"2026-03-17 {clock}")) == {"always_on"}
    assert "daily_deal" in due_run(workspace, local("2026-03-18 10:01"))
    assert "monday_digest" not in due_run(workspace, local("2026-03-18 10:01"))
    assert offer_dates(workspace, "daily_deal") == ["2026-03-02", "2026-03-17", "2026-03-18"]
    assert offer_dates(workspace, "monday_digest") == ["2026-03-02", "2026-03-17"]


def test_due_with_a_campaign_filter_and_nothing_due_records_nothing(workspace):
    first = Workspace(workspace).run(local("2026-03-02 10:07"), due=True, campaigns=["daily_deal"], deliver=False)
    assert set(first.funnels) == {"daily_deal"} and first.new_offers == 3
    idle = Workspace(workspace).run(local("2026-03-02 11:00"), due=True, campaigns=["daily_deal"], deliver=False)
    assert idle.new_offers == 0 and idle.funnels == {}
    # the filter did not mark the other scheduled campaign as run
    assert "monday_digest" in due_run(workspace, local("2026-03-02 11:00"))


def test_run_without_due_runs_every_campaign_and_leaves_the_schedule_alone(workspace):
    result = Workspace(workspace).run(local("2026-03-02 10:07"), deliver=False)
    assert set(result.funnels) == {"daily_deal", "monday_digest", "always_on"}
    # a plain run is not a scheduled run: --due still runs the scheduled campaigns
    assert due_run(workspace, local("2026-03-02 10:30")) == {"daily_deal", "monday_digest", "always_on"}


def test_a_run_exactly_at_the_tick_runs_the_campaign_every_day(workspace):
    ran = [day for day in ("2026-03-02", "2026-03-03", "2026-03-04", "2026-03-05")
           if "daily_deal" in due_run(workspace, local(f"{day} 10:00"))]
    assert ran == ["2026-03-02", "2026-03-03", "2026-03-04", "2026-03-05"]


def test_cli_run_due(workspace):
    def run(as_of: str) -> dict:
        done = CliRunner().invoke(main, ["run", str(workspace), "--as-of", as_of, "--due", "--now", as_of,
                                         "--format", "json"], env={"LOYALTY_CRASH_AT": None}, catch_exceptions=False)
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)

    first = run("2026-03-03T10:07:00+08:00")          # a Tuesday
    assert set(first["funnels"]) == {"daily_deal", "monday_digest", "always_on"}
    # one offer per customer and run: the Monday digest outranks always_on for the even ones
    assert first["new_offers"] == 6 and first["delivery"]["sent"] == 6
    later = run("2026-03-03T11:07:00+08:00")
    assert set(later["funnels"]) == {"always_on"}
    assert later["new_offers"] == 3 and later["delivery"]["sent"] == 3
    lines = (workspace / "outbox" / "sms.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 and len({json.loads(line)["offer_id"] for line in lines}) == 6
