"""The run pipeline shared by preview and run: data -> features -> evaluation -> messages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.config.settings import chosen_engine
from engine.data.features import compute_features
from engine.data.points import PointsHistory
from engine.data.sources import Tables, load_tables
from engine.decide.budgets import budget_periods
from engine.decide.evaluation import Evaluation
from engine.decide.triggers import RunContext
from engine.errors import LoyaltyError
from engine.execution.dask_engine import evaluate_on_dask, preview_on_dask, run_on_dask
from engine.execution.partition_run import WrittenRun
from engine.execution.partitions import evaluate_in_partitions, evaluate_streamed
from engine.execution.recording import EVALUATED
from engine.execution.recording import build_messages as build_messages
from engine.execution.recording import edge_state_rows as edge_state_rows
from engine.progress import Progress


@dataclass
class Prepared:
    """Data and features of a workspace at one instant."""

    tables: object
    features: pd.DataFrame
    context: RunContext
    customers: int | None = None      # how many customers were evaluated


def parse_as_of(value, timezone: str) -> pd.Timestamp:
    """An instant from text, a datetime or None (now); naive values are in the programme's timezone.

    Only the years 1980 to 2199 are accepted (a LoyaltyError otherwise): windows, cooldowns and
    coupon expiry reach up to 10 years either side of ``as_of`` and pandas' nanosecond times end
    in 2262, so ``9999-12-31`` would crash deep inside a run; before 1973 some timezones had
    offsets in seconds (Shanghai's +08:05:43 in 1900), which recorded runs cannot be read back with.
    """
    if value is None or value == "now":
        stamp = pd.Timestamp.now(tz="UTC")
    else:
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, TypeError, OverflowError):
            stamp = pd.NaT
        if stamp is pd.NaT:
            raise LoyaltyError(f"--as-of '{value}' is not a date or time "
                               "(write 2026-11-23 or 2026-11-23T10:00:00+08:00)")
        if not 1980 <= stamp.year <= 2199:
            raise LoyaltyError(f"--as-of '{value}' is out of range "
                               "(use a date from 1980-01-01 to 2199-12-31)")
        if stamp.tzinfo is None:
            stamp = stamp.tz_localize(timezone)
    return stamp.tz_convert(timezone)


def empty_contacts() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": pd.Series(dtype=str), "campaign": pd.Series(dtype=str),
                         "channel": pd.Series(dtype=str),
                         "contacted_at": pd.Series(dtype="datetime64[ns, UTC]")})


def run_context(workspace: LoadedWorkspace, as_of: pd.Timestamp, store=None,
                since: pd.Timestamp | None = None) -> RunContext:
    """What earlier runs did, read from the state store (or nothing without one)."""
    if store is None:
        return RunContext(as_of, since, empty_contacts(), {})
    previous = store.previous_run(before_as_of=as_of.isoformat())
    previous_as_of = since
    if previous_as_of is None and previous is not None:
        previous_as_of = pd.Timestamp(previous["as_of"]).tz_convert(workspace.settings.timezone)
    longest = max([workspace.settings.contact_policy.per_days] +
                  [c.cooldown_days or 0 for c in workspace.program.campaigns.values()])
    contacts = _contacts_before(store, as_of, as_of - pd.Timedelta(days=longest + 1))
    edge_state = {}
    for campaign in workspace.program.campaigns.values():
        if campaign.trigger.kind == "becomes":
            state = store.trigger_state(campaign.id, "becomes")
            if len(state) and (state["customer_id"] == EVALUATED).any():
                true_ids = state.loc[state["value"].astype(str) == "1", "customer_id"]
                edge_state[campaign.id] = frozenset(true_ids.astype(str))
    periods = budget_periods(workspace, as_of)
    used = store.budget_used({campaign: _utc_key(start) for campaign, start in periods.items()}, _utc_key(as_of))
    program = workspace.program
    stored = program.stored_tiers
    multiplied = program.points is not None and any(rule.multiplier for rule in program.points.earn.values())
    points = PointsHistory(grants=store.points_granted(before=_utc_key(as_of)),
                           tiers=store.tier_changes(before=_utc_key(as_of)) if stored and multiplied else None)
    tiers = store.tier_state(before=_utc_key(as_of)) if stored else None
    return RunContext(as_of, previous_as_of, contacts, edge_state, recorded=store.recorded_at, budget_used=used,
                      points=points, tiers=tiers, pending=store.pending_before(_utc_key(as_of)))


def _utc_key(stamp: pd.Timestamp) -> str:
    return stamp.tz_convert("UTC").isoformat(timespec="seconds")


def _contacts_before(store, as_of: pd.Timestamp, since: pd.Timestamp) -> pd.DataFrame:
    """Contact history made by runs before ``as_of``: a rerun at the same instant must not
    be stopped by the contacts its first attempt recorded, nor a rerun of an earlier day by
    the contacts of later runs. Rewards granted without a message come too, with ``message``
    false: they count for the campaign's cooldown, never for the frequency cap."""
    window = [_utc_key(since), _utc_key(as_of)]
    rows = list(store.db.query(
        "SELECT c.customer_id, c.campaign, c.channel, c.contacted_at FROM contacts c "
        "JOIN offers o ON o.offer_id = c.offer_id JOIN runs r ON r.run_id = o.run_id "
        "WHERE c.contacted_at > ? AND r.as_of_utc < ?", window))
    granted = list(store.db.query(
        "SELECT o.customer_id, o.campaign, o.channel, o.due_at AS contacted_at FROM offers o "
        "JOIN runs r ON r.run_id = o.run_id WHERE o.suppressed_reason IS NOT NULL AND o.due_at > ? "
        "AND r.as_of_utc < ?", window))
    if not rows and not granted:
        return empty_contacts()
    frame = pd.DataFrame(rows + granted, columns=["customer_id", "campaign", "channel", "contacted_at"])
    frame["contacted_at"] = pd.to_datetime(frame["contacted_at"], utc=True, format="ISO8601")
    if granted:
        frame["message"] = np.arange(len(frame)) < len(rows)
    return frame


def prepare(workspace: LoadedWorkspace, as_of: pd.Timestamp, store=None, since=None, tables=None,
            context: RunContext | None = None) -> Prepared:
    """Data and features at ``as_of``, with what earlier runs did (``context``, else read from ``store``)."""
    tables = tables if tables is not None else load_tables(workspace.settings, workspace.root)
    context = context if context is not None else run_context(workspace, as_of, store, since)
    features = compute_features(tables, workspace.program, workspace.settings, as_of, context.points, context.tiers)
    return Prepared(tables, features, context)


def prepare_and_evaluate(workspace: LoadedWorkspace, as_of: pd.Timestamp, store=None, since=None,
                         campaigns: list[str] | None = None, partitions: int | None = None,
                         trace: bool = False, stream: bool = False,
                         progress: Progress | None = None,
                         workers: int | None = None) -> tuple[Prepared, Evaluation]:
    """Load the data and decide, a partition of customers at a time (see partitions.py).

    ``Prepared.features`` holds the rows the offers' ``pos`` refers to: every customer with
    one partition, the offered customers' rows with several. With ``stream`` and more than
    one partition, each partition's rows are read on their own from the partitioned copy of
    the data (``partitioned_data``) and ``Prepared.tables`` is empty but for the warnings.
    ``progress`` is told what is being done (conversion, partition by partition). ``workers``:
    how many processes decide at once (``parallel``; automatic when None)."""
    context = run_context(workspace, as_of, store, since)
    decided = evaluate_streamed(workspace, context, partitions, campaigns, progress) if stream and not trace \
        else None
    if decided is not None:
        tables = Tables.read_elsewhere(decided.warnings)
    else:
        tables = load_tables(workspace.settings, workspace.root)
        decided = evaluate_in_partitions(workspace, tables, context, partitions, campaigns, trace, progress,
                                         workers)
    return Prepared(tables, decided.features, context, decided.customers), decided.evaluation


def decide(workspace: LoadedWorkspace, as_of: pd.Timestamp, store=None, since=None,
           campaigns: list[str] | None = None, *, partitions: int | None = None, engine: str | None = None,
           scheduler: str | None = None, progress: Progress | None = None, trace: bool = False,
           stream: bool = False, sample: int | None = None,
           workers: int | None = None) -> tuple[Prepared, Evaluation]:
    """Evaluate on the chosen engine: ``local`` (in this process, a partition at a time) or
    ``dask`` (each partition a task on a cluster). Options override loyalty.yaml's ``engine:``.
    ``sample``: only a preview of N messages per campaign is wanted; the dask engine then
    leaves the offers on its workers and returns a ``SampledEvaluation``."""
    settings = workspace.settings
    partitions = partitions or settings.partitions
    if chosen_engine(settings, engine, scheduler) == "local":
        return prepare_and_evaluate(workspace, as_of, store, since, campaigns, partitions,
                                    trace=trace, stream=stream, progress=progress,
                                    workers=workers or settings.workers)
    if trace:
        raise LoyaltyError("--trace and --customer explain every customer and need the local engine: "
                           "run that preview with --engine local (the result is the same)")
    context = run_context(workspace, as_of, store, since)
    options = dict(store=store, campaigns=campaigns, scheduler=scheduler or settings.scheduler,
                   partitions=partitions, progress=progress)
    decided = (evaluate_on_dask(workspace, context, **options) if sample is None else
               preview_on_dask(workspace, context, sample, **options))
    tables = Tables.read_elsewhere(decided.table_warnings)
    return Prepared(tables, decided.features, context, decided.customers), decided.evaluation


def decide_or_write(workspace: LoadedWorkspace, as_of: pd.Timestamp, store, campaigns: list[str] | None,
                    run_id: str, *, partitions: int | None = None, engine: str | None = None,
                    scheduler: str | None = None, progress: Progress | None = None,
                    workers: int | None = None) -> tuple[Prepared, Evaluation | WrittenRun]:
    """``decide`` for a run: on the dask engine the workers also render the offers of run
    ``run_id`` and write them to files (a ``WrittenRun``, see ``partition_run``), unless a
    budget must be applied on the client (then an ``Evaluation``, as ``decide`` gives)."""
    settings = workspace.settings
    if chosen_engine(settings, engine, scheduler) == "local":
        return decide(workspace, as_of, store, None, campaigns, partitions=partitions, engine=engine,
                      scheduler=scheduler, progress=progress, workers=workers)
    context = run_context(workspace, as_of, store)
    done = run_on_dask(workspace, context, run_id, store=store, campaigns=campaigns,
                       scheduler=scheduler or settings.scheduler, partitions=partitions or settings.partitions,
                       progress=progress)
    tables = Tables.read_elsewhere(done.table_warnings)
    if isinstance(done, WrittenRun):
        return Prepared(tables, pd.DataFrame(), context, done.customers), done
    return Prepared(tables, done.features, context, done.customers), done.evaluation
