"""The dask engine: partitioned evaluation with each partition a task on a Dask cluster.

The partition function is the local one (``local_features`` -> ``finish_features`` ->
``evaluate_partition``); only where it runs changes. Every task takes the workspace
folder and a partition number and reads that partition's Parquet files itself
(``partitioned_data``), so the client never loads a table. What crosses the network:

* to workers: the partition's slice of contact history, recorded firing keys and
  ``becomes`` state (small), and the RFM thresholds (a few numbers);
* from workers: per-partition value counts of the RFM inputs (merged on the cluster,
  only the thresholds reach the client), funnel counts, holdouts, and the arbitrated
  candidates (cut to what a budget can keep);
* last, from the workers that hold them: the feature rows of the customers whose
  candidates became offers (for rendering).

The client applies the global steps exactly as ``partitions.evaluate_in_partitions``
does (``combine_partitions``), so offers, funnels and budgets are identical to
``--engine local``. A task lost with its worker is run again by Dask; tasks are pure
(they read files and return values), so a retry decides the same.
"""

from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from .errors import LoyaltyError
from .evaluation import PartitionDecision, combine_partitions, evaluate_partition
from .features import finish_features, local_features, rfm_inputs
from .model import Workspace
from .partitioned_data import (ensure_partitioned, estimated_customers, partition_folder, partition_settings,
                               partitioned_folder)
from .partitions import Decided, partition_numbers
from .sources import load_tables, merge_warnings
from .triggers import RunContext
from .workspace import load_workspace, rule_version

INSTALL_HINT = 'pip install "loyalty[dask]"'
CONNECT_TIMEOUT = 5.0              # seconds to reach a scheduler before giving up
WORKER_WAIT = 60.0                 # seconds to wait for a first worker (an autoscaling cluster starts one)
CUSTOMERS_PER_PARTITION = 1_000_000
UNREACHABLE_HINT = ("Check the address and that the scheduler runs, or leave out --scheduler "
                    "to start a cluster on this machine.")


class ClusterError(LoyaltyError):
    """The dask engine cannot run: Dask is not installed, the scheduler cannot be reached,
    a worker cannot see the workspace, or the cluster failed mid-evaluation."""

    exit_code = 3


@dataclass
class DaskDecided(Decided):
    """``Decided`` from a cluster, with what the workers' loaders warned about."""

    table_warnings: tuple[str, ...] = ()
    dashboard: str | None = None


def evaluate_on_dask(workspace: Workspace, ctx: RunContext, *, store=None,
                     campaigns: list[str] | None = None, scheduler: str | None = None,
                     partitions: int | None = None,
                     progress: Callable[[str], None] | None = None) -> DaskDecided:
    """Evaluate ``workspace`` at ``ctx.as_of`` on a Dask cluster; the same result as
    ``evaluate_in_partitions`` (offers, funnels, budgets, holdouts, edge state).

    ``scheduler``: a scheduler address (``tcp://host:8786``); None starts a LocalCluster
    sized to this machine for the duration of the call. ``store``: the state store the
    context was read from, whose recorded firing keys each partition needs."""
    distributed = _import_distributed()
    root = Path(workspace.root).resolve()
    count = partitions or default_partitions(workspace, root)
    ensure_partitioned(workspace.settings, root, count, progress)
    recorded = _recorded_by_partition(store, count)
    with _connect(distributed, scheduler) as client, _cluster_failures(distributed, scheduler):
        dashboard = client.dashboard_link
        _say(progress, f"Dask dashboard: {dashboard}")
        job = _Job(str(root), rule_version(workspace), count, ctx.as_of, campaigns)
        thresholds = _rfm_thresholds(distributed, client, job, progress)
        contexts = _context_slices(ctx, count, recorded)
        caps = _budget_caps(workspace)
        # the decided partitions stay on their workers. Budgets: each partition's ranked
        # candidates of budgeted campaigns (rank, tiebreak, key, cost) are merged pairwise
        # on the cluster, each merge cut to what the budget keeps, and the client gets one
        # cut-off per campaign. The partitions then send their candidates within the
        # cut-offs, and at last the feature rows of the customers who got an offer.
        decided = [client.submit(_decide_partition, job, number, contexts[number], thresholds, caps,
                                 key=f"loyalty-decide-{job.token}-{number}", pure=False)
                   for number in range(count)]
        cutoffs = _budget_cutoffs(distributed, client, decided, caps, job, progress)
        summaries = [client.submit(_summary_of, part, cutoffs, key=f"loyalty-summary-{job.token}-{number}",
                                   pure=False) for number, part in enumerate(decided)]
        parts = client.gather(summaries)
        decisions, starts, warnings, offset, customers = [], [], [], 0, 0
        for number, (decision, part_customers, part_warnings) in enumerate(parts):
            if decision is None:           # a partition without customers
                continue
            positions = np.unique(decision.arbitrated["pos"].to_numpy(dtype=np.int64))
            decision.arbitrated = decision.arbitrated.assign(
                pos=offset + np.searchsorted(positions, decision.arbitrated["pos"].to_numpy(dtype=np.int64)))
            starts.append((offset, number, positions))
            offset += len(positions)
            decisions.append(decision)
            customers += part_customers
            warnings.append(tuple(part_warnings))
        evaluation = combine_partitions(workspace, ctx.as_of, decisions)
        del decisions, parts
        features = _offered_rows(client, decided, starts, evaluation, job)
    return DaskDecided(evaluation, features, customers, count,
                       table_warnings=merge_warnings(warnings), dashboard=dashboard)


