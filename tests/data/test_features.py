"""engine.data.features: every built-in and custom feature against a slow per-row reference."""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine.config.expressions import compile_expression
from engine.config.model import ContactPolicy, FeatureDef, Location, Program, Settings, SourceDef, TierDef
from engine.data.features import BUILTIN_FEATURES, compute_features, days_before, feature_order, rfm_scores
from engine.data.sources import load_tables
from engine.errors import RuleError

UTC = dt.timezone.utc
ORDER_NAMES = {"order_id": "string", "customer_id": "string", "timestamp": "date", "amount": "number",
               "channel": "string"}
EVENT_NAMES = {"event_id": "string", "customer_id": "string", "timestamp": "date", "type": "string",
               "score": "number"}


def settings_for(tz: str, **data) -> Settings:
    return Settings(name="t", timezone=tz, currency="CNY", default_locale="en", data=data,
                    state_path=Path("s.db"), contact_policy=ContactPolicy(), holdout=0.0, channels={})


def scoped(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {**names, **{f"{prefix}.{k}": v for k, v in names.items()}}


def agg(name, how, column, source, where=None, within=None, kind="number") -> FeatureDef:
    names = scoped(ORDER_NAMES if source == "orders" else EVENT_NAMES, "order" if source == "orders" else "event")
    expression = compile_expression(where, names) if where else None
    return FeatureDef(name, how, column, source, expression, within, None, kind, Location("rules/f.yaml", 1, 1))


def derived(name, text, names, kind) -> FeatureDef:
    expression = compile_expression(text, names)
    return FeatureDef(name, None, None, None, None, None, expression, kind, Location("rules/f.yaml", 2, 1))


def make_program(within: int) -> Program:
    features = {f.name: f for f in [
        agg("spend_w", "sum", "amount", "orders", within=within),
        agg("big_orders", "count", None, "orders", where="order.amount >= 50"),
        agg("web_orders", "count", None, "orders", where='channel == "web"'),
        agg("avg_web", "avg", "amount", "orders", where='order.channel == "web"'),
        agg("min_amount", "min", "amount", "orders"),
        agg("max_amount_w", "max", "amount", "orders", within=within),
        agg("first_channel", "first", "channel", "orders", kind="string"),
        agg("last_channel", "last", "channel", "orders", kind="string"),
        agg("distinct_channels", "distinct", "channel", "orders"),
        agg("channels_known", "count", "channel", "orders"),
        agg("nps_w", "count", None, "events", where='type == "nps_response"', within=within),
        agg("max_score", "max", "score", "events"),
        agg("last_score", "last", "score", "events"),
        agg("last_order_at", "max", "timestamp", "orders", kind="date"),
    ]}
    catalogue = {name: spec[0] for name, spec in BUILTIN_FEATURES.items()}
    catalogue.update({name: f.type for name, f in features.items()})
    features["double_spend"] = derived("double_spend", "spend_w * 2", catalogue, "number")
    catalogue["double_spend"] = "number"
    features["is_big"] = derived("is_big", "big_orders > 0", catalogue, "bool")
    catalogue["is_big"] = "bool"
    tiers = {name: TierDef(name, compile_expression(text, catalogue)) for name, text in [
        ("gold", "monetary_365d >= 150"), ("silver", "orders_365d >= 2 or is_big"),
        ("bronze", "orders_total >= 1")]}
    return Program(features=features, segments={}, tiers=tiers, campaigns={})


# --------------------------------------------------------------------------- the slow reference


def ref_localize(wall: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """First of two ambiguous instants; a skipped wall time moves forward to the transition."""
    first = wall.replace(tzinfo=tz, fold=0)
    if first.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall:
        return first.astimezone(UTC)
    t = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    while t.astimezone(tz).replace(tzinfo=None) < wall:
        t += dt.timedelta(minutes=1)
    return t


def ref_score(value, values, higher_is_better) -> int:
    if not higher_is_better:
        value, values = -value, [-v for v in values]
    below = sum(v < value for v in values)
    equal = sum(v == value for v in values)
    rank = Fraction(2 * below + equal + 1, 2)
    return math.floor(5 * (rank - Fraction(1, 2)) / len(values)) + 1


def ref_birthday(birthday: dt.date, today: dt.date) -> tuple[int, int]:
    def on(year):
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        day = 28 if (birthday.month, birthday.day) == (2, 29) and not leap else birthday.day
        return dt.date(year, birthday.month, day)
    upcoming = on(today.year) if on(today.year) >= today else on(today.year + 1)
    age = today.year - birthday.year - (today < on(today.year))
    return (upcoming - today).days, age


def reference(customers, orders, events, as_of: dt.datetime, tz_name: str, within: int) -> list[dict]:
    tz = ZoneInfo(tz_name)
    local = as_of.astimezone(tz)
    today = local.date()

    def edge(days):
        return ref_localize(local.replace(tzinfo=None) - dt.timedelta(days=days), tz)

    b365, b180, b90, bw = edge(365), edge(180), edge(90), edge(within)
    rows = []
    for cid, birthday, signup in customers:
        mine = [o for o in orders if o["customer_id"] == cid and o["ts"] <= as_of]
        evs = [e for e in events if e["customer_id"] == cid and e["ts"] <= as_of]
        r: dict = {"customer_id": cid}
        amounts = [o["amount"] for o in mine]
        r["orders_total"] = len(mine)
        r["lifetime_spend"] = sum(amounts)
        r["avg_order_value"] = sum(amounts) / len(mine) if mine else None
        r["days_since_last_order"] = (today - max(o["ts"] for o in mine).astimezone(tz).date()).days if mine else None
        r["days_since_first_order"] = (today - min(o["ts"] for o in mine).astimezone(tz).date()).days if mine else None
        r["orders_365d"] = sum(o["ts"] > b365 for o in mine)
        r["monetary_365d"] = sum(o["amount"] for o in mine if o["ts"] > b365)
        r["orders_last_90d"] = sum(o["ts"] > b90 for o in mine)
        r["orders_prev_90d"] = sum(b180 < o["ts"] <= b90 for o in mine)
        r["days_since_signup"] = (today - signup).days if signup else None
        r["days_to_birthday"], r["age"] = ref_birthday(birthday, today) if birthday else (None, None)
        nps = [e for e in evs if e["type"] == "nps_response"]
        r["last_nps_score"] = max(nps, key=lambda e: (e["ts"], e["row"]))["score"] if nps else None
        r["complaints_90d"] = sum(e["type"] == "complaint" and e["ts"] > b90 for e in evs)
        # custom features
        in_w = [o for o in mine if o["ts"] > bw]
        r["spend_w"] = sum(o["amount"] for o in in_w)
        r["big_orders"] = sum(o["amount"] >= 50 for o in mine)
        web = [o["amount"] for o in mine if o["channel"] == "web"]
        r["web_orders"] = len(web)
        r["avg_web"] = sum(web) / len(web) if web else None
        r["min_amount"] = min(amounts) if amounts else None
        r["max_amount_w"] = max(o["amount"] for o in in_w) if in_w else None
        known = [o for o in mine if o["channel"] is not None]
        r["first_channel"] = min(known, key=lambda o: (o["ts"], o["row"]))["channel"] if known else None
        r["last_channel"] = max(known, key=lambda o: (o["ts"], o["row"]))["channel"] if known else None
        r["distinct_channels"] = len({o["channel"] for o in known})
        r["channels_known"] = len(known)
        r["nps_w"] = sum(e["type"] == "nps_response" and e["ts"] > bw for e in evs)
        scored = [e for e in evs if e["score"] is not None]
        r["max_score"] = max(e["score"] for e in scored) if scored else None
        r["last_score"] = max(scored, key=lambda e: (e["ts"], e["row"]))["score"] if scored else None
        r["last_order_at"] = (max(o["ts"] for o in mine).astimezone(tz).replace(tzinfo=None) if mine else None)
        r["double_spend"] = r["spend_w"] * 2
        r["is_big"] = r["big_orders"] > 0
        rows.append(r)
    ranked = [r for r in rows if r["orders_total"] > 0]
    for r in rows:
        if r["orders_total"] == 0:
            r.update(rfm_r=None, rfm_f=None, rfm_m=None, rfm_score=None)
            continue
        r["rfm_r"] = ref_score(r["days_since_last_order"], [x["days_since_last_order"] for x in ranked], False)
        r["rfm_f"] = ref_score(r["orders_365d"], [x["orders_365d"] for x in ranked], True)
        r["rfm_m"] = ref_score(round(r["monetary_365d"], 6), [round(x["monetary_365d"], 6) for x in ranked], True)
        r["rfm_score"] = r["rfm_r"] + r["rfm_f"] + r["rfm_m"]
    for r in rows:
        r["tier"] = ("gold" if r["monetary_365d"] >= 150 else
                     "silver" if r["orders_365d"] >= 2 or r["is_big"] else
                     "bronze" if r["orders_total"] >= 1 else None)
    return rows


def same(ours, theirs) -> bool:
    if theirs is None or (isinstance(theirs, float) and math.isnan(theirs)):
        return ours is None or ours is pd.NA or ours is pd.NaT or (isinstance(ours, float) and math.isnan(ours))
    if ours is None or ours is pd.NA or ours is pd.NaT:
        return False
    if isinstance(theirs, dt.datetime):
        return pd.Timestamp(ours) == pd.Timestamp(theirs)
    if isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
        return math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=1e-9)
    return ours == theirs


# --------------------------------------------------------------------------- random data


DST_DATES = {"America/New_York": ["2024-03-10", "2024-11-03"], "Europe/Berlin": ["2024-03-31", "2024-10-27"],
             "Asia/Shanghai": ["2024-02-29", "2025-02-28"]}


@st.composite
def scenarios(draw):
    tz = draw(st.sampled_from(sorted(DST_DATES)))
    within = draw(st.sampled_from([1, 2, 3, 30]))
    base = dt.date.fromisoformat(draw(st.sampled_from(DST_DATES[tz])))
    shift = draw(st.sampled_from([0, 1, 2, 3, 30, 90, 180, 365]))
    wall = dt.datetime.combine(base + dt.timedelta(days=shift),
                               dt.time(draw(st.integers(0, 23)), draw(st.sampled_from([0, 15, 30, 59]))))
    as_of = pd.Timestamp(wall).tz_localize(tz, ambiguous=True, nonexistent="shift_forward")
    anchors = [as_of] + [days_before(as_of.tz_convert(tz), d) for d in (365, 180, 90, within)]
    n = draw(st.integers(1, 6))
    dates = st.one_of(st.none(), st.dates(dt.date(1960, 1, 1), dt.date(2006, 12, 31)),
                      st.sampled_from([dt.date(2000, 2, 29), dt.date(1996, 2, 29), dt.date(1990, 2, 28),
                                       dt.date(1991, 3, 1), dt.date(1980, wall.month, min(wall.day, 28))]))
    customers = [(f"c{i}", draw(dates), draw(st.one_of(st.none(), st.dates(dt.date(2015, 1, 1), dt.date(2026, 1, 1)))))
                 for i in range(n)]

    def stamp():
        anchor = draw(st.sampled_from(anchors))
        delta = draw(st.one_of(st.sampled_from([0, 1, -1, 3600, -3600]),
                               st.integers(-400 * 86400, 40 * 86400)))
        return (anchor + pd.Timedelta(seconds=delta)).tz_convert("UTC").to_pydatetime()

    orders = [{"customer_id": f"c{draw(st.integers(0, n - 1))}", "ts": stamp(),
               "amount": draw(st.integers(-40, 400)) / 2, "channel": draw(st.sampled_from(["web", "app", None])),
               "row": i} for i in range(draw(st.integers(0, 14)))]
    events = [{"customer_id": f"c{draw(st.integers(0, n - 1))}", "ts": stamp(),
               "type": draw(st.sampled_from(["nps_response", "complaint", "view"])),
               "score": draw(st.one_of(st.none(), st.integers(0, 10))), "row": i}
              for i in range(draw(st.integers(0, 8)))]
    return tz, within, as_of, customers, orders, events


def load(root: Path, tz: str, customers, orders, events):
    text = lambda v: "" if v is None else str(v)  # noqa: E731
    (root / "c.csv").write_text("customer_id,birthday,signup_date\n" + "".join(
        f"{c},{text(b)},{text(s)}\n" for c, b, s in customers))
    (root / "o.csv").write_text("order_id,customer_id,timestamp,amount,channel\n" + "".join(
        f"o{o['row']},{o['customer_id']},{o['ts'].isoformat()},{o['amount']},{text(o['channel'])}\n" for o in orders))
    (root / "e.csv").write_text("event_id,customer_id,timestamp,type,score\n" + "".join(
        f"e{e['row']},{e['customer_id']},{e['ts'].isoformat()},{e['type']},{text(e['score'])}\n" for e in events))
    s = settings_for(tz, customers=SourceDef("customers", path=Path("c.csv")),
                     orders=SourceDef("orders", path=Path("o.csv"), fields={"channel": "string"}),
                     events=SourceDef("events", path=Path("e.csv")))
    return load_tables(s, root), s


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_feature_matches_the_reference(scenario):
    tz, within, as_of, customers, orders, events = scenario
    with tempfile.TemporaryDirectory() as folder:
        tables, s = load(Path(folder), tz, customers, orders, events)
    frame = compute_features(tables, make_program(within), s, as_of)
    expected = reference(customers, orders, events, as_of.to_pydatetime(), tz, within)
    assert list(frame["customer_id"]) == [r["customer_id"] for r in expected]
    for name in expected[0]:
        ours = frame[name].astype(object).where(frame[name].notna(), None).tolist()
        for position, row in enumerate(expected):
            assert same(ours[position], row[name]), (name, row["customer_id"], ours[position], row[name])
    assert set(BUILTIN_FEATURES) <= set(frame.columns)


# --------------------------------------------------------------------------- explicit cases


def frame_for(tmp_path, tz, customers, orders, as_of, within=30, events=()):
    tables, s = load(tmp_path, tz, customers, orders, list(events))
    return compute_features(tables, make_program(within), s, as_of)


def order(customer, ts, amount=10.0, row=0, channel="web"):
    return {"customer_id": customer, "ts": pd.Timestamp(ts).tz_convert("UTC").to_pydatetime(),
            "amount": amount, "channel": channel, "row": row}


def test_window_edges_exactly_n_days_and_one_second(tmp_path):
    as_of = pd.Timestamp("2024-06-30 12:00", tz="Asia/Shanghai")
    edge = pd.Timestamp("2024-04-01 12:00", tz="Asia/Shanghai")   # 90 calendar days earlier
    orders = [order("a", edge, row=0), order("b", edge + pd.Timedelta(seconds=1), row=1),
              order("c", as_of, row=2), order("c", as_of + pd.Timedelta(seconds=1), row=3)]
    f = frame_for(tmp_path, "Asia/Shanghai", [("a", None, None), ("b", None, None), ("c", None, None)], orders, as_of)
    assert list(f["orders_last_90d"]) == [0, 1, 1]
    assert list(f["orders_prev_90d"]) == [1, 0, 0]
    assert list(f["orders_total"]) == [1, 1, 1]            # the order after as_of is ignored


def test_windows_are_calendar_days_across_dst(tmp_path):
    # New York springs forward on 2024-03-10: "1 day" before 2024-03-10 12:00 EDT is 2024-03-09 12:00 EST,
    # 23 hours earlier, not 24.
    tz = "America/New_York"
    as_of = pd.Timestamp("2024-03-10 12:00", tz=tz)
    inside = pd.Timestamp("2024-03-09 12:30", tz=tz)
    outside = pd.Timestamp("2024-03-09 11:59:59", tz=tz)
    f = frame_for(tmp_path, tz, [("a", None, None), ("b", None, None)],
                  [order("a", inside, 5, 0), order("b", outside, 7, 1)], as_of, within=1)
    assert list(f["spend_w"]) == [5, 0]
    assert days_before(as_of, 1) == pd.Timestamp("2024-03-09 12:00", tz=tz)
    assert as_of - days_before(as_of, 1) == pd.Timedelta(hours=23)
    assert list(f["days_since_last_order"]) == [1, 1]


@pytest.mark.parametrize("as_of,days,age", [
    ("2025-02-28 09:00", 0, 25),     # common year: 29 Feb is celebrated on 28 Feb
    ("2025-02-27 09:00", 1, 24),
    ("2024-02-28 09:00", 1, 23),     # leap year: the real day
    ("2024-02-29 23:59", 0, 24),
    ("2024-03-01 00:00", 364, 24),   # next one is 2025-02-28
])
def test_29_february_birthdays(tmp_path, as_of, days, age):
    f = frame_for(tmp_path, "Asia/Shanghai", [("a", dt.date(2000, 2, 29), dt.date(2024, 1, 1))], [],
                  pd.Timestamp(as_of, tz="Asia/Shanghai"))
    assert (f["days_to_birthday"].iloc[0], f["age"].iloc[0]) == (days, age)


def test_rfm_scores_quintiles_and_ties():
    assert list(rfm_scores(np.arange(10.0))) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert list(rfm_scores(np.arange(10.0), higher_is_better=False)) == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    assert list(rfm_scores(np.array([7.0] * 6))) == [3] * 6                # everyone tied: the middle
    assert list(rfm_scores(np.array([1.0, 1.0, 1.0, 1.0, 9.0]))) == [3, 3, 3, 3, 5]   # four tied: mid-rank 2.5 of 5
    assert list(rfm_scores(np.array([4.0]))) == [3]


def test_customers_without_orders_have_null_rfm_and_tiers_first_match(tmp_path):
    as_of = pd.Timestamp("2024-06-30 12:00", tz="Asia/Shanghai")
    orders = [order("a", "2024-06-01 10:00+08:00", 200, 0), order("b", "2024-06-02 10:00+08:00", 10, 1),
              order("b", "2024-06-03 10:00+08:00", 10, 2)]
    f = frame_for(tmp_path, "Asia/Shanghai", [("a", None, None), ("b", None, None), ("c", None, None)], orders, as_of)
    # a: gold (also matches bronze, but gold comes first); b: silver; c: no tier
    assert f["tier"].tolist()[:2] == ["gold", "silver"] and f["tier"].isna().tolist() == [False, False, True]
    assert f["rfm_r"].isna().tolist() == [False, False, True]
    assert f["rfm_score"].iloc[0] == f["rfm_r"].iloc[0] + f["rfm_f"].iloc[0] + f["rfm_m"].iloc[0]


def test_feature_order_follows_dependencies_and_reports_cycles():
    names = {"x": "number", "y": "number", "z": "number", "monetary_365d": "number"}
    a = derived("a", "y + 1", names, "number")
    b = FeatureDef("y", None, None, None, None, None, compile_expression("z * 2", names), "number",
                   Location("rules/f.yaml", 5, 3))
    c = FeatureDef("z", None, None, None, None, None, compile_expression("x", names), "number",
                   Location("rules/f.yaml", 9, 3))
    assert feature_order({"y": b, "z": c, "a": a}) == ["z", "y", "a"]
    loop = FeatureDef("x", None, None, None, None, None, compile_expression("y", names), "number",
                      Location("rules/f.yaml", 12, 3))
    with pytest.raises(RuleError) as info:
        feature_order({"y": b, "z": c, "x": loop})
    assert "rules/f.yaml:5:3: features depend on each other in a cycle: y -> z -> x -> y" in str(info.value)
