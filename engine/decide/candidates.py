"""Candidates and arbitration: the firings that passed the contact policy and holdouts, made
ready for the choices across campaigns, and who keeps which.

``candidate_frame`` gives each of a campaign's firings what arbitration and budgets need: the
A/B variant, the reward's estimated cost and points, template, locale, budget rank and a
stable tiebreak (and, for a tier reward with stored tiers, ``tier_up``: the tier it moves the
member up to, "" when it moves nobody). ``arbitrate`` keeps at most ``max_offers_per_run`` offers per customer (and no
more messages than the frequency cap leaves): highest priority first, then campaign id.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.config.model import CampaignDef, LoadedWorkspace
from engine.data.tiers import TierRules
from engine.decide.assignment import assign_variants, stable_fraction
from engine.decide.rewards import estimate_cost, points_for


def candidate_frame(workspace: LoadedWorkspace, campaign: CampaignDef, features: pd.DataFrame, positions: np.ndarray,
                    keys: np.ndarray, events: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """The candidates of one campaign: the customers at ``positions`` of ``features`` with their
    firing ``keys`` and ``event.*`` values, each with a variant, the reward's cost and points,
    template, locale, budget rank and tiebreak (``pos`` indexes ``features``)."""
    settings = workspace.settings
    scope = features[_scope_columns(campaign, features)].iloc[positions].reset_index(drop=True)
    if len(events.columns):
        scope = pd.concat([scope, events], axis=1)
    customer_ids = scope["customer_id"].astype(str)
    frame = pd.DataFrame({
        "pos": positions, "customer_id": customer_ids.to_numpy(), "campaign": campaign.id,
        "firing_key": keys, "priority": campaign.priority, "channel": campaign.channel,
    })
    if campaign.variants:
        names = [v.name for v in campaign.variants]
        frame["variant"] = assign_variants(customer_ids, settings.salt, campaign.id, names,
                                           [v.weight for v in campaign.variants])
    else:
        frame["variant"] = ""
    cost = np.zeros(len(frame))
    points = np.zeros(len(frame))
    tier_up = np.full(len(frame), "", dtype=object)
    template = np.full(len(frame), campaign.template, dtype=object)
    kind = np.full(len(frame), campaign.reward.kind, dtype=object)
    groups = [(None, campaign.reward, campaign.template)] + [
        (v.name, v.reward or campaign.reward, v.template or campaign.template) for v in campaign.variants]
    for name, reward, template_name in groups:
        rows = np.ones(len(frame), dtype=bool) if name is None else (frame["variant"] == name).to_numpy()
        if not rows.any():
            continue
        sub = scope[rows]
        cost[rows] = estimate_cost(reward, sub, settings, as_of)
        points[rows] = points_for(reward, sub, as_of)
        template[rows] = template_name
        kind[rows] = reward.kind
        if reward.kind == "tier" and workspace.program.stored_tiers:
            tier_up[rows] = _upgrades(workspace, reward.params["to"], sub)
    frame["cost"] = cost
    frame["points"] = points
    frame["tier_up"] = tier_up
    frame["template"] = template
    frame["reward_kind"] = kind
    if "locale" in scope:
        frame["locale"] = scope["locale"].astype("object").where(scope["locale"].notna(),
                                                                 settings.default_locale).to_numpy()
    else:
        frame["locale"] = settings.default_locale
    rank = campaign.budget.rank_by
    frame["rank"] = _rank_values(rank.evaluate(scope, as_of)) if rank is not None else np.nan
    frame["tiebreak"] = stable_fraction(customer_ids, settings.salt, f"budget:{campaign.id}")
    frame["timezone"] = scope["timezone"].to_numpy(dtype=object) if "timezone" in scope else settings.timezone
    for column in events.columns:
        frame[column] = events[column].to_numpy()
    return frame


def _rank_per_customer(pos: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
    """For rows sorted by customer (``pos``), each row's place among its customer's rows, 0
    first; with ``counted``, among the customer's counted rows (meaningful for those rows)."""
    size = len(pos)
    if not size:
        return np.zeros(0, dtype=np.int64)
    steps = np.ones(size, dtype=np.int64) if counted is None else counted.astype(np.int64)
    running = np.cumsum(steps)
    starts = np.flatnonzero(np.concatenate([[True], pos[1:] != pos[:-1]]))
    before = (running - steps)[starts]          # counted rows before each customer's first
    return running - np.repeat(before, np.diff(np.append(starts, size))) - 1


