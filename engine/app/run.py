"""Runs: evaluate at an instant, record the offers in one transaction, deliver what is due.

Also the state's read side for people: a customer's offer history (and tier changes) and the
recent runs.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from engine.app.validation import check_campaigns, load_workspace
from engine.config.loading import rule_version
from engine.config.model import LoadedWorkspace
from engine.data.keys import is_in
from engine.data.memory import give_back_memory
from engine.data.sources import Tables, load_tables
from engine.data.tiers import TierRules, TierRun
from engine.decide.pending import render_outcomes, tally
from engine.decide.policy import reachable
from engine.decide.rewards import generate_codes
from engine.decide.schedule import due_campaigns
from engine.decide.totals import campaign_totals
from engine.execution.partition_run import WrittenRun
from engine.execution.pipeline import build_messages, decide_or_write, edge_state_rows, parse_as_of
from engine.execution.recording import evaluated_row
from engine.execution.run_files import chunks, clear_runs, read_frame, read_records
from engine.faults import checkpoint
from engine.messages.offers import make_renderer, unrendered_offers
from engine.progress import Progress
from engine.state.database import storage_error, storage_failures
from engine.state.delivery import DeliveryResult
from engine.state.delivery import deliver as deliver_outbox
from engine.state.offers import RecordResult
from engine.state.runs import new_run_id
from engine.state.store import StateStore, open_store


@dataclass
class RunResult:
    run_id: str | None
    as_of: str
    new_offers: int = 0
    already_recorded: int = 0
    conflicts: list[dict] = field(default_factory=list)
    holdouts: int = 0
    funnels: dict = field(default_factory=dict)
    render_errors: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    delivery: DeliveryResult | None = None
    campaigns: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    # one-off firings that wait (decide.pending): how many came back per campaign, and what the
    # run wrote, by status (pending: stopped now or again; offered, expired, held_out: closed)
    reentered: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    granted_without_message: dict[str, int] = field(default_factory=dict)   # campaign -> rewards
    tier_moves: dict = field(default_factory=dict)      # stored tiers: members moved up/down/joined per tier

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "delivery"}
        if self.delivery is not None:
            data["delivery"] = {k: v for k, v in self.delivery.__dict__.items()}
        return data


def run(root: Path | str, as_of=None, *, campaigns: list[str] | None = None, due: bool = False,
        deliver: bool = True, now=None, lock_timeout: float = 5.0, progress: Progress | None = None,
        partitions: int | None = None, engine: str | None = None, scheduler: str | None = None,
        workers: int | None = None) -> RunResult:
    """Evaluate at ``as_of``, record the offers in one transaction, then deliver what is due.

    ``engine``/``scheduler``/``partitions``/``workers`` choose where and in how many pieces the
    evaluation runs; recording and delivery are the same on every engine. ``progress`` hears
    what is being done, and delivery then shows a progress bar on a terminal."""
    started = time.perf_counter()
    workspace = load_workspace(root)
    settings = workspace.settings
    as_of = parse_as_of(as_of, settings.timezone)
    check_campaigns(workspace, campaigns)
    store = open_store(settings.state_path, create=True)
    try:
        with _locked(store, lock_timeout):
            timings = {}
            folder = Path(workspace.root).resolve()
            selected = campaigns
            with storage_failures(store.label, "read"):     # what earlier runs did
                if due:
                    scheduled = due_campaigns(workspace, store.schedule_last_run, as_of)
                    selected = [c for c in scheduled if campaigns is None or c in campaigns]
                result = RunResult(None, as_of.isoformat(), campaigns=list(selected or workspace.program.campaigns))
                if selected is not None and not selected:
                    return result
                run_id = new_run_id(as_of)
                clear_runs(folder)     # files of attempts that crashed
                prepared, evaluation = decide_or_write(workspace, as_of, store, selected, run_id,
                                                       partitions=partitions, workers=workers, engine=engine,
                                                       scheduler=scheduler, progress=progress)
            # from here on only the customers are needed (consent at delivery): let the
            # orders and events go before the messages are rendered
            tables = prepared.tables
            prepared.tables = replace(tables, orders=_no_rows(tables.orders), events=_no_rows(tables.events))
            del tables
            give_back_memory()      # ~1.3 GB at 1M that the allocators would otherwise keep
            timings["evaluate"] = round(time.perf_counter() - started, 3)
            checkpoint("after_evaluation")
            if isinstance(evaluation, WrittenRun):
                recorded = _record_written(workspace, store, evaluation, prepared, result, as_of, due)
            else:
                recorded = _record_evaluated(workspace, store, evaluation, prepared, result, as_of, due, run_id,
                                             workers or settings.workers, timings, started)
            timings["record"] = round(time.perf_counter() - started, 3)
            checkpoint("after_commit")
            clear_runs(folder)
            result.run_id = run_id
            result.new_offers = recorded.new
            result.already_recorded = recorded.existing
            result.conflicts = recorded.conflicts
            result.tier_moves = recorded.tier_moves
            result.reentered = {c: n for c, n in result.reentered.items() if n}
            errors = result.render_errors
            if deliver:
                tables = prepared.tables
                if tables.customers.empty:   # the dask engine's workers read the data: consent needs it here
                    tables = _customers_only(workspace)
                with _failing_run(store, run_id):
                    result.delivery = _deliver(workspace, store, now, tables, progress is not None)
                timings["deliver"] = round(time.perf_counter() - started, 3)
            result.timings = timings
            with _failing_run(store, run_id):
                store.finish_run(run_id, "delivered" if deliver else "recorded", timings,
                                 {"new": recorded.new, "existing": recorded.existing,
                                  "conflicts": len(recorded.conflicts), "render_errors": len(errors)})
            return result
    finally:
        store.close()


def _record_evaluated(workspace: LoadedWorkspace, store: StateStore, evaluation, prepared, result: RunResult,
                      as_of: pd.Timestamp, due: bool, run_id: str, workers: int | None, timings: dict,
                      started: float) -> RecordResult:
    """Render the offers of an evaluation held here and record them in one transaction."""
    settings = workspace.settings
    # offers recorded by an earlier attempt at this as_of are not rendered again: record_run
    # counts them as existing, or reports a conflict if the rules changed in between
    offers = evaluation.offers
    with storage_failures(store.label, "read"):
        again = store.existing_offers(offers.loc[offers["recorded"], "firing_key"]) \
            if len(offers) and offers["recorded"].any() else {}
    known = unrendered_offers(workspace, offers[is_in(offers["firing_key"], again)], again) if again else []
    coupon_offers = offers.loc[(offers["reward_kind"] == "coupon") & ~offers["recorded"], "offer_id"] \
        if len(offers) else []
    codes = dict(zip(coupon_offers, generate_codes(len(coupon_offers), settings.coupon_prefix,
                                                   settings.coupon_length)))
    renderer = make_renderer(workspace)
    version = rule_version(workspace)

    def to_rows(records: list[dict]) -> list:   # where the messages were rendered
        for record in records:
            record["rule_version"] = version
        return StateStore.prepare_offers(records, run_id)

    fresh = offers[~is_in(offers["firing_key"], again)] if again else offers
    rows, errors = build_messages(workspace, evaluation, prepared.features, renderer, fresh, codes=codes,
                                  workers=workers, finish=to_rows)
    # a one-off firing whose message was not rendered waits for a later run
    pending = render_outcomes(workspace, offers, evaluation.pending,
                              {row["firing_key"] for row, _ in rows} | set(again))
    timings["render"] = round(time.perf_counter() - started, 3)
    with storage_failures(store.label):
        store.begin_run(as_of.isoformat(), dict(workspace.rule_hashes), dict(prepared.tables.fingerprints),
                        result.campaigns, run_id=run_id)
    with _failing_run(store, run_id):
        state_rows = edge_state_rows(evaluation, prepared.context.edge_state)
        recorded = store.record_run(run_id, trigger_state_rows=state_rows,
                                    holdouts=_holdout_rows(evaluation, run_id), prepared=rows,
                                    pending=pending, known=known, absent=True,
                                    tiers=_tier_run(workspace, evaluation.as_of, evaluation.tier_moves))
        _set_schedules(store, result, as_of, due)
    result.holdouts = len(evaluation.holdouts)
    result.funnels = evaluation.funnels
    result.render_errors = errors
    result.warnings = list(prepared.tables.warnings) + evaluation.warnings
    result.reentered = dict(evaluation.reentered)
    result.pending = tally(pending)
    result.granted_without_message = {c: t.granted_without_message for c, t in
                                      campaign_totals(offers, list(evaluation.funnels)).items()
                                      if t.granted_without_message}
    return recorded


def _record_written(workspace: LoadedWorkspace, store: StateStore, written: WrittenRun, prepared,
                    result: RunResult, as_of: pd.Timestamp, due: bool) -> RecordResult:
    """Record a run whose offers the dask engine's workers rendered and wrote to files: the
    files streamed into the state store in one transaction, ``CHUNK`` offers at a time."""
    run_id = written.run_id
    with storage_failures(store.label):
        store.begin_run(as_of.isoformat(), dict(workspace.rule_hashes), dict(prepared.tables.fingerprints),
                        result.campaigns, run_id=run_id)

    def records(kind: str):
        for path in written.paths(kind):
            yield from read_records(path)

    def frames(kind: str):
        return (read_frame(path) for path in written.paths(kind))

    evaluated = [[evaluated_row(campaign) for campaign in written.edge_campaigns]]
    with _failing_run(store, run_id):
        recorded = store.record_run_chunks(
            run_id, offers=chunks(records("offers")),
            known=chunks(records("known")), trigger_state=itertools.chain(evaluated, chunks(records("trigger_state"))),
            holdouts=chunks(records("holdouts")), pending=frames("pending"),
            tiers=_tier_run(workspace, as_of, None), tier_moves=frames("tier_moves"))
        _set_schedules(store, result, as_of, due)
    result.holdouts = written.holdouts
    result.funnels = written.funnels
    result.render_errors = written.render_errors
    result.warnings = list(prepared.tables.warnings) + written.warnings
    result.reentered = dict(written.reentered)
    result.pending = written.pending
    result.granted_without_message = written.granted_without_message
    return recorded


def _set_schedules(store: StateStore, result: RunResult, as_of: pd.Timestamp, due: bool) -> None:
    if due:
        for campaign in result.campaigns:
            store.set_schedule_last_run(campaign, as_of.isoformat())


@contextmanager
def _locked(store: StateStore, timeout: float) -> Iterator[None]:
    """The run lock; a lock file that cannot be made (read-only folder) is a StateError."""
    with ExitStack() as held:
        with storage_failures(store.label, "lock"):
            held.enter_context(store.lock(timeout=timeout))
        yield


@contextmanager
def _failing_run(store: StateStore, run_id: str) -> Iterator[None]:
    """A storage failure (disk full, read-only, damaged file) after the run began: the run is
    marked failed where the disk still allows it, and the failure is a StateError (exit 3).
    What was committed stays (a later run counts it as recorded); what was not is made again."""
    try:
        yield
    except (sqlite3.DatabaseError, OSError) as exc:
        try:
            store.finish_run(run_id, "failed")
        except (sqlite3.DatabaseError, OSError):
            pass              # the next run finds it 'running' and goes on: nothing depends on it
        raise storage_error(store.label, exc) from exc


def _no_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The same columns and types without rows, holding on to none of ``frame``'s memory
    (an empty slice would keep its buffers alive)."""
    return pd.DataFrame({name: pd.Series([], dtype=frame[name].dtype) for name in frame.columns})


