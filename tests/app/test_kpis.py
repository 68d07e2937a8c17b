"""Programme KPIs and uplift statistics, each checked against a hand-worked fixture."""

import math
from datetime import date

import numpy as np
import pandas as pd
import pytest

from engine.app.kpis import (
    Period,
    cohort_retention,
    compare_means,
    compare_proportions,
    kpi_trend,
    make_period,
    members_at,
    nps,
    period_kpis,
    t_quantile,
    uplift,
    window_outcomes,
)
from engine.errors import LoyaltyError

TZ = "Asia/Shanghai"
JAN = Period(date(2026, 1, 1), date(2026, 1, 31), TZ)


def orders_frame(rows):
    return pd.DataFrame({"order_id": [f"O{i}" for i in range(len(rows))],
                         "customer_id": [r[0] for r in rows],
                         "timestamp": pd.to_datetime([r[1] for r in rows]).tz_localize(TZ),
                         "amount": [float(r[2]) for r in rows]})


# Dec 2025 (previous period of Jan 2026, same length 31 days): A, B, C buy.
# Jan 2026: A buys twice (100 + 300), B once (200), D once (400), D has a refund (-50),
# E buys on 1 Feb 00:00 local (outside), C does not buy in January (churned).
ORDERS = orders_frame([
    ("A", "2025-12-05 10:00", 50), ("B", "2025-12-20 10:00", 150), ("C", "2025-12-31 23:59", 80),
    ("A", "2026-01-01 00:00", 100), ("A", "2026-01-15 12:00", 300), ("B", "2026-01-31 23:59", 200),
    ("D", "2026-01-10 09:00", 400), ("D", "2026-01-12 09:00", -50), ("E", "2026-02-01 00:00", 999),
])
CUSTOMERS = pd.DataFrame({"customer_id": list("ABCDEF"),
                          "signup_date": pd.to_datetime(["2025-01-01", "2025-06-01", "2025-11-01",
                                                         "2026-01-05", "2026-02-01", None])})
EVENTS = pd.DataFrame({
    "event_id": [f"E{i}" for i in range(7)],
    "customer_id": ["A", "A", "B", "C", "D", "E", "F"],
    "timestamp": pd.to_datetime(["2026-01-02", "2026-01-20", "2026-01-05", "2026-01-06", "2026-01-07",
                                 "2026-01-08", "2025-12-30"]).tz_localize(TZ),
    "type": ["nps_response"] * 5 + ["complaint", "nps_response"],
    "score": [3, 10, 9, 7, 0, None, 10],
})


def test_period_bounds_months_and_previous():
    assert JAN.start == pd.Timestamp("2026-01-01", tz=TZ)
    assert JAN.end == pd.Timestamp("2026-02-01", tz=TZ)
    assert JAN.days == 31
    assert JAN.previous() == Period(date(2025, 12, 1), date(2025, 12, 31), TZ)
    months = Period(date(2026, 1, 15), date(2026, 3, 3), TZ).months()
    assert [(m.first_day.isoformat(), m.last_day.isoformat()) for m in months] == [
        ("2026-01-15", "2026-01-31"), ("2026-02-01", "2026-02-28"), ("2026-03-01", "2026-03-03")]


def test_make_period_defaults_and_errors():
    latest = pd.Timestamp("2026-03-31 20:00", tz="UTC")   # 1 April in Shanghai
    period = make_period(None, None, TZ, latest)
    assert period.last_day == date(2026, 4, 1) and period.days == 90
    assert make_period("2026-01-01", "2026-01-31", TZ) == JAN
    with pytest.raises(LoyaltyError, match="after"):
        make_period("2026-02-01", "2026-01-01", TZ)
    with pytest.raises(LoyaltyError, match="not a date"):
        make_period("soon", None, TZ)


def test_period_kpis_hand_computed():
    k = period_kpis(ORDERS, EVENTS, CUSTOMERS, JAN)
    # January purchases (amount > 0): A x2, B x1, D x1 -> 4 purchases, 3 buyers
    assert k["orders"] == 4 and k["active_customers"] == 3
    assert k["revenue"] == pytest.approx(100 + 300 + 200 + 400 - 50)        # net of the refund = 950
    assert k["repurchase_rate"] == pytest.approx(1 / 3)                      # only A bought twice
    assert k["churn_rate"] == pytest.approx(1 / 3)                           # of A, B, C (Dec) C is gone
    assert k["churn_base"] == 3
    assert k["purchase_frequency"] == pytest.approx(4 / 3)
    assert k["aov"] == pytest.approx(1000 / 4)                               # purchases only: 250
    # members at 31 Jan: A, B, C, D signed up by then, F's signup unknown; E signs up in Feb
    assert k["members"] == 5
    assert k["arpu"] == pytest.approx(950 / 5)
    # historical CLV to 31 Jan: all net spend (50+150+80+100+300+200+400-50 = 1230) over 4 buyers
    assert k["historical_clv"] == pytest.approx(1230 / 4)


