"""Programme KPIs over a period, first-purchase cohorts, and the uplift of a campaign
(or of one A/B variant) over its holdout.

Every figure is a plain function of the loaded tables (orders, events, customers),
vectorised with pandas; the definitions are written for marketers in
docs/reporting.md. A ratio whose denominator is zero is ``None`` ("no data"),
never 0 or NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Mapping

import numpy as np
import pandas as pd

from engine.data.features import compute_features, local_as_of
from engine.errors import LoyaltyError

DEFAULT_PERIOD_DAYS = 90     # --from defaults to 90 days before --to
DEFAULT_WINDOW_DAYS = 30     # uplift: outcomes within 30 days of the send
MIN_GROUP = 30               # fewer customers than this in a group: "not enough data"
Z95 = 1.959963984540054      # standard normal quantile for a 95% interval
PROMOTER_MIN, DETRACTOR_MAX = 9, 6
NPS_SCALE = (0, 10)                          # NPS: 0-10, promoters 9-10, detractors 0-6
CSAT_SCALE, CSAT_SATISFIED_MIN = (1, 5), 4    # CSAT: share of 4s and 5s on a 1-5 scale
CES_SCALE = (1, 7)                           # CES: mean score on a 1-7 scale


# --------------------------------------------------------------------------- periods


@dataclass(frozen=True)
class Period:
    """Whole calendar days ``first_day .. last_day`` in the programme's timezone.

    ``start`` is local midnight of the first day, ``end`` local midnight after the
    last day (exclusive), both tz-aware.
    """

    first_day: date
    last_day: date
    timezone: str

    @property
    def start(self) -> pd.Timestamp:
        return pd.Timestamp(self.first_day).tz_localize(self.timezone)

    @property
    def end(self) -> pd.Timestamp:
        return pd.Timestamp(self.last_day + timedelta(days=1)).tz_localize(self.timezone)

    @property
    def days(self) -> int:
        return (self.last_day - self.first_day).days + 1

    @property
    def as_of(self) -> pd.Timestamp:
        """The last instant of the period (features and sizes are measured here)."""
        return self.end - pd.Timedelta(microseconds=1)

    def contains(self, stamps: pd.Series) -> np.ndarray:
        """Which tz-aware timestamps fall inside the period."""
        return ((stamps >= self.start) & (stamps < self.end)).to_numpy(dtype=bool)

    def previous(self) -> "Period":
        """The period of the same length just before this one (for churn)."""
        last = self.first_day - timedelta(days=1)
        return Period(last - timedelta(days=self.days - 1), last, self.timezone)

    def months(self) -> list["Period"]:
        """Calendar months overlapping the period, clipped to it (for trends)."""
        result, first = [], self.first_day
        while first <= self.last_day:
            following = (first.replace(day=1) + timedelta(days=32)).replace(day=1)
            result.append(Period(first, min(self.last_day, following - timedelta(days=1)), self.timezone))
            first = following
        return result

    def label(self) -> str:
        return f"{self.first_day.isoformat()} – {self.last_day.isoformat()}"


def _day(value: Any, name: str) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, date):
        return value if not isinstance(value, pd.Timestamp) else value.date()
    try:
        return pd.Timestamp(str(value)).date()
    except (ValueError, TypeError) as exc:
        raise LoyaltyError(f"--{name} '{value}' is not a date (write 2026-11-23)") from exc


def make_period(start: Any, end: Any, timezone: str, latest: pd.Timestamp | None = None) -> Period:
    """The report period: ``end`` defaults to the day of the latest order (today without
    orders), ``start`` to ``DEFAULT_PERIOD_DAYS`` days ending on ``end``."""
    last = _day(end, "to")
    if last is None:
        stamp = latest if latest is not None and not pd.isna(latest) else pd.Timestamp.now(tz=timezone)
        last = stamp.tz_convert(timezone).date()
    first = _day(start, "from") or last - timedelta(days=DEFAULT_PERIOD_DAYS - 1)
    if first > last:
        raise LoyaltyError(f"--from {first} is after --to {last}")
    return Period(first, last, timezone)


# --------------------------------------------------------------------------- KPIs


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def members_at(customers: pd.DataFrame, day: date) -> int:
    """Members on the books at the end of ``day``: signed up by then (or signup unknown)."""
    if "signup_date" not in customers:
        return int(len(customers))
    signup = pd.to_datetime(customers["signup_date"])
    return int((signup.isna() | (signup < pd.Timestamp(day + timedelta(days=1)))).sum())


def nps(events: pd.DataFrame, period: Period) -> dict:
    """NPS of the period: each customer's latest ``nps_response`` score in it counts once; a
    score that is not a whole number from 0 to 10 is ignored and counted (``nps_ignored``)."""
    latest, ignored = survey_answers(events, period, "nps_response", NPS_SCALE)
    if latest.empty:
        return {"nps": None, "responses": 0, "promoters": 0, "passives": 0, "detractors": 0,
                "nps_ignored": ignored}
    promoters = int((latest >= PROMOTER_MIN).sum())
    detractors = int((latest <= DETRACTOR_MAX).sum())
    n = int(len(latest))
    return {"nps": 100.0 * (promoters - detractors) / n, "responses": n, "promoters": promoters,
            "passives": n - promoters - detractors, "detractors": detractors, "nps_ignored": ignored}


def survey_answers(events: pd.DataFrame, period: Period, kind: str,
                   scale: tuple[int, int]) -> tuple[pd.Series, int]:
    """Each customer's latest ``kind`` answer in the period, and how many answers were ignored.

    An answer counts when its score is a whole number on ``scale`` (both ends included);
    any other score (missing, 0, 6 on a 1-5 scale, 4.5) is ignored, so that a bad export
    cannot tilt the figure, and counted so that the report can say so.
    """
    if events.empty or "score" not in events or "type" not in events:
        return pd.Series([], dtype=float), 0
    scores = pd.to_numeric(events["score"], errors="coerce").astype(float)
    asked = events["type"].eq(kind).to_numpy(dtype=bool, na_value=False) & period.contains(events["timestamp"])
    on_scale = (scores.between(*scale) & scores.eq(scores.round())).to_numpy(dtype=bool)
    keep = asked & on_scale
    answers = pd.DataFrame({"customer_id": events["customer_id"][keep], "timestamp": events["timestamp"][keep],
                            "score": scores[keep]})
    latest = answers.sort_values("timestamp", kind="stable").drop_duplicates("customer_id", keep="last")
    return latest["score"].reset_index(drop=True), int((asked & ~on_scale).sum())


def csat(events: pd.DataFrame, period: Period) -> dict:
    """CSAT of the period: share of satisfied answers (4 or 5 on 1-5) among ``csat_response``
    events, each customer's latest answer counting once, as NPS does."""
    latest, ignored = survey_answers(events, period, "csat_response", CSAT_SCALE)
    satisfied = int((latest >= CSAT_SATISFIED_MIN).sum())
    return {"csat": _ratio(satisfied, len(latest)), "csat_responses": len(latest),
            "csat_satisfied": satisfied, "csat_ignored": ignored}


