"""Stored tiers decide and record the same whichever way a run goes: in several partitions, in
worker processes, after a crash at any checkpoint, and in a simulation of the daily runs."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from pandas.testing import assert_frame_equal
from test_tiers import TRIAL, day, programme, tables

from cli import main
from engine import Workspace
from engine.app.simulation import format_text
from engine.data.tiers import TierState, decide_tiers, keep_slice
from engine.decide import evaluation
from engine.decide.evaluation import member_tier_moves
from engine.execution.pipeline import parse_as_of, prepare
from engine.faults import CHECKPOINTS
from engine.state.store import StateStore

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = [f"M{i:03d}" for i in range(40)]
WELCOME = """\
gold_welcome:
  when: {becomes: tier == "gold"}
  reward: {message: {}}
  channel: sms
  template: t
  priority: 10
"""


def members_orders(seed: int = 7, days: int = 60) -> list[tuple[str, int, float]]:
    """Members spending now and then, some a lot: every tier is reached, kept and lost."""
    rng = random.Random(seed)
    orders = []
    for member in MEMBERS:
        big = rng.random() < 0.4
        for n in range(-5, days):
            if rng.random() < (0.12 if big else 0.05):
                orders.append((member, n, round(rng.choice([150, 900, 2500, 7000, 12000, 26000][: 6 if big else 3])
                                              * rng.uniform(0.8, 1.2), 2)))
    return orders


def busy(root: Path, step: str = "one") -> Workspace:
    return programme(root, MEMBERS, members_orders(), campaigns=TRIAL + WELCOME, step=step)


def offers(root: Path) -> list[tuple]:
    with sqlite3.connect(root / "state" / "loyalty.db") as conn:
        return conn.execute("SELECT firing_key, reward FROM offers ORDER BY firing_key").fetchall()


def simulated_moves(history: pd.DataFrame) -> list[tuple]:
    """(customer, from, to, reason, as_of) of a simulation's tier history, as ``recorded_moves``."""
    return sorted(zip(history["customer_id"], history["from_tier"].fillna("-"), history["tier"].fillna("-"),
                      history["reason"], [t.isoformat() for t in history["as_of"]]))


def recorded_moves(root: Path, since: str = "") -> list[tuple]:
    recorded, _ = tables(root)
    return sorted((row[0], row[1] or "-", row[2] or "-", row[3], row[4]) for row in recorded if row[4] >= since)


def test_the_scenario_moves_members_every_way(busy_days):
    history, _ = tables(busy_days[20])          # after the daily runs of days 0 to 20
    reasons = {row[3] for row in history}
    assert {"joined", "qualified", "retained", "grace", "stepped down", "campaign gold_trial",
            "trial ended"} <= reasons, reasons


EVERY_OTHER_DAY = range(0, 21, 2)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """What one partition in one process records and shows, running every other day: the tier
    moves of each run, both tier tables, the offers, and the tier moves a preview at day 21 shows."""
    root = tmp_path_factory.mktemp("one") / "one"
    one = busy(root)
    moved = [one.run(day(n), deliver=False, partitions=1, workers=1).tier_moves for n in EVERY_OTHER_DAY]
    return {"moves": moved, "tables": tables(root), "offers": offers(root),
            "preview": one.preview(day(21), sample=0, partitions=1).tier_moves}


@pytest.mark.parametrize("options", [{"partitions": 3}, {"workers": 2}], ids=["partitions=3", "workers=2"])
def test_several_partitions_or_workers_record_what_one_records(one_process, tmp_path, options):
    split = busy(tmp_path / "split")
    for n, moves_of_one in zip(EVERY_OTHER_DAY, one_process["moves"]):
        assert moves_of_one == split.run(day(n), deliver=False, **options).tier_moves, n
    assert one_process["tables"] == tables(tmp_path / "split")
    assert one_process["offers"] == offers(tmp_path / "split")
    assert one_process["preview"] == split.preview(day(21), sample=0, **options).tier_moves


