"""A share of the customers decided alone, and the global steps that join the shares.

Partitions (``partitions``) and worker processes (``parallel``) both split the customers:
each share is decided by ``decide_part``, cut to what the budgets can keep; ``combine_parts``
then applies the budgets over every share, sums the funnels and gathers the offered
customers' feature rows, so the result is that of one evaluation over everybody.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.data.sources import Tables
from engine.decide.budgets import within_budgets
from engine.decide.evaluation import (
    Evaluation,
    PartitionDecision,
    combine_partitions,
    evaluate_partition,
    keep_within,
)
from engine.decide.triggers import RunContext


@dataclass
class Decided:
    """An evaluation and the feature rows its offers' ``pos`` refers to."""

    evaluation: Evaluation
    features: pd.DataFrame        # all customers (one partition) or the offered customers' rows
    customers: int
    partitions: int
    warnings: tuple[str, ...] = ()


def decide_part(workspace: LoadedWorkspace, tables: Tables, features: pd.DataFrame, ctx: RunContext,
                campaigns: list[str] | None, caps: dict) -> tuple[PartitionDecision, pd.DataFrame]:
    """One partition's decision, cut to what the global budgets can keep, and the feature
    rows of its candidates (``pos`` renumbered to index those rows)."""
    decision = evaluate_partition(workspace, tables, features, ctx, campaigns)
    keep_within(workspace, decision, within_budgets(decision.arbitrated, caps))
    positions = np.unique(decision.arbitrated["pos"].to_numpy(dtype=np.int64))
    decision.arbitrated = decision.arbitrated.assign(
        pos=np.searchsorted(positions, decision.arbitrated["pos"].to_numpy(dtype=np.int64)))
    return decision, features.iloc[positions].reset_index(drop=True)


Part = tuple[PartitionDecision, "pd.DataFrame | Path", int]    # a decide_part result, its row count


def combine_parts(workspace: LoadedWorkspace, ctx: RunContext, decided: list[Part], customers: int, count: int) -> Decided:
    """The global steps over the partitions' ``decide_part`` results (their rows in memory,
    or pickled in a file): budgets, funnels, and the offered customers' rows."""
    decisions, kept, offset = [], [], 0
    for decision, rows, length in decided:
        decision.arbitrated = decision.arbitrated.assign(pos=offset + decision.arbitrated["pos"].to_numpy())
        kept.append((offset, length, rows))
        offset += length
        decisions.append(decision)
    evaluation = combine_partitions(workspace, ctx.as_of, decisions, used=ctx.budget_used, pending=ctx.pending)
    del decisions
    return Decided(evaluation, _offered_rows(evaluation, kept), customers, count)


def _offered_rows(evaluation: Evaluation, kept: list[tuple[int, int, pd.DataFrame | Path]]) -> pd.DataFrame:
    """The feature rows of the offered customers, gathered from the partitions' kept rows;
    the offers' ``pos`` is renumbered to index them."""
    positions = evaluation.offers["pos"].to_numpy(dtype=np.int64)
    needed = np.unique(positions)
    parts = []
    for start, length, rows in kept:
        inside = needed[(needed >= start) & (needed < start + length)] - start
        frame = pd.read_pickle(rows) if isinstance(rows, Path) else rows
        parts.append(frame.iloc[inside])
    evaluation.offers["pos"] = np.searchsorted(needed, positions)
    return pd.concat(parts, ignore_index=True)
