"""Replaying scheduled runs in memory: what a state database would remember between runs,
kept in a ``MemoryState``, and the loop that runs each step as ``loyalty run`` would decide it.

Each step is a run at ``as_of`` = ``start + k * every``: features at that instant, then the
same evaluation as ``loyalty run``, with what earlier steps did kept in memory instead of
the state database: contact history (offers become contacts at their ``send_at``; a reward
granted without a message counts for cooldowns only), firing keys already acted on, one-off
firings still pending, ``becomes:`` edge state, the previous step's instant (for event and
date triggers), points granted, the members' stored tiers with their changes (moves and tier
rewards, as a run records them) and, with ``due``, each campaign's last scheduled run.

A replay may start from what a state database remembers of the runs before its first step
(``seed_from_state``): read from a private copy of the file, which is never opened itself.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.config.tier_rules import trial_days
from engine.data.features import compute_features
from engine.data.points import PointsHistory
from engine.data.sources import Tables
from engine.data.tiers import MOVE_COLUMNS, STATE_COLUMNS, TierRules, TierState, campaign_moves
from engine.decide.budgets import budget_periods
from engine.decide.evaluation import Evaluation
from engine.decide.pending import CONTEXT_COLUMNS, no_pending
from engine.decide.schedule import due_campaigns
from engine.decide.step_candidates import customer_index, evaluate_step, no_offers
from engine.decide.triggers import RunContext
from engine.errors import LoyaltyError
from engine.execution.pipeline import empty_contacts, parse_as_of, run_context
from engine.state.store import StateStore

_EVERY = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}
# the columns of each simulated offer (with the step's ``as_of``)
OFFER_COLUMNS = ["campaign", "customer_id", "firing_key", "variant", "reward_kind", "cost", "points", "send_at"]


# --------------------------------------------------------------------------- in-memory state


@dataclass
class MemoryState:
    """What the state database would remember between runs, kept in memory."""

    contacts: pd.DataFrame = field(default_factory=empty_contacts)   # customer_id, campaign, channel, contacted_at
    recorded: dict[str, str] = field(default_factory=dict)           # firing key -> as_of (UTC ISO)
    edge_state: dict[str, frozenset] = field(default_factory=dict)   # becomes: campaign -> ids true
    previous_as_of: pd.Timestamp | None = None
    schedules: dict[str, str] = field(default_factory=dict)          # campaign -> last scheduled run
    earlier: Callable[[list[str]], dict] | None = None               # firings recorded before the start
    # offers recorded: campaign, as_of (UTC ISO), cost; and what the database spent before the start
    spent: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        {"campaign": pd.Series(dtype=object), "as_of": pd.Series(dtype=object), "cost": pd.Series(dtype=float)}))
    earlier_spent: Callable[[Mapping[str, str], str], dict] | None = None
    # points granted by points campaigns: customer_id, points, granted_at (UTC), campaign
    granted: pd.DataFrame = field(default_factory=lambda: PointsHistory().grants)
    pending: pd.DataFrame = field(default_factory=no_pending)       # firings waiting (decide.pending)
    # stored tiers: every member's state, the changes of tier (customer_id, tier, since UTC) the
    # points multiply by, and each step's moves (as_of + data.tiers.MOVE_COLUMNS)
    tiers: TierState = field(default_factory=TierState.empty)
    tier_changes: pd.DataFrame = field(default_factory=PointsHistory.no_tier_changes)
    tier_log: list = field(default_factory=list)

    def context(self, workspace: LoadedWorkspace, as_of: pd.Timestamp) -> RunContext:
        """The run context a real run at ``as_of`` would read from the database."""
        longest = max([workspace.settings.contact_policy.per_days] +
                      [c.cooldown_days or 0 for c in workspace.program.campaigns.values()])
        since = as_of - pd.Timedelta(days=longest + 1)
        contacts = self.contacts[self.contacts["contacted_at"] > since]
        self.contacts = contacts.reset_index(drop=True)   # older contacts can never matter again
        grants = self.granted[self.granted["granted_at"] < as_of]
        stored = workspace.program.stored_tiers
        changes = self.tier_changes[self.tier_changes["since"] < as_of].reset_index(drop=True) if stored else None
        return RunContext(as_of, self.previous_as_of, self.contacts, dict(self.edge_state),
                          recorded=self._recorded, budget_used=self._budget_used(workspace, as_of),
                          points=PointsHistory(grants=grants.reset_index(drop=True), tiers=changes),
                          tiers=self.tiers if stored else None, pending=self.pending)

    def _budget_used(self, workspace: LoadedWorkspace, as_of: pd.Timestamp) -> dict[str, tuple[int, float]]:
        """What runs before ``as_of`` spent in each budget's period, as the database would say."""
        starts = {c: s.tz_convert("UTC").isoformat(timespec="seconds")
                  for c, s in budget_periods(workspace, as_of).items()}
        if not starts:
            return {}
        before = as_of.tz_convert("UTC").isoformat(timespec="seconds")
        used = dict(self.earlier_spent(starts, before)) if self.earlier_spent is not None else {}
        spent = self.spent
        for campaign, start in starts.items():
            mine = spent[(spent["campaign"] == campaign) & (spent["as_of"] >= start) & (spent["as_of"] < before)]
            if len(mine):
                offers, cost = used.get(campaign, (0, 0.0))
                used[campaign] = (offers + len(mine), cost + float(mine["cost"].sum()))
        return used

    def _recorded(self, keys: list[str]) -> dict[str, str]:
        found = {k: self.recorded[k] for k in keys if k in self.recorded}
        rest = [k for k in keys if k not in found]
        if self.earlier is not None and rest:
            found.update(self.earlier(rest))
        return found

    def record(self, evaluation: Evaluation, edge_state: dict[str, frozenset],
               workspace: LoadedWorkspace | None = None) -> None:
        """Remember a run: its offers as contacts and recorded firings, its edge state and, with
        stored tiers (``workspace``'s), its tier moves and those of its tier rewards."""
        offers = evaluation.offers
        if workspace is not None and workspace.program.stored_tiers:
            self._record_tiers(workspace, evaluation)
        as_of_key = evaluation.as_of.tz_convert("UTC").isoformat(timespec="seconds")
        if len(offers):
            new = pd.DataFrame({
                "customer_id": pd.Series(offers["customer_id"].astype(str).to_numpy(dtype=object), dtype=object),
                "campaign": pd.Series(offers["campaign"].to_numpy(dtype=object), dtype=object),
                "channel": pd.Series(offers["channel"].to_numpy(dtype=object), dtype=object),
                "contacted_at": pd.to_datetime(offers["send_at"], utc=True).reset_index(drop=True)})
            if "no_message" in offers and (offers["no_message"] != "").any():
                new["message"] = (offers["no_message"] == "").to_numpy(dtype=bool)
            self.add_contacts(new)
            self.recorded.update(dict.fromkeys(offers["firing_key"], as_of_key))
            spent = pd.DataFrame({"campaign": offers["campaign"].to_numpy(dtype=object),
                                  "as_of": as_of_key, "cost": offers["cost"].to_numpy(dtype=float)})
            self.spent = pd.concat([self.spent, spent], ignore_index=True) if len(self.spent) else spent
            points = offers["points"].to_numpy(dtype=float)
            given = points > 0
            if given.any():
                granted = pd.DataFrame({
                    "customer_id": offers["customer_id"].astype(str).to_numpy(dtype=object)[given],
                    "points": points[given], "campaign": offers["campaign"].to_numpy(dtype=object)[given],
                    "granted_at": pd.Series(evaluation.as_of.tz_convert("UTC"), index=range(int(given.sum())))
                    .dt.as_unit("us")})
                self.granted = pd.concat([self.granted, granted], ignore_index=True) if len(self.granted) \
                    else granted
        self._keep_pending(evaluation.pending, as_of_key)
        self.edge_state.update(edge_state)
        self.previous_as_of = evaluation.as_of

    def _record_tiers(self, workspace: LoadedWorkspace, evaluation: Evaluation) -> None:
        """What ``StateStore.record_run`` writes of the stored tiers: the run's moves, then its
        tier rewards' moves on top, in the order of the offers."""
        rules = TierRules.of(workspace.program, workspace.settings.timezone)
        moves = [evaluation.tier_moves]
        self.tiers = self.tiers.apply(evaluation.tier_moves)
        offers = evaluation.offers
        tier_offers = offers[offers["reward_kind"] == "tier"] if len(offers) else offers
        if len(tier_offers):
            program = workspace.program
            rewards = []
            for offer in tier_offers[["customer_id", "campaign", "variant"]].to_dict("records"):
                campaign = program.campaigns[offer["campaign"]]
                reward = next((v.reward for v in campaign.variants if v.name == offer["variant"] and v.reward),
                              campaign.reward)
                rewards.append({"customer_id": str(offer["customer_id"]), "campaign": campaign.id,
                                "to": reward.params["to"], "trial_days": trial_days(reward.params.get("for"))})
            rewards = pd.DataFrame(rewards)
            members = self.tiers.members
            current = members[members["customer_id"].isin(set(rewards["customer_id"]))][STATE_COLUMNS]
            rewarded = campaign_moves(rules, evaluation.as_of, current, rewards)
            self.tiers = self.tiers.apply(rewarded)
            moves.append(rewarded)
        moved = pd.concat([m for m in moves if len(m)], ignore_index=True) if any(len(m) for m in moves) else None
        if moved is None:
            return
        self.tier_log.append(moved[MOVE_COLUMNS].assign(as_of=evaluation.as_of))
        changed = moved[moved["from_tier"].astype(object).fillna("\0") != moved["tier"].astype(object).fillna("\0")]
        if len(changed):
            at = evaluation.as_of.tz_convert("UTC").as_unit("us")
            new = pd.DataFrame({"customer_id": changed["customer_id"].astype(str).to_numpy(dtype=object),
                                "tier": changed["tier"].to_numpy(dtype=object),
                                "since": pd.Series([at] * len(changed), dtype="datetime64[us, UTC]")})
            self.tier_changes = pd.concat([self.tier_changes, new], ignore_index=True) if len(self.tier_changes) \
                else new

    def _keep_pending(self, outcomes: pd.DataFrame, as_of_key: str) -> None:
        """What a run decided about firings that wait, as the state store writes it: new ones
        added (a waiting one keeps its first firing, expiry and event), closed ones acted on."""
        if not len(outcomes):
            return
        waiting = outcomes[outcomes["status"] == "pending"]
        closed = outcomes[outcomes["status"] != "pending"]
        kept = self.pending[~self.pending["firing_key"].isin(set(closed["firing_key"]))]
        acted_on = np.fromiter((key in self.recorded for key in waiting["firing_key"]), dtype=bool,
                               count=len(waiting))
        new = waiting[~waiting["firing_key"].isin(set(kept["firing_key"])).to_numpy() & ~acted_on]
        if len(waiting):      # the latest reason of those still waiting
            reasons = dict(zip(waiting["firing_key"], waiting["reason"]))
            kept = kept.assign(reason=kept["firing_key"].map(reasons).fillna(kept["reason"]))
        self.pending = pd.concat([kept, new[CONTEXT_COLUMNS]], ignore_index=True).astype(object) \
            if len(new) else kept.reset_index(drop=True)
        self.recorded.update(dict.fromkeys(closed.loc[closed["status"] != "offered", "firing_key"], as_of_key))

    def add_contacts(self, frame: pd.DataFrame) -> None:
        frame = frame.assign(contacted_at=pd.to_datetime(frame["contacted_at"], utc=True))
        if "message" in frame or "message" in self.contacts:
            frame = frame.assign(message=frame.get("message", True))
            if len(self.contacts) and "message" not in self.contacts:
                self.contacts = self.contacts.assign(message=True)
        self.contacts = pd.concat([self.contacts, frame], ignore_index=True) if len(self.contacts) else frame


