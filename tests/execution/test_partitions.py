"""Partitioned evaluation decides exactly what one evaluation over everybody decides.

The example programme on sample data (and on random, tie-heavy orders), with budgets
made small enough to bind, is evaluated in 1, 3 and 7 partitions: the offers (firing
keys, variants, costs, send times), the funnels, the holdouts and the budget outcomes
must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine import Workspace
from engine.app.demo import DEMO_AS_OF, build_demo_workspace
from engine.app.validation import load_workspace
from engine.data.sources import load_tables
from engine.execution.partitioned_data import is_current
from engine.execution.partitions import (
    auto_partitions,
    evaluate_in_partitions,
    evaluate_streamed,
    partition_numbers,
    split_tables,
)
from engine.execution.pipeline import parse_as_of, run_context

CUSTOMERS = 1500
PARTITIONS = (1, 3, 7)

# budgets small enough to bind on 1,500 customers, and a campaign ranked by a feature built on RFM
TIGHT_BUDGETS = {
    "budget: {max_offers: 3000}": "budget: {max_offers: 25}",
    "budget: {max_offers: 2000, max_cost: 20000}": "budget: {max_offers: 40, max_cost: 500}",
    "budget: {max_offers: 5000, max_cost: 100000}": "budget: {max_offers: 30, max_cost: 700}",
    "budget: {max_cost: 20000, rank_by: lifetime_spend}": "budget: {max_cost: 900, rank_by: lifetime_spend}",
    "budget: {max_cost: 30000, rank_by: monetary_365d}": "budget: {max_cost: 800, rank_by: monetary_365d}",
}
RFM_RULES = """\
version: 1
features:
  rfm_value: {expr: rfm_score * 10 + rfm_m}
campaigns:
  rfm_champions:
    name: RFM champions
    where: rfm_score >= 11
    reward: {points: {amount: rfm_value}}
    channel: email
    template: milestone
    priority: 66
    budget: {max_offers: 15, rank_by: rfm_value}
