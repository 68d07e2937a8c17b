"""The report's charts: self-contained SVG (bars, columns, lines, intervals, a heat map), no
JavaScript and no outside resources, each with accessible titles."""

from __future__ import annotations

from html import escape

from engine.app.reporting import format_value

PALETTE = ("#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d")


def _svg(chart: str, width: int, height: int, body: list[str], title: str) -> str:
    return (f'<svg class="chart" data-chart="{escape(chart)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(title)}"><title>{escape(title)}</title>' + "".join(body) + "</svg>")


def bar_chart(chart: str, items: list[tuple[str, float, str]], title: str, width: int = 560) -> str:
    """Horizontal bars: (label, value, shown text) each."""
    row, left = 26, 190
    height = row * max(len(items), 1) + 10
    top = max([v for _, v, _ in items] + [0]) or 1
    body = []
    for i, (label, value, text) in enumerate(items):
        y = 5 + i * row
        length = max(0.0, (width - left - 110) * (value / top))
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" class="label">{escape(label)}</text>'
                    f'<rect class="bar" data-label="{escape(label)}" data-value="{value}" x="{left}" y="{y}" '
                    f'width="{length:.1f}" height="{row - 8}" fill="{PALETTE[i % len(PALETTE)]}"/>'
                    f'<text x="{left + length + 6:.1f}" y="{y + 15}" class="value">{escape(text)}</text>')
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
        body.append(f'<rect class="bar" data-label="{escape(label)}" data-value="{value}" x="{x + step * 0.1:.1f}" '
                    f'y="{height - bottom - h:.1f}" width="{step * 0.8:.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
                    f'<title>{escape(label)}: {value:g}</title></rect>')
        if i % every == 0:
            body.append(f'<text x="{x + step / 2:.1f}" y="{height - 10}" text-anchor="middle" class="axis">'
                        f'{escape(label[5:] if len(label) == 10 else label)}</text>')
    return _svg(chart, width, height, body, title)


def line_chart(chart: str, points: list[tuple[str, float | None]], title: str, kind: str,
               width: int = 340, height: int = 170) -> str:
    """A small line chart of one KPI over months; months without data are gaps."""
    left, bottom, top_pad = 16, 28, 26
    values = [v for _, v in points if v is not None]
    low, high = (min(values), max(values)) if values else (0, 1)
    span = (high - low) or (abs(high) or 1)
    step = (width - 2 * left) / max(len(points) - 1, 1)
    body, path = [f'<text x="{left}" y="16" class="label">{escape(title)}</text>'], []
    for i, (label, value) in enumerate(points):
        x = left + i * step if len(points) > 1 else width / 2
        body.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle" class="axis">{escape(label)}</text>')
        if value is None:
            continue
        y = height - bottom - (height - bottom - top_pad - 14) * (value - low) / span
        path.append(f"{'M' if not path else 'L'}{x:.1f},{y:.1f}")
        body.append(f'<circle class="point" data-label="{escape(label)}" data-value="{value}" cx="{x:.1f}" '
                    f'cy="{y:.1f}" r="3.5" fill="{PALETTE[0]}"><title>{escape(label)}: '
                    f'{escape(format_value(value, kind))}</title></circle>'
                    f'<text x="{x:.1f}" y="{y - 7:.1f}" text-anchor="middle" class="value small">'
                    f'{escape(format_value(value, kind))}</text>')
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
            f'<text x="{left}" y="{height - 6}" class="axis">−{reach:g}{escape(unit)}</text>',
            f'<text x="{width - right}" y="{height - 6}" text-anchor="end" class="axis">+{reach:g}{escape(unit)}</text>']
    for i, r in enumerate(rows):
        y = 8 + i * row + row / 2
        c = r["comparison"]
        campaign = escape(r.get("campaign", r["label"]))
        variant = f' data-variant="{escape(r["variant"])}"' if r.get("variant") else ""
        body.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end" class="label">{escape(r["label"])}</text>')
        if not c["enough_data"]:
            said = (f'窗口未结束 / window not over yet (ends {c["window_ends"]})'
                    if c.get("status") == "window_not_over" else
                    f'数据不足 / not enough data (n = {c["treated_n"]} / {c["holdout_n"]})')
            body.append(f'<text x="{left}" y="{y + 4}" class="note" data-campaign="{campaign}"{variant} '
                        f'data-status="{escape(c.get("status", "not_enough_data"))}">{escape(said)}</text>')
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
                    f'{c["difference"] * scale:+.2f}{escape(unit)}</text></g>')
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
                    f'{escape(c["cohort"])} ({c["customers"]:,} 人 / customers)</text>')
        for cell in c["retention"]:
            x, share, shown = left + cell["month"] * cell_width, cell["share"], format_value(cell["share"], "percent")
            tip = (f'{c["cohort"]} 首购 / first bought, 第 {cell["month"]} 月 / month {cell["month"]}: '
                   f'{shown} ({cell["customers"]:,} / {c["customers"]:,}) 再次购买 / bought again')
            body.append(f'<g class="cell" data-cohort="{escape(c["cohort"])}" data-month="{cell["month"]}" '
                        f'data-value="{share}" data-customers="{cell["customers"]}">'
                        f'<rect x="{x}" y="{y}" width="{cell_width - 2}" height="{cell_height - 2}" '
                        f'fill="{_shade(share)}"><title>{escape(tip)}</title></rect>'
                        f'<text x="{x + (cell_width - 2) / 2}" y="{y + 18}" text-anchor="middle" '
                        f'class="value small{" on-dark" if share > 0.5 else ""}">{escape(shown)}</text></g>')
    return _svg(chart, width, height, body, title)


# --------------------------------------------------------------------------- HTML
