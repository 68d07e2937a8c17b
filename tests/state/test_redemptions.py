"""Redemptions: matching orders to issued codes, importing files, campaign results."""

import pandas as pd
import pytest

from engine import Workspace
from engine.app.scaffold import init_workspace
from engine.data.sources import load_tables
from engine.errors import DataError
from engine.state.redemptions import (
    all_redemptions,
    campaign_results,
    match_order_redemptions,
    offer_outcomes,
    sync_order_redemptions,
)
from engine.state.store import StateStore

TZ = "Asia/Shanghai"


def settings_and_orders(root):
    """What ``sync_order_redemptions`` reads: the programme's settings and its orders."""
    settings = Workspace(root).load().settings
    return settings, load_tables(settings, root).orders
SEND = "2026-01-10T10:00:00+08:00"


def codes_and_offers():
    codes = pd.DataFrame({"code": ["WB1", "WB2", "WB3", "VIP1"], "offer_id": ["o1", "o2", "o3", "o4"],
                          "campaign": ["winback", "winback", "winback", "vip"],
                          "customer_id": ["A", "B", "C", "D"],
                          "expires_at": ["2026-01-24T23:59:59+08:00", "2026-01-24", None, "2026-01-24T23:59:59+08:00"]})
    offers = pd.DataFrame({"offer_id": ["o1", "o2", "o3", "o4"], "send_at": [SEND] * 4})
    return codes, offers


def orders(rows):
    return pd.DataFrame({"order_id": [r[0] for r in rows], "customer_id": [r[1] for r in rows],
                         "timestamp": pd.to_datetime([r[2] for r in rows]).tz_localize(TZ),
                         "amount": [float(r[3]) for r in rows], "coupon_code": [r[4] for r in rows]})


def test_orders_with_a_coupon_code_are_matched_within_the_coupon_validity():
    codes, offers = codes_and_offers()
    found = match_order_redemptions(orders([
        ("X1", "A", "2026-01-09 09:00", 100, "WB1"),     # before the send: not attributed
        ("X2", "A", "2026-01-12 09:00", 210, " wb1 "),   # typed in lower case with spaces: matched
        ("X3", "A", "2026-01-13 09:00", 90, "WB1"),      # second use of a single-use code: ignored
        ("X4", "B", "2026-01-24 23:00", 150, "WB2"),     # bare expiry date = valid through that day
        ("X5", "C", "2026-02-15 09:00", 80, "WB3"),      # no expiry: 30 days after the send -> too late
        ("X6", "D", "2026-01-25 00:00", 500, "VIP1"),    # one second after expiry
        ("X7", "E", "2026-01-15 09:00", 70, "NOPE"),     # not a code we issued
        ("X8", "E", "2026-01-15 09:00", 70, None),
    ]), codes, offers, TZ)
    assert found[["code", "order_id", "customer_id", "amount"]].values.tolist() == [
        ["WB1", "X2", "A", 210.0], ["WB2", "X4", "B", 150.0]]
    assert found["redeemed_at"].tolist()[0] == "2026-01-12T09:00:00+08:00"
    assert found["redemption_id"].tolist() == ["WB1:X2", "WB2:X4"]


def test_attribution_window_per_campaign_overrides_validity():
    codes, offers = codes_and_offers()
    data = orders([("X5", "C", "2026-02-15 09:00", 80, "WB3"), ("X2", "A", "2026-01-12 09:00", 210, "WB1")])
    assert len(match_order_redemptions(data, codes, offers, TZ)) == 1
    found = match_order_redemptions(data, codes, offers, TZ, attribution_days={"winback": 1})
    assert found["order_id"].tolist() == []                      # 1 day: even X2 (2 days) is too late
    found = match_order_redemptions(data, codes, offers, TZ, attribution_days={"winback": 40})
    assert sorted(found["order_id"]) == ["X2", "X5"]


def test_orders_without_coupon_column_match_nothing():
    codes, offers = codes_and_offers()
    assert match_order_redemptions(orders([]).drop(columns="coupon_code"), codes, offers, TZ).empty


def test_campaign_results_hand_computed():
    offers = pd.DataFrame({
        "offer_id": ["o1", "o2", "o3", "o4", "o5"], "campaign": ["winback"] * 4 + ["vip"],
        "customer_id": list("ABCDE"), "variant": ["A", "A", "B", "B", None],
        "status": ["sent", "sent", "failed", "sent", "pending"], "cost": [20.0, 20.0, 25.0, 25.0, 5.0],
        "send_at": [SEND] * 5})
    codes = pd.DataFrame({"code": ["C1", "C2", "C3", "C4"], "offer_id": ["o1", "o2", "o3", "o4"]})
    redemptions = pd.DataFrame({"redemption_id": ["r1", "r2"], "code": ["C1", "C4"], "customer_id": ["A", "D"],
                                "order_id": ["X1", "X2"], "amount": [200.0, 90.0],
                                "redeemed_at": ["2026-01-12T09:00:00+08:00"] * 2})
    results = campaign_results(offer_outcomes(offers, codes, redemptions), {"winback": "沉睡客唤醒", "vip": "VIP"})
    winback, vip = results
    assert winback["name"] == "沉睡客唤醒"
    assert (winback["offers"], winback["delivered"], winback["failed"], winback["redeemed"]) == (4, 3, 1, 2)
    assert winback["redemption_rate"] == pytest.approx(2 / 3)          # of delivered offers
    assert winback["revenue"] == pytest.approx(290.0)
    assert winback["cost"] == pytest.approx(20 + 20 + 25)              # delivered offers only
    assert winback["roi"] == pytest.approx((290 - 65) / 65)
    a, b = winback["variants"]
    assert (a["variant"], a["delivered"], a["redeemed"], a["revenue"]) == ("A", 2, 1, 200.0)
    assert (b["variant"], b["delivered"], b["redeemed"], b["roi"]) == ("B", 1, 1, pytest.approx((90 - 25) / 25))
    assert vip["delivered"] == 0 and vip["redemption_rate"] is None and vip["roi"] is None
    assert vip["pending"] == 1 and vip["variants"] == []


