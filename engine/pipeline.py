"""The run pipeline shared by preview and run: data -> features -> evaluation -> messages."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import LoyaltyError, TemplateError
from .evaluation import Evaluation, evaluate
from .features import compute_features
from .model import Workspace
from .rendering import Renderer
from .rewards import reward_payload
from .sources import Tables, load_tables
from .store import gc_paused
from .triggers import RunContext


@dataclass
class Prepared:
    """Data and features of a workspace at one instant."""

    tables: object
    features: pd.DataFrame
    context: RunContext
    customers: int | None = None      # how many customers were evaluated


def parse_as_of(value, timezone: str) -> pd.Timestamp:
    """An instant from text, a datetime or None (now); naive values are in the programme's timezone."""
    if value is None or value == "now":
        stamp = pd.Timestamp.now(tz="UTC")
    else:
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, TypeError) as exc:
            raise LoyaltyError(f"--as-of '{value}' is not a date or time "
                               "(write 2026-11-23 or 2026-11-23T10:00:00+08:00)") from exc
        if stamp.tzinfo is None:
            stamp = stamp.tz_localize(timezone)
    return stamp.tz_convert(timezone)


def empty_contacts() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": pd.Series(dtype=str), "campaign": pd.Series(dtype=str),
                         "channel": pd.Series(dtype=str),
                         "contacted_at": pd.Series(dtype="datetime64[ns, UTC]")})