@dataclass
class Seed:
    """Where a simulation starts: the state database's runs before the first step, or nothing."""

    store: StateStore | None
    before: pd.Timestamp
    runs: int = 0
    last_run: str | None = None

    def state(self, workspace: LoadedWorkspace) -> MemoryState:
        """A fresh in-memory state holding what the database remembered before the first step."""
        if self.store is None or not self.runs:
            return MemoryState()
        ctx = run_context(workspace, self.before, self.store)
        schedules = {}
        for campaign in workspace.program.campaigns:
            last = self.store.schedule_last_run(campaign)
            if last is not None and pd.Timestamp(last) < self.before:
                schedules[campaign] = last
        state = MemoryState(previous_as_of=ctx.previous_as_of, edge_state=dict(ctx.edge_state),
                            schedules=schedules, earlier=self._recorded_before, earlier_spent=self._spent_before,
                            pending=ctx.pending)
        if ctx.points is not None and len(ctx.points.grants):
            state.granted = ctx.points.grants
        if ctx.tiers is not None:
            state.tiers = ctx.tiers
        if ctx.points is not None and ctx.points.tiers is not None:
            state.tier_changes = ctx.points.tiers
        if len(ctx.contacts):
            state.add_contacts(ctx.contacts)
        return state

    def all_recorded_before(self) -> dict[str, str]:
        """Every firing recorded before the first step (what a cluster's tasks are shipped)."""
        return self.store.recorded_at(before=self._before_utc()) if self.store is not None else {}

    def _recorded_before(self, keys: list[str]) -> dict[str, str]:
        return self.store.recorded_at(keys, before=self._before_utc())

    def _spent_before(self, starts: Mapping[str, str], before: str) -> dict[str, tuple[int, float]]:
        return self.store.budget_used(starts, min(before, self._before_utc()))

    def _before_utc(self) -> str:
        return self.before.tz_convert("UTC").isoformat(timespec="seconds")


