"""Evaluating campaigns for one ``as_of``: the funnel from segment to offers.

For each campaign, in column-at-a-time steps over all customers:
segment -> trigger -> consent -> frequency cap -> cooldown -> holdout, giving candidates;
then across campaigns, arbitration (at most N offers per customer per run, highest
priority first, ties by campaign id) and per-campaign budgets. The result is a frame of
offers (one row per offer) and the funnel counts, without touching the outside world.

One-off firings stopped on the way wait for later runs (``decide.pending``): the pending
firings of earlier runs join their campaign's firings after the trigger stage (and count in
the segment and trigger stages), and ``Evaluation.pending`` says what became of them and
which firings start to wait. A campaign whose rewards need no message (points, a tier) is
not stopped by consent or the frequency cap: its offer is granted without a message
(``no_message`` names the reason; the funnel counts it on through those stages).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd

from engine.config.model import CampaignDef, LoadedWorkspace
from engine.data.keys import is_in
from engine.data.tiers import MOVE_COLUMNS, decide_tiers, empty_states, kept_moves
from engine.decide.assignment import in_holdout
from engine.decide.budgets import apply_budgets, budget_caps
from engine.decide.candidates import arbitrate, candidate_frame
from engine.decide.pending import (
    by_campaign,
    closed_outcomes,
    combined,
    expired_outcomes,
    is_expired,
    join_pending,
    no_outcomes,
    one_each,
    utc_key,
    waiting_outcomes,
    with_expiry,
)
from engine.decide.policy import cap_remaining, cooling_down, reachable, send_times
from engine.decide.triggers import TRIGGERS, RunContext

STAGES = ("segment", "trigger", "consent", "frequency_cap", "cooldown", "holdout",
          "arbitration", "budget", "offers")


@dataclass
class Evaluation:
    """What one evaluation decided."""

    as_of: pd.Timestamp
    offers: pd.DataFrame                                  # one row per offer
    funnels: dict[str, dict[str, int]]                    # campaign -> stage -> count
    holdouts: pd.DataFrame                                # firings held out (for uplift)
    edge_state: dict[str, frozenset] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stops: pd.DataFrame | None = None                     # with trace: campaign, pos, firing_key, stage
    # pending firings to write (decide.pending.OUTCOME_COLUMNS): stopped now or again, offered,
    # held out, expired
    pending: pd.DataFrame = field(default_factory=no_outcomes)
    reentered: dict[str, int] = field(default_factory=dict)   # campaign -> pending firings that came back
    # stored tiers: this run's moves by qualifying, reviews and trials (data.tiers.MOVE_COLUMNS)
    tier_moves: pd.DataFrame = field(default_factory=lambda: empty_states(MOVE_COLUMNS))

    def stopped_at(self, position: int) -> dict[str, str]:
        """For a traced evaluation: campaign -> the stage that stopped this customer."""
        if self.stops is None or self.stops.empty:
            return {}
        rows = self.stops[self.stops["pos"] == position]
        return dict(zip(rows["campaign"], rows["stage"]))

    def campaign_offers(self, campaign: str) -> pd.DataFrame:
        return self.offers[self.offers["campaign"] == campaign]


def segment_mask(workspace: LoadedWorkspace, campaign: CampaignDef, features: pd.DataFrame,
                 as_of: pd.Timestamp) -> np.ndarray:
    """Customers in the campaign's segment, not excluded, meeting its `where:`."""
    program = workspace.program
    mask = np.ones(len(features), dtype=bool)
    if campaign.segment:
        mask &= program.segments[campaign.segment].where.mask(features, as_of)
    for name in campaign.exclude:
        mask &= ~program.segments[name].where.mask(features, as_of)
    if campaign.where is not None:
        mask &= campaign.where.mask(features, as_of)
    return mask


def firing_keys(campaign: str, customer_ids: np.ndarray, suffixes: np.ndarray) -> np.ndarray:
    if len(customer_ids) == 0:
        return np.array([], dtype=object)
    return (pd.Series(customer_ids, dtype="object").radd(f"{campaign}:") + ":"
            + pd.Series(suffixes, dtype="object")).to_numpy(dtype=object)


def offer_id(firing_key: str) -> str:
    """The stable id of a firing's offer: the same firing always has the same id."""
    return "of_" + hashlib.sha256(firing_key.encode()).hexdigest()[:20]


