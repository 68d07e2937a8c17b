"""Per-customer features at an instant ``as_of``: the built-in catalogue, tiers, RFM and custom features.

Everything aggregates on the integer customer codes that ``sources`` attached to
orders and events (``cust_code``): counts and sums with ``np.bincount``, extremes
with ``np.maximum.at``; there is no per-customer Python loop. Days are calendar
days in the programme's timezone: a window ``within: Nd`` starts at the same local
wall-clock time N days before ``as_of`` (see docs/data.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np
import pandas as pd

from engine.config.catalogue import ACTIVITY_PREFIX, BUILTIN_FEATURES, POINTS_FEATURES
from engine.config.model import FeatureDef, PointsDef, Program, Settings, TierDef
from engine.data.points import Accounts, PointsHistory, member_accounts, points_columns
from engine.data.sources import Tables
from engine.data.tiers import TierDecision, TierState, decide_tiers, keep_moves
from engine.errors import Problem, RuleError

_MIN = np.iinfo(np.int64).min   # also numpy's NaT
_MAX = np.iinfo(np.int64).max
_NANOS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}


# --------------------------------------------------------------------------- time


def local_as_of(as_of, timezone: str) -> pd.Timestamp:
    """``as_of`` in the programme's timezone; a naive value is read as local time."""
    stamp = pd.Timestamp(as_of)
    if stamp.tzinfo is None:
        return stamp.tz_localize(timezone, ambiguous=True, nonexistent="shift_forward")
    return stamp.tz_convert(timezone)


def days_before(as_of: pd.Timestamp, days: int) -> pd.Timestamp:
    """The same local wall-clock time ``days`` calendar days earlier (DST-aware).

    An ambiguous wall time (clocks going back) is the first of the two instants; a
    skipped one (clocks going forward) moves forward to the first existing instant.
    """
    wall = as_of.tz_localize(None) - pd.Timedelta(days=days)
    return wall.tz_localize(as_of.tz, ambiguous=True, nonexistent="shift_forward")


@dataclass
class _Activity:
    """Orders or events reduced to numpy arrays once per computation."""

    frame: pd.DataFrame
    codes: np.ndarray      # customer position of each row
    stamps: np.ndarray     # int64 epoch in ``unit``
    unit: str

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "_Activity":
        stamps = frame["timestamp"]
        unit = getattr(stamps.dtype, "unit", "us")
        i8 = stamps.dt.tz_convert(None).to_numpy().view(np.int64) if len(frame) else np.array([], np.int64)
        return cls(frame, frame["cust_code"].to_numpy(dtype=np.int64), i8, unit)

    def instant(self, stamp: pd.Timestamp) -> int:
        """``stamp`` in this table's unit, floored (so ``>`` and ``<=`` comparisons stay exact)."""
        return int(stamp.value) // _NANOS[self.unit]


# --------------------------------------------------------------------------- helpers


def _ints(values: np.ndarray, missing: np.ndarray | None = None) -> pd.arrays.IntegerArray:
    values = np.asarray(values, dtype=np.int64)
    mask = np.zeros(len(values), dtype=bool) if missing is None else missing
    return pd.arrays.IntegerArray(values, mask)


def _floats(values: np.ndarray, missing: np.ndarray | None = None) -> pd.arrays.FloatingArray:
    values = np.asarray(values, dtype=np.float64)
    mask = np.isnan(values) if missing is None else (missing | np.isnan(values))
    return pd.arrays.FloatingArray(np.where(mask, 0.0, values), mask)


def _local_days(i8: np.ndarray, unit: str, timezone: str) -> np.ndarray:
    """Epoch instants -> local calendar day numbers (days since 1970-01-01); NaT stays NaT."""
    utc = pd.DatetimeIndex(i8.view(f"datetime64[{unit}]")).tz_localize("UTC")
    wall = utc.tz_convert(timezone).tz_localize(None).to_numpy()
    return wall.astype("datetime64[D]").view(np.int64)


def _day_number(stamp: pd.Timestamp) -> int:
    return int(np.datetime64(stamp.tz_localize(None).date(), "D").view(np.int64))


def _dates(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype="datetime64[us]", na_value=np.datetime64("NaT")).astype("datetime64[D]")


# --------------------------------------------------------------------------- built-ins


