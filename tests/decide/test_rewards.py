"""Rewards: cost estimates, payloads, coupon codes."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import pytest
from test_triggers import customer, make_workspace, run

from engine.config.expressions import compile_expression
from engine.config.model import ContactPolicy, RewardDef, Settings
from engine.decide.rewards import CODE_ALPHABET, describe, estimate_cost, generate_codes, points_for, reward_payload
from engine.messages.rendering import money_in

SETTINGS = Settings(name="T", timezone="Asia/Shanghai", currency="CNY", default_locale="zh-CN",
                    data=MappingProxyType({}), state_path=Path("state.db"), contact_policy=ContactPolicy(),
                    holdout=0.0, channels=MappingProxyType({}))
SCOPE = pd.DataFrame({
    "customer_id": ["A", "B", "C"],
    "avg_order_value": pd.array([250.0, 50.0, None], dtype="Float64"),
    "monetary_365d": pd.array([5230.0, 99.0, 0.0], dtype="Float64"),
    "event.amount": pd.array([12.7, None, -3.0], dtype="Float64"),
})
NAMES = {"avg_order_value": "number", "monetary_365d": "number", "event.amount": "number"}


def reward(kind, amount=None, **params):
    expression = compile_expression(amount, NAMES) if amount is not None else None
    return RewardDef(kind, MappingProxyType(params), expression)


@pytest.mark.parametrize("definition, costs", [
    (reward("coupon", amount_off=30, min_spend=200), [30, 30, 30]),
    # percent of the larger of min_spend and the average order (min_spend without orders)
    (reward("coupon", percent_off=20, min_spend=100), [50, 20, 20]),
    (reward("coupon", percent_off=10), [25, 5, 0]),
    (reward("coupon", percent_off=10, cost=3), [3, 3, 3]),
    (reward("points", "floor(monetary_365d / 100)"), [0.52, 0, 0]),
    (reward("points", 500), [5, 5, 5]),
    (reward("points", "event.amount * 2"), [0.25, 0, 0]),          # floor, never negative, null -> 0
    (reward("free_shipping"), [10, 10, 10]),
    (reward("free_shipping", cost=6.5), [6.5, 6.5, 6.5]),
    (reward("gift", sku="MUG-1", cost=25), [25, 25, 25]),
    (reward("gift", sku="MUG-1"), [0, 0, 0]),
    (reward("tier", to="gold", cost=40), [40, 40, 40]),
    (reward("message"), [0, 0, 0]),
])
def test_cost_estimates(definition, costs):
    assert estimate_cost(definition, SCOPE, SETTINGS, None).tolist() == pytest.approx(costs)


def test_cost_settings_point_value_shipping_and_message_cost():
    settings = replace(SETTINGS, point_value=0.1, shipping_cost=8.0, message_cost=0.05)
    assert estimate_cost(reward("points", 500), SCOPE, settings, None).tolist() == [50.05] * 3
    assert estimate_cost(reward("free_shipping"), SCOPE, settings, None).tolist() == [8.05] * 3
    assert estimate_cost(reward("message"), SCOPE, settings, None).tolist() == [0.05] * 3
    assert estimate_cost(reward("gift", sku="X", cost=2), SCOPE, settings, None).tolist() == [2.05] * 3


def test_points_for():
    assert points_for(reward("points", "floor(monetary_365d / 100)"), SCOPE, None).tolist() == [52, 0, 0]
    assert points_for(reward("points", "event.amount * 2"), SCOPE, None).tolist() == [25, 0, 0]
    assert points_for(reward("coupon", percent_off=10), SCOPE, None).tolist() == [0, 0, 0]


SEND_AT = pd.Timestamp("2026-12-31T21:30", tz="Asia/Shanghai")


def test_coupon_payloads():
    payload = reward_payload("coupon", {"percent_off": 20, "min_spend": 100, "valid_days": 14}, 0, SEND_AT,
                             "ABC234", "zh-CN", 20.004)
    assert payload == {"kind": "coupon", "percent_off": 20, "min_spend": 100, "valid_days": 14, "cost": 20.0,
                       "expires_at": "2027-01-14", "code": "ABC234", "description": "8折优惠券（满100可用）"}
    payload = reward_payload("coupon", {"amount_off": 30, "valid_days": 1}, 0, SEND_AT, "X", "en-US", 30)
    assert payload["description"] == "30 off coupon"
    yuan = money_in("CNY", "zh-CN")
    assert describe("coupon", {"amount_off": 30, "min_spend": 200}, "zh-CN", money=yuan) == "立减¥30券（满¥200可用）"
    assert describe("coupon", {"amount_off": 10}, "en-US", money=money_in("USD", "en-US")) == "$10 off coupon"
    assert describe("coupon", {"amount_off": 12.5, "min_spend": 100}, "en-US",
                    money=money_in("CNY", "en-US")) == "CN¥12.50 off coupon (min. spend CN¥100)"
    assert payload["expires_at"] == "2027-01-01"
    assert describe("coupon", {"percent_off": 15}, "en-US") == "15% off coupon"
    assert describe("coupon", {"percent_off": 15}, "zh-CN") == "8.5折优惠券"


def test_other_payloads():
    points = reward_payload("points", {"amount": "floor(monetary_365d / 100)"}, 52.0, SEND_AT, None, "en-US", 0.52)
    assert points == {"kind": "points", "cost": 0.52, "points": 52, "description": "52 points"}
    shipping = reward_payload("free_shipping", {"valid_days": 7}, 0, SEND_AT, None, "zh-CN", 10)
    assert shipping == {"kind": "free_shipping", "valid_days": 7, "cost": 10.0, "expires_at": "2027-01-07",
                        "description": "免运费"}
    gift = reward_payload("gift", {"sku": "MUG-1", "name": "Mug"}, 0, SEND_AT, None, "en-US", 25)
    assert gift == {"kind": "gift", "sku": "MUG-1", "name": "Mug", "cost": 25.0, "description": "gift Mug"}
    assert describe("gift", {"sku": "MUG-1"}, "en-US") == "gift MUG-1"
    tier = reward_payload("tier", {"to": "gold"}, 0, SEND_AT, None, "zh-CN", 0)
    assert tier == {"kind": "tier", "to": "gold", "cost": 0.0, "description": "升级为gold"}
    message = reward_payload("message", {}, 0, SEND_AT, None, "en-US", 0)
    assert message == {"kind": "message", "cost": 0.0, "description": "message"}


def test_codes_are_unique_and_from_the_safe_alphabet():
    assert not set("0O1IL") & set(CODE_ALPHABET)
    assert set(CODE_ALPHABET) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    codes = generate_codes(5000, "VIP-", 8)
    assert len(set(codes)) == 5000
    pattern = re.compile(f"^VIP-[{CODE_ALPHABET}]{{8}}$")
    assert all(pattern.match(code) for code in codes)
    taken = set(generate_codes(200, "", 8))
    assert not taken & set(generate_codes(200, "", 8, taken=taken))
    assert generate_codes(0, "", 8) == []


def test_shares_of_one_runs_codes_never_collide():
    """The dask engine's partitions each make their share of a run's codes: the shares are
    disjoint by construction (the last 4 characters as a number, modulo the share count)."""
    def tail(code: str) -> int:
        value = 0
        for symbol in code[-4:]:
            value = value * len(CODE_ALPHABET) + CODE_ALPHABET.index(symbol)
        return value

    shares = [generate_codes(3000, "VIP-", 8, share=(index, 7)) for index in range(7)]
    pooled = [code for share in shares for code in share]
    assert len(set(pooled)) == len(pooled) == 21000
    pattern = re.compile(f"^VIP-[{CODE_ALPHABET}]{{8}}$")
    assert all(pattern.match(code) for code in pooled)
    for index, share in enumerate(shares):
        assert {tail(code) % 7 for code in share} == {index}
    # one share is the whole space: the last characters vary as much as the others
    assert len({code[-1] for code in generate_codes(2000, "", 8)}) == len(CODE_ALPHABET)
    with pytest.raises(ValueError, match="at least 6 random characters"):
        generate_codes(10, "", 5, share=(0, 4))
    with pytest.raises(ValueError, match="do not fit"):
        generate_codes(1000, "", 6, share=(1, 31 ** 4 // 2))
    with pytest.raises(ValueError, match="cannot be split"):
        generate_codes(1, "", 8, share=(4, 4))


def test_costs_and_points_in_evaluation_with_variants(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {coupon: {percent_off: 20, min_spend: 100, valid_days: 14}}
          channel: sms
          template: t
          variants:
            - {name: A, weight: 1}
            - {name: B, weight: 1, reward: {points: {amount: floor(lifetime_spend / 10)}}}
        """, "".join(customer(f"C{i:04d}") for i in range(40)),
        orders="".join(f"O{i},C{i:04d},2026-05-01 10:00:00,{100 * i}\n" for i in range(40)))
    ev = run(ws, "2026-06-01T10:00")
    offers = ev.offers.set_index("customer_id")
    assert set(offers["variant"]) == {"A", "B"}
    for cid, row in offers.iterrows():
        spend = 100 * int(cid[1:])
        if row["variant"] == "A":
            assert row["reward_kind"] == "coupon" and row["points"] == 0
            assert row["cost"] == pytest.approx(max(100, spend) * 0.2)
        else:
            assert row["reward_kind"] == "points" and row["points"] == spend // 10
            assert row["cost"] == pytest.approx(np.floor(spend / 10) * 0.01)


def test_a_bare_points_amount_is_shorthand_for_points_amount(tmp_path):
    """`points: 500` and `points: floor(lifetime_spend / 10)` mean `points: {amount: …}` (issue 19)."""
    ws = make_workspace(tmp_path / "ws", """\
        flat:
          reward: {points: 500}
          channel: sms
          template: t
          variants:
            - {name: A, weight: 1}
            - {name: B, weight: 1, reward: {points: floor(lifetime_spend / 10)}}
        """, "".join(customer(f"C{i:04d}") for i in range(20)),
        orders="".join(f"O{i},C{i:04d},2026-05-01 10:00:00,{100 * i}\n" for i in range(20)))
    offers = run(ws, "2026-06-01T10:00").offers.set_index("customer_id")
    assert set(offers["variant"]) == {"A", "B"}
    for cid, row in offers.iterrows():
        assert row["reward_kind"] == "points"
        assert row["points"] == (500 if row["variant"] == "A" else 10 * int(cid[1:]))
