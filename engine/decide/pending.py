"""Pending firings: a one-off firing that was stopped waits for later runs instead of being used up.

A firing of a campaign with a trigger (``when:``) happens once. When the contact policy
(consent, frequency cap, cooldown), arbitration, a budget or its template (``render``) stops
it, it is kept as *pending* for the campaign's ``pending:`` time (default 7 days) from the
run it first fired in. At each later run it joins its campaign's firings right after the
trigger stage, with the same firing key (so the same offer id) and, for an event trigger,
the ``event.*`` values it fired with; the segment is not checked again (the firing was
earned). It is then offered, stopped again (still pending, with the latest reason), held
out (a control group decision: closed as ``held_out``), or, once its ``expires_at`` has
passed, closed as ``expired`` with its last reason and never offered.

A run reads the firings still pending before its ``as_of`` (``RunContext.pending``, the
``CONTEXT_COLUMNS``); its evaluation says what became of them and which firings start to wait
(``Evaluation.pending``, the ``OUTCOME_COLUMNS``), which the state store or a simulation's
memory keeps. Instants are UTC ISO text to the second, as the state database stores them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.data.keys import is_in

REASONS = ("consent", "frequency_cap", "cooldown", "arbitration", "budget", "render")
STATUSES = ("pending", "offered", "expired", "held_out")
CONTEXT_COLUMNS = ["firing_key", "campaign", "customer_id", "reason", "first_as_of", "expires_at", "event"]
OUTCOME_COLUMNS = [*CONTEXT_COLUMNS, "status"]
INTERNAL_EVENT_COLUMNS = ("event.cust_code",)     # the loader's integer customer code: not the event's


def no_pending() -> pd.DataFrame:
    """No firing pending: the empty ``RunContext.pending``."""
    return pd.DataFrame({name: pd.Series(dtype=object) for name in CONTEXT_COLUMNS})


def no_outcomes() -> pd.DataFrame:
    """No pending firing written: the empty ``Evaluation.pending``."""
    return pd.DataFrame({name: pd.Series(dtype=object) for name in OUTCOME_COLUMNS})


def utc_key(stamp: pd.Timestamp) -> str:
    """An instant as the state database compares them: UTC ISO 8601 to the second."""
    return stamp.tz_convert("UTC").isoformat(timespec="seconds")


def expiry(first_as_of: str, days: int) -> str:
    """When a firing first fired at ``first_as_of`` (UTC key) stops waiting."""
    return utc_key(pd.Timestamp(first_as_of) + pd.Timedelta(days=int(days)))


def is_expired(pending: pd.DataFrame, as_of: pd.Timestamp) -> np.ndarray:
    """Which pending firings have expired at ``as_of``: a firing waits while ``as_of < expires_at``."""
    if not len(pending):
        return np.zeros(0, dtype=bool)
    return (pending["expires_at"].astype(str) <= utc_key(as_of)).to_numpy(dtype=bool)


def expired_outcomes(pending: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """The pending firings that expire at ``as_of``, closed with their last reason."""
    gone = pending[is_expired(pending, as_of)]
    if not len(gone):
        return no_outcomes()
    return gone[CONTEXT_COLUMNS].assign(status="expired").reset_index(drop=True)


def waiting_outcomes(workspace: LoadedWorkspace, frame: pd.DataFrame, reason: str,
                     first_as_of: np.ndarray | None = None, reentered: np.ndarray | None = None) -> pd.DataFrame:
    """The firings of ``frame`` (campaign, customer_id, firing_key and their ``event.*`` columns)
    that ``reason`` stopped and that wait: those of campaigns that keep stopped firings pending,
    and those that were pending already. ``first_as_of`` and ``reentered`` default to the frame's
    columns of those names (the candidates carry them)."""
    if not len(frame):
        return no_outcomes()
    first = np.asarray(frame["first_as_of"] if first_as_of is None else first_as_of, dtype=object)
    again = np.asarray(frame["reentered"] if reentered is None else reentered, dtype=bool)
    campaigns = workspace.program.campaigns
    keeps = per_campaign(frame["campaign"], lambda c: c in campaigns and campaigns[c].keeps_pending, bool)
    waits = keeps | again
    if not waits.any():
        return no_outcomes()
    chosen = frame[waits]
    events = event_texts(chosen, per_campaign(chosen["campaign"], lambda c: c in campaigns and
                                              campaigns[c].trigger.kind == "event", bool))
    return pd.DataFrame({
        "firing_key": chosen["firing_key"].to_numpy(dtype=object),
        "campaign": chosen["campaign"].to_numpy(dtype=object),
        "customer_id": chosen["customer_id"].astype(str).to_numpy(dtype=object),
        "reason": reason, "first_as_of": first[waits], "expires_at": None,
        "event": np.array(events, dtype=object), "status": "pending"})


def closed_outcomes(frame: pd.DataFrame, status: str) -> pd.DataFrame:
    """Pending firings of ``frame`` (firing_key, campaign, customer_id, first_as_of) closed with
    ``status`` (offered, held_out); their reason and expiry stay as recorded."""
    if not len(frame):
        return no_outcomes()
    return pd.DataFrame({
        "firing_key": frame["firing_key"].to_numpy(dtype=object),
        "campaign": frame["campaign"].to_numpy(dtype=object),
        "customer_id": frame["customer_id"].astype(str).to_numpy(dtype=object),
        "reason": None, "first_as_of": np.asarray(frame["first_as_of"], dtype=object), "expires_at": None,
        "event": None, "status": status})


def with_expiry(workspace: LoadedWorkspace, outcomes: pd.DataFrame) -> pd.DataFrame:
    """``expires_at`` filled in where missing: the first firing plus the campaign's ``pending:``.
    (A firing already recorded as pending keeps the expiry it was given.)"""
    missing = outcomes["expires_at"].isna().to_numpy()
    if not missing.any():
        return outcomes
    campaigns = workspace.program.campaigns
    days = per_campaign(outcomes["campaign"], lambda c: campaigns[c].pending_days if c in campaigns else 0, np.int64)
    outcomes = outcomes.copy()
    # a run's firings share a handful of (first instant, days) pairs: each expiry computed once
    pairs = pd.DataFrame({"first": outcomes.loc[missing, "first_as_of"].astype(str).to_numpy(dtype=object),
                          "days": days[missing]})
    codes, unique = pd.MultiIndex.from_frame(pairs).factorize()
    ends = np.array([expiry(first, int(n)) for first, n in unique], dtype=object)
    outcomes.loc[missing, "expires_at"] = ends[codes]
    return outcomes


def per_campaign(campaigns: pd.Series, value, dtype) -> np.ndarray:
    """``value(campaign)`` for each row, computed once per campaign."""
    codes, unique = pd.factorize(campaigns)
    found = np.array([value(str(c)) for c in unique], dtype=dtype)
    return found[codes] if len(found) else np.zeros(len(campaigns), dtype=dtype)


def combined(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Outcome frames as one (empty ones left out, so no column turns into another type)."""
    kept = [frame for frame in frames if len(frame)]
    if not kept:
        return no_outcomes()
    return pd.concat(kept, ignore_index=True)[OUTCOME_COLUMNS] if len(kept) > 1 else \
        kept[0][OUTCOME_COLUMNS].reset_index(drop=True)


