"""Building the program model from schema-valid rule files: the semantic checks.

Names and types of every expression are checked against the feature catalogue,
references between segments, tiers, channels and templates are resolved, and all
problems of all files are collected before anything is reported.
"""

from __future__ import annotations

import datetime as dt
import graphlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from croniter import croniter

from engine.config.catalogue import (
    AGGREGATES,
    REWARD_KINDS,
    TRIGGER_KINDS,
    builtin_catalogue,
    customer_catalogue,
    table_columns,
)
from engine.config.expressions import Expression, all_of, any_of, compile_expression
from engine.config.model import (
    DEFAULT_PENDING_DAYS,
    BudgetDef,
    CampaignDef,
    FeatureDef,
    Location,
    Program,
    RewardDef,
    SegmentDef,
    Settings,
    TriggerDef,
    VariantDef,
)
from engine.config.points_rules import build_points, notice_campaign, notice_id
from engine.config.rulefiles import SourceMap
from engine.config.schema import did_you_mean
from engine.config.settings import duration_days, percentage, whole_days_problem
from engine.config.tier_rules import build_tier_review, build_tiers
from engine.errors import ExpressionError, Problem


@dataclass
class _Defs:
    """Definitions of one kind gathered across files: name -> (data, source map, path)."""

    items: dict[str, tuple[Any, SourceMap, tuple]] = field(default_factory=dict)


