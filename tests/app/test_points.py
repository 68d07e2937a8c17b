"""Points as an account of record: earn rules, refunds, redemptions, expiry, the points
features, the message announcing a credit, and ``loyalty points``.

Each test writes a small programme into a real workspace (``loyalty init``) and runs the
real commands on it.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from engine import Workspace

CUSTOMERS = """customer_id,name,email,phone,locale,timezone,email_opt_in,sms_opt_in,signup_date
C1,王芳,wang@example.com,13800000001,zh-CN,Asia/Shanghai,true,true,2024-01-01
C2,李伟,li@example.com,13800000002,zh-CN,Asia/Shanghai,true,false,2024-01-01
C3,=HYPERLINK("x"),c3@example.com,13800000003,zh-CN,Asia/Shanghai,true,true,2024-01-01
"""

ORDERS = """order_id,customer_id,timestamp,amount
O1,C1,2026-01-10 10:00:00,320.50
O2,C1,2026-03-01 10:00:00,180.00
O3,C2,2026-11-22 20:00:00,99.90
O4,C2,2025-12-01 10:00:00,5000.00
O5,C1,2026-03-05 10:00:00,-180.00
"""

REDEMPTIONS = """redemption_id,customer_id,timestamp,points
R1,C1,2026-02-01 10:00:00,100
R2,C2,2026-11-20 10:00:00,999999
"""

RULES = """
tiers:
  gold: {where: lifetime_spend >= 5000}
  bronze: {where: true}

segments:
  everyone: {where: true}

campaigns:
  expiry_reminder:
    name: 积分即将过期提醒
    segment: everyone
    where: points_expiring_30d > 0
    reward: {message: true}
    channel: email
    template: expiry
    cooldown: 30d

points:
  value: 0.01
  start: 2026-01-01
  expire_after: 120d
  earn:
    purchases:
      on: order
      amount: floor(order.amount)
      multiplier: {gold: 2}
      notify: {channel: sms, template: points_earned}
