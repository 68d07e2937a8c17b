"""The public surface: everything the CLI can do, as Python functions returning results."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from croniter import croniter

from .errors import LoyaltyError
from .faults import checkpoint
from .evaluation import evaluate
from .model import Workspace
from .pipeline import (Prepared, build_messages, edge_state_rows, make_renderer, parse_as_of, prepare,
                       prepare_and_evaluate, run_context)
from .policy import reachable
from .preview import Preview, SampledEvaluation, diff_offers, explain_customer, sample_rows, summarise
from .rewards import generate_codes
from .settings import chosen_engine
from .sources import Tables, load_tables
from .store import StateStore, new_run_id
from .workspace import ValidationResult, load_workspace, rule_version, validate_workspace

__all__ = ["validate", "load_workspace", "preview", "write_preview_trace", "run", "deliver", "history", "runs",
           "convert_data", "RunResult"]


def validate(root: Path | str) -> ValidationResult:
    """Schema and semantic checks of a workspace."""
    return validate_workspace(root)


def _open_store(workspace: Workspace, create: bool) -> StateStore | None:
    path = workspace.settings.state_path
    if not create and not path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return StateStore(path)


def preview(root: Path | str, as_of=None, *, campaigns: list[str] | None = None,
            customer: str | None = None, diff: Path | str | None = None, sample: int = 3,
            since=None, trace: bool = False, partitions: int | None = None,
            engine: str | None = None, scheduler: str | None = None,
            progress: Callable[[str], None] | None = None, workers: int | None = None) -> Preview:
    """A dry run at ``as_of``: funnels, offers, cost, sample messages. Never writes state.

    ``partitions``: evaluate that many partitions of customers one after the other
    (None: chosen from the data size and free memory); the result is the same.
    ``workers``: how many processes decide at once with the local engine (``parallel``).
    ``engine``/``scheduler``: where to evaluate (see ``_decide``). ``trace``: keep every
    customer's stopping stage, for ``preview_trace``."""
    workspace = load_workspace(root)
    as_of = parse_as_of(as_of, workspace.settings.timezone)
    since_ts = parse_as_of(since, workspace.settings.timezone) if since is not None else None
    _check_campaigns(workspace, campaigns)
    store = _open_store(workspace, create=False)
    try:     # open until the end: --diff evaluates the other rules against the same history
        return _preview(workspace, as_of, store, since_ts, campaigns, customer, diff, sample, trace,
                        partitions, engine, scheduler, progress, workers)
    finally:
        if store is not None:
            store.close()


def _preview(workspace, as_of, store, since_ts, campaigns, customer, diff, sample, trace, partitions,
             engine, scheduler, progress, workers) -> Preview:
    prepared, evaluation = _decide(workspace, as_of, store, since_ts, campaigns, partitions=partitions,
                                   workers=workers,
                                   engine=engine, scheduler=scheduler, progress=progress,
                                   trace=trace or customer is not None, stream=diff is None,
                                   sample=sample if diff is None else None)
    renderer = make_renderer(workspace)
    rows = sample_rows(evaluation.offers, sample)
    records, errors = build_messages(workspace, evaluation, prepared.features, renderer, rows)
    warnings = list(prepared.tables.warnings) + evaluation.warnings
    totals = evaluation.totals if isinstance(evaluation, SampledEvaluation) else None
    result = summarise(workspace, evaluation, prepared.customers, records, errors, warnings, totals)
    if customer is not None:
        result.explanation = explain_customer(workspace, evaluation, prepared.features, customer)
    if diff is not None:
        other = load_workspace(diff)
        other_prepared = prepare(other, as_of, None, since_ts or prepared.context.previous_as_of,
                                 tables=prepared.tables if _same_data(workspace, other) else None)
        other_prepared.context = prepared.context
        other_eval = evaluate(other, other_prepared.tables, other_prepared.features, prepared.context,
                              campaigns)
        result.diff = diff_offers(evaluation, other_eval)
    result._evaluation = evaluation  # for --trace export and tests
    result._features = prepared.features
    return result


def write_preview_trace(result: Preview, path: Path | str) -> int:
    """Write the decision trace of a preview made with ``trace=True`` (Parquet or CSV by the
    file's extension); return the number of rows."""
    from .trace import write_trace
    return write_trace(result._evaluation, result._features, path)


def _decide(workspace: Workspace, as_of: pd.Timestamp, store, since, campaigns, *, partitions=None,
            engine=None, scheduler=None, progress=None, trace=False, stream=False, sample=None, workers=None):
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
    from .dask_engine import evaluate_on_dask, preview_on_dask
    context = run_context(workspace, as_of, store, since)
    options = dict(store=store, campaigns=campaigns, scheduler=scheduler or settings.scheduler,
                   partitions=partitions, progress=progress)
    decided = (evaluate_on_dask(workspace, context, **options) if sample is None else
               preview_on_dask(workspace, context, sample, **options))
    tables = Tables.read_elsewhere(decided.table_warnings)
    return Prepared(tables, decided.features, context, decided.customers), decided.evaluation


