"""`loyalty report`: campaign results, uplift over holdout (per campaign and per A/B
variant), programme KPIs and first-purchase cohorts, assembled once as plain data and
shown as terminal tables, JSON or one HTML file.

The HTML report is self-contained: no network, no scripts, charts drawn here as
inline SVG. Every number drawn also sits in the markup as text and as a
``data-value`` attribute, so people can read it and tests can check it.
"""

from __future__ import annotations

from datetime import datetime
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
from rich.console import Console
from rich.table import Table

from engine.app.kpis import (
    CES_SCALE,
    CSAT_SCALE,
    DEFAULT_WINDOW_DAYS,
    MIN_GROUP,
    NPS_SCALE,
    Period,
    cohort_retention,
    kpi_trend,
    make_period,
    period_kpis,
    rounded,
    tier_and_segment_sizes,
    uplift,
)
from engine.app.points import points_summary
from engine.app.validation import load_workspace
from engine.data.points import PointsHistory
from engine.data.sources import load_tables
from engine.state.redemptions import (
    all_redemptions,
    campaign_results,
    instants,
    match_order_redemptions,
    offer_outcomes,
)
from engine.state.store import StateStore

# metric -> (中文, English, kind); kind picks the number format
LABELS: dict[str, tuple[str, str, str]] = {
    "members": ("会员数", "Members", "count"),
    "active_customers": ("活跃购买客户", "Active customers", "count"),
    "orders": ("订单数", "Orders", "count"),
    "revenue": ("收入", "Revenue", "money"),
    "repurchase_rate": ("复购率", "Repurchase rate", "percent"),
    "churn_rate": ("流失率", "Churn rate", "percent"),
    "purchase_frequency": ("购买频次", "Purchase frequency", "number"),
    "aov": ("客单价", "Average order value", "money"),
    "arpu": ("每会员收入", "ARPU", "money"),
    "historical_clv": ("历史客户终身价值", "Historical CLV", "money"),
    "nps": ("净推荐值", "NPS", "number"),
    "responses": ("NPS 答卷", "NPS responses", "count"),
    "csat": ("客户满意度", "CSAT", "percent"),
    "csat_responses": ("CSAT 答卷", "CSAT responses", "count"),
    "ces": ("客户费力度", "CES", "number"),
    "ces_responses": ("CES 答卷", "CES responses", "count"),
    "spend": ("消费额", "Spend", "money"),
    "offers": ("发放", "Offers", "count"),
    "delivered": ("已送达", "Delivered", "count"),
    "failed": ("发送失败", "Failed", "count"),
    "redeemed": ("已核销", "Redeemed", "count"),
    "redemption_rate": ("核销率", "Redemption rate", "percent"),
    "cost": ("奖励成本", "Reward cost", "money"),
    "roi": ("投资回报率", "ROI", "percent"),
}
KPI_CARDS = ("members", "active_customers", "orders", "revenue", "repurchase_rate", "churn_rate",
             "purchase_frequency", "aov", "arpu", "historical_clv", "nps", "csat", "ces")
TREND_KPIS = ("repurchase_rate", "churn_rate", "purchase_frequency", "aov", "arpu", "nps", "csat", "ces")
# survey KPIs a programme may not collect: trended only when the period has answers
SURVEY_KPIS = {"csat": ("csat_response", CSAT_SCALE), "ces": ("ces_response", CES_SCALE)}


# --------------------------------------------------------------------------- assembling


def _holdouts(store) -> pd.DataFrame:
    columns = ["campaign", "customer_id", "firing_key", "group", "run_id", "as_of"]
    if store is not None and hasattr(store, "holdouts_frame"):
        return store.holdouts_frame()
    if store is None or not store.db["holdouts"].exists():
        return pd.DataFrame({c: pd.Series([], dtype="object") for c in columns})
    frame = pd.DataFrame(list(store.db.query("SELECT * FROM holdouts")))
    return frame.rename(columns={"holdout_group": "group"}).reindex(columns=columns)


def _state(workspace):
    """Offers, codes, stored redemptions and holdouts (empty when nothing was run yet)."""

    path = workspace.settings.state_path
    if not path.exists():
        empty = pd.DataFrame({c: pd.Series([], dtype="object") for c in
                              ["offer_id", "run_id", "campaign", "customer_id", "channel", "variant", "cost",
                               "send_at", "as_of", "status", "attempts", "sent_at"]})
        codes = pd.DataFrame({c: pd.Series([], dtype="object")
                              for c in ["code", "offer_id", "campaign", "customer_id", "expires_at"]})
        return empty, codes, None, _holdouts(None)
    store = StateStore(path)
    try:
        return store.offers_frame(), store.coupon_codes(), store.redemptions(), _holdouts(store)
    finally:
        store.close()


