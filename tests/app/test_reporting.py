"""The assembled report on a hand-built workspace: numbers, terminal, JSON and HTML (in Chromium)."""

import io
import json
import math
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from rich.console import Console

from cli import main
from engine.app.report_html import render_html, write_html_report
from engine.app.reporting import build_report, print_report
from engine.app.scaffold import init_workspace
from engine.state.store import StateStore

SEND = "2026-01-10T10:00:00+08:00"
TREATED = [f"T{i:02d}" for i in range(40)]
HOLDOUT = [f"H{i:02d}" for i in range(40)]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """40 customers got a winback coupon on 10 Jan (38 delivered, 2 failed); 40 were held out.
    20 treated and 10 held-out customers buy 100 each on 15 Jan; T00 pays with its coupon."""
    root = tmp_path_factory.mktemp("report") / "ws"
    init_workspace(root)
    (root / "data" / "customers.csv").write_text(
        "customer_id,signup_date\n" + "".join(f"{c},2025-06-01\n" for c in TREATED + HOLDOUT), encoding="utf-8")
    buyers = TREATED[:20] + HOLDOUT[:10]
    (root / "data" / "orders.csv").write_text(
        "order_id,customer_id,timestamp,amount,coupon_code\n" + "".join(
            f"O{i},{c},2026-01-15 12:00:00,100,{'code-t00' if c == 'T00' else ''}\n" for i, c in enumerate(buyers)),
        encoding="utf-8")
    (root / "data" / "events.csv").write_text(
        "event_id,customer_id,timestamp,type,score\n"
        "E1,T00,2026-01-20 10:00:00,nps_response,10\nE2,T01,2026-01-20 10:00:00,nps_response,5\n"
        "E3,T02,2026-01-20 10:00:00,nps_response,9\nE4,T03,2026-01-20 10:00:00,nps_response,8\n",
        encoding="utf-8")
    store = StateStore(root / "state" / "loyalty.db")
    run_id = store.begin_run(SEND, {}, {})
    store.record_run(run_id, [
        {"firing_key": f"winback:{c}:1", "campaign": "winback", "customer_id": c, "channel": "sms",
         "variant": None, "cost": 20.0, "send_at": SEND, "as_of": SEND,
         "reward": {"kind": "coupon", "code": f"CODE-{c}", "expires_at": "2026-01-24T23:59:59+08:00"}}
        for c in TREATED], holdouts=[
        {"campaign": "winback", "customer_id": c, "firing_key": f"winback:{c}:1", "group": "campaign",
         "as_of": SEND} for c in HOLDOUT])
    offers = store.offers_frame().set_index("customer_id")["offer_id"]
    for c in TREATED:
        if c in ("T38", "T39"):
            store.mark_failed(offers[c], "gateway down")
        else:
            store.mark_sent(offers[c], SEND)
    store.close()
    return root


@pytest.fixture(scope="module")
def report(workspace):
    return build_report(workspace, "2026-01-01", "2026-01-31")


def test_campaign_results_and_uplift_hand_computed(report):
    (winback,) = report["campaigns"]
    assert (winback["id"], winback["name"]) == ("winback", "沉睡客唤醒")
    assert (winback["offers"], winback["delivered"], winback["failed"], winback["redeemed"]) == (40, 38, 2, 1)
    assert winback["redemption_rate"] == pytest.approx(1 / 38, abs=1e-4)
    assert winback["revenue"] == 100.0 and winback["cost"] == 760.0
    assert winback["roi"] == pytest.approx((100 - 760) / 760, abs=1e-4)
    lift = winback["uplift"]
    # intention to treat: all 40 offers (failed ones too) against the 40 held out
    rate = lift["repurchase_rate"]
    assert (rate["treated_n"], rate["holdout_n"]) == (40, 40)
    assert (rate["treated"], rate["holdout"], rate["difference"]) == (0.5, 0.25, 0.25)
    se = math.sqrt(0.5 * 0.5 / 40 + 0.25 * 0.75 / 40)
    assert rate["low"] == pytest.approx(0.25 - 1.959964 * se, abs=1e-4)
    assert rate["high"] == pytest.approx(0.25 + 1.959964 * se, abs=1e-4)
    spend = lift["spend"]
    assert (spend["treated"], spend["holdout"], spend["difference"]) == (50.0, 25.0, 25.0)
    assert spend["low"] < 25 < spend["high"]


