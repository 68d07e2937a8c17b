"""Dry-run previews: who would be targeted, how many, why, what they would read, at what cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from engine.app.trace import write_trace
from engine.app.validation import check_campaigns, load_workspace
from engine.config.model import LoadedWorkspace
from engine.data.tiers import TierRules, add_counts, move_counts
from engine.decide.evaluation import STAGES, Evaluation, evaluate, segment_mask
from engine.decide.totals import CampaignTotals, OfferTotals, SampledEvaluation, campaign_totals, sample_rows
from engine.execution.pipeline import build_messages, decide, parse_as_of, prepare, run_context
from engine.messages.offers import explained_value, make_renderer
from engine.progress import Progress
from engine.state.database import storage_failures
from engine.state.store import StateStore, open_store


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
    pending: int = 0                  # firings stopped by earlier runs that came back (in the funnel's trigger)
    granted_without_message: int = 0  # offers whose reward is given though no message can be sent


@dataclass
class Preview(OfferTotals):
    as_of: str
    customers: int
    campaigns: list[CampaignPreview]
    warnings: list[str] = field(default_factory=list)
    explanation: dict | None = None
    diff: list[dict] | None = None
    shown: list[str] | None = None    # --campaign: only these are shown, decided with every campaign
    # stored tiers: members this run would move up into, down into and join each tier (None: computed tiers)
    tier_moves: dict | None = None

    def as_dict(self) -> dict:
        return self.with_totals(asdict(self))


def summarise(workspace: LoadedWorkspace, evaluation: Evaluation, customers: int,
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
            errors=[e["error"] for e in render_errors if e["campaign"] == campaign_id][:3],
            pending=int(evaluation.reentered.get(campaign_id, 0)),
            granted_without_message=int(mine.granted_without_message)))
    return Preview(evaluation.as_of.isoformat(), customers, campaigns, warnings)


def _sample(record: dict) -> dict:
    keys = ("customer_id", "variant", "locale", "send_at", "subject", "body", "sms_segments", "too_long")
    sample = {k: record.get(k) for k in keys}
    sample["reward"] = record["reward"].get("description")
    sample["why"] = record.get("explanation", {})
    return sample


def explain_customer(workspace: LoadedWorkspace, evaluation: Evaluation, features: pd.DataFrame,
                     customer_id: str, pending: pd.DataFrame | None = None) -> dict:
    """Every stage and every condition's value for one customer, per campaign; with the
    firings of earlier runs still ``pending`` (``RunContext.pending``), since when and what
    stopped them, and which of this run's firings start to wait."""
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
        elif campaign_id in stops:      # stopped after firing (a pending firing is not checked for the segment)
            stage = stops[campaign_id]
            outcome = f"stopped at {stage}"
        elif not in_segment:
            outcome, stage = "not in segment", "segment"
        else:
            outcome, stage = "stopped at trigger", "trigger"
        waited = _waited(pending, evaluation, campaign_id, str(customer_id))
        silent = str(mine["no_message"].iloc[0]) if len(mine) and "no_message" in mine else ""
        notes = [f"granted without a message (stopped by {silent.replace('_', ' ')})"] if silent else []
        notes += waited.pop("notes", [])
        result.append({"campaign": campaign_id, "name": campaign.name, "outcome": outcome,
                       "stage": stage, "trigger": campaign.trigger.kind, "conditions": conditions,
                       "variant": str(mine["variant"].iloc[0]) if len(mine) else None,
                       "note": "; ".join(notes), **waited})
    row = features.iloc[position]
    interesting = ["tier", "days_since_last_order", "orders_365d", "monetary_365d", "lifetime_spend",
                   "rfm_score", "days_to_birthday", "last_nps_score", "complaints_90d"]
    if program.stored_tiers:
        interesting.insert(1, "tier_since")
    return {"customer_id": customer_id, "found": True,
            "features": {k: explained_value(row[k]) for k in interesting if k in row.index},
            "campaigns": result}


