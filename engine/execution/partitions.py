"""Partitioned evaluation: customers split by a stable hash, decided a partition at a time.

A partition holds some customers with their own orders and events, and goes through
features, segments, triggers, contact policy, holdouts and arbitration alone: all of
these are decided per customer. Three steps need every customer and are reconciled
across partitions, so that the result is identical to one evaluation over everybody:

* RFM quintiles: each partition hands in the small recency/frequency/monetary inputs,
  the scores are ranked over all of them, and each partition gets its slice back;
* budgets: the partitions' arbitrated candidates (a small frame) are pooled and each
  campaign's budget is applied once over the pool;
* funnel counts: summed.

Features are computed in two passes (RFM inputs, then everything) so that only one
partition's feature frame is alive at a time; the rows of customers with a candidate
are kept for rendering. ``pos`` in the resulting offers indexes those kept rows.

Two ways in: ``evaluate_in_partitions`` splits tables already in memory;
``evaluate_streamed`` reads each partition's rows from the partitioned copy of the data
(``partitioned_data``: Parquet per partition, converted once), so that the whole data
set is never in memory at once.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from engine.config.model import LoadedWorkspace
from engine.data.features import compute_features, finish_features, local_features, rfm_from_inputs, rfm_inputs
from engine.data.sources import Tables, load_tables, merge_warnings
from engine.data.tiers import TierState
from engine.decide.budgets import budget_caps
from engine.decide.evaluation import evaluate
from engine.decide.triggers import RunContext
from engine.errors import DataError
from engine.execution.parallel import deciding_workers, evaluate_in_workers
from engine.execution.partitioned_data import (
    ensure_partitioned,
    estimated_customers,
    is_current,
    partition_folder,
    partition_numbers,
    partition_settings,
    read_manifest,
)
from engine.execution.parts import Decided, combine_parts, decide_part
from engine.progress import say

__all__ = ["Decided", "auto_partitions", "evaluate_in_partitions", "evaluate_streamed", "partition_numbers",
           "split_tables", "tiers_by_partition"]

BYTES_PER_CUSTOMER = 2_500           # loaded tables and features of one customer with ~10 orders, measured
ROWS_PER_PARTITION = 2_000_000       # default size when memory allows


def available_memory() -> int:
    """Bytes the system can still give (MemAvailable), or 4 GB when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_partitions(customers: int, memory: int | None = None) -> int:
    """Enough partitions that one partition's rows and features take at most an eighth of
    the free memory and at most ROWS_PER_PARTITION customers; 1 for small programmes."""
    memory = available_memory() if memory is None else memory
    per_partition = max(10_000, min(ROWS_PER_PARTITION, memory // 8 // BYTES_PER_CUSTOMER))
    return max(1, math.ceil(customers / per_partition))


def split_tables(tables: Tables, count: int) -> Iterator[Tables]:
    """The tables of each partition in turn: customers, with their orders and events
    (``cust_code`` renumbered to the partition's customer positions)."""
    numbers = partition_numbers(tables.customers["customer_id"], count)
    for number in range(count):
        yield partition_tables(tables, numbers, number)


def partition_tables(tables: Tables, numbers: np.ndarray, number: int) -> Tables:
    """One partition's customers with their orders and events."""
    members = np.flatnonzero(numbers == number)
    local = np.full(len(numbers), -1, dtype=np.int64)
    local[members] = np.arange(len(members))
    points = tables.point_redemptions
    return replace(tables, customers=tables.customers.iloc[members].reset_index(drop=True),
                   orders=_rows_of(tables.orders, local), events=_rows_of(tables.events, local),
                   redemptions=None, point_redemptions=None if points is None else _rows_of(points, local))


def tiers_by_partition(state: TierState | None, count: int) -> list[TierState | None]:
    """The stored tiers of each partition's customers (None: none recorded)."""
    if state is None:
        return [None] * count
    ids = state.members["customer_id"].astype(str)
    return state.split(partition_numbers(ids, count) if len(ids) else np.zeros(0), count)


def _rows_of(frame: pd.DataFrame, local: np.ndarray) -> pd.DataFrame:
    codes = local[frame["cust_code"].to_numpy(dtype=np.int64)]
    keep = codes >= 0
    part = frame[keep].reset_index(drop=True)
    part["cust_code"] = codes[keep]
    return part


# first pass: a partition's RFM inputs; second pass: its tables and local features
FirstPass = Callable[[int], dict | None]
SecondPass = Callable[[int], tuple[Tables, pd.DataFrame]]


def evaluate_in_partitions(workspace: LoadedWorkspace, tables: Tables, ctx: RunContext, count: int | None = None,
                           campaigns: list[str] | None = None, trace: bool = False,
                           progress: Callable[[str], None] | None = None, workers: int | None = None) -> Decided:
    """Features and evaluation in ``count`` partitions (automatic when None); identical
    offers, funnels and budgets whatever the count. A trace (``--customer``) needs every
    customer's stops and runs as one partition. With one partition, the decisions are
    taken in ``workers`` processes at once (``parallel``; automatic when None)."""
    settings, program = workspace.settings, workspace.program
    customers = len(tables.customers)
    count = auto_partitions(customers) if count is None else max(1, int(count))
    if count == 1 or trace:
        features = compute_features(tables, program, settings, ctx.as_of, ctx.points, ctx.tiers)
        workers = 1 if trace else deciding_workers(customers, workers)
        if workers > 1:
            decided = evaluate_in_workers(workspace, tables, features, ctx, workers, campaigns, progress)
            decided.warnings = tables.warnings
            return decided
        return Decided(evaluate(workspace, tables, features, ctx, campaigns, trace), features, customers, 1,
                       tables.warnings)
    numbers = partition_numbers(tables.customers["customer_id"], count)

    def local(number: int) -> tuple[Tables, pd.DataFrame]:
        part = partition_tables(tables, numbers, number)
        return part, local_features(part, program, settings, ctx.as_of)

    decided = _evaluate_parts(workspace, ctx, count, campaigns, lambda n: rfm_inputs(local(n)[1]), local,
                              progress)
    decided.warnings = tables.warnings
    return decided


def _evaluate_parts(workspace: LoadedWorkspace, ctx: RunContext, count: int, campaigns, first: FirstPass,
                    second: SecondPass, progress, spill: Path | None = None) -> Decided:
    """The two passes over the partitions and the global steps between and after them.

    Each partition keeps the feature rows of its candidates that a budget can still keep
    (in ``spill`` on disk when given); once the budgets are applied, only the offered
    customers' rows are gathered."""
    settings, program = workspace.settings, workspace.program
    inputs = {}
    for number in range(count):
        say(progress, f"RFM inputs, partition {number + 1}/{count}")
        found = first(number)
        if found is not None:         # None: a partition without customers
            inputs[number] = found
    if not inputs:
        raise DataError(str(settings.data["customers"].path or "customers"), "the customers table has no rows")
    scores = dict(zip(inputs, _global_rfm(list(inputs.values()))))

    decided, customers = [], 0
    caps = budget_caps(workspace, ctx.budget_used)
    tiers = tiers_by_partition(ctx.tiers, count)
    for number in inputs:
        say(progress, f"features and evaluation, partition {number + 1}/{count}")
        part, local = second(number)
        mine = replace(ctx, tiers=tiers[number])           # the stored tiers of this partition's members
        features = finish_features(local, program, settings, ctx.as_of, scores[number], part, ctx.points, mine.tiers)
        customers += len(features)
        decision, rows = decide_part(workspace, part, features, mine, campaigns, caps)
        length = len(rows)
        if spill is not None:
            path = spill / f"rows-{number}.pickle"
            rows.to_pickle(path)
            rows = path
        decided.append((decision, rows, length))
        del features, part, local
    say(progress, "budgets over every partition")
    return combine_parts(workspace, ctx, decided, customers, count)


# --------------------------------------------------------------------------- streaming from disk


def streamed_count(workspace: LoadedWorkspace, count: int | None) -> int:
    """The partition count of a streamed evaluation: ``count``, or automatic from the
    customers' row count when that is cheap to know (Parquet), else 1 (load whole).

    Automatic keeps the count of a current partitioned copy whose partitions are at most
    twice the size it would choose now (a quarter of the free memory), so that less free
    memory for a moment (e.g. right after the conversion wrote its files) does not mean
    converting the data again."""
    if count is not None:
        return max(1, int(count))
    customers = estimated_customers(workspace.settings, workspace.root)
    if customers is None:
        return 1
    needed = auto_partitions(customers)
    existing = (read_manifest(workspace.root) or {}).get("partitions")
    if needed > 1 and isinstance(existing, int) and 2 * existing >= needed and \
            is_current(workspace.settings, workspace.root, existing):
        return existing
    return needed


def evaluate_streamed(workspace: LoadedWorkspace, ctx: RunContext, count: int | None = None,
                      campaigns: list[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> Decided | None:
    """Partitioned evaluation reading each partition's rows from the partitioned copy of
    the data (converted first when missing or stale): bounded memory whatever the data
    size. None when one partition is enough (then the tables are loaded whole)."""
    settings, program = workspace.settings, workspace.program
    count = streamed_count(workspace, count)
    if count == 1:
        return None
    folder = ensure_partitioned(settings, workspace.root, count, progress)
    warnings: list[tuple[str, ...]] = []      # each partition's
    with tempfile.TemporaryDirectory(prefix="loyalty-partitions-") as temp:
        def first(number: int) -> dict | None:
            if pq.ParquetFile(partition_folder(folder, number) / "customers.parquet").metadata.num_rows == 0:
                return None
            tables = load_tables(partition_settings(settings, folder, number), workspace.root, as_source=True)
            warnings.append(tables.warnings)
            local = local_features(tables, program, settings, ctx.as_of)
            # evaluation needs the events (event triggers) and the points the orders (earn rules)
            earns = program.points is not None and any(r.source == "orders" for r in program.points.earn.values())
            kept = replace(tables, orders=tables.orders if earns else tables.orders.iloc[0:0], redemptions=None)
            with open(Path(temp) / f"part-{number}.pickle", "wb") as handle:
                pickle.dump((kept, local), handle, protocol=pickle.HIGHEST_PROTOCOL)
            return rfm_inputs(local)

        def second(number: int) -> tuple[Tables, pd.DataFrame]:
            path = Path(temp) / f"part-{number}.pickle"
            with open(path, "rb") as handle:
                part = pickle.load(handle)
            path.unlink()
            return part

        decided = _evaluate_parts(workspace, ctx, count, campaigns, first, second, progress, spill=Path(temp))
    decided.warnings = merge_warnings(warnings)
    return decided


def _global_rfm(inputs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """RFM scores ranked over every partition's customers, split back per partition."""
    pooled = {name: np.concatenate([part[name] for part in inputs]) for name in inputs[0]}
    scores = rfm_from_inputs(pooled)
    bounds = np.cumsum([0] + [len(next(iter(part.values()))) for part in inputs])
    return [{name: values[bounds[i]:bounds[i + 1]] for name, values in scores.items()}
            for i in range(len(inputs))]