def test_programme_kpis_in_the_report(report):
    k = report["kpis"]
    assert (k["members"], k["orders"], k["active_customers"], k["revenue"]) == (80, 30, 30, 3000.0)
    assert k["aov"] == 100.0 and k["repurchase_rate"] == 0.0 and k["arpu"] == pytest.approx(37.5)
    assert k["nps"] == 25.0 and k["responses"] == 4           # 2 promoters, 1 detractor of 4
    assert k["tiers"] == {"gold": 0, "silver": 0, "bronze": 80}
    assert set(k["segments"]) == {"high_value", "at_risk"}
    assert [m["month"] for m in report["trend"]] == ["2026-01"]
    assert report["redemptions_by_day"] == [{"date": "2026-01-15", "count": 1, "revenue": 100.0}]
    assert report["period"] == {"from": "2026-01-01", "to": "2026-01-31", "days": 31}
    json.dumps(report)                                           # plain JSON all the way down


def test_small_groups_say_not_enough_data(workspace):
    report = build_report(workspace, "2026-01-01", "2026-01-31", min_group=50)
    rate = report["campaigns"][0]["uplift"]["repurchase_rate"]
    assert not rate["enough_data"] and rate["difference"] is None
    assert "not enough data" in rate["note"]
    assert "数据不足 / not enough data" in render_html(report)