def test_nps_latest_answer_per_customer():
    result = nps(EVENTS, JAN)
    # A's latest is 10 (promoter), B 9 (promoter), C 7 (passive), D 0 (detractor); F answered in Dec
    assert result == {"nps": pytest.approx(100 * (2 - 1) / 4), "responses": 4, "promoters": 2,
                      "passives": 1, "detractors": 1, "nps_ignored": 0}
    assert nps(EVENTS.iloc[0:0], JAN)["nps"] is None


def test_nps_scores_off_the_0_to_10_scale_are_ignored_and_counted():
    """A score of 11 is not a promoter and 6.5 not a detractor: a bad export cannot tilt NPS."""
    odd = pd.DataFrame({"event_id": ["x1", "x2", "x3"], "customer_id": ["P", "Q", "R"],
                        "timestamp": pd.to_datetime(["2026-01-10 10:00"] * 3).tz_localize("Asia/Shanghai"),
                        "type": ["nps_response"] * 3, "score": [11, 6.5, -1]})
    both = pd.concat([EVENTS, odd], ignore_index=True)
    result = nps(both, JAN)
    assert result == {**nps(EVENTS, JAN), "nps_ignored": 3}


def test_members_without_signup_column():
    assert members_at(pd.DataFrame({"customer_id": ["A", "B"]}), date(2020, 1, 1)) == 2


def test_empty_period_gives_no_data_not_zero():
    k = period_kpis(ORDERS, EVENTS, CUSTOMERS, Period(date(2030, 1, 1), date(2030, 1, 31), TZ))
    assert k["orders"] == 0 and k["repurchase_rate"] is None and k["aov"] is None
    assert k["churn_rate"] is None and k["nps"] is None


def test_monthly_trend():
    trend = kpi_trend(ORDERS, EVENTS, CUSTOMERS, Period(date(2025, 12, 1), date(2026, 1, 31), TZ),
                      sizes=lambda as_of: {"as_of_day": as_of.date().isoformat()})
    assert [m["month"] for m in trend] == ["2025-12", "2026-01"]
    assert trend[0]["orders"] == 3 and trend[0]["repurchase_rate"] == 0
    assert trend[1]["revenue"] == pytest.approx(950)
    assert trend[1]["as_of_day"] == "2026-01-31"


# --------------------------------------------------------------------------- uplift statistics


