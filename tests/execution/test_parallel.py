"""Deciding in several processes (engine/execution/parallel.py) gives exactly one process's decisions.

The example programme on sample data with budgets small enough to bind, decided by 1, 2 and
3 processes: the offers, funnels, holdouts, `becomes` state and the offered customers'
feature rows must be identical; so must a preview and a run against the history of earlier
runs (recorded firings are looked up by the worker processes themselves). A worker that
dies is replaced by deciding its slice in the parent, and a worker forked while a run holds
the workspace's run lock does not keep it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from engine import Workspace
from engine.app.demo import DEMO_AS_OF, build_demo_workspace
from engine.app.validation import load_workspace
from engine.data.sources import load_tables
from engine.execution import parallel
from engine.execution.partitions import evaluate_in_partitions
from engine.execution.pipeline import parse_as_of, run_context
from engine.state import database
from engine.state.store import StateStore

sys.path.insert(0, str(Path(__file__).parent))
from test_partitions import _offers, _tighten  # noqa: E402

pytestmark = pytest.mark.skipif(not parallel.can_fork(), reason="worker processes need fork (Linux)")

CUSTOMERS = 1500
LATER = "2026-11-24T10:00:00+08:00"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = build_demo_workspace(tmp_path_factory.mktemp("parallel") / "ws", CUSTOMERS)
    _tighten(root)
    return root


def _decide(root: Path, workers: int, as_of=DEMO_AS_OF, store=None):
    workspace = load_workspace(root)
    tables = load_tables(workspace.settings, workspace.root)
    ctx = run_context(workspace, parse_as_of(as_of, workspace.settings.timezone), store)
    return evaluate_in_partitions(workspace, tables, ctx, 1, workers=workers)


def _same_decisions(one, many) -> None:
    pd.testing.assert_frame_equal(_offers(many), _offers(one))
    assert many.evaluation.funnels == one.evaluation.funnels
    held = lambda d: d.evaluation.holdouts.sort_values("firing_key").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(held(many), held(one))
    assert many.evaluation.edge_state == one.evaluation.edge_state
    rows = many.features.iloc[many.evaluation.offers["pos"]].reset_index(drop=True)
    expected = one.features.iloc[one.evaluation.offers["pos"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows, expected)


@pytest.fixture(scope="module")
def one(workspace):
    """One process's decisions: what the worker processes must decide."""
    return _decide(workspace, 1)


def test_workers_decide_exactly_as_one_process(workspace, one):
    funnels = one.evaluation.funnels
    assert len(one.evaluation.offers) > 100
    assert len([c for c, f in funnels.items() if f["budget"] < f["arbitration"]]) >= 3, "budgets should bind"
    for workers in (2, 3):
        _same_decisions(one, _decide(workspace, workers))


def test_with_the_history_of_earlier_runs_workers_decide_as_one_process(workspace, tmp_path):
    copies = {}
    for workers in (1, 2):
        root = tmp_path / f"ws{workers}"
        shutil.copytree(workspace, root)
        first = Workspace(root).run(DEMO_AS_OF, deliver=False, workers=workers)
        again = Workspace(root).run(DEMO_AS_OF, deliver=False, workers=workers)    # a rerun records nothing new
        assert first.new_offers > 100 and again.new_offers == 0
        assert again.already_recorded == first.new_offers
        copies[workers] = root
    recorded = []
    for root in copies.values():
        with StateStore(load_workspace(root).settings.state_path) as store:
            recorded.append(sorted(store.recorded_at()))
    assert recorded[0] == recorded[1]
    # a day later: firings recorded yesterday (looked up by the workers) never fire again
    with StateStore(load_workspace(copies[1]).settings.state_path) as store:
        one = _decide(copies[1], 1, LATER, store)
        many = _decide(copies[1], 3, LATER, store)
        assert set(one.evaluation.offers["firing_key"]) & set(recorded[0]) == set()
        _same_decisions(one, many)
    previews = [Workspace(copies[1]).preview(LATER, sample=2, workers=w).as_dict() for w in (1, 2)]
    assert previews[0] == previews[1]


def test_a_worker_that_dies_is_replaced_by_the_parent(workspace, one, monkeypatch):
    monkeypatch.setenv("LOYALTY_CRASH_AT", "in_worker")
    _same_decisions(one, _decide(workspace, 3))


def test_a_worker_forked_during_a_run_does_not_keep_the_run_lock(tmp_path):
    store = StateStore(tmp_path / "state.db")
    with store.lock():
        (fd,) = database._HELD_LOCKS
        child = os.fork()
        if child == 0:     # the worker: its copy of the lock's descriptor is closed
            try:
                os.fstat(fd)
            except OSError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.close()


def test_worker_count_follows_the_setting_else_the_cores_for_large_programmes(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    assert parallel.worker_count(10_000) == 1
    assert parallel.worker_count(120_000) == 2
    assert parallel.worker_count(5_000_000) == 4
    assert parallel.worker_count(10_000, configured=3) == 3
    assert parallel.worker_count(5_000_000, configured=1) == 1


def test_decisions_stay_in_one_process_on_two_cores_unless_asked(monkeypatch):
    """On two cores a second deciding process costs about what it saves: automatic is one."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    assert parallel.deciding_workers(5_000_000) == 1
    assert parallel.deciding_workers(5_000_000, configured=2) == 2
    assert parallel.worker_count(5_000_000) == 2, "rendering still uses both cores"
    monkeypatch.setattr(parallel, "cores", lambda: 8)
    assert parallel.deciding_workers(5_000_000) == 8
    assert parallel.deciding_workers(60_000) == 1
