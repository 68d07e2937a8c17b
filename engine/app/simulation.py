"""Simulation (`loyalty simulate`): forecast offers and reward cost over a date range.

Replays the scheduled runs in memory (``engine.app.replay``), continuing from what the state
database remembers of the runs before the first step (read from a private copy, never
written) or from scratch, and sums the offers up per campaign and per ISO week: reward
cost, discount value, points liability, where budgets bind and who is contacted most.
``diff`` forecasts another version of the rules from the same start and compares.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from engine.app.replay import MemoryState, parse_every, replay, seed_from_state, step_times
from engine.app.report_text import display_width, tier_moves_line
from engine.app.validation import load_workspace
from engine.config.model import LoadedWorkspace
from engine.config.settings import chosen_engine
from engine.data.sources import Tables, load_tables
from engine.data.tiers import MOVE_COLUMNS, TierRules, empty_states, move_counts
from engine.decide.totals import OfferTotals
from engine.execution.dask_engine import cluster, evaluate_on_dask
from engine.progress import Progress, say

__all__ = ["CampaignForecast", "MemoryState", "Simulation", "compare", "format_text", "parse_every",
           "simulate", "step_times"]

TOP_CUSTOMERS = 20


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
class Simulation(OfferTotals):
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
    diff: list[dict] | None = None    # with --diff: per campaign, the other rules (before) -> these (after)
    offers: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)  # one row per simulated offer
    # stored tiers: members moved up into, down into and joining each tier over the simulation
    tier_moves: dict | None = None
    # every simulated change of a member's tier state (as_of + data.tiers.MOVE_COLUMNS)
    tier_history: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def as_dict(self) -> dict:
        return self.with_totals({k: v for k, v in dataclasses.asdict(self).items()
                                 if k not in ("offers", "tier_history")})

    def rows(self) -> list[dict]:
        """The per-week table, one row per (week, campaign): what `--format csv` prints."""
        return list(self.weeks)


def simulate(root: Path | str, start, end, every: str = "1d", diff: Path | str | None = None, *,
             due: bool = False, top: int = TOP_CUSTOMERS, fresh: bool = False,
             engine: str | None = None, scheduler: str | None = None,
             partitions: int | None = None, progress: Progress | None = None) -> Simulation:
    """Forecast the runs from ``start`` to ``end`` (every ``every``, at ``start``'s time of day).

    The simulation continues from the runs the state database recorded before ``start``
    (read from a copy, never written), or starts from scratch without one or with ``fresh``.
    With ``diff``, the other workspace's rules are forecast from the same starting state.
    ``engine``: ``local`` (the default: each step evaluates, here, only the customers who can
    get an offer) or ``dask`` (each step is evaluated on a Dask cluster, started once for the
    whole simulation, partition by partition, with ``partitions``); the forecast is the same.
    ``progress`` hears of each simulated run ("simulated run 3/31")."""
    started = time.perf_counter()
    workspace = load_workspace(root)
    times = step_times(start, end, every, workspace.settings.timezone)
    if chosen_engine(workspace.settings, engine, scheduler) == "dask":
        with cluster(scheduler or workspace.settings.scheduler) as client:
            result = _simulate(workspace, times, diff, due, top, fresh, start, end, every,
                               lambda ws: _on_dask(ws, client, partitions or ws.settings.partitions), progress)
    else:
        result = _simulate(workspace, times, diff, due, top, fresh, start, end, every, None, progress)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _simulate(workspace, times, diff, due, top, fresh, start, end, every, decider, progress=None) -> Simulation:
    tables = load_tables(workspace.settings, workspace.root) if decider is None else None
    with seed_from_state(workspace, times[0], fresh) as seed:
        result = _forecast(workspace, tables, times, due, top, start, end, every,
                           _start_state(seed, workspace, decider), decider and decider(workspace), progress)
        if diff is not None:
            other = load_workspace(diff)
            other_tables = None
            if decider is None:
                other_tables = tables if dict(other.settings.data) == dict(workspace.settings.data) else \
                    load_tables(other.settings, other.root)
            other_result = _forecast(other, other_tables, times, due, top, start, end, every,
                                     _start_state(seed, other, decider), decider and decider(other), progress)
            result.diff = compare(other_result, result)
    result.earlier_runs = seed.runs
    result.last_run = seed.last_run
    return result


def _start_state(seed, workspace: LoadedWorkspace, decider) -> MemoryState:
    state = seed.state(workspace)
    if decider is not None and seed.runs:
        # a cluster's tasks cannot ask the state database: they are shipped the keys
        state.recorded.update(seed.all_recorded_before())
    return state


def _on_dask(workspace: LoadedWorkspace, client, partitions: int | None):
    """A step evaluated on the cluster, with the simulation's in-memory history."""

    def decide(ctx, campaigns, state: MemoryState):
        decided = evaluate_on_dask(workspace, ctx, campaigns=campaigns, partitions=partitions,
                                   client=client, recorded=state.recorded)
        decide.customers = decided.customers
        return decided.evaluation, decided.evaluation.edge_state
    decide.customers = 0
    return decide


def _forecast(workspace: LoadedWorkspace, tables: Tables | None, times, due, top, start, end, every,
              state: MemoryState, decide=None, progress: Progress | None = None) -> Simulation:
    binding: list[dict] = []
    done = iter(range(1, len(times) + 1))

    def watch(as_of, evaluation):
        say(progress, f"{workspace.root.name}: simulated run {next(done)}/{len(times)} ({as_of:%Y-%m-%d})")
        for campaign, funnel in evaluation.funnels.items():
            if funnel["budget"] < funnel["arbitration"]:
                binding.append({"as_of": as_of.isoformat(), "campaign": campaign,
                                "fired": funnel["arbitration"], "kept": funnel["budget"],
                                "lost": funnel["arbitration"] - funnel["budget"]})

    offers = replay(workspace, tables, times, due=due, state=state, on_step=watch, decide=decide)
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
    simulation = Simulation(str(workspace.root), local[0] if local else str(start), local[-1] if local else str(end),
                            str(every), local, campaigns, weeks, binding, most,
                            customers=len(tables.customers) if tables is not None else decide.customers,
                            offers=offers.drop(columns=["week"]))
    if workspace.program.stored_tiers:
        history = pd.concat(state.tier_log, ignore_index=True) if state.tier_log else \
            empty_states(["as_of", *MOVE_COLUMNS])
        simulation.tier_history = history
        simulation.tier_moves = move_counts(TierRules.of(workspace.program, workspace.settings.timezone), history)
    return simulation


def _money(value) -> float:
    return round(float(value), 2)


def compare(before_sim: Simulation, after_sim: Simulation) -> list[dict]:
    """Per campaign: offers and cost before (the rules given with --diff) and after (this
    workspace's rules), as in ``preview --diff``."""
    before = {c.id: c for c in before_sim.campaigns}
    after = {c.id: c for c in after_sim.campaigns}
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


def _table(headers: list[str], rows: list[list[str]], first_left: bool = True) -> list[str]:
    """Text columns as wide as their widest cell (wide characters count twice): nothing spills
    into the next column however long a campaign id or a budget note is."""
    widths = [max(display_width(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths)):
            pad = " " * (width - display_width(cell))
            out.append(cell + pad if i == 0 and first_left else pad + cell)
        return "  ".join(out).rstrip()
    return [line(headers)] + [line(row) for row in rows]


def format_text(sim: Simulation) -> str:
    """The forecast as the terminal tables `loyalty simulate` prints."""
    start = f"Continued from {sim.earlier_runs} recorded run(s), the last at {sim.last_run}" \
        if sim.earlier_runs else "Started from scratch (no run recorded before the first step)"
    lines = [f"Simulated {len(sim.steps)} runs from {sim.start} to {sim.end} (every {sim.every}) "
             f"for {sim.customers} customers in {sim.seconds:.1f} s: "
             f"{sim.total_offers} offers, cost {sim.total_cost:,.2f}",
             f"{start}; the state database was not changed.", ""]
    lines += _table(["campaign", "offers", "cost", "discounts", "points", "budget bound"],
                    [[c.id, str(c.offers), f"{c.cost:,.2f}", f"{c.discount_value:,.2f}", f"{c.points:,.0f}",
                      f"{c.budget_bound_runs} runs (-{c.lost_to_budget})" if c.budget_bound_runs else "-"]
                     for c in sim.campaigns])
    if sim.weeks:
        per_week: dict[str, list[float]] = {}
        for row in sim.weeks:
            total = per_week.setdefault(row["week"], [0, 0.0, 0.0])
            total[0] += row["offers"]
            total[1] += row["cost"]
            total[2] += row["points"]
        lines += [""] + _table(["week", "offers", "cost", "points"],
                               [[week, str(offers), f"{cost:,.2f}", f"{points:,.0f}"]
                                for week, (offers, cost, points) in per_week.items()])
    if sim.tier_moves is not None:
        lines += ["", tier_moves_line(sim.tier_moves, "Tier moves over the simulation")]
    if sim.top_customers:
        lines += ["", "Contacted most:"]
        lines += [f"  {c['customer_id']}: {c['offers']} offers ({', '.join(c['campaigns'])})"
                  for c in sim.top_customers[:10]]
    if sim.diff is not None:
        lines += ["", "Before: the rules given with --diff; after: this workspace's rules."]
        lines += _table(["campaign", "offers before -> after", "cost before -> after", "change"],
                        [[d["campaign"], f"{d['offers_before']} -> {d['offers_after']}",
                          f"{d['cost_before']:,.2f} -> {d['cost_after']:,.2f}", f"{d['cost_change']:+,.2f}"]
                         for d in sim.diff])
    return "\n".join(lines)