def ces(events: pd.DataFrame, period: Period) -> dict:
    """CES of the period: mean score (1-7) of ``ces_response`` events, each customer's
    latest answer counting once."""
    latest, ignored = survey_answers(events, period, "ces_response", CES_SCALE)
    return {"ces": float(latest.mean()) if len(latest) else None, "ces_responses": len(latest),
            "ces_ignored": ignored}


def period_kpis(orders: pd.DataFrame, events: pd.DataFrame, customers: pd.DataFrame,
                period: Period) -> dict:
    """Repurchase and churn rate, purchase frequency, AOV, ARPU, historical CLV, NPS, CSAT, CES.

    A purchase is an order with a positive amount; an order with a negative amount is
    a refund: it lowers revenue and is not a purchase.
    """
    stamps, amounts = orders["timestamp"], orders["amount"].to_numpy(dtype=float)
    inside = period.contains(stamps)
    purchase = amounts > 0
    revenue = float(amounts[inside].sum())
    bought = orders["customer_id"][inside & purchase]
    per_buyer = bought.value_counts()
    buyers, purchases = int(len(per_buyer)), int(len(bought))
    before = period.previous()
    earlier = set(orders["customer_id"][before.contains(stamps) & purchase])
    churned = len(earlier - set(per_buyer.index))
    to_date = (stamps < period.end).to_numpy(dtype=bool)
    lifetime_buyers = orders["customer_id"][to_date & purchase].nunique()
    members = members_at(customers, period.last_day)
    result = {
        "members": members,
        "active_customers": buyers,
        "orders": purchases,
        "revenue": revenue,
        "repurchase_rate": _ratio((per_buyer >= 2).sum(), buyers),
        "churn_rate": _ratio(churned, len(earlier)),
        "churn_base": len(earlier),
        "purchase_frequency": _ratio(purchases, buyers),
        "aov": _ratio(amounts[inside & purchase].sum(), purchases),
        "arpu": _ratio(revenue, members),
        "historical_clv": _ratio(amounts[to_date].sum(), lifetime_buyers),
    }
    result.update(nps(events, period))
    result.update(csat(events, period))
    result.update(ces(events, period))
    return result


