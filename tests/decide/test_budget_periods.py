"""Budgets per period (issue 17): a day's, week's, month's or campaign's budget holds across runs,
in runs, previews and simulations alike."""

from __future__ import annotations

import pandas as pd
import pytest
from test_triggers import TZ, customer, make_workspace

from engine import Workspace
from engine.decide.budgets import period_start

CUSTOMERS = "".join(customer(f"C{i:04d}") for i in range(12))


def programme(root, budget: str, cooldown: str = "0d"):
    """Everyone is in the segment at every run (no trigger); only the budget limits the offers."""
    make_workspace(root, f"""\
        everyone:
          reward: {{coupon: {{amount_off: 10, valid_days: 7}}}}
          channel: sms
          template: t
          cooldown: {cooldown}
          budget: {budget}
        """, CUSTOMERS, policy="{max_messages: 100, per: 1d}")
    return Workspace(root)


def offers_per_run(ws: Workspace, days: list[str]) -> list[int]:
    return [ws.run(f"{day}T10:00:00+08:00", deliver=False).new_offers for day in days]


@pytest.mark.parametrize("per, start", [
    ("run", None),
    ("day", "2026-12-02T00:00:00+08:00"),
    ("week", "2026-11-30T00:00:00+08:00"),          # Monday
    ("month", "2026-12-01T00:00:00+08:00"),
    ("campaign", "1970-01-01T00:00:00+00:00"),
])
def test_periods_are_calendar_periods_in_the_programmes_timezone(per, start):
    as_of = pd.Timestamp("2026-12-02T01:30:00+08:00")          # still 1 December in UTC
    found = period_start(as_of, per, TZ)
    assert (found.isoformat() if found is not None else None) == start


def test_a_weekly_budget_holds_across_daily_runs_and_starts_again_on_monday(tmp_path):
    ws = programme(tmp_path / "ws", "{max_offers: 5, per: week}")
    days = ["2026-12-02", "2026-12-03", "2026-12-06", "2026-12-07", "2026-12-08"]   # Wed Thu Sun | Mon Tue
    assert offers_per_run(ws, days) == [5, 0, 0, 5, 0]


def test_a_daily_cost_budget_and_a_lifetime_offer_budget(tmp_path):
    daily = programme(tmp_path / "daily", "{max_cost: 30, per: day}")          # 10 a coupon: 3 a day
    assert [daily.run(at, deliver=False).new_offers for at in
            ("2026-12-02T09:00:00+08:00", "2026-12-02T15:00:00+08:00", "2026-12-03T09:00:00+08:00")] == [3, 0, 3]
    lifetime = programme(tmp_path / "lifetime", "{max_offers: 7, per: campaign}")
    assert offers_per_run(lifetime, ["2026-12-02", "2026-12-03", "2027-01-15"]) == [7, 0, 0]


def test_a_per_run_budget_is_the_same_at_every_run(tmp_path):
    ws = programme(tmp_path / "ws", "{max_offers: 4}")
    assert offers_per_run(ws, ["2026-12-02", "2026-12-03"]) == [4, 4]


def test_a_rerun_of_the_same_instant_does_not_count_its_own_offers_against_the_budget(tmp_path):
    ws = programme(tmp_path / "ws", "{max_offers: 5, per: month}")
    first = ws.run("2026-12-02T10:00:00+08:00", deliver=False)
    again = ws.run("2026-12-02T10:00:00+08:00", deliver=False)
    assert (first.new_offers, again.new_offers, again.already_recorded, again.conflicts) == (5, 0, 5, [])


def test_preview_shows_what_is_left_of_the_period(tmp_path):
    ws = programme(tmp_path / "ws", "{max_offers: 8, per: month}")
    assert ws.run("2026-12-02T10:00:00+08:00", deliver=False).new_offers == 8
    ws2 = programme(tmp_path / "ws2", "{max_offers: 8, per: month}")
    ws2.run("2026-12-02T10:00:00+08:00", deliver=False)
    (tmp_path / "ws2" / "rules" / "programme.yaml").write_text(
        (tmp_path / "ws2" / "rules" / "programme.yaml").read_text(encoding="utf-8").replace("max_offers: 8",
                                                                                              "max_offers: 11"),
        encoding="utf-8")
    later = ws2.preview("2026-12-20T10:00:00+08:00", sample=0)
    assert later.campaigns[0].offers == 3                 # 11 for December, 8 already made
    assert ws2.preview("2027-01-05T10:00:00+08:00", sample=0).campaigns[0].offers == 11     # a new month


def test_simulation_agrees_with_real_runs(tmp_path):
    budget = "{max_offers: 5, per: week}"
    real = programme(tmp_path / "real", budget)
    days = [f"2026-12-{d:02d}" for d in range(1, 15)]
    made = offers_per_run(real, days)
    forecast = programme(tmp_path / "forecast", budget).simulate("2026-12-01T10:00:00+08:00", "2026-12-14",
                                                                 fresh=True)
    per_day = forecast.offers.groupby(pd.to_datetime(forecast.offers["as_of"]).dt.strftime("%Y-%m-%d")).size()
    assert [int(per_day.get(day, 0)) for day in days] == made
    assert made[0] == made[6] == made[13] == 5 and sum(made) == 15    # Tuesday 1st; Mondays 7th and 14th
    budget_runs = [b for b in forecast.budget_binding if b["campaign"] == "everyone"]
    assert budget_runs and budget_runs[0]["lost"] == 12 - 5       # says when the budget runs out


def test_a_simulation_continues_from_what_the_period_already_spent(tmp_path):
    ws = programme(tmp_path / "ws", "{max_offers: 5, per: month}")
    assert ws.run("2026-12-02T10:00:00+08:00", deliver=False).new_offers == 5
    rest = ws.simulate("2026-12-03T10:00:00+08:00", "2026-12-31")
    assert rest.total_offers == 0                          # December's budget is spent
    january = ws.simulate("2026-12-31T10:00:00+08:00", "2027-01-02")
    assert january.total_offers == 5                       # 1 January starts a new month
