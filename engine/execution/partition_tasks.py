"""The partition function and the global reductions, as tasks any cluster can run.

Nothing here knows about Dask: a task takes a ``Job`` (workspace path, rule version,
partition count, ``as_of``) and a partition number, reads that partition's Parquet files
itself and returns small values. ``dask_engine`` schedules them on a Dask cluster; the
same functions run under Spark's ``mapInPandas`` (docs/scale.md).

The passes: ``rfm_counts`` per partition, merged with ``merge_counts`` into the score
``thresholds_of`` all customers; ``decide_partition`` (features and decisions, candidates
cut to what a budget can keep); ``ranked_of`` / ``merge_ranked`` / ``cutoffs_of``, the
budgets from ranked keys; ``summary_of`` a decided partition within the cut-offs, for
``evaluation.combine_partitions``; ``rows_at``, the offered customers' feature rows.
A preview needs less: ``preview_of`` a decided partition, its funnels and per-campaign
totals within the cut-offs and only its first offers per campaign with their feature rows.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from engine.config.loading import load_rules, rule_version
from engine.config.model import LoadedWorkspace
from engine.data.features import finish_features, local_features, rfm_inputs
from engine.data.points import PointsHistory
from engine.data.sources import load_tables
from engine.decide.budgets import BUDGET_KEY, budget_sorted, within_budgets
from engine.decide.evaluation import PartitionDecision, evaluate_partition, keep_within
from engine.decide.totals import CampaignTotals, campaign_totals
from engine.decide.triggers import RunContext
from engine.errors import WorkerSetupError
from engine.execution.partitioned_data import partition_folder, partition_settings, partitioned_folder
from engine.execution.partitions import partition_numbers, tiers_by_partition


@dataclass(frozen=True)
class Job:
    """What every task needs to find and check its work."""

    root: str
    version: str            # the client's rule version: workers must see the same rules
    count: int
    as_of: pd.Timestamp
    campaigns: list[str] | None

    @property
    def token(self) -> str:
        """Unique to this evaluation: names its tasks on a shared scheduler."""
        return f"{self.version}-{self.as_of.value}-{os.getpid()}-{id(self)}"


def recorded_by_partition(store, count: int) -> list[dict[str, str]]:
    """Firing key -> as_of (UTC) of every firing acted on (a recorded offer, a pending firing
    closed as expired or held out: ``StateStore.recorded_at``), split by the customer's partition."""
    if store is None:
        return [{} for _ in range(count)]
    rows = store.db.execute("SELECT o.customer_id, o.firing_key, r.as_of_utc FROM offers o "
                            "JOIN runs r ON r.run_id = o.run_id UNION ALL "
                            "SELECT customer_id, firing_key, status_as_of FROM pending_firings "
                            "WHERE status IN ('expired', 'held_out')")
    return split_by_partition(rows, count)


def split_by_partition(rows, count: int) -> list[dict[str, str]]:
    """(customer id, key, value) rows of a cursor as key -> value, one dict per partition of
    the customer, fetched 200,000 rows at a time."""
    parts: list[dict[str, str]] = [{} for _ in range(count)]
    while True:
        batch = rows.fetchmany(200_000)
        if not batch:
            return parts
        ids, keys, values = zip(*batch)
        numbers = partition_numbers(pd.Series(ids, dtype=object).astype(str), count)
        for number, key, value in zip(numbers.tolist(), keys, values):
            parts[number][key] = value


class Recorded:
    """``RunContext.recorded`` for one partition: a lookup in the keys shipped with the task."""

    def __init__(self, keys: Mapping[str, str]):
        self.keys = keys

    def __call__(self, keys: list[str]) -> dict[str, str]:
        return {key: self.keys[key] for key in keys if key in self.keys}