def offer_ids(keys) -> np.ndarray:
    """``offer_id`` of each firing key."""
    keys = pd.Series(keys, dtype=object).tolist()     # plain strings: iterating Arrow text is slow
    return np.array([offer_id(k) for k in keys], dtype=object)


@dataclass
class PartitionDecision:
    """What one partition of customers decided before the global budgets: its arbitrated
    candidates (``pos`` indexes the partition's features) and its part of every count."""

    arbitrated: pd.DataFrame
    funnels: dict[str, dict[str, int]]
    holdouts: pd.DataFrame
    edge_state: dict[str, frozenset]
    warnings: list[str]
    same_run: set[str]
    candidates: list[pd.DataFrame]
    stops: list[pd.DataFrame]
    pending: pd.DataFrame = field(default_factory=no_outcomes)   # its firings that wait, or pending ones closed
    reentered: dict[str, int] = field(default_factory=dict)
    tier_moves: pd.DataFrame = field(default_factory=lambda: empty_states(MOVE_COLUMNS))   # stored tiers


def keep_within(workspace: LoadedWorkspace, decision: PartitionDecision, kept: pd.DataFrame) -> None:
    """Cut a partition's arbitrated candidates to ``kept`` (what the budgets can still keep):
    the firings cut off that wait are recorded as stopped by the budget."""
    lost = decision.arbitrated[~is_in(decision.arbitrated["firing_key"], kept["firing_key"])]
    if len(lost):
        decision.pending = combined([decision.pending, waiting_outcomes(workspace, lost, "budget")])
    decision.arbitrated = kept


def evaluate(workspace: LoadedWorkspace, tables, features: pd.DataFrame, ctx: RunContext,
             campaigns: list[str] | None = None, trace: bool = False, tier_moves: bool = True) -> Evaluation:
    """Decide, for ``ctx.as_of``, who gets which offer and why.

    With ``trace``, also record for every firing that did not become an offer the
    stage that stopped it (and "trigger" for segment members who did not fire).
    ``tier_moves``: also give the stored tiers' moves of the customers of ``features``.
    """
    part = evaluate_partition(workspace, tables, features, ctx, campaigns, trace, tier_moves)
    return combine_partitions(workspace, ctx.as_of, [part], trace, ctx.budget_used, ctx.pending)


def member_tier_moves(workspace: LoadedWorkspace, features: pd.DataFrame, ctx: RunContext) -> pd.DataFrame:
    """The stored tiers' moves of this run for the customers of ``features`` (the moves the
    features' ``tier`` column already shows: those the features kept, when computed from the
    same stored state); none with computed tiers."""
    program, timezone = workspace.program, workspace.settings.timezone
    if not program.stored_tiers:
        return empty_states(MOVE_COLUMNS)
    kept = kept_moves(features, program, ctx.as_of, timezone, ctx.tiers)
    return kept if kept is not None else decide_tiers(program, features, ctx.as_of, timezone, ctx.tiers).moves


