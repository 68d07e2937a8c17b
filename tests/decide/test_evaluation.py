"""The evaluation funnel: arbitration, budgets, holdouts and their invariants."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_triggers import TZ, customer, fired, make_workspace, run

from engine.config.expressions import compile_expression
from engine.config.model import BudgetDef
from engine.decide.assignment import in_holdout
from engine.decide.evaluation import STAGES, evaluate
from engine.decide.triggers import RunContext
from engine.execution.pipeline import empty_contacts, parse_as_of

AS_OF = parse_as_of("2026-06-10T10:00", TZ)
CAMPAIGNS = ("a", "b", "c", "d", "e")
ZONES = ["Asia/Shanghai", "Europe/London", "America/New_York", None]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("eval") / "ws", """\
        a:
          reward: {coupon: {percent_off: 20, min_spend: 100}}
          channel: sms
          template: t
          priority: 10
        b:
          reward: {points: {amount: floor(lifetime_spend / 100)}}
          channel: email
          template: t
          priority: 10
          holdout: 30%
        c:
          when: {inactive_for: 30d}
          reward: {coupon: {amount_off: 15}}
          channel: sms
          template: t
          priority: 5
          cooldown: 7d
        d:
          where: lifetime_spend >= 500
          reward: {free_shipping: {}}
          channel: email
          template: t
          priority: 20
          holdout: 20%
        e:
          segment: buyers
          reward: {gift: {sku: MUG, cost: 12}}
          channel: sms
          template: t
          priority: 10
        """, customer("C0001"), segments="{buyers: {where: orders_total >= 1}}",
        extra="holdout: 10%\n")


def with_rules(workspace, per_run=1, budgets=None, holdout=None):
    """The workspace with another per-run maximum, budgets or global holdout."""
    policy = replace(workspace.settings.contact_policy, max_offers_per_run=per_run, max_messages=2, per_days=7)
    settings_ = replace(workspace.settings, contact_policy=policy,
                        holdout=workspace.settings.holdout if holdout is None else holdout)
    campaigns = dict(workspace.program.campaigns)
    for cid, budget in (budgets or {}).items():
        campaigns[cid] = replace(campaigns[cid], budget=budget)
    program = replace(workspace.program, campaigns=MappingProxyType(campaigns))
    return replace(workspace, settings=settings_, program=program)


@st.composite
def customers(draw, min_size=1, max_size=30):
    n = draw(st.integers(min_size, max_size))
    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731
    spend = [draw(maybe(st.integers(0, 3000))) for _ in range(n)]
    frame = pd.DataFrame({
        "customer_id": pd.array([f"C{i:04d}" for i in draw(st.permutations(range(1000)))[:n]], dtype="str"),
        "phone": pd.array([draw(st.sampled_from(["13800000000", "", None])) for _ in range(n)], dtype="string"),
        "email": pd.array([draw(st.sampled_from(["x@example.com", None])) for _ in range(n)], dtype="string"),
        "sms_opt_in": [draw(st.booleans()) for _ in range(n)],
        "email_opt_in": [draw(st.booleans()) for _ in range(n)],
        "timezone": pd.array([draw(st.sampled_from(ZONES)) for _ in range(n)], dtype="string"),
        "locale": pd.array(["en-US"] * n, dtype="string"),
        "lifetime_spend": pd.array([float(s) if s is not None else None for s in spend], dtype="Float64"),
        "avg_order_value": pd.array([draw(maybe(st.integers(1, 900))) for _ in range(n)], dtype="Float64"),
        "orders_total": pd.array([0 if s is None else draw(st.integers(1, 9)) for s in spend], dtype="Int64"),
        "days_since_last_order": pd.array([draw(maybe(st.integers(0, 90))) for _ in range(n)], dtype="Int64"),
    })
    history = []
    for _ in range(draw(st.integers(0, 2 * n))):
        who = draw(st.integers(0, n - 1))
        history.append((frame["customer_id"].iloc[who], draw(st.sampled_from(CAMPAIGNS + ("x",))),
                        AS_OF + pd.Timedelta(hours=draw(st.integers(-24 * 10, 24 * 2)))))
    contacts = pd.DataFrame(history, columns=["customer_id", "campaign", "contacted_at"])
    contacts["channel"] = "sms"
    contacts["contacted_at"] = pd.to_datetime(contacts["contacted_at"], utc=True)
    return frame, contacts


def evaluate_on(ws, frame, contacts, trace=False):
    return evaluate(ws, None, frame, RunContext(AS_OF, None, contacts, {}), trace=trace)


def offer_set(ev) -> set:
    return set(zip(ev.offers["customer_id"], ev.offers["campaign"], ev.offers["firing_key"],
                   ev.offers["cost"].round(6), ev.offers["variant"]))


def check_funnels(ev):
    rows = ev.offers["campaign"].value_counts()
    for cid, funnel in ev.funnels.items():
        counts = [funnel[stage] for stage in STAGES]
        assert counts == sorted(counts, reverse=True), (cid, funnel)
        assert funnel["offers"] == rows.get(cid, 0)
        assert funnel["budget"] == funnel["offers"]


FAST = settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(customers(), st.sampled_from([1, 2]))
def test_per_run_maximum_frequency_cap_and_funnels(workspace, data, per_run):
    frame, contacts = data
    ws = with_rules(workspace, per_run=per_run)
    ev = evaluate_on(ws, frame, contacts)
    per_customer = ev.offers["customer_id"].value_counts()
    assert (per_customer <= per_run).all()
    # points (campaign b) need no message: granted without one when consent or the cap stop it
    granted = ev.offers[ev.offers["no_message"] != ""]
    assert set(granted["campaign"]) <= {"b"}
    # never above the cap of 2 messages per 7 days, counting history and scheduled contacts
    recent = contacts[contacts["contacted_at"] > AS_OF - pd.Timedelta(days=7)]["customer_id"].value_counts()
    for cid, count in ev.offers.loc[ev.offers["no_message"] == "", "customer_id"].value_counts().items():
        assert recent.get(cid, 0) + count <= 2
    # cooldown of campaign c: nobody contacted by c in the last 7 days gets c again
    cooled = set(contacts[(contacts["campaign"] == "c")
                          & (contacts["contacted_at"] > AS_OF - pd.Timedelta(days=7))]["customer_id"])
    assert not cooled & set(ev.campaign_offers("c")["customer_id"])
    # consent and address, for every message
    offers = ev.offers[ev.offers["no_message"] == ""].merge(frame, on="customer_id")
    sms = offers[offers["channel"] == "sms"]
    assert sms["sms_opt_in"].all() and (sms["phone"].str.len() > 0).all()
    email = offers[offers["channel"] == "email"]
    assert email["email_opt_in"].all() and email["email"].notna().all()
    assert not ev.offers.duplicated(["customer_id", "campaign"]).any()
    assert ev.offers["firing_key"].is_unique
    check_funnels(ev)
    assert (ev.offers["send_at"] >= AS_OF).all()


budgets = st.builds(
    BudgetDef,
    max_offers=st.one_of(st.none(), st.integers(0, 8)),
    max_cost=st.one_of(st.none(), st.floats(0, 200, allow_nan=False).map(lambda v: round(v, 2))),
    rank_by=st.sampled_from([None, "lifetime_spend", "avg_order_value", "0 - days_since_last_order"]))


@FAST
@given(customers(), st.dictionaries(st.sampled_from(CAMPAIGNS), budgets, min_size=1), st.sampled_from([1, 2]))
def test_budgets_are_never_exceeded(workspace, data, budget_map, per_run):
    frame, contacts = data
    names = {"lifetime_spend": "number", "avg_order_value": "number", "days_since_last_order": "number"}
    budget_map = {cid: replace(b, rank_by=compile_expression(b.rank_by, names) if b.rank_by else None)
                  for cid, b in budget_map.items()}
    ws = with_rules(workspace, per_run=per_run, budgets=budget_map)
    ev = evaluate_on(ws, frame, contacts, trace=True)
    check_funnels(ev)
    for cid, budget in budget_map.items():
        mine = ev.campaign_offers(cid)
        if budget.max_offers is not None:
            assert len(mine) <= budget.max_offers
        if budget.max_cost is not None:
            assert mine["cost"].sum() <= budget.max_cost + 1e-6
        # rank_by: who lost to the budget never ranks above who kept an offer
        if budget.rank_by is not None and ev.stops is not None:
            lost = ev.stops[(ev.stops["campaign"] == cid) & (ev.stops["stage"] == "budget")]["pos"]
            rank = pd.Series(budget.rank_by.evaluate(frame, AS_OF)).astype("Float64")
            kept_rank = rank.iloc[mine["pos"].to_numpy()]
            lost_rank = rank.iloc[lost.to_numpy()]
            if len(kept_rank) and len(lost_rank) and lost_rank.notna().any():
                assert kept_rank.notna().all()
                assert kept_rank.min() >= lost_rank.max()


@FAST
@given(customers(), st.sampled_from([0.0, 0.1, 0.5]), st.sampled_from([1, 2]))
def test_holdouts_never_receive_offers(workspace, data, share, per_run):
    frame, contacts = data
    ws = with_rules(workspace, per_run=per_run, holdout=share)
    ev = evaluate_on(ws, frame, contacts)
    ids = frame["customer_id"].astype(str)
    global_group = set(ids[in_holdout(ids, ws.settings.salt, "global", share)])
    assert not global_group & set(ev.offers["customer_id"])
    for cid, campaign in ws.program.campaigns.items():
        group = set(ids[in_holdout(ids, ws.settings.salt, cid, campaign.holdout)])
        assert not group & set(ev.campaign_offers(cid)["customer_id"])
        recorded = ev.holdouts[ev.holdouts["campaign"] == cid]
        assert not set(recorded["customer_id"]) & set(ev.campaign_offers(cid)["customer_id"])
        assert set(recorded.loc[recorded["group"] == "global", "customer_id"]) <= global_group
        assert set(recorded["customer_id"]) <= global_group | group
    check_funnels(ev)


@FAST
@given(customers(min_size=2), st.data())
def test_same_offers_in_any_order_and_across_partitions(workspace, data, draw):
    frame, contacts = data
    ws = with_rules(workspace, per_run=2)
    whole = evaluate_on(ws, frame, contacts)
    order = draw.draw(st.permutations(range(len(frame))))
    shuffled = evaluate_on(ws, frame.iloc[list(order)].reset_index(drop=True), contacts)
    assert offer_set(shuffled) == offer_set(whole)
    assert whole.funnels == shuffled.funnels
    # without budgets each customer is decided alone: partitions give the same offers
    cut = draw.draw(st.integers(1, len(frame) - 1))
    parts = [evaluate_on(ws, frame.iloc[:cut].reset_index(drop=True), contacts),
             evaluate_on(ws, frame.iloc[cut:].reset_index(drop=True), contacts)]
    assert offer_set(parts[0]) | offer_set(parts[1]) == offer_set(whole)
    assert set(pd.concat([p.holdouts for p in parts])["customer_id"]) == set(whole.holdouts["customer_id"])


@FAST
@given(customers(min_size=2), st.data())
def test_budget_keeps_the_same_customers_in_any_order(workspace, data, draw):
    frame, contacts = data
    ws = with_rules(workspace, per_run=2, budgets={"a": BudgetDef(max_offers=2), "e": BudgetDef(max_cost=30)})
    whole = evaluate_on(ws, frame, contacts)
    order = draw.draw(st.permutations(range(len(frame))))
    assert offer_set(evaluate_on(ws, frame.iloc[list(order)].reset_index(drop=True), contacts)) == offer_set(whole)


# ------------------------------------------------------------------ hand-built cases


TIES = """\
    zeta:
      reward: {message: {}}
      channel: sms
      template: t
      priority: 10
    alpha:
      reward: {message: {}}
      channel: sms
      template: t
      priority: 10
    low:
      reward: {message: {}}
      channel: sms
      template: t
      priority: 1
    top:
      where: orders_total >= 1
      reward: {message: {}}
      channel: sms
      template: t
      priority: 99
    """


def test_arbitration_priority_then_campaign_id(tmp_path):
    ws = make_workspace(tmp_path / "ws", TIES, customer("C0001") + customer("C0002"),
                        orders="O1,C0002,2026-06-01 10:00:00,10\n")
    ev = run(ws, "2026-06-10T10:00")
    assert ev.offers[["customer_id", "campaign"]].values.tolist() == [["C0001", "alpha"], ["C0002", "top"]]
    assert {c: f["arbitration"] for c, f in ev.funnels.items()} == {"zeta": 0, "alpha": 1, "low": 0, "top": 1}
    assert {c: f["holdout"] for c, f in ev.funnels.items()} == {"zeta": 2, "alpha": 2, "low": 2, "top": 1}

    two = make_workspace(tmp_path / "two", TIES, customer("C0001") + customer("C0002"),
                         orders="O1,C0002,2026-06-01 10:00:00,10\n", policy="{max_offers_per_run: 2}")
    ev = run(two, "2026-06-10T10:00")
    assert sorted(map(tuple, ev.offers[["customer_id", "campaign"]].values.tolist())) == [
        ("C0001", "alpha"), ("C0001", "zeta"), ("C0002", "alpha"), ("C0002", "top")]


def test_budget_with_rank_by_keeps_the_highest(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {coupon: {amount_off: 10}}
          channel: sms
          template: t
          budget: {max_offers: 3, rank_by: lifetime_spend}
        d:
          reward: {coupon: {amount_off: 10}}
          channel: email
          template: t
          budget: {max_cost: 25, rank_by: lifetime_spend}
        """, "".join(customer(f"C000{i}") for i in range(1, 7)),
        orders="".join(f"O{i},C000{i},2026-06-01 10:00:00,{amount}\n"
                       for i, amount in [(1, 50), (2, 700), (3, 300), (4, 900), (6, 10)]),
        policy="{max_offers_per_run: 2}")
    ev = run(ws, "2026-06-10T10:00")
    assert sorted(fired(ev, "c")) == ["C0002", "C0003", "C0004"]
    assert sorted(fired(ev, "d")) == ["C0002", "C0004"]
    assert ev.funnels["c"]["arbitration"] == 6 and ev.funnels["c"]["budget"] == 3