def context_slices(ctx: RunContext, count: int, recorded: list[dict]) -> list[RunContext]:
    """The run context restricted to each partition's customers (contacts, edge state, keys,
    points history, stored tiers and pending firings)."""
    contacts = ctx.contacts.reset_index(drop=True)
    numbers = partition_numbers(contacts["customer_id"].astype(str), count) if len(contacts) else np.zeros(0)
    pending = ctx.pending.reset_index(drop=True)
    waiting = partition_numbers(pending["customer_id"].astype(str), count) if len(pending) else np.zeros(0)
    states = {}
    for campaign, ids in ctx.edge_state.items():
        listed = sorted(ids)
        states[campaign] = (listed, partition_numbers(pd.Series(listed, dtype=object), count) if listed else [])
    points = _points_by_partition(ctx.points, count)
    tiers = tiers_by_partition(ctx.tiers, count)
    slices = []
    for number in range(count):
        edge_state = {campaign: frozenset(i for i, n in zip(listed, mine) if n == number)
                      for campaign, (listed, mine) in states.items()}
        slices.append(replace(ctx, contacts=contacts[numbers == number].reset_index(drop=True),
                              edge_state=edge_state, recorded=Recorded(recorded[number]),
                              points=points[number], tiers=tiers[number],
                              pending=pending[waiting == number].reset_index(drop=True)))
    return slices


def _points_by_partition(history: PointsHistory | None, count: int) -> list[PointsHistory | None]:
    """The points history of each partition's customers (grants and recorded tiers)."""
    if history is None:
        return [None] * count

    def split(frame: pd.DataFrame | None) -> list[pd.DataFrame | None]:
        if frame is None:
            return [None] * count
        numbers = partition_numbers(frame["customer_id"].astype(str), count) if len(frame) else np.zeros(0)
        return [frame[numbers == number].reset_index(drop=True) for number in range(count)]

    return [PointsHistory(grants, tiers) for grants, tiers in zip(split(history.grants), split(history.tiers))]


# --------------------------------------------------------------------------- in a task

_WORKSPACES: dict[tuple[str, str], LoadedWorkspace] = {}


def _workspace(job: Job) -> LoadedWorkspace:
    """The workspace as this worker sees it, loaded once per rule version."""
    cached = _WORKSPACES.get((job.root, job.version))
    if cached is not None:
        return cached
    if not (Path(job.root) / "loyalty.yaml").is_file():
        raise WorkerSetupError(f"worker {os.uname().nodename} cannot see the workspace at {job.root}: every "
                               "worker needs the workspace folder at the same path (a shared volume)")
    workspace = load_rules(job.root)
    if rule_version(workspace) != job.version:
        raise WorkerSetupError(f"the workspace at {job.root} on worker {os.uname().nodename} has other rules "
                               "than the client's: give every worker the same copy of the workspace")
    _WORKSPACES.clear()
    _WORKSPACES[(job.root, job.version)] = workspace
    return workspace


def _has_customers(job: Job, number: int) -> bool:
    path = partition_folder(partitioned_folder(job.root), number) / "customers.parquet"
    return pq.ParquetFile(path).metadata.num_rows > 0


def _local_features(job: Job, number: int):
    """Partition ``number``'s tables, read from its own files; messages name the user's
    sources and rows (``as_source``), to be merged with the other partitions' on the client."""
    workspace = _workspace(job)
    settings = partition_settings(workspace.settings, partitioned_folder(job.root), number)
    tables = load_tables(settings, Path(job.root), as_source=True)
    tables = replace(tables, redemptions=None)
    return workspace, tables, local_features(tables, workspace.program, workspace.settings, job.as_of)


RANKED = (("rfm_r", "days_since_last_order", False), ("rfm_f", "orders_365d", True),
          ("rfm_m", "monetary_365d", True))