def render_outcomes(workspace: LoadedWorkspace, evaluation_offers: pd.DataFrame, outcomes: pd.DataFrame,
                    rendered: set[str]) -> pd.DataFrame:
    """``outcomes`` after rendering: an offer whose message was not rendered (a template error,
    the run's rendering time used up) is not recorded, so its firing waits with the reason
    ``render`` instead of being offered (or lost, as a ``becomes:`` firing would be)."""
    offers = evaluation_offers
    if not len(offers):
        return outcomes
    missed = offers[~is_in(offers["firing_key"], rendered)]
    if not len(missed):
        return outcomes
    outcomes = outcomes[~is_in(outcomes["firing_key"], missed["firing_key"])]
    return with_expiry(workspace, combined([outcomes, waiting_outcomes(workspace, missed, "render")]))


def tally(outcomes: pd.DataFrame) -> dict[str, int]:
    """How many pending firings a run wrote, by status (``pending``: stopped, now or again)."""
    if not len(outcomes):
        return {}
    return {str(k): int(v) for k, v in outcomes["status"].value_counts().sort_index().items()}


# --------------------------------------------------------------------------- event values


def _plain(value):
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value


def event_texts(frame: pd.DataFrame, has_event: list[bool] | np.ndarray) -> list[str | None]:
    """Per row, the ``event.*`` values it fired with as JSON (None where ``has_event`` is false)."""
    columns = [c for c in frame.columns if str(c).startswith("event.") and c not in INTERNAL_EVENT_COLUMNS]
    if not columns or not np.any(has_event):
        return [None] * len(frame)
    names = [c[len("event."):] for c in columns]
    values = zip(*(frame[c].tolist() for c in columns))
    return [json.dumps({n: _plain(v) for n, v in zip(names, row)}, ensure_ascii=False, sort_keys=True, default=str)
            if wanted else None for wanted, row in zip(has_event, values)]