def _order_features(orders: _Activity, n: int, as_of: pd.Timestamp, timezone: str) -> dict[str, object]:
    """Every order-based built-in in one pass: one bucket per order, two bincounts."""
    now = orders.instant(as_of)
    edges = [orders.instant(days_before(as_of, d)) for d in (365, 180, 90)] + [now]
    stamps, codes = orders.stamps, orders.codes
    # bucket 0: <= as_of-365d, 1: (365d,180d], 2: (180d,90d], 3: (90d, as_of], 4: after as_of
    bucket = (stamps > edges[0]).astype(np.int64)
    for edge in edges[1:]:
        bucket += stamps > edge
    key = codes * 5 + bucket
    counts = np.bincount(key, minlength=5 * n).reshape(n, 5)
    sums = np.bincount(key, weights=orders.frame["amount"].to_numpy(dtype=np.float64),
                       minlength=5 * n).reshape(n, 5)
    total = counts[:, :4].sum(axis=1)
    spend = sums[:, :4].sum(axis=1)
    future = bucket == 4
    any_future = bool(future.any())
    last = np.full(n, _MIN, dtype=np.int64)
    np.maximum.at(last, codes, np.where(future, _MIN, stamps) if any_future else stamps)
    first = np.full(n, _MAX, dtype=np.int64)
    np.minimum.at(first, codes, np.where(future, _MAX, stamps) if any_future else stamps)
    none = total == 0
    first[none] = _MIN
    today = _day_number(as_of)
    with np.errstate(invalid="ignore", divide="ignore"):
        average = spend / total
    return {
        "days_since_last_order": _ints(today - _local_days(last, orders.unit, timezone), none),
        "days_since_first_order": _ints(today - _local_days(first, orders.unit, timezone), none),
        "orders_total": _ints(total),
        "lifetime_spend": _floats(spend),
        "avg_order_value": _floats(average, none),
        "orders_365d": _ints(counts[:, 1:4].sum(axis=1)),
        "monetary_365d": _floats(sums[:, 1:4].sum(axis=1)),
        "orders_last_90d": _ints(counts[:, 3]),
        "orders_prev_90d": _ints(counts[:, 2]),
    }