def _offered_rows(client, decided: list, starts: list[tuple[int, int, np.ndarray]], evaluation,
                  job: _Job) -> pd.DataFrame:
    """The feature rows of the offered customers, fetched from the workers that hold them;
    the offers' ``pos`` is renumbered to index the returned frame."""
    offers = evaluation.offers
    if not starts:
        return pd.DataFrame()
    wanted = np.unique(offers["pos"].to_numpy(dtype=np.int64)) if len(offers) else np.zeros(0, dtype=np.int64)
    bounds = np.array([start for start, _, _ in starts] + [np.iinfo(np.int64).max], dtype=np.int64)
    owner = np.searchsorted(bounds, wanted, side="right") - 1
    futures = []
    for index, (start, number, positions) in enumerate(starts):
        mine = positions[wanted[owner == index] - start]      # rows of the partition's features
        if len(mine) or not futures:      # at least one partition, for the columns
            futures.append(client.submit(_rows_at, decided[number], mine,
                                         key=f"loyalty-rows-{job.token}-{number}", pure=False))
    frames = client.gather(futures)
    if len(offers):
        offers["pos"] = np.searchsorted(wanted, offers["pos"].to_numpy(dtype=np.int64))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


def default_partitions(workspace: Workspace, root: Path) -> int:
    """Partitions of at most a million customers, and at least two per worker core of a
    small machine, so that a lost worker costs little to redo."""
    customers = estimated_customers(workspace.settings, root)
    floor = max(4, 2 * (os.cpu_count() or 2))
    return max(floor, math.ceil((customers or 0) / CUSTOMERS_PER_PARTITION))


# --------------------------------------------------------------------------- client side


def _import_distributed():
    try:
        import distributed
    except ImportError as exc:
        raise ClusterError(f"--engine dask needs Dask, which is not installed: {INSTALL_HINT}") from exc
    return distributed


@contextmanager
def _connect(distributed, scheduler: str | None) -> Iterator:
    """A client of the given scheduler (one attempt, bounded by CONNECT_TIMEOUT), or of a
    LocalCluster of this machine's cores, one single-threaded worker process per core."""
    if scheduler is None:
        cores = max(1, os.cpu_count() or 1)
        with distributed.LocalCluster(n_workers=cores, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:
            yield client
        return
    try:
        client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - refused, timed out, bad address, not a Dask scheduler
        raise ClusterError(f"cannot reach the Dask scheduler at {scheduler} ({_reason(exc)}); "
                           f"nothing was evaluated or recorded. {UNREACHABLE_HINT}") from exc
    try:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT)
        except (TimeoutError, OSError) as exc:
            raise ClusterError(f"the Dask scheduler at {scheduler} has had no workers for {WORKER_WAIT:.0f} s; "
                               "nothing was evaluated or recorded") from exc
        yield client
    finally:
        client.close()


def _reason(exc: BaseException) -> str:
    if not isinstance(exc, (OSError, TimeoutError, ValueError)):
        return f"what answered there is not a Dask scheduler: {type(exc).__name__}"
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