def restore_events(texts: Iterable[str | None], like: pd.DataFrame | None) -> pd.DataFrame:
    """The ``event.*`` columns of pending firings from their JSON, typed as the events table
    ``like`` types them (instants, numbers), so that rewards and templates read them as when
    the event first fired."""
    rows = [json.loads(text) if text else {} for text in texts]
    frame = pd.DataFrame(rows, index=range(len(rows)))
    for name in list(frame.columns):
        if like is not None and name in like.columns:
            frame[name] = _typed(frame[name], like[name].dtype)
    return frame.rename(columns={name: f"event.{name}" for name in frame.columns})


def _typed(values: pd.Series, dtype) -> pd.Series:
    try:
        if isinstance(dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(dtype):
            stamps = pd.to_datetime(values, utc=True, format="ISO8601")
            zone = getattr(dtype, "tz", None)
            return stamps.dt.tz_convert(zone) if zone is not None else stamps.dt.tz_localize(None)
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            return pd.to_numeric(values, errors="coerce").astype(dtype)
        return values.astype(dtype)
    except (TypeError, ValueError):     # a value the table's type cannot hold: as it was stored
        return values


def by_campaign(pending: pd.DataFrame) -> Mapping[str, pd.DataFrame]:
    """The pending firings of each campaign."""
    if not len(pending):
        return {}
    return {str(campaign): group.reset_index(drop=True) for campaign, group in pending.groupby("campaign", sort=False)}


# --------------------------------------------------------------------------- joining a campaign's firings


def join_pending(waiting: pd.DataFrame, ids: pd.Series, positions: np.ndarray, keys: np.ndarray,
                 events: pd.DataFrame, first: np.ndarray, with_events: bool,
                 like: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, np.ndarray]:
    """A campaign's firings of this run (customer ``positions``, ``keys``, ``events``, ``first``
    firing instants) with its ``waiting`` firings (still pending, not expired) joined: one the
    trigger fired again keeps the instant it first fired; the others are added for the
    customers among ``ids`` (a partition holds some customers only), with their event values
    restored when ``with_events`` (typed like the events table ``like``)."""
    if not len(waiting):
        return positions, keys, events, first
    known = dict(zip(waiting["firing_key"], waiting["first_as_of"]))
    if len(keys):
        first = pd.Series(keys, dtype=object).map(known).fillna(pd.Series(first, dtype=object)).to_numpy(dtype=object)
    others = waiting[~is_in(waiting["firing_key"], keys)]
    where = pd.Index(ids.to_numpy(dtype=object)).get_indexer(others["customer_id"].astype(str).to_numpy(dtype=object))
    others, where = others[where >= 0], where[where >= 0]
    if not len(others):
        return positions, keys, events, first
    if with_events:
        restored = restore_events(others["event"], like)
        events = restored if not len(events) else pd.concat([events, restored], ignore_index=True)
    else:
        events = pd.DataFrame(index=range(len(positions) + len(others)))
    return (np.concatenate([np.asarray(positions, dtype=int), where.astype(int)]),
            np.concatenate([np.asarray(keys, dtype=object), others["firing_key"].to_numpy(dtype=object)]),
            events.reset_index(drop=True),
            np.concatenate([np.asarray(first, dtype=object), others["first_as_of"].to_numpy(dtype=object)]))


def one_each(positions: np.ndarray, keys: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Which firings a campaign acts on when pending ones joined those of this run: one per
    customer, the one that first fired earliest (then by key); the others wait."""
    if len(positions) < 2:
        return np.ones(len(positions), dtype=bool)
    frame = pd.DataFrame({"pos": positions, "first": first, "key": keys})
    order = frame.sort_values(["pos", "first", "key"], kind="stable")
    keep = np.zeros(len(frame), dtype=bool)
    keep[order.index[~order["pos"].duplicated()].to_numpy()] = True
    return keep
