"""Simulation: in-memory replays agree exactly with real runs, and the forecast adds up."""

import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from engine import Workspace
from engine.app.simulation import parse_every, simulate, step_times
from engine.data.sampledata import copy_example_programme, write_sample_workspace
from engine.errors import LoyaltyError

START = "2026-09-20T10:00:00+08:00"
END = "2026-10-19"            # 30 daily steps, through National Day and the quarter's first day


def _workspace(target: Path, customers: int = 300) -> Path:
    write_sample_workspace(target, customers=customers)
    copy_example_programme(target)
    # small budgets, so that they bind in a 300-customer programme
    rules = target / "rules" / "campaigns_lifecycle.yaml"
    rules.write_text(rules.read_text(encoding="utf-8")
                     .replace("budget: {max_offers: 3000}", "budget: {max_offers: 2}")
                     .replace("budget: {max_cost: 20000, rank_by: lifetime_spend}",
                              "budget: {max_cost: 120, rank_by: lifetime_spend}"), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return _workspace(tmp_path_factory.mktemp("sim") / "ws")


@pytest.fixture(scope="module")
def forecast(workspace):
    return simulate(workspace, START, END, "1d")


def _recorded_offers(workspace: Path) -> pd.DataFrame:
    with sqlite3.connect(workspace / "state" / "loyalty.db") as db:
        return pd.read_sql_query("SELECT r.as_of, o.firing_key, o.variant, o.cost FROM offers o "
                                 "JOIN runs r ON r.run_id = o.run_id", db)


FIRST_RUNS = 10      # the runs a simulation continues from (a copy of the workspace is kept after them)


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """The offers of 30 real `loyalty run`s, one a day, on a copy of the workspace; and a copy
    of that workspace as it was after the first ten of them (read-only: copy it to change it)."""
    base = tmp_path_factory.mktemp("real")
    copy = base / "copy"
    shutil.copytree(workspace, copy)
    for n, as_of in enumerate(step_times(START, END, "1d", "Asia/Shanghai")):
        if n == FIRST_RUNS:
            shutil.copytree(copy, base / "after_ten")
        Workspace(copy).run(as_of.isoformat(), deliver=False)
    real = _recorded_offers(copy)
    real["day"] = pd.to_datetime(real["as_of"]).map(lambda t: t.date().isoformat())
    return real, base / "after_ten"


@pytest.fixture(scope="module")
def real_runs(runs) -> pd.DataFrame:
    return runs[0]


def _by_day(frame: pd.DataFrame) -> dict[str, list[str]]:
    return {d: sorted(g["firing_key"]) for d, g in frame.groupby("day")}


def _days(offers: pd.DataFrame) -> pd.DataFrame:
    return offers.assign(day=offers["as_of"].map(lambda t: t.date().isoformat()))


def test_thirty_daily_steps_agree_with_thirty_real_runs(workspace, forecast, real_runs):
    simulated = _days(forecast.offers)
    assert len(forecast.steps) == 30
    assert len(real_runs) > 100, "the sample should make plenty of offers"
    assert _by_day(simulated) == _by_day(real_runs)
    merged = simulated.merge(real_runs, on="firing_key", suffixes=("_sim", "_run"))
    assert len(merged) == len(real_runs)
    assert (merged["variant_sim"].fillna("") == merged["variant_run"].fillna("")).all()
    assert (merged["cost_sim"].round(2) == merged["cost_run"].round(2)).all()
    assert not (workspace / "state").exists(), "a simulation never creates the state database"
    assert forecast.earlier_runs == 0


def test_a_simulation_continues_from_the_recorded_runs_without_changing_them(runs, tmp_path):
    """Ten real runs, then a simulation of the twenty days after them: the same offers as the
    last twenty of thirty real runs (cooldowns, caps, firings already acted on and `becomes:`
    state come from the state database), and the database is left exactly as it was.

    The ten runs are the first ten of the thirty (``runs`` keeps the workspace after them)."""
    real_runs, after_ten = runs
    copy = tmp_path / "copy"
    shutil.copytree(after_ten, copy)
    times = step_times(START, END, "1d", "Asia/Shanghai")
    state = copy / "state"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in state.iterdir()}
    result = simulate(copy, times[10].isoformat(), END, "1d")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in state.iterdir()} == before
    assert result.earlier_runs == 10 and result.last_run == times[9].isoformat()
    later = real_runs[real_runs["day"] >= times[10].date().isoformat()]
    assert len(later) > 20
    assert _by_day(_days(result.offers)) == _by_day(later)
    fresh = simulate(copy, times[10].isoformat(), END, "1d", fresh=True)
    assert fresh.earlier_runs == 0 and fresh.total_offers > result.total_offers


def test_forecast_adds_up_per_campaign_and_week(forecast):
    assert forecast.total_offers == len(forecast.offers)
    assert sum(w["offers"] for w in forecast.weeks) == forecast.total_offers
    assert round(sum(w["cost"] for w in forecast.weeks), 2) == pytest.approx(forecast.total_cost)
    assert {w["week"] for w in forecast.weeks} >= {"2026-W39", "2026-W40"}
    points = next(c for c in forecast.campaigns if c.id == "membership_anniversary")
    assert points.points > 0 and points.points_value == pytest.approx(points.points * 0.01, abs=0.01)
    coupons = next(c for c in forecast.campaigns if c.id == "winback_at_risk")
    assert coupons.discount_value == coupons.cost


def test_budgets_that_bind_are_reported(forecast):
    welcome = next(c for c in forecast.campaigns if c.id == "welcome_pack")
    assert welcome.budget_bound_runs >= 1 and welcome.lost_to_budget >= 1
    assert all(b["kept"] < b["fired"] for b in forecast.budget_binding)
    per_run = forecast.offers[forecast.offers["campaign"] == "welcome_pack"].groupby("as_of").size()
    assert per_run.max() <= 2


def test_customers_contacted_most_and_json(forecast):
    top = forecast.top_customers
    assert top and top[0]["offers"] >= top[-1]["offers"]
    data = forecast.as_dict()
    assert "offers" not in data and data["total_offers"] == forecast.total_offers
    import json
    json.dumps(data, ensure_ascii=False)


def test_diff_compares_two_rule_versions(workspace, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(workspace, other)
    rules = other / "rules" / "campaigns_lifecycle.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("inactive_for: 60d", "inactive_for: 90d"),
                     encoding="utf-8")
    result = simulate(workspace, START, "2026-09-26", "1d", diff=other)
    row = next(d for d in result.diff if d["campaign"] == "winback_at_risk")
    # before: the other rules (90 days), after: this workspace's (60 days): more win-backs
    assert row["offers_after"] >= row["offers_before"]
    assert row["offers_change"] == row["offers_after"] - row["offers_before"]


def test_steps_keep_the_time_of_day_and_validate_every():
    times = step_times("2026-03-01T10:00", "2026-03-03", "1d", "Asia/Shanghai")
    assert [t.isoformat() for t in times] == ["2026-03-01T10:00:00+08:00", "2026-03-02T10:00:00+08:00",
                                              "2026-03-03T10:00:00+08:00"]
    assert len(step_times("2026-03-01", "2026-03-29", "1w", "Asia/Shanghai")) == 5
    assert parse_every("12h") == pd.Timedelta(hours=12)
    with pytest.raises(LoyaltyError):
        parse_every("daily")