@contextmanager
def _cluster_failures(distributed, scheduler: str | None) -> Iterator[None]:
    """Failures of the cluster itself (a task that killed every worker it ran on, the
    scheduler gone) as a ClusterError; the tasks' own errors (a DataError, ...) pass."""
    where = scheduler or "the cluster started on this machine"
    try:
        yield
    except distributed.KilledWorker as exc:
        raise ClusterError(f"a partition's task killed its worker on every retry on {where} "
                           f"({exc}); nothing was recorded. A worker running out of memory is "
                           "the usual cause: give workers more memory, or use more partitions") from exc
    except distributed.comm.CommClosedError as exc:
        raise ClusterError(f"lost the connection to the Dask scheduler at {where} ({_reason(exc)}); "
                           "nothing was recorded") from exc


@dataclass(frozen=True)
class _Job:
    """What every task needs to find and check its work."""

    root: str
    version: str            # the client's rule version: workers must see the same rules
    count: int
    as_of: pd.Timestamp
    campaigns: list[str] | None

    @property
    def token(self) -> str:
        return f"{self.version}-{self.as_of.value}-{os.getpid()}-{id(self)}"


def _rfm_thresholds(distributed, client, job: _Job, progress) -> dict:
    """Value counts of the RFM inputs per partition, merged pairwise on the cluster; the
    client receives only the score thresholds."""
    futures = [client.submit(_rfm_counts, job, number, key=f"loyalty-rfm-{job.token}-{number}", pure=False)
               for number in range(job.count)]
    for _ in _as_completed(distributed, futures, "RFM inputs", progress):
        pass
    while len(futures) > 1:
        pairs = [futures[i:i + 2] for i in range(0, len(futures), 2)]
        futures = [client.submit(_merge_counts, *pair, pure=False) if len(pair) == 2 else pair[0]
                   for pair in pairs]
    return client.submit(_thresholds_of, futures[0], pure=False).result()


def _budget_cutoffs(distributed, client, decided: list, caps: dict, job: _Job, progress) -> dict:
    """Per budgeted campaign, the budget-order key (rank, tiebreak, firing key) of the last
    candidate its budget keeps over all partitions (None: it keeps none). Campaigns whose
    costs are not all >= 0, whose kept set is then not a prefix, get no cut-off and are
    budgeted on the client over all their candidates."""
    ranked = [client.submit(_ranked_of, part, caps, key=f"loyalty-ranked-{job.token}-{number}", pure=False)
              for number, part in enumerate(decided)]
    for _ in _as_completed(distributed, ranked, "features and evaluation", progress):
        pass
    while len(ranked) > 1:
        pairs = [ranked[i:i + 2] for i in range(0, len(ranked), 2)]
        ranked = [client.submit(_merge_ranked, *pair, caps, pure=False) if len(pair) == 2 else pair[0]
                  for pair in pairs]
    return client.submit(_cutoffs_of, ranked[0], caps, pure=False).result()


def _as_completed(distributed, futures, phase: str, progress):
    total = len(futures)
    for done, future in enumerate(distributed.as_completed(futures), start=1):
        if future.status == "error":
            future.result()          # raises the task's own error (a DataError, ...)
        _say(progress, f"{phase}, partition {done}/{total}")
        yield future


def _recorded_by_partition(store, count: int) -> list[dict[str, str]]:
    """Firing key -> as_of (UTC) of every recorded offer, split by the customer's partition."""
    parts: list[dict[str, str]] = [{} for _ in range(count)]
    if store is None:
        return parts
    rows = store.db.execute("SELECT o.customer_id, o.firing_key, r.as_of_utc FROM offers o "
                            "JOIN runs r ON r.run_id = o.run_id")
    while True:
        batch = rows.fetchmany(200_000)
        if not batch:
            return parts
        ids, keys, stamps = zip(*batch)
        numbers = partition_numbers(pd.Series(ids, dtype=object).astype(str), count)
        for number, key, stamp in zip(numbers.tolist(), keys, stamps):
            parts[number][key] = stamp


class _Recorded:
    """``RunContext.recorded`` for one partition: a lookup in the keys shipped with the task."""

    def __init__(self, keys: Mapping[str, str]):
        self.keys = keys

    def __call__(self, keys: list[str]) -> dict[str, str]:
        return {key: self.keys[key] for key in keys if key in self.keys}