def test_trace_names_the_stage_that_stopped_each_customer(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          segment: buyers
          reward: {message: {}}
          channel: sms
          template: t
          cooldown: 7d
          budget: {max_offers: 1, rank_by: lifetime_spend}
        """, customer("C0001") + customer("C0002", sms="false") + customer("C0003") + customer("C0004")
        + customer("C0005") + customer("C0006"),
        orders="".join(f"O{i},C000{i},2026-06-01 10:00:00,{100 * i}\n" for i in range(2, 7)),
        segments="{buyers: {where: orders_total >= 1}}")
    history = pd.DataFrame({"customer_id": ["C0003"], "campaign": ["c"], "channel": ["sms"],
                            "contacted_at": pd.to_datetime(["2026-06-08T00:00Z"], utc=True)})
    at = parse_as_of("2026-06-10T10:00", TZ)
    from engine.execution.pipeline import prepare
    prepared = prepare(ws, at)
    ev = evaluate(ws, prepared.tables, prepared.features, RunContext(at, None, history, {}), trace=True)
    assert fired(ev) == {"C0006": "c:C0006:2026-06-10"}
    stops = {cid: ev.stopped_at(pos).get("c")
             for pos, cid in enumerate(prepared.features["customer_id"])}
    assert stops == {"C0001": None, "C0002": "consent", "C0003": "cooldown", "C0004": "budget",
                     "C0005": "budget", "C0006": None}
    assert ev.funnels["c"] == {"segment": 5, "trigger": 5, "consent": 4, "frequency_cap": 4, "cooldown": 3,
                               "holdout": 3, "arbitration": 3, "budget": 1, "offers": 1}


def test_warning_when_consent_column_is_missing(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {message: {}}
          channel: sms
          template: t
        """, customer("C0001"))
    at = parse_as_of("2026-06-10T10:00", TZ)
    from engine.execution.pipeline import prepare
    prepared = prepare(ws, at)
    ev = evaluate(ws, prepared.tables, prepared.features.drop(columns=["sms_opt_in"]),
                  RunContext(at, None, empty_contacts(), {}))
    assert len(ev.offers) == 0
    assert ev.warnings and "sms_opt_in" in ev.warnings[0]


def test_rank_by_a_date_with_missing_values(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {message: {}}
          channel: sms
          template: t
          budget: {max_offers: 2, rank_by: signup_date}
        """, customer("C0001", signup="2020-01-01") + customer("C0002") + customer("C0003", signup="2024-05-01")
        + customer("C0004", signup="2022-01-01"))
    # latest signups first; unknown last
    assert sorted(fired(run(ws, "2026-06-10T10:00"))) == ["C0003", "C0004"]
    ws3 = with_rules(ws, budgets={"c": replace(ws.program.campaigns["c"].budget, max_offers=4)})
    at = parse_as_of("2026-06-10T10:00", TZ)
    from engine.execution.pipeline import prepare
    prepared = prepare(ws3, at)
    ev = evaluate(ws3, prepared.tables, prepared.features, RunContext(at, None, empty_contacts(), {}))
    assert len(ev.offers) == 4
    ranks = dict(zip(ev.offers["customer_id"], ev.offers["rank"]))
    assert np.isnan(ranks["C0002"]) and ranks["C0003"] > ranks["C0004"] > ranks["C0001"]
