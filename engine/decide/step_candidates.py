"""Who may get an offer in a simulated step: a cheap superset of each campaign's candidates.

A simulation evaluates with the same ``engine.decide.evaluation.evaluate`` a run uses, but only on
the customers who can possibly get an offer in the step: those a trigger kind can fire for
(the birthday window, new events, inactivity reached, ...; see ``CANDIDATES``), in the
segment, or with a firing still pending (``decide.pending``), reachable and under the
frequency cap (unless the campaign's reward needs no message), out of cooldown and not held
out. Every stage
is per customer except arbitration and budgets, which only ever look at those who fired, so
the offers are exactly those of evaluating everybody (``bench/bench_simulate.py --check``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine.config.model import CampaignDef, LoadedWorkspace
from engine.data.keys import is_in
from engine.data.sources import Tables
from engine.decide.assignment import in_holdout
from engine.decide.evaluation import Evaluation, evaluate, firing_keys, member_tier_moves, segment_mask
from engine.decide.pending import by_campaign, expired_outcomes, is_expired, utc_key
from engine.decide.policy import cap_remaining, reachable
from engine.decide.triggers import EVENT_LOOKBACK, TRIGGERS, RunContext


@dataclass
class _Step:
    """Per-step facts every campaign's pre-filter shares, computed once."""

    workspace: LoadedWorkspace
    features: pd.DataFrame
    tables: Tables               # events cut to the step's window
    ctx: RunContext
    ids: pd.Series               # customer ids (object)
    index: pd.Index              # the same ids as an index: membership costs the size of the set
    windows: dict[str, tuple]    # timezone -> (start, end] calendar days of date triggers
    zones: pd.Series             # each customer's timezone (object)
    _reachable: dict[str, np.ndarray] = field(default_factory=dict)

    def reachable(self, channel: str) -> np.ndarray:
        if channel not in self._reachable:
            self._reachable[channel] = reachable(self.features, self.workspace.settings.channels[channel])
        return self._reachable[channel]

    def isin(self, values) -> np.ndarray:
        mask = np.zeros(len(self.ids), dtype=bool)
        if len(values):
            found = self.index.get_indexer(pd.Index(list(values), dtype=object))
            mask[found[found >= 0]] = True
        return mask


def _event_window(tables: Tables, ctx: RunContext) -> Tables:
    """Only the events an event trigger can see in this step (the rest never fire)."""
    since = ctx.previous_as_of if ctx.previous_as_of is not None else ctx.as_of - EVENT_LOOKBACK
    events = tables.events
    if events is None or events.empty:
        return tables
    stamps = events["timestamp"]
    window = events[(stamps > since) & (stamps <= ctx.as_of)].reset_index(drop=True)
    return dataclasses.replace(tables, events=window)


def _zone_windows(zones, ctx: RunContext, timezone: str) -> dict[str, tuple]:
    """Per customer timezone, the calendar days ``(start, end]`` date triggers look at in this
    step (as in ``engine.decide.triggers``: from the previous run's local date, or the day before)."""
    windows = {}
    for zone in zones:
        try:
            local = [stamp.tz_convert(zone) for stamp in (ctx.as_of, ctx.previous_as_of) if stamp is not None]
        except Exception:  # an invalid zone: the programme's, as the triggers do
            local = [stamp.tz_convert(timezone) for stamp in (ctx.as_of, ctx.previous_as_of) if stamp is not None]
        end = pd.Timestamp(local[0].date())
        start = pd.Timestamp(local[1].date()) if len(local) > 1 else end - pd.Timedelta(days=1)
        windows[zone] = (start, end)
    return windows


def _days(start, end) -> pd.DatetimeIndex:
    return pd.date_range(start + pd.Timedelta(days=1), end, freq="D")


def _yearly_candidates(step: _Step, column: pd.Series, days_before: int) -> np.ndarray:
    wanted = set()
    for start, end in step.windows.values():
        days = _days(start, end) + pd.Timedelta(days=days_before)
        wanted |= set(zip(days.month, days.day))
    if (2, 28) in wanted:
        wanted.add((2, 29))   # 29 Feb fires on 28 Feb in common years
    if not wanted:
        return np.zeros(len(column), dtype=bool)
    values = pd.to_datetime(column, errors="coerce")
    codes = (values.dt.month.fillna(0) * 100 + values.dt.day.fillna(0)).to_numpy(dtype=int)
    return np.isin(codes, [m * 100 + d for m, d in wanted])


def _birthday_candidates(step: _Step, campaign: CampaignDef) -> np.ndarray:
    if "birthday" not in step.features:
        return np.zeros(len(step.features), dtype=bool)
    return _yearly_candidates(step, step.features["birthday"], int(campaign.trigger.params["days_before"]))


def _anniversary_candidates(step: _Step, campaign: CampaignDef) -> np.ndarray:
    column = campaign.trigger.params["column"]
    if column not in step.features:
        return np.zeros(len(step.features), dtype=bool)
    return _yearly_candidates(step, step.features[column], 0)