def run_context(workspace: Workspace, as_of: pd.Timestamp, store=None,
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
    return RunContext(as_of, previous_as_of, contacts, edge_state,
                      recorded=store.recorded_at)


def _utc_key(stamp: pd.Timestamp) -> str:
    return stamp.tz_convert("UTC").isoformat(timespec="seconds")


def _contacts_before(store, as_of: pd.Timestamp, since: pd.Timestamp) -> pd.DataFrame:
    """Contact history made by runs before ``as_of``: a rerun at the same instant must not
    be stopped by the contacts its first attempt recorded, nor a rerun of an earlier day by
    the contacts of later runs."""
    rows = list(store.db.query(
        "SELECT c.customer_id, c.campaign, c.channel, c.contacted_at FROM contacts c "
        "JOIN offers o ON o.offer_id = c.offer_id JOIN runs r ON r.run_id = o.run_id "
        "WHERE c.contacted_at > ? AND r.as_of_utc < ?", [_utc_key(since), _utc_key(as_of)]))
    if not rows:
        return empty_contacts()
    frame = pd.DataFrame(rows)
    frame["contacted_at"] = pd.to_datetime(frame["contacted_at"], utc=True, format="ISO8601")
    return frame


EVALUATED = "*"   # trigger-state row saying a `becomes` condition has been evaluated before


def edge_state_rows(evaluation: Evaluation, previous: dict) -> list[dict]:
    """Trigger-state rows to store: who is true now, who stopped being true."""
    rows = []
    for campaign, now_true in evaluation.edge_state.items():
        before = previous.get(campaign, frozenset())
        rows.append({"campaign": campaign, "customer_id": EVALUATED, "key": "becomes", "value": "1"})
        rows.extend({"campaign": campaign, "customer_id": c, "key": "becomes", "value": "1"}
                    for c in now_true - before)
        rows.extend({"campaign": campaign, "customer_id": c, "key": "becomes", "value": "0"}
                    for c in before - now_true)
    return rows


def prepare(workspace: Workspace, as_of: pd.Timestamp, store=None, since=None, tables=None) -> Prepared:
    tables = tables if tables is not None else load_tables(workspace.settings, workspace.root)
    features = compute_features(tables, workspace.program, workspace.settings, as_of)
    return Prepared(tables, features, run_context(workspace, as_of, store, since))


def prepare_and_evaluate(workspace: Workspace, as_of: pd.Timestamp, store=None, since=None,
                         campaigns: list[str] | None = None, partitions: int | None = None,
                         trace: bool = False, stream: bool = False,
                         progress: Callable[[str], None] | None = None,
                         workers: int | None = None) -> tuple[Prepared, Evaluation]:
    """Load the data and decide, a partition of customers at a time (see partitions.py).

    ``Prepared.features`` holds the rows the offers' ``pos`` refers to: every customer with
    one partition, the offered customers' rows with several. With ``stream`` and more than
    one partition, each partition's rows are read on their own from the partitioned copy of
    the data (``partitioned_data``) and ``Prepared.tables`` is empty but for the warnings.
    ``progress`` is told what is being done (conversion, partition by partition). ``workers``:
    how many processes decide at once (``parallel``; automatic when None)."""
    from .partitions import evaluate_in_partitions, evaluate_streamed   # late: they build on evaluation
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


def make_renderer(workspace: Workspace) -> Renderer:
    settings = workspace.settings
    return Renderer(workspace.templates_dir, settings.default_locale,
                    {"name": settings.name, "currency": settings.currency, "timezone": settings.timezone})


def plain_value(value):
    """A pandas/numpy scalar as a plain Python value; missing values as None."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def customer_records(features: pd.DataFrame, positions) -> list[dict]:
    """Customer columns and features of the given rows, as plain dicts for templates."""
    return _plain_records(features.iloc[np.asarray(positions, dtype=int)])


def _plain_records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts of plain Python values (missing values as None), built a column at a time."""
    names = [str(name) for name in frame.columns]
    columns = [_plain_column(frame.iloc[:, i]) for i in range(frame.shape[1])]
    return [dict(zip(names, values)) for values in zip(*columns)]


def _plain_column(column: pd.Series) -> list:
    values = column.tolist()
    if column.dtype == object:
        return [plain_value(v) for v in values]
    missing = np.flatnonzero(column.isna().to_numpy())
    for i in missing:
        values[i] = None
    return values


def build_messages(workspace: Workspace, evaluation: Evaluation, features: pd.DataFrame,
                   renderer: Renderer, rows: pd.DataFrame | None = None,
                   codes: dict[str, str] | None = None, workers: int | None = 1,
                   finish: Callable[[list[dict]], list] | None = None) -> tuple[list, list[dict]]:
    """Offer records with rewards and rendered messages; and the render errors.

    One bad template never stops the others: a failed render is reported per offer.
    ``workers``: processes rendering at once (``parallel``; None: automatic from the
    number of messages); the records come in the same order. ``finish``: what to make of
    each share of records where it was rendered (e.g. the state store's rows); its
    results, concatenated, are returned instead of the records.
    """
    from .parallel import MIN_OFFERS_PER_WORKER, in_workers, worker_count   # late: it builds on partitions
    settings = workspace.settings
    rows = evaluation.offers if rows is None else rows
    send_at = pd.to_datetime(rows["send_at"], utc=True).dt.tz_convert(settings.timezone).tolist()
    workers = worker_count(len(rows), workers, MIN_OFFERS_PER_WORKER)
    # the first share is rendered here, which then also unpickles the others' messages: a bigger share
    shares = np.array([1.2] + [1.0] * (workers - 1))
    bounds = np.round(np.concatenate([[0], np.cumsum(shares)]) / shares.sum() * len(rows)).astype(np.int64)

    def render(number: int) -> tuple[list[dict], list[dict]]:
        start, stop = int(bounds[number]), int(bounds[number + 1])
        part = rows.iloc[start:stop]
        customers = customer_records(features, part["pos"])
        records: list[dict] = []
        errors: list[dict] = []
        _render_all(workspace, evaluation, renderer, part, customers, send_at[start:stop], codes, records, errors)
        return (records if finish is None else finish(records)), errors

    with gc_paused():
        parts = in_workers(render, workers)
        return [r for records, _ in parts for r in records], [e for _, errors in parts for e in errors]


def _render_all(workspace: Workspace, evaluation: Evaluation, renderer: Renderer, rows: pd.DataFrame,
                customers: list[dict], send_at: list, codes: dict | None, records: list[dict],
                errors: list[dict]) -> None:
    settings, program = workspace.settings, workspace.program
    explain_names = _explanation_names(workspace)
    rewards = {(c.id, v.name): v.reward for c in program.campaigns.values() for v in c.variants
               if v.reward is not None}
    as_of = evaluation.as_of.isoformat()
    event_columns = [c for c in rows.columns if c.startswith("event.")]
    for customer, offer, send_at_local in zip(customers, _offer_records(rows), send_at):
        campaign = program.campaigns[offer["campaign"]]
        reward = rewards.get((campaign.id, offer["variant"]), campaign.reward)
        code = (codes or {}).get(offer["offer_id"]) if reward.kind == "coupon" else None
        payload = reward_payload(reward.kind, dict(reward.params), offer["points"], send_at_local, code,
                                 offer["locale"], offer["cost"])
        if reward.kind == "coupon" and code is None:
            payload["code"] = "(assigned at run)"
        channel = settings.channels[campaign.channel]
        record = {
            "offer_id": offer["offer_id"], "firing_key": offer["firing_key"], "campaign": campaign.id,
            "campaign_name": campaign.name, "customer_id": offer["customer_id"], "channel": campaign.channel,
            "variant": offer["variant"], "reward": payload, "cost": float(offer["cost"]),
            "send_at": send_at_local.isoformat(), "locale": offer["locale"], "template": offer["template"],
            "address": customer.get(channel.address_column), "as_of": as_of,
            "explanation": {n: _jsonable(customer.get(n)) for n in explain_names[campaign.id] if n in customer},
            "event": {k[6:]: _jsonable(offer[k]) for k in event_columns},
        }
        context = {"customer": customer, "reward": payload, "program": renderer.program,
                   "offer": {k: record[k] for k in ("offer_id", "campaign", "campaign_name", "variant",
                                                    "channel", "send_at")},
                   "event": record["event"]}
        try:
            message = renderer.render(offer["template"], campaign.channel, offer["locale"], context,
                                      customer_id=offer["customer_id"])
        except TemplateError as exc:
            errors.append({"campaign": campaign.id, "customer_id": offer["customer_id"], "error": str(exc)})
            continue
        record.update(subject=message.subject, body=message.body, html=message.html,
                      template_file=message.template_file, sms_segments=message.sms_segments,
                      too_long=message.too_long)
        records.append(record)


def _offer_records(offers: pd.DataFrame) -> list[dict]:
    """Offer rows as dicts, values as ``to_dict("records")`` gives them, a column at a time."""
    names = list(offers.columns)
    return [dict(zip(names, values)) for values in zip(*(offers[c].tolist() for c in names))]


def _jsonable(value):
    if isinstance(value, (pd.Timestamp, dt.date, dt.datetime)):
        return value.isoformat()
    return value


def _explanation_names(workspace: Workspace) -> dict[str, list[str]]:
    """The features each campaign's decision depends on, for `history` and previews."""
    program = workspace.program
    out = {}
    for campaign in program.campaigns.values():
        names: set[str] = set()
        if campaign.segment:
            names |= program.segments[campaign.segment].where.names
        for excluded in campaign.exclude:
            names |= program.segments[excluded].where.names
        for expression in (campaign.where, campaign.trigger.expr, campaign.budget.rank_by):
            if expression is not None:
                names |= expression.names
        if campaign.trigger.kind == "inactive_for":
            names.add("days_since_last_order")
        if campaign.trigger.kind == "birthday":
            names.add("days_to_birthday")
        out[campaign.id] = sorted(n for n in names if not n.startswith("event."))
    return out
