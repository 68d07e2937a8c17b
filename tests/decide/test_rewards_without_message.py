"""Rewards that need no message (issue 17): points and tier rewards stopped only because the message
cannot be sent (consent or address, the frequency cap) are granted anyway, as suppressed offers.

Real runs on hand-built workspaces (SQLite state in tmp_path), read back with plain SQL.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from click.testing import CliRunner
from test_triggers import customer, make_workspace

from cli import main
from engine import Workspace

DAY1, DAY2, DAY3 = (f"2026-12-0{d}T10:00:00+08:00" for d in range(1, 4))
EVENTS = "E1,C0001,2026-12-01 09:00:00,purchase,40\nE2,C0002,2026-12-01 09:30:00,purchase,25\n"


def points_programme(root: Path, *, customers: str, extra: str = "", policy: str = "{}", events: str = EVENTS,
                     campaign: str | None = None) -> Workspace:
    make_workspace(root, campaign or f"""\
        points:
          when: {{event: purchase}}
          reward: {{points: floor(event.score)}}
          channel: sms
          template: t
          priority: 50
        {extra}""", customers, events=events, policy=policy)
    return Workspace(root)


def query(root: Path, sql: str, params=()) -> list[tuple]:
    with sqlite3.connect(root / "state" / "loyalty.db") as conn:
        return conn.execute(sql, params).fetchall()


def test_points_for_a_customer_without_consent_are_credited_and_nothing_is_sent(tmp_path):
    root = tmp_path / "ws"
    ws = points_programme(root, customers=customer("C0001", sms="false") + customer("C0002", phone=""))
    result = ws.run(DAY1, now=DAY1)
    assert (result.new_offers, result.granted_without_message) == (2, {"points": 2})
    assert result.funnels["points"]["consent"] == result.funnels["points"]["offers"] == 2
    assert result.delivery.sent == 0 and not (root / "outbox" / "sms.jsonl").exists()
    rows = query(root, "SELECT customer_id, status, suppressed_reason, subject, body, address FROM offers "
                       "ORDER BY customer_id")
    assert rows == [("C0001", "suppressed", "consent", None, None, None),
                    ("C0002", "suppressed", "consent", None, None, None)]      # no phone: no address
    assert dict(query(root, "SELECT customer_id, points FROM points_ledger")) == {"C0001": 40, "C0002": 25}
    assert query(root, "SELECT count(*) FROM contacts") == [(0,)]
    assert ws.deliver(now=DAY2, progress=False).sent == 0
    assert query(root, "SELECT DISTINCT status FROM offers") == [("suppressed",)]
    assert ws.run(DAY1, now=DAY1).new_offers == 0                            # a rerun grants nothing twice
    assert query(root, "SELECT count(*) FROM points_ledger") == [(2,)]


def test_a_customer_at_the_frequency_cap_gets_the_points_and_keeps_the_room_for_messages(tmp_path):
    root = tmp_path / "ws"
    ws = points_programme(root, customers=customer("C0001") + customer("C0002"), policy="{max_messages: 1, per: 7d}",
                          extra="""deal:
          reward: {message: {}}
          channel: sms
          template: t
          priority: 10
        """)
    first = ws.run(DAY1, deliver=False)            # the points are messages (consent); the deal waits
    assert first.granted_without_message == {} and first.funnels["deal"]["arbitration"] == 0
    (root / "data" / "events.csv").write_text(
        "event_id,customer_id,timestamp,type,score\n" + EVENTS +
        "E3,C0001,2026-12-02 09:00:00,purchase,7\n", encoding="utf-8")
    second = ws.run(DAY2, deliver=False)           # C0001 is at the cap: points without a message
    assert second.granted_without_message == {"points": 1}
    assert query(root, "SELECT customer_id, status, suppressed_reason FROM offers WHERE firing_key LIKE '%E3'") == \
        [("C0001", "suppressed", "frequency_cap")]
    assert query(root, "SELECT points FROM points_ledger WHERE offer_id IN "
                       "(SELECT offer_id FROM offers WHERE firing_key LIKE '%E3')") == [(7,)]
    # the grant is no contact: one message in the week, as before
    assert query(root, "SELECT customer_id, count(*) FROM contacts GROUP BY customer_id") == \
        [("C0001", 1), ("C0002", 1)]


def test_a_grant_counts_against_the_budget_and_starts_the_cooldown(tmp_path):
    root = tmp_path / "ws"
    ws = points_programme(root, customers="".join(customer(f"C000{i}", sms="false") for i in range(1, 4)),
                          campaign="""\
        thanks:
          reward: {points: 50}
          channel: sms
          template: t
          cooldown: 30d
          budget: {max_offers: 2, per: day}
        """)
    assert ws.run(DAY1, deliver=False).granted_without_message == {"thanks": 2}     # the budget binds
    later = ws.run(DAY1.replace("T10", "T15"), deliver=False)
    assert (later.new_offers, later.funnels["thanks"]["arbitration"]) == (0, 1)     # the day's budget is spent
    again = ws.run(DAY2, deliver=False)
    assert again.new_offers == 1                          # the third customer, with a new day's budget...
    assert again.funnels["thanks"]["cooldown"] == 1       # ...and the two granted yesterday cool down
    assert ws.run(DAY3, deliver=False).new_offers == 0
    assert query(root, "SELECT count(*), sum(points) FROM points_ledger") == [(3, 150.0)]


def test_preview_counts_the_grants_as_the_run_makes_them(tmp_path):
    root = tmp_path / "ws"
    ws = points_programme(root, customers=customer("C0001", sms="false") + customer("C0002"))
    shown = CliRunner().invoke(main, ["preview", str(root), "--as-of", DAY1, "--format", "json"])
    assert shown.exit_code == 0, shown.output
    [campaign] = json.loads(shown.output)["campaigns"]
    assert (campaign["offers"], campaign["granted_without_message"], campaign["pending"]) == (2, 1, 0)
    text = CliRunner().invoke(main, ["preview", str(root), "--as-of", DAY1, "--customer", "C0001"])
    assert "points: 1 reward(s) granted without a message" in text.output
    assert "granted without a message (stopped by consent)" in text.output
    assert ws.run(DAY1, deliver=False).granted_without_message == {"points": campaign["granted_without_message"]}
    history = CliRunner().invoke(main, ["history", str(root), "--customer", "C0001"])
    assert "status suppressed (granted without a message: consent)" in history.output


def test_a_campaign_with_a_message_reward_is_still_stopped_by_consent(tmp_path):
    root = tmp_path / "ws"
    ws = points_programme(root, customers=customer("C0001", sms="false"), campaign="""\
        mixed:
          when: {event: purchase}
          reward: {points: 10}
          channel: sms
          template: t
          variants:
            - {name: A, weight: 1}
            - {name: B, weight: 1, reward: {coupon: {amount_off: 5}}}
        """)
    result = ws.run(DAY1, deliver=False)
    assert (result.new_offers, result.funnels["mixed"]["consent"], result.pending) == (0, 0, {"pending": 1})
