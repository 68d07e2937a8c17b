"""`loyalty run --engine dask`: the workers render and write their offers, the client streams
the files into the state store in one transaction, and what is recorded is what a local run
records.

One LocalCluster of 2 single-threaded worker processes (the session's, see conftest.py). The
workspaces: the example programme on random orders with budgets that bind (pending firings,
holdouts, stored tiers, ``becomes:`` state, coupons, points), run on both engines and every
table of the state store compared, rendered texts included (coupon codes aside: their values
differ, they are unique); a rerun records and renders nothing; a crash between the workers'
writing and the client's commit leaves the state as it was; template errors are reported
as a local run reports them.
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

distributed = pytest.importorskip("distributed")

from test_partitions import _random_orders, _tighten  # noqa: E402

from engine import Workspace  # noqa: E402
from engine.app.demo import DEMO_AS_OF, build_demo_workspace  # noqa: E402
from engine.app.validation import load_workspace  # noqa: E402
from engine.execution.partition_run import WrittenRun  # noqa: E402
from engine.execution.pipeline import decide_or_write, parse_as_of  # noqa: E402
from engine.execution.run_files import clear_runs, runs_folder  # noqa: E402
from engine.state.runs import new_run_id  # noqa: E402
from engine.state.store import StateStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = 1500
SOON = "2026-11-25T10:00:00+08:00"        # two days later: pending firings come back

TABLES = {
    "offers": "SELECT offer_id, firing_key, campaign, campaign_name, customer_id, channel, variant, reward, "
              "cost, send_at, due_at, subject, body, html, address, locale, as_of, explanation, rule_version, "
              "payload_hash, status, attempts, suppressed_reason FROM offers",
    "coupon_codes": "SELECT offer_id, campaign, customer_id, expires_at FROM coupon_codes",
    "points_ledger": "SELECT entry_id, offer_id, customer_id, points, reason, as_of FROM points_ledger",
    "holdouts": "SELECT firing_key, campaign, customer_id, holdout_group, as_of FROM holdouts",
    "pending_firings": "SELECT firing_key, campaign, customer_id, reason, first_as_of, expires_at, event, status, "
                       "status_as_of FROM pending_firings",
    "trigger_state": "SELECT campaign, customer_id, key, value FROM trigger_state",
    "tier_history": "SELECT customer_id, from_tier, to_tier, reason, as_of, as_of_utc, seq, since, review_at, "
                    "grace_until, trial_until, trial_from FROM tier_history",
    "member_tiers": "SELECT customer_id, tier, since, review_at, grace_until, trial_until, trial_from, as_of_utc, "
                    "seq FROM member_tiers",
    "contacts": "SELECT customer_id, campaign, channel, contacted_at FROM contacts",
}
RESULT_FIELDS = ("new_offers", "already_recorded", "conflicts", "holdouts", "funnels", "render_errors", "warnings",
                 "reentered", "pending", "granted_without_message", "tier_moves", "campaigns")


@pytest.fixture(scope="module")
def address(dask_cluster) -> str:
    return dask_cluster.scheduler_address


@pytest.fixture(scope="module")
def tight(tmp_path_factory) -> Path:
    root = build_demo_workspace(tmp_path_factory.mktemp("dask-run") / "ws", CUSTOMERS)
    _tighten(root)
    _random_orders(root, seed=29)
    return root


@pytest.fixture(scope="module")
def runs(tight, tmp_path_factory, address) -> dict:
    """The same workspace run on each engine at DEMO_AS_OF, then two days later."""
    here = Path(shutil.copytree(tight, tmp_path_factory.mktemp("local") / "ws"))
    there = Path(shutil.copytree(tight, tmp_path_factory.mktemp("dask") / "ws"))
    done = {"here": here, "there": there}
    for as_of in (DEMO_AS_OF, SOON):
        done[("local", as_of)] = Workspace(here).run(as_of, deliver=False)
        done[("local", as_of, "tables")] = _tables(here)
        done[("dask", as_of)] = Workspace(there).run(as_of, deliver=False, engine="dask", scheduler=address,
                                                     partitions=5)
        done[("dask", as_of, "tables")] = _tables(there)
    return done


def _db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "state" / "loyalty.db")


def _without_codes(offers: pd.DataFrame) -> pd.DataFrame:
    """Each offer's coupon code replaced by a placeholder in its reward and its texts."""
    offers = offers.copy()
    for column in ("reward", "subject", "body", "html"):
        offers[column] = offers[column].astype(object)
    for index, reward in offers["reward"].items():
        code = (json.loads(reward) if reward else {}).get("code")
        if code:
            for column in ("reward", "subject", "body", "html"):
                text = offers.at[index, column]
                if isinstance(text, str):
                    offers.at[index, column] = text.replace(code, "<code>")
    return offers


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    with _db(root) as db:
        tables = {name: pd.read_sql_query(sql, db) for name, sql in TABLES.items()}
    tables["offers"] = _without_codes(tables["offers"])
    return {name: frame.sort_values(list(frame.columns)).reset_index(drop=True) for name, frame in tables.items()}


