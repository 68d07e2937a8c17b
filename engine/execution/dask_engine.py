"""The dask engine: partitioned evaluation with each partition a task on a Dask cluster.

The partition function is the local one (``local_features`` -> ``finish_features`` ->
``evaluate_partition``, as tasks in ``partition_tasks``); only where it runs changes.
Every task takes the workspace folder and a partition number and reads that partition's
Parquet files itself (``partitioned_data``), so the client never loads a table. What
crosses the network:

* to workers: the partition's slice of contact history, recorded firing keys and
  ``becomes`` state, the RFM thresholds and the budget cut-offs (small);
* between workers: RFM value counts and the ranked keys of budgeted candidates, merged
  pairwise, so that only the thresholds and one cut-off per campaign reach the client;
* to the client: funnel counts, holdouts, warnings, the candidates within the cut-offs,
  and last the feature rows of the customers who got an offer (for rendering). A preview
  (``preview_on_dask``) leaves the offers on the workers too: per partition, its funnels,
  per-campaign totals (offers, cost, variants) and its first offers per campaign with
  their feature rows, from which the client keeps the global first ones.

The client applies the global steps as ``partitions.evaluate_in_partitions`` does
(``combine_partitions``), so offers, funnels and budgets are identical to
``--engine local``. A task lost with its worker is run again by Dask; tasks are pure
(they read files and return values), so a retry decides the same.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from engine.config.loading import rule_version
from engine.config.model import LoadedWorkspace
from engine.data.sources import merge_warnings
from engine.decide.budgets import budget_caps
from engine.decide.evaluation import combine_partitions
from engine.decide.pending import utc_key
from engine.decide.totals import CampaignTotals, SampledEvaluation, campaign_totals, sample_rows
from engine.decide.triggers import RunContext
from engine.errors import ClusterError
from engine.execution.partition_run import (
    PartitionRun,
    WrittenRun,
    combine_written,
    recorded_hashes_by_partition,
    write_partition,
)
from engine.execution.partition_tasks import (
    Job,
    context_slices,
    cutoffs_of,
    decide_partition,
    merge_counts,
    merge_ranked,
    preview_of,
    ranked_of,
    recorded_by_partition,
    rfm_counts,
    rows_at,
    summary_of,
    thresholds_of,
)
from engine.execution.partitioned_data import ensure_partitioned, estimated_customers
from engine.execution.partitions import Decided
from engine.execution.run_files import run_folder
from engine.messages.offers import make_renderer
from engine.progress import say

INSTALL_HINT = 'pip install "loyalty[dask]"'
CONNECT_TIMEOUT = 5.0              # seconds to reach a scheduler before giving up
WORKER_WAIT = 60.0                 # seconds to wait for a first worker (an autoscaling cluster starts one)
CUSTOMERS_PER_PARTITION = 1_000_000
UNREACHABLE_HINT = ("Check the address and that the scheduler runs, or leave out --scheduler "
                    "to start a cluster on this machine.")


@dataclass
class DaskDecided(Decided):
    """``Decided`` from a cluster, with what the workers' loaders warned about."""

    table_warnings: tuple[str, ...] = ()
    dashboard: str | None = None


def evaluate_on_dask(workspace: LoadedWorkspace, ctx: RunContext, *, store=None,
                     campaigns: list[str] | None = None, scheduler: str | None = None,
                     partitions: int | None = None,
                     progress: Callable[[str], None] | None = None,
                     client=None, recorded: Mapping[str, str] | None = None) -> DaskDecided:
    """Evaluate ``workspace`` at ``ctx.as_of`` on a Dask cluster; the same result as
    ``evaluate_in_partitions`` (offers, funnels, budgets, holdouts, edge state).

    ``scheduler``: a scheduler address (``tcp://host:8786``); None starts a LocalCluster
    sized to this machine for the duration of the call. ``store``: the state store the
    context was read from, whose recorded firing keys each partition needs. ``client``:
    a client of ``cluster()`` to reuse (a simulation evaluates many steps on one cluster);
    ``recorded``: firing key -> as_of (UTC) of the firings already acted on, in place of
    the store's (a simulation's in-memory history)."""
    with _decided_on_cluster(workspace, ctx, store, campaigns, scheduler, partitions, progress,
                             client, recorded) as run:
        return _gathered(workspace, ctx, run)


