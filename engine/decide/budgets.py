"""Budgets: what a campaign may hand out in a run, a day, a week, a month or its whole life.

A budget keeps the candidates in one order (rank_by, then a stable hash of the customer),
up to ``max_offers`` and while the running cost stays within ``max_cost``. With ``per``
longer than a run, what earlier runs of the same period recorded counts against it
(``RunContext.budget_used``, read from the state or from a simulation's memory). Periods
are calendar periods in the programme's timezone; a week starts on Monday.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.data.keys import sort_order

BUDGET_PERIODS = ("run", "day", "week", "month", "campaign")


def period_start(as_of: pd.Timestamp, per: str, timezone: str) -> pd.Timestamp | None:
    """The first instant of the budget period holding ``as_of`` (None for ``run``, which counts
    nothing from earlier runs; the earliest instant for ``campaign``, its whole life)."""
    if per == "run":
        return None
    if per == "campaign":
        return pd.Timestamp("1970-01-01", tz="UTC")
    day = as_of.tz_convert(timezone).normalize()
    if per == "week":
        day = day - pd.Timedelta(days=day.weekday())
    elif per == "month":
        day = day.replace(day=1)
    return pd.Timestamp(day.tz_localize(None)).tz_localize(timezone, ambiguous=False, nonexistent="shift_forward")


def budget_periods(workspace: LoadedWorkspace, as_of: pd.Timestamp) -> dict[str, pd.Timestamp]:
    """Campaign -> the start of its budget's period at ``as_of``, for budgets longer than a run."""
    starts = {}
    for campaign in workspace.program.campaigns.values():
        start = period_start(as_of, campaign.budget.per, workspace.settings.timezone)
        if start is not None and (campaign.budget.max_offers is not None or campaign.budget.max_cost is not None):
            starts[campaign.id] = start
    return starts


BUDGET_KEY = ["rank", "tiebreak", "firing_key"]


def budget_sorted(group: pd.DataFrame) -> pd.DataFrame:
    """Candidates in the order a budget keeps them: rank_by (highest first, missing last),
    then the stable hash of the customer, then the firing key."""
    return group.take(sort_order(group, list(zip(BUDGET_KEY, (False, True, True)))))


def budget_caps(workspace: LoadedWorkspace, used: Mapping[str, tuple[int, float]] | None = None
                ) -> dict[str, tuple[int | None, float | None]]:
    """Campaign -> (max_offers, max_cost) left for this run, of every campaign with a budget:
    its limits less what earlier runs of the budget's period ``used`` (campaign -> offers, cost)."""
    used = used or {}
    caps = {}
    for c in workspace.program.campaigns.values():
        if c.budget.max_offers is None and c.budget.max_cost is None:
            continue
        offers, cost = used.get(c.id, (0, 0.0))
        caps[c.id] = (None if c.budget.max_offers is None else max(0, c.budget.max_offers - int(offers)),
                      None if c.budget.max_cost is None else max(0.0, c.budget.max_cost - float(cost)))
    return caps


def within_budgets(arbitrated: pd.DataFrame, caps: dict) -> pd.DataFrame:
    """One partition's arbitrated candidates without those its campaign's budget cannot keep
    whatever the other partitions hold: beyond max_offers in the budget order, or past
    max_cost in its running cost (when costs are never negative, what a budget keeps is a
    prefix of the order). Applying the budgets to the pooled rest decides the same.
    ``caps``: ``budget_caps(workspace)``."""
    if not len(arbitrated) or not caps:
        return arbitrated
    keep = np.ones(len(arbitrated), dtype=bool)
    campaign = arbitrated["campaign"].to_numpy()
    for campaign_id, (max_offers, max_cost) in caps.items():
        rows = np.flatnonzero(campaign == campaign_id)
        if not len(rows):
            continue
        ordered = rows[budget_sorted(arbitrated.iloc[rows].reset_index(drop=True)).index.to_numpy()]
        cut = np.zeros(len(ordered), dtype=bool)
        if max_offers is not None:
            cut |= np.arange(len(ordered)) >= max_offers
        costs = arbitrated["cost"].to_numpy(dtype=float)[ordered]
        if max_cost is not None and (costs >= 0).all():
            cut |= np.cumsum(costs) > max_cost + 1e-9
        keep[ordered[cut]] = False
    return arbitrated if keep.all() else arbitrated[keep]


def apply_budgets(offers: pd.DataFrame, funnels, caps: Mapping[str, tuple[int | None, float | None]]
                  ) -> pd.DataFrame:
    """Each campaign's budget (``caps``: what is left of max_offers / max_cost) over all its
    arbitrated candidates: who keeps an offer is decided by rank_by (highest first), then by a
    stable hash of the customer id; the funnels' budget and offers stages are set."""
    kept = []
    for campaign_id, group in offers.groupby("campaign", sort=True):
        if campaign_id in caps:
            max_offers, max_cost = caps[campaign_id]
            group = budget_sorted(group)
            keep = np.ones(len(group), dtype=bool)
            if max_offers is not None:
                keep &= np.arange(len(group)) < max_offers
            if max_cost is not None:
                keep &= np.cumsum(group["cost"].to_numpy()) <= max_cost + 1e-9
            group = group[keep]
        funnels[campaign_id]["budget"] = len(group)
        funnels[campaign_id]["offers"] = len(group)
        kept.append(group)
    if not kept:
        return offers.iloc[0:0]
    result = pd.concat(kept)
    result = result.take(sort_order(result, [("campaign", True), ("customer_id", True), ("firing_key", True)]))
    return result.reset_index(drop=True)