def test_terminal_and_json_output(workspace, report):
    buffer = io.StringIO()
    print_report(report, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "winback" in text and "+25.0 pp" in text and "复购率 / Repurchase rate" in text
    printed = CliRunner().invoke(main, ["report", str(workspace), "--from", "2026-01-01", "--to", "2026-01-31",
                                        "--format", "json"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output)["campaigns"][0]["redeemed"] == 1 == report["campaigns"][0]["redeemed"]


def test_html_is_self_contained_and_carries_the_numbers(report):
    page = render_html(report)
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert set(re.findall(r"https?://[^\"' >]+", page)) == {"http://www.w3.org/2000/svg"}
    for chart in ("funnel", "redemptions", "uplift-repurchase", "uplift-spend", "tiers", "trend-repurchase_rate",
                  "trend-nps"):
        assert f'data-chart="{chart}"' in page
    assert 'data-kpi="nps" data-value="25.0"' in page
    assert "复购率 / Repurchase rate" in page and "等级分布 / Tier distribution" in page


def test_write_html_report(workspace, tmp_path):
    path = write_html_report(workspace, tmp_path / "out" / "report.html", "2026-01-01", "2026-01-31")
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_html_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    path = tmp_path / "report.html"
    path.write_text(render_html(report), encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           f"file://{path}"], capture_output=True, text=True, timeout=60)
    dom = done.stdout
    assert "</svg>" in dom, done.stderr[-2000:]
    charts = re.findall(r'<svg class="chart" data-chart="([^"]+)"', dom)
    assert charts.count("funnel") == 1 and "redemptions" in charts and "tiers" in charts
    assert len([c for c in charts if c.startswith("trend-")]) == 6
    funnel = re.search(r'data-chart="funnel" data-campaign="winback".*?</svg>', dom, re.S).group(0)
    assert re.findall(r'class="bar" data-label="[^"]+" data-value="([^"]+)"', funnel) == ["40.0", "38.0", "1.0"]
    interval = re.search(r'<g class="interval" data-campaign="winback" data-value="([^"]+)" '
                         r'data-low="([^"]+)" data-high="([^"]+)"', dom)
    assert float(interval.group(1)) == 0.25 and float(interval.group(2)) == pytest.approx(0.045, abs=1e-3)
    assert re.search(r'data-chart="redemptions".*?data-label="2026-01-15" data-value="1.0"', dom, re.S)
    assert 'data-kpi="orders" data-value="30"' in dom
    assert "+25.0 pp" in dom                                       # the uplift written out as text too


# --------------------------------------------------------------------------- issue 19: variants, windows,
# CSAT and CES, cohorts, on a second small workspace (groups of 4: the report is asked for min_group=2)

AB_SEND, LATE_SEND = "2026-01-10T10:00:00+08:00", "2026-03-25T10:00:00+08:00"
VARIANT_A, VARIANT_B, AB_HOLDOUT = ["A1", "A2", "A3", "A4"], ["B1", "B2", "B3", "B4"], ["H1", "H2", "H3", "H4"]
LATE, LATE_HOLDOUT = ["W1", "W2", "W3"], ["W4", "W5"]
AB_ORDERS = [   # (customer, local time, amount); the latest order is on 20 March
    ("OLD", "2025-12-15 10:00", 50), ("OLD", "2026-01-20 10:00", 50),
    ("A1", "2026-01-20 10:00", 100), ("A2", "2026-01-20 10:00", 100), ("A3", "2026-01-20 10:00", 100),
    ("B1", "2026-01-20 10:00", 100), ("H1", "2026-01-20 10:00", 100),
    ("A1", "2026-01-25 10:00", 100), ("A2", "2026-02-05 10:00", 100), ("B1", "2026-02-20 10:00", -100),
    ("A1", "2026-03-10 10:00", 100), ("A3", "2026-03-20 10:00", 100),
    ("F1", "2026-02-10 10:00", 100), ("F1", "2026-02-12 10:00", 100), ("F1", "2026-03-05 10:00", 100),
    ("M1", "2026-03-20 10:00", 100),
]
AB_EVENTS = [   # (customer, local time, type, score)
    ("A1", "2026-01-05 10:00", "csat_response", "5"), ("A1", "2026-02-01 10:00", "csat_response", "3"),
    ("A2", "2026-02-10 10:00", "csat_response", "4"), ("A3", "2026-03-03 10:00", "csat_response", "2"),
    ("A4", "2025-12-20 10:00", "csat_response", "5"), ("B1", "2026-01-08 10:00", "csat_response", "6"),
    ("B2", "2026-02-08 10:00", "csat_response", "4.5"),
    ("A1", "2026-01-06 10:00", "ces_response", "2"), ("A2", "2026-02-11 10:00", "ces_response", "7"),
    ("A3", "2026-03-04 10:00", "ces_response", "5"), ("B1", "2026-01-09 10:00", "ces_response", "8"),
    ("B2", "2026-02-09 10:00", "ces_response", ""),
]


@pytest.fixture(scope="module")
def ab_workspace(tmp_path_factory):
    """winback sent on 10 Jan as variants A and B (4 customers each) against 4 held out;
    vip_thanks sent on 25 March, after the latest order (20 March)."""
    root = tmp_path_factory.mktemp("report_ab") / "ws"
    init_workspace(root)
    everyone = VARIANT_A + VARIANT_B + AB_HOLDOUT + LATE + LATE_HOLDOUT + ["OLD", "F1", "M1"]
    (root / "data" / "customers.csv").write_text(
        "customer_id,signup_date\n" + "".join(f"{c},2025-06-01\n" for c in everyone), encoding="utf-8")
    (root / "data" / "orders.csv").write_text(
        "order_id,customer_id,timestamp,amount\n" + "".join(
            f"O{i},{c},{t}:00,{a}\n" for i, (c, t, a) in enumerate(AB_ORDERS)), encoding="utf-8")
    (root / "data" / "events.csv").write_text(
        "event_id,customer_id,timestamp,type,score\n" + "".join(
            f"E{i},{c},{t}:00,{kind},{score}\n" for i, (c, t, kind, score) in enumerate(AB_EVENTS)),
        encoding="utf-8")
    store = StateStore(root / "state" / "loyalty.db")
    for send, campaign, treated, held in ((AB_SEND, "winback", VARIANT_A + VARIANT_B, AB_HOLDOUT),
                                          (LATE_SEND, "vip_thanks", LATE, LATE_HOLDOUT)):
        run_id = store.begin_run(send, {}, {})
        store.record_run(run_id, [
            {"firing_key": f"{campaign}:{c}:1", "campaign": campaign, "customer_id": c, "channel": "sms",
             "variant": c[0] if campaign == "winback" else None, "cost": 10.0, "send_at": send, "as_of": send,
             "reward": {"kind": "message"}} for c in treated], holdouts=[
            {"campaign": campaign, "customer_id": c, "firing_key": f"{campaign}:{c}:1", "group": "campaign",
             "as_of": send} for c in held])
    store.close()
    return root


@pytest.fixture(scope="module")
def ab_report(ab_workspace):
    return build_report(ab_workspace, "2026-01-01", "2026-03-31", min_group=2)


def _campaign(report, campaign_id):
    return next(c for c in report["campaigns"] if c["id"] == campaign_id)


def test_uplift_per_variant_against_the_campaigns_holdout(ab_report):
    winback = _campaign(ab_report, "winback")
    whole, (a, b) = winback["uplift"], winback["variants"]
    assert (a["variant"], b["variant"]) == ("A", "B")
    assert whole["repurchase_rate"]["difference"] == 0.25            # 4 of 8 treated bought, 1 of 4 held out
    se = math.sqrt(0.75 * 0.25 / 4 + 0.25 * 0.75 / 4)                # A: 3 of 4 bought, holdout 1 of 4
    rate = a["uplift"]["repurchase_rate"]
    assert (rate["treated_n"], rate["holdout_n"], rate["treated"], rate["holdout"]) == (4, 4, 0.75, 0.25)
    assert rate["difference"] == 0.5
    assert (rate["low"], rate["high"]) == (pytest.approx(0.5 - 1.959964 * se, abs=1e-4),
                                           pytest.approx(0.5 + 1.959964 * se, abs=1e-4))
    # within 30 days of the send: A1 200, A2 200, A3 100, A4 0 -> 125; holdout H1 100 -> 25
    spend = a["uplift"]["spend"]
    assert (spend["treated"], spend["holdout"], spend["difference"]) == (125.0, 25.0, 100.0)
    b_rate = b["uplift"]["repurchase_rate"]                            # B1 alone bought: 1 of 4, as the holdout
    assert (b_rate["treated"], b_rate["difference"]) == (0.25, 0.0)
    assert (b_rate["low"], b_rate["high"]) == (pytest.approx(-1.959964 * se, abs=1e-4),
                                               pytest.approx(1.959964 * se, abs=1e-4))
    assert whole["window_complete"] and a["uplift"]["window_complete"] and b["uplift"]["window_complete"]
    assert a["uplift"]["window_ends"] == "2026-02-09" and rate["note"] == ""
    assert winback["offers"] == 8 and a["offers"] == 4                  # the existing keys are unchanged


def test_a_window_not_over_is_said_not_shown_as_zero(ab_report):
    late = _campaign(ab_report, "vip_thanks")["uplift"]
    assert (late["treated_n"], late["holdout_n"], late["window_complete"]) == (3, 2, False)
    assert late["window_note"] == "the 30-day window after the send is not over yet (ends 2026-04-24)"
    for metric in ("repurchase_rate", "spend"):
        figure = late[metric]
        assert (figure["status"], figure["difference"], figure["low"], figure["high"]) == (
            "window_not_over", None, None, None)
        assert figure["note"] == "the 30-day window after the send is not over yet (ends 2026-04-24)"


def test_csat_and_ces_in_the_report(ab_report):
    k = ab_report["kpis"]
    # CSAT: latest in the period A1 3, A2 4, A3 2 -> 1 of 3; B1's 6 and B2's 4.5 ignored; A4 answered in December
    assert (k["csat"], k["csat_responses"], k["csat_satisfied"], k["csat_ignored"]) == (0.3333, 3, 1, 2)
    # CES: A1 2, A2 7, A3 5 -> 14 / 3; B1's 8 and B2's empty score ignored
    assert (k["ces"], k["ces_responses"], k["ces_ignored"]) == (4.6667, 3, 2)
    assert [(m["month"], m["csat"], m["ces"]) for m in ab_report["trend"]] == [
        ("2026-01", 1.0, 2.0), ("2026-02", 0.5, 7.0), ("2026-03", 0.0, 5.0)]
    assert "2 csat_response answer(s) in the period ignored for CSAT: the score is not a whole number " \
           "from 1 to 5" in ab_report["warnings"]
    assert "2 ces_response answer(s) in the period ignored for CES: the score is not a whole number " \
           "from 1 to 7" in ab_report["warnings"]


def test_cohort_retention_in_the_report(ab_report):
    # January first buyers: A1, A2, A3, B1, H1 (OLD first bought in December). Again in month 0: A1;
    # month 1: A2 (B1's February order is a refund); month 2: A1, A3. February: F1. March: M1.
    assert ab_report["cohorts"] == [
        {"cohort": "2026-01", "customers": 5, "retention": [
            {"month": 0, "customers": 1, "share": 0.2}, {"month": 1, "customers": 1, "share": 0.2},
            {"month": 2, "customers": 2, "share": 0.4}]},
        {"cohort": "2026-02", "customers": 1, "retention": [
            {"month": 0, "customers": 1, "share": 1.0}, {"month": 1, "customers": 1, "share": 1.0}]},
        {"cohort": "2026-03", "customers": 1, "retention": [{"month": 0, "customers": 0, "share": 0.0}]}]
    json.dumps(ab_report)


def test_variants_windows_surveys_and_cohorts_in_terminal_and_json(ab_workspace, ab_report):
    buffer = io.StringIO()
    print_report(ab_report, Console(file=buffer, width=400))
    text = buffer.getvalue()
    assert re.search(r"│\s+│ A\s+│ \+50\.0 pp \(95% CI -10\.0 pp to \+110\.0 pp; n = 4 treated / 4 holdout\)", text)
    assert "the 30-day window after the send is not over yet (ends 2026-04-24)" in text
    assert "+0.0 pp (95% CI +0.0 pp to +0.0 pp" not in text and "+0.00 CNY (95% CI +0.00" not in text
    assert re.search(r"客户满意度 / CSAT\s+│ 33\.3%", text) and re.search(r"客户费力度 / CES\s+│ 4\.67", text)
    assert re.search(r"│ 2026-01 │ 5\s+│ 20\.0%\s+│ 20\.0%\s+│ 40\.0%", text)
    printed = CliRunner().invoke(main, ["report", str(ab_workspace), "--from", "2026-01-01", "--to", "2026-03-31",
                                        "--format", "json"])
    assert printed.exit_code == 0, printed.output
    data = json.loads(printed.output)
    assert [c["cohort"] for c in data["cohorts"]] == ["2026-01", "2026-02", "2026-03"]
    assert _campaign(data, "winback")["variants"][0]["uplift"]["treated_n"] == 4    # default min_group: 30
    assert "not enough data" in _campaign(data, "winback")["variants"][0]["uplift"]["repurchase_rate"]["note"]


def test_html_shows_variants_windows_surveys_and_cohorts(ab_report):
    page = render_html(ab_report)
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert set(re.findall(r"https?://[^\"' >]+", page)) == {"http://www.w3.org/2000/svg"}
    assert re.search(r'<g class="interval" data-campaign="winback" data-value="0.5" data-low="-0.1001" '
                     r'data-high="1.1001" data-treated-n="4" data-holdout-n="4" data-variant="A"', page)
    assert re.search(r'data-campaign="vip_thanks" data-status="window_not_over">窗口未结束 / window not over yet '
                     r'\(ends 2026-04-24\)', page)
    assert "+0.0 pp (95% CI +0.0 pp to +0.0 pp" not in page
    assert '<tr data-campaign="winback" data-variant="B" data-window-complete="true">' in page
    assert 'data-kpi="csat" data-value="0.3333"' in page and 'data-kpi="ces" data-value="4.6667"' in page
    assert 'data-chart="trend-csat"' in page and 'data-chart="trend-ces"' in page
    cells = re.findall(r'<g class="cell" data-cohort="([^"]+)" data-month="(\d+)" data-value="([^"]+)"', page)
    assert cells == [("2026-01", "0", "0.2"), ("2026-01", "1", "0.2"), ("2026-01", "2", "0.4"),
                     ("2026-02", "0", "1.0"), ("2026-02", "1", "1.0"), ("2026-03", "0", "0.0")]
    assert "<title>2026-01 首购 / first bought, 第 2 月 / month 2: 40.0% (2 / 5) 再次购买 / bought again</title>" \
           in page


def test_survey_trends_are_drawn_only_when_answered(report):
    page = render_html(report)                       # the first workspace has NPS answers but no CSAT or CES
    assert 'data-kpi="csat" data-value=""' in page and 'data-chart="trend-csat"' not in page


def test_html_with_cohorts_renders_in_headless_chromium(ab_report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    path = tmp_path / "report.html"
    path.write_text(render_html(ab_report), encoding="utf-8")
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           f"file://{path}"], check=False, capture_output=True,
                          text=True, timeout=60)
    dom = done.stdout
    assert 'data-chart="cohorts"' in dom, done.stderr[-2000:]
    heat = re.search(r'data-chart="cohorts".*?</svg>', dom, re.DOTALL).group(0)
    assert len(re.findall(r'<g class="cell"', heat)) == 6 and ">40.0%</text>" in heat
    assert len(re.findall(r'<svg class="chart" data-chart="trend-', dom)) == 8