def test_all_redemptions_deduplicates_code_and_order():
    row = {"redemption_id": "a", "code": "C1", "customer_id": "A", "order_id": "X1", "amount": 1.0,
           "redeemed_at": None}
    both = all_redemptions(pd.DataFrame([row]), pd.DataFrame([row | {"redemption_id": "b"}]))
    assert len(both) == 1


# --------------------------------------------------------------------------- import (a real workspace)


@pytest.fixture()
def workspace(tmp_path):
    root = tmp_path / "ws"
    init_workspace(root)
    (root / "data" / "orders.csv").write_text(
        "order_id,customer_id,timestamp,amount,coupon_code\n"
        "O1,C001,2026-01-12 10:00:00,300,wb-aaa\n"
        "O2,C002,2026-01-13 10:00:00,100,\n", encoding="utf-8")
    store = StateStore(root / "state" / "loyalty.db")
    run_id = store.begin_run(SEND, {}, {})
    store.record_run(run_id, [
        {"firing_key": f"winback:{c}:1", "campaign": "winback", "customer_id": c, "channel": "sms",
         "variant": None, "cost": 20.0, "send_at": SEND, "as_of": SEND,
         "reward": {"kind": "coupon", "code": code, "expires_at": "2026-01-24T23:59:59+08:00"}}
        for c, code in (("C001", "WB-AAA"), ("C002", "WB-BBB"), ("C003", "WB-CCC"))])
    store.close()
    return root


def test_import_csv_reports_bad_rows_and_ignores_duplicates(workspace, tmp_path):
    file = tmp_path / "pos.csv"
    file.write_text("coupon_code,order_id,amount,redeemed_at\n"
                    "WB-BBB,P1,120.5,2026-01-14 09:00\n"      # row 2: good, customer from the code
                    "WB-BBB,P1,120.5,2026-01-14 09:00\n"      # row 3: duplicate in the file
                    "NOPE,P2,10,2026-01-14\n"                 # row 4: unknown code
                    "WB-CCC,,10,2026-01-14\n"                 # row 5: no order id
                    "WB-CCC,P3,ten,2026-01-14\n"              # row 6: amount not a number
                    "WB-CCC,P4,10,yesterday\n"                # row 7: bad time
                    "wb-ccc,P5,,\n", encoding="utf-8")        # row 8: good, amount and time optional
    result = Workspace(workspace).import_redemptions(file)
    assert (result.rows, result.added, result.duplicates) == (7, 2, 1)
    assert [(b["row"], b["message"].split(" ")[0]) for b in result.bad_rows] == [
        (4, "code"), (5, "empty"), (6, "amount"), (7, "redeemed_at")]
    assert "was not issued" in result.bad_rows[0]["message"]
    again = Workspace(workspace).import_redemptions(file)                # importing twice adds nothing
    assert again.added == 0 and again.duplicates == 3
    store = StateStore(workspace / "state" / "loyalty.db")
    stored = store.redemptions().sort_values("order_id")
    store.close()
    assert stored[["code", "customer_id", "order_id"]].values.tolist() == [
        ["WB-BBB", "C002", "P1"], ["WB-CCC", "C003", "P5"]]
    assert stored["redeemed_at"].tolist()[0] == "2026-01-14T09:00:00+08:00"


def test_import_parquet_row_numbers_start_at_one(workspace, tmp_path):
    file = tmp_path / "pos.parquet"
    pd.DataFrame({"code": ["NOPE", "WB-AAA"], "order_id": ["P9", "P10"], "customer_id": ["C9", "C001"]}) \
        .to_parquet(file)
    result = Workspace(workspace).import_redemptions(file)
    assert result.added == 1 and [b["row"] for b in result.bad_rows] == [1]


def test_import_missing_column_is_a_data_error(workspace, tmp_path):
    file = tmp_path / "pos.csv"
    file.write_text("code,amount\nWB-AAA,10\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing required column 'order_id'"):
        Workspace(workspace).import_redemptions(file)
    with pytest.raises(DataError, match="no such file"):
        Workspace(workspace).import_redemptions(tmp_path / "absent.csv")


def test_sync_records_order_redemptions_once(workspace):
    assert sync_order_redemptions(*settings_and_orders(workspace)) == 1          # O1 used wb-aaa (case-insensitive)
    assert sync_order_redemptions(*settings_and_orders(workspace)) == 0
