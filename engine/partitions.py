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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from .assignment import stable_fraction
from .evaluation import Evaluation, combine_partitions, evaluate, evaluate_partition
from .features import compute_features, finish_features, local_features, rfm_from_inputs, rfm_inputs
from .model import Workspace
from .sources import Tables
from .triggers import RunContext

PARTITION_SALT = "loyalty"            # independent of the programme's salt: partitions are not groups
BYTES_PER_CUSTOMER = 600             # features frame, measured: ~45 columns with text ids and names
ROWS_PER_PARTITION = 2_000_000       # default size when memory allows


def partition_numbers(customer_ids: pd.Series, count: int) -> np.ndarray:
    """The partition (0..count-1) of each customer id; the same id always lands in the same one."""
    if count <= 1:
        return np.zeros(len(customer_ids), dtype=np.int64)
    fraction = stable_fraction(pd.Series(customer_ids).astype(str), PARTITION_SALT, "partition")
    return np.minimum((fraction * count).astype(np.int64), count - 1)


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
    """Enough partitions that one partition's features take at most an eighth of the free
    memory and at most ROWS_PER_PARTITION customers; 1 for small programmes."""
    memory = available_memory() if memory is None else memory
    per_partition = max(10_000, min(ROWS_PER_PARTITION, memory // 8 // BYTES_PER_CUSTOMER))
    return max(1, math.ceil(customers / per_partition))


def split_tables(tables: Tables, count: int) -> Iterator[Tables]:
    """The tables of each partition in turn: customers, with their orders and events
    (``cust_code`` renumbered to the partition's customer positions)."""
    numbers = partition_numbers(tables.customers["customer_id"], count)
    for number in range(count):
        members = np.flatnonzero(numbers == number)
        local = np.full(len(numbers), -1, dtype=np.int64)
        local[members] = np.arange(len(members))
        yield replace(tables, customers=tables.customers.iloc[members].reset_index(drop=True),
                      orders=_rows_of(tables.orders, local), events=_rows_of(tables.events, local),
                      redemptions=None)


def _rows_of(frame: pd.DataFrame, local: np.ndarray) -> pd.DataFrame:
    codes = local[frame["cust_code"].to_numpy(dtype=np.int64)]
    keep = codes >= 0
    part = frame[keep].reset_index(drop=True)
    part["cust_code"] = codes[keep]
    return part


@dataclass
class Decided:
    """An evaluation and the feature rows its offers' ``pos`` refers to."""

    evaluation: Evaluation
    features: pd.DataFrame        # all customers (one partition) or the offered customers' rows
    customers: int
    partitions: int


def evaluate_in_partitions(workspace: Workspace, tables: Tables, ctx: RunContext, count: int | None = None,
                           campaigns: list[str] | None = None, trace: bool = False,
                           progress: Callable[[str], None] | None = None) -> Decided:
    """Features and evaluation in ``count`` partitions (automatic when None); identical
    offers, funnels and budgets whatever the count. A trace (``--customer``) needs every
    customer's stops and runs as one partition."""
    settings, program = workspace.settings, workspace.program
    customers = len(tables.customers)
    count = auto_partitions(customers) if count is None else max(1, int(count))
    if count == 1 or trace:
        features = compute_features(tables, program, settings, ctx.as_of)
        return Decided(evaluate(workspace, tables, features, ctx, campaigns, trace), features, customers, 1)

    inputs = []
    for number, part in enumerate(split_tables(tables, count)):
        _say(progress, f"RFM inputs, partition {number + 1}/{count}")
        inputs.append(rfm_inputs(local_features(part, program, settings, ctx.as_of)))
    scores = _global_rfm(inputs)

    decisions, kept, offset = [], [], 0
    for number, part in enumerate(split_tables(tables, count)):
        _say(progress, f"features and evaluation, partition {number + 1}/{count}")
        features = finish_features(local_features(part, program, settings, ctx.as_of), program, settings,
                                   ctx.as_of, scores[number])
        decision = evaluate_partition(workspace, part, features, ctx, campaigns)
        positions = np.unique(decision.arbitrated["pos"].to_numpy(dtype=np.int64))
        kept.append(features.iloc[positions])
        decision.arbitrated = decision.arbitrated.assign(
            pos=offset + np.searchsorted(positions, decision.arbitrated["pos"].to_numpy(dtype=np.int64)))
        offset += len(positions)
        decisions.append(decision)
        del features, part
    evaluation = combine_partitions(workspace, ctx.as_of, decisions)
    return Decided(evaluation, pd.concat(kept, ignore_index=True), customers, count)


def _global_rfm(inputs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """RFM scores ranked over every partition's customers, split back per partition."""
    pooled = {name: np.concatenate([part[name] for part in inputs]) for name in inputs[0]}
    scores = rfm_from_inputs(pooled)
    bounds = np.cumsum([0] + [len(next(iter(part.values()))) for part in inputs])
    return [{name: values[bounds[i]:bounds[i + 1]] for name, values in scores.items()}
            for i in range(len(inputs))]


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)