def _recorded_tiers(store: StateStore):
    """(points history, stored tiers) as the runs up to an instant left them: the tiers a report counts."""

    def at(as_of: pd.Timestamp):
        through = as_of.tz_convert("UTC").isoformat(timespec="seconds")
        after = (as_of + pd.Timedelta(seconds=1)).tz_convert("UTC").isoformat(timespec="seconds")
        return PointsHistory(tiers=store.tier_changes(through=through)), store.tier_state(before=after)
    return at


def _latest(orders: pd.DataFrame, offers: pd.DataFrame, holdouts: pd.DataFrame) -> pd.Timestamp | None:
    """The latest order, send or holdout instant: the default end of the report period."""
    stamps = [orders["timestamp"].max()] if len(orders) else []
    for frame, column in ((offers, "send_at"), (holdouts, "as_of")):
        if len(frame):
            stamps.append(pd.to_datetime(frame[column], utc=True, format="ISO8601").max())
    stamps = [pd.Timestamp(s).tz_convert("UTC") for s in stamps if not pd.isna(s)]
    return max(stamps) if stamps else None


def _in_period(stamps: pd.Series, period: Period) -> pd.Series:
    utc = instants(stamps, period.timezone)
    return (utc >= period.start) & (utc < period.end)


def build_report(root: Path | str, start: Any = None, end: Any = None, *,
                 window_days: int = DEFAULT_WINDOW_DAYS, min_group: int = MIN_GROUP,
                 attribution_days: Mapping[str, int] | None = None) -> dict:
    """Everything `loyalty report` shows, as plain JSON-ready data. Never writes state.

    Offers count in the period when their ``send_at`` falls in it, held-out
    firings when their ``as_of`` does; KPIs use the orders and events of the period.
    """

    workspace = load_workspace(root)
    settings, program = workspace.settings, workspace.program
    tables = load_tables(settings, workspace.root)
    orders = tables.orders
    offers, codes, stored, holdouts = _state(workspace)
    period = make_period(start, end, settings.timezone, _latest(orders, offers, holdouts))
    matched = match_order_redemptions(orders, codes, offers, settings.timezone, attribution_days)
    redemptions = all_redemptions(stored, matched)

    offers = offers[_in_period(offers["send_at"], period).to_numpy()]
    holdouts = holdouts[_in_period(holdouts["as_of"], period).to_numpy()]
    names = {cid: c.name for cid, c in program.campaigns.items()}
    campaigns = campaign_results(offer_outcomes(offers, codes, redemptions), names)
    _add_uplift(campaigns, offers, holdouts, orders, period, window_days, min_group)

    store = StateStore(settings.state_path) if program.stored_tiers and settings.state_path.exists() else None
    try:
        def sizes(as_of):
            return tier_and_segment_sizes(tables, workspace, as_of, _recorded_tiers(store) if store else None)

        kpis = {**period_kpis(orders, tables.events, tables.customers, period), **sizes(period.as_of)}
        trend = kpi_trend(orders, tables.events, tables.customers, period, sizes)
    finally:
        if store is not None:
            store.close()
    quiet = [c["id"] for c in campaigns if not c["offers"] and not c["uplift"]["holdout_n"]]
    campaigns = [c for c in campaigns if c["id"] not in quiet]
    warnings = list(tables.warnings) + _survey_warnings(kpis)
    if not settings.state_path.exists():
        warnings.append("no runs recorded yet (no state database): campaign results are empty")
    return rounded({
        "programme": {"name": settings.name, "currency": settings.currency, "timezone": settings.timezone},
        "period": {"from": period.first_day.isoformat(), "to": period.last_day.isoformat(), "days": period.days},
        "generated_at": datetime.now(dt_timezone.utc).isoformat(timespec="seconds"),
        "window_days": window_days,
        "min_group": min_group,
        "kpis": kpis,
        "trend": trend,
        "campaigns": campaigns,
        "campaigns_without_offers": quiet,
        "redemptions_by_day": _redemptions_by_day(redemptions, period),
        "cohorts": cohort_retention(orders, period),
        "points": points_summary(workspace, tables, period.start - pd.Timedelta(microseconds=1), period.as_of),
        "warnings": warnings,
    })