@contextmanager
def cluster(scheduler: str | None = None) -> Iterator:
    """A client of the scheduler at ``scheduler`` (or of a LocalCluster of this machine),
    with the cluster's failures reported as ``ClusterError``; for several evaluations."""
    distributed = _import_distributed()
    with _connect(distributed, scheduler) as client, _cluster_failures(distributed, scheduler):
        yield client


def preview_on_dask(workspace: LoadedWorkspace, ctx: RunContext, sample: int, *, store=None,
                    campaigns: list[str] | None = None, scheduler: str | None = None,
                    partitions: int | None = None,
                    progress: Callable[[str], None] | None = None) -> DaskDecided:
    """What a preview of ``workspace`` at ``ctx.as_of`` shows, evaluated on a Dask cluster
    with the offers left on the workers: the evaluation is a ``SampledEvaluation`` whose
    offers are each campaign's first ``sample`` offers by customer id (with their
    customers' feature rows), its funnels and per-campaign totals those of all offers,
    identical to ``evaluate_on_dask``'s. Options as ``evaluate_on_dask``."""
    with _decided_on_cluster(workspace, ctx, store, campaigns, scheduler, partitions, progress) as run:
        if set(run.budgeted) - set(run.cutoffs):
            # a budget over costs not all >= 0 keeps no prefix: applied on the client over
            # all of its candidates, as evaluate_on_dask does
            decided = _gathered(workspace, ctx, run)
            full = decided.evaluation
            totals = campaign_totals(full.offers, list(full.funnels))
            decided.evaluation = SampledEvaluation(**vars(full), totals=totals)
            return decided
        client, job = run.client, run.job
        futures = [client.submit(preview_of, part, run.cutoffs, sample, key=f"loyalty-preview-{job.token}-{number}",
                                 pure=False) for number, part in enumerate(run.decided)]
        parts = client.gather(futures)
    decisions, frames, warnings, funnels, totals, customers, offset = [], [], [], {}, {}, 0, 0
    for part in parts:
        customers += part.customers
        warnings.append(tuple(part.warnings))
        if part.decision is None:           # a partition without customers
            continue
        for campaign_id, funnel in part.decision.funnels.items():
            total = funnels.setdefault(campaign_id, dict.fromkeys(funnel, 0))
            for stage, count in funnel.items():
                total[stage] += count
        for campaign_id, total in part.totals.items():
            totals[campaign_id] = totals.get(campaign_id, CampaignTotals()) + total
        first = part.decision.arbitrated
        part.decision.arbitrated = first.assign(pos=first["pos"].to_numpy(dtype=np.int64) + offset)
        offset += len(part.features)
        decisions.append(part.decision)
        frames.append(part.features)
    # the global first offers per campaign, among the partitions' own first ones; budgets
    # keep them all (every one is within its campaign's cut-off)
    sampled = combine_partitions(workspace, ctx.as_of, decisions, used=ctx.budget_used)
    evaluation = SampledEvaluation(sampled.as_of, sample_rows(sampled.offers, sample).reset_index(drop=True),
                                   funnels, sampled.holdouts, {}, sampled.warnings, reentered=sampled.reentered,
                                   tier_moves=sampled.tier_moves,
                                   totals=totals)
    frames = [frame for frame in frames if len(frame)] or frames[:1]     # one, for the columns
    features = (pd.concat(frames, ignore_index=True) if len(frames) > 1 else
                frames[0] if frames else pd.DataFrame())
    return DaskDecided(evaluation, features, customers, run.job.count,
                       table_warnings=merge_warnings(warnings), dashboard=run.dashboard)