def tier_and_segment_sizes(tables, workspace, as_of: pd.Timestamp, recorded=None) -> dict:
    """Customers per tier (``none`` when no tier matched) and per segment at ``as_of``.

    ``recorded(as_of)``: what the runs up to ``as_of`` recorded, (points history, stored
    tiers), with stored tiers; without it nobody holds a stored tier yet."""

    program, settings = workspace.program, workspace.settings
    history, tiers = recorded(as_of) if recorded is not None else (None, None)
    features = compute_features(tables, program, settings, as_of, history, tiers)
    local = local_as_of(as_of, settings.timezone)
    tier = features["tier"].astype("object").where(features["tier"].notna(), "none")
    counts = tier.value_counts()
    tiers = {name: int(counts.get(name, 0)) for name in [*program.tiers, "none"]
             if name != "none" or counts.get("none", 0)}
    segments = {name: int(np.asarray(segment.where.mask(features, local), dtype=bool).sum())
                for name, segment in program.segments.items()}
    return {"tiers": tiers, "segments": segments}


def kpi_trend(orders: pd.DataFrame, events: pd.DataFrame, customers: pd.DataFrame,
              period: Period, sizes=None) -> list[dict]:
    """The KPIs of every calendar month of the period (months clipped to the period).

    ``sizes``, when given, is called with a month's last instant and its result
    (tier and segment sizes) is added to that month.
    """
    months = []
    for month in period.months():
        row = {"month": month.first_day.strftime("%Y-%m"), "from": month.first_day.isoformat(),
               "to": month.last_day.isoformat(), **period_kpis(orders, events, customers, month)}
        if sizes is not None:
            row.update(sizes(month.as_of))
        months.append(row)
    return months


# --------------------------------------------------------------------------- cohorts


def _month_number(stamps: pd.Series, timezone: str) -> np.ndarray:
    """Calendar month of each instant in the programme's timezone, as year * 12 + month - 1."""
    local = stamps.dt.tz_convert(timezone)
    return (local.dt.year * 12 + local.dt.month - 1).to_numpy(dtype=np.int64)


def cohort_retention(orders: pd.DataFrame, period: Period) -> list[dict]:
    """Customers grouped by the month of their first purchase (ever) when it falls in the
    period, and per cohort the share who bought again in month 0 (the first month itself,
    a second purchase), 1, 2, ... up to the period's last month.

    Orders after the period are ignored; a refund is not a purchase.
    """
    stamps = orders["timestamp"]
    keep = (orders["amount"].to_numpy(dtype=float) > 0) & (stamps < period.end).to_numpy(dtype=bool)
    if not keep.any():
        return []
    bought = pd.DataFrame({"customer_id": orders["customer_id"][keep].astype(str).to_numpy(),
                           "timestamp": stamps[keep].reset_index(drop=True),
                           "month": _month_number(stamps[keep], period.timezone)})
    first = bought.groupby("customer_id")["timestamp"].transform("min")
    bought["cohort"] = bought.groupby("customer_id")["month"].transform("min")
    bought = bought[(first >= period.start).to_numpy()]
    if bought.empty:
        return []
    bought["offset"] = bought["month"] - bought["cohort"]
    per_month = bought.groupby(["cohort", "customer_id", "offset"]).size().rename("purchases").reset_index()
    again = per_month[(per_month["offset"] > 0) | (per_month["purchases"] >= 2)]
    active = again.groupby(["cohort", "offset"]).size().unstack(fill_value=0)
    sizes = per_month.groupby("cohort")["customer_id"].nunique()
    last = int(_month_number(pd.Series([period.as_of]), period.timezone)[0])
    active = active.reindex(index=sizes.index, columns=range(last - int(sizes.index.min()) + 1), fill_value=0)
    return [{"cohort": f"{cohort // 12:04d}-{cohort % 12 + 1:02d}", "customers": int(size),
             "retention": [{"month": m, "customers": int(active.at[cohort, m]),
                            "share": float(active.at[cohort, m]) / float(size)}
                           for m in range(last - int(cohort) + 1)]}
            for cohort, size in sizes.items()]


# --------------------------------------------------------------------------- uplift


