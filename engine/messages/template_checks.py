"""Templates checked before sending: every campaign's template, per channel and locale,
rendered against a synthetic customer built from the feature catalogue, so that a missing
variable, a syntax error or an over-long SMS fails `loyalty validate`, not the send.

Unknown variables and fields come from the template's syntax tree (so a typo inside an
``{% if %}`` branch the synthetic customer does not take is found too); the trial render
then catches what only values reveal, such as an SMS longer than the channel allows.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from engine.config.catalogue import builtin_catalogue, customer_catalogue, table_columns
from engine.config.model import LoadedWorkspace
from engine.decide.rewards import reward_payload
from engine.errors import Problem
from engine.messages.offers import make_renderer
from engine.messages.rendering import SMS_TOO_LONG, money_in

SAMPLE_VALUES = {
    "number": 128.0, "string": "示例", "bool": True, "date": pd.Timestamp("1990-03-14"), "any": "示例",
}
SAMPLE_CUSTOMER = {
    "customer_id": "C000001", "name": "王芳", "email": "wang.fang@example.com", "phone": "13800000000",
    "locale": "zh-CN", "timezone": "Asia/Shanghai", "tier": "gold", "city": "上海",
}

ENGLISH_CUSTOMER = {"name": "Emma Clark", "city": "London", "timezone": "Europe/London"}


def sample_customer(workspace: LoadedWorkspace) -> dict:
    """One customer with a plausible value for every column and feature a rule may use."""
    names = builtin_catalogue()
    names.update(customer_catalogue(workspace.settings))
    names.update({name: f.type for name, f in workspace.program.features.items()})
    customer = {name: SAMPLE_VALUES.get(kind, "示例") for name, kind in names.items()}
    customer.update(SAMPLE_CUSTOMER)
    return customer


def _locales(workspace: LoadedWorkspace, template: str, channel: str) -> list[str]:
    found = {workspace.settings.default_locale}
    for path in workspace.templates_dir.glob(f"{template}.{channel}.*.j2"):
        parts = path.name.split(".")
        if len(parts) == 4:
            found.add(parts[2])
    return sorted(found)


def check_workspace_templates(workspace: LoadedWorkspace) -> list[Problem]:
    """Render-check every template every campaign (and variant) uses, in every locale it has."""
    renderer = make_renderer(workspace)
    customer = sample_customer(workspace)
    event = {c: SAMPLE_VALUES.get(t, "示例") for c, t in table_columns(workspace.settings, "events").items()}
    send_at = pd.Timestamp("2026-11-23T10:00:00", tz=workspace.settings.timezone)
    problems: dict[tuple, Problem] = {}
    for campaign in workspace.program.campaigns.values():
        if campaign.trigger.kind == "earned":     # an earn rule's message: the order's or event's columns
            rule = campaign.trigger.params["rule"]
            columns = table_columns(workspace.settings, rule.source)
            sample_event = {c: SAMPLE_VALUES.get(t, "示例") for c, t in columns.items()} | {"points": 100}
        else:
            sample_event = event
        pairs = [(campaign.template, campaign.reward)] + [
            (v.template or campaign.template, v.reward or campaign.reward) for v in campaign.variants]
        unique = {(t, id(r)): (t, r) for t, r in pairs}
        for template, reward in unique.values():
            for locale in _locales(workspace, template, campaign.channel):
                payload = reward_payload(reward.kind, dict(reward.params), 100, send_at,
                                         "SAMPLE-CODE" if reward.kind == "coupon" else None, locale, 10.0,
                                         money_in(workspace.settings.currency, locale))
                person = customer if locale.lower().startswith("zh") else dict(
                    customer, **ENGLISH_CUSTOMER)
                context = {
                    "customer": dict(person, locale=locale), "reward": payload, "event": sample_event,
                    "offer": {"offer_id": "of_sample", "campaign": campaign.id, "campaign_name": campaign.name,
                              "variant": "A", "channel": campaign.channel, "send_at": send_at.isoformat()},
                }
                for problem in renderer.check(template, campaign.channel, locale, context):
                    problem = _as_error(problem, campaign.channel)
                    problems.setdefault((problem.file, problem.line, problem.message), problem)
    return list(problems.values())


def _as_error(problem: Problem, channel: str) -> Problem:
    """An SMS longer than the channel's ``max_sms_segments`` would be split or refused at
    send time: before sending, it is an error, not a warning."""
    if channel != "sms" or problem.severity != "warning" or not problem.message.startswith(SMS_TOO_LONG):
        return problem
    return dataclasses.replace(problem, severity="error",
                               message="rendered for a sample customer, " + problem.message)