def _cli_run(root: Path, as_of: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOYALTY_CRASH_AT"}
    env["PYTHONPATH"] = str(ROOT)
    if crash_at is not None:
        env["LOYALTY_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "cli", "run", str(root), "--as-of", as_of, "--no-deliver"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def halfway(busy_days) -> tuple[Path, Path]:
    """A programme run daily up to day 12, and the same run once more at day 13 (read-only)."""
    return busy_days[12], busy_days[13]


@pytest.mark.parametrize("crash_at", [c for c in CHECKPOINTS if c != "mid_delivery"])
def test_a_crash_then_a_rerun_records_every_move_once(halfway, tmp_path, crash_at):
    base, reference = halfway
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    crashed = _cli_run(root, day(13), crash_at)
    assert crashed.returncode == -9, crashed.stderr
    after_crash = tables(root)
    if crash_at == "after_commit":
        assert after_crash == tables(reference)            # committed: everything is there
    else:
        assert after_crash == tables(base)                 # nothing of day 13 is half-written
    rerun = CliRunner().invoke(main, ["run", str(root), "--as-of", day(13), "--no-deliver"],      # in-process
                               env={"LOYALTY_CRASH_AT": None}, catch_exceptions=False)
    assert rerun.exit_code == 0, rerun.output
    assert tables(root) == tables(reference)
    assert offers(root) == offers(reference)
    assert any(row[4] == day(13) for row in tables(reference)[0]), "day 13 should move someone"


def test_a_simulation_of_sixty_days_agrees_with_sixty_runs(busy_days, tmp_path):
    real = busy_days[59]                    # after the daily runs of days 0 to 59
    forecast = busy(tmp_path / "forecast")
    simulated = forecast.simulate(day(0), day(59), fresh=True)
    assert simulated_moves(simulated.tier_history) == recorded_moves(real)
    assert len(recorded_moves(real)) > 100
    made = {key for key, _ in offers(real)}
    assert set(simulated.offers["firing_key"]) == made
    assert simulated.as_dict()["tier_moves"]["down"]
    assert "Tier moves over the simulation: up " in format_text(simulated)


def test_a_simulation_continues_from_the_recorded_tiers(busy_days, tmp_path):
    real = busy_days[29]                    # after the daily runs of days 0 to 29
    seeded = Workspace(shutil.copytree(busy_days[14], tmp_path / "seeded"))    # ... of days 0 to 14
    rest = seeded.simulate(day(15), day(29))
    assert rest.earlier_runs == 15
    assert simulated_moves(rest.tier_history) == recorded_moves(real, since=day(15))
    # the points multipliers and features read the simulated history, as the runs read theirs
    assert pd.Index(rest.offers["firing_key"]).isin([k for k, _ in offers(real)]).all()


def test_evaluation_takes_the_moves_decided_with_the_features(busy_days, monkeypatch):
    """The stored tiers' moves are decided once, with the features: evaluation takes them (a
    worker's slice of the rows, its own members' ones), and they are those deciding again gives."""
    workspace = Workspace(busy_days[12]).load()
    as_of = parse_as_of(day(13), "Asia/Shanghai")
    with StateStore(workspace.settings.state_path) as store:
        prepared = prepare(workspace, as_of, store)
    features, ctx = prepared.features, prepared.context
    again = decide_tiers(workspace.program, features, as_of, "Asia/Shanghai", ctx.tiers).moves
    part = features.iloc[10:30].reset_index(drop=True)
    keep_slice(features, part, 10, 30)
    part_again = decide_tiers(workspace.program, part, as_of, "Asia/Shanghai", ctx.tiers).moves
    assert len(again) and len(part_again) and len(part_again) < len(again)
    with monkeypatch.context() as patched:
        patched.setattr(evaluation, "decide_tiers", lambda *args: pytest.fail("decided again"))
        assert_frame_equal(member_tier_moves(workspace, features, ctx), again)
        assert_frame_equal(member_tier_moves(workspace, part, ctx), part_again)
    # from another stored state (or on a copy of the rows), they are decided again
    other = replace(ctx, tiers=TierState.empty())
    assert_frame_equal(member_tier_moves(workspace, features, other),
                       decide_tiers(workspace.program, features, as_of, "Asia/Shanghai", TierState.empty()).moves)
    assert_frame_equal(member_tier_moves(workspace, features.copy(), ctx), again)