def _context_slices(ctx: RunContext, count: int, recorded: list[dict]) -> list[RunContext]:
    """The run context restricted to each partition's customers (contacts, edge state, keys)."""
    contacts = ctx.contacts.reset_index(drop=True)
    numbers = partition_numbers(contacts["customer_id"].astype(str), count) if len(contacts) else np.zeros(0)
    states = {}
    for campaign, ids in ctx.edge_state.items():
        listed = sorted(ids)
        states[campaign] = (listed, partition_numbers(pd.Series(listed, dtype=object), count) if listed else [])
    slices = []
    for number in range(count):
        edge_state = {campaign: frozenset(i for i, n in zip(listed, mine) if n == number)
                      for campaign, (listed, mine) in states.items()}
        slices.append(replace(ctx, contacts=contacts[numbers == number].reset_index(drop=True),
                              edge_state=edge_state, recorded=_Recorded(recorded[number])))
    return slices


def _budget_caps(workspace: Workspace) -> dict[str, tuple[int | None, float | None]]:
    return {c.id: (c.budget.max_offers, c.budget.max_cost) for c in workspace.program.campaigns.values()
            if c.budget.max_offers is not None or c.budget.max_cost is not None}


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------- worker side

_WORKSPACES: dict[tuple[str, str], Workspace] = {}


def _workspace(job: _Job) -> Workspace:
    """The workspace as this worker sees it, loaded once per rule version."""
    cached = _WORKSPACES.get((job.root, job.version))
    if cached is not None:
        return cached
    if not (Path(job.root) / "loyalty.yaml").is_file():
        raise ClusterError(f"worker {os.uname().nodename} cannot see the workspace at {job.root}: every "
                           "worker needs the workspace folder at the same path (a shared volume)")
    workspace = load_workspace(job.root)
    if rule_version(workspace) != job.version:
        raise LoyaltyError(f"the workspace at {job.root} on worker {os.uname().nodename} has other rules "
                           "than the client's: give every worker the same copy of the workspace")
    _WORKSPACES.clear()
    _WORKSPACES[(job.root, job.version)] = workspace
    return workspace


def _has_customers(job: _Job, number: int) -> bool:
    import pyarrow.parquet as pq
    path = partition_folder(partitioned_folder(job.root), number) / "customers.parquet"
    return pq.ParquetFile(path).metadata.num_rows > 0


def _local_features(job: _Job, number: int):
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


def _rfm_counts(job: _Job, number: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Task: one partition's RFM inputs as distinct values and their counts."""
    if not _has_customers(job, number):
        return {score: (np.zeros(0), np.zeros(0, dtype=np.int64)) for score, _, _ in RANKED}
    _, _, frame = _local_features(job, number)
    inputs = rfm_inputs(frame)
    return {score: np.unique(_keyed(inputs[name], better), return_counts=True) for score, name, better in RANKED}


def _merge_counts(left: dict, right: dict) -> dict:
    merged = {}
    for score in left:
        values = np.concatenate([left[score][0], right[score][0]])
        counts = np.concatenate([left[score][1], right[score][1]])
        unique, inverse = np.unique(values, return_inverse=True)
        merged[score] = (unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64))
    return merged


