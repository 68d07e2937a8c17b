"""The report as one self-contained HTML page: KPI cards, campaign results, funnels, uplift,
trends, cohorts, tier and segment sizes (`loyalty report --html FILE`)."""

from __future__ import annotations

from datetime import date, timedelta
from html import escape
from pathlib import Path
from typing import Any, Mapping

from engine.app.charts import bar_chart, column_chart, heat_map, interval_chart, line_chart
from engine.app.kpis import CES_SCALE, CSAT_SCALE
from engine.app.reporting import (
    KPI_CARDS,
    LABELS,
    build_report,
    format_value,
    kind_of,
    label_of,
    points_rows,
    trended_kpis,
    uplift_rows,
    uplift_text,
)

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
                     f'<div class="k">{escape(label_of(key))}</div>'
                     f'<div class="v">{escape(format_value(value, kind_of(key), currency))}</div></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _campaign_table(campaigns: list[dict], currency: str) -> str:
    keys = ("offers", "delivered", "failed", "redeemed", "redemption_rate", "revenue", "cost", "roi")
    head = "".join(f"<th>{escape(LABELS[k][0])}<br>{escape(LABELS[k][1])}</th>"
                   for k in keys)
    rows = []
    for c in campaigns:
        for row, variant in [(c, "")] + [(v, v["variant"]) for v in c["variants"]]:
            name = f'{c["name"]} ({c["id"]})' if not variant else f"  variant {variant}"
            cells = "".join(f'<td data-field="{k}" data-value="{"" if row[k] is None else row[k]}">'
                            f'{escape(format_value(row[k], kind_of(k) if k != "revenue" else "money"))}</td>'
                            for k in keys)
            rows.append(f'<tr data-campaign="{escape(c["id"])}" data-variant="{escape(variant)}"><td>{escape(name)}</td>'
                        f"{cells}</tr>")
    return (f'<table class="campaigns"><tr><th>活动 / Campaign</th>{head}</tr>' + "".join(rows) + "</table>"
            f'<p class="muted">金额单位 / amounts in {escape(currency)}</p>')


def _funnels(campaigns: list[dict]) -> str:
    parts = []
    for c in campaigns:
        items = [(label_of(k), float(c[k]), f"{c[k]:,}") for k in ("offers", "delivered", "redeemed")]
        parts.append(f'<h3>{escape(c["name"])} <span class="muted">{escape(c["id"])}</span></h3>' +
                     bar_chart("funnel", items, f"漏斗 / Funnel: {c['id']}").replace(
                         'data-chart="funnel"', f'data-chart="funnel" data-campaign="{escape(c["id"])}"', 1))
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
    table = "".join(f'<tr data-campaign="{escape(c)}" data-variant="{escape(v)}" '
                    f'data-window-complete="{str(u.get("window_complete", True)).lower()}">'
                    f'<td>{escape(c if not v else f"  variant {v}")}</td>'
                    f'<td>{escape(uplift_text(u["repurchase_rate"]))}</td>'
                    f'<td>{escape(uplift_text(u["spend"], currency))}</td></tr>' for c, v, u in rows)
    return (f"<h3>复购率提升 / Repurchase-rate uplift (percentage points)</h3>"
            + interval_chart("uplift-repurchase", rate, "复购率提升 / Repurchase-rate uplift", 100.0, " pp")
            + f"<h3>消费额提升 / Spend uplift ({escape(currency)} per customer)</h3>"
            + interval_chart("uplift-spend", spend, "消费额提升 / Spend uplift")
            + '<table class="uplift"><tr><th>活动 / Campaign</th><th>复购率 / Repurchase rate</th>'
              f"<th>消费额 / Spend</th></tr>{table}</table>")


def _trend_section(trend: list[dict]) -> str:
    charts = [line_chart(f"trend-{key}", [(m["month"], m.get(key)) for m in trend], label_of(key), kind_of(key))
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
    note = (f'<p class="muted">最后一个月只算到 {escape(last.isoformat())} / the last month counts up to '
            f'{escape(last.isoformat())}</p>' if cut else "")
    return heat_map("cohorts", cohorts, "首购同期群留存 / Cohort retention (share who bought again)") + note


def _sizes_table(title: str, sizes: Mapping[str, int], kind: str) -> str:
    rows = "".join(f'<tr data-{kind}="{escape(n)}" data-value="{v}"><td>{escape(n)}</td><td>{v:,}</td></tr>'
                   for n, v in sizes.items())
    return f'<table class="{kind}s"><tr><th>{escape(title)}</th><th>客户数 / Customers</th></tr>{rows}</table>'


def _points_section(report: Mapping, currency: str) -> str:
    points = report.get("points")
    if not points:
        return ""
    rows = "".join(f"<tr><td>{escape(label)}</td><td>{escape(value)}</td></tr>"
                   for label, value in points_rows(points, currency))
    return f'<h2>积分 / Points</h2>\n<table class="points"><tbody>{rows}</tbody></table>'


def render_html(report: Mapping) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts, no links)."""
    programme, period, kpis = report["programme"], report["period"], report["kpis"]
    currency = programme["currency"]
    by_day = [(d["date"], float(d["count"])) for d in report["redemptions_by_day"]]
    tiers = [(name, float(count), f"{count:,}") for name, count in kpis["tiers"].items()]
    definitions = "".join(f"<dt>{escape(_DEFINITION_TITLES.get(k) or label_of(k))}</dt><dd>{escape(text)}</dd>"
                          for k, text in DEFINITIONS.items())
    warnings = "".join(f'<li class="warning">{escape(w)}</li>' for w in report["warnings"])
    body = f"""
<h1>{escape(programme["name"])} · 会员计划报告 / Loyalty report</h1>
<p class="muted" data-period-from="{escape(period['from'])}" data-period-to="{escape(period['to'])}">
期间 / Period: {escape(period['from'])} – {escape(period['to'])} ({period['days']} 天 / days) ·
时区 / timezone {escape(programme['timezone'])} · 生成于 / generated {escape(report['generated_at'])}</p>
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
{_points_section(report, currency)}
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
            f"<title>{escape(programme['name'])} · Loyalty report {period['from']} – {period['to']}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_html_report(workspace_root: Path, path: Path, start: Any = None, end: Any = None,
                      report: Mapping | None = None) -> Path:
    """Build the report (unless given) and write it as one HTML file; returns the path."""
    report = report if report is not None else build_report(workspace_root, start, end)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