def _add_uplift(campaigns: list[dict], offers: pd.DataFrame, holdouts: pd.DataFrame, orders: pd.DataFrame,
                period: Period, window_days: int, min_group: int) -> None:
    """Each campaign's uplift over its holdout, and each A/B variant's: the variant's treated
    customers against the whole campaign's holdout group.

    Outcomes are seen up to the end of the period or the latest order, whichever is
    earlier: a window not over by then is said to be so, per campaign and per variant.
    """
    latest = orders["timestamp"].max() if len(orders) else None
    observed_until = min(period.as_of, latest) if latest is not None and not pd.isna(latest) else period.as_of
    treated_all = offers[offers["status"] != "suppressed"]
    variants = treated_all["variant"].astype("object").where(treated_all["variant"].notna(), "-").astype(str)

    def measure(treated: pd.DataFrame, held: pd.DataFrame) -> dict:
        return uplift(pd.DataFrame({"customer_id": treated["customer_id"], "start": treated["send_at"]}),
                      pd.DataFrame({"customer_id": held["customer_id"], "start": held["as_of"]}),
                      orders, window_days, min_group, observed_until=observed_until, timezone=period.timezone)

    for row in campaigns:
        mine = (treated_all["campaign"] == row["id"]).to_numpy(dtype=bool)
        held = holdouts[holdouts["campaign"] == row["id"]]
        row["uplift"] = measure(treated_all[mine], held)
        for variant in row["variants"]:
            variant["uplift"] = measure(treated_all[mine & (variants == variant["variant"]).to_numpy()], held)


def _survey_warnings(kpis: Mapping) -> list[str]:
    """Survey answers left out because their score is off the scale, said plainly."""
    warnings = []
    for key, (kind, (low, high)) in {"nps": ("nps_response", NPS_SCALE), **SURVEY_KPIS}.items():
        if kpis.get(f"{key}_ignored"):
            warnings.append(f"{kpis[f'{key}_ignored']} {kind} answer(s) in the period ignored for "
                            f"{LABELS[key][1]}: the score is not a whole number from {low} to {high}")
    return warnings


def _redemptions_by_day(redemptions: pd.DataFrame, period: Period) -> list[dict]:
    """Redemptions and their revenue per local day of the period (days without any omitted)."""
    if redemptions.empty:
        return []
    at = instants(redemptions["redeemed_at"], period.timezone)
    keep = ((at >= period.start) & (at < period.end)).to_numpy()
    if not keep.any():
        return []
    frame = pd.DataFrame({"date": at[keep].dt.tz_convert(period.timezone).dt.strftime("%Y-%m-%d"),
                          "amount": pd.to_numeric(redemptions["amount"][keep], errors="coerce").fillna(0.0)})
    grouped = frame.groupby("date").agg(count=("amount", "size"), revenue=("amount", "sum"))
    return [{"date": d, "count": int(r["count"]), "revenue": float(r["revenue"])} for d, r in grouped.iterrows()]


# --------------------------------------------------------------------------- formatting


def format_value(value: Any, kind: str, currency: str = "") -> str:
    """A number as people read it: 12.5%, 1,234.50 CNY, 3.2; "–" for no data."""
    if value is None:
        return "–"
    if kind == "percent":
        return f"{value * 100:.1f}%"
    if kind == "money":
        return f"{value:,.2f}" + (f" {currency}" if currency else "")
    if kind == "count":
        return f"{int(value):,}"
    return f"{value:,.2f}"


def label_of(key: str, sep: str = " / ") -> str:
    zh, en, _ = LABELS.get(key, (key, key, "number"))
    return f"{zh}{sep}{en}"


def kind_of(key: str) -> str:
    return LABELS.get(key, ("", "", "number"))[2]


def uplift_text(comparison: Mapping, currency: str = "") -> str:
    """One line: the difference and its 95% interval, or why there is none; a window
    that is not over yet is said so after the figures ("so far: ...")."""
    if not comparison["enough_data"]:
        return comparison["note"]
    if comparison["metric"] == "repurchase_rate":
        fmt = lambda v: f"{v * 100:+.1f} pp"   # noqa: E731
    else:
        fmt = lambda v: f"{v:+,.2f}" + (f" {currency}" if currency else "")   # noqa: E731
    text = (f"{fmt(comparison['difference'])} (95% CI {fmt(comparison['low'])} to {fmt(comparison['high'])}; "
            f"n = {comparison['treated_n']} treated / {comparison['holdout_n']} holdout)")
    return f"{text}; {comparison['note']}" if comparison.get("note") else text


def uplift_rows(campaigns: list[dict]) -> list[tuple[str, str, Mapping]]:
    """(campaign id, variant or "", uplift) for each campaign, followed by its A/B variants."""
    return [row for c in campaigns for row in
            [(c["id"], "", c["uplift"])] + [(c["id"], v["variant"], v["uplift"]) for v in c["variants"]]]


