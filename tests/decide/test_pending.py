"""Pending firings (issue 17): a one-off firing stopped by the contact policy, arbitration, a budget
or its template waits for later runs, with the same offer id, until it is offered or expires.

Real runs on hand-built workspaces (SQLite state in tmp_path), read back with plain SQL.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from test_triggers import customer, make_workspace

from cli import main
from engine import Workspace
from engine.decide.evaluation import offer_id

DAY1, DAY2, DAY3, DAY4, DAY5, DAY6 = (f"2026-12-0{d}T10:00:00+08:00" for d in range(1, 7))
ORDERS = "O1,C0001,2026-12-01 12:00:00,150\nO2,C0002,2026-12-01 13:00:00,200\nO3,C0003,2026-11-01 13:00:00,20\n"


def milestone(root: Path, *, budget: str = "{max_offers: 1, per: day}", reward: str = "{coupon: {amount_off: 5}}",
              pending: str | None = None, customers: str | None = None,
              when: str = "{becomes: lifetime_spend >= 100}", policy: str = "{}") -> Workspace:
    """C0001 and C0002 cross 100 of lifetime spend on 1 December, after the first run."""
    make_workspace(root, f"""\
        milestone:
          when: {when}
          reward: {reward}
          channel: sms
          template: t
          budget: {budget}
        """ + (f"  pending: {pending}\n" if pending else ""),
        customers if customers is not None else customer("C0001") + customer("C0002") + customer("C0003"),
        orders=ORDERS, policy=policy)
    return Workspace(root)


def query(root: Path, sql: str, params=()) -> list[tuple]:
    with sqlite3.connect(root / "state" / "loyalty.db") as conn:
        return conn.execute(sql, params).fetchall()


def offers(root: Path) -> dict[str, tuple]:
    """firing key -> (offer_id, customer, as_of of the run that recorded it)."""
    return {key: (oid, cid, as_of) for key, oid, cid, as_of in
            query(root, "SELECT firing_key, offer_id, customer_id, as_of FROM offers ORDER BY as_of")}


def pending_rows(root: Path) -> dict[str, tuple]:
    """firing key -> (status, reason, first_as_of, expires_at)."""
    return {row[0]: row[1:] for row in query(
        root, "SELECT firing_key, status, reason, first_as_of, expires_at FROM pending_firings")}


def set_consent(root: Path, customer_id: str, value: str) -> None:
    path = root / "data" / "customers.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines = [",".join(line.split(",")[:-1] + [value]) if line.startswith(customer_id + ",") else line
             for line in lines]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- budgets


def test_a_milestone_stopped_by_the_daily_budget_is_offered_at_the_next_days_run_with_the_same_offer_id(tmp_path):
    ws = milestone(tmp_path / "ws")
    assert ws.run(DAY1, deliver=False).new_offers == 0          # the first evaluation only remembers
    second = ws.run(DAY2, deliver=False)
    assert (second.new_offers, second.funnels["milestone"]["arbitration"], second.pending) == (1, 2, {"pending": 1})
    first_offer = offers(tmp_path / "ws")
    waiting = pending_rows(tmp_path / "ws")
    [(key, (status, reason, first_as_of, expires_at))] = waiting.items()
    assert (status, reason, first_as_of, expires_at) == (
        "pending", "budget", "2026-12-02T02:00:00+00:00", "2026-12-09T02:00:00+00:00")    # default 7d
    assert key.endswith(":" + pd.Timestamp(DAY2).isoformat()) and key not in first_offer

    third = ws.run(DAY3, deliver=False)
    assert (third.new_offers, third.reentered, third.pending) == (1, {"milestone": 1}, {"offered": 1})
    assert third.funnels["milestone"]["trigger"] == 1                   # the pending firing, nothing new
    later = offers(tmp_path / "ws")
    assert later[key] == (offer_id(key), key.split(":")[1], DAY3)     # the offer id of the firing
    assert pending_rows(tmp_path / "ws")[key][:2] == ("offered", "budget")
    # and it never comes back
    assert ws.run(DAY4, deliver=False).new_offers == 0
    assert ws.run(DAY4.replace("T10", "T11"), deliver=False).reentered == {}


def test_a_campaign_without_when_and_pending_0d_use_a_stopped_firing_up(tmp_path):
    ws = milestone(tmp_path / "off", pending="0d")
    for day in (DAY1, DAY2, DAY3):
        ws.run(day, deliver=False)
    assert len(offers(tmp_path / "off")) == 1 and pending_rows(tmp_path / "off") == {}
    always = Workspace(tmp_path / "always")
    make_workspace(tmp_path / "always", """\
        everyone:
          reward: {coupon: {amount_off: 5}}
          channel: sms
          template: t
          budget: {max_offers: 1}
        """, customer("C0001") + customer("C0002"))
    assert always.run(DAY1, deliver=False).pending == {}
    assert pending_rows(tmp_path / "always") == {}


# --------------------------------------------------------------------------- consent and expiry


def test_a_firing_stopped_by_consent_is_offered_once_consent_is_given_before_it_expires(tmp_path):
    ws = milestone(tmp_path / "ws", budget="{}",
                   customers=customer("C0001", sms="false") + customer("C0002") + customer("C0003"))
    ws.run(DAY1, deliver=False)
    assert ws.run(DAY2, deliver=False).new_offers == 1                  # C0002; C0001 has no consent
    key = f"milestone:C0001:{pd.Timestamp(DAY2).isoformat()}"
    assert pending_rows(tmp_path / "ws")[key][:2] == ("pending", "consent")
    third = ws.run(DAY3, deliver=False)                                 # still no consent: waits
    assert (third.new_offers, third.reentered, third.funnels["milestone"]["consent"]) == (0, {"milestone": 1}, 0)
    set_consent(tmp_path / "ws", "C0001", "true")
    fourth = ws.run(DAY4, now=DAY4, deliver=True)
    assert fourth.new_offers == 1 and fourth.delivery.sent == 2        # with C0002's, recorded on the 2nd
    assert offers(tmp_path / "ws")[key] == (offer_id(key), "C0001", DAY4)
    assert pending_rows(tmp_path / "ws")[key][:2] == ("offered", "consent")
    sent = [json.loads(line) for line in (tmp_path / "ws" / "outbox" / "sms.jsonl").read_text().splitlines()]
    assert offer_id(key) in {line["offer_id"] for line in sent}


def test_a_firing_never_given_consent_expires_with_its_reason_and_is_never_offered(tmp_path):
    ws = milestone(tmp_path / "ws", budget="{}", pending="3d",
                   customers=customer("C0001", sms="false") + customer("C0002") + customer("C0003"))
    ws.run(DAY1, deliver=False)
    ws.run(DAY2, deliver=False)
    key = f"milestone:C0001:{pd.Timestamp(DAY2).isoformat()}"
    assert pending_rows(tmp_path / "ws")[key] == ("pending", "consent", "2026-12-02T02:00:00+00:00",
                                                  "2026-12-05T02:00:00+00:00")
    assert ws.run(DAY4, deliver=False).reentered == {"milestone": 1}
    fifth = ws.run(DAY5, deliver=False)                  # 3 days after it first fired: expired
    assert (fifth.reentered, fifth.pending) == ({}, {"expired": 1})
    assert pending_rows(tmp_path / "ws")[key][:2] == ("expired", "consent")
    set_consent(tmp_path / "ws", "C0001", "true")
    assert ws.run(DAY6, deliver=False).new_offers == 0
    assert key not in offers(tmp_path / "ws")
    history = ws.history("C0001")
    assert [(h["kind"], h["status"], h["reason"]) for h in history] == [("pending_firing", "expired", "consent")]


# --------------------------------------------------------------------------- reruns


def test_a_rerun_at_the_same_instant_records_nothing_twice(tmp_path):
    ws = milestone(tmp_path / "ws")
    ws.run(DAY1, deliver=False)
    ws.run(DAY2, deliver=False)
    again = ws.run(DAY2, deliver=False)
    assert (again.new_offers, again.pending) == (0, {})
    before = (offers(tmp_path / "ws"), pending_rows(tmp_path / "ws"))
    third = ws.run(DAY3, deliver=False)
    rerun = ws.run(DAY3, deliver=False)
    assert (third.new_offers, third.reentered) == (1, {"milestone": 1})
    # the rerun decides as the first attempt did: the pending firing comes back, is already recorded
    assert (rerun.new_offers, rerun.already_recorded, rerun.reentered, rerun.conflicts) == (0, 1, {"milestone": 1}, [])
    assert len(offers(tmp_path / "ws")) == 2 and set(offers(tmp_path / "ws")) > set(before[0])
    assert {status for status, *_ in pending_rows(tmp_path / "ws").values()} == {"offered"}
    assert query(tmp_path / "ws", "SELECT count(*) FROM pending_firings")[0][0] == 1


def test_a_rerun_that_decides_the_same_leaves_the_waiting_firings_as_they_were_written(tmp_path):
    ws = milestone(tmp_path / "ws", budget="{}",
                   customers=customer("C0001", sms="false") + customer("C0002") + customer("C0003"))
    ws.run(DAY1, deliver=False)
    third_day = [ws.run(DAY2, deliver=False), ws.run(DAY3, deliver=False)][1]     # C0001 waits for consent
    written = query(tmp_path / "ws", "SELECT * FROM pending_firings")
    assert [(row[7], row[8], row[9]) for row in written] == [("pending", "2026-12-03T02:00:00+00:00",
                                                              third_day.run_id)]
    rerun = ws.run(DAY3, deliver=False)
    assert (rerun.reentered, rerun.pending) == ({"milestone": 1}, {"pending": 1})   # decided the same
    assert query(tmp_path / "ws", "SELECT * FROM pending_firings") == written      # and left as written
    fourth = ws.run(DAY4, deliver=False)
    assert query(tmp_path / "ws", "SELECT status, status_as_of, updated_run FROM pending_firings") == [
        ("pending", "2026-12-04T02:00:00+00:00", fourth.run_id)]


# --------------------------------------------------------------------------- event values and templates


EVENT_TEMPLATE = "Thanks {{ customer.name }}: {{ reward.points }} points for {{ event.score }}\n"


def test_an_event_firing_keeps_the_values_it_fired_with(tmp_path):
    root = tmp_path / "ws"
    make_workspace(root, """\
        bonus:
          when: {event: purchase}
          reward: {points: floor(event.score) * 10}
          channel: sms
          template: t
          budget: {max_offers: 1, per: day}
        """, customer("C0001") + customer("C0002"),
        events="E1,C0001,2026-12-01 12:00:00,purchase,12.7\nE2,C0002,2026-12-01 13:00:00,purchase,30.2\n")
    (root / "templates" / "t.sms.j2").write_text(EVENT_TEMPLATE, encoding="utf-8")
    ws = Workspace(root)
    ws.run(DAY1, deliver=False)
    assert ws.run(DAY2, now=DAY2).new_offers == 1
    assert [reason for _, reason, *_ in pending_rows(root).values()] == ["budget"]
    stored = json.loads(query(root, "SELECT event FROM pending_firings")[0][0])
    assert stored["event_id"] in ("E1", "E2") and "cust_code" not in stored
    third = ws.run(DAY3, now=DAY3)
    assert third.new_offers == 1 and third.reentered == {"bonus": 1}
    points = dict(query(root, "SELECT customer_id, points FROM points_ledger"))
    assert points == {"C0001": 120, "C0002": 300}
    bodies = [json.loads(line)["body"] for line in (root / "outbox" / "sms.jsonl").read_text().splitlines()]
    assert sorted(bodies) == ["Thanks NC0001: 120 points for 12.7", "Thanks NC0002: 300 points for 30.2"]


def test_a_becomes_firing_whose_message_did_not_render_is_offered_once_the_template_is_fixed(tmp_path):
    root = tmp_path / "ws"
    ws = milestone(root, budget="{}")
    ws.run(DAY1, deliver=False)
    (root / "templates" / "t.sms.j2").write_text(
        "Hi {{ customer.name }} {{ 100 // (customer.lifetime_spend - 200) }}\n", encoding="utf-8")  # C0002: / 0
    second = ws.run(DAY2, deliver=False)
    assert second.new_offers == 1 and len(second.render_errors) == 1
    key = f"milestone:C0002:{pd.Timestamp(DAY2).isoformat()}"
    assert pending_rows(root)[key][:2] == ("pending", "render")
    (root / "templates" / "t.sms.j2").write_text("Hi {{ customer.name }}\n", encoding="utf-8")
    third = ws.run(DAY3, deliver=False)
    assert (third.new_offers, third.reentered, third.render_errors) == (1, {"milestone": 1}, [])
    assert offers(root)[key] == (offer_id(key), "C0002", DAY3)


# --------------------------------------------------------------------------- showing them


def test_preview_agrees_with_the_run_and_says_why_a_customer_waits(tmp_path):
    ws = milestone(tmp_path / "ws")
    ws.run(DAY1, deliver=False)
    ws.run(DAY2, deliver=False)
    [key] = pending_rows(tmp_path / "ws")
    waiting = key.split(":")[1]
    seen = ws.preview(DAY3, customer=waiting, sample=1)
    [campaign] = seen.campaigns
    assert (campaign.offers, campaign.pending, campaign.funnel["trigger"]) == (1, 1, 1)
    assert seen.as_dict()["campaigns"][0]["pending"] == 1
    [explained] = seen.explanation["campaigns"]
    assert explained["outcome"] == "offer"
    assert explained["note"] == "pending since 2026-12-02T10:00:00+08:00 (stopped by budget)"
    assert explained["pending"]["reason"] == "budget" and explained["pending"]["firing_key"] == key
    ran = ws.run(DAY3, deliver=False)
    assert (ran.new_offers, ran.funnels) == (campaign.offers, {"milestone": campaign.funnel})
    assert ws.history(waiting)[0]["pending_since"] == "2026-12-02T10:00:00+08:00"


def test_a_simulation_forecasts_pending_firings_as_the_runs_make_them(tmp_path):
    real = milestone(tmp_path / "real")
    made = [real.run(day, deliver=False).new_offers for day in (DAY1, DAY2, DAY3, DAY4)]
    forecast = milestone(tmp_path / "forecast").simulate(DAY1, "2026-12-04", fresh=True)
    per_day = forecast.offers.groupby(pd.to_datetime(forecast.offers["as_of"]).dt.strftime("%d")).size()
    assert [int(per_day.get(f"0{d}", 0)) for d in range(1, 5)] == made == [0, 1, 1, 0]
    assert set(forecast.offers["firing_key"]) == set(offers(tmp_path / "real"))
    # continuing from the state database: the waiting firing is forecast for the next day
    half = milestone(tmp_path / "half")
    half.run(DAY1, deliver=False)
    half.run(DAY2, deliver=False)
    rest = half.simulate(DAY3, "2026-12-04")
    assert list(rest.offers["firing_key"]) == list(pending_rows(tmp_path / "half"))


SPLIT_DAYS = (DAY1, DAY2, DAY3, DAY4, DAY5)


def twelve_milestones(root: Path) -> Path:
    """Twelve customers cross the milestone on 1 December; three offers a day, the rest wait 3 days."""
    customers = "".join(customer(f"C{i:04d}") for i in range(1, 13))
    orders = "".join(f"O{i},C{i:04d},2026-12-01 12:00:00,{100 + i}\n" for i in range(1, 13))
    make_workspace(root, """\
        milestone:
          when: {becomes: lifetime_spend >= 100}
          reward: {coupon: {amount_off: 5}}
          channel: sms
          template: t
          budget: {max_offers: 3, per: day}
          pending: 3d
        """, customers, orders=orders)
    return root


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[list, Path]:
    """The daily runs of ``twelve_milestones`` in one process, and the workspace after them (read-only)."""
    root = twelve_milestones(tmp_path_factory.mktemp("pending") / "one")
    return [Workspace(root).run(day, deliver=False) for day in SPLIT_DAYS], root


@pytest.mark.parametrize("split", [{"partitions": 2}, {"partitions": 3}, {"workers": 2}])
def test_partitions_and_workers_decide_pending_firings_as_one_process_does(one_process, tmp_path, split):
    one, one_root = one_process
    roots = [one_root, twelve_milestones(tmp_path / "split")]
    shown, apart = [], []
    for day in SPLIT_DAYS:    # a preview (streamed partitions) of each run, then the run
        [campaign] = Workspace(roots[1]).preview(day, sample=0, **split).campaigns
        shown.append((campaign.offers, campaign.pending))
        apart.append(Workspace(roots[1]).run(day, deliver=False, **split))
    assert [r.new_offers for r in one] == [r.new_offers for r in apart] == [0, 3, 3, 3, 0]
    assert [r.pending for r in one] == [r.pending for r in apart]
    assert shown == [(r.new_offers, r.reentered.get("milestone", 0)) for r in one]
    assert offers(roots[0]) == offers(roots[1]) and pending_rows(roots[0]) == pending_rows(roots[1])
    assert {status for status, *_ in pending_rows(roots[0]).values()} == {"offered", "expired"}


# --------------------------------------------------------------------------- crashes


ROOT = Path(__file__).resolve().parents[2]


def run_cli(root: Path, as_of: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """`loyalty run` in a subprocess, SIGKILLed at the ``engine.faults`` checkpoint ``crash_at``."""
    env = {k: v for k, v in os.environ.items() if k != "LOYALTY_CRASH_AT"}
    env["PYTHONPATH"] = str(ROOT)
    if crash_at is not None:
        env["LOYALTY_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "cli", "run", str(root), "--as-of", as_of, "--no-deliver",
                           "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def invoke_run(root: Path, as_of: str):
    """`loyalty run` in-process (never at a fault checkpoint)."""
    return CliRunner().invoke(main, ["run", str(root), "--as-of", as_of, "--no-deliver", "--format", "json"],
                              env={"LOYALTY_CRASH_AT": None}, catch_exceptions=False)


@pytest.fixture(scope="module")
def two_days(tmp_path_factory) -> Path:
    """Three customers cross the milestone, one offer a day: after the runs of DAY1 and DAY2, one
    offer and two pending firings (read-only: copy it to change it)."""
    root = tmp_path_factory.mktemp("pending") / "ws"
    make_workspace(root, """\
        milestone:
          when: {becomes: lifetime_spend >= 100}
          reward: {coupon: {amount_off: 5}}
          channel: sms
          template: t
          budget: {max_offers: 1, per: day}
        """, "".join(customer(f"C000{i}") for i in range(1, 5)),
        orders=ORDERS + "O4,C0004,2026-12-01 14:00:00,300\n")
    for day in (DAY1, DAY2):
        done = invoke_run(root, day)
        assert done.exit_code == 0, done.output
    return root


@pytest.mark.parametrize("crash_at", ["after_evaluation", "mid_transaction", "after_commit"])
def test_a_crash_between_evaluation_and_commit_leaves_nothing_half_written_and_the_rerun_records_it(
        two_days, tmp_path, crash_at):
    root = Path(shutil.copytree(two_days, tmp_path / "ws"))
    before = (offers(root), pending_rows(root))
    assert len(before[0]) == 1 and [s for s, *_ in before[1].values()] == ["pending", "pending"]

    crashed = run_cli(root, DAY3, crash_at)       # a process of its own, SIGKILLed at the checkpoint
    assert crashed.returncode == -9, crashed.stderr
    after_crash = (offers(root), pending_rows(root))
    if crash_at == "after_commit":
        assert len(after_crash[0]) == 2
        assert sorted(s for s, *_ in after_crash[1].values()) == ["offered", "pending"]
    else:   # nothing of the third day's run is in the database
        assert after_crash == before
        assert query(root, "SELECT count(*) FROM pending_firings WHERE status_as_of > ?",
                     ["2026-12-02T02:00:00+00:00"]) == [(0,)]

    rerun = invoke_run(root, DAY3)
    assert rerun.exit_code == 0, rerun.output
    result = json.loads(rerun.stdout)
    assert result["conflicts"] == [] and result["reentered"] == {"milestone": 2}
    assert result["new_offers"] == (0 if crash_at == "after_commit" else 1)
    final = (offers(root), pending_rows(root))
    assert len(final[0]) == 2 and len(final[1]) == 2
    assert sorted(s for s, *_ in final[1].values()) == ["offered", "pending"]
    [offered] = [key for key, (status, *_) in final[1].items() if status == "offered"]
    assert final[0][offered] == (offer_id(offered), offered.split(":")[1], DAY3)
    if crash_at == "after_commit":
        assert final == after_crash          # the rerun changed nothing


def test_history_lists_the_firings_that_wait_and_those_that_expired(tmp_path):
    ws = milestone(tmp_path / "ws", budget="{}", pending="2d",
                   customers=customer("C0001", sms="false") + customer("C0002") + customer("C0003"))
    for day in (DAY1, DAY2, DAY3):
        ws.run(day, deliver=False)
    waiting = CliRunner().invoke(main, ["history", str(tmp_path / "ws"), "--customer", "C0001"])
    assert waiting.exit_code == 0, waiting.output
    assert "pending since 2026-12-02T10:00:00+08:00 (stopped by consent), expires 2026-12-04T10:00:00+08:00" \
        in waiting.output
    ws.run(DAY4, deliver=False)
    gone = CliRunner().invoke(main, ["history", str(tmp_path / "ws"), "--customer", "C0001", "--format", "json"])
    [row] = json.loads(gone.output)
    assert (row["kind"], row["status"], row["reason"], row["campaign"]) == \
        ("pending_firing", "expired", "consent", "milestone")
    text = CliRunner().invoke(main, ["history", str(tmp_path / "ws"), "--customer", "C0001"])
    assert "expired 2026-12-04T10:00:00+08:00 (first fired 2026-12-02T10:00:00+08:00, last stopped by consent)" \
        in text.output