class ProgramBuilder:
    """Collects rule files, then builds a Program while collecting every problem."""

    def __init__(self, settings: Settings, templates_dir: Path):
        self.settings = settings
        self.templates_dir = templates_dir
        self.problems: list[Problem] = []
        self.kinds = {kind: _Defs() for kind in ("features", "segments", "tiers", "campaigns")}
        # names defined in files that failed earlier checks: known, so that they cause no
        # second-hand "unknown segment" errors in the files that did load
        self.broken: dict[str, set[str]] = {kind: set() for kind in self.kinds}
        self.points: list[tuple[Any, SourceMap, tuple]] = []     # each file's points: section
        self.tier_review: list[tuple[Any, SourceMap, tuple]] = []   # each file's tier_review: section
        self.stored_tiers = False        # some tier has qualify: (known once every file is added)

    # ------------------------------------------------------------------ gathering

    def add_file(self, data: dict, smap: SourceMap) -> None:
        if data.get("points") is not None:
            self.points.append((data["points"], smap, ("points",)))
        if data.get("tier_review") is not None:
            self.tier_review.append((data["tier_review"], smap, ("tier_review",)))
        for kind, defs in self.kinds.items():
            for name, body in (data.get(kind) or {}).items():
                if name in defs.items:
                    _, first_map, first_path = defs.items[name]
                    line, _ = first_map.key_position(first_path)
                    self.problems.append(smap.problem(
                        (kind, name), f"{kind[:-1]} '{name}' is defined twice",
                        f"it is already defined at {first_map.file}:{line}; rename one of them",
                        at_key=True))
                    continue
                defs.items[name] = (body, smap, (kind, name))

    def add_broken_file(self, data: Any) -> None:
        """Remember the names a file with problems defines, without checking them."""
        if not isinstance(data, dict):
            return
        for kind, names in self.broken.items():
            section = data.get(kind)
            if isinstance(section, dict):
                names.update(str(name) for name in section)

    # ------------------------------------------------------------------ building

    def build(self) -> Program | None:
        names = builtin_catalogue()
        names.update(customer_catalogue(self.settings))
        features = self._features(names)
        for name, feature in features.items():
            names[name] = feature.type
        for name in self.broken["features"]:
            names.setdefault(name, "any")
        segments = self._segments(names)
        tier_defs = self.kinds["tiers"].items
        self.stored_tiers = any(isinstance(body, dict) and "qualify" in body for body, _, _ in tier_defs.values())
        tiers = build_tiers(tier_defs, names, self.condition, self.problems)
        tier_review = build_tier_review(self.tier_review, tiers, self.stored_tiers, self.problems)
        campaigns = self._campaigns(names, segments, tiers)
        points = build_points(self.points, names, tiers, self.settings, self.problems, self.condition)
        for rule in (points.earn.values() if points is not None else ()):
            if rule.notify_template is not None:
                _, smap, _ = self.points[0]
                self._check_template(rule.notify_template, rule.notify_channel, smap,
                                     ("points", "earn", rule.name, "notify", "template"))
                campaigns[notice_id(rule.name)] = notice_campaign(points, rule)
        if any(p.severity == "error" for p in self.problems):
            return None
        return Program(features=MappingProxyType(features), segments=MappingProxyType(segments),
                       tiers=MappingProxyType(tiers), campaigns=MappingProxyType(campaigns), points=points,
                       tier_review=tier_review)

    def _location(self, smap: SourceMap, path: tuple) -> Location:
        line, column = smap.key_position(path)
        return Location(smap.file, line, column)

    def condition(self, value: Any, names: dict[str, str], smap: SourceMap, path: tuple,
                  expect: str | None = "bool") -> Expression | None:
        """Compile a condition (text, bool or all:/any:/not: sugar) or record its problems."""
        if isinstance(value, dict):
            (key, items), = value.items()
            if key == "not":
                inner = self.condition(items, names, smap, path + ("not",))
                return None if inner is None else compile_expression(
                    f"not ({inner.text})", names)
            parts = [self.condition(item, names, smap, path + (key, i)) for i, item in enumerate(items)]
            if any(p is None for p in parts):
                return None
            return all_of(parts) if key == "all" else any_of(parts)
        try:
            expression = compile_expression(value, names)
        except ExpressionError as exc:
            self.problems.append(smap.problem(path, exc.message, exc.hint, offset=exc.offset))
            return None
        if expect and expression.type not in (expect, "null", "any"):
            self.problems.append(smap.problem(
                path, f"this condition gives {expression.type}, not true/false",
                "compare it with something, e.g. `x >= 5`"))
            return None
        return expression

    def _features(self, names: dict[str, str]) -> dict[str, FeatureDef]:
        defs = self.kinds["features"].items
        for name, (_, smap, path) in defs.items():
            if name in names:
                self.problems.append(smap.problem(path, f"feature '{name}' is already a built-in feature or customer column",
                                                  "choose another name", at_key=True))
        # dependency order of derived features
        graph: dict[str, set[str]] = {}
        for name, (body, _, _) in defs.items():
            deps = set()
            if "expr" in body and isinstance(body["expr"], str):
                deps = {n for n in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", body["expr"]) if n in defs and n != name}
                if re.search(rf"\b{re.escape(name)}\b", body["expr"]):
                    deps.add(name)
            graph[name] = deps
        try:
            order = list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            cycle = exc.args[1]
            _, smap, path = defs[cycle[0]]
            self.problems.append(smap.problem(path, "features depend on each other in a circle: "
                                              + " -> ".join(cycle), "break the circle", at_key=True))
            return {}
        features: dict[str, FeatureDef] = {}
        known = dict(names)
        for name in order:
            body, smap, path = defs[name]
            feature = self._feature(name, body, smap, path, known, graph[name])
            if feature is not None:
                features[name] = feature
                known[name] = feature.type
        return {name: features[name] for name in defs if name in features}

    def _feature(self, name, body, smap, path, known, deps) -> FeatureDef | None:
        aggregates = [k for k in AGGREGATES if k in body]
        location = self._location(smap, path)
        if "expr" in body:
            if aggregates or "from" in body:
                self.problems.append(smap.problem(path, f"feature '{name}' has both expr: and an aggregation",
                                                  "use one or the other", at_key=True))
                return None
            if name in deps:
                self.problems.append(smap.problem(path + ("expr",), f"feature '{name}' refers to itself"))
                return None
            try:
                expression = compile_expression(body["expr"], known)
            except ExpressionError as exc:
                self.problems.append(smap.problem(path + ("expr",), exc.message, exc.hint, offset=exc.offset))
                return None
            return FeatureDef(name, None, None, None, None, None, expression,
                              body.get("type", expression.type), location, tuple(sorted(deps)))
        if len(aggregates) != 1:
            self.problems.append(smap.problem(
                path, f"feature '{name}' needs exactly one of " + ", ".join(AGGREGATES) + " or expr",
                "e.g. spend_30d: {sum: amount, from: orders, within: 30d}", at_key=True))
            return None
        aggregate = aggregates[0]
        table = body.get("from")
        if table is None:
            self.problems.append(smap.problem(path, f"feature '{name}' needs from: orders or from: events",
                                              at_key=True))
            return None
        columns = table_columns(self.settings, table)
        column = body[aggregate]
        if column not in columns and not (aggregate == "count" and column in ("rows", "*")):
            self.problems.append(smap.problem(
                path + (aggregate,), f"{table} has no column '{column}'",
                did_you_mean(column, columns) or f"declare it under data.{table}.fields in loyalty.yaml"))
            return None
        where = None
        if "where" in body:
            scope = dict(columns)
            prefix = "order" if table == "orders" else "event"
            scope.update({f"{prefix}.{c}": t for c, t in columns.items()})
            where = self.condition(body["where"], scope, smap, path + ("where",))
            if where is None:
                return None
        within = None
        if "within" in body:
            if self._not_whole_days(smap, path + ("within",), body["within"]):
                return None
            within = int(duration_days(body["within"]))
        if aggregate in ("count", "distinct", "sum", "avg"):
            kind = "number"
            if aggregate in ("sum", "avg") and columns.get(column) not in ("number", None):
                self.problems.append(smap.problem(path + (aggregate,),
                                                  f"cannot {aggregate} '{column}': it is {columns[column]}"))
                return None
        else:
            kind = columns.get(column, "number")
        return FeatureDef(name, aggregate, None if column in ("rows", "*") else column, table, where,
                          within, None, body.get("type", kind), location)

    def _segments(self, names) -> dict[str, SegmentDef]:
        out = {}
        for name, (body, smap, path) in self.kinds["segments"].items.items():
            where = self.condition(body["where"], names, smap, path + ("where",))
            if where is not None:
                out[name] = SegmentDef(name, where, body.get("description", ""), self._location(smap, path))
        return out

    # ------------------------------------------------------------------ campaigns

    def _campaigns(self, names, segments, tiers) -> dict[str, CampaignDef]:
        out = {}
        known_segments = set(self.kinds["segments"].items) | self.broken["segments"]
        known_tiers = set(self.kinds["tiers"].items) | self.broken["tiers"]
        for cid, (body, smap, path) in self.kinds["campaigns"].items.items():
            before = len(self.problems)
            campaign = self._campaign(cid, body, smap, path, names, known_segments, known_tiers)
            if campaign is not None and len(self.problems) == before:
                out[cid] = campaign
        return out

    def _campaign(self, cid, body, smap, path, names, known_segments, known_tiers) -> CampaignDef | None:
        for key in ("segment",):
            if key in body and body[key] not in known_segments:
                self.problems.append(smap.problem(path + (key,), f"unknown segment '{body[key]}'",
                                                  did_you_mean(body[key], known_segments)
                                                  or "define it under segments:"))
        for i, name in enumerate(body.get("exclude", [])):
            if name not in known_segments:
                self.problems.append(smap.problem(path + ("exclude", i), f"unknown segment '{name}'",
                                                  did_you_mean(name, known_segments) or "define it under segments:"))
        channel = body["channel"]
        if channel not in self.settings.channels:
            self.problems.append(smap.problem(
                path + ("channel",), f"channel '{channel}' is not configured in loyalty.yaml",
                did_you_mean(channel, self.settings.channels)
                or "add it under channels: in loyalty.yaml"))
        where = None
        if "where" in body:
            where = self.condition(body["where"], names, smap, path + ("where",))
        trigger = self._trigger(body.get("when"), smap, path + ("when",), names)
        event_scope = dict(names)
        if trigger is not None and trigger.kind == "event":
            event_scope.update({f"event.{c}": t for c, t in table_columns(self.settings, "events").items()})
        reward = self._reward(body["reward"], smap, path + ("reward",), event_scope, known_tiers)
        variants = []
        seen = set()
        for i, variant in enumerate(body.get("variants", [])):
            if variant["name"] in seen:
                self.problems.append(smap.problem(path + ("variants", i, "name"),
                                                  f"variant '{variant['name']}' appears twice"))
            seen.add(variant["name"])
            v_reward = None
            if "reward" in variant:
                v_reward = self._reward(variant["reward"], smap, path + ("variants", i, "reward"),
                                        event_scope, known_tiers)
            template = variant.get("template")
            if template is not None:
                self._check_template(template, channel, smap, path + ("variants", i, "template"))
            variants.append(VariantDef(variant["name"], float(variant["weight"]), v_reward, template))
        self._check_template(body["template"], channel, smap, path + ("template",))
        budget = self._budget(body.get("budget", {}), smap, path + ("budget",), names)
        for key in ("cooldown", "pending"):
            if key in body:
                self._not_whole_days(smap, path + (key,), body[key])
        schedule = body.get("schedule")
        if schedule is not None and not croniter.is_valid(schedule):
            self.problems.append(smap.problem(path + ("schedule",), f"'{schedule}' is not a cron schedule",
                                              'write five fields, e.g. "0 10 * * *" for every day at 10:00'))
        if trigger is None or reward is None:
            return None
        return CampaignDef(
            id=cid, name=body.get("name", cid), segment=body.get("segment"),
            exclude=tuple(body.get("exclude", ())), where=where, trigger=trigger, reward=reward,
            channel=channel, template=body["template"], priority=body.get("priority", 0),
            cooldown_days=int(duration_days(body["cooldown"])) if "cooldown" in body else None,
            holdout=percentage(body["holdout"]) if "holdout" in body else 0.0,
            budget=budget, variants=tuple(variants), schedule=schedule,
            enabled=body.get("enabled", True), location=self._location(smap, path),
            pending_days=int(duration_days(body["pending"])) if "pending" in body else DEFAULT_PENDING_DAYS)

    def _not_whole_days(self, smap: SourceMap, path: tuple, text: str) -> bool:
        problem = whole_days_problem(smap, path, text)
        if problem is not None:
            self.problems.append(problem)
        return problem is not None

    def _trigger(self, when, smap, path, names) -> TriggerDef | None:
        location = self._location(smap, path) if when is not None else Location(smap.file, 0, 0)
        if when is None:
            return TriggerDef("always", location=location)
        kinds = [k for k in TRIGGER_KINDS if k in when]
        if len(kinds) != 1:
            self.problems.append(smap.problem(
                path, "when: takes exactly one trigger: " + ", ".join(TRIGGER_KINDS),
                "split the campaign in two to use two triggers", at_key=True))
            return None
        kind = kinds[0]
        if "where" in when and kind != "event":
            self.problems.append(smap.problem(path + ("where",), "where: under when: only goes with event:",
                                              "put the condition in the campaign's where:", at_key=True))
            return None
        value = when[kind]
        params: dict[str, Any] = {}
        where = expr = None
        if kind == "birthday":
            params["days_before"] = (value or {}).get("days_before", 0)
            if "birthday" not in names:
                self.problems.append(smap.problem(path + (kind,), "customers have no birthday column",
                                                  "map one with data.customers.columns.birthday"))
        elif kind == "anniversary":
            if names.get(value) != "date":
                self.problems.append(smap.problem(path + (kind,), f"'{value}' is not a date column",
                                                  did_you_mean(value, [n for n, t in names.items() if t == "date"])
                                                  or "use a date column such as signup_date"))
            params["column"] = value
        elif kind == "dates":
            for i, text in enumerate(value):
                if not _valid_date(text):
                    self.problems.append(smap.problem(path + (kind, i), f"'{text}' is not a calendar date",
                                                      "write MM-DD or YYYY-MM-DD"))
            params["dates"] = tuple(value)
        elif kind == "event":
            params["type"] = value
            if "where" in when:
                scope = {f"event.{c}": t for c, t in table_columns(self.settings, "events").items()}
                scope.update(names)
                where = self.condition(when["where"], scope, smap, path + ("where",))
                if where is None:
                    return None
        elif kind == "inactive_for":
            if self._not_whole_days(smap, path + (kind,), value):
                return None
            params["days"] = int(duration_days(value))
        elif kind == "becomes":
            expr = self.condition(value, names, smap, path + (kind,))
            if expr is None:
                return None
        return TriggerDef(kind, MappingProxyType(params), where, expr, location)

    def _reward(self, body, smap, path, names, known_tiers) -> RewardDef | None:
        kinds = [k for k in REWARD_KINDS if k in body]
        location = self._location(smap, path)
        if len(kinds) != 1:
            self.problems.append(smap.problem(path, "reward: takes exactly one of " + ", ".join(REWARD_KINDS),
                                              "e.g. reward: {coupon: {percent_off: 10, valid_days: 14}}",
                                              at_key=True))
            return None
        kind = kinds[0]
        params = dict(body[kind] or {}) if isinstance(body[kind], dict) else {}
        if kind == "points" and isinstance(body[kind], (int, float, str)) and not isinstance(body[kind], bool):
            params = {"amount": body[kind]}          # points: 500 is points: {amount: 500}
        amount = None
        if kind == "coupon":
            if "percent_off" in params and "amount_off" in params:
                self.problems.append(smap.problem(path + (kind, "amount_off"),
                                                  "a coupon takes percent_off or amount_off, not both",
                                                  "remove one of them", at_key=True))
                return None
            if "percent_off" not in params and "amount_off" not in params:
                self.problems.append(smap.problem(path + (kind,), "a coupon needs percent_off or amount_off",
                                                  "e.g. coupon: {percent_off: 20, min_spend: 100, valid_days: 14}",
                                                  at_key=True))
                return None
            params.setdefault("valid_days", 30)
        elif kind == "points":
            value = params["amount"]
            try:
                amount = compile_expression(value, names)
            except ExpressionError as exc:
                self.problems.append(smap.problem(path + (kind, "amount"), exc.message, exc.hint, offset=exc.offset))
                return None
            if amount.type not in ("number", "any"):
                self.problems.append(smap.problem(
                    path + (kind, "amount"), f"the points amount must be a number, but `{amount.text}` gives {amount.type}",
                    "use a number or an arithmetic expression, e.g. floor(monetary_365d / 100)"))
                return None
        elif kind == "tier":
            if params["to"] not in known_tiers:
                self.problems.append(smap.problem(path + (kind, "to"), f"unknown tier '{params['to']}'",
                                                  did_you_mean(params["to"], known_tiers) or "define it under tiers:"))
                return None
            if "for" in params and not self._trial_problem(smap, path + (kind, "for"), params["for"]):
                return None
        return RewardDef(kind, MappingProxyType(params), amount, location)

    def _trial_problem(self, smap: SourceMap, path: tuple, text: str) -> bool:
        """Whether a tier reward's ``for:`` is sound (else its problem is recorded)."""
        if not self.stored_tiers:
            self.problems.append(smap.problem(path, "a trial (for:) needs stored tiers",
                                              "computed tiers (where:) are decided again at every run: give the "
                                              "tiers qualify: (and retain:), or remove for:", at_key=True))
            return False
        if self._not_whole_days(smap, path, text):
            return False
        if duration_days(text) < 1:
            self.problems.append(smap.problem(path, "a trial of 0 days ends before it starts", "use at least 1d, e.g. 30d"))
            return False
        return True

    def _budget(self, body, smap, path, names) -> BudgetDef:
        rank_by = None
        if "rank_by" in body:
            try:
                rank_by = compile_expression(body["rank_by"], names)
            except ExpressionError as exc:
                self.problems.append(smap.problem(path + ("rank_by",), exc.message, exc.hint, offset=exc.offset))
            else:
                if rank_by.type not in ("number", "date"):
                    self.problems.append(smap.problem(path + ("rank_by",), "rank_by must give a number or a date"))
        return BudgetDef(body.get("max_offers"), body.get("max_cost"), rank_by, body.get("per", "run"))

    def _check_template(self, template: str, channel: str, smap: SourceMap, path: tuple) -> None:
        if channel not in self.settings.channels:
            return
        locale = self.settings.default_locale
        candidates = [f"{template}.{channel}.{locale}.j2", f"{template}.{channel}.{locale.split('-')[0]}.j2",
                      f"{template}.{channel}.j2"]
        if not any((self.templates_dir / c).is_file() for c in candidates):
            existing = sorted(p.name for p in self.templates_dir.glob(f"*.{channel}.*j2")) if self.templates_dir.is_dir() else []
            stems = sorted({name.split(".")[0] for name in existing})
            others = [name for name in existing if name.split(".")[0] == template]
            if others:  # it exists, but only for other locales: the default locale needs one
                hint = (f"there is only {', '.join('templates/' + n for n in others)}; "
                        f"add templates/{candidates[0]} for the default locale {locale}")
            else:
                hint = did_you_mean(template, stems) or f"create templates/{candidates[0]}"
            self.problems.append(smap.problem(
                path, f"no template '{template}' for channel {channel} in locale {locale}", hint))


def _valid_date(text: str) -> bool:
    try:
        if len(text) == 5:
            dt.date(2024, int(text[:2]), int(text[3:]))  # a leap year accepts 02-29
        else:
            dt.date.fromisoformat(text)
        return True
    except ValueError:
        return False