def evaluate_partition(workspace: LoadedWorkspace, tables, features: pd.DataFrame, ctx: RunContext,
                       campaigns: list[str] | None = None, trace: bool = False,
                       tier_moves: bool = True) -> PartitionDecision:
    """Segment, trigger, contact policy, holdout and arbitration for the customers of
    ``features``: everything decided per customer, so a partition decides it alone; and,
    with ``tier_moves``, the moves of their stored tiers."""
    settings = workspace.settings
    as_of = ctx.as_of
    ids = features["customer_id"].astype(str)
    global_holdout = in_holdout(ids, settings.salt, "global", settings.holdout)
    capacity = cap_remaining(features, ctx.contacts, as_of, settings.contact_policy)
    funnels: dict[str, dict[str, int]] = {}
    candidates: list[pd.DataFrame] = []
    holdouts: list[pd.DataFrame] = []
    edge_state: dict[str, frozenset] = {}
    warnings: list[str] = []
    stops: list[pd.DataFrame] = []
    same_run: set[str] = set()
    outcomes: list[pd.DataFrame] = []
    reentered: dict[str, int] = {}
    as_of_key = utc_key(as_of)
    # pending firings of earlier runs: those expired are closed (combine_partitions) and never fire again
    expired = is_expired(ctx.pending, as_of)
    waiting = by_campaign(ctx.pending[~expired]) if len(ctx.pending) else {}
    expired_keys = set(ctx.pending.loc[expired, "firing_key"]) if expired.any() else set()

    def stopped(campaign_id, stage, where, key_values=None):
        if trace and len(where):
            stops.append(pd.DataFrame({"campaign": campaign_id, "pos": where, "stage": stage,
                                       "firing_key": key_values if key_values is not None else ""}))

    reach: dict[str, np.ndarray] = {}

    def consent(name: str) -> np.ndarray:
        """Who can be reached on the channel: worked out once per channel, not per campaign."""
        if name not in reach:
            reach[name] = reachable(features, settings.channels[name])
        return reach[name]

    def waits(campaign, reason, rows, positions, keys, events, first):
        """The firings at ``rows`` stopped by ``reason``: those that wait are recorded."""
        if rows.any():
            frame = pd.DataFrame({"campaign": campaign.id, "customer_id": ids.iloc[positions[rows]].to_numpy(),
                                  "firing_key": keys[rows]})
            if len(events.columns):
                frame = pd.concat([frame, events[rows].reset_index(drop=True)], axis=1)
            outcomes.append(waiting_outcomes(workspace, frame, reason, first[rows], _before(first[rows], as_of_key)))

    selected = [c for c in workspace.program.campaigns.values()
                if c.enabled and (campaigns is None or c.id in campaigns)]
    for campaign in selected:
        funnel = dict.fromkeys(STAGES, 0)
        funnels[campaign.id] = funnel
        eligible = segment_mask(workspace, campaign, features, as_of)
        firings = TRIGGERS[campaign.trigger.kind](campaign, eligible, features, tables, ctx, settings)
        if firings.state is not None:
            edge_state[campaign.id] = firings.state
        positions, suffixes, events = _one_per_customer(firings)
        keys = firing_keys(campaign.id, ids.iloc[positions].to_numpy(), suffixes)
        first = np.full(len(positions), as_of_key, dtype=object)      # when each firing first fired
        if campaign.one_off and campaign.id in waiting:
            positions, keys, events, first = join_pending(
                waiting[campaign.id], ids, positions, keys, events, first, campaign.trigger.kind == "event",
                getattr(tables, "events", None))
        if expired_keys and len(keys):
            fresh = ~is_in(keys, expired_keys)
            positions, keys, events, first = positions[fresh], keys[fresh], events[fresh].reset_index(drop=True), \
                first[fresh]
        if len(keys):
            # firings recorded by an earlier run never fire again; those recorded by a run at
            # this same as_of go through the funnel again, so that a rerun decides exactly as
            # the first run did, and are marked as already recorded at the end
            done = ctx.recorded(list(keys))
            if done and not isinstance(done, Mapping):   # a plain set: recorded by earlier runs
                done = dict.fromkeys(done, "")
            if done:
                earlier = {k for k, at in done.items() if at != as_of_key}
                same_run.update(k for k, at in done.items() if at == as_of_key)
                fresh = ~is_in(keys, earlier)
                positions, keys, events, first = positions[fresh], keys[fresh], \
                    events[fresh].reset_index(drop=True), first[fresh]
        if len(positions) and _before(first, as_of_key).any():
            # a pending firing and a new one of the same customer: one goes on, the other waits
            one = one_each(positions, keys, first)
            waits(campaign, "arbitration", ~one, positions, keys, events, first)
            positions, keys, events, first = positions[one], keys[one], events[one].reset_index(drop=True), first[one]
        again = _before(first, as_of_key)
        reentered[campaign.id] = int(again.sum())
        # a pending firing passes the segment stage without being checked again (it was earned)
        funnel["segment"] = int(eligible.sum()) + int((again & ~eligible[positions]).sum())
        funnel["trigger"] = len(positions)
        if trace:
            stopped(campaign.id, "trigger", np.setdiff1d(np.flatnonzero(eligible), positions))

        channel = settings.channels[campaign.channel]
        if channel.consent_column not in features:
            warnings.append(f"{campaign.id}: customers have no '{channel.consent_column}' column, "
                            f"so nobody can be contacted on {campaign.channel}")
        keep = np.ones(len(positions), dtype=bool)
        no_message = np.full(len(positions), "", dtype=object)
        for stage, passes in (
                ("consent", consent(campaign.channel)[positions]),
                ("frequency_cap", capacity[positions] > 0),
                ("cooldown", ~cooling_down(features, ctx.contacts, campaign.id, as_of,
                                           campaign.cooldown_days)[positions])):
            failing = keep & ~passes
            if campaign.needs_no_message and stage != "cooldown":
                # the reward needs no message: it is granted without one
                no_message[failing & (no_message == "")] = stage
            else:
                stopped(campaign.id, stage, positions[failing], keys[failing])
                waits(campaign, stage, failing, positions, keys, events, first)
                keep &= passes
            funnel[stage] = int(keep.sum())
        positions, keys, events = positions[keep], keys[keep], events[keep].reset_index(drop=True)
        first, again, no_message = first[keep], again[keep], no_message[keep]

        chosen_ids = ids.iloc[positions].reset_index(drop=True)
        held_global = global_holdout[positions]
        held_campaign = in_holdout(chosen_ids, settings.salt, campaign.id, campaign.holdout)
        held = held_global | held_campaign
        if held.any():
            holdouts.append(pd.DataFrame({
                "campaign": campaign.id, "customer_id": chosen_ids[held].to_numpy(),
                "firing_key": keys[held], "group": np.where(held_global[held], "global", "campaign")}))
            if (held & again).any():     # a control-group decision: the pending firing is closed
                outcomes.append(closed_outcomes(pd.DataFrame({
                    "firing_key": keys[held & again], "campaign": campaign.id,
                    "customer_id": chosen_ids[held & again].to_numpy(), "first_as_of": first[held & again]}),
                    "held_out"))
        stopped(campaign.id, "holdout", positions[held], keys[held])
        positions, keys, events = positions[~held], keys[~held], events[~held].reset_index(drop=True)
        first, again, no_message = first[~held], again[~held], no_message[~held]
        funnel["holdout"] = len(positions)
        if len(positions):
            frame = candidate_frame(workspace, campaign, features, positions, keys, events, as_of)
            candidates.append(frame.assign(first_as_of=first, reentered=again, no_message=no_message))

    arbitrated = arbitrate(candidates, capacity, settings.contact_policy.max_offers_per_run, funnels)
    if candidates:
        everyone = pd.concat(candidates, ignore_index=True)
        outcomes.append(waiting_outcomes(
            workspace, everyone[~is_in(everyone["firing_key"], arbitrated["firing_key"])], "arbitration"))
    moves = member_tier_moves(workspace, features, ctx) if tier_moves else empty_states(MOVE_COLUMNS)
    return PartitionDecision(arbitrated, funnels, _frame_of(holdouts, HOLDOUT_COLUMNS), edge_state,
                             warnings, same_run, candidates if trace else [], stops, combined(outcomes), reentered,
                             tier_moves=moves)


