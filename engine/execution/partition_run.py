"""A run's offers made where they were decided: each partition's task (on a dask worker)
takes its candidates within the budget cut-offs, gives them offer ids and coupon codes,
renders their messages, makes the state store's rows of them exactly as a local run does
(``recording.build_messages``, ``StateStore.prepare_offers``) and writes them, with its
holdouts, pending firings, ``becomes:`` state and stored-tier moves, to the run's folder
(``run_files``). It returns only counts, render errors and file names
(``PartitionWritten``), which the client adds up (``WrittenRun``) before streaming the
files into the state store in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from engine.data.keys import is_in
from engine.decide.evaluation import combine_partitions, keep_within
from engine.decide.pending import render_outcomes, tally
from engine.decide.rewards import generate_codes
from engine.decide.totals import CampaignTotals, campaign_totals
from engine.execution.partition_tasks import Job, _workspace, split_by_partition, within_cutoffs
from engine.execution.recording import build_messages, edge_state_rows
from engine.execution.run_files import file_name, run_folder, write_frame, write_records
from engine.messages.offers import make_renderer, merge_out_of_time_errors, unrendered_offers
from engine.state.offers import OfferBook

KINDS = ("offers", "known", "trigger_state", "holdouts", "pending", "tier_moves")   # the files, in recording order


@dataclass(frozen=True)
class PartitionRun:
    """What a partition's task needs beyond its decision to make its part of run ``run_id``:
    the payload hashes of its offers recorded by an earlier attempt at this ``as_of``, its
    customers' ``becomes:`` state before the run, its pending firings, and what earlier runs
    spent of the budgets."""

    run_id: str
    recorded: dict[str, str]
    edge_state: dict
    pending: pd.DataFrame
    budget_used: dict


@dataclass
class PartitionWritten:
    """What a partition's task returns: counts, render errors and the files it wrote."""

    number: int
    customers: int = 0
    table_warnings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    funnels: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    holdouts: int = 0
    reentered: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)
    edge_campaigns: list[str] = field(default_factory=list)
    render_errors: list[dict] = field(default_factory=list)
    offers: int = 0
    files: dict = field(default_factory=dict)          # kind -> file name in the run's folder


def recorded_hashes_by_partition(store, count: int, as_of_utc: str) -> list[dict[str, str]]:
    """Firing key -> payload hash of the offers recorded by runs at ``as_of_utc`` (an earlier
    attempt of this run), split by the customer's partition: a rerun compares them without
    rendering them again, as a local run does (``unrendered_offers``)."""
    if store is None:
        return [{} for _ in range(count)]
    rows = store.db.execute("SELECT o.customer_id, o.firing_key, o.payload_hash FROM offers o "
                            "JOIN runs r ON r.run_id = o.run_id WHERE r.as_of_utc = ?", [as_of_utc])
    return split_by_partition(rows, count)


