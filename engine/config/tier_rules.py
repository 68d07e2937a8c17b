"""Checking ``tiers:`` and ``tier_review:`` into ``TierDef``s and a ``TierReview``.

A programme's tiers are either all computed (``where:``, decided at every run, the first match
winning) or stored (``qualify:`` and ``retain:``, the member's state, reviewed every
``tier_review.every``), with at most one base tier (``where: true``, the last one) beside
stored tiers. A mix that means nothing is refused at file:line:col.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from engine.config.model import Location, TierDef, TierReview
from engine.config.rulefiles import SourceMap
from engine.config.settings import duration_days, whole_days_problem
from engine.errors import Problem

Definition = tuple[Any, SourceMap, tuple]     # (body, source map, path) as gathered from a file
CONDITIONS = ("where", "qualify", "retain")
_TIER_NAME = re.compile(r"(?<![\w.])tier(?:_since)?(?![\w.])")


def build_tiers(defs: dict[str, Definition], names: dict[str, str], condition: Callable,
                problems: list[Problem]) -> dict[str, TierDef]:
    """The tiers, in the order written; problems are appended to ``problems``.

    ``condition`` compiles a condition the way the rest of the rule files do (``all:``/``any:``)."""
    scope = {k: v for k, v in names.items() if k not in ("tier", "tier_since")}
    stored = any(isinstance(body, dict) and "qualify" in body for body, _, _ in defs.values())
    out = {}
    last = list(defs)[-1] if defs else None
    for name, (body, smap, path) in defs.items():
        before = len(problems)
        _check_shape(name, body, smap, path, stored, name == last, problems)
        for key in CONDITIONS:
            used = _TIER_NAME.search(body[key]) if isinstance(body.get(key), str) else None
            if used is not None:
                problems.append(smap.problem(path + (key,), "a tier condition cannot use `tier` or `tier_since`",
                                             "tiers are decided from the other features", offset=used.start()))
        if len(problems) > before:
            continue
        compiled = {key: condition(body[key], scope, smap, path + (key,)) for key in CONDITIONS if key in body}
        if any(value is None for value in compiled.values()):
            continue
        line, column = smap.key_position(path)
        out[name] = TierDef(name, compiled.get("where"), tuple(body.get("benefits", ())),
                            Location(smap.file, line, column), compiled.get("qualify"), compiled.get("retain"))
    return out


def _check_shape(name: str, body: dict, smap: SourceMap, path: tuple, stored: bool, last: bool,
                 problems: list[Problem]) -> None:
    """where: or qualify: (not both, not neither), retain: only with qualify:, and beside
    stored tiers only the last tier may be a base tier with ``where: true``."""
    if "where" not in body and "qualify" not in body:
        problems.append(smap.problem(path, f"tier '{name}' needs where: (a computed tier) or qualify: (a stored tier)",
                                     "e.g. qualify: monetary_365d >= 8000, or where: monetary_365d >= 8000",
                                     at_key=True))
        return
    if "where" in body and "qualify" in body:
        problems.append(smap.problem(path + ("where",), "a tier takes where: or qualify:, not both",
                                     "where: decides the tier at every run; qualify: makes it the member's "
                                     "state until a review: keep one of them", at_key=True))
        return
    if "retain" in body and "qualify" not in body:
        problems.append(smap.problem(path + ("retain",), "retain: goes with qualify: (stored tiers)",
                                     "a computed tier (where:) is decided again at every run: remove retain:",
                                     at_key=True))
        return
    if not stored or "where" not in body:
        return
    if not _always(body["where"]):
        problems.append(smap.problem(path + ("where",), f"tier '{name}' is computed (where:) but the other tiers "
                                     "are stored (qualify:)",
                                     "give it qualify: (and retain:) like the others; only the base tier, the "
                                     "last one, takes where: true"))
    elif not last:
        problems.append(smap.problem(path, f"the base tier '{name}' (where: true) must be the last tier",
                                     "tiers go from the highest to the lowest: move it to the end", at_key=True))


def _always(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def build_tier_review(found: list[Definition], tiers: dict[str, TierDef], stored: bool,
                      problems: list[Problem]) -> TierReview:
    """The programme's ``tier_review:`` (the defaults without one)."""
    if not found:
        return TierReview()
    body, smap, path = found[0]
    line, column = smap.key_position(path)
    for _, other, other_path in found[1:]:
        problems.append(other.problem(other_path, "tier_review: is defined twice",
                                      f"it is already defined at {smap.file}:{line}; keep one tier_review: section",
                                      at_key=True))
    if not stored:
        problems.append(smap.problem(path, "tier_review: applies to stored tiers (qualify:) only",
                                     "give the tiers qualify: (and retain:), or remove tier_review:", at_key=True))
    days = {}
    for key, default in (("every", 365), ("grace", 0)):
        days[key] = default
        if key not in body:
            continue
        problem = whole_days_problem(smap, path + (key,), body[key])
        if problem is not None:
            problems.append(problem)
            continue
        days[key] = int(duration_days(body[key]))
    if days["every"] < 1:
        problems.append(smap.problem(path + ("every",), "tiers cannot be reviewed every 0 days",
                                     "use at least 1d, e.g. 365d"))
    return TierReview(days["every"], days["grace"], body.get("step_down", "one"), Location(smap.file, line, column))


def trial_days(text: str | None) -> int | None:
    """The length in days of a tier reward's ``for:`` (None without one)."""
    return None if text is None else int(duration_days(text))