def _same_data(a: Workspace, b: Workspace) -> bool:
    return dict(a.settings.data) == dict(b.settings.data)


def _check_campaigns(workspace: Workspace, campaigns) -> None:
    from .schema import did_you_mean
    for name in campaigns or []:
        if name not in workspace.program.campaigns:
            hint = did_you_mean(name, workspace.program.campaigns)
            raise LoyaltyError(f"no campaign '{name}'" + (f" ({hint})" if hint else ""))


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
    delivery: object | None = None
    campaigns: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "delivery"}
        if self.delivery is not None:
            data["delivery"] = {k: v for k, v in self.delivery.__dict__.items()}
        return data


def due_campaigns(workspace: Workspace, store: StateStore, as_of: pd.Timestamp) -> list[str]:
    """Campaigns whose cron schedule had a tick since their last run (once, however many ticks).

    Campaigns without a schedule are due at every run."""
    due = []
    local = as_of.tz_convert(workspace.settings.timezone)
    for campaign in workspace.program.campaigns.values():
        if not campaign.enabled:
            continue
        if campaign.schedule is None:
            due.append(campaign.id)
            continue
        # a tick exactly at as_of counts as due: look back from just after it
        start = (local + pd.Timedelta(seconds=1)).to_pydatetime()
        last_tick = croniter(campaign.schedule, start).get_prev(pd.Timestamp)
        last_tick = pd.Timestamp(last_tick)
        last_run = store.schedule_last_run(campaign.id)
        if last_run is None or pd.Timestamp(last_run) < last_tick:
            due.append(campaign.id)
    return due


def run(root: Path | str, as_of=None, *, campaigns: list[str] | None = None, due: bool = False,
        deliver: bool = True, now=None, lock_timeout: float = 5.0, progress: bool = False,
        partitions: int | None = None, engine: str | None = None, scheduler: str | None = None,
        workers: int | None = None) -> RunResult:
    """Evaluate at ``as_of``, record the offers in one transaction, then deliver what is due.

    ``engine``/``scheduler``/``partitions``/``workers`` choose where and in how many pieces the
    evaluation runs; recording and delivery are the same on every engine."""
    started = time.perf_counter()
    workspace = load_workspace(root)
    settings = workspace.settings
    as_of = parse_as_of(as_of, settings.timezone)
    _check_campaigns(workspace, campaigns)
    store = _open_store(workspace, create=True)
    try:
        with store.lock(timeout=lock_timeout):
            timings = {}
            selected = campaigns
            if due:
                scheduled = due_campaigns(workspace, store, as_of)
                selected = [c for c in scheduled if campaigns is None or c in campaigns]
            result = RunResult(None, as_of.isoformat(), campaigns=list(selected or workspace.program.campaigns))
            if selected is not None and not selected:
                return result
            prepared, evaluation = _decide(workspace, as_of, store, None, selected, partitions=partitions,
                                           workers=workers,
                                           engine=engine, scheduler=scheduler,
                                           progress=_say if progress else None)
            # from here on only the customers are needed (consent at delivery): let the
            # orders and events go before the messages are rendered
            tables = prepared.tables
            prepared.tables = replace(tables, orders=_no_rows(tables.orders), events=_no_rows(tables.events))
            del tables
            timings["evaluate"] = round(time.perf_counter() - started, 3)
            checkpoint("after_evaluation")
            # offers recorded by an earlier attempt at this as_of go to record_run again: it
            # counts them as existing, or reports a conflict if the rules changed in between
            offers = evaluation.offers
            coupon_offers = offers.loc[(offers["reward_kind"] == "coupon") & ~offers["recorded"], "offer_id"] \
                if len(offers) else []
            codes = dict(zip(coupon_offers, generate_codes(len(coupon_offers), settings.coupon_prefix,
                                                           settings.coupon_length)))
            renderer = make_renderer(workspace)
            version, run_id = rule_version(workspace), new_run_id(as_of)

            def to_rows(records: list[dict]) -> list:   # where the messages were rendered
                for record in records:
                    record["rule_version"] = version
                return StateStore.prepare_offers(records, run_id)

            rows, errors = build_messages(workspace, evaluation, prepared.features, renderer, codes=codes,
                                          workers=workers or settings.workers, finish=to_rows)
            timings["render"] = round(time.perf_counter() - started, 3)
            store.begin_run(as_of.isoformat(), dict(workspace.rule_hashes), dict(prepared.tables.fingerprints),
                            result.campaigns, run_id=run_id)
            state_rows = edge_state_rows(evaluation, prepared.context.edge_state)
            recorded = store.record_run(run_id, trigger_state_rows=state_rows,
                                        holdouts=_holdout_rows(evaluation, run_id), prepared=rows)
            if due:
                for campaign in result.campaigns:
                    store.set_schedule_last_run(campaign, as_of.isoformat())
            timings["record"] = round(time.perf_counter() - started, 3)
            checkpoint("after_commit")
            result.run_id = run_id
            result.new_offers = recorded.new
            result.already_recorded = recorded.existing
            result.conflicts = recorded.conflicts
            result.holdouts = len(evaluation.holdouts)
            result.funnels = evaluation.funnels
            result.render_errors = errors
            result.warnings = list(prepared.tables.warnings) + evaluation.warnings
            if deliver:
                tables = prepared.tables
                if tables.customers.empty:   # the dask engine's workers read the data: consent needs it here
                    tables = _customers_only(workspace)
                result.delivery = _deliver(workspace, store, now, tables, progress)
                timings["deliver"] = round(time.perf_counter() - started, 3)
            result.timings = timings
            store.finish_run(run_id, "delivered" if deliver else "recorded", timings,
                             {"new": recorded.new, "existing": recorded.existing,
                              "conflicts": len(recorded.conflicts), "render_errors": len(errors)})
            return result
    finally:
        store.close()


