"""Offers counted per campaign: how many, their cost and variants; the rows a preview renders.

Totals of separate sets of offers (partitions, cluster tasks) add up with ``+``, so an
engine that never gathers every offer in one place can still report them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from engine.decide.evaluation import Evaluation


class OfferTotals:
    """``total_offers`` and ``total_cost`` of a result whose ``campaigns`` each have ``offers``
    and ``cost`` (a preview, a simulation); ``with_totals`` adds both to its JSON form."""

    campaigns: list

    @property
    def total_offers(self) -> int:
        return sum(c.offers for c in self.campaigns)

    @property
    def total_cost(self) -> float:
        return round(sum(c.cost for c in self.campaigns), 2)

    def with_totals(self, data: dict) -> dict:
        data["total_offers"] = self.total_offers
        data["total_cost"] = self.total_cost
        return data


@dataclass
class CampaignTotals:
    """One campaign's offers counted: how many, their cost, how many of each variant, how many
    of them are rewards granted without a message (consent or the frequency cap), and (tier
    rewards with stored tiers) how many move the member up to each tier."""

    offers: int = 0
    cost: float = 0.0
    variants: dict[str, int] = field(default_factory=dict)
    granted_without_message: int = 0
    tier_up: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "CampaignTotals") -> "CampaignTotals":
        return CampaignTotals(self.offers + other.offers, self.cost + other.cost,
                              _added(self.variants, other.variants),
                              self.granted_without_message + other.granted_without_message,
                              _added(self.tier_up, other.tier_up))


def _added(left: dict[str, int], right: dict[str, int]) -> dict[str, int]:
    total = dict(left)
    for name, count in right.items():
        total[name] = total.get(name, 0) + count
    return total


def campaign_totals(offers: pd.DataFrame, campaign_ids) -> dict[str, CampaignTotals]:
    """Per campaign, its offers' count, cost and variants; totals of separate sets of
    offers (partitions) add up with ``+`` to those of all of them."""
    totals = {}
    for campaign_id in campaign_ids:
        mine = offers[offers["campaign"] == campaign_id] if len(offers) else offers
        if not len(mine):
            totals[campaign_id] = CampaignTotals()
            continue
        variants = mine["variant"].value_counts().to_dict()
        granted = int((mine["no_message"] != "").sum()) if "no_message" in mine else 0
        ups = mine["tier_up"] if "tier_up" in mine else pd.Series(dtype=object)
        ups = ups[ups.astype(str) != ""].value_counts().to_dict()
        totals[campaign_id] = CampaignTotals(len(mine), float(mine["cost"].sum()),
                                             {str(k): int(v) for k, v in variants.items()}, granted,
                                             {str(k): int(v) for k, v in ups.items()})
    return totals


@dataclass
class SampledEvaluation(Evaluation):
    """An evaluation that kept only what a preview shows: ``offers`` holds (at least) each
    campaign's first offers by customer id, the messages to render; ``totals`` counts
    all of them."""

    totals: dict[str, CampaignTotals] = field(default_factory=dict)


def sample_rows(offers: pd.DataFrame, per_campaign: int) -> pd.DataFrame:
    """The first N offers of each campaign (by customer id): the messages a preview renders."""
    if per_campaign <= 0 or offers.empty:
        return offers.iloc[0:0]
    return offers.groupby("campaign", sort=True, group_keys=False).head(per_campaign)