def _customers_only(workspace: LoadedWorkspace):
    """The customers table alone (for consent at delivery when the tables were not loaded here)."""
    settings = workspace.settings
    only = replace(settings, data={"customers": settings.data["customers"]})
    return load_tables(only, workspace.root)


def _tier_run(workspace: LoadedWorkspace, as_of: pd.Timestamp, moves: pd.DataFrame | None) -> TierRun | None:
    """The stored tiers' moves this run records (with those of its tier rewards); None with
    computed tiers. ``moves`` None: they come in chunks (``record_run_chunks``)."""
    if not workspace.program.stored_tiers:
        return None
    return TierRun(as_of, TierRules.of(workspace.program, workspace.settings.timezone), moves)


def _holdout_rows(evaluation, run_id) -> list[dict]:
    frame = evaluation.holdouts
    if frame.empty:
        return []
    as_of = evaluation.as_of.isoformat()
    names = list(frame.columns)
    return [dict(zip(names, values), run_id=run_id, as_of=as_of)          # a column at a time: quick
            for values in zip(*(frame[name].tolist() for name in names))]


def _consent_lookup(workspace: LoadedWorkspace, tables):
    """(customer_id, channel) -> consent now, from the current customer data."""
    customers = tables.customers
    ids = customers["customer_id"].astype(str).to_numpy(dtype=object)   # plain strings: sets of them are quick
    allowed = {}
    for name, channel in workspace.settings.channels.items():
        allowed[name] = set(ids[np.asarray(reachable(customers, channel), dtype=bool)])
    return lambda customer_id, channel: str(customer_id) in allowed.get(channel, set())