"""


def make_workspace(root: Path, rules: str = RULES, orders: str = ORDERS, redemptions: str | None = REDEMPTIONS,
                   customers: str = CUSTOMERS) -> Path:
    result = CliRunner().invoke(main, ["init", str(root)])
    assert result.exit_code == 0, result.output
    (root / "data" / "customers.csv").write_text(customers, encoding="utf-8")
    (root / "data" / "orders.csv").write_text(orders, encoding="utf-8")
    (root / "data" / "events.csv").write_text("event_id,customer_id,timestamp,type\n", encoding="utf-8")
    settings = (root / "loyalty.yaml").read_text(encoding="utf-8").replace(
        "  events:    {path: data/events.csv, fields: {score: number}}\n",
        "  events:    {path: data/events.csv}\n"
        + ("  point_redemptions: {path: data/point_redemptions.csv}\n" if redemptions is not None else ""))
    (root / "loyalty.yaml").write_text(settings, encoding="utf-8")
    if redemptions is not None:
        (root / "data" / "point_redemptions.csv").write_text(redemptions, encoding="utf-8")
    for old in (root / "rules").glob("*.yaml"):
        old.unlink()
    (root / "rules" / "programme.yaml").write_text(rules, encoding="utf-8")
    templates = root / "templates"
    (templates / "expiry.email.zh-CN.j2").write_text(
        "{% block subject %}您有积分即将过期{% endblock %}\n{% block text %}{{ customer.name }}，您有 "
        "{{ customer.points_expiring_30d|int }} 积分将于 {{ customer.points_next_expiry|date }} 过期。{% endblock %}\n",
        encoding="utf-8")
    (templates / "points_earned.sms.zh-CN.j2").write_text(
        "{{ customer.name }}，订单 {{ event.order_id }} 获得 {{ reward.points }} 积分。回T退订\n", encoding="utf-8")
    return root


@pytest.fixture()
def programme(tmp_path) -> Path:
    return make_workspace(tmp_path / "ws")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def accounts_csv(root: Path, as_of: str) -> dict[str, dict]:
    code, out, err = invoke("points", str(root), "--as-of", as_of, "--format", "csv")
    assert code == 0, err
    return {row["customer_id"]: row for row in csv.DictReader(io.StringIO(out))}


# --------------------------------------------------------------------------- the account


def test_orders_earn_refunds_take_back_redemptions_spend_and_credits_expire(programme):
    rows = accounts_csv(programme, "2026-03-10T12:00:00+08:00")
    # C1: 320 (Jan 10) + 180 (Mar 1) - 100 redeemed (Feb 1, from the oldest) - 180 refunded (Mar 5)
    assert rows["C1"] == {"customer_id": "C1", "balance": "220", "earned": "320", "redeemed": "100",
                          "expired": "0", "expiring_30d": "0"}
    # O4 (before points.start) earns nothing, so C2 has no points yet
    assert "C2" not in rows
    later = accounts_csv(programme, "2026-05-20T12:00:00+08:00")
    # Jan 10's credit ends on May 10: the 40 left of it (after the redemption and the refund
    # took the oldest points first) expired; Mar 1's 180 stay until Jun 29
    assert (later["C1"]["balance"], later["C1"]["expired"]) == ("180", "40")


def test_the_tier_multiplier_and_a_redemption_over_the_balance(programme):
    code, out, err = invoke("points", str(programme), "--as-of", "2026-11-23T12:00:00+08:00", "--format", "json")
    assert code == 0
    report = json.loads(out)
    c2 = next(c for c in report["customers"] if c["customer_id"] == "C2")
    # gold (lifetime spend 5,099.90) earns double: floor(99.90) * 2
    assert c2["earned"] == 198 and c2["balance"] == 198 and c2["redeemed"] == 0
    # R2 asked 999,999 points on Nov 20, when C2 had none: the warning names the file and row
    assert "point_redemptions.csv: 1 redemption(s) of more points than the member had" in err
    assert "rows 3" in err
    assert report["totals"]["outstanding"] == sum(c["balance"] for c in report["customers"])
    assert report["totals"]["liability"] == pytest.approx(report["totals"]["outstanding"] * 0.01)


def test_one_members_ledger_lines(programme):
    code, out, _ = invoke("points", str(programme), "--as-of", "2026-03-10T12:00:00+08:00", "--customer", "C1")
    assert code == 0
    assert "Customer C1: balance 220, earned 320, redeemed 100" in out
    lines = [line.split() for line in out.splitlines() if line.startswith("  2026-")]
    assert [(line[0], line[1], line[2]) for line in lines] == [
        ("2026-01-10", "earned", "+320"), ("2026-02-01", "redeemed", "-100"),
        ("2026-03-01", "earned", "+180"), ("2026-03-05", "refund", "-180")]
    assert "expires 2026-05-10" in out


def test_points_csv_is_safe_for_spreadsheets(tmp_path):
    orders = "order_id,customer_id,timestamp,amount\nO1,=cmd,2026-03-01 10:00:00,50\n"
    customers = CUSTOMERS + '=cmd,Eve,eve@example.com,13800000009,zh-CN,Asia/Shanghai,true,true,2024-01-01\n'
    root = make_workspace(tmp_path / "ws", orders=orders, redemptions=None, customers=customers)
    code, out, _ = invoke("points", str(root), "--as-of", "2026-03-10", "--format", "csv")
    assert code == 0
    assert out.splitlines() == ["customer_id,balance,earned,redeemed,expired,expiring_30d", "'=cmd,50,50,0,0,0"]


# --------------------------------------------------------------------------- earning is not marketing


def test_a_member_without_consent_still_earns_only_the_message_is_stopped(programme):
    preview = Workspace(programme).preview("2026-11-23T12:00:00+08:00")
    notice = next(c for c in preview.campaigns if c.id == "points.purchases")
    assert notice.funnel["trigger"] == 1 and notice.funnel["consent"] == 0   # C2 has no SMS consent
    Workspace(programme).run("2026-11-23T12:00:00+08:00", deliver=False)
    with sqlite3.connect(programme / "state" / "loyalty.db") as conn:
        assert conn.execute("SELECT count(*) FROM offers WHERE campaign = 'points.purchases'").fetchone() == (0,)
        # the notice does not wait for consent: the next credit brings its own
        assert conn.execute("SELECT count(*) FROM pending_firings").fetchone() == (0,)
    assert accounts_csv(programme, "2026-11-23T12:00:00+08:00")["C2"]["balance"] == "198"


def test_the_message_announcing_a_credit_says_how_many_points(programme):
    # C1 (SMS consent) buys today: one message with the points of this order, nothing credited twice
    (programme / "data" / "orders.csv").write_text(ORDERS + "O6,C1,2026-11-23 09:00:00,88.80\n", encoding="utf-8")
    run = Workspace(programme).run("2026-11-23T12:00:00+08:00")
    assert run.new_offers >= 1
    sent = [json.loads(line) for line in (programme / "outbox" / "sms.jsonl").read_text("utf-8").splitlines()]
    notice = [m for m in sent if m["campaign"] == "points.purchases"]
    assert len(notice) == 1 and notice[0]["customer_id"] == "C1"
    assert "订单 O6 获得 88 积分" in notice[0]["body"]
    with sqlite3.connect(programme / "state" / "loyalty.db") as conn:
        assert conn.execute("SELECT count(*) FROM points_ledger").fetchone() == (0,), \
            "the message gives nothing: the earn rule credited the points"
    again = Workspace(programme).run("2026-11-23T12:00:00+08:00")
    assert again.new_offers == 0
    assert accounts_csv(programme, "2026-11-23T12:00:00+08:00")["C1"]["earned"] == str(320 + 88)


# --------------------------------------------------------------------------- the features


def test_an_expiry_reminder_is_a_few_lines(programme):
    # by Apr 20, the 40 points left of Jan 10's credit end on May 10: within 30 days
    preview = Workspace(programme).preview("2026-04-20T12:00:00+08:00")
    reminder = next(c for c in preview.campaigns if c.id == "expiry_reminder")
    assert reminder.offers == 1
    sample = reminder.samples[0]
    assert "您有 40 积分将于 2026年5月10日 过期" in sample["body"]
    assert Workspace(programme).preview("2026-03-10T12:00:00+08:00").campaigns[0].offers == 0


def test_points_features_are_the_same_in_any_number_of_partitions(programme):
    one = Workspace(programme).preview("2026-04-20T12:00:00+08:00", partitions=1)
    three = Workspace(programme).preview("2026-04-20T12:00:00+08:00", partitions=3)
    assert [(c.id, c.funnel, c.offers) for c in one.campaigns] == [(c.id, c.funnel, c.offers) for c in three.campaigns]


def test_points_granted_by_a_campaign_count_once_however_often_the_run_is_repeated(tmp_path):
    welcome = """campaigns:
  welcome_points:
    name: 入会积分
    segment: everyone
    when: {anniversary: signup_date}
    reward: {points: 500}
    channel: email
    template: vip_thanks