@contextlib.contextmanager
def seed_from_state(workspace: LoadedWorkspace, before: pd.Timestamp, fresh: bool = False) -> Iterator[Seed]:
    """The runs recorded before ``before``, read from a private copy of the state database
    (copying reads the file and never changes it; the copy is deleted afterwards)."""
    path = workspace.settings.state_path
    if fresh or not path.is_file():
        yield Seed(None, before)
        return
    with tempfile.TemporaryDirectory(prefix="loyalty-simulate-") as folder:
        copy = Path(folder) / path.name
        shutil.copyfile(path, copy)
        wal = path.with_name(path.name + "-wal")
        if wal.is_file():   # changes not yet checkpointed into the main file
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        store = StateStore(copy)
        try:
            before_utc = before.tz_convert("UTC").isoformat(timespec="seconds")
            rows = list(store.db.query(
                "SELECT count(*) AS runs, max(as_of_utc) AS last FROM runs "
                "WHERE status IN ('recorded', 'delivered') AND as_of_utc < ?", [before_utc]))
            last = rows[0]["last"]
            yield Seed(store, before, int(rows[0]["runs"]),
                       pd.Timestamp(last).tz_convert(workspace.settings.timezone).isoformat() if last else None)
        finally:
            store.close()


def due_in_memory(workspace: LoadedWorkspace, state: MemoryState, as_of: pd.Timestamp) -> list[str]:
    return due_campaigns(workspace, state.schedules.get, as_of)