def trended_kpis(trend: list[dict]) -> list[str]:
    """The KPIs shown month by month: survey KPIs (CSAT, CES) only when some month has answers."""
    return [k for k in TREND_KPIS if k not in SURVEY_KPIS or any(m.get(k) is not None for m in trend)]


# --------------------------------------------------------------------------- terminal


def print_report(report: Mapping, console=None) -> None:
    """The report as rich tables in the terminal."""

    console = console or Console(width=160, soft_wrap=False, highlight=False)
    currency = report["programme"]["currency"]
    period = report["period"]
    console.print(f"{report['programme']['name']}: {period['from']} – {period['to']} ({period['days']} days)")
    kpis = report["kpis"]
    table = Table("KPI", "value", title="Programme KPIs / 会员计划指标")
    for key in KPI_CARDS:
        table.add_row(label_of(key), format_value(kpis.get(key), kind_of(key), currency))
    console.print(table)
    sizes = Table("tier / segment", "customers", title="Tiers and segments / 等级与分群")
    for name, count in kpis["tiers"].items():
        sizes.add_row(f"tier {name}", f"{count:,}")
    for name, count in kpis["segments"].items():
        sizes.add_row(f"segment {name}", f"{count:,}")
    console.print(sizes)
    results = Table("campaign", "variant", "offers", "delivered", "failed", "redeemed", "rate", "revenue",
                    "cost", "ROI", title="Campaign results / 活动效果")
    for c in report["campaigns"]:
        for row, variant in [(c, "all")] + [(v, v["variant"]) for v in c["variants"]]:
            results.add_row(c["id"] if variant == "all" else "", variant, *(f"{row[k]:,}" for k in
                            ("offers", "delivered", "failed", "redeemed")),
                            format_value(row["redemption_rate"], "percent"), format_value(row["revenue"], "money"),
                            format_value(row["cost"], "money"), format_value(row["roi"], "percent"))
    console.print(results)
    lift = Table("campaign", "variant", "repurchase rate uplift", "spend uplift",
                 title=f"Uplift over holdout within {report['window_days']} days / 相对对照组的提升")
    for campaign, variant, result in uplift_rows(report["campaigns"]):
        lift.add_row(campaign if not variant else "", variant or "all",
                     uplift_text(result["repurchase_rate"]), uplift_text(result["spend"], currency))
    console.print(lift)
    keys = trended_kpis(report["trend"])
    trend = Table("month", *(LABELS[k][1] for k in keys), title="Monthly trend / 月度趋势")
    for month in report["trend"]:
        trend.add_row(month["month"], *(format_value(month.get(k), kind_of(k)) for k in keys))
    console.print(trend)
    _print_cohorts(report.get("cohorts", []), console)
    _print_points(report.get("points"), currency, console)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def points_rows(points: Mapping, currency: str) -> list[tuple[str, str]]:
    """(label, value) lines of the report's points section."""
    period = points["period"]
    breakage = "-" if points["breakage"] is None else format_value(points["breakage"], "percent")
    return [
        ("积分余额 / Points outstanding", f"{points['outstanding']:,}"),
        ("积分负债 / Liability", format_value(points["liability"], "money", currency)),
        ("30天内到期 / Expiring in 30 days", f"{points['expiring_30d']:,} "
                                            f"({format_value(points['expiring_30d_value'], 'money', currency)})"),
        ("期间获得 / Earned in the period", f"{period['earned']:,}"),
        ("期间兑换 / Redeemed in the period", f"{period['redeemed']:,}"),
        ("期间过期 / Expired in the period", f"{period['expired']:,}"),
        ("过期率 / Breakage (expired / earned, all time)", breakage),
    ]


def _print_points(points: Mapping | None, currency: str, console) -> None:
    if not points:
        return
    table = Table("", "value", title=f"Points / 积分 (1 point = {points['point_value']:g} {currency})")
    for label, value in points_rows(points, currency):
        table.add_row(label, value)
    console.print(table)


def _print_cohorts(cohorts: list[dict], console) -> None:
    """Cohort retention as a table: a row per first-purchase month, a column per month since."""
    if not cohorts:
        return
    months = max(len(c["retention"]) for c in cohorts)
    table = Table("cohort", "customers", *(f"M{m}" for m in range(months)),
                  title="Cohort retention: share who bought again / 首购同期群留存")
    for c in cohorts:
        table.add_row(c["cohort"], f"{c['customers']:,}",
                      *(format_value(cell["share"], "percent") for cell in c["retention"]))
    console.print(table)


# --------------------------------------------------------------------------- SVG charts