"""
    root = make_workspace(tmp_path / "ws", rules=RULES.replace("campaigns:\n", welcome, 1))
    for _ in range(2):
        Workspace(root).run("2026-01-01T12:00:00+08:00", deliver=False)
    with sqlite3.connect(root / "state" / "loyalty.db") as conn:
        granted = {c for (c,) in conn.execute("SELECT customer_id FROM offers WHERE campaign = 'welcome_points'")}
    assert granted
    rows = accounts_csv(root, "2026-01-01T12:00:00+08:00")
    assert {c: rows[c]["earned"] for c in rows} == dict.fromkeys(granted, "500")
    # the points were granted at the run: a look at the day before shows none
    assert accounts_csv(root, "2025-12-31T12:00:00+08:00") == {}


# --------------------------------------------------------------------------- rule-file errors


@pytest.mark.parametrize("points, message", [
    ("points:\n  earn:\n    p: {on: order, amount: points_balance}\n",
     "earn rules cannot read the points features"),
    ("points:\n  earn:\n    p: {on: order, amount: floor(order.amount), multiplier: {golden: 2}}\n",
     "unknown tier 'golden'"),
    ("points:\n  earn:\n    p: {on: order, amount: 1, notify: {channel: wechat, template: expiry}}\n",
     "channel 'wechat' is not configured"),
    ("points:\n  expire_after: 36h\n", "is not a whole number of days"),
])
def test_mistakes_in_points_are_reported_at_their_line(tmp_path, points, message):
    root = make_workspace(tmp_path / "ws", rules=RULES.split("\npoints:")[0] + "\n" + points)
    code, out, _ = invoke("validate", str(root))
    assert code == 1
    assert message in out
    assert "rules/programme.yaml:" in out


def test_points_defined_in_two_files_is_an_error(programme):
    (programme / "rules" / "more.yaml").write_text("points:\n  value: 0.02\n", encoding="utf-8")
    code, out, _ = invoke("validate", str(programme))
    assert code == 1
    assert "rules/programme.yaml:19:1: points: is defined twice (it is already defined at rules/more.yaml:1" in out


# --------------------------------------------------------------------------- the report


def test_the_report_shows_the_liability_and_what_the_period_earned_redeemed_and_expired(programme):
    code, out, err = invoke("report", str(programme), "--from", "2026-03-01", "--to", "2026-05-31",
                            "--format", "json")
    assert code == 0, err
    points = json.loads(out)["points"]
    end = accounts_csv(programme, "2026-05-31T23:59:59.999999+08:00")
    before = accounts_csv(programme, "2026-02-28T23:59:59.999999+08:00")

    def total(rows, column):
        return sum(int(r[column]) for r in rows.values())

    assert points["outstanding"] == total(end, "balance")
    assert points["liability"] == pytest.approx(points["outstanding"] * 0.01)
    assert points["period"] == {column: total(end, column) - total(before, column)
                                for column in ("earned", "redeemed", "expired")}
    assert points["period"]["expired"] == 40       # what was left of C1's January credit, on May 10
    assert points["breakage"] == pytest.approx(total(end, "expired") / total(end, "earned"), abs=1e-4)
    code, out, _ = invoke("report", str(programme), "--from", "2026-03-01", "--to", "2026-05-31",
                          "--html", str(programme / "report.html"))
    assert code == 0
    html = (programme / "report.html").read_text(encoding="utf-8")
    assert "积分负债 / Liability" in html
