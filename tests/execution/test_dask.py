"""The dask engine decides exactly what the local partitioned engine decides.

One LocalCluster of 2 single-threaded worker processes (the session's, see conftest.py)
serves the module. The example programme on sample data and on random orders with budgets
that bind, before and after a recorded run (recorded keys, contacts, cooldowns), gives the
same offers (firing keys, variants, costs), funnels, holdouts and budget outcomes on both
engines; a worker killed mid-evaluation changes nothing; an unreachable scheduler fails fast.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

from test_partitions import _random_orders, _tighten  # noqa: E402

from cli import main  # noqa: E402
from engine import Workspace  # noqa: E402
from engine.app.demo import DEMO_AS_OF, build_demo_workspace  # noqa: E402
from engine.app.validation import load_workspace  # noqa: E402
from engine.data.sources import load_tables  # noqa: E402
from engine.execution.dask_engine import evaluate_on_dask  # noqa: E402
from engine.execution.partitioned_data import convert, is_current, partitioned_folder  # noqa: E402
from engine.execution.partitions import evaluate_in_partitions  # noqa: E402
from engine.execution.pipeline import parse_as_of, run_context  # noqa: E402
from engine.state.store import StateStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = 1500
LATER = "2026-12-01T10:00:00+08:00"
NOW = "2026-11-26T12:00:00+08:00"          # delivery clock: every quiet-hours wait is over
OFFER_COLUMNS = ["campaign", "customer_id", "firing_key", "offer_id", "variant", "cost", "points",
                 "send_at", "template", "locale", "reward_kind", "channel", "priority", "recorded"]


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    """The session's LocalCluster (2 single-threaded worker processes) and a client of this module's."""
    with distributed.Client(dask_cluster) as client:
        yield dask_cluster, client


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build_demo_workspace(tmp_path_factory.mktemp("dask") / "ws", customers=300)


@pytest.fixture(scope="module")
def tight(tmp_path_factory) -> Path:
    root = build_demo_workspace(tmp_path_factory.mktemp("dask-random") / "ws", CUSTOMERS)
    _tighten(root)
    _random_orders(root, seed=23)
    return root


def _both(root: Path, as_of: str, cluster, store: bool = False, partitions: int = 4):
    workspace = load_workspace(root)
    stamp = parse_as_of(as_of, workspace.settings.timezone)
    state = StateStore(workspace.settings.state_path) if store else None
    try:
        ctx = run_context(workspace, stamp, state)
        local = evaluate_in_partitions(workspace, load_tables(workspace.settings, workspace.root), ctx, 3)
        remote = evaluate_on_dask(workspace, ctx, store=state, scheduler=cluster[0].scheduler_address,
                                  partitions=partitions)
    finally:
        if state is not None:
            state.close()
    return local, remote


def _offers(decided) -> pd.DataFrame:
    return decided.evaluation.offers[OFFER_COLUMNS].sort_values("firing_key").reset_index(drop=True)


def _assert_same(local, remote) -> None:
    pd.testing.assert_frame_equal(_offers(remote), _offers(local))
    assert remote.evaluation.funnels == local.evaluation.funnels
    held = lambda d: d.evaluation.holdouts.sort_values("firing_key").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(held(remote), held(local))
    assert remote.evaluation.edge_state == local.evaluation.edge_state
    assert remote.customers == local.customers
    # the feature rows shipped back are the offered customers' own, RFM ranked over everybody
    columns = ["customer_id", "rfm_r", "rfm_f", "rfm_m", "tier", "lifetime_spend", "points_balance",
               "points_expiring_30d", "points_next_expiry"]
    mine = remote.features.iloc[remote.evaluation.offers["pos"]][columns].reset_index(drop=True)
    theirs = local.features.iloc[local.evaluation.offers["pos"]][columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, theirs)


def test_the_example_programme_decides_the_same_on_dask(demo, cluster):
    local, remote = _both(demo, DEMO_AS_OF, cluster)
    assert len(local.evaluation.offers) > 20
    _assert_same(local, remote)
    assert remote.partitions == 4
    assert remote.dashboard


def test_random_data_with_binding_budgets_decides_the_same(tight, cluster):
    local, remote = _both(tight, DEMO_AS_OF, cluster, partitions=5)
    funnels = local.evaluation.funnels
    bound = [c for c, f in funnels.items() if f["budget"] < f["arbitration"]]
    assert len(bound) >= 3, f"budgets should bind: {funnels}"
    assert "rfm_champions" in bound
    _assert_same(local, remote)
    # only what a budget can keep comes back: fewer candidates than were arbitrated
    assert len(remote.evaluation.offers) == sum(f["offers"] for f in funnels.values())


def test_after_a_recorded_run_both_engines_see_the_same_history(tight, tmp_path, cluster):
    root = Path(shutil.copytree(tight, tmp_path / "ws"))
    first = Workspace(root).run(DEMO_AS_OF, deliver=False)
    assert first.new_offers > 0
    decided = {}
    for as_of in (DEMO_AS_OF, LATER):      # a rerun (keys recorded at this as_of), and a later run
        decided[as_of] = local, remote = _both(root, as_of, cluster, store=True)
        _assert_same(local, remote)
    assert decided[LATER][1].evaluation.offers["recorded"].sum() == 0
    # evaluating records nothing: the rerun at the recorded instant finds every one of its offers recorded
    again, _ = decided[DEMO_AS_OF]
    assert again.evaluation.offers["recorded"].all()


def test_budgets_per_period_see_what_earlier_runs_spent_on_both_engines(tight, tmp_path, cluster):
    """A monthly budget: a later run in the same month gets what is left, on either engine."""
    root = Path(shutil.copytree(tight, tmp_path / "ws"))
    for path in (root / "rules").glob("*.yaml"):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(line if "per:" in line else line.replace("budget: {", "budget: {per: month, ")
                                for line in lines), encoding="utf-8")
    first = Workspace(root).run(DEMO_AS_OF, deliver=False)
    assert first.new_offers > 0
    local, remote = _both(root, "2026-11-28T10:00:00+08:00", cluster, store=True)   # the same month
    _assert_same(local, remote)
    bound = [c for c, f in first.funnels.items() if f["budget"] < f["arbitration"]]
    assert bound and all(local.evaluation.funnels[c]["offers"] < first.funnels[c]["offers"] for c in bound)


def _pending(decided) -> pd.DataFrame:
    return decided.evaluation.pending.sort_values("firing_key").reset_index(drop=True)


def _pending_firings(root: Path) -> pd.DataFrame:
    """The pending_firings table, without the run ids."""
    with sqlite3.connect(root / "state" / "loyalty.db") as db:
        rows = pd.read_sql_query("SELECT firing_key, campaign, customer_id, reason, first_as_of, expires_at, event, "
                                 "status, status_as_of FROM pending_firings", db)
    return rows.sort_values("firing_key").reset_index(drop=True)


def test_pending_firings_come_back_and_are_recorded_the_same_on_both_engines(tight, tmp_path, cluster):
    """Firings stopped by the budgets and the contact policy of a first run wait; two days later
    both engines bring back the same ones, decide the same about them and record the same."""
    here = Path(shutil.copytree(tight, tmp_path / "local"))
    first = Workspace(here).run(DEMO_AS_OF, deliver=False)
    assert first.pending.get("pending", 0) > 10, first.pending
    there = Path(shutil.copytree(here, tmp_path / "dask"))
    soon = "2026-11-25T10:00:00+08:00"
    local, remote = _both(here, soon, cluster, store=True)
    _assert_same(local, remote)
    assert remote.evaluation.reentered == local.evaluation.reentered
    assert sum(local.evaluation.reentered.values()) == first.pending["pending"]
    pd.testing.assert_frame_equal(_pending(remote), _pending(local))
    assert set(local.evaluation.pending["status"]) >= {"pending", "offered"}
    # a preview on the cluster (offers left on the workers) counts them as a local preview does
    def counts(preview):
        return {c.id: (c.offers, c.pending, c.granted_without_message) for c in preview.campaigns}

    address = cluster[0].scheduler_address
    shown_local = Workspace(here).preview(soon, sample=1, engine="local")
    shown_remote = Workspace(here).preview(soon, sample=1, engine="dask", scheduler=address, partitions=4)
    assert counts(shown_remote) == counts(shown_local)
    assert sum(p for _, p, _ in counts(shown_local).values()) == first.pending["pending"]
    assert sum(g for _, _, g in counts(shown_local).values()) > 0
    expected = Workspace(here).run(soon, deliver=False)
    got = Workspace(there).run(soon, deliver=False, engine="dask", scheduler=cluster[0].scheduler_address)
    assert (got.new_offers, got.reentered, got.pending) == (expected.new_offers, expected.reentered, expected.pending)
    assert expected.pending.get("offered", 0) > 0
    pd.testing.assert_frame_equal(_recorded(there), _recorded(here))
    pd.testing.assert_frame_equal(_pending_firings(there), _pending_firings(here))


def _set_worker_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _file_channels(root: Path) -> Path:
    """Every channel of the example programme delivers to a JSON Lines file."""
    yaml = root / "loyalty.yaml"
    text = yaml.read_text(encoding="utf-8")
    text = text.replace("{send: smtp, host: localhost, port: 1025, sender: rewards@example.com}",
                        "{send: file, path: outbox/email.jsonl}")
    yaml.write_text(text, encoding="utf-8")
    return root


def _recorded(root: Path) -> pd.DataFrame:
    """The offers in the state store, without what differs by design (run ids, coupon codes, clocks)."""
    with sqlite3.connect(root / "state" / "loyalty.db") as db:
        offers = pd.read_sql_query("SELECT offer_id, firing_key, campaign, customer_id, channel, variant, "
                                   "cost, send_at, locale, explanation FROM offers", db)
    return offers.sort_values("firing_key").reset_index(drop=True)


def _sent(root: Path) -> list[str]:
    ids = []
    for path in sorted((root / "outbox").glob("*.jsonl")):
        ids += [json.loads(line)["offer_id"] for line in path.read_text(encoding="utf-8").splitlines()]
    return ids


def test_a_worker_killed_mid_run_changes_nothing_and_a_rerun_sends_nothing_twice(tight, tmp_path, cluster):
    local_cluster, client = cluster
    here = Path(shutil.copytree(tight, tmp_path / "local"))
    there = Path(shutil.copytree(tight, tmp_path / "dask"))
    for root in (here, there):
        _file_channels(root)
    expected = Workspace(here).run(DEMO_AS_OF, now=NOW)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "killed"
    client.run(_set_worker_env, "LOYALTY_DASK_CRASH_ONCE", str(marker))
    try:
        first = Workspace(there).run(DEMO_AS_OF, now=NOW, engine="dask", scheduler=local_cluster.scheduler_address)
    finally:
        client.run(_set_worker_env, "LOYALTY_DASK_CRASH_ONCE", None)
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists(), "a worker should have been killed"
    assert first.new_offers == expected.new_offers > 0
    assert first.funnels == expected.funnels
    pd.testing.assert_frame_equal(_recorded(there), _recorded(here))
    again = Workspace(there).run(DEMO_AS_OF, now=NOW, engine="dask", scheduler=local_cluster.scheduler_address)
    assert (again.new_offers, again.already_recorded) == (0, first.new_offers)
    sent = _sent(there)
    assert len(sent) == len(set(sent)) > 0 and sorted(sent) == sorted(_sent(here))
    client.wait_for_workers(2, timeout=30)


def _cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """`loyalty ARGS` in a subprocess (or ``python -c CODE ARGS``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = [sys.executable, "-c", code] if code else [sys.executable, "-m", "cli"]
    return subprocess.run([*start, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sample", ["0", "1", "3"])
def test_cli_preview_is_the_same_on_both_engines(demo, cluster, sample):
    command = ["preview", str(demo), "--as-of", DEMO_AS_OF, "--format", "json", "--sample", sample]
    local = CliRunner().invoke(main, command, catch_exceptions=False)
    remote = CliRunner().invoke(main, [*command, "--engine", "dask", "--scheduler", cluster[0].scheduler_address],
                                catch_exceptions=False)
    assert local.exit_code == remote.exit_code == 0, remote.output
    mine, theirs = json.loads(remote.stdout), json.loads(local.stdout)
    assert sum(c["offers"] for c in theirs["campaigns"]) > 20
    assert sum(len(c["samples"]) for c in theirs["campaigns"]) >= (int(sample) > 0)
    # the data warnings too: merged from the partitions, naming the user's files and rows
    assert {w.split(":")[0] for w in theirs["warnings"]} == {"data/customers.csv", "data/orders.parquet"}
    assert mine == theirs


@pytest.mark.parametrize("sample", [0, 1, 3])
def test_a_preview_keeps_the_offers_on_the_workers_and_shows_the_same(tight, cluster, sample):
    """Binding budgets on random data: the dask preview brings back only each campaign's
    first offers and per-campaign totals, and shows what the local preview shows."""
    from engine.decide.totals import SampledEvaluation
    local = Workspace(tight).preview(DEMO_AS_OF, sample=sample)
    remote = Workspace(tight).preview(DEMO_AS_OF, sample=sample, engine="dask", scheduler=cluster[0].scheduler_address,
                         partitions=5)
    assert remote.as_dict() == local.as_dict()
    assert isinstance(remote._evaluation, SampledEvaluation)
    campaigns = len(remote.campaigns)
    assert len(remote._evaluation.offers) <= sample * campaigns < local.total_offers
    assert len(remote._features) <= sample * campaigns * 5      # each partition's own first ones
    assert remote._evaluation.funnels == local._evaluation.funnels


def test_cli_run_twice_at_one_as_of_records_once(demo, tmp_path, cluster):
    root = _file_channels(Path(shutil.copytree(demo, tmp_path / "ws")))
    command = ["run", str(root), "--as-of", DEMO_AS_OF, "--now", NOW, "--format", "json",
               "--engine", "dask", "--scheduler", cluster[0].scheduler_address]
    first = CliRunner().invoke(main, command, catch_exceptions=False)
    second = CliRunner().invoke(main, command, catch_exceptions=False)
    assert first.exit_code == second.exit_code == 0, second.output
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["new_offers"] > 20 and one["already_recorded"] == 0
    assert (two["new_offers"], two["already_recorded"]) == (0, one["new_offers"])
    assert len(_recorded(root)) == one["new_offers"]
    sent = _sent(root)
    assert len(sent) == len(set(sent))


def test_an_unreachable_scheduler_fails_fast_with_exit_3_and_records_nothing(demo, tmp_path):
    root = Path(shutil.copytree(demo, tmp_path / "ws"))
    started = time.perf_counter()
    done = _cli("run", str(root), "--as-of", DEMO_AS_OF, "--engine", "dask", "--scheduler", "tcp://127.0.0.1:9")
    assert time.perf_counter() - started < 30
    assert done.returncode == 3, done.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in done.stderr
    assert "nothing was evaluated or recorded" in done.stderr
    assert "Traceback" not in done.stderr
    runs = CliRunner().invoke(main, ["runs", str(root), "--format", "json"], catch_exceptions=False)
    assert runs.exit_code == 0 and json.loads(runs.stdout) == []
    assert not (root / "outbox").exists() or not any((root / "outbox").iterdir())


BLOCK_DASK = """
import importlib.abc, runpy, sys

class NoDask(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dask", "distributed"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoDask())
sys.argv[0] = "loyalty"
runpy.run_module("cli", run_name="__main__")
"""


def test_without_dask_installed_the_error_names_the_install_command(demo):
    done = _cli("preview", str(demo), "--as-of", DEMO_AS_OF, "--engine", "dask", code=BLOCK_DASK)
    assert done.returncode == 3, done.stderr
    assert 'pip install "loyalty[dask]"' in done.stderr
    assert "Traceback" not in done.stderr and "ModuleNotFoundError" not in done.stderr
    local = _cli("preview", str(demo), "--as-of", DEMO_AS_OF, "--format", "json", code=BLOCK_DASK)
    assert local.returncode == 0, local.stderr      # the local engine needs no Dask


def test_conversion_writes_each_customers_rows_once_and_redoes_a_stale_copy(demo, tmp_path):
    root = Path(shutil.copytree(demo, tmp_path / "ws"))
    settings = load_workspace(root).settings
    folder = convert(settings, root, 3)
    assert is_current(settings, root, 3) and not is_current(settings, root, 4)
    customers = pd.concat(pd.read_parquet(folder / f"part-{n:04d}" / "customers.parquet") for n in range(3))
    source = pd.read_csv(root / "data" / "customers.csv", dtype=str)
    assert sorted(customers["cust_no"]) == sorted(source["cust_no"])      # their column names, text kept
    orders = [pd.read_parquet(folder / f"part-{n:04d}" / "orders.parquet") for n in range(3)]
    assert sum(map(len, orders)) == len(pd.read_parquet(root / "data" / "orders.parquet"))
    column = settings.data["orders"].columns.get("customer_id", "customer_id")
    for number, part in enumerate(orders):     # every order sits with its customer
        mine = set(pd.read_parquet(folder / f"part-{number:04d}" / "customers.parquet")["cust_no"])
        assert set(part[column].astype(str).str.strip()) <= mine | {"nan", ""} | _unknown(root)
    os.utime(root / "data" / "customers.csv", ns=(1, 1))
    assert not is_current(settings, root, 3)
    assert partitioned_folder(root).is_dir()
    # events come from SQLite: converted too
    assert (folder / "part-0000" / "events.parquet").is_file()


def _unknown(root: Path) -> set[str]:
    """Orders of customers missing from the customers table (the sample data has a few)."""
    settings = load_workspace(root).settings
    column = settings.data["orders"].columns.get("customer_id", "customer_id")
    orders = pd.read_parquet(root / "data" / "orders.parquet")[column].astype(str).str.strip()
    known = set(pd.read_csv(root / "data" / "customers.csv", dtype=str)["cust_no"].str.strip())
    return set(orders) - known


def test_more_partitions_than_needed_leave_some_empty_and_agree(cluster, tmp_path):
    from engine.app.scaffold import init_workspace
    root = tmp_path / "small"
    init_workspace(root)
    workspace = load_workspace(root)
    ctx = run_context(workspace, parse_as_of("2026-11-23T10:00:00+08:00", workspace.settings.timezone))
    local = evaluate_in_partitions(workspace, load_tables(workspace.settings, workspace.root), ctx, 1)
    remote = evaluate_on_dask(workspace, ctx, scheduler=cluster[0].scheduler_address, partitions=40)
    assert remote.customers == local.customers < 40
    pd.testing.assert_frame_equal(_offers(remote), _offers(local))
    assert remote.evaluation.funnels == local.evaluation.funnels


@pytest.mark.parametrize("seed", range(12))
def test_budget_cutoffs_from_ranked_summaries_keep_what_one_pooled_budget_keeps(tight, seed):
    """Ties in rank and hash, missing ranks, free offers, costs and counts that bind: the
    per-partition cut, the pairwise merges and the cut-offs keep exactly the candidates that
    the local engine's one budget step over all of them keeps."""
    import numpy as np

    from engine.decide.budgets import apply_budgets, budget_caps, within_budgets
    from engine.decide.evaluation import STAGES, PartitionDecision
    from engine.execution.partition_tasks import cutoffs_of, merge_ranked, ranked_of, within_cutoffs
    workspace = load_workspace(tight)
    caps = budget_caps(workspace)
    rng = np.random.default_rng(seed)
    size = 400
    free = next(c for c in sorted(workspace.program.campaigns) if c not in caps)
    campaigns = rng.choice(sorted(caps) + [free], size)
    candidates = pd.DataFrame({
        "campaign": campaigns, "customer_id": [f"C{i:05d}" for i in range(size)],
        "firing_key": [f"{c}:C{i:05d}" for i, c in enumerate(campaigns)],
        "rank": rng.choice([1.0, 2.0, 5.0, np.nan], size), "tiebreak": rng.choice([0.1, 0.5, 0.9], size),
        "cost": rng.choice([0.0, 5.0, 20.0, 60.0], size), "pos": np.arange(size)})
    numbers = rng.integers(0, int(rng.integers(1, 7)), size)
    decided = [(PartitionDecision(within_budgets(candidates[numbers == n], caps), {}, None, {}, [], set(), [], []),)
               for n in np.unique(numbers)]
    ranked = [ranked_of(part, caps) for part in decided]
    while len(ranked) > 1:
        ranked = [merge_ranked(*ranked[i:i + 2], caps) if i + 1 < len(ranked) else ranked[i]
                  for i in range(0, len(ranked), 2)]
    cutoffs = cutoffs_of(ranked[0], caps)
    kept = pd.concat([within_cutoffs(part[0].arbitrated, cutoffs) for part in decided])
    funnels = {c: dict.fromkeys(STAGES, 0) for c in [*caps, free]}
    expected = apply_budgets(candidates, funnels, caps)
    assert sorted(kept["firing_key"]) == sorted(expected["firing_key"])
    assert len(kept) < len(candidates)


def _forecast(result) -> dict:
    data = result.as_dict()
    return {k: data[k] for k in ("steps", "campaigns", "weeks", "budget_binding", "top_customers",
                                 "customers", "earlier_runs")}


def test_simulate_on_dask_forecasts_what_the_local_simulation_forecasts(tight, tmp_path, cluster):
    """A week of daily runs with binding budgets, from scratch and continuing after a real
    run: every step evaluated on the cluster (one cluster for the whole simulation, the
    in-memory history shipped to the tasks) gives the local forecast, step for step."""
    from engine.app.simulation import simulate
    root = Path(shutil.copytree(tight, tmp_path / "ws"))
    start, end = DEMO_AS_OF, "2026-11-30"
    address = cluster[0].scheduler_address
    local = simulate(root, start, end, fresh=True)
    remote = simulate(root, start, end, fresh=True, engine="dask", scheduler=address, partitions=3)
    assert local.total_offers > 0 and any(c.budget_bound_runs for c in local.campaigns)
    assert _forecast(remote) == _forecast(local)

    assert Workspace(root).run(DEMO_AS_OF, deliver=False).new_offers > 0
    later = "2026-11-24T10:00:00+08:00"
    local = simulate(root, later, end)
    remote = simulate(root, later, end, engine="dask", scheduler=address, partitions=3)
    assert local.earlier_runs == 1 and _forecast(remote) == _forecast(local)