@pytest.mark.parametrize("df, expected", [(10, 2.2281), (30, 2.0423), (60, 2.0003), (math.inf, 1.95996)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_difference_of_proportions_hand_computed():
    treated = np.array([True] * 20 + [False] * 20)      # 50%
    holdout = np.array([True] * 10 + [False] * 30)      # 25%
    result = compare_proportions(treated, holdout)
    se = math.sqrt(0.5 * 0.5 / 40 + 0.25 * 0.75 / 40)   # = 0.104583
    assert result["enough_data"] and result["treated_n"] == 40 and result["holdout_n"] == 40
    assert result["difference"] == pytest.approx(0.25)
    assert result["low"] == pytest.approx(0.25 - 1.959964 * se)
    assert result["high"] == pytest.approx(0.25 + 1.959964 * se)
    assert result["low"] == pytest.approx(0.04502, abs=1e-4)


def test_welch_difference_of_means_hand_computed():
    treated = np.array([10.0, 20.0] * 20)               # mean 15, sample var 25*40/39
    holdout = np.array([0.0, 10.0] * 15)                # mean 5,  sample var 25*30/29
    result = compare_means(treated, holdout)
    v1, v2 = (25 * 40 / 39) / 40, (25 * 30 / 29) / 30
    df = (v1 + v2) ** 2 / (v1 ** 2 / 39 + v2 ** 2 / 29)
    half = t_quantile(0.975, df) * math.sqrt(v1 + v2)
    assert result["difference"] == pytest.approx(10.0)
    assert result["df"] == pytest.approx(df)
    assert 1.995 < t_quantile(0.975, df) < 2.0           # df is about 62.5: t = 1.9987
    assert (result["low"], result["high"]) == (pytest.approx(10 - half), pytest.approx(10 + half))


def test_not_enough_data_is_said_plainly():
    result = compare_proportions(np.ones(29, dtype=bool), np.ones(100, dtype=bool))
    assert not result["enough_data"] and result["difference"] is None
    assert result["note"].startswith("not enough data") and "29 treated" in result["note"]


def test_window_outcomes_boundaries():
    start = pd.Timestamp("2026-01-10 10:00", tz=TZ)
    units = pd.DataFrame({"customer_id": ["A", "B", "C"], "start": [start] * 3})
    orders = orders_frame([
        ("A", "2026-01-10 10:00", 500),     # at the send itself: not after it
        ("A", "2026-02-09 10:00", 120),     # exactly 30 days later: inside
        ("B", "2026-02-09 10:01", 80),      # one minute too late
        ("C", "2026-01-11 00:00", 60), ("C", "2026-01-12 00:00", -60),   # bought, then refunded
    ])
    result = window_outcomes(units, orders, 30)
    assert result["repurchased"].tolist() == [True, False, True]
    assert result["spend"].tolist() == [120.0, 0.0, 0.0]


def test_uplift_counts_each_customer_once_and_drops_overlap():
    send = pd.Timestamp("2026-01-01 10:00", tz=TZ)
    treated_ids = [f"T{i}" for i in range(40)]
    holdout_ids = [f"H{i}" for i in range(40)]
    treated = pd.DataFrame({"customer_id": treated_ids + ["T0", "X"],
                            "start": [send] * 40 + [send + pd.Timedelta(days=5), send]})
    holdout = pd.DataFrame({"customer_id": holdout_ids + ["X"], "start": [send] * 41})
    # 20 of 40 treated buy 100 each within the window, 10 of 40 held-out customers buy 100
    orders = orders_frame([(c, "2026-01-05 12:00", 100) for c in treated_ids[:20] + holdout_ids[:10]])
    result = uplift(treated, holdout, orders, days=30)
    assert result["treated_n"] == 40 and result["holdout_n"] == 40   # X was in both; T0 once
    assert result["repurchase_rate"]["difference"] == pytest.approx(0.25)
    assert result["spend"]["treated"] == pytest.approx(50.0)
    assert result["spend"]["holdout"] == pytest.approx(25.0)
    assert result["spend"]["difference"] == pytest.approx(25.0)


# --------------------------------------------------------------------------- CSAT, CES (issue 19)

SURVEYS = pd.DataFrame({
    "event_id": [f"S{i}" for i in range(11)],
    "customer_id": ["A", "A", "B", "C", "D", "E", "A", "B", "C", "D", "E"],
    "timestamp": pd.to_datetime(["2026-01-02", "2026-01-20", "2026-01-05", "2026-01-06", "2026-01-07",
                                 "2025-12-30", "2026-01-03", "2026-01-04", "2026-01-05", "2026-01-06",
                                 "2026-01-07"]).tz_localize(TZ),
    "type": ["csat_response"] * 6 + ["ces_response"] * 5,
    "score": [5, 3, 4, 6, 4.5, 5, 2, 7, 5, 8, None],
})


def test_csat_share_of_4_and_5_latest_answer_per_customer_off_scale_ignored():
    k = period_kpis(ORDERS, SURVEYS, CUSTOMERS, JAN)
    # A's latest is 3 (not satisfied), B 4 (satisfied); C's 6 and D's 4.5 are off the 1-5 scale
    # (ignored, counted); E answered in December (outside the period, not counted at all)
    assert (k["csat"], k["csat_responses"], k["csat_satisfied"], k["csat_ignored"]) == (0.5, 2, 1, 2)


def test_ces_mean_score_off_scale_ignored():
    k = period_kpis(ORDERS, SURVEYS, CUSTOMERS, JAN)
    # A 2, B 7, C 5 -> mean 14 / 3; D's 8 is off the 1-7 scale, E's answer has no score
    assert k["ces"] == pytest.approx(14 / 3) and k["ces_responses"] == 3 and k["ces_ignored"] == 2
    assert k["nps"] is None                                  # no nps_response among these events


def test_survey_kpis_without_answers_are_no_data_and_trend_by_month():
    empty = period_kpis(ORDERS, EVENTS, CUSTOMERS, JAN)
    assert (empty["csat"], empty["csat_responses"], empty["ces"], empty["ces_ignored"]) == (None, 0, None, 0)
    trend = kpi_trend(ORDERS, SURVEYS, CUSTOMERS, Period(date(2025, 12, 1), date(2026, 1, 31), TZ))
    assert [(m["month"], m["csat"], m["ces"]) for m in trend] == [("2025-12", 1.0, None), ("2026-01", 0.5,
                                                                                          pytest.approx(14 / 3))]


# --------------------------------------------------------------------------- cohorts (issue 19)


def test_cohort_retention_hand_computed():
    orders = orders_frame([
        ("OLD", "2025-12-15 10:00", 50), ("OLD", "2026-01-20 10:00", 50),   # first bought before the period
        ("A", "2026-01-03 10:00", 100), ("A", "2026-01-25 10:00", 100), ("A", "2026-03-10 10:00", 100),
        ("B", "2026-01-31 23:30", 100), ("B", "2026-02-05 10:00", 100),
        ("C", "2026-01-10 10:00", 100), ("C", "2026-02-20 10:00", -100),   # a refund is not a purchase
        ("D", "2026-01-12 10:00", 100), ("D", "2026-03-20 10:00", 100),
        ("F", "2026-02-10 10:00", 100), ("F", "2026-02-12 10:00", 100), ("F", "2026-03-05 10:00", 100),
        ("G", "2026-02-28 10:00", 0),                                       # zero is not a purchase either
        ("G", "2026-03-01 00:30", 100),
        ("H", "2026-04-02 10:00", 100),                                     # after the period: ignored
    ])
    cohorts = cohort_retention(orders, Period(date(2026, 1, 1), date(2026, 3, 31), TZ))
    shares = {c["cohort"]: (c["customers"], [(r["month"], r["customers"], r["share"]) for r in c["retention"]])
              for c in cohorts}
    # January: A, B, C, D. Month 0 again: A (25 Jan). Month 1: B. Month 2: A, D.
    # February: F (again in Feb and in March). March: G (its 28 Feb order was for 0).
    assert shares == {"2026-01": (4, [(0, 1, 0.25), (1, 1, 0.25), (2, 2, 0.5)]),
                      "2026-02": (1, [(0, 1, 1.0), (1, 1, 1.0)]),
                      "2026-03": (1, [(0, 0, 0.0)])}


def test_cohort_months_are_local_and_empty_data_gives_no_cohorts():
    # 31 Jan 16:30 UTC is 1 Feb 00:30 in Shanghai: a February customer
    orders = pd.DataFrame({"order_id": ["O1"], "customer_id": ["A"],
                           "timestamp": pd.to_datetime(["2026-01-31 16:30"]).tz_localize("UTC"),
                           "amount": [10.0]})
    cohorts = cohort_retention(orders, Period(date(2026, 1, 1), date(2026, 2, 28), TZ))
    assert [(c["cohort"], c["customers"]) for c in cohorts] == [("2026-02", 1)]
    assert cohort_retention(ORDERS.iloc[0:0], JAN) == []


# --------------------------------------------------------------------------- uplift window (issue 19)


def _groups(send):
    treated = pd.DataFrame({"customer_id": [f"T{i}" for i in range(30)], "start": [send] * 30})
    holdout = pd.DataFrame({"customer_id": [f"H{i}" for i in range(30)], "start": [send] * 30})
    return treated, holdout


def test_uplift_before_any_order_could_happen_says_the_window_is_not_over():
    send = pd.Timestamp("2026-12-15 10:00", tz=TZ)
    treated, holdout = _groups(send)
    orders = orders_frame([("T0", "2026-12-01 10:00", 100)])           # the data ends before the send
    result = uplift(treated, holdout, orders, days=30, timezone=TZ)
    assert (result["window_complete"], result["window_ends"]) == (False, "2027-01-14")
    for metric in ("repurchase_rate", "spend"):
        figure = result[metric]
        assert figure["status"] == "window_not_over" and not figure["enough_data"]
        assert (figure["difference"], figure["low"], figure["high"]) == (None, None, None)
        assert figure["note"] == "the 30-day window after the send is not over yet (ends 2027-01-14)"


def test_uplift_window_part_way_keeps_the_figures_so_far_and_orders_after_the_end_are_ignored():
    send = pd.Timestamp("2026-01-01 10:00", tz=TZ)
    treated, holdout = _groups(send)
    orders = orders_frame([(c, "2026-01-05 12:00", 100) for c in [f"T{i}" for i in range(15)] + ["H0"]] +
                          [("H1", "2026-01-25 12:00", 100)])
    part = uplift(treated, holdout, orders, days=30, observed_until=pd.Timestamp("2026-01-20 23:59", tz=TZ),
                  timezone=TZ)
    rate = part["repurchase_rate"]
    assert part["window_complete"] is False and rate["status"] == "measured"
    assert (rate["treated"], rate["holdout"], rate["difference"]) == (0.5, pytest.approx(1 / 30),
                                                                      pytest.approx(0.5 - 1 / 30))
    assert rate["note"] == "so far: the 30-day window after the send is not over yet (ends 2026-01-31)"
    full = uplift(treated, holdout, orders, days=30, observed_until=pd.Timestamp("2026-02-28", tz=TZ),
                  timezone=TZ)
    assert full["window_complete"] is True and full["repurchase_rate"]["note"] == ""
    assert full["repurchase_rate"]["holdout"] == pytest.approx(2 / 30)     # H1's 25 Jan order now counts