def _dates_candidates(step: _Step, campaign: CampaignDef) -> np.ndarray:
    hits = {}
    for zone, (start, end) in step.windows.items():
        days = _days(start, end)
        texts = set(days.strftime("%Y-%m-%d")) | set(days.strftime("%m-%d"))
        if ((days.month == 2) & (days.day == 28)).any():
            texts.add("02-29")   # 29 Feb is kept on 28 Feb in common years
        hits[zone] = any(text in texts for text in campaign.trigger.params["dates"])
    if not any(hits.values()):
        return np.zeros(len(step.features), dtype=bool)
    return step.zones.map(hits).fillna(False).to_numpy(dtype=bool)


def _event_candidates(step: _Step, campaign: CampaignDef) -> np.ndarray:
    events = step.tables.events
    if events is None or events.empty:
        return np.zeros(len(step.features), dtype=bool)
    chosen = events.loc[events["type"] == campaign.trigger.params["type"], "customer_id"]
    return step.isin(set(chosen.astype(str)))


def _inactive_candidates(step: _Step, campaign: CampaignDef) -> np.ndarray:
    days = step.features["days_since_last_order"].astype("Float64")
    return (days >= campaign.trigger.params["days"]).fillna(False).to_numpy(dtype=bool)


def _becomes_candidates(step: _Step, campaign: CampaignDef) -> np.ndarray:
    previous = step.ctx.edge_state.get(campaign.id)
    if previous is None:   # the first evaluation only remembers
        return np.zeros(len(step.features), dtype=bool)
    return campaign.trigger.expr.mask(step.features, step.ctx.as_of) & ~step.isin(previous)


def _everyone(step: _Step, campaign: CampaignDef) -> np.ndarray:
    return np.ones(len(step.features), dtype=bool)


# trigger kind -> who may fire: a superset of the trigger's own firings (unknown kinds: everyone)
CANDIDATES: dict[str, Callable[[_Step, CampaignDef], np.ndarray]] = {
    "always": _everyone,
    "birthday": _birthday_candidates,
    "anniversary": _anniversary_candidates,
    "dates": _dates_candidates,
    "event": _event_candidates,
    "inactive_for": _inactive_candidates,
    "becomes": _becomes_candidates,
}


def evaluate_step(workspace: LoadedWorkspace, tables: Tables, features: pd.DataFrame, ctx: RunContext,
                  campaigns: list[str] | None = None, *,
                  index: pd.Index | None = None) -> tuple[Evaluation, dict[str, frozenset]]:
    """``evaluate`` restricted to the customers who may get an offer; and the new ``becomes`` state.

    The offers are those of evaluating every customer (``pos`` refers to the subset); the
    stored tiers' moves are every customer's.
    ``index``: the customer ids as an object ``pd.Index``, to reuse between steps.
    """
    settings = workspace.settings
    zones = features["timezone"].astype(object).where(features["timezone"].notna(), settings.timezone) \
        if "timezone" in features else pd.Series(settings.timezone, index=features.index, dtype=object)
    if index is None or len(index) != len(features):
        index = customer_index(features)
    ids = pd.Series(index.to_numpy(), dtype=object)
    step = _Step(workspace, features, _event_window(tables, ctx), ctx, ids, index,
                 _zone_windows(pd.unique(zones), ctx, settings.timezone), zones)
    selected = [c for c in workspace.program.campaigns.values()
                if c.enabled and (campaigns is None or c.id in campaigns)]
    edge_state = {c.id: frozenset(ids[c.trigger.expr.mask(features, ctx.as_of)])
                  for c in selected if c.trigger.kind == "becomes"}
    room = cap_remaining(features, ctx.contacts, ctx.as_of, settings.contact_policy) > 0
    not_held = ~in_holdout(ids, settings.salt, "global", settings.holdout)
    waiting = by_campaign(ctx.pending[~is_expired(ctx.pending, ctx.as_of)]) if len(ctx.pending) else {}
    union = np.zeros(len(features), dtype=bool)
    active = []
    for campaign in selected:
        pending = waiting.get(campaign.id) if campaign.one_off else None
        may_get = _may_get_offer(step, campaign, room, not_held, pending)
        if may_get.any():
            union |= may_get
            active.append(campaign.id)
    rows = np.flatnonzero(union)
    moves = member_tier_moves(workspace, features, ctx)
    if not active:
        return Evaluation(ctx.as_of, no_offers(), {}, pd.DataFrame(),
                          pending=expired_outcomes(ctx.pending, ctx.as_of), tier_moves=moves), edge_state
    subset = features.iloc[rows, _needed_columns(workspace, features)].reset_index(drop=True)
    # the contact history of the others cannot change the decisions about these customers
    contacts = ctx.contacts[is_in(ctx.contacts["customer_id"].astype(str), ids.iloc[rows].astype(str))]
    ctx = dataclasses.replace(ctx, contacts=contacts.reset_index(drop=True))
    evaluation = evaluate(workspace, step.tables, subset, ctx, active, tier_moves=False)
    evaluation.tier_moves = moves
    return evaluation, edge_state


def customer_index(features: pd.DataFrame) -> pd.Index:
    return pd.Index(features["customer_id"].astype(str).to_numpy(dtype=object), dtype=object)