# --------------------------------------------------------------------------- the replay


def parse_every(text: str) -> pd.Timedelta:
    match = _EVERY.match(str(text))
    if not match or int(match.group(1)) == 0:
        raise LoyaltyError(f"--every '{text}' is not a step (write 1d, 12h or 1w)")
    return pd.Timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def step_times(start, end, every: str, timezone: str) -> list[pd.Timestamp]:
    """``start``, ``start + every``, ... up to ``end`` (a date ``end`` includes its whole day)."""
    first = parse_as_of(start, timezone)
    last = parse_as_of(end, timezone)
    if isinstance(end, str) and len(end.strip()) == 10:   # a plain date: the whole day
        last = last + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    if last < first:
        raise LoyaltyError(f"--to {end} is before --from {start}")
    step = parse_every(every)
    times, current = [], first
    while current <= last:
        times.append(current)
        # whole days keep the wall-clock time of `start` across DST changes
        current = (current.tz_localize(None) + step).tz_localize(
            timezone, ambiguous=True, nonexistent="shift_forward") if step % pd.Timedelta(days=1) == \
            pd.Timedelta(0) else current + step
    return times


def replay(workspace: LoadedWorkspace, tables: Tables | None, times: list[pd.Timestamp], *, due: bool = False,
           state: MemoryState | None = None, on_step: Callable | None = None,
           decide: Callable | None = None) -> pd.DataFrame:
    """Run at each instant in memory; return every offer with the step (``as_of``) that made it.

    ``decide(ctx, campaigns, state) -> (evaluation, edge_state)`` evaluates a step somewhere
    else (the dask engine); by default the step is evaluated here, on ``tables``."""
    state = state if state is not None else MemoryState()
    frames = []
    index = None
    for as_of in times:
        selected = None
        if due:
            selected = due_in_memory(workspace, state, as_of)
            if not selected:
                continue   # a real `run --due` with nothing due records no run at all
        ctx = state.context(workspace, as_of)
        if decide is not None:
            evaluation, edge_state = decide(ctx, selected, state)
        else:
            features = compute_features(tables, workspace.program, workspace.settings, as_of, ctx.points, ctx.tiers)
            index = index if index is not None else customer_index(features)
            evaluation, edge_state = evaluate_step(workspace, tables, features, ctx, selected, index=index)
        state.record(evaluation, edge_state, workspace)
        if due:
            state.schedules.update(dict.fromkeys(selected, as_of.isoformat()))
        if on_step is not None:
            on_step(as_of, evaluation)
        offers = evaluation.offers
        if len(offers):
            frames.append(offers[OFFER_COLUMNS].assign(as_of=as_of))
    if not frames:
        return no_offers()[OFFER_COLUMNS].assign(as_of=pd.Series(dtype=object))
    return pd.concat(frames, ignore_index=True)