def _codes(root: Path) -> tuple[int, int, int]:
    with _db(root) as db:
        codes, distinct = db.execute("SELECT count(*), count(DISTINCT code) FROM coupon_codes").fetchone()
        coupons = db.execute("SELECT count(*) FROM offers WHERE json_extract(reward, '$.kind') = 'coupon'").fetchone()
    return codes, distinct, coupons[0]


def _result(result) -> dict:
    data = result.as_dict()
    return {name: data[name] for name in RESULT_FIELDS}


@pytest.mark.parametrize("as_of", [DEMO_AS_OF, SOON])
def test_a_dask_run_records_what_a_local_run_records(runs, as_of):
    local, remote = runs[("local", as_of)], runs[("dask", as_of)]
    assert local.new_offers > 100
    assert _result(remote) == _result(local)
    for name, frame in runs[("local", as_of, "tables")].items():
        pd.testing.assert_frame_equal(runs[("dask", as_of, "tables")][name], frame, obj=name)


def test_the_runs_record_every_kind_of_row(runs):
    """The comparison means something: budgets bind, firings wait and come back, members move
    tier, `becomes:` state and holdouts are written, coupons and points are given."""
    first, later = runs[("local", DEMO_AS_OF)], runs[("local", SOON)]
    assert any(f["budget"] < f["arbitration"] for f in first.funnels.values())
    assert first.pending.get("pending", 0) > 0 and later.pending.get("offered", 0) > 0
    assert first.holdouts > 0 and first.tier_moves["joined"]
    tables = runs[("dask", SOON, "tables")]
    for name in TABLES:
        assert len(tables[name]) > 0, name


def test_coupon_codes_are_unique_across_partitions(runs):
    codes, distinct, coupons = _codes(runs["there"])
    assert codes == distinct == coupons > 50


def test_the_run_folder_is_deleted_after_the_commit(runs):
    assert not runs_folder(runs["there"]).exists() or not any(runs_folder(runs["there"]).iterdir())


def test_a_rerun_records_nothing_new_and_renders_nothing(runs, address):
    there = runs["there"]
    before = _tables(there)
    again = Workspace(there).run(SOON, deliver=False, engine="dask", scheduler=address, partitions=5)
    expected = runs[("dask", SOON)]
    assert (again.new_offers, again.already_recorded, again.conflicts) == (0, expected.new_offers, [])
    after = _tables(there)
    for name, frame in before.items():
        if name == "trigger_state":     # a rerun flips the "evaluated" row's value, on the local engine too
            frame, after[name] = (f[f["customer_id"] != "*"].reset_index(drop=True) for f in (frame, after[name]))
        pd.testing.assert_frame_equal(after[name], frame, obj=name)
    # what the workers write for a rerun: the offers found recorded, no rendered message
    workspace = load_workspace(there)
    store = StateStore(workspace.settings.state_path)
    try:
        stamp = parse_as_of(SOON, workspace.settings.timezone)
        _, written = decide_or_write(workspace, stamp, store, None, new_run_id(stamp), engine="dask",
                                     scheduler=address, partitions=5)
    finally:
        store.close()
    assert isinstance(written, WrittenRun)
    assert written.paths("offers") == [] and len(written.paths("known")) > 0
    assert written.offers == expected.new_offers
    clear_runs(there)