def _keyed(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """The values as ``features.rfm_scores`` ranks them (rounded; negated when lower is better)."""
    keyed = np.round(np.asarray(values, dtype=float), 6)
    return keyed if higher_is_better else -keyed


def rfm_counts(job: Job, number: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Task: one partition's RFM inputs as distinct values and their counts."""
    if not _has_customers(job, number):
        return {score: (np.zeros(0), np.zeros(0, dtype=np.int64)) for score, _, _ in RANKED}
    _, _, frame = _local_features(job, number)
    inputs = rfm_inputs(frame)
    return {score: np.unique(_keyed(inputs[name], better), return_counts=True) for score, name, better in RANKED}


def merge_counts(left: dict, right: dict) -> dict:
    merged = {}
    for score in left:
        values = np.concatenate([left[score][0], right[score][0]])
        counts = np.concatenate([left[score][1], right[score][1]])
        unique, inverse = np.unique(values, return_inverse=True)
        merged[score] = (unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64))
    return merged


def thresholds_of(counts: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per score, the first keyed value of each score step: the quintile formula of
    ``features.rfm_scores`` applied to the pooled value counts."""
    out = {}
    for score, (values, sizes) in counts.items():
        total = int(sizes.sum())
        if total == 0:
            out[score] = (np.zeros(0), np.zeros(0, dtype=np.int64))
            continue
        below = np.cumsum(sizes) - sizes
        scores = (5 * (2 * below + sizes)) // (2 * total) + 1
        step = np.concatenate([[True], scores[1:] != scores[:-1]])
        out[score] = (values[step], scores[step])
    return out


def _scores_from(frame: pd.DataFrame, thresholds: dict) -> dict[str, np.ndarray]:
    inputs = rfm_inputs(frame)
    out = {}
    for score, name, better in RANKED:
        starts, steps = thresholds[score]
        keyed = _keyed(inputs[name], better)
        if not len(keyed):
            out[score] = np.zeros(0, dtype=np.int64)
            continue
        out[score] = steps[np.searchsorted(starts, keyed, side="right") - 1].astype(np.int64)
    return out


def decide_partition(job: Job, number: int, ctx: RunContext, thresholds: dict,
                      caps: dict) -> tuple[PartitionDecision | None, pd.DataFrame | None, int, list[str]]:
    """Task: one partition's features and decisions, cut to what the global budgets can keep;
    returns the decision, the feature rows of its candidates (in ``pos`` order), its
    customer count and its loader warnings."""
    _crash_once()
    if not _has_customers(job, number):
        return None, None, 0, []
    workspace, tables, frame = _local_features(job, number)
    features = finish_features(frame, workspace.program, workspace.settings, job.as_of,
                               _scores_from(frame, thresholds), tables, ctx.points, ctx.tiers)
    decision = evaluate_partition(workspace, tables, features, ctx, job.campaigns)
    keep_within(workspace, decision, within_budgets(decision.arbitrated, caps))
    positions = np.unique(decision.arbitrated["pos"].to_numpy(dtype=np.int64))
    rows = features.iloc[positions].set_axis(positions)      # labelled by their position
    return decision, rows, len(features), list(tables.warnings)


def _budget_prefix(group: pd.DataFrame, max_offers: int | None, max_cost: float | None) -> pd.DataFrame | None:
    """``group`` (rank, tiebreak, firing_key, cost) in budget order, cut to the prefix the
    budget keeps; None when costs are not all >= 0 (the kept set is then no prefix)."""
    ordered = budget_sorted(group)
    costs = ordered["cost"].to_numpy(dtype=float)
    if not (costs >= 0).all():
        return None
    keep = len(ordered) if max_offers is None else min(len(ordered), max_offers)
    if max_cost is not None:
        keep = min(keep, int(np.searchsorted(np.cumsum(costs) > max_cost + 1e-9, True)))
    return ordered.iloc[:keep]


def ranked_of(result: tuple, caps: dict) -> dict[str, pd.DataFrame]:
    """Task: a decided partition's candidates of budgeted campaigns, only what the budgets
    rank and count (rank, tiebreak, firing_key, cost)."""
    decision = result[0]
    if decision is None:
        return {}
    arbitrated = decision.arbitrated
    campaign = arbitrated["campaign"].to_numpy()
    return {campaign_id: arbitrated.loc[campaign == campaign_id, [*BUDGET_KEY, "cost"]].reset_index(drop=True)
            for campaign_id in caps if (campaign == campaign_id).any()}


def merge_ranked(left: dict, right: dict, caps: dict) -> dict:
    """Task: two sets of ranked candidates pooled, each campaign cut to what its budget keeps
    (a campaign without a prefix cut keeps everything)."""
    merged = {}
    for campaign_id in sorted(set(left) | set(right)):
        frames = [side[campaign_id] for side in (left, right) if campaign_id in side]
        group = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        kept = _budget_prefix(group, *caps[campaign_id])
        merged[campaign_id] = group if kept is None else kept.reset_index(drop=True)
    return merged


def cutoffs_of(ranked: dict, caps: dict) -> dict[str, tuple | None]:
    """Task: per campaign, the key of the last candidate its budget keeps (None: none kept)."""
    cutoffs = {}
    for campaign_id, group in ranked.items():
        kept = _budget_prefix(group, *caps[campaign_id])
        if kept is not None:
            cutoffs[campaign_id] = tuple(kept.iloc[-1][BUDGET_KEY]) if len(kept) else None
    return cutoffs


def within_cutoffs(arbitrated: pd.DataFrame, cutoffs: dict) -> pd.DataFrame:
    """The candidates at or before their campaign's cut-off in budget order."""
    if not len(arbitrated) or not cutoffs:
        return arbitrated
    keep = np.ones(len(arbitrated), dtype=bool)
    campaign = arbitrated["campaign"].to_numpy()
    for campaign_id, cutoff in cutoffs.items():
        rows = np.flatnonzero(campaign == campaign_id)
        if not len(rows):
            continue
        keep[rows] = False
        if cutoff is None:
            continue
        group = arbitrated.iloc[rows][BUDGET_KEY].reset_index(drop=True)
        sentinel = pd.DataFrame([cutoff], columns=BUDGET_KEY, index=[len(group)]).astype(group.dtypes.to_dict())
        order = budget_sorted(pd.concat([group, sentinel])).index.to_numpy()
        before = order[:int(np.flatnonzero(order == len(group))[0])]      # stable: the cut-off row itself too
        keep[rows[before]] = True
    return arbitrated[keep]


def summary_of(result: tuple, cutoffs: dict, job: Job) -> tuple[PartitionDecision | None, int, list[str]]:
    """Task: a decided partition without its feature rows, its candidates within the
    budget cut-offs (what the global steps need; those cut off that wait are pending)."""
    decision, _, customers, warnings = result
    if decision is not None:
        decision = replace(decision)
        keep_within(_workspace(job), decision, within_cutoffs(decision.arbitrated, cutoffs))
    return decision, customers, warnings


@dataclass
class PartitionPreview:
    """What a preview needs of one decided partition: its decision with, as candidates,
    only its first ``sample`` offers per campaign by customer id (``pos`` indexing
    ``features``, their feature rows) and its funnels counting the offers it keeps; the
    per-campaign totals of all its offers; its customer count and loader warnings."""

    decision: PartitionDecision | None
    features: pd.DataFrame | None
    totals: dict[str, CampaignTotals]
    customers: int
    warnings: list[str]


OFFER_ORDER = ["campaign", "customer_id", "firing_key"]     # the order of ``Evaluation.offers``


def preview_of(result: tuple, cutoffs: dict, sample: int) -> PartitionPreview:
    """Task: a decided partition summed up for a preview. Every candidate within the
    budget cut-offs is an offer (what a budget keeps is the prefix up to its cut-off), so
    the partition counts its own offers, and the global first N per campaign are among
    the partitions' own first N."""
    decision, rows, customers, warnings = result
    if decision is None:
        return PartitionPreview(None, None, {}, customers, warnings)
    offers = within_cutoffs(decision.arbitrated, cutoffs)
    funnels = {campaign_id: dict(funnel) for campaign_id, funnel in decision.funnels.items()}
    totals = campaign_totals(offers, list(funnels))
    for campaign_id, total in totals.items():
        if total.offers:
            funnels[campaign_id]["budget"] = funnels[campaign_id]["offers"] = total.offers
    first = offers.sort_values(OFFER_ORDER, kind="stable").groupby("campaign", sort=True).head(max(sample, 0))
    positions = np.unique(first["pos"].to_numpy(dtype=np.int64))
    first = first.assign(pos=np.searchsorted(positions, first["pos"].to_numpy(dtype=np.int64)))
    keys = set(first["firing_key"])
    decision = replace(decision, arbitrated=first, funnels=funnels, holdouts=decision.holdouts.iloc[0:0],
                       edge_state={}, same_run={key for key in decision.same_run if key in keys},
                       candidates=[], stops=[])
    return PartitionPreview(decision, rows.loc[positions].reset_index(drop=True), totals, customers, warnings)


def rows_at(result: tuple, positions: np.ndarray) -> pd.DataFrame:
    """Task: the feature rows at ``positions`` of a decided partition's features."""
    return result[1].loc[positions]


def _crash_once() -> None:
    """Fault injection for tests: with LOYALTY_DASK_CRASH_ONCE naming a file that does not
    exist yet, create it and kill this worker process, as a lost machine would."""
    marker = os.environ.get("LOYALTY_DASK_CRASH_ONCE")
    if marker:
        try:
            with open(marker, "x", encoding="ascii"):
                pass
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