def _waited(pending: pd.DataFrame | None, evaluation: Evaluation, campaign: str, customer_id: str) -> dict:
    """What the customer's firings of ``campaign`` that wait tell (``notes``): pending since …
    (stopped by …) for one of earlier runs, and whether one starts or goes on waiting in this run."""
    found: dict = {"notes": []}
    zone = evaluation.as_of.tz
    if pending is not None and len(pending):
        mine = pending[(pending["campaign"] == campaign) & (pending["customer_id"].astype(str) == customer_id)]
        if len(mine):
            row = mine.iloc[0]
            since = pd.Timestamp(row["first_as_of"]).tz_convert(zone).isoformat()
            found["pending"] = {"since": since, "reason": row["reason"], "firing_key": row["firing_key"],
                                "expires_at": pd.Timestamp(row["expires_at"]).tz_convert(zone).isoformat()}
            found["notes"].append(f"pending since {since} (stopped by {row['reason'].replace('_', ' ')})")
    outcomes = evaluation.pending
    if len(outcomes):
        now = outcomes[(outcomes["campaign"] == campaign) & (outcomes["customer_id"].astype(str) == customer_id)]
        for row in now.itertuples():
            if row.status == "pending":
                until = pd.Timestamp(row.expires_at).tz_convert(zone).isoformat()
                found["notes"].append(f"waits until {until} for a later run")
            elif row.status == "expired":
                found["notes"].append("expired, never offered")
    return found


def _explain(expression, features, position, as_of, label) -> list[dict]:
    return [{"where": label, "expression": text, "value": explained_value(value)}
            for text, value in expression.explain(features, position, as_of)]


def _offered(evaluation: Evaluation, campaign: str) -> tuple[set, float]:
    """The customers one campaign makes an offer to, and the offers' cost."""
    offers = evaluation.offers
    if not len(offers):
        return set(), 0.0
    mine = offers[offers["campaign"] == campaign]
    return set(mine["customer_id"]), float(mine["cost"].sum())


def diff_offers(before: Evaluation, after: Evaluation, examples: int = 5) -> list[dict]:
    """Per campaign, going from ``before`` (the other version of the rules, given with --diff)
    to ``after`` (the workspace previewed): offers and cost on each side, and the customers
    the change adds and removes."""
    out = []
    for campaign in sorted(set(before.funnels) | set(after.funnels)):
        (a, cost_a), (b, cost_b) = _offered(before, campaign), _offered(after, campaign)
        added, removed = sorted(b - a), sorted(a - b)
        out.append({"campaign": campaign, "before": len(a), "after": len(b),
                    "cost_before": round(cost_a, 2), "cost_after": round(cost_b, 2),
                    "cost_change": round(cost_b - cost_a, 2),
                    "added": len(added), "removed": len(removed),
                    "added_examples": added[:examples], "removed_examples": removed[:examples],
                    "only_in": "before" if campaign not in after.funnels else
                               ("after" if campaign not in before.funnels else None)})
    return out


# --------------------------------------------------------------------------- the preview command


def preview(root: Path | str, as_of=None, *, campaigns: list[str] | None = None,
            customer: str | None = None, diff: Path | str | None = None, sample: int = 3,
            since=None, trace: bool = False, partitions: int | None = None,
            engine: str | None = None, scheduler: str | None = None,
            progress: Progress | None = None, workers: int | None = None) -> Preview:
    """A dry run at ``as_of``: funnels, offers, cost, sample messages. Never writes state.

    ``partitions``: evaluate that many partitions of customers one after the other
    (None: chosen from the data size and free memory); the result is the same.
    ``workers``: how many processes decide at once with the local engine (``parallel``).
    ``engine``/``scheduler``: where to evaluate (``pipeline.decide``). ``trace``: keep every
    customer's stopping stage, for ``write_preview_trace``."""
    workspace = load_workspace(root)
    as_of = parse_as_of(as_of, workspace.settings.timezone)
    since_ts = parse_as_of(since, workspace.settings.timezone) if since is not None else None
    check_campaigns(workspace, campaigns)
    store = open_store(workspace.settings.state_path, create=False)
    try:     # open until the end: --diff evaluates the other rules against the same history
        with storage_failures(store.label if store is not None else "", "read"):
            return _preview(workspace, as_of, store, since_ts, campaigns, customer, diff, sample, trace,
                            partitions, engine, scheduler, progress, workers)
    finally:
        if store is not None:
            store.close()