def _cli_env(crash_at: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), LOYALTY_CRASH_AT=crash_at)
    return env


@pytest.mark.parametrize("crash_at", ["after_evaluation", "mid_transaction"])
def test_a_crash_between_writing_and_committing_leaves_the_state_as_it_was(runs, tight, tmp_path, address,
                                                                           crash_at):
    root = Path(shutil.copytree(tight, tmp_path / "ws"))
    command = [sys.executable, "-m", "cli", "run", str(root), "--as-of", DEMO_AS_OF, "--no-deliver",
               "--format", "json", "--engine", "dask", "--scheduler", address, "--partitions", "5"]
    crashed = subprocess.run(command, cwd=ROOT, env=_cli_env(crash_at), capture_output=True, text=True,
                             timeout=300)
    assert crashed.returncode == -9, crashed.stderr
    with _db(root) as db:
        assert db.execute("SELECT count(*) FROM offers").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM pending_firings").fetchone()[0] == 0
    left = [path for path in runs_folder(root).iterdir()]
    assert len(left) == 1 and any(left[0].glob("offers-*.jsonl.zst")), "the workers' files are left behind"
    rerun = Workspace(root).run(DEMO_AS_OF, deliver=False, engine="dask", scheduler=address, partitions=5)
    assert _result(rerun) == _result(runs[("local", DEMO_AS_OF)])
    for name, frame in runs[("local", DEMO_AS_OF, "tables")].items():
        pd.testing.assert_frame_equal(_tables(root)[name], frame, obj=name)
    assert not any(runs_folder(root).iterdir()), "the crashed attempt's files are deleted"


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """The example programme whose SMS templates divide by zero for the customers of RFM
    recency score 3 (which `loyalty validate` cannot know)."""
    root = build_demo_workspace(tmp_path_factory.mktemp("broken") / "ws", 400)
    for template in (root / "templates").glob("*.sms.*.j2"):
        template.write_text("{{ 100 // (customer.rfm_r - 3) }} " + template.read_text(encoding="utf-8"),
                            encoding="utf-8")
    return root


def test_render_errors_are_reported_and_wait_as_on_the_local_engine(broken, tmp_path, address):
    here = Path(shutil.copytree(broken, tmp_path / "local"))
    there = Path(shutil.copytree(broken, tmp_path / "dask"))
    local = Workspace(here).run(DEMO_AS_OF, deliver=False)
    remote = Workspace(there).run(DEMO_AS_OF, deliver=False, engine="dask", scheduler=address, partitions=4)
    assert len(local.render_errors) > 5
    assert "division" in local.render_errors[0]["error"] and local.pending.get("pending", 0) > 0
    assert _result(remote) == _result(local)
    for name, frame in _tables(here).items():
        pd.testing.assert_frame_equal(_tables(there)[name], frame, obj=name)


def test_a_changed_rule_reports_the_same_conflicts(runs, tight, tmp_path, address):
    """A coupon changed between a crash and the rerun: both engines report each recorded
    firing of it as a conflict and record nothing new for it."""
    here = Path(shutil.copytree(tight, tmp_path / "local"))
    there = Path(shutil.copytree(tight, tmp_path / "dask"))
    Workspace(here).run(DEMO_AS_OF, deliver=False)
    Workspace(there).run(DEMO_AS_OF, deliver=False, engine="dask", scheduler=address, partitions=5)
    for root in (here, there):
        for path in (root / "rules").glob("*.yaml"):
            text = path.read_text(encoding="utf-8")
            path.write_text(text.replace("percent_off: 20", "percent_off: 21"), encoding="utf-8")
    local = Workspace(here).run(DEMO_AS_OF, deliver=False)
    remote = Workspace(there).run(DEMO_AS_OF, deliver=False, engine="dask", scheduler=address, partitions=5)
    assert local.conflicts and local.new_offers == 0
    key = lambda conflict: conflict["firing_key"]  # noqa: E731
    assert sorted(remote.conflicts, key=key) == sorted(local.conflicts, key=key)
    assert (remote.new_offers, remote.already_recorded) == (local.new_offers, local.already_recorded)
