"""`loyalty report`: campaign results, uplift over holdout (per campaign and per A/B
variant), programme KPIs and first-purchase cohorts, assembled once as plain data and
shown as terminal tables, JSON or one HTML file.

The HTML report is self-contained: no network, no scripts, charts drawn here as
inline SVG. Every number drawn also sits in the markup as text and as a
``data-value`` attribute, so people can read it and tests can check it.
"""

from __future__ import annotations

import html
from datetime import date, datetime, timedelta
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
    Period,
    cohort_retention,
    kpi_trend,
    make_period,
    period_kpis,
    rounded,
    tier_and_segment_sizes,
    uplift,
)
from engine.app.validation import load_workspace
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

    def sizes(as_of):
        return tier_and_segment_sizes(tables, workspace, as_of)

    kpis = {**period_kpis(orders, tables.events, tables.customers, period), **sizes(period.as_of)}
    trend = kpi_trend(orders, tables.events, tables.customers, period, sizes)
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
    for key, (kind, (low, high)) in SURVEY_KPIS.items():
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


def _label(key: str, sep: str = " / ") -> str:
    zh, en, _ = LABELS.get(key, (key, key, "number"))
    return f"{zh}{sep}{en}"


def _kind(key: str) -> str:
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
        table.add_row(_label(key), format_value(kpis.get(key), _kind(key), currency))
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
        trend.add_row(month["month"], *(format_value(month.get(k), _kind(k)) for k in keys))
    console.print(trend)
    _print_cohorts(report.get("cohorts", []), console)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


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

_E = html.escape
PALETTE = ("#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d")


def _svg(chart: str, width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg class="chart" data-chart="{_E(chart)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_E(title)}"><title>{_E(title)}</title>' + "".join(body) + "</svg>")


def bar_chart(chart: str, items: list[tuple[str, float, str]], title: str, width: int = 560) -> str:
    """Horizontal bars: (label, value, shown text) each."""
    row, left = 26, 190
    height = row * max(len(items), 1) + 10
    top = max([v for _, v, _ in items] + [0]) or 1
    body = []
    for i, (label, value, text) in enumerate(items):
        y = 5 + i * row
        length = max(0.0, (width - left - 110) * (value / top))
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" class="label">{_E(label)}</text>'
                    f'<rect class="bar" data-label="{_E(label)}" data-value="{value}" x="{left}" y="{y}" '
                    f'width="{length:.1f}" height="{row - 8}" fill="{PALETTE[i % len(PALETTE)]}"/>'
                    f'<text x="{left + length + 6:.1f}" y="{y + 15}" class="value">{_E(text)}</text>')
    return _svg(chart, width, height, body, title)