def _upgrades(workspace: LoadedWorkspace, to: str, scope: pd.DataFrame) -> np.ndarray:
    """``to`` where a tier reward moves the member up from their (stored) tier, else ""."""
    rules = TierRules.of(workspace.program, workspace.settings.timezone)
    held = rules.rank(scope["tier"].astype(object).where(scope["tier"].notna(), None).to_numpy(dtype=object))
    return np.where(rules.rank([to])[0] < held, to, "").astype(object)


def _scope_columns(campaign: CampaignDef, features: pd.DataFrame) -> list[str]:
    """The feature columns an offer's reward, cost, budget rank, locale and tier move read: taking
    only these for the fired customers, not every feature, is most of the candidates' cost."""
    needed = {"customer_id", "locale", "timezone", "avg_order_value", "tier"}
    for reward in [campaign.reward, *(v.reward for v in campaign.variants if v.reward is not None)]:
        if reward.amount is not None:
            needed |= reward.amount.names
    if campaign.budget.rank_by is not None:
        needed |= campaign.budget.rank_by.names
    return [name for name in features.columns if name in needed]


def _rank_values(values: pd.Series) -> np.ndarray:
    """``rank_by`` as floats (dates as their instant), NaN where unknown."""
    missing = values.isna().to_numpy()
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        values = pd.Series(values.to_numpy(dtype="datetime64[ns]").view(np.int64), index=values.index)
    numbers = pd.to_numeric(values, errors="coerce").astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    numbers[missing] = np.nan
    return numbers


def arbitrate(candidates: list[pd.DataFrame], capacity: np.ndarray, per_run: int, funnels) -> pd.DataFrame:
    """At most ``per_run`` offers per customer, of which at most ``capacity`` messages (what
    the frequency cap leaves): highest priority, then campaign id, then key. An offer granted
    without a message takes a place of the run but none of the cap."""
    if not candidates:
        return pd.DataFrame(columns=["pos", "customer_id", "campaign", "firing_key", "priority", "channel",
                                     "variant", "cost", "points", "tier_up", "template", "reward_kind", "locale",
                                     "first_as_of", "reentered", "no_message"])
    frame = pd.concat(candidates, ignore_index=True)
    # a customer has at most one candidate per campaign: position, priority and campaign order
    # them; who keeps what is worked out on the sorted numbers, then the rows are taken once
    campaign_rank = pd.Index(sorted(frame["campaign"].unique())).get_indexer(frame["campaign"])
    order = np.lexsort((campaign_rank, -frame["priority"].to_numpy(dtype=np.int64),
                        frame["pos"].to_numpy(dtype=np.int64)))
    pos = frame["pos"].to_numpy(dtype=np.int64)[order]
    message = (frame["no_message"] == "").to_numpy(dtype=bool)[order]
    if message.all():
        keep = _rank_per_customer(pos) < capacity[pos]
    else:
        # messages beyond what the cap leaves never go; then the run's places, in the same order
        keep = ~message | (_rank_per_customer(pos, message) < capacity[pos])
        keep &= _rank_per_customer(pos, keep) < per_run
    frame = frame.take(order[keep])
    counts = frame["campaign"].value_counts()
    for campaign, funnel in funnels.items():
        funnel["arbitration"] = int(counts.get(campaign, 0))
    return frame
