"""Dry-run previews: who would be targeted, how many, why, what they would read, at what cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .evaluation import STAGES, Evaluation, segment_mask
from .model import Workspace
from .pipeline import plain_value


@dataclass
class CampaignPreview:
    id: str
    name: str
    channel: str
    funnel: dict[str, int]
    offers: int
    cost: float
    variants: dict[str, int] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    sms_too_long: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Preview:
    as_of: str
    customers: int
    campaigns: list[CampaignPreview]
    warnings: list[str] = field(default_factory=list)
    explanation: dict | None = None
    diff: list[dict] | None = None

    @property
    def total_offers(self) -> int:
        return sum(c.offers for c in self.campaigns)

    @property
    def total_cost(self) -> float:
        return round(sum(c.cost for c in self.campaigns), 2)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["total_offers"] = self.total_offers
        data["total_cost"] = self.total_cost
        return data


@dataclass
class CampaignTotals:
    """One campaign's offers counted: how many, their cost, how many of each variant."""

    offers: int = 0
    cost: float = 0.0
    variants: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "CampaignTotals") -> "CampaignTotals":
        variants = dict(self.variants)
        for name, count in other.variants.items():
            variants[name] = variants.get(name, 0) + count
        return CampaignTotals(self.offers + other.offers, self.cost + other.cost, variants)


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
        totals[campaign_id] = CampaignTotals(len(mine), float(mine["cost"].sum()),
                                             {str(k): int(v) for k, v in variants.items()})
    return totals


@dataclass
class SampledEvaluation(Evaluation):
    """An evaluation that kept only what a preview shows: ``offers`` holds (at least) each
    campaign's first offers by customer id, the messages to render; ``totals`` counts
    all of them."""

    totals: dict[str, CampaignTotals] = field(default_factory=dict)


def summarise(workspace: Workspace, evaluation: Evaluation, customers: int,
              samples: list[dict], render_errors: list[dict], warnings: list[str],
              totals: dict[str, CampaignTotals] | None = None) -> Preview:
    """The preview of an evaluation. ``totals``: the campaigns' offer counts, costs and
    variants when ``evaluation.offers`` does not hold every offer (None: counted from it)."""
    if totals is None:
        totals = campaign_totals(evaluation.offers, list(evaluation.funnels))
    campaigns = []
    for campaign_id, funnel in evaluation.funnels.items():
        campaign = workspace.program.campaigns[campaign_id]
        mine = totals.get(campaign_id) or CampaignTotals()
        variants = mine.variants if campaign.variants else {}
        own_samples = [s for s in samples if s["campaign"] == campaign_id]
        campaigns.append(CampaignPreview(
            id=campaign_id, name=campaign.name, channel=campaign.channel,
            funnel={stage: int(funnel[stage]) for stage in STAGES}, offers=int(funnel["offers"]),
            cost=round(mine.cost, 2),
            variants={k: int(v) for k, v in sorted(variants.items())},
            samples=[_sample(s) for s in own_samples],
            sms_too_long=sum(1 for s in own_samples if s.get("too_long")),
            errors=[e["error"] for e in render_errors if e["campaign"] == campaign_id][:3]))
    return Preview(evaluation.as_of.isoformat(), customers, campaigns, warnings)


def _sample(record: dict) -> dict:
    keys = ("customer_id", "variant", "locale", "send_at", "subject", "body", "sms_segments", "too_long")
    sample = {k: record.get(k) for k in keys}
    sample["reward"] = record["reward"].get("description")
    sample["why"] = record.get("explanation", {})
    return sample


def sample_rows(offers: pd.DataFrame, per_campaign: int) -> pd.DataFrame:
    """The first N offers of each campaign (by customer id): the messages a preview renders."""
    if per_campaign <= 0 or offers.empty:
        return offers.iloc[0:0]
    return offers.groupby("campaign", sort=True, group_keys=False).head(per_campaign)


def explain_customer(workspace: Workspace, evaluation: Evaluation, features: pd.DataFrame,
                     customer_id: str) -> dict:
    """Every stage and every condition's value for one customer, per campaign."""
    ids = features["customer_id"].astype(str)
    matches = np.flatnonzero(ids.to_numpy() == str(customer_id))
    if len(matches) == 0:
        return {"customer_id": customer_id, "found": False, "campaigns": []}
    position = int(matches[0])
    as_of = evaluation.as_of
    program = workspace.program
    stops = evaluation.stopped_at(position)
    got = evaluation.offers[evaluation.offers["pos"] == position] if len(evaluation.offers) else evaluation.offers
    result = []
    for campaign_id in evaluation.funnels:
        campaign = program.campaigns[campaign_id]
        conditions = []
        if campaign.segment:
            conditions += _explain(program.segments[campaign.segment].where, features, position, as_of,
                                   f"segment {campaign.segment}")
        for name in campaign.exclude:
            conditions += _explain(program.segments[name].where, features, position, as_of,
                                   f"exclude {name}")
        if campaign.where is not None:
            conditions += _explain(campaign.where, features, position, as_of, "where")
        if campaign.trigger.expr is not None:
            conditions += _explain(campaign.trigger.expr, features, position, as_of, "becomes")
        in_segment = bool(segment_mask(workspace, campaign, features.iloc[[position]].reset_index(drop=True),
                                       as_of)[0])
        mine = got[got["campaign"] == campaign_id] if len(got) else got
        if len(mine):
            outcome, stage = "offer", "offers"
        elif not in_segment:
            outcome, stage = "not in segment", "segment"
        else:
            stage = stops.get(campaign_id, "trigger")
            outcome = f"stopped at {stage}"
        result.append({"campaign": campaign_id, "name": campaign.name, "outcome": outcome,
                       "stage": stage, "trigger": campaign.trigger.kind, "conditions": conditions,
                       "variant": str(mine["variant"].iloc[0]) if len(mine) else None})
    row = features.iloc[position]
    interesting = ["tier", "days_since_last_order", "orders_365d", "monetary_365d", "lifetime_spend",
                   "rfm_score", "days_to_birthday", "last_nps_score", "complaints_90d"]
    return {"customer_id": customer_id, "found": True,
            "features": {k: _plain(row[k]) for k in interesting if k in row.index},
            "campaigns": result}


def _plain(value):
    value = plain_value(value)
    return value.isoformat() if isinstance(value, pd.Timestamp) else value


def _explain(expression, features, position, as_of, label) -> list[dict]:
    return [{"where": label, "expression": text, "value": _plain(value)}
            for text, value in expression.explain(features, position, as_of)]


def diff_offers(mine: Evaluation, other: Evaluation, examples: int = 5) -> list[dict]:
    """Per campaign: customers the other version of the rules adds and removes."""
    out = []
    campaigns = sorted(set(mine.funnels) | set(other.funnels))
    for campaign in campaigns:
        a = set(mine.offers.loc[mine.offers["campaign"] == campaign, "customer_id"]) if len(mine.offers) else set()
        b = set(other.offers.loc[other.offers["campaign"] == campaign, "customer_id"]) if len(other.offers) else set()
        added, removed = sorted(b - a), sorted(a - b)
        out.append({"campaign": campaign, "before": len(a), "after": len(b),
                    "added": len(added), "removed": len(removed),
                    "added_examples": added[:examples], "removed_examples": removed[:examples],
                    "only_in": "before" if campaign not in other.funnels else
                               ("after" if campaign not in mine.funnels else None)})
    return out