def _deliver(workspace: LoadedWorkspace, store: StateStore, now, tables: Tables, progress: bool) -> DeliveryResult:
    now_ts = parse_as_of(now, workspace.settings.timezone) if now is not None else pd.Timestamp.now(tz="UTC")
    return deliver_outbox(store, workspace.settings, now_ts, consent=_consent_lookup(workspace, tables),
                          progress=progress, root=workspace.root)


def deliver(root: Path | str, now=None, *, progress: bool = True, lock_timeout: float = 5.0) -> DeliveryResult:
    """(Re)send what is recorded, due and not yet delivered; consent is checked again."""
    workspace = load_workspace(root)
    store = open_store(workspace.settings.state_path, create=True)
    try:
        with _locked(store, lock_timeout):
            tables = load_tables(workspace.settings, workspace.root)
            return _deliver(workspace, store, now, tables, progress)
    finally:
        store.close()


def history(root: Path | str, customer_id: str) -> list[dict]:
    """Every offer a customer got, from which campaign and rule version, and why; and the
    firings of one-off campaigns that were stopped and wait, or waited, and the changes of
    the member's stored tier (``kind``: ``offer``, ``pending_firing`` or ``tier_change``),
    oldest first, times in the programme's timezone. An
    offer that waited first says since when and why (``pending_since``, ``pending_reason``)."""
    return _from_state(root, lambda store, workspace: customer_history(store, str(customer_id),
                                                                       workspace.settings.timezone))


