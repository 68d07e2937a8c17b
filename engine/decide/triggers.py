"""Triggers: who fires in this run, each firing with a key that makes it happen once.

One function per trigger kind, in the ``TRIGGERS`` registry. Each takes the campaign,
the customers eligible after segment and conditions, the feature frame and the run
context, and returns the firings: customer positions, key suffixes and, for event
triggers, the event's columns (``event.*``). A trigger may return several firings for
one customer (two events since the last run, two holiday dates caught up); they come
ordered by customer and then by preference, the preferred (latest) firing last, and
evaluation keeps only that one. Date triggers fire for dates in
``(previous run, this run]`` in the customer's local calendar, so a missed daily run
is caught up by the next one; without a previous run only ``as_of``'s own date counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from engine.config.model import CampaignDef
from engine.data.keys import is_in
from engine.data.points import PointsHistory, earned_rows
from engine.data.tiers import TierState
from engine.decide.pending import no_pending

EVENT_LOOKBACK = pd.Timedelta(days=1)   # first run ever: events of the last day fire


@dataclass(frozen=True)
class RunContext:
    """What a run knows beyond the data: its instant and what earlier runs did."""

    as_of: pd.Timestamp                     # tz-aware, in the programme's timezone
    previous_as_of: pd.Timestamp | None     # the last recorded run before this one
    contacts: pd.DataFrame                  # customer_id, campaign, channel, contacted_at
    edge_state: Mapping[str, frozenset]     # campaign -> ids for which `becomes` was true last run
    # firing key -> as_of (UTC ISO, seconds) of the run that acted on it, for the given keys: that
    # recorded its offer, or closed it as a pending firing that expired or was held out
    recorded: Callable[[list[str]], dict] = field(default=lambda keys: {})
    # campaign -> (offers, cost) that earlier runs of its budget's period recorded (budget.per)
    budget_used: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    # what earlier runs granted (points campaigns) and recorded (tier changes), for the points features
    points: PointsHistory | None = None
    # one-off firings stopped by earlier runs and still waiting (decide.pending.CONTEXT_COLUMNS)
    pending: pd.DataFrame = field(default_factory=no_pending)
    # the members' stored tiers as earlier runs left them (stored tiers; None: nothing recorded)
    tiers: TierState | None = None


@dataclass
class Firings:
    positions: np.ndarray                   # customer row positions
    keys: np.ndarray                        # key suffix per firing (str)
    events: pd.DataFrame | None = None      # event.* columns, aligned with positions
    state: frozenset | None = None          # new edge state to record (becomes)


def local_dates(features: pd.DataFrame, as_of: pd.Timestamp, default_tz: str) -> np.ndarray:
    """``as_of``'s calendar date in each customer's timezone (datetime64[D])."""
    if "timezone" not in features:
        return np.full(len(features), np.datetime64(as_of.tz_convert(default_tz).date(), "D"))
    codes, zones = pd.factorize(features["timezone"])     # a handful of zones, a code per customer
    default = np.datetime64(as_of.tz_convert(default_tz).date(), "D")
    dates = np.full(len(zones) + 1, default, dtype="datetime64[D]")    # code -1 (none): the programme's
    for code, zone in enumerate(zones):
        try:
            dates[code] = np.datetime64(as_of.tz_convert(str(zone)).date(), "D")
        except Exception:  # an invalid zone the loader did not catch: the programme's
            pass
    return dates[codes]


def _window(features, ctx: RunContext, default_tz) -> tuple[np.ndarray, np.ndarray]:
    today = local_dates(features, ctx.as_of, default_tz)
    if ctx.previous_as_of is None:
        return today - np.timedelta64(1, "D"), today
    return local_dates(features, ctx.previous_as_of, default_tz), today


def _yearly(month: np.ndarray, day: np.ndarray, year: int) -> np.ndarray:
    """The date of (month, day) in ``year``; 29 Feb becomes 28 Feb in common years."""
    leap = (year % 4 == 0 and year % 100 != 0) or year % 400 == 0
    day = np.where((month == 2) & (day == 29) & (not leap), 28, day)
    base = np.datetime64(f"{year}-01-01", "M")
    months = (base + (month - 1).astype("timedelta64[M]")).astype("datetime64[D]")
    return months + (day - 1).astype("timedelta64[D]")


def _yearly_firings(dates: pd.Series, days_before: int, eligible: np.ndarray,
                    features, ctx, default_tz) -> Firings:
    """Fire once a year, ``days_before`` before the anniversary of ``dates``; key = year."""
    if len(features) == 0:
        return Firings(np.array([], dtype=int), np.array([], dtype=str))
    start, end = _window(features, ctx, default_tz)
    values = pd.to_datetime(dates, errors="coerce")
    valid = eligible & values.notna().to_numpy()
    month = np.where(valid, values.dt.month.fillna(1).to_numpy(dtype=int), 1)
    day = np.where(valid, values.dt.day.fillna(1).to_numpy(dtype=int), 1)
    origin_year = np.where(valid, values.dt.year.fillna(0).to_numpy(dtype=int), 0)
    fired = np.zeros(len(features), dtype=bool)
    year_key = np.zeros(len(features), dtype=int)
    years = range(int(start.min().astype(object).year), int(end.max().astype(object).year) + 2)
    for year in years:
        occurrence = _yearly(month, day, year)
        fire_on = occurrence - np.timedelta64(days_before, "D")
        hit = valid & (fire_on > start) & (fire_on <= end) & (origin_year < year)
        fired |= hit
        year_key = np.where(hit, year, year_key)
    positions = np.flatnonzero(fired)
    return Firings(positions, year_key[positions].astype(str))


def birthday(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    if "birthday" not in features:
        return Firings(np.array([], dtype=int), np.array([], dtype=str))
    return _yearly_firings(features["birthday"], int(campaign.trigger.params["days_before"]),
                           eligible, features, ctx, settings.timezone)


def anniversary(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    column = campaign.trigger.params["column"]
    if column not in features:
        return Firings(np.array([], dtype=int), np.array([], dtype=str))
    return _yearly_firings(features[column], 0, eligible, features, ctx, settings.timezone)


def dates(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    start, end = _window(features, ctx, settings.timezone)
    latest = np.full(len(features), np.datetime64("NaT"), dtype="datetime64[D]")
    first = int(start.min().astype(object).year) if len(features) else 2000
    last = int(end.max().astype(object).year) if len(features) else 2000
    for text in campaign.trigger.params["dates"]:
        if len(text) == 10:
            candidates = [np.datetime64(text, "D")]
        else:
            month, day = int(text[:2]), int(text[3:])
            candidates = [_yearly(np.array([month]), np.array([day]), y)[0] for y in range(first, last + 1)]
        for when in candidates:
            hit = eligible & (when > start) & (when <= end) & (np.isnat(latest) | (when > latest))
            latest = np.where(hit, when, latest)   # several dates caught up: the latest one
    positions = np.flatnonzero(~np.isnat(latest))
    return Firings(positions, latest[positions].astype(str))


def event(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    events = tables.events
    since = ctx.previous_as_of if ctx.previous_as_of is not None else ctx.as_of - EVENT_LOOKBACK
    if events is None or events.empty:
        return Firings(np.array([], dtype=int), np.array([], dtype=str), pd.DataFrame())
    chosen = events[(events["type"] == campaign.trigger.params["type"])
                    & (events["timestamp"] > since) & (events["timestamp"] <= ctx.as_of)]
    positions = pd.Index(features["customer_id"]).get_indexer(chosen["customer_id"])
    keep = positions >= 0
    keep[keep] = eligible[positions[keep]]
    chosen = chosen[keep]
    positions = positions[keep]
    frame = chosen.rename(columns={c: f"event.{c}" for c in chosen.columns}).reset_index(drop=True)
    if campaign.trigger.where is not None and len(frame):
        scope = features.iloc[positions].reset_index(drop=True)
        scope = pd.concat([scope, frame], axis=1)
        match = campaign.trigger.where.mask(scope, ctx.as_of)
        frame = frame[match].reset_index(drop=True)
        positions = positions[match]
    # per customer, oldest first: the latest event is the preferred firing
    order = np.lexsort((frame["event.event_id"].astype(str).to_numpy(),
                        pd.to_datetime(frame["event.timestamp"], utc=True).dt.tz_localize(None).to_numpy(),
                        positions)) if len(frame) else np.array([], dtype=int)
    frame = frame.iloc[order].reset_index(drop=True)
    positions = positions[order]
    return Firings(positions, frame["event.event_id"].astype(str).to_numpy() if len(frame) else
                   np.array([], dtype=str), frame)


def earned(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    """The credits of one earn rule (``points: earn: NAME: notify:``) since the previous run,
    each announced once: key the order or event id; ``event.points`` the points credited and
    ``event.*`` the order's or event's own columns."""
    rule, points = campaign.trigger.params["rule"], campaign.trigger.params["points"]
    since = ctx.previous_as_of if ctx.previous_as_of is not None else ctx.as_of - EVENT_LOOKBACK
    rows = earned_rows(points, rule, tables, features, ctx.as_of, since, settings.timezone, ctx.points)
    if not len(rows):
        return Firings(np.array([], dtype=int), np.array([], dtype=str), pd.DataFrame())
    rows = rows[eligible[rows["pos"].to_numpy(np.int64)]]
    id_column = "order_id" if rule.source == "orders" else "event_id"
    rows = rows.sort_values(["pos", "at", id_column], kind="stable").reset_index(drop=True)
    positions = rows["pos"].to_numpy(np.int64)
    frame = rows.drop(columns=["pos", "at"]).rename(columns=lambda c: f"event.{c}")
    return Firings(positions, rows[id_column].astype(str).to_numpy(), frame)


def inactive_for(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    days = features["days_since_last_order"].astype("Float64")
    hit = eligible & (days >= campaign.trigger.params["days"]).fillna(False).to_numpy(dtype=bool)
    positions = np.flatnonzero(hit)
    today = np.datetime64(ctx.as_of.tz_convert(settings.timezone).date(), "D")
    last_order = today - days.to_numpy(dtype=float, na_value=0)[positions].astype("timedelta64[D]")
    return Firings(positions, last_order.astype(str))


def becomes(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    now_true = campaign.trigger.expr.mask(features, ctx.as_of)
    ids = features["customer_id"].astype(str)
    state = frozenset(ids[now_true])
    previous = ctx.edge_state.get(campaign.id)
    if previous is None:   # first evaluation: remember, fire nobody
        return Firings(np.array([], dtype=int), np.array([], dtype=str), state=state)
    was_true = is_in(ids, previous)
    positions = np.flatnonzero(eligible & now_true & ~was_true)
    key = ctx.as_of.isoformat()
    return Firings(positions, np.full(len(positions), key, dtype=object).astype(str), state=state)


def always(campaign: CampaignDef, eligible, features, tables, ctx, settings) -> Firings:
    positions = np.flatnonzero(eligible)
    period = str(ctx.as_of.tz_convert(settings.timezone).date())
    return Firings(positions, np.full(len(positions), period, dtype=object).astype(str))


TRIGGERS: dict[str, Callable[..., Firings]] = {
    "always": always,
    "birthday": birthday,
    "anniversary": anniversary,
    "dates": dates,
    "event": event,
    "earned": earned,
    "inactive_for": inactive_for,
    "becomes": becomes,
}