def column_chart(chart: str, points: list[tuple[str, float]], title: str, width: int = 720,
                 height: int = 220) -> str:
    """Vertical bars over time, one per labelled point (dates)."""
    left, bottom, top_pad = 50, 30, 20
    top = max([v for _, v in points] + [0]) or 1
    step = (width - left - 10) / max(len(points), 1)
    body = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - 5}" y2="{height - bottom}" stroke="#999"/>',
            f'<text x="{left - 6}" y="{top_pad + 4}" text-anchor="end" class="axis">{top:g}</text>',
            f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end" class="axis">0</text>']
    every = max(1, len(points) // 8)
    for i, (label, value) in enumerate(points):
        h = (height - bottom - top_pad) * value / top
        x = left + i * step
        body.append(f'<rect class="bar" data-label="{_E(label)}" data-value="{value}" x="{x + step * 0.1:.1f}" '
                    f'y="{height - bottom - h:.1f}" width="{step * 0.8:.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
                    f'<title>{_E(label)}: {value:g}</title></rect>')
        if i % every == 0:
            body.append(f'<text x="{x + step / 2:.1f}" y="{height - 10}" text-anchor="middle" class="axis">'
                        f'{_E(label[5:] if len(label) == 10 else label)}</text>')
    return _svg(chart, width, height, body, title)


def line_chart(chart: str, points: list[tuple[str, float | None]], title: str, kind: str,
               width: int = 340, height: int = 170) -> str:
    """A small line chart of one KPI over months; months without data are gaps."""
    left, bottom, top_pad = 16, 28, 26
    values = [v for _, v in points if v is not None]
    low, high = (min(values), max(values)) if values else (0, 1)
    span = (high - low) or (abs(high) or 1)
    step = (width - 2 * left) / max(len(points) - 1, 1)
    body, path = [f'<text x="{left}" y="16" class="label">{_E(title)}</text>'], []
    for i, (label, value) in enumerate(points):
        x = left + i * step if len(points) > 1 else width / 2
        body.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle" class="axis">{_E(label)}</text>')
        if value is None:
            continue
        y = height - bottom - (height - bottom - top_pad - 14) * (value - low) / span
        path.append(f"{'M' if not path else 'L'}{x:.1f},{y:.1f}")
        body.append(f'<circle class="point" data-label="{_E(label)}" data-value="{value}" cx="{x:.1f}" '
                    f'cy="{y:.1f}" r="3.5" fill="{PALETTE[0]}"><title>{_E(label)}: '
                    f'{_E(format_value(value, kind))}</title></circle>'
                    f'<text x="{x:.1f}" y="{y - 7:.1f}" text-anchor="middle" class="value small">'
                    f'{_E(format_value(value, kind))}</text>')
    if len(path) > 1:
        body.insert(1, f'<path d="{" ".join(path)}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>')
    return _svg(chart, width, height, body, title)


def interval_chart(chart: str, rows: list[dict], title: str, scale: float = 1.0, unit: str = "",
                   width: int = 640) -> str:
    """Differences with their 95% interval as whiskers around a zero line; rows
    without enough data say so in words."""
    row, left, right = 34, 190, 20
    height = row * max(len(rows), 1) + 30
    finite = [abs(v) * scale for r in rows if r["comparison"]["enough_data"]
              for v in (r["comparison"]["low"], r["comparison"]["high"])]
    reach = max(finite + [0]) or 1
    mid = left + (width - left - right) / 2
    half = (width - left - right) / 2 * 0.9

    def x_of(v):
        return mid + half * (v * scale) / reach

    body = [f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height - 20}" stroke="#888" stroke-dasharray="3 3"/>',
            f'<text x="{mid}" y="{height - 6}" text-anchor="middle" class="axis">0</text>',
            f'<text x="{left}" y="{height - 6}" class="axis">−{reach:g}{_E(unit)}</text>',
            f'<text x="{width - right}" y="{height - 6}" text-anchor="end" class="axis">+{reach:g}{_E(unit)}</text>']
    for i, r in enumerate(rows):
        y = 8 + i * row + row / 2
        c = r["comparison"]
        campaign = _E(r.get("campaign", r["label"]))
        variant = f' data-variant="{_E(r["variant"])}"' if r.get("variant") else ""
        body.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end" class="label">{_E(r["label"])}</text>')
        if not c["enough_data"]:
            said = (f'窗口未结束 / window not over yet (ends {c["window_ends"]})'
                    if c.get("status") == "window_not_over" else
                    f'数据不足 / not enough data (n = {c["treated_n"]} / {c["holdout_n"]})')
            body.append(f'<text x="{left}" y="{y + 4}" class="note" data-campaign="{campaign}"{variant} '
                        f'data-status="{_E(c.get("status", "not_enough_data"))}">{_E(said)}</text>')
            continue
        body.append(f'<g class="interval" data-campaign="{campaign}" data-value="{c["difference"]}" '
                    f'data-low="{c["low"]}" data-high="{c["high"]}" data-treated-n="{c["treated_n"]}" '
                    f'data-holdout-n="{c["holdout_n"]}"{variant} '
                    f'data-window-complete="{str(c.get("window_complete", True)).lower()}">'
                    f'<line x1="{x_of(c["low"]):.1f}" y1="{y}" x2="{x_of(c["high"]):.1f}" y2="{y}" '
                    f'stroke="{PALETTE[0]}" stroke-width="3"/>'
                    f'<line x1="{x_of(c["low"]):.1f}" y1="{y - 7}" x2="{x_of(c["low"]):.1f}" y2="{y + 7}" '
                    f'stroke="{PALETTE[0]}" stroke-width="2"/>'
                    f'<line x1="{x_of(c["high"]):.1f}" y1="{y - 7}" x2="{x_of(c["high"]):.1f}" y2="{y + 7}" '
                    f'stroke="{PALETTE[0]}" stroke-width="2"/>'
                    f'<circle cx="{x_of(c["difference"]):.1f}" cy="{y}" r="5" fill="{PALETTE[3]}"/>'
                    f'<text x="{x_of(c["difference"]):.1f}" y="{y - 9}" text-anchor="middle" class="value small">'
                    f'{c["difference"] * scale:+.2f}{_E(unit)}</text></g>')
    return _svg(chart, width, height, body, title)