def customer_history(store: StateStore, customer_id: str, timezone: str = "UTC") -> list[dict]:
    """``history`` from an open state store."""
    def local(instant: str) -> str:
        return pd.Timestamp(instant).tz_convert(timezone).isoformat()

    waited = {row["firing_key"]: row for row in store.pending_firings(customer_id)}
    entries = []
    for offer in store.history(customer_id):
        before = waited.pop(offer["firing_key"], None)
        if before is not None:
            offer["pending_since"], offer["pending_reason"] = local(before["first_as_of"]), before["reason"]
        entries.append((offer.get("due_at") or "", dict(offer, kind="offer")))
    for change in store.tier_history(customer_id):
        at = pd.Timestamp(change["as_of"]).tz_convert("UTC").isoformat()
        entries.append((at, {"kind": "tier_change", **change}))
    for row in waited.values():
        entries.append((row["status_as_of"], {
            "kind": "pending_firing", "firing_key": row["firing_key"], "campaign": row["campaign"],
            "customer_id": row["customer_id"], "status": row["status"], "reason": row["reason"],
            "first_as_of": local(row["first_as_of"]), "expires_at": local(row["expires_at"]),
            "updated_as_of": local(row["status_as_of"]), "event": row["event"]}))
    return [entry for _, entry in sorted(entries, key=lambda pair: pair[0])]


def tier_history(root: Path | str, customer_id: str) -> list[dict]:
    """Every change of a member's stored tier (as_of, from_tier, to_tier, reason, run_id and
    the review, grace and trial dates after it), oldest first."""
    return _from_state(root, lambda store, workspace: store.tier_history(str(customer_id)))


def runs(root: Path | str, limit: int = 20) -> list[dict]:
    """The most recent runs, newest first."""
    return _from_state(root, lambda store, workspace: store.runs(limit))


def _from_state(root: Path | str, read: Callable[[StateStore, LoadedWorkspace], list[dict]]) -> list[dict]:
    """What ``read`` finds in the workspace's state database (nothing before the first run)."""
    workspace = load_workspace(root)
    store = open_store(workspace.settings.state_path, create=False)
    if store is None:
        return []
    try:
        with storage_failures(store.label, "read"):
            return read(store, workspace)
    finally:
        store.close()