def _thresholds_of(counts: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def _decide_partition(job: _Job, number: int, ctx: RunContext, thresholds: dict,
                      caps: dict) -> tuple[PartitionDecision | None, pd.DataFrame | None, int, list[str]]:
    """Task: one partition's features and decisions, cut to what the global budgets can keep;
    returns the decision, the feature rows of its candidates (in ``pos`` order), its
    customer count and its loader warnings."""
    _crash_once()
    if not _has_customers(job, number):
        return None, None, 0, []
    workspace, tables, frame = _local_features(job, number)
    features = finish_features(frame, workspace.program, workspace.settings, job.as_of,
                               _scores_from(frame, thresholds))
    decision = evaluate_partition(workspace, tables, features, ctx, job.campaigns)
    decision.arbitrated = _within_budgets(decision.arbitrated, caps)
    positions = np.unique(decision.arbitrated["pos"].to_numpy(dtype=np.int64))
    rows = features.iloc[positions].set_axis(positions)      # labelled by their position
    return decision, rows, len(features), list(tables.warnings)


RANK_KEY = ["rank", "tiebreak", "firing_key"]


def _budget_order(group: pd.DataFrame) -> pd.Index:
    """The budget order of ``evaluation._apply_budgets``: rank (highest first, missing last),
    then the stable hash, then the firing key."""
    return group.sort_values(RANK_KEY, ascending=[False, True, True], na_position="last", kind="stable").index


def _budget_prefix(group: pd.DataFrame, max_offers: int | None, max_cost: float | None) -> pd.DataFrame | None:
    """``group`` (rank, tiebreak, firing_key, cost) in budget order, cut to the prefix the
    budget keeps; None when costs are not all >= 0 (the kept set is then no prefix)."""
    ordered = group.loc[_budget_order(group)]
    costs = ordered["cost"].to_numpy(dtype=float)
    if not (costs >= 0).all():
        return None
    keep = len(ordered) if max_offers is None else min(len(ordered), max_offers)
    if max_cost is not None:
        keep = min(keep, int(np.searchsorted(np.cumsum(costs) > max_cost + 1e-9, True)))
    return ordered.iloc[:keep]


def _within_budgets(arbitrated: pd.DataFrame, caps: dict) -> pd.DataFrame:
    """Drop the candidates a campaign's budget cannot keep whatever the other partitions
    hold: beyond max_offers in this partition's own budget order, or past max_cost in its
    running cost (costs are never negative, so the kept set is a prefix of the order)."""
    if not len(arbitrated) or not caps:
        return arbitrated
    arbitrated = arbitrated.reset_index(drop=True)
    keep = np.ones(len(arbitrated), dtype=bool)
    campaign = arbitrated["campaign"].to_numpy()
    for campaign_id, (max_offers, max_cost) in caps.items():
        rows = np.flatnonzero(campaign == campaign_id)
        if not len(rows):
            continue
        kept = _budget_prefix(arbitrated.iloc[rows][[*RANK_KEY, "cost"]], max_offers, max_cost)
        if kept is not None:
            keep[rows] = False
            keep[kept.index.to_numpy()] = True
    return arbitrated[keep]


def _ranked_of(result: tuple, caps: dict) -> dict[str, pd.DataFrame]:
    """Task: a decided partition's candidates of budgeted campaigns, only what the budgets
    rank and count (rank, tiebreak, firing_key, cost)."""
    decision = result[0]
    if decision is None:
        return {}
    arbitrated = decision.arbitrated
    campaign = arbitrated["campaign"].to_numpy()
    return {campaign_id: arbitrated.loc[campaign == campaign_id, [*RANK_KEY, "cost"]].reset_index(drop=True)
            for campaign_id in caps if (campaign == campaign_id).any()}


def _merge_ranked(left: dict, right: dict, caps: dict) -> dict:
    """Task: two sets of ranked candidates pooled, each campaign cut to what its budget keeps
    (a campaign without a prefix cut keeps everything)."""
    merged = {}
    for campaign_id in sorted(set(left) | set(right)):
        frames = [side[campaign_id] for side in (left, right) if campaign_id in side]
        group = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        kept = _budget_prefix(group, *caps[campaign_id])
        merged[campaign_id] = group if kept is None else kept.reset_index(drop=True)
    return merged


def _cutoffs_of(ranked: dict, caps: dict) -> dict[str, tuple | None]:
    """Task: per campaign, the key of the last candidate its budget keeps (None: none kept)."""
    cutoffs = {}
    for campaign_id, group in ranked.items():
        kept = _budget_prefix(group, *caps[campaign_id])
        if kept is not None:
            cutoffs[campaign_id] = tuple(kept.iloc[-1][RANK_KEY]) if len(kept) else None
    return cutoffs


def _within_cutoffs(arbitrated: pd.DataFrame, cutoffs: dict) -> pd.DataFrame:
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
        group = arbitrated.iloc[rows][RANK_KEY].reset_index(drop=True)
        sentinel = pd.DataFrame([cutoff], columns=RANK_KEY, index=[len(group)]).astype(group.dtypes.to_dict())
        order = _budget_order(pd.concat([group, sentinel])).to_numpy()
        before = order[:int(np.flatnonzero(order == len(group))[0])]      # stable: the cut-off row itself too
        keep[rows[before]] = True
    return arbitrated[keep]


def _summary_of(result: tuple, cutoffs: dict) -> tuple[PartitionDecision | None, int, list[str]]:
    """Task: a decided partition without its feature rows, its candidates within the
    budget cut-offs (what the global steps need)."""
    decision, _, customers, warnings = result
    if decision is not None:
        decision = replace(decision, arbitrated=_within_cutoffs(decision.arbitrated, cutoffs))
    return decision, customers, warnings


def _rows_at(result: tuple, positions: np.ndarray) -> pd.DataFrame:
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