def _shade(share: float) -> str:
    """A colour from pale (0%) to deep blue (100%) for a heat-map cell."""
    pale, deep = (239, 246, 255), (29, 78, 216)
    share = min(max(share, 0.0), 1.0)
    return "#" + "".join(f"{round(a + (b - a) * share):02x}" for a, b in zip(pale, deep))


def heat_map(chart: str, cohorts: list[dict], title: str, cell_width: int = 64, cell_height: int = 28) -> str:
    """Cohort retention as a grid: a row per first-purchase month, a column per month
    since, each cell shaded by its share and carrying the number as text and as a <title>."""
    left, top = 170, 24
    months = max([len(c["retention"]) for c in cohorts] + [1])
    width, height = left + cell_width * months + 10, top + cell_height * max(len(cohorts), 1) + 6
    body = [f'<text x="{left + m * cell_width + cell_width / 2}" y="16" text-anchor="middle" class="axis">'
            f'第 {m} 月 / M{m}</text>' for m in range(months)]
    for i, c in enumerate(cohorts):
        y = top + i * cell_height
        body.append(f'<text x="{left - 8}" y="{y + 18}" text-anchor="end" class="label">'
                    f'{_E(c["cohort"])} ({c["customers"]:,} 人 / customers)</text>')
        for cell in c["retention"]:
            x, share, shown = left + cell["month"] * cell_width, cell["share"], format_value(cell["share"], "percent")
            tip = (f'{c["cohort"]} 首购 / first bought, 第 {cell["month"]} 月 / month {cell["month"]}: '
                   f'{shown} ({cell["customers"]:,} / {c["customers"]:,}) 再次购买 / bought again')
            body.append(f'<g class="cell" data-cohort="{_E(c["cohort"])}" data-month="{cell["month"]}" '
                        f'data-value="{share}" data-customers="{cell["customers"]}">'
                        f'<rect x="{x}" y="{y}" width="{cell_width - 2}" height="{cell_height - 2}" '
                        f'fill="{_shade(share)}"><title>{_E(tip)}</title></rect>'
                        f'<text x="{x + (cell_width - 2) / 2}" y="{y + 18}" text-anchor="middle" '
                        f'class="value small{" on-dark" if share > 0.5 else ""}">{_E(shown)}</text></g>')
    return _svg(chart, width, height, body, title)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI","PingFang SC","Noto Sans CJK SC","Microsoft YaHei",sans-serif;