def run_on_dask(workspace: LoadedWorkspace, ctx: RunContext, run_id: str, *, store=None,
                campaigns: list[str] | None = None, scheduler: str | None = None,
                partitions: int | None = None,
                progress: Callable[[str], None] | None = None) -> WrittenRun | DaskDecided:
    """Run ``run_id`` of ``workspace`` at ``ctx.as_of`` on a Dask cluster up to the files the
    client records: each partition's task renders its offers and writes them, with the rest
    of its part of the run, under ``run_files.run_folder(workspace, run_id)``; the client
    receives counts, render errors and file names (``WrittenRun``). A budget over costs
    not all >= 0 keeps no prefix and is applied on the client over every candidate: then
    the offers are gathered as ``evaluate_on_dask`` does (a ``DaskDecided``), and rendered
    and recorded on the client. Options as ``evaluate_on_dask``."""
    with _decided_on_cluster(workspace, ctx, store, campaigns, scheduler, partitions, progress) as run:
        if set(run.budgeted) - set(run.cutoffs):
            return _gathered(workspace, ctx, run)
        client, job = run.client, run.job
        hashes = recorded_hashes_by_partition(store, job.count, utc_key(ctx.as_of))
        specs = [PartitionRun(run_id, hashes[number], part.edge_state, part.pending, ctx.budget_used)
                 for number, part in enumerate(run.contexts)]
        futures = [client.submit(write_partition, part, run.cutoffs, job, number, specs[number],
                                 key=f"loyalty-write-{job.token}-{number}", pure=False)
                   for number, part in enumerate(run.decided)]
        parts = [future.result() for future in _as_completed(_import_distributed(), futures,
                                                               "messages rendered and written", progress)]
    warnings = merge_warnings([tuple(part.table_warnings) for part in sorted(parts, key=lambda p: p.number)])
    written = combine_written(parts, run_id, run_folder(job.root, run_id), job.count, warnings,
                              make_renderer(workspace).max_render_seconds_per_run)
    written.dashboard = run.dashboard
    return written


@dataclass
class _Run:
    """A cluster with every partition decided on it (futures), and the budgets' cut-offs."""

    client: object
    job: Job
    decided: list                 # futures of decide_partition, one a partition
    contexts: list                # the run context's slice of each partition
    cutoffs: dict
    budgeted: list[str]           # budgeted campaigns with candidates
    dashboard: str


@contextmanager
def _decided_on_cluster(workspace: LoadedWorkspace, ctx: RunContext, store, campaigns, scheduler, partitions,
                        progress, client=None, known: Mapping[str, str] | None = None) -> Iterator[_Run]:
    distributed = _import_distributed()
    root = Path(workspace.root).resolve()
    count = partitions or default_partitions(workspace, root)
    ensure_partitioned(workspace.settings, root, count, progress)
    recorded = recorded_by_partition(store, count) if known is None else [known] * count
    connected = nullcontext(client) if client is not None else _connect(distributed, scheduler)
    with connected as client, _cluster_failures(distributed, scheduler):
        dashboard = client.dashboard_link
        say(progress, f"Dask dashboard: {dashboard}")
        job = Job(str(root), rule_version(workspace), count, ctx.as_of, campaigns)
        thresholds = _rfm_thresholds(distributed, client, job, progress)
        contexts = context_slices(ctx, count, recorded)
        caps = budget_caps(workspace, ctx.budget_used)
        # the decided partitions stay on their workers. Budgets: each partition's ranked
        # candidates of budgeted campaigns (rank, tiebreak, key, cost) are merged pairwise
        # on the cluster, each merge cut to what the budget keeps, and the client gets one
        # cut-off per campaign.
        decided = [client.submit(decide_partition, job, number, contexts[number], thresholds, caps,
                                 key=f"loyalty-decide-{job.token}-{number}", pure=False)
                   for number in range(count)]
        cutoffs, budgeted = _budget_cutoffs(distributed, client, decided, caps, job, progress)
        yield _Run(client, job, decided, contexts, cutoffs, budgeted, dashboard)