def _no_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The same columns and types without rows, holding on to none of ``frame``'s memory
    (an empty slice would keep its buffers alive)."""
    return pd.DataFrame({name: pd.Series([], dtype=frame[name].dtype) for name in frame.columns})


def _say(message: str) -> None:
    import click
    click.echo(message, err=True)


def _customers_only(workspace: Workspace):
    """The customers table alone (for consent at delivery when the tables were not loaded here)."""
    settings = workspace.settings
    only = replace(settings, data={"customers": settings.data["customers"]})
    return load_tables(only, workspace.root)


def _holdout_rows(evaluation, run_id) -> list[dict]:
    frame = evaluation.holdouts
    if frame.empty:
        return []
    as_of = evaluation.as_of.isoformat()
    names = list(frame.columns)
    return [dict(zip(names, values), run_id=run_id, as_of=as_of)          # a column at a time: quick
            for values in zip(*(frame[name].tolist() for name in names))]


def _consent_lookup(workspace: Workspace, tables):
    """(customer_id, channel) -> consent now, from the current customer data."""
    customers = tables.customers
    ids = customers["customer_id"].astype(str).to_numpy(dtype=object)   # plain strings: sets of them are quick
    allowed = {}
    for name, channel in workspace.settings.channels.items():
        allowed[name] = set(ids[np.asarray(reachable(customers, channel), dtype=bool)])
    return lambda customer_id, channel: str(customer_id) in allowed.get(channel, set())


def _deliver(workspace, store, now, tables, progress):
    from .delivery import deliver as deliver_outbox
    now_ts = parse_as_of(now, workspace.settings.timezone) if now is not None else pd.Timestamp.now(tz="UTC")
    return deliver_outbox(store, workspace.settings, now_ts, consent=_consent_lookup(workspace, tables),
                          progress=progress, root=workspace.root)


def deliver(root: Path | str, now=None, *, progress: bool = True, lock_timeout: float = 5.0):
    """(Re)send what is recorded, due and not yet delivered; consent is checked again."""
    workspace = load_workspace(root)
    store = _open_store(workspace, create=True)
    try:
        with store.lock(timeout=lock_timeout):
            tables = load_tables(workspace.settings, workspace.root)
            return _deliver(workspace, store, now, tables, progress)
    finally:
        store.close()


def history(root: Path | str, customer_id: str) -> list[dict]:
    """Every offer a customer got, from which campaign and rule version, and why."""
    workspace = load_workspace(root)
    store = _open_store(workspace, create=False)
    if store is None:
        return []
    try:
        return store.history(str(customer_id))
    finally:
        store.close()


def runs(root: Path | str, limit: int = 20) -> list[dict]:
    workspace = load_workspace(root)
    store = _open_store(workspace, create=False)
    if store is None:
        return []
    try:
        return store.runs(limit)
    finally:
        store.close()


def convert_data(root: Path | str, partitions: int | None = None,
                 progress: Callable[[str], None] | None = None) -> tuple[Path, int]:
    """Write the workspace's customers, orders and events as partitioned Parquet (what the
    dask engine's workers and streamed previews read); nothing is rewritten while the data
    and the partition count are unchanged. Returns the folder and the partition count."""
    from .dask_engine import default_partitions
    from .partitioned_data import ensure_partitioned
    workspace = load_workspace(root)
    count = partitions or workspace.settings.partitions or default_partitions(workspace, Path(workspace.root))
    folder = ensure_partitioned(workspace.settings, workspace.root, count, progress)
    return folder, count