def _needed_columns(workspace: LoadedWorkspace, features: pd.DataFrame) -> list[int]:
    """Positions of the columns an evaluation reads (a simulation renders no message)."""
    program, settings = workspace.program, workspace.settings
    names = {"customer_id", "timezone", "locale", "birthday", "days_since_last_order", "days_to_birthday",
             "avg_order_value", "tier"}
    expressions = [s.where for s in program.segments.values()]
    for campaign in program.campaigns.values():
        expressions += [campaign.where, campaign.trigger.where, campaign.trigger.expr,
                        campaign.budget.rank_by, campaign.reward.amount]
        expressions += [v.reward.amount for v in campaign.variants if v.reward is not None]
        if campaign.trigger.kind == "anniversary":
            names.add(campaign.trigger.params["column"])
    for expression in expressions:
        if expression is not None:
            names |= expression.names
    for channel in settings.channels.values():
        names |= {channel.address_column, channel.consent_column}
    return [i for i, column in enumerate(features.columns) if column in names]


def _may_get_offer(step: _Step, campaign: CampaignDef, room: np.ndarray, not_held: np.ndarray,
                   pending: pd.DataFrame | None) -> np.ndarray:
    """Who may get this campaign's offer, or whose firing the evaluation must see: a superset
    of the evaluation's candidates, from the same per-customer stages (trigger or a pending
    firing, segment, consent, cap, cooldown, holdouts). A reward that needs no message is
    granted whatever consent and the cap say.

    A firing that waits when it is stopped (``pending:``), and a pending firing coming back,
    matter even when the cap or the cooldown stops them now (they may be offered later); not
    when consent or a holdout does: a simulation's data never changes, so those stop them
    until they expire, and the offers are the same without deciding them."""
    settings = step.workspace.settings
    ctx = step.ctx
    lasting = not_held if campaign.needs_no_message else not_held & step.reachable(campaign.channel)
    open_to = lasting if campaign.needs_no_message else lasting & room
    fired = np.array(CANDIDATES.get(campaign.trigger.kind, _everyone)(step, campaign), dtype=bool)
    fired &= lasting if campaign.keeps_pending else open_to
    if fired.any():
        fired &= segment_mask(step.workspace, campaign, step.features, ctx.as_of)
    if campaign.keeps_pending and fired.any():
        fired &= _not_acted_on(step, campaign, fired)
    waiting = step.isin(set(pending["customer_id"].astype(str))) & lasting if pending is not None \
        else np.zeros(len(fired), dtype=bool)
    kept = fired | waiting if campaign.keeps_pending else waiting   # whatever the cap and cooldown say
    may = fired & open_to
    if campaign.cooldown_days and len(ctx.contacts) and may.any():
        contacts = ctx.contacts
        recent = contacts[(contacts["campaign"] == campaign.id)
                          & (contacts["contacted_at"] > ctx.as_of - pd.Timedelta(days=campaign.cooldown_days))]
        may &= ~step.isin(set(recent["customer_id"].astype(str)))
    if campaign.holdout and (may | kept).any():
        rows = np.flatnonzero(may | kept)
        held = in_holdout(pd.Series(step.ids.iloc[rows].to_numpy(), dtype=object),
                          settings.salt, campaign.id, campaign.holdout)
        may[rows[held]] = False
        kept[rows[held]] = False
    return may | kept


def _not_acted_on(step: _Step, campaign: CampaignDef, who: np.ndarray) -> np.ndarray:
    """Of the customers ``who``, those the campaign's trigger fires for with a key no earlier
    run acted on: the firings the evaluation decides (and whose stop it records, ``pending:``,
    whatever the contact policy says). An inactivity trigger fires again at every run with the
    same key; this keeps a simulation from deciding those every day."""
    firings = TRIGGERS[campaign.trigger.kind](campaign, who, step.features, step.tables, step.ctx,
                                              step.workspace.settings)
    positions = np.asarray(firings.positions, dtype=int)
    keep = np.zeros(len(who), dtype=bool)
    if not len(positions):
        return keep
    keys = firing_keys(campaign.id, step.ids.iloc[positions].to_numpy(), np.asarray(firings.keys))
    done = step.ctx.recorded(list(keys)) or {}
    if not isinstance(done, Mapping):
        done = dict.fromkeys(done, "")
    as_of_key = utc_key(step.ctx.as_of)
    fresh = np.fromiter((done.get(key, as_of_key) == as_of_key for key in keys), dtype=bool, count=len(keys))
    keep[positions[fresh]] = True
    return keep


def no_offers() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": pd.Series(dtype=object), "campaign": pd.Series(dtype=object),
                         "channel": pd.Series(dtype=object), "firing_key": pd.Series(dtype=object),
                         "variant": pd.Series(dtype=object), "reward_kind": pd.Series(dtype=object),
                         "cost": pd.Series(dtype=float), "points": pd.Series(dtype=float),
                         "tier_up": pd.Series(dtype=object), "send_at": pd.Series(dtype="datetime64[us, UTC]")})