def write_partition(result: tuple, cutoffs: dict, job: Job, number: int, spec: PartitionRun) -> PartitionWritten:
    """Task: partition ``number``'s part of the run, rendered and written to the run's folder."""
    decision, rows, customers, table_warnings = result
    written = PartitionWritten(number, customers, list(table_warnings))
    if decision is None:
        return written
    workspace = _workspace(job)
    settings = workspace.settings
    decision = replace(decision)
    keep_within(workspace, decision, within_cutoffs(decision.arbitrated, cutoffs))
    positions = np.unique(decision.arbitrated["pos"].to_numpy(dtype=np.int64))
    decision.arbitrated = decision.arbitrated.assign(
        pos=np.searchsorted(positions, decision.arbitrated["pos"].to_numpy(dtype=np.int64)))
    features = rows.loc[positions].reset_index(drop=True)
    # every candidate within the cut-offs is kept: the budgets applied to this partition
    # alone keep them all and count them, as the client's step over all partitions would
    evaluation = combine_partitions(workspace, job.as_of, [decision], used=spec.budget_used, pending=spec.pending)
    offers = evaluation.offers
    again = {key: spec.recorded[key] for key in offers.loc[offers["recorded"], "firing_key"]
             if key in spec.recorded} if len(offers) and offers["recorded"].any() else {}
    known = unrendered_offers(workspace, offers[is_in(offers["firing_key"], again)], again) if again else []
    coupon_offers = offers.loc[(offers["reward_kind"] == "coupon") & ~offers["recorded"], "offer_id"] \
        if len(offers) else []
    codes = dict(zip(coupon_offers, generate_codes(len(coupon_offers), settings.coupon_prefix,
                                                   settings.coupon_length, share=(number, job.count))))

    def to_rows(records: list[dict]) -> list:
        for record in records:
            record["rule_version"] = job.version
        return OfferBook.prepare_offers(records, spec.run_id)

    fresh = offers[~is_in(offers["firing_key"], again)] if again else offers
    prepared, errors = build_messages(workspace, evaluation, features, make_renderer(workspace), fresh,
                                      codes=codes, workers=1, finish=to_rows)
    pending = render_outcomes(workspace, offers, evaluation.pending,
                              {row["firing_key"] for row, _ in prepared} | set(again))
    folder = run_folder(job.root, spec.run_id)
    as_of = evaluation.as_of.isoformat()
    holdouts = evaluation.holdouts
    contents = {
        "offers": [[row, reward] for row, reward in prepared],
        "known": known,
        "trigger_state": edge_state_rows(evaluation, spec.edge_state, evaluated=False),
        "holdouts": [dict(zip(holdouts.columns, values), run_id=spec.run_id, as_of=as_of)
                     for values in zip(*(holdouts[name].tolist() for name in holdouts.columns))],
    }
    for kind, records in contents.items():
        written.files[kind] = write_records(folder, file_name(kind, number), records)
    written.files["pending"] = write_frame(folder, file_name("pending", number, "parquet"), pending)
    written.files["tier_moves"] = write_frame(folder, file_name("tier_moves", number, "parquet"),
                                              evaluation.tier_moves)
    written.files = {kind: name for kind, name in written.files.items() if name is not None}
    written.warnings = evaluation.warnings
    written.funnels = evaluation.funnels
    written.totals = campaign_totals(offers, list(evaluation.funnels))
    written.holdouts = len(holdouts)
    written.reentered = evaluation.reentered
    written.pending = tally(pending)
    written.edge_campaigns = list(evaluation.edge_state)
    written.render_errors = errors
    written.offers = len(offers)
    return written


@dataclass
class WrittenRun:
    """A run whose partitions rendered and wrote their offers (``write_partition``): what
    they counted, added up as a local run's evaluation counts it, and their files."""

    run_id: str
    folder: Path
    customers: int
    partitions: int
    funnels: dict
    holdouts: int
    warnings: list[str]
    table_warnings: tuple[str, ...]
    reentered: dict[str, int]
    pending: dict[str, int]
    granted_without_message: dict[str, int]
    render_errors: list[dict]
    edge_campaigns: list[str]
    offers: int
    files: list[tuple[str, Path]]          # (kind, path), partition by partition
    dashboard: str | None = None

    def paths(self, kind: str) -> list[Path]:
        return [path for found, path in self.files if found == kind]


def combine_written(parts: list[PartitionWritten], run_id: str, folder: Path, count: int,
                    table_warnings: tuple[str, ...], max_render_seconds: float) -> WrittenRun:
    """The partitions' counts added up; render errors in the order a local run reports them
    (its offers' order: campaign, then customer), those of rendering time used up last."""
    parts = sorted(parts, key=lambda part: part.number)
    funnels: dict[str, dict[str, int]] = {}
    totals: dict[str, CampaignTotals] = {}
    reentered: dict[str, int] = {}
    pending: dict[str, int] = {}
    for part in parts:
        for campaign, funnel in part.funnels.items():
            total = funnels.setdefault(campaign, dict.fromkeys(funnel, 0))
            for stage, count_ in funnel.items():
                total[stage] += count_
        for campaign, total in part.totals.items():
            totals[campaign] = totals.get(campaign, CampaignTotals()) + total
        for into, counts in ((reentered, part.reentered), (pending, part.pending)):
            for name, count_ in counts.items():
                into[name] = into.get(name, 0) + count_
    errors = merge_out_of_time_errors([error for part in parts for error in part.render_errors], max_render_seconds)
    timed_out = [error for error in errors if "not_rendered" in error]
    errors = sorted((error for error in errors if "not_rendered" not in error),
                    key=lambda error: (error["campaign"], str(error["customer_id"])))
    return WrittenRun(
        run_id, folder, sum(part.customers for part in parts), count, funnels,
        sum(part.holdouts for part in parts), list(dict.fromkeys(w for part in parts for w in part.warnings)),
        table_warnings, reentered, dict(sorted(pending.items())),
        {campaign: total.granted_without_message for campaign, total in totals.items()
         if total.granted_without_message},
        errors + timed_out, sorted({c for part in parts for c in part.edge_campaigns}),
        sum(part.offers for part in parts),
        [(kind, folder / part.files[kind]) for kind in KINDS for part in parts if kind in part.files])