margin:24px auto;max-width:1100px;color:#1f2937;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.muted{color:#6b7280;font-size:13px}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #e5e7eb;border-radius:8px;padding:10px 14px;min-width:150px}
.card .k{font-size:12px;color:#6b7280}.card .v{font-size:20px;font-weight:600}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border-bottom:1px solid #e5e7eb;padding:4px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}svg{display:block;margin:6px 0}
svg text{font-size:12px;fill:#374151}svg .axis{font-size:10px;fill:#6b7280}svg .small{font-size:10px}
svg .note{fill:#9ca3af;font-style:italic}.trends{display:flex;flex-wrap:wrap;gap:12px}
.warning{color:#92400e}dl dt{font-weight:600;margin-top:6px}svg .on-dark{fill:#fff}
"""

DEFINITIONS = {
    "repurchase_rate": "在期间内购买过的客户中，购买两次及以上者的比例 · Share of the period's buyers who bought at least twice in it.",
    "churn_rate": "上一等长期间购买过、本期间未再购买的客户比例 · Share of the previous equal-length period's buyers who did not buy in this one.",
    "purchase_frequency": "期间内订单数 ÷ 购买客户数 · Purchases in the period per buying customer.",
    "aov": "期间内订单金额 ÷ 订单数 · Purchase value per purchase.",
    "arpu": "期间内净收入 ÷ 会员数 · Net revenue of the period per member.",
    "historical_clv": "截至期末的累计净消费 ÷ 曾购买客户数 · Net spend to date per customer who ever bought.",
    "nps": "推荐者(9–10)占比 − 贬损者(0–6)占比 · % promoters (9–10) minus % detractors (0–6), latest answer per customer.",
    "csat": "满意答卷(4–5 分，满分 5)占比 · Share of satisfied answers (4 or 5 on 1–5), latest answer per customer; other scores are ignored.",
    "ces": "费力度答卷的平均分(1–7) · Mean customer-effort score (1–7), latest answer per customer; other scores are ignored.",
    "uplift": "活动组(及每个 A/B 版本)与对照组在发送后 N 天内的差异，附 95% 置信区间 · Treated (and each A/B variant) minus holdout within N days of the send, with a 95% confidence interval; a window not over yet is said so.",
    "cohorts": "按首次购买月份分组的客户中，在其后第 0、1、2… 个月再次购买的比例(第 0 月 = 当月第二次购买) · Customers grouped by the month of their first purchase: the share who bought again in month 0 (a second purchase that month), 1, 2, …",
}
_DEFINITION_TITLES = {"uplift": "提升 / Uplift", "cohorts": "首购同期群留存 / Cohort retention"}


def _kpi_cards(kpis: Mapping, currency: str) -> str:
    cards = []
    for key in KPI_CARDS:
        value = kpis.get(key)
        cards.append(f'<div class="card" data-kpi="{key}" data-value="{"" if value is None else value}">'
                     f'<div class="k">{_E(_label(key))}</div>'
                     f'<div class="v">{_E(format_value(value, _kind(key), currency))}</div></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _campaign_table(campaigns: list[dict], currency: str) -> str:
    keys = ("offers", "delivered", "failed", "redeemed", "redemption_rate", "revenue", "cost", "roi")
    head = "".join(f"<th>{_E(LABELS[k][0])}<br>{_E(LABELS[k][1])}</th>"
                   for k in keys)
    rows = []
    for c in campaigns:
        for row, variant in [(c, "")] + [(v, v["variant"]) for v in c["variants"]]:
            name = f'{c["name"]} ({c["id"]})' if not variant else f"  variant {variant}"
            cells = "".join(f'<td data-field="{k}" data-value="{"" if row[k] is None else row[k]}">'
                            f'{_E(format_value(row[k], _kind(k) if k != "revenue" else "money"))}</td>'
                            for k in keys)
            rows.append(f'<tr data-campaign="{_E(c["id"])}" data-variant="{_E(variant)}"><td>{_E(name)}</td>'
                        f"{cells}</tr>")
    return (f'<table class="campaigns"><tr><th>活动 / Campaign</th>{head}</tr>' + "".join(rows) + "</table>"
            f'<p class="muted">金额单位 / amounts in {_E(currency)}</p>')


def _funnels(campaigns: list[dict]) -> str:
    parts = []
    for c in campaigns:
        items = [(_label(k), float(c[k]), f"{c[k]:,}") for k in ("offers", "delivered", "redeemed")]
        parts.append(f'<h3>{_E(c["name"])} <span class="muted">{_E(c["id"])}</span></h3>' +
                     bar_chart("funnel", items, f"漏斗 / Funnel: {c['id']}").replace(
                         'data-chart="funnel"', f'data-chart="funnel" data-campaign="{_E(c["id"])}"', 1))
    return "".join(parts) or '<p class="muted">没有活动记录 / no offers in this period</p>'


def _uplift_section(report: Mapping) -> str:
    currency = report["programme"]["currency"]
    campaigns = report["campaigns"]
    if not campaigns:
        return '<p class="muted">没有活动记录 / no offers in this period</p>'
    rows = uplift_rows(campaigns)

    def chart_rows(metric: str) -> list[dict]:
        return [{"label": f"{c} · {v}" if v else c, "campaign": c, "variant": v, "comparison": u[metric]}
                for c, v, u in rows]

    rate, spend = chart_rows("repurchase_rate"), chart_rows("spend")
    table = "".join(f'<tr data-campaign="{_E(c)}" data-variant="{_E(v)}" '
                    f'data-window-complete="{str(u.get("window_complete", True)).lower()}">'
                    f'<td>{_E(c if not v else f"  variant {v}")}</td>'
                    f'<td>{_E(uplift_text(u["repurchase_rate"]))}</td>'
                    f'<td>{_E(uplift_text(u["spend"], currency))}</td></tr>' for c, v, u in rows)
    return (f"<h3>复购率提升 / Repurchase-rate uplift (percentage points)</h3>"
            + interval_chart("uplift-repurchase", rate, "复购率提升 / Repurchase-rate uplift", 100.0, " pp")
            + f"<h3>消费额提升 / Spend uplift ({_E(currency)} per customer)</h3>"
            + interval_chart("uplift-spend", spend, "消费额提升 / Spend uplift")
            + '<table class="uplift"><tr><th>活动 / Campaign</th><th>复购率 / Repurchase rate</th>'
              f"<th>消费额 / Spend</th></tr>{table}</table>")


def _trend_section(trend: list[dict]) -> str:
    charts = [line_chart(f"trend-{key}", [(m["month"], m.get(key)) for m in trend], _label(key), _kind(key))
              for key in trended_kpis(trend)]
    return '<div class="trends">' + "".join(charts) + "</div>"


def _survey_line(kpis: Mapping) -> str:
    """How many answers the NPS, CSAT and CES figures rest on."""
    (csat_low, csat_high), (ces_low, ces_high) = CSAT_SCALE, CES_SCALE
    return (f'<p class="muted">NPS: {kpis["responses"]} 份答卷 / responses ({kpis["promoters"]} promoters, '
            f'{kpis["passives"]} passives, {kpis["detractors"]} detractors) · '
            f'CSAT: {kpis.get("csat_responses", 0)} 份答卷 / responses ({kpis.get("csat_satisfied", 0)} satisfied, '
            f'score 4–{csat_high} of {csat_low}–{csat_high}) · '
            f'CES: {kpis.get("ces_responses", 0)} 份答卷 / responses (score {ces_low}–{ces_high})</p>')


def _cohort_section(report: Mapping) -> str:
    """The cohort heat map, with a word on a last month that is cut short by the period."""
    cohorts = report.get("cohorts", [])
    if not cohorts:
        return '<p class="muted">期间内没有首次购买的客户 / no first purchases in this period</p>'
    last = date.fromisoformat(report["period"]["to"])
    cut = (last + timedelta(days=1)).day != 1
    note = (f'<p class="muted">最后一个月只算到 {_E(last.isoformat())} / the last month counts up to '
            f'{_E(last.isoformat())}</p>' if cut else "")
    return heat_map("cohorts", cohorts, "首购同期群留存 / Cohort retention (share who bought again)") + note


def _sizes_table(title: str, sizes: Mapping[str, int], kind: str) -> str:
    rows = "".join(f'<tr data-{kind}="{_E(n)}" data-value="{v}"><td>{_E(n)}</td><td>{v:,}</td></tr>'
                   for n, v in sizes.items())
    return f'<table class="{kind}s"><tr><th>{_E(title)}</th><th>客户数 / Customers</th></tr>{rows}</table>'


def render_html(report: Mapping) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts, no links)."""
    programme, period, kpis = report["programme"], report["period"], report["kpis"]
    currency = programme["currency"]
    by_day = [(d["date"], float(d["count"])) for d in report["redemptions_by_day"]]
    tiers = [(name, float(count), f"{count:,}") for name, count in kpis["tiers"].items()]
    definitions = "".join(f"<dt>{_E(_DEFINITION_TITLES.get(k) or _label(k))}</dt><dd>{_E(text)}</dd>"
                          for k, text in DEFINITIONS.items())
    warnings = "".join(f'<li class="warning">{_E(w)}</li>' for w in report["warnings"])
    body = f"""
<h1>{_E(programme["name"])} · 会员计划报告 / Loyalty report</h1>
<p class="muted" data-period-from="{_E(period['from'])}" data-period-to="{_E(period['to'])}">
期间 / Period: {_E(period['from'])} – {_E(period['to'])} ({period['days']} 天 / days) ·
时区 / timezone {_E(programme['timezone'])} · 生成于 / generated {_E(report['generated_at'])}</p>
<h2>计划指标 / Programme KPIs</h2>
{_kpi_cards(kpis, currency)}
{_survey_line(kpis)}
<h2>活动效果 / Campaign results</h2>
{_campaign_table(report['campaigns'], currency)}
<h2>活动漏斗 / Funnel per campaign</h2>
{_funnels(report['campaigns'])}
<h2>核销趋势 / Redemptions over time</h2>
{column_chart("redemptions", by_day, "每日核销 / Redemptions per day") if by_day else
 '<p class="muted">期间内没有核销 / no redemptions in this period</p>'}
<h2>相对对照组的提升 / Uplift over holdout ({report['window_days']} 天 / days after the send)</h2>
{_uplift_section(report)}
<h2>等级分布 / Tier distribution</h2>
{bar_chart("tiers", tiers, "等级分布 / Tier distribution") if tiers else ''}
{_sizes_table("等级 / Tier", kpis["tiers"], "tier")}
<h2>分群规模 / Segment sizes</h2>
{_sizes_table("分群 / Segment", kpis["segments"], "segment")}
<h2>指标趋势 / KPI trends (monthly)</h2>
{_trend_section(report['trend'])}
<h2>首购同期群留存 / Cohort retention</h2>
<p class="muted">按首次购买月份分组，每格为其后各月再次购买的客户比例 / customers grouped by the month of their
first purchase; each cell is the share who bought again that month (month 0: a second purchase in the first month)</p>
{_cohort_section(report)}
<h2>定义 / Definitions</h2>
<dl>{definitions}</dl>
{f'<ul>{warnings}</ul>' if warnings else ''}
"""
    return (f'<!DOCTYPE html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
            f"<title>{_E(programme['name'])} · Loyalty report {period['from']} – {period['to']}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_html_report(workspace_root: Path, path: Path, start: Any = None, end: Any = None,
                      report: Mapping | None = None) -> Path:
    """Build the report (unless given) and write it as one HTML file; returns the path."""
    report = report if report is not None else build_report(workspace_root, start, end)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