def t_quantile(p: float, df: float) -> float:
    """Student t quantile (Cornish-Fisher expansion around the normal; |error| < 1e-4 for df >= 5)."""
    z = _normal_quantile(p)
    if not math.isfinite(df) or df > 1e7:
        return z
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, refined by one Newton step)."""
    a = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
         1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
    b = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
         6.680131188771972e+01, -1.328068155288572e+01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
         -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)
    q = min(p, 1 - p)
    if q < 0.02425:
        r = math.sqrt(-2 * math.log(q))
        x = (((((c[0] * r + c[1]) * r + c[2]) * r + c[3]) * r + c[4]) * r + c[5]) / \
            ((((d[0] * r + d[1]) * r + d[2]) * r + d[3]) * r + 1)
    else:
        r = (q - 0.5) ** 2
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * (q - 0.5) / \
            (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    x = x if p <= 0.5 else -x
    error = 0.5 * math.erfc(-x / math.sqrt(2)) - p
    return x - error * math.sqrt(2 * math.pi) * math.exp(x * x / 2)


def _not_enough(metric: str, n_treated: int, n_holdout: int, min_group: int) -> dict:
    return {"metric": metric, "enough_data": False, "treated_n": n_treated, "holdout_n": n_holdout,
            "treated": None, "holdout": None, "difference": None, "low": None, "high": None,
            "note": f"not enough data ({n_treated} treated, {n_holdout} held out; "
                    f"{min_group} needed in each group)"}


def compare_proportions(treated: np.ndarray, holdout: np.ndarray, metric: str = "repurchase_rate",
                        min_group: int = MIN_GROUP) -> dict:
    """Difference of two proportions with a 95% Wald interval."""
    treated, holdout = np.asarray(treated, dtype=bool), np.asarray(holdout, dtype=bool)
    n1, n2 = len(treated), len(holdout)
    if n1 < min_group or n2 < min_group:
        return _not_enough(metric, n1, n2, min_group)
    p1, p2 = treated.mean(), holdout.mean()
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    diff = p1 - p2
    return {"metric": metric, "enough_data": True, "treated_n": n1, "holdout_n": n2,
            "treated": float(p1), "holdout": float(p2), "difference": float(diff),
            "low": float(diff - Z95 * se), "high": float(diff + Z95 * se), "note": ""}


def compare_means(treated: np.ndarray, holdout: np.ndarray, metric: str = "spend",
                  min_group: int = MIN_GROUP) -> dict:
    """Difference of two means with a 95% Welch interval (Welch-Satterthwaite degrees of freedom)."""
    treated, holdout = np.asarray(treated, dtype=float), np.asarray(holdout, dtype=float)
    n1, n2 = len(treated), len(holdout)
    if n1 < min_group or n2 < min_group:
        return _not_enough(metric, n1, n2, min_group)
    m1, m2 = treated.mean(), holdout.mean()
    v1, v2 = treated.var(ddof=1) / n1, holdout.var(ddof=1) / n2
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1)) if se > 0 else math.inf
    half = t_quantile(0.975, df) * se
    diff = m1 - m2
    return {"metric": metric, "enough_data": True, "treated_n": n1, "holdout_n": n2,
            "treated": float(m1), "holdout": float(m2), "difference": float(diff),
            "low": float(diff - half), "high": float(diff + half), "df": float(df), "note": ""}


def window_outcomes(units: pd.DataFrame, orders: pd.DataFrame, days: int) -> pd.DataFrame:
    """For each unit (customer_id, start): did the customer buy, and how much did they
    spend (net), in ``start < t <= start + days``? Same index as ``units``."""
    result = pd.DataFrame({"repurchased": np.zeros(len(units), dtype=bool),
                           "spend": np.zeros(len(units), dtype=float)}, index=units.index)
    if units.empty or orders.empty:
        return result
    left = pd.DataFrame({"unit": np.arange(len(units)), "customer_id": units["customer_id"].astype(str).to_numpy(),
                         "start": pd.to_datetime(units["start"], utc=True).to_numpy()})
    right = pd.DataFrame({"customer_id": orders["customer_id"].astype(str).to_numpy(),
                          "timestamp": orders["timestamp"].dt.tz_convert("UTC").to_numpy(),
                          "amount": orders["amount"].to_numpy(dtype=float)})
    joined = left.merge(right, on="customer_id", how="inner")
    inside = (joined["timestamp"] > joined["start"]) & \
             (joined["timestamp"] <= joined["start"] + pd.Timedelta(days=days))
    joined = joined[inside]
    spend = joined.groupby("unit")["amount"].sum()
    bought = joined[joined["amount"] > 0].groupby("unit").size()
    result.iloc[spend.index.to_numpy(), result.columns.get_loc("spend")] = spend.to_numpy()
    result.iloc[bought.index.to_numpy(), result.columns.get_loc("repurchased")] = True
    return result


def uplift(treated: pd.DataFrame, holdout: pd.DataFrame, orders: pd.DataFrame,
           days: int = DEFAULT_WINDOW_DAYS, min_group: int = MIN_GROUP, *,
           observed_until: pd.Timestamp | None = None, timezone: str = "UTC") -> dict:
    """Uplift of treated over held-out customers on repurchase rate and spend within ``days``.

    ``treated`` and ``holdout`` have customer_id and start (the send time; a held-out
    customer's virtual send time). Each customer counts once, at their first start;
    a customer found in both groups is left out of both.

    ``observed_until`` is the last instant the data can show (default: the latest order);
    orders after it are ignored. When some customer's window ends after it, the window
    is not over: ``window_complete`` is false and each figure says so in its note, and a
    figure whose interval has no width (nothing could have happened yet) is not given.
    """
    treated, holdout = _first_start(treated), _first_start(holdout)
    both = set(treated["customer_id"]) & set(holdout["customer_id"])
    treated = treated[~treated["customer_id"].isin(both)].reset_index(drop=True)
    holdout = holdout[~holdout["customer_id"].isin(both)].reset_index(drop=True)
    if observed_until is None and len(orders):
        observed_until = orders["timestamp"].max()
    if observed_until is not None:
        orders = orders[(orders["timestamp"] <= observed_until).to_numpy(dtype=bool)]
    starts = [pd.to_datetime(g["start"], utc=True) for g in (treated, holdout) if len(g)]
    window = uplift_window(pd.concat(starts) if starts else pd.Series([], dtype="datetime64[ns, UTC]"),
                           days, observed_until, timezone)
    a, b = window_outcomes(treated, orders, days), window_outcomes(holdout, orders, days)
    rate = compare_proportions(a["repurchased"].to_numpy(), b["repurchased"].to_numpy(),
                               "repurchase_rate", min_group)
    spend = compare_means(a["spend"].to_numpy(), b["spend"].to_numpy(), "spend", min_group)
    return {"window_days": days, "treated_n": len(treated), "holdout_n": len(holdout),
            "enough_data": len(treated) >= min_group and len(holdout) >= min_group,
            "repurchase_rate": with_window(rate, window), "spend": with_window(spend, window), **window}


def uplift_window(starts: pd.Series, days: int, observed_until: pd.Timestamp | None, timezone: str) -> dict:
    """Is the window of ``days`` after every (virtual) send (tz-aware ``starts``) over by
    ``observed_until``? ``window_ends`` is the local day the last window ends."""
    if starts.empty or observed_until is None:
        return {"window_complete": True, "window_ends": None, "window_note": ""}
    ends = pd.Timestamp(starts.max()) + pd.Timedelta(days=days)
    day = ends.tz_convert(timezone).date().isoformat()
    complete = bool(ends <= pd.Timestamp(observed_until))
    note = "" if complete else f"the {days}-day window after the send is not over yet (ends {day})"
    return {"window_complete": complete, "window_ends": day, "window_note": note}


_FIGURES = ("treated", "holdout", "difference", "low", "high", "df")


def with_window(comparison: dict, window: Mapping) -> dict:
    """A comparison marked with whether its window is over, and ``status``: ``measured``,
    ``not_enough_data``, or ``window_not_over`` (the window is not over and the interval
    has no width, as when no order could have happened yet: no "+0.0 (0 to 0)" then)."""
    result = {**comparison, "window_complete": window["window_complete"], "window_ends": window["window_ends"],
              "status": "measured" if comparison["enough_data"] else "not_enough_data"}
    if window["window_complete"]:
        return result
    if not comparison["enough_data"]:
        return {**result, "note": f"{comparison['note']}; {window['window_note']}"}
    if comparison["low"] == comparison["high"]:
        return {**result, **{k: None for k in _FIGURES if k in comparison}, "enough_data": False,
                "status": "window_not_over", "note": window["window_note"]}
    return {**result, "note": f"so far: {window['window_note']}"}


def _first_start(units: pd.DataFrame) -> pd.DataFrame:
    if units.empty:
        return pd.DataFrame({"customer_id": pd.Series([], dtype=str),
                             "start": pd.Series([], dtype="datetime64[ns, UTC]")})
    frame = pd.DataFrame({"customer_id": units["customer_id"].astype(str).to_numpy(),
                          "start": pd.to_datetime(units["start"], utc=True, format="ISO8601").to_numpy()})
    return frame.sort_values("start", kind="stable").drop_duplicates("customer_id").reset_index(drop=True)


def rounded(value: Any, digits: int = 4) -> Any:
    """Plain JSON-friendly numbers: floats rounded, numpy scalars unwrapped."""
    if isinstance(value, Mapping):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, digits)
    return value