def _ymd(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    years = days.astype("datetime64[Y]")
    months = days.astype("datetime64[M]")
    year = years.view(np.int64) + 1970
    month = (months - years.astype("datetime64[M]")).view(np.int64) + 1
    day = (days - months.astype("datetime64[D]")).view(np.int64) + 1
    return year, month, day


def _make_date(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    start = (np.asarray(year) - 1970).astype("datetime64[Y]").astype("datetime64[M]")
    return (start + (month - 1)).astype("datetime64[D]") + (day - 1)


def _is_leap(year):
    return (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))


def _birthday_day(month: np.ndarray, day: np.ndarray, year) -> np.ndarray:
    """29 February is celebrated on 28 February in common years."""
    return np.where((month == 2) & (day == 29) & ~_is_leap(year), 28, day)


def _customer_features(customers: pd.DataFrame, as_of: pd.Timestamp) -> dict[str, object]:
    n = len(customers)
    today = np.datetime64(as_of.tz_localize(None).date(), "D")
    out: dict[str, object] = {}
    if "signup_date" in customers:
        signup = _dates(customers["signup_date"])
        missing = np.isnat(signup)
        out["days_since_signup"] = _ints(np.where(missing, 0, (today - signup).view(np.int64)), missing)
    else:
        out["days_since_signup"] = _ints(np.zeros(n), np.ones(n, dtype=bool))
    if "birthday" not in customers:
        none = np.ones(n, dtype=bool)
        out["days_to_birthday"] = out["age"] = _ints(np.zeros(n), none)
        return out
    birthday = _dates(customers["birthday"])
    missing = np.isnat(birthday)
    safe = np.where(missing, np.datetime64("2000-01-01"), birthday)
    b_year, b_month, b_day = _ymd(safe)
    t_year, t_month, t_day = (int(v[0]) for v in _ymd(np.array([today])))
    this_year = _make_date(np.full(n, t_year), b_month, _birthday_day(b_month, b_day, t_year))
    next_year = _make_date(np.full(n, t_year + 1), b_month, _birthday_day(b_month, b_day, t_year + 1))
    upcoming = np.where(this_year >= today, this_year, next_year)
    out["days_to_birthday"] = _ints((upcoming - today).view(np.int64), missing)
    not_yet = (t_month < b_month) | ((t_month == b_month) & (t_day < _birthday_day(b_month, b_day, t_year)))
    out["age"] = _ints(t_year - b_year - not_yet, missing)
    return out


def _event_features(events: _Activity, n: int, as_of: pd.Timestamp) -> dict[str, object]:
    now = events.instant(as_of)
    kinds = events.frame["type"]
    seen = events.stamps <= now
    complaint = seen & (events.stamps > events.instant(days_before(as_of, 90))) & \
        (kinds == "complaint").to_numpy(dtype=bool, na_value=False)
    out: dict[str, object] = {"complaints_90d": _ints(np.bincount(events.codes[complaint], minlength=n))}
    nps = np.flatnonzero(seen & (kinds == "nps_response").to_numpy(dtype=bool, na_value=False))
    scores = np.full(n, np.nan)
    if nps.size and "score" in events.frame:
        winner = _pick_rows(events.codes[nps], events.stamps[nps], n, latest=True)
        has = winner >= 0
        values = pd.to_numeric(events.frame["score"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        scores[has] = values[nps[winner[has]]]
    out["last_nps_score"] = _floats(scores)
    return out


def _pick_rows(codes: np.ndarray, stamps: np.ndarray, n: int, latest: bool) -> np.ndarray:
    """Per customer, the (relative) row with the latest/earliest timestamp; ties: the later/earlier row."""
    best = np.full(n, _MIN if latest else _MAX, dtype=np.int64)
    (np.maximum if latest else np.minimum).at(best, codes, stamps)
    candidates = np.flatnonzero(stamps == best[codes])
    winner = np.full(n, -1 if latest else _MAX, dtype=np.int64)
    (np.maximum if latest else np.minimum).at(winner, codes[candidates], candidates)
    if not latest:
        winner[winner == _MAX] = -1
    return winner


def rfm_scores(values: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Quintile scores 1-5 from the mid-rank percentile; equal values get equal scores.

    With ``r`` the average 1-based rank among ``N`` values, the score is
    ``floor(5 * (r - 0.5) / N) + 1``: 10 distinct values score 1,1,2,2,3,3,4,4,5,5.
    """
    size = len(values)
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    keyed = np.round(np.asarray(values, dtype=float), 6)
    if not higher_is_better:
        keyed = -keyed
    _, inverse, counts = np.unique(keyed, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts
    twice_rank = 2 * below + counts + 1
    return (5 * (twice_rank[inverse] - 1)) // (2 * size) + 1


RFM_INPUTS = ("days_since_last_order", "orders_365d", "monetary_365d")


def rfm_inputs(frame) -> dict[str, np.ndarray]:
    """The values RFM ranks, for the customers with orders: small columns that partitions
    hand in so that the quintiles can be ranked over all customers at once."""
    ranked = np.asarray(frame["orders_total"], dtype=np.int64) > 0
    return {name: np.asarray(frame[name].to_numpy(dtype=float, na_value=np.nan))[ranked]
            for name in RFM_INPUTS}


def rfm_from_inputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Quintile scores of the customers with orders, in the order of ``inputs``."""
    return {"rfm_r": rfm_scores(inputs["days_since_last_order"], False),
            "rfm_f": rfm_scores(inputs["orders_365d"], True),
            "rfm_m": rfm_scores(inputs["monetary_365d"], True)}


def rfm_columns(frame, scores: dict[str, np.ndarray]) -> dict[str, object]:
    """RFM feature columns from the scores of the frame's customers with orders."""
    none = np.asarray(frame["orders_total"], dtype=np.int64) == 0
    out = {}
    for name in ("rfm_r", "rfm_f", "rfm_m"):
        score = np.zeros(len(none), dtype=np.int64)
        score[~none] = scores[name]
        out[name] = score
    out["rfm_score"] = out["rfm_r"] + out["rfm_f"] + out["rfm_m"]
    return {name: _ints(score, none) for name, score in out.items()}


# --------------------------------------------------------------------------- custom features


def _where_frame(frame: pd.DataFrame, rows: np.ndarray | None, names, prefix: str) -> pd.DataFrame:
    """The columns a ``where:`` refers to, by plain name and as ``order.x``/``event.x``.

    Timestamps are given as naive local date-times, as expressions expect dates.
    """
    columns = {}
    for name in names:
        column = name[len(prefix) + 1:] if name.startswith(prefix + ".") else name
        if column not in frame:
            continue
        series = frame[column] if rows is None else frame[column].take(rows)
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            series = series.dt.tz_localize(None)
        columns[name] = series.reset_index(drop=True)
    length = len(frame) if rows is None else len(rows)
    return pd.DataFrame(columns, index=pd.RangeIndex(length))


def _aggregate(feature: FeatureDef, activity: _Activity, n: int, as_of: pd.Timestamp):
    """One custom aggregation over orders/events, vectorised on the customer codes."""
    keep = activity.stamps <= activity.instant(as_of)
    if feature.within_days is not None:
        keep &= activity.stamps > activity.instant(days_before(as_of, feature.within_days))
    rows = None if keep.all() else np.flatnonzero(keep)
    if feature.where is not None:
        scope = _where_frame(activity.frame, rows, feature.where.names, ACTIVITY_PREFIX[feature.source])
        match = np.asarray(feature.where.mask(scope, as_of), dtype=bool)
        base = np.arange(len(activity.frame)) if rows is None else rows
        rows = base[match]
    codes = activity.codes if rows is None else activity.codes[rows]
    stamps = activity.stamps if rows is None else activity.stamps[rows]
    column = feature.column if feature.column in activity.frame else None
    how = feature.aggregate
    if column is None:
        if how != "count":
            raise RuleError([_problem(feature, f"{feature.source} has no column '{feature.column}'")])
        return _ints(np.bincount(codes, minlength=n))
    values = activity.frame[column]
    values = values if rows is None else values.take(rows).reset_index(drop=True)
    present = values.notna().to_numpy()
    if how == "count":
        return _ints(np.bincount(codes[present], minlength=n))
    if how == "distinct":
        labels, uniques = pd.factorize(values)
        pairs = np.unique(codes[present] * max(len(uniques), 1) + labels[present])
        return _ints(np.bincount(pairs // max(len(uniques), 1), minlength=n))
    if how in ("first", "last"):
        winner = _pick_rows(codes[present], stamps[present], n, latest=how == "last")
        has = winner >= 0
        chosen = values[present].reset_index(drop=True)
        if not len(chosen):
            return _typed_output(pd.Series([None] * n, dtype=object), feature.type)
        picked = chosen.take(np.where(has, winner, 0)).reset_index(drop=True)
        return _typed_output(picked.where(pd.Series(has)), feature.type)
    return _numeric_or_ordered(how, values, present, codes, n, feature)


def _numeric_or_ordered(how: str, values: pd.Series, present: np.ndarray, codes: np.ndarray,
                        n: int, feature: FeatureDef):
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        values = values.dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(values.dtype) and how in ("min", "max"):
        i8 = values.to_numpy(dtype="datetime64[us]").view(np.int64)
        best = np.full(n, _MIN if how == "max" else _MAX, dtype=np.int64)
        (np.maximum if how == "max" else np.minimum).at(best, codes[present], i8[present])
        best[best == _MAX] = _MIN
        return pd.Series(best.view("datetime64[us]"))
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        counts = np.bincount(codes[present], minlength=n)
        if how == "sum":
            return _floats(np.bincount(codes[present], weights=numbers[present], minlength=n))
        if how == "avg":
            sums = np.bincount(codes[present], weights=numbers[present], minlength=n)
            with np.errstate(invalid="ignore", divide="ignore"):
                return _floats(sums / counts, counts == 0)
        best = np.full(n, -np.inf if how == "max" else np.inf)
        (np.maximum if how == "max" else np.minimum).at(best, codes[present], numbers[present])
        return _floats(best, counts == 0)
    if how in ("min", "max"):   # strings and the like: ordered comparison via pandas
        grouped = values[present].reset_index(drop=True).groupby(codes[present])
        result = (grouped.max() if how == "max" else grouped.min()).reindex(range(n))
        return _typed_output(result.reset_index(drop=True), feature.type)
    raise RuleError([_problem(feature, f"cannot {how} the non-numeric column '{feature.column}'")])


def _typed_output(series: pd.Series, kind: str):
    if kind == "number":
        return pd.to_numeric(series, errors="coerce").astype("Float64")
    if kind == "bool":
        return series.astype("boolean")
    if kind == "date":
        if isinstance(series.dtype, pd.DatetimeTZDtype):
            return series.dt.tz_localize(None)
        return pd.to_datetime(series, errors="coerce")
    return series.astype("string")


def _problem(feature: FeatureDef, message: str, hint: str = "") -> Problem:
    where = feature.location
    return Problem(where.file, where.line, where.column, message, hint)


def _dependencies(feature: FeatureDef, names: set[str]) -> list[str]:
    found = set(feature.depends_on)
    if feature.expr is not None:
        found |= set(feature.expr.names)
    return sorted((found & names) - {feature.name} | ({feature.name} & set(feature.depends_on)))


def feature_order(features: Mapping[str, FeatureDef], tiers: Mapping[str, TierDef] | None = None,
                  points: PointsDef | None = None) -> list[str]:
    """Custom features, "tier" (when tiers are given) and "points" (the points features) in
    an order where dependencies come first. The points depend on the tier when an earn rule
    multiplies by a computed tier; a stored tier's multiplier comes from the recorded history.

    Definition order is kept where dependencies allow; a cycle raises RuleError at the
    first feature of the cycle (or at ``points:`` when a tier and the points depend on each other).
    """
    names = set(features) | ({"tier"} if tiers else set()) | {"points"}

    def deps(used: set[str]) -> list[str]:
        return sorted((used & names) | ({"points"} if used & set(POINTS_FEATURES) else set()))

    graph = {name: [d for d in _dependencies(feature, names) if d != name] +
             (["points"] if set(_used(feature)) & set(POINTS_FEATURES) else [])
             for name, feature in features.items()}
    graph["points"] = []
    if points is not None:
        used = set()
        for rule in points.earn.values():
            used |= set(rule.amount.names) | (set(rule.where.names) if rule.where is not None else set())
            if rule.multiplier and tiers and not any(t.qualify is not None for t in tiers.values()):
                used.add("tier")
        graph["points"] = [d for d in deps(used) if d != "points"]
    if tiers:
        used = set().union(*(set(c.names) for t in tiers.values() for c in (t.where, t.qualify, t.retain)
                             if c is not None))
        graph["tier"] = deps(used)
    order: list[str] = []
    state: dict[str, int] = {}   # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            first = next((features[c] for c in cycle if c in features), None)
            message = "features depend on each other in a cycle: " + " -> ".join(cycle)
            if first is None:       # only tier and points: tiers from points that multiply the points
                where = points.location
                raise RuleError([Problem(where.file, where.line, where.column, message,
                                         "a tier decided by the points cannot multiply them: drop the "
                                         "multiplier or decide the tiers from spending")])
            raise RuleError([_problem(first, message, "break the cycle")])
        state[name] = 1
        for dep in graph[name]:
            visit(dep, path + [name])
        state[name] = 2
        order.append(name)

    for name in graph:
        visit(name, [])
    needed = points is not None or any("points" in deps for deps in graph.values())
    return order if needed else [name for name in order if name != "points"]


def _used(feature: FeatureDef) -> set[str]:
    return set(feature.depends_on) | (set(feature.expr.names) if feature.expr is not None else set())


def assign_tiers(program: Program, frame: pd.DataFrame, as_of: pd.Timestamp, timezone: str,
                 tiers: TierState | None = None) -> tuple[pd.Series, np.ndarray]:
    """The ``tier`` and ``tier_since`` columns: computed tiers decided now (``tier_since`` null),
    or stored tiers after this run's moves from what ``tiers`` recorded (see ``data.tiers``)."""
    if program.stored_tiers:
        decided = decide_tiers(program, frame, as_of, timezone, tiers)
        return decided.tier, decided.since
    return _tier(program.tiers, frame, as_of), np.full(len(frame), np.datetime64("NaT", "ns"))


def _tier(tiers: Mapping[str, TierDef], frame: pd.DataFrame, as_of: pd.Timestamp) -> pd.Series:
    """First tier (in definition order) whose condition is definitely true; null when none."""
    result = np.full(len(frame), None, dtype=object)
    assigned = np.zeros(len(frame), dtype=bool)
    for name, tier in tiers.items():
        hit = np.asarray(tier.where.mask(frame, as_of), dtype=bool) & ~assigned
        result[hit] = name
        assigned |= hit
    return pd.Series(result, index=frame.index, dtype="string")


# --------------------------------------------------------------------------- entry point


def compute_features(tables: Tables, program: Program, settings: Settings,
                     as_of: pd.Timestamp, history: PointsHistory | None = None,
                     tiers: TierState | None = None) -> pd.DataFrame:
    """One row per customer (tables.customers order): customer columns, built-ins, tier, RFM,
    points, custom. ``history``: what earlier runs granted and recorded (points, tier changes);
    ``tiers``: the members' stored tiers before this run (stored tiers only)."""
    frame = local_features(tables, program, settings, as_of)
    return finish_features(frame, program, settings, as_of, rfm_from_inputs(rfm_inputs(frame)), tables, history,
                           tiers)


def local_features(tables: Tables, program: Program, settings: Settings,
                   as_of: pd.Timestamp) -> pd.DataFrame:
    """Every feature that depends on a customer's own rows only: customer columns, the
    built-ins but RFM, and custom aggregations. A partition of customers computes these alone."""
    timezone = settings.timezone
    as_of = local_as_of(as_of, timezone)
    customers = tables.customers.reset_index(drop=True)
    n = len(customers)
    orders, events = _Activity.of(tables.orders), _Activity.of(tables.events)
    activity = {"orders": orders, "events": events}
    aggregated = [name for name in feature_order(program.features, program.tiers, program.points)
                  if name in program.features and program.features[name].expr is None]
    # the groups of features are independent numpy work, which runs outside the GIL: two at a time
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="loyalty-features") as pool:
        groups = [pool.submit(_order_features, orders, n, as_of, timezone),
                  pool.submit(_customer_features, customers, as_of),
                  pool.submit(_event_features, events, n, as_of)]
        custom = {name: pool.submit(_aggregate, program.features[name], activity[program.features[name].source],
                                    n, as_of) for name in aggregated}
        built = {}
        for group in groups:
            built.update(group.result())
        empty = pd.array(np.zeros(n, dtype=np.int64), dtype="Int64")
        built.update({name: empty for name in ("rfm_r", "rfm_f", "rfm_m", "rfm_score")})  # ranked later
        built["tier"] = pd.array([None] * n, dtype="string")
        built["tier_since"] = np.full(n, np.datetime64("NaT", "ns"))
        built.update(points_columns(Accounts.empty(n), timezone))      # computed later, in order
        columns = {name: built[name] for name in BUILTIN_FEATURES}
        frame = pd.concat([customers, pd.DataFrame(columns, index=customers.index)], axis=1)
        for name, job in custom.items():      # in dependency order: the first error is the one raised
            frame[name] = job.result()
    return frame


def finish_features(frame: pd.DataFrame, program: Program, settings: Settings, as_of: pd.Timestamp,
                    rfm: dict[str, np.ndarray], tables: Tables | None = None,
                    history: PointsHistory | None = None, tiers: TierState | None = None) -> pd.DataFrame:
    """Add RFM (from scores ranked over all customers), computed features, the tier and the
    points features, in dependency order; columns end in the same order whatever the
    partitioning. The points need ``tables`` (the same customers' orders, events and point
    redemptions) and ``history``; without them only what ``history`` granted counts. Stored
    tiers move from ``tiers`` (what earlier runs recorded of these customers; None: nothing),
    and their points multipliers follow the recorded changes (``history.tiers``; none: none yet)."""
    as_of = local_as_of(as_of, settings.timezone)
    if program.stored_tiers and (history is None or history.tiers is None):
        history = replace(history or PointsHistory(), tiers=PointsHistory.no_tier_changes())
    elif not program.stored_tiers and history is not None and history.tiers is not None:
        history = replace(history, tiers=None)          # computed tiers multiply at the tier of as_of
    for name, column in rfm_columns(frame, rfm).items():
        frame[name] = column
    order = feature_order(program.features, program.tiers, program.points)
    if "points" not in order:       # nothing reads them: grants and redemptions alone, first
        order = ["points"] + order
    decision: TierDecision | None = None
    for name in order:
        if name == "tier":
            if program.stored_tiers:     # decided once: evaluation takes these moves (``kept_moves``)
                decision = decide_tiers(program, frame, as_of, settings.timezone, tiers)
                frame["tier"], frame["tier_since"] = decision.tier, decision.since
            else:
                frame["tier"], frame["tier_since"] = assign_tiers(program, frame, as_of, settings.timezone)
            continue
        if name == "points":
            if program.points is not None or tables is not None or history is not None:
                found = member_accounts(program.points, tables, frame, as_of, settings.timezone, history)
                for column, values in points_columns(found, settings.timezone).items():
                    frame[column] = values
            continue
        feature = program.features[name]
        if feature.expr is not None:
            value = feature.expr.evaluate(frame, as_of)
            frame[name] = _typed_output(pd.Series(value, index=frame.index).reset_index(drop=True), feature.type) \
                if feature.type in ("number", "bool", "date", "string") else value
    custom = [name for name in order if name not in ("tier", "points")]
    frame = frame[[c for c in frame.columns if c not in custom] + custom]
    if decision is not None:
        keep_moves(frame, decision, program, as_of, settings.timezone, tiers)
    return frame