def _gathered(workspace: LoadedWorkspace, ctx: RunContext, run: _Run) -> DaskDecided:
    """Every partition's candidates within the cut-offs gathered, the global steps applied
    on the client, and the offered customers' feature rows fetched from the workers."""
    client, job, decided = run.client, run.job, run.decided
    summaries = [client.submit(summary_of, part, run.cutoffs, job, key=f"loyalty-summary-{job.token}-{number}",
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
    evaluation = combine_partitions(workspace, ctx.as_of, decisions, used=ctx.budget_used, pending=ctx.pending)
    del decisions, parts
    features = _offered_rows(client, decided, starts, evaluation, job)
    return DaskDecided(evaluation, features, customers, job.count,
                       table_warnings=merge_warnings(warnings), dashboard=run.dashboard)


def _offered_rows(client, decided: list, starts: list[tuple[int, int, np.ndarray]], evaluation,
                  job: Job) -> pd.DataFrame:
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
            futures.append(client.submit(rows_at, decided[number], mine,
                                         key=f"loyalty-rows-{job.token}-{number}", pure=False))
    frames = client.gather(futures)
    if len(offers):
        offers["pos"] = np.searchsorted(wanted, offers["pos"].to_numpy(dtype=np.int64))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)


def default_partitions(workspace: LoadedWorkspace, root: Path) -> int:
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


def _rfm_thresholds(distributed, client, job: Job, progress) -> dict:
    """Value counts of the RFM inputs per partition, merged pairwise on the cluster; the
    client receives only the score thresholds."""
    futures = [client.submit(rfm_counts, job, number, key=f"loyalty-rfm-{job.token}-{number}", pure=False)
               for number in range(job.count)]
    for _ in _as_completed(distributed, futures, "RFM inputs", progress):
        pass
    while len(futures) > 1:
        pairs = [futures[i:i + 2] for i in range(0, len(futures), 2)]
        futures = [client.submit(merge_counts, *pair, pure=False) if len(pair) == 2 else pair[0]
                   for pair in pairs]
    return client.submit(thresholds_of, futures[0], pure=False).result()


def _budget_cutoffs(distributed, client, decided: list, caps: dict, job: Job, progress) -> tuple[dict, list]:
    """The budgeted campaigns that have candidates, and per budgeted campaign, the
    budget-order key (rank, tiebreak, firing key) of the last candidate its budget keeps
    over all partitions (None: it keeps none). Campaigns whose costs are not all >= 0,
    whose kept set is then not a prefix, get no cut-off and are budgeted on the client
    over all their candidates."""
    ranked = [client.submit(ranked_of, part, caps, key=f"loyalty-ranked-{job.token}-{number}", pure=False)
              for number, part in enumerate(decided)]
    for _ in _as_completed(distributed, ranked, "features and evaluation", progress):
        pass
    while len(ranked) > 1:
        pairs = [ranked[i:i + 2] for i in range(0, len(ranked), 2)]
        ranked = [client.submit(merge_ranked, *pair, caps, pure=False) if len(pair) == 2 else pair[0]
                  for pair in pairs]
    cutoffs = client.submit(cutoffs_of, ranked[0], caps, pure=False)
    return tuple(client.gather([cutoffs, client.submit(sorted, ranked[0], pure=False)]))


def _as_completed(distributed, futures, phase: str, progress):
    total = len(futures)
    for done, future in enumerate(distributed.as_completed(futures), start=1):
        if future.status == "error":
            future.result()          # raises the task's own error (a DataError, ...)
        say(progress, f"{phase}, partition {done}/{total}")
        yield future
