"""Simulation: replay scheduled runs over a date range, in memory, to forecast offers and cost.

Each step is a run at ``as_of`` = ``start + k * every``: features at that instant, then the
same evaluation as ``loyalty run``, with what earlier steps did kept in memory instead of
the state database: contact history (offers become contacts at their ``send_at``), firing
keys already acted on, ``becomes:`` edge state, the previous step's instant (for event and
date triggers) and, with ``due``, each campaign's last scheduled run.

The state database is never opened for writing: a simulation starts from what it remembers
of the runs before the first step (contacts, firings already acted on, ``becomes:`` state,
schedules), read from a private copy of the file, or from scratch when the workspace has
never run (or with ``fresh=True``).

Evaluating is the same ``engine.evaluation.evaluate`` a run uses, on the customers who can
possibly fire in the step (a cheap superset per trigger kind, see ``CANDIDATES``); every
stage is per customer except budgets and arbitration, which only ever look at those who
fired, so the result is exactly that of evaluating everybody.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from .errors import LoyaltyError
from .assignment import in_holdout
from .evaluation import Evaluation, evaluate, segment_mask
from .features import compute_features
from .model import CampaignDef, Workspace
from .pipeline import empty_contacts, parse_as_of, run_context
from .policy import cap_remaining, reachable
from .sources import Tables, load_tables
from .store import StateStore
from .triggers import EVENT_LOOKBACK, RunContext

TOP_CUSTOMERS = 20
_EVERY = re.compile(r"^\s*(\d+)\s*([hdw])\s*$")
_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


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

    def context(self, workspace: Workspace, as_of: pd.Timestamp) -> RunContext:
        """The run context a real run at ``as_of`` would read from the database."""
        longest = max([workspace.settings.contact_policy.per_days] +
                      [c.cooldown_days or 0 for c in workspace.program.campaigns.values()])
        since = as_of - pd.Timedelta(days=longest + 1)
        contacts = self.contacts[self.contacts["contacted_at"] > since]
        self.contacts = contacts.reset_index(drop=True)   # older contacts can never matter again
        return RunContext(as_of, self.previous_as_of, self.contacts, dict(self.edge_state),
                          recorded=self._recorded)

    def _recorded(self, keys: list[str]) -> dict[str, str]:
        found = {k: self.recorded[k] for k in keys if k in self.recorded}
        rest = [k for k in keys if k not in found]
        if self.earlier is not None and rest:
            found.update(self.earlier(rest))
        return found

    def record(self, evaluation: Evaluation, edge_state: dict[str, frozenset]) -> None:
        """Remember a run: its offers as contacts and recorded firings, its edge state."""
        offers = evaluation.offers
        as_of_key = evaluation.as_of.tz_convert("UTC").isoformat(timespec="seconds")
        if len(offers):
            new = pd.DataFrame({
                "customer_id": pd.Series(offers["customer_id"].astype(str).to_numpy(dtype=object), dtype=object),
                "campaign": pd.Series(offers["campaign"].to_numpy(dtype=object), dtype=object),
                "channel": pd.Series(offers["channel"].to_numpy(dtype=object), dtype=object),
                "contacted_at": pd.to_datetime(offers["send_at"], utc=True).reset_index(drop=True)})
            self.contacts = pd.concat([self.contacts, new], ignore_index=True) if len(self.contacts) else new
            self.recorded.update(dict.fromkeys(offers["firing_key"], as_of_key))
        self.edge_state.update(edge_state)
        self.previous_as_of = evaluation.as_of

    def add_contacts(self, frame: pd.DataFrame) -> None:
        frame = frame.assign(contacted_at=pd.to_datetime(frame["contacted_at"], utc=True))
        self.contacts = pd.concat([self.contacts, frame], ignore_index=True) if len(self.contacts) else frame


@dataclass
class Seed:
    """Where a simulation starts: the state database's runs before the first step, or nothing."""

    store: StateStore | None
    before: pd.Timestamp
    runs: int = 0
    last_run: str | None = None

    def state(self, workspace: Workspace) -> MemoryState:
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
                            schedules=schedules, earlier=self._recorded_before)
        if len(ctx.contacts):
            state.add_contacts(ctx.contacts)
        return state

    def _recorded_before(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        before = self.before.tz_convert("UTC").isoformat(timespec="seconds")
        for start in range(0, len(keys), 900):
            chunk = keys[start:start + 900]
            marks = ",".join("?" * len(chunk))
            found.update((row["firing_key"], row["as_of_utc"]) for row in self.store.db.query(
                "SELECT o.firing_key, r.as_of_utc FROM offers o JOIN runs r ON r.run_id = o.run_id "
                f"WHERE r.as_of_utc < ? AND o.firing_key IN ({marks})", [before, *chunk]))
        return found


@contextlib.contextmanager
def seed_from_state(workspace: Workspace, before: pd.Timestamp, fresh: bool = False) -> Iterator[Seed]:
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


class _ScheduleBook:
    """The part of the state store that ``api.due_campaigns`` reads."""

    def __init__(self, state: MemoryState):
        self.state = state

    def schedule_last_run(self, campaign: str):
        return self.state.schedules.get(campaign)


def due_in_memory(workspace: Workspace, state: MemoryState, as_of: pd.Timestamp) -> list[str]:
    from .api import due_campaigns
    return due_campaigns(workspace, _ScheduleBook(state), as_of)


# --------------------------------------------------------------------------- one step


@dataclass
class _Step:
    """Per-step facts every campaign's pre-filter shares, computed once."""

    workspace: Workspace
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
    step (as in ``engine.triggers``: from the previous run's local date, or the day before)."""
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


def evaluate_step(workspace: Workspace, tables: Tables, features: pd.DataFrame, ctx: RunContext,
                  campaigns: list[str] | None = None, *,
                  index: pd.Index | None = None) -> tuple[Evaluation, dict[str, frozenset]]:
    """``evaluate`` restricted to the customers who may get an offer; and the new ``becomes`` state.

    The offers are those of evaluating every customer (``pos`` refers to the subset).
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
    open_to_offers = room & ~in_holdout(ids, settings.salt, "global", settings.holdout)
    union = np.zeros(len(features), dtype=bool)
    active = []
    for campaign in selected:
        may_get = _may_get_offer(step, campaign, open_to_offers)
        if may_get.any():
            union |= may_get
            active.append(campaign.id)
    rows = np.flatnonzero(union)
    if not active:
        return Evaluation(ctx.as_of, _no_offers(), {}, pd.DataFrame()), edge_state
    subset = features.iloc[rows, _needed_columns(workspace, features)].reset_index(drop=True)
    # the contact history of the others cannot change the decisions about these customers
    contacts = ctx.contacts[ctx.contacts["customer_id"].astype(object).isin(set(ids.iloc[rows])).to_numpy()]
    ctx = dataclasses.replace(ctx, contacts=contacts.reset_index(drop=True))
    return evaluate(workspace, step.tables, subset, ctx, active), edge_state


def customer_index(features: pd.DataFrame) -> pd.Index:
    return pd.Index(features["customer_id"].astype(str).to_numpy(dtype=object), dtype=object)


def _needed_columns(workspace: Workspace, features: pd.DataFrame) -> list[int]:
    """Positions of the columns an evaluation reads (a simulation renders no message)."""
    program, settings = workspace.program, workspace.settings
    names = {"customer_id", "timezone", "locale", "birthday", "days_since_last_order", "days_to_birthday",
             "avg_order_value"}
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


def _may_get_offer(step: _Step, campaign: CampaignDef, open_to_offers: np.ndarray) -> np.ndarray:
    """Who may get this campaign's offer: a superset of the evaluation's candidates, from the
    same per-customer stages (trigger, segment, consent, cap, cooldown, holdouts)."""
    settings = step.workspace.settings
    ctx = step.ctx
    may = np.asarray(CANDIDATES.get(campaign.trigger.kind, _everyone)(step, campaign), dtype=bool)
    may = may & open_to_offers & step.reachable(campaign.channel)
    if not may.any():
        return may
    may &= segment_mask(step.workspace, campaign, step.features, ctx.as_of)
    if campaign.cooldown_days and len(ctx.contacts) and may.any():
        contacts = ctx.contacts
        recent = contacts[(contacts["campaign"] == campaign.id)
                          & (contacts["contacted_at"] > ctx.as_of - pd.Timedelta(days=campaign.cooldown_days))]
        may &= ~step.isin(set(recent["customer_id"].astype(str)))
    if campaign.holdout and may.any():
        rows = np.flatnonzero(may)
        held = in_holdout(pd.Series(step.ids.iloc[rows].to_numpy(), dtype=object),
                          settings.salt, campaign.id, campaign.holdout)
        may[rows[held]] = False
    return may


def _no_offers() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": pd.Series(dtype=object), "campaign": pd.Series(dtype=object),
                         "channel": pd.Series(dtype=object), "firing_key": pd.Series(dtype=object),
                         "variant": pd.Series(dtype=object), "reward_kind": pd.Series(dtype=object),
                         "cost": pd.Series(dtype=float), "points": pd.Series(dtype=float),
                         "send_at": pd.Series(dtype="datetime64[us, UTC]")})


# --------------------------------------------------------------------------- the simulation


@dataclass
class CampaignForecast:
    id: str
    name: str
    offers: int = 0
    cost: float = 0.0                 # every reward's estimated cost
    discount_value: float = 0.0       # coupons
    points: float = 0.0               # points credited (the points liability)
    points_value: float = 0.0         # points x costs.point_value
    budget_bound_runs: int = 0        # runs in which the budget stopped someone
    lost_to_budget: int = 0           # offers the budget stopped, over all runs


@dataclass
class Simulation:
    """A forecast: per campaign, per ISO week, where budgets bind, who is contacted most."""

    workspace: str
    start: str
    end: str
    every: str
    steps: list[str]
    campaigns: list[CampaignForecast]
    weeks: list[dict]                 # week, campaign, offers, cost, discount_value, points, points_value
    budget_binding: list[dict]        # as_of, campaign, fired (after arbitration), kept, lost
    top_customers: list[dict]         # customer_id, offers, campaigns
    customers: int = 0
    seconds: float = 0.0
    earlier_runs: int = 0             # runs recorded in the state database before the first step
    last_run: str | None = None       # the latest of them: the simulation continues from there
    diff: list[dict] | None = None    # with --diff: per campaign, this forecast against the other
    offers: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)  # one row per simulated offer

    @property
    def total_offers(self) -> int:
        return sum(c.offers for c in self.campaigns)

    @property
    def total_cost(self) -> float:
        return round(sum(c.cost for c in self.campaigns), 2)

    def as_dict(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "offers"}
        data["total_offers"] = self.total_offers
        data["total_cost"] = self.total_cost
        return data

    def rows(self) -> list[dict]:
        """The per-week table, one row per (week, campaign): what `--format csv` prints."""
        return list(self.weeks)


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


def replay(workspace: Workspace, tables: Tables, times: list[pd.Timestamp], *, due: bool = False,
           state: MemoryState | None = None, on_step: Callable | None = None) -> pd.DataFrame:
    """Run at each instant in memory; return every offer with the step (``as_of``) that made it."""
    state = state if state is not None else MemoryState()
    frames = []
    index = None
    for as_of in times:
        selected = None
        if due:
            selected = due_in_memory(workspace, state, as_of)
            if not selected:
                continue   # a real `run --due` with nothing due records no run at all
        features = compute_features(tables, workspace.program, workspace.settings, as_of)
        ctx = state.context(workspace, as_of)
        index = index if index is not None else customer_index(features)
        evaluation, edge_state = evaluate_step(workspace, tables, features, ctx, selected, index=index)
        state.record(evaluation, edge_state)
        if due:
            state.schedules.update(dict.fromkeys(selected, as_of.isoformat()))
        if on_step is not None:
            on_step(as_of, evaluation)
        offers = evaluation.offers
        if len(offers):
            frames.append(offers[["campaign", "customer_id", "firing_key", "variant", "reward_kind",
                                  "cost", "points", "send_at"]].assign(as_of=as_of))
    if not frames:
        return _no_offers()[["campaign", "customer_id", "firing_key", "variant", "reward_kind", "cost",
                             "points", "send_at"]].assign(as_of=pd.Series(dtype=object))
    return pd.concat(frames, ignore_index=True)


def simulate(root: Path | str, start, end, every: str = "1d", diff: Path | str | None = None, *,
             due: bool = False, top: int = TOP_CUSTOMERS, fresh: bool = False) -> Simulation:
    """Forecast the runs from ``start`` to ``end`` (every ``every``, at ``start``'s time of day).

    The simulation continues from the runs the state database recorded before ``start``
    (read from a copy, never written), or starts from scratch without one or with ``fresh``.
    With ``diff``, the other workspace's rules are forecast from the same starting state."""
    from .workspace import load_workspace
    started = time.perf_counter()
    workspace = load_workspace(root)
    tables = load_tables(workspace.settings, workspace.root)
    times = step_times(start, end, every, workspace.settings.timezone)
    with seed_from_state(workspace, times[0], fresh) as seed:
        result = _forecast(workspace, tables, times, due, top, start, end, every, seed.state(workspace))
        if diff is not None:
            other = load_workspace(diff)
            other_tables = tables if dict(other.settings.data) == dict(workspace.settings.data) else \
                load_tables(other.settings, other.root)
            other_result = _forecast(other, other_tables, times, due, top, start, end, every, seed.state(other))
            result.diff = compare(result, other_result)
    result.earlier_runs = seed.runs
    result.last_run = seed.last_run
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _forecast(workspace: Workspace, tables: Tables, times, due, top, start, end, every,
              state: MemoryState) -> Simulation:
    binding: list[dict] = []

    def watch(as_of, evaluation):
        for campaign, funnel in evaluation.funnels.items():
            if funnel["budget"] < funnel["arbitration"]:
                binding.append({"as_of": as_of.isoformat(), "campaign": campaign,
                                "fired": funnel["arbitration"], "kept": funnel["budget"],
                                "lost": funnel["arbitration"] - funnel["budget"]})

    offers = replay(workspace, tables, times, due=due, state=state, on_step=watch)
    point_value = workspace.settings.point_value
    week_of = {t: f"{t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}" for t in times}
    offers = offers.assign(
        week=offers["as_of"].map(week_of).astype(object),
        discount_value=np.where(offers["reward_kind"] == "coupon", offers["cost"], 0.0),
        points_value=offers["points"].astype(float) * point_value)
    campaigns = []
    for campaign in workspace.program.campaigns.values():
        if not campaign.enabled:
            continue
        mine = offers[offers["campaign"] == campaign.id]
        bound = [b for b in binding if b["campaign"] == campaign.id]
        campaigns.append(CampaignForecast(
            campaign.id, campaign.name, len(mine), _money(mine["cost"].sum()),
            _money(mine["discount_value"].sum()), float(mine["points"].sum()),
            _money(mine["points_value"].sum()), len(bound), sum(b["lost"] for b in bound)))
    weeks = []
    if len(offers):
        grouped = offers.groupby(["week", "campaign"], sort=True).agg(
            offers=("firing_key", "size"), cost=("cost", "sum"), discount_value=("discount_value", "sum"),
            points=("points", "sum"), points_value=("points_value", "sum")).reset_index()
        weeks = [{"week": r.week, "campaign": r.campaign, "offers": int(r.offers), "cost": _money(r.cost),
                  "discount_value": _money(r.discount_value), "points": float(r.points),
                  "points_value": _money(r.points_value)} for r in grouped.itertuples()]
    most = []
    if len(offers):
        counts = offers["customer_id"].astype(str).value_counts()
        counts = counts.rename_axis("customer_id").reset_index(name="offers")
        counts = counts.sort_values(["offers", "customer_id"], ascending=[False, True]).head(top)
        chosen = offers[offers["customer_id"].astype(str).isin(set(counts["customer_id"]))]
        theirs = chosen.groupby(chosen["customer_id"].astype(str))["campaign"].unique()
        most = [{"customer_id": r.customer_id, "offers": int(r.offers),
                 "campaigns": sorted(theirs[r.customer_id])} for r in counts.itertuples()]
    local = [t.isoformat() for t in times]
    return Simulation(str(workspace.root), local[0] if local else str(start), local[-1] if local else str(end),
                      str(every), local, campaigns, weeks, binding, most, customers=len(tables.customers),
                      offers=offers.drop(columns=["week"]))


def _money(value) -> float:
    return round(float(value), 2)


def compare(mine: Simulation, other: Simulation) -> list[dict]:
    """Per campaign: offers and cost of this version of the rules (before) and the other (after)."""
    before = {c.id: c for c in mine.campaigns}
    after = {c.id: c for c in other.campaigns}
    rows = []
    for campaign in sorted(set(before) | set(after)):
        a, b = before.get(campaign), after.get(campaign)
        rows.append({
            "campaign": campaign,
            "offers_before": a.offers if a else 0, "offers_after": b.offers if b else 0,
            "cost_before": a.cost if a else 0.0, "cost_after": b.cost if b else 0.0,
            "offers_change": (b.offers if b else 0) - (a.offers if a else 0),
            "cost_change": _money((b.cost if b else 0.0) - (a.cost if a else 0.0)),
            "only_in": "before" if b is None else ("after" if a is None else None)})
    return rows


def format_text(sim: Simulation) -> str:
    """The forecast as the terminal tables `loyalty simulate` prints."""
    start = f"Continued from {sim.earlier_runs} recorded run(s), the last at {sim.last_run}" \
        if sim.earlier_runs else "Started from scratch (no run recorded before the first step)"
    lines = [f"Simulated {len(sim.steps)} runs from {sim.start} to {sim.end} (every {sim.every}) "
             f"for {sim.customers} customers in {sim.seconds:.1f} s: "
             f"{sim.total_offers} offers, cost {sim.total_cost:,.2f}",
             f"{start}; the state database was not changed.", "",
             f"{'campaign':<28}{'offers':>8}{'cost':>12}{'discounts':>12}{'points':>10}"
             f"{'budget bound':>14}"]
    for c in sim.campaigns:
        bound = f"{c.budget_bound_runs} runs (-{c.lost_to_budget})" if c.budget_bound_runs else "-"
        lines.append(f"{c.id:<28}{c.offers:>8}{c.cost:>12,.2f}{c.discount_value:>12,.2f}"
                     f"{c.points:>10,.0f}{bound:>14}")
    if sim.weeks:
        lines += ["", f"{'week':<10}{'offers':>8}{'cost':>12}{'points':>10}"]
        per_week: dict[str, list[float]] = {}
        for row in sim.weeks:
            total = per_week.setdefault(row["week"], [0, 0.0, 0.0])
            total[0] += row["offers"]
            total[1] += row["cost"]
            total[2] += row["points"]
        for week, (offers, cost, points) in per_week.items():
            lines.append(f"{week:<10}{offers:>8}{cost:>12,.2f}{points:>10,.0f}")
    if sim.top_customers:
        lines += ["", "Contacted most:"]
        lines += [f"  {c['customer_id']}: {c['offers']} offers ({', '.join(c['campaigns'])})"
                  for c in sim.top_customers[:10]]
    if sim.diff is not None:
        lines += ["", f"{'campaign':<28}{'offers':>16}{'cost':>26}"]
        for d in sim.diff:
            lines.append(f"{d['campaign']:<28}{d['offers_before']:>7} -> {d['offers_after']:<7}"
                         f"{d['cost_before']:>12,.2f} -> {d['cost_after']:<12,.2f}")
    return "\n".join(lines)
