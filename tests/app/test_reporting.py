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
from engine.app.reporting import build_report, print_report, render_html, write_html_report
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