def _preview(workspace: LoadedWorkspace, as_of: pd.Timestamp, store: StateStore | None, since_ts, campaigns,
             customer, diff, sample, trace, partitions, engine, scheduler, progress, workers) -> Preview:
    # every campaign is decided, so that --campaign X shows what X gets within the programme
    # (after arbitration with the others, which it would not see alone)
    prepared, evaluation = decide(workspace, as_of, store, since_ts, None, partitions=partitions,
                                  workers=workers, engine=engine, scheduler=scheduler, progress=progress,
                                  trace=trace or customer is not None, stream=diff is None,
                                  sample=sample if diff is None else None)
    renderer = make_renderer(workspace)
    rows = sample_rows(_only(evaluation.offers, campaigns), sample)
    records, errors = build_messages(workspace, evaluation, prepared.features, renderer, rows)
    warnings = list(prepared.tables.warnings) + evaluation.warnings
    totals = evaluation.totals if isinstance(evaluation, SampledEvaluation) else None
    result = summarise(workspace, evaluation, prepared.customers, records, errors, warnings, totals)
    result.tier_moves = tier_move_counts(workspace, evaluation, totals)
    if campaigns:
        result.shown = list(campaigns)
        result.campaigns = [c for c in result.campaigns if c.id in campaigns]
    if customer is not None:
        result.explanation = explain_customer(workspace, evaluation, prepared.features, customer,
                                              prepared.context.pending)
    if diff is not None:
        other = load_workspace(diff)
        context = prepared.context
        if store is not None and other.program.stored_tiers:     # the other rules' tiers from the same state
            recorded = run_context(other, as_of, store, since_ts)
            context = replace(context, points=recorded.points, tiers=recorded.tiers)
        other_prepared = prepare(other, as_of, tables=prepared.tables if _same_data(workspace, other) else None,
                                 context=context)
        other_eval = evaluate(other, other_prepared.tables, other_prepared.features, context)
        result.diff = [row for row in diff_offers(other_eval, evaluation)
                       if not campaigns or row["campaign"] in campaigns]
    result._evaluation = evaluation  # for --trace export and tests
    result._features = prepared.features
    return result


def tier_move_counts(workspace: LoadedWorkspace, evaluation: Evaluation,
                     totals: dict[str, CampaignTotals] | None = None) -> dict | None:
    """What a run at this instant would move: the stored tiers' own moves (qualifying, reviews,
    trials) and the tier rewards that move a member up; None with computed tiers."""
    if not workspace.program.stored_tiers:
        return None
    totals = totals if totals is not None else campaign_totals(evaluation.offers, list(evaluation.funnels))
    rewards = {"up": {}}
    for total in totals.values():
        rewards = add_counts(rewards, {"up": total.tier_up})
    rules = TierRules.of(workspace.program, workspace.settings.timezone)
    counts = add_counts(move_counts(rules, evaluation.tier_moves), rewards)
    return {kind: dict(sorted(found.items(), key=lambda item: rules.rank([item[0]])[0]))
            for kind, found in counts.items()}


def _only(offers: pd.DataFrame, campaigns: list[str] | None) -> pd.DataFrame:
    return offers if not campaigns or not len(offers) else offers[offers["campaign"].isin(campaigns)]


def _same_data(a: LoadedWorkspace, b: LoadedWorkspace) -> bool:
    return dict(a.settings.data) == dict(b.settings.data)


def write_preview_trace(result: Preview, path: Path | str) -> int:
    """Write the decision trace of a preview made with ``trace=True`` (Parquet or CSV by the
    file's extension); return the number of rows."""
    return write_trace(result._evaluation, result._features, path)