HOLDOUT_COLUMNS = ["campaign", "customer_id", "firing_key", "group"]


def _before(instants: np.ndarray, key: str) -> np.ndarray:
    """Which of the UTC keys ``instants`` come before ``key``: firings of earlier runs (most
    are this run's own, ``key`` itself: only the others are compared one by one)."""
    instants = np.asarray(instants, dtype=object)
    before = np.zeros(len(instants), dtype=bool)
    others = np.flatnonzero(instants != key)
    if others.size:
        before[others] = np.fromiter((instant < key for instant in instants[others]), dtype=bool,
                                     count=others.size)
    return before


def _frame_of(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _sum_funnels(parts: list[PartitionDecision]) -> dict[str, dict[str, int]]:
    funnels: dict[str, dict[str, int]] = {}
    for part in parts:
        for campaign, funnel in part.funnels.items():
            total = funnels.setdefault(campaign, dict.fromkeys(STAGES, 0))
            for stage, count in funnel.items():
                total[stage] += count
    return funnels


def combine_partitions(workspace: LoadedWorkspace, as_of: pd.Timestamp, parts: list[PartitionDecision],
                       trace: bool = False, used: Mapping[str, tuple[int, float]] | None = None,
                       pending: pd.DataFrame | None = None) -> Evaluation:
    """The global steps over the partitions' decisions: funnel counts summed, budgets applied
    per campaign over all candidates (less what earlier runs in the budget's period ``used``:
    ``RunContext.budget_used``), offer ids and send times; what became of the firings that
    were ``pending`` (``RunContext.pending``: those expired now are closed here, once) and
    of those that start to wait. ``pos`` in the parts' candidates must already index one
    common features frame (one partition, or rows kept)."""
    settings = workspace.settings
    funnels = _sum_funnels(parts)
    # empty partitions' frames are untyped: leave them out, or every column turns object
    frames = [p.arbitrated for p in parts if len(p.arbitrated)] or [parts[0].arbitrated]
    arbitrated = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    offers = apply_budgets(arbitrated, funnels, budget_caps(workspace, used))
    stops = [frame for part in parts for frame in part.stops]
    if trace:
        candidates = [frame for part in parts for frame in part.candidates]
        if candidates:
            everyone = pd.concat(candidates, ignore_index=True)[["campaign", "pos", "firing_key"]]
            lost = everyone[~is_in(everyone["firing_key"], arbitrated["firing_key"])]
            stopped_budget = arbitrated[~is_in(arbitrated["firing_key"], offers["firing_key"])]
            for name, frame in (("arbitration", lost), ("budget", stopped_budget)):
                for campaign_id, group in frame.groupby("campaign"):
                    stops.append(pd.DataFrame({"campaign": campaign_id, "pos": group["pos"].to_numpy(),
                                               "stage": name, "firing_key": group["firing_key"].to_numpy()}))
    if len(offers):
        offers["offer_id"] = offer_ids(offers["firing_key"])
        offers["send_at"] = send_times(offers["timezone"].reset_index(drop=True), as_of,
                                       settings.contact_policy, settings.timezone).array
    else:   # the same columns when nobody gets an offer
        offers = offers.assign(offer_id=pd.Series(dtype=object),
                               send_at=pd.Series(dtype="datetime64[us, UTC]"))
    offers = offers.drop(columns=["timezone"], errors="ignore")
    outcomes = [part.pending for part in parts]
    if len(arbitrated):
        outcomes.append(waiting_outcomes(
            workspace, arbitrated[~is_in(arbitrated["firing_key"], offers["firing_key"])], "budget"))
    if len(offers) and "reentered" in offers and offers["reentered"].any():
        outcomes.append(closed_outcomes(offers[offers["reentered"].to_numpy(dtype=bool)], "offered"))
    if pending is not None and len(pending):
        outcomes.append(expired_outcomes(pending, as_of))
    reentered: dict[str, int] = {}
    for part in parts:
        for campaign, count in part.reentered.items():
            reentered[campaign] = reentered.get(campaign, 0) + count
    same_run = set().union(*(p.same_run for p in parts))
    offers["recorded"] = is_in(offers["firing_key"], same_run) if same_run \
        else np.zeros(len(offers), dtype=bool)
    holdouts = [p.holdouts for p in parts if len(p.holdouts)]
    holdout_frame = pd.concat(holdouts, ignore_index=True) if holdouts else pd.DataFrame(columns=HOLDOUT_COLUMNS)
    edge_state: dict[str, frozenset] = {}
    for part in parts:
        for campaign, state in part.edge_state.items():
            edge_state[campaign] = edge_state.get(campaign, frozenset()) | state
    warnings = list(dict.fromkeys(w for p in parts for w in p.warnings))
    stop_frame = pd.concat(stops, ignore_index=True) if stops else None
    moves = [p.tier_moves for p in parts if len(p.tier_moves)]
    tier_moves = pd.concat(moves, ignore_index=True) if len(moves) > 1 else \
        moves[0].reset_index(drop=True) if moves else empty_states(MOVE_COLUMNS)
    return Evaluation(as_of, offers.reset_index(drop=True), funnels, holdout_frame, edge_state,
                      warnings, stop_frame, with_expiry(workspace, combined(outcomes)), reentered,
                      tier_moves=tier_moves)


def _one_per_customer(firings) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """A campaign fires at most once per customer and run: the preferred (last) firing.

    Two events or two caught-up holiday dates of one customer make one offer, never two,
    and a rerun does not pick up the one left out (it is dropped before the recorded
    keys are checked).
    """
    positions = np.asarray(firings.positions, dtype=int)
    suffixes = np.asarray(firings.keys)
    events = firings.events if firings.events is not None else pd.DataFrame(index=range(len(positions)))
    events = events.reset_index(drop=True)
    last = ~pd.Series(positions).duplicated(keep="last").to_numpy()
    if not last.all():
        positions, suffixes, events = positions[last], suffixes[last], events[last].reset_index(drop=True)
    return positions, suffixes, events
