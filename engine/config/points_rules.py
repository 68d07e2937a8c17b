"""Checking ``points:`` (value, start, expiry, earn rules) into a ``PointsDef``.

Earn rules are expressions over the order (``order.*``) or event (``event.*``) and the
member's features; they may not read the points features themselves (a credit cannot
depend on the balance it makes).
"""

from __future__ import annotations

import datetime as dt
from types import MappingProxyType
from typing import Any

from engine.config.catalogue import POINTS_FEATURES, table_columns
from engine.config.expressions import Expression, compile_expression
from engine.config.model import CampaignDef, EarnRule, Location, PointsDef, RewardDef, Settings, TriggerDef
from engine.config.rulefiles import SourceMap
from engine.config.schema import did_you_mean
from engine.config.settings import duration_days, whole_days_problem
from engine.errors import ExpressionError, Problem

Definition = tuple[Any, SourceMap, tuple]     # (body, source map, path) as gathered from a file


def build_points(found: list[Definition], names: dict[str, str], known_tiers, settings: Settings,
                 problems: list[Problem], condition) -> PointsDef | None:
    """The programme's ``points:`` (None without one); problems are appended to ``problems``.

    ``condition`` compiles a condition the way the rest of the rule files do (``all:``/``any:``)."""
    if not found:
        return None
    body, smap, path = found[0]
    for _, other, other_path in found[1:]:
        line, _ = smap.key_position(path)
        problems.append(other.problem(other_path, "points: is defined twice",
                                      f"it is already defined at {smap.file}:{line}; keep one points: section",
                                      at_key=True))
    line, column = smap.key_position(path)
    location = Location(smap.file, line, column)
    start = None
    if "start" in body:
        try:
            start = dt.date.fromisoformat(body["start"])
        except ValueError:
            problems.append(smap.problem(path + ("start",), f"'{body['start']}' is not a calendar date",
                                         "write YYYY-MM-DD, e.g. 2026-01-01"))
    expire_days = None
    if "expire_after" in body:
        problem = whole_days_problem(smap, path + ("expire_after",), body["expire_after"])
        if problem is not None:
            problems.append(problem)
        else:
            expire_days = int(duration_days(body["expire_after"]))
            if expire_days < 1:
                problems.append(smap.problem(path + ("expire_after",), "points cannot expire the day they are earned",
                                             "use at least 1d, e.g. 365d"))
    scope = {name: kind for name, kind in names.items() if name not in POINTS_FEATURES}
    earn = {}
    for name, rule in (body.get("earn") or {}).items():
        built = _earn_rule(name, rule, smap, path + ("earn", name), scope, known_tiers, settings, problems,
                           condition)
        if built is not None:
            earn[name] = built
    value = float(body.get("value", settings.point_value))
    return PointsDef(value, start, expire_days, MappingProxyType(earn), location)


def _earn_rule(name, body, smap: SourceMap, path, names, known_tiers, settings: Settings,
               problems: list[Problem], condition) -> EarnRule | None:
    on = body["on"]
    source, event_type = ("orders", None) if on == "order" else ("events", on["event"])
    prefix = "order" if source == "orders" else "event"
    scope = {f"{prefix}.{column}": kind for column, kind in table_columns(settings, source).items()}
    scope.update(names)
    line, column = smap.key_position(path)
    location = Location(smap.file, line, column)
    amount = _amount(body["amount"], smap, path + ("amount",), scope, problems)
    where = None
    if "where" in body:
        where = condition(body["where"], scope, smap, path + ("where",))
        if where is None:
            return None
    for tier in body.get("multiplier", {}):
        if tier not in known_tiers:
            problems.append(smap.problem(path + ("multiplier", tier), f"unknown tier '{tier}'",
                                         did_you_mean(tier, known_tiers) or "define it under tiers:", at_key=True))
    notify = body.get("notify") or {}
    if notify and notify["channel"] not in settings.channels:
        problems.append(smap.problem(path + ("notify", "channel"),
                                     f"channel '{notify['channel']}' is not configured in loyalty.yaml",
                                     did_you_mean(notify["channel"], settings.channels)
                                     or "add it under channels: in loyalty.yaml"))
    if amount is None:
        return None
    return EarnRule(name, source, amount, event_type, where,
                    MappingProxyType({t: float(m) for t, m in body.get("multiplier", {}).items()}),
                    notify.get("channel"), notify.get("template"), int(notify.get("priority", 0)), location)


def _amount(value, smap: SourceMap, path, scope, problems: list[Problem]) -> Expression | None:
    try:
        amount = compile_expression(value, scope)
    except ExpressionError as exc:
        problems.append(smap.problem(path, _points_hint(exc.message), exc.hint, offset=exc.offset))
        return None
    if amount.type not in ("number", "any"):
        problems.append(smap.problem(path, f"the points amount must be a number, but `{amount.text}` gives "
                                     f"{amount.type}", "e.g. floor(order.amount)"))
        return None
    return amount


def _points_hint(message: str) -> str:
    if any(f"'{name}'" in message or f"`{name}`" in message for name in POINTS_FEATURES):
        return message + " (earn rules cannot read the points features: a credit cannot depend on the balance)"
    return message


def notice_id(rule: str) -> str:
    """The campaign id of an earn rule's message: ``points.NAME`` (no campaign id has a dot)."""
    return f"points.{rule}"


def notice_campaign(points: PointsDef, rule: EarnRule) -> CampaignDef:
    """The campaign announcing an earn rule's credits (``notify:``): it fires once per credit
    (trigger ``earned``) and gives nothing itself (reward ``earned``): the points are credited
    whether or not this message goes, which obeys consent, caps, quiet hours and holdouts. A
    notice that cannot go now is not kept for a later run: the next credit brings its own."""
    trigger = TriggerDef("earned", MappingProxyType({"rule": rule, "points": points}), location=rule.location)
    return CampaignDef(id=notice_id(rule.name), name=f"积分到账 · {rule.name}", segment=None, exclude=(),
                       where=None, trigger=trigger, reward=RewardDef("earned", location=rule.location),
                       channel=rule.notify_channel, template=rule.notify_template, priority=rule.notify_priority,
                       pending_days=0, location=rule.location)
