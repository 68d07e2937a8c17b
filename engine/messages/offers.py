"""Offers turned into messages: each offer's reward, customer fields and rendered text.

``render_offers`` builds the record the state store keeps and delivery sends; the
execution layer decides how many processes run it at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.decide.evaluation import Evaluation
from engine.decide.rewards import reward_payload
from engine.errors import TemplateError
from engine.messages.rendering import Renderer, money_in
from engine.state.offers import meaning_hash, reward_meaning


def make_renderer(workspace: LoadedWorkspace) -> Renderer:
    settings = workspace.settings
    return Renderer(workspace.templates_dir, settings.default_locale,
                    {"name": settings.name, "currency": settings.currency, "timezone": settings.timezone})


def plain_value(value):
    """A pandas/numpy scalar as a plain Python value; missing values as None."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def customer_records(features: pd.DataFrame, positions) -> list[dict]:
    """Customer columns and features of the given rows, as plain dicts for templates."""
    return _plain_records(features.iloc[np.asarray(positions, dtype=int)])


def _plain_records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts of plain Python values (missing values as None), built a column at a time."""
    names = [str(name) for name in frame.columns]
    columns = [_plain_column(frame.iloc[:, i]) for i in range(frame.shape[1])]
    return [dict(zip(names, values)) for values in zip(*columns)]


def _plain_column(column: pd.Series) -> list:
    values = column.tolist()
    if column.dtype == object:
        return [plain_value(v) for v in values]
    missing = np.flatnonzero(column.isna().to_numpy())
    for i in missing:
        values[i] = None
    return values


def render_offers(workspace: LoadedWorkspace, evaluation: Evaluation, renderer: Renderer, rows: pd.DataFrame,
                customers: list[dict], send_at: list, codes: dict | None, records: list[dict],
                errors: list[dict]) -> None:
    """Render each offer's message: a record per offer into ``records``, a render error per
    failed offer into ``errors`` (one bad template never stops the others).

    Once the renderer's time for the run is used up, the remaining offers are left out (not
    recorded, so a later run can still make them), with one error per campaign left out.
    A reward granted without a message (``no_message``: no consent or address, or the
    frequency cap) is not rendered: its record has no text and a ``suppressed_reason``.
    """
    settings, program = workspace.settings, workspace.program
    explain_names = _explanation_names(workspace)
    rewards = {(c.id, v.name): v.reward for c in program.campaigns.values() for v in c.variants
               if v.reward is not None}
    as_of = evaluation.as_of.isoformat()
    event_columns = [c for c in rows.columns if c.startswith("event.")]
    left_out: dict[str, int] = {}
    for customer, offer, send_at_local in zip(customers, _offer_records(rows), send_at):
        silent = offer.get("no_message") or None
        if renderer.out_of_time() and not silent:
            left_out[offer["campaign"]] = left_out.get(offer["campaign"], 0) + 1
            continue
        campaign = program.campaigns[offer["campaign"]]
        reward = rewards.get((campaign.id, offer["variant"]), campaign.reward)
        code = (codes or {}).get(offer["offer_id"]) if reward.kind == "coupon" else None
        points = offer["event.points"] if reward.kind == "earned" else offer["points"]
        payload = reward_payload(reward.kind, dict(reward.params), points, send_at_local, code,
                                 offer["locale"], offer["cost"], money_in(settings.currency, offer["locale"]))
        if reward.kind == "coupon" and code is None:
            payload["code"] = "(assigned at run)"
        channel = settings.channels[campaign.channel]
        record = {
            "offer_id": offer["offer_id"], "firing_key": offer["firing_key"], "campaign": campaign.id,
            "campaign_name": campaign.name, "customer_id": offer["customer_id"], "channel": campaign.channel,
            "variant": offer["variant"], "reward": payload, "cost": float(offer["cost"]),
            "send_at": send_at_local.isoformat(), "locale": offer["locale"], "template": offer["template"],
            "address": None if silent else customer.get(channel.address_column), "as_of": as_of,
            "explanation": {n: explained_value(customer.get(n)) for n in explain_names[campaign.id] if n in customer},
            "event": {k[6:]: explained_value(offer[k]) for k in event_columns},
            "suppressed_reason": silent,
        }
        if silent:            # granted without a message: nothing to render or send
            records.append(record)
            continue
        context = {"customer": customer, "reward": payload, "program": renderer.program,
                   "offer": {k: record[k] for k in ("offer_id", "campaign", "campaign_name", "variant",
                                                    "channel", "send_at")},
                   "event": record["event"]}
        try:
            message = renderer.render(offer["template"], campaign.channel, offer["locale"], context,
                                      customer_id=offer["customer_id"])
        except TemplateError as exc:
            errors.append({"campaign": campaign.id, "customer_id": offer["customer_id"], "error": str(exc)})
            continue
        record.update(subject=message.subject, body=message.body, html=message.html,
                      template_file=message.template_file, sms_segments=message.sms_segments,
                      too_long=message.too_long)
        records.append(record)
    errors.extend(out_of_time_error(campaign, count, renderer.max_render_seconds_per_run)
                  for campaign, count in left_out.items())


def unrendered_offers(workspace: LoadedWorkspace, rows: pd.DataFrame, recorded: Mapping[str, str]) -> list[dict]:
    """Offers recorded by an earlier attempt at this ``as_of``, as ``record_run`` compares them
    (``known``) without rendering their messages again: firing key, offer id, campaign,
    customer, payload hash and the payload hash ``recorded`` (firing key -> hash). The
    reward's meaning is worked out once per campaign, variant, cost and points, not once per
    offer."""
    if not len(rows):
        return []
    program = workspace.program
    rewards = {(c.id, v.name): v.reward for c in program.campaigns.values() for v in c.variants
               if v.reward is not None}
    earned = rows["reward_kind"].to_numpy(dtype=object) == "earned"
    points = rows["points"].to_numpy(dtype=np.float64, na_value=np.nan).copy()
    if earned.any():
        points[earned] = rows.loc[earned, "event.points"].to_numpy(dtype=np.float64, na_value=np.nan)
    meaning = pd.DataFrame({"campaign": rows["campaign"].to_numpy(dtype=object),
                            "variant": rows["variant"].to_numpy(dtype=object),
                            "cost": rows["cost"].to_numpy(dtype=np.float64), "points": points})
    codes, groups = pd.MultiIndex.from_frame(meaning).factorize()
    texts, channels = [], []
    for campaign_id, variant, cost, group_points in groups:
        campaign = program.campaigns[campaign_id]
        reward = rewards.get((campaign_id, variant), campaign.reward)
        payload = reward_payload(reward.kind, dict(reward.params), group_points, pd.Timestamp(0, tz="UTC"),
                                 None, workspace.settings.default_locale, cost)
        texts.append(reward_meaning(payload))
        channels.append(campaign.channel)
    text, channel = np.array(texts, dtype=object)[codes], np.array(channels, dtype=object)[codes]
    names = ("firing_key", "offer_id", "campaign", "customer_id", "variant")
    columns = [rows[name].astype(str).tolist() for name in names]
    return [{"firing_key": key, "offer_id": offer, "campaign": campaign_id, "customer_id": customer,
             "payload_hash": meaning_hash(campaign_id, customer, via, variant, reward_text),
             "recorded_payload_hash": recorded[key]}
            for key, offer, campaign_id, customer, variant, via, reward_text
            in zip(*columns, channel.tolist(), text.tolist())]


def out_of_time_error(campaign: str, count: int, seconds: float) -> dict:
    """The one render error of a campaign whose offers were left out when the run's rendering
    time was used up; ``not_rendered`` lets shares rendered in several processes be added up."""
    message = (f"campaign '{campaign}': {count:,} message{'s' if count != 1 else ''} not rendered: "
               f"rendering this run's messages took longer than {seconds:g} s; they are not "
               "recorded, so a later run can still make them (make the slow template faster: "
               "`loyalty validate` warns about it)")
    return {"campaign": campaign, "customer_id": None, "error": message, "not_rendered": count}


def merge_out_of_time_errors(errors: list[dict], seconds: float) -> list[dict]:
    """Render errors with one out-of-time error per campaign, however many shares reported one."""
    counts: dict[str, int] = {}
    for error in errors:
        if "not_rendered" in error:
            counts[error["campaign"]] = counts.get(error["campaign"], 0) + error["not_rendered"]
    if not counts:
        return errors
    kept = [error for error in errors if "not_rendered" not in error]
    return kept + [out_of_time_error(campaign, count, seconds) for campaign, count in counts.items()]


def _offer_records(offers: pd.DataFrame) -> list[dict]:
    """Offer rows as dicts, values as ``to_dict("records")`` gives them, a column at a time."""
    names = list(offers.columns)
    return [dict(zip(names, values)) for values in zip(*(offers[c].tolist() for c in names))]


def explained_value(value):
    """A feature value as an explanation shows it: dates as ISO text, and floats without the
    noise of binary arithmetic (535.0600000000001 -> 535.06: rounded to 9 decimals, which no
    amount, count or score needs; cheap enough for every value of every offer)."""
    if type(value) is float:                     # the common case first: customer records are plain
        return round(value, 9) if value == value else None
    value = plain_value(value)
    if isinstance(value, (pd.Timestamp, dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, float):
        return round(value, 9) if np.isfinite(value) else value
    return value


def _explanation_names(workspace: LoadedWorkspace) -> dict[str, list[str]]:
    """The features each campaign's decision depends on, for `history` and previews."""
    program = workspace.program
    out = {}
    for campaign in program.campaigns.values():
        names: set[str] = set()
        if campaign.segment:
            names |= program.segments[campaign.segment].where.names
        for excluded in campaign.exclude:
            names |= program.segments[excluded].where.names
        for expression in (campaign.where, campaign.trigger.expr, campaign.budget.rank_by):
            if expression is not None:
                names |= expression.names
        if campaign.trigger.kind == "inactive_for":
            names.add("days_since_last_order")
        if campaign.trigger.kind == "birthday":
            names.add("days_to_birthday")
        out[campaign.id] = sorted(n for n in names if not n.startswith("event."))
    return out