"""


def _tighten(workspace: Path) -> None:
    for path in (workspace / "rules").glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        for old, new in TIGHT_BUDGETS.items():
            text = text.replace(old, new)
        path.write_text(text, encoding="utf-8")
    (workspace / "rules" / "rfm_test.yaml").write_text(RFM_RULES, encoding="utf-8")


def _random_orders(workspace: Path, seed: int) -> None:
    """Replace the sample orders with random ones: few distinct amounts and days, so RFM has ties."""
    rng = np.random.default_rng(seed)
    customers = pd.read_csv(workspace / "data" / "customers.csv", dtype=str)["cust_no"].to_numpy()
    count = len(customers) * 6
    buyers = customers[(len(customers) * rng.random(count) ** 2).astype(int)]
    now = pd.Timestamp(DEMO_AS_OF).tz_convert("UTC").value // 1000
    stamps = now - rng.integers(0, 400, count) * 86_400_000_000 - rng.integers(0, 3, count) * 3_600_000_000
    pq.write_table(pa.table({
        "order_id": [f"R{i:07d}" for i in range(count)],
        "customer_id": buyers,
        "timestamp": pa.array(stamps, type=pa.timestamp("us", tz="UTC")),
        "amount": rng.choice([20.0, 99.0, 250.0, 1200.0, 5000.0], count),
    }), workspace / "data" / "orders.parquet")


@pytest.fixture(scope="module", params=["sample", "random"])
def workspace(request, tmp_path_factory) -> Path:
    root = build_demo_workspace(tmp_path_factory.mktemp("partitions") / "ws", CUSTOMERS)
    _tighten(root)
    if request.param == "random":
        _random_orders(root, seed=11)
    return root


def _decide(root: Path, count: int):
    workspace = load_workspace(root)
    as_of = parse_as_of(DEMO_AS_OF, workspace.settings.timezone)
    tables = load_tables(workspace.settings, workspace.root)
    return evaluate_in_partitions(workspace, tables, run_context(workspace, as_of), count)


def _offers(decided) -> pd.DataFrame:
    columns = ["campaign", "customer_id", "firing_key", "offer_id", "variant", "cost", "points",
               "send_at", "template", "locale", "reward_kind"]
    return decided.evaluation.offers[columns].sort_values("firing_key").reset_index(drop=True)


@pytest.fixture(scope="module")
def whole(workspace):
    """The evaluation in one partition: what every other way of evaluating must decide."""
    return _decide(workspace, 1)


def test_partitions_decide_exactly_as_one_evaluation(workspace, whole):
    offers = _offers(whole)
    funnels = whole.evaluation.funnels
    assert len(offers) > 100
    bound = [c for c, f in funnels.items() if f["budget"] < f["arbitration"]]
    assert len(bound) >= 3, f"budgets should bind: {funnels}"
    assert "rfm_champions" in bound
    for count in PARTITIONS[1:]:
        parted = _decide(workspace, count)
        assert parted.partitions == count
        pd.testing.assert_frame_equal(_offers(parted), offers)
        assert parted.evaluation.funnels == funnels
        held = lambda d: d.evaluation.holdouts.sort_values("firing_key").reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(held(parted), held(whole))
        assert parted.evaluation.edge_state == whole.evaluation.edge_state
        # the kept feature rows are the offered customers' own rows
        rows = parted.features.iloc[parted.evaluation.offers["pos"]]
        assert list(rows["customer_id"]) == list(parted.evaluation.offers["customer_id"])
        assert rows["rfm_score"].tolist() == \
            whole.features.iloc[whole.evaluation.offers["pos"]]["rfm_score"].tolist()


def test_preview_with_partitions_gives_the_same_figures(workspace):
    one = Workspace(workspace).preview(DEMO_AS_OF, partitions=1, sample=2)
    seven = Workspace(workspace).preview(DEMO_AS_OF, partitions=7, sample=2)
    assert one.as_dict() == seven.as_dict()


def test_every_customer_is_in_exactly_one_stable_partition(workspace):
    settings = load_workspace(workspace).settings
    tables = load_tables(settings, workspace)
    parts = list(split_tables(tables, 7))
    assert sum(len(p.customers) for p in parts) == len(tables.customers)
    assert sum(len(p.orders) for p in parts) == len(tables.orders)
    assert sum(len(p.events) for p in parts) == len(tables.events)
    for part in parts:
        ids = part.customers["customer_id"].to_numpy()
        assert (part.orders["customer_id"].to_numpy() == ids[part.orders["cust_code"].to_numpy()]).all()
    numbers = partition_numbers(tables.customers["customer_id"], 7)
    again = partition_numbers(tables.customers["customer_id"].iloc[::-1].reset_index(drop=True), 7)
    assert (numbers == again[::-1]).all()


def test_partition_count_grows_with_customers_and_shrinking_memory():
    assert auto_partitions(1_000, memory=8 << 30) == 1
    assert auto_partitions(1_000_000, memory=24 << 30) == 1
    assert auto_partitions(10_000_000, memory=24 << 30) > 1
    assert auto_partitions(1_000_000, memory=1 << 30) > auto_partitions(1_000_000, memory=16 << 30)


def _stream(root: Path, count: int):
    workspace = load_workspace(root)
    as_of = parse_as_of(DEMO_AS_OF, workspace.settings.timezone)
    return evaluate_streamed(workspace, run_context(workspace, as_of), count)


def test_streamed_partitions_decide_exactly_as_one_evaluation(workspace, whole):
    """Each partition read alone from the partitioned copy (CSV, Parquet and SQLite sources
    converted once), budgets binding: the same offers, funnels, holdouts and edge state."""
    for count in PARTITIONS[1:]:
        streamed = _stream(workspace, count)
        assert streamed.partitions == count and streamed.customers == CUSTOMERS
        pd.testing.assert_frame_equal(_offers(streamed), _offers(whole))
        assert streamed.evaluation.funnels == whole.evaluation.funnels
        held = lambda d: d.evaluation.holdouts.sort_values("firing_key").reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(held(streamed), held(whole))
        assert streamed.evaluation.edge_state == whole.evaluation.edge_state
        rows = streamed.features.iloc[streamed.evaluation.offers["pos"]]
        assert list(rows["customer_id"]) == list(streamed.evaluation.offers["customer_id"])
        assert is_current(load_workspace(workspace).settings, workspace, count)
    assert _stream(workspace, 1) is None       # one partition: the tables are loaded whole


def test_streamed_warnings_name_the_source_rows_as_one_load_does(workspace):
    settings = load_workspace(workspace).settings
    expected = load_tables(settings, workspace).warnings
    assert len(expected) >= 2          # invalid timezones and locales in the sample customers
    assert _stream(workspace, 7).warnings == expected


def test_the_partitioned_copy_is_rebuilt_when_the_data_changes(workspace, tmp_path):
    import shutil
    root = Path(shutil.copytree(workspace, tmp_path / "ws"))
    settings = load_workspace(root).settings
    first = _stream(root, 3)
    assert is_current(settings, root, 3)
    customers = root / "data" / "customers.csv"
    lines = customers.read_text(encoding="utf-8").splitlines(keepends=True)
    customers.write_text("".join(lines[:-100]), encoding="utf-8")      # 100 customers fewer
    assert not is_current(settings, root, 3)
    again = _stream(root, 3)
    assert again.customers == first.customers - 100 == CUSTOMERS - 100
    assert is_current(settings, root, 3)


def test_automatic_count_keeps_a_current_copy_with_small_enough_partitions(workspace, tmp_path, monkeypatch):
    import shutil

    from engine.execution import partitions
    root = Path(shutil.copytree(workspace, tmp_path / "ws"))
    pd.read_csv(root / "data" / "customers.csv", dtype=str).to_parquet(root / "data" / "customers.parquet")
    settings_file = root / "loyalty.yaml"
    settings_file.write_text(settings_file.read_text(encoding="utf-8").replace(
        "path: data/customers.csv", "path: data/customers.parquet"), encoding="utf-8")
    monkeypatch.setattr(partitions, "auto_partitions", lambda customers, memory=None: 2)
    loaded = load_workspace(root)
    assert partitions.streamed_count(loaded, None) == 2          # no copy yet
    _stream(root, 3)
    assert partitions.streamed_count(loaded, None) == 3          # smaller partitions: kept
    monkeypatch.setattr(partitions, "auto_partitions", lambda customers, memory=None: 6)
    assert partitions.streamed_count(loaded, None) == 3          # at most twice as big: still kept
    monkeypatch.setattr(partitions, "auto_partitions", lambda customers, memory=None: 7)
    assert partitions.streamed_count(loaded, None) == 7          # too big now: converted again
    assert partitions.streamed_count(loaded, 5) == 5


def test_a_streamed_preview_says_what_it_is_doing(workspace, tmp_path):
    import shutil
    root = Path(shutil.copytree(workspace, tmp_path / "ws"))
    loaded = load_workspace(root)
    said: list[str] = []
    evaluate_streamed(loaded, run_context(loaded, parse_as_of(DEMO_AS_OF, loaded.settings.timezone)), 3,
                      progress=said.append)
    assert "partitioning orders into 3 partitions: 0 rows done" in said
    assert said[-2:] == ["features and evaluation, partition 3/3", "budgets over every partition"]
