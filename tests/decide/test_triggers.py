"""Triggers on hand-built workspaces: who fires in a run, with which key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.app.scaffold import init_workspace
from engine.app.validation import load_workspace
from engine.decide.evaluation import evaluate
from engine.decide.triggers import RunContext, local_dates
from engine.execution.pipeline import empty_contacts, parse_as_of, prepare

TZ = "Asia/Shanghai"
CUSTOMER_HEADER = "customer_id,name,email,phone,birthday,signup_date,locale,timezone,email_opt_in,sms_opt_in\n"


def make_workspace(root: Path, campaigns: str, customers: str, orders: str = "", events: str = "",
                   policy: str = "{}", extra: str = "", segments: str = "{}"):
    """A scaffolded workspace with the given campaigns (YAML under ``campaigns:``) and data rows."""
    init_workspace(root)
    (root / "loyalty.yaml").write_text(textwrap.dedent(f"""\
        program: {{name: Test, timezone: {TZ}, currency: CNY, locale: en-US}}
        data:
          customers: {{path: data/customers.csv}}
          orders:    {{path: data/orders.csv}}
          events:    {{path: data/events.csv, fields: {{score: number}}}}
        contact_policy: {policy}
        channels:
          sms:   {{send: file, path: outbox/sms.jsonl}}
          email: {{send: file, path: outbox/email.jsonl}}
        """) + extra, encoding="utf-8")
    (root / "rules" / "programme.yaml").write_text(
        f"segments: {segments}\ncampaigns:\n" + textwrap.indent(textwrap.dedent(campaigns), "  "),
        encoding="utf-8")
    (root / "templates" / "t.sms.j2").write_text("Hi {{ customer.name }}\n", encoding="utf-8")
    (root / "templates" / "t.email.j2").write_text(
        "{% block subject %}Hi{% endblock %}{% block text %}Hi {{ customer.name }}{% endblock %}\n",
        encoding="utf-8")
    (root / "data" / "customers.csv").write_text(CUSTOMER_HEADER + textwrap.dedent(customers), encoding="utf-8")
    (root / "data" / "orders.csv").write_text("order_id,customer_id,timestamp,amount\n" + textwrap.dedent(orders),
                                               encoding="utf-8")
    (root / "data" / "events.csv").write_text("event_id,customer_id,timestamp,type,score\n" + textwrap.dedent(events),
                                               encoding="utf-8")
    return load_workspace(root)


def customer(cid, birthday="", signup="", tz=TZ, sms="true", email="true", phone=None):
    phone = f"1380000{cid[-4:]}" if phone is None else phone
    return f"{cid},N{cid},{cid.lower()}@example.com,{phone},{birthday},{signup},en-US,{tz},{email},{sms}\n"


def run(ws, as_of: str, previous: str | None = None, edge_state=None, recorded=None, contacts=None):
    at = parse_as_of(as_of, TZ)
    prepared = prepare(ws, at)
    ctx = RunContext(at, parse_as_of(previous, TZ) if previous else None,
                     contacts if contacts is not None else empty_contacts(), edge_state or {},
                     recorded=recorded or (lambda keys: {}))
    return evaluate(ws, prepared.tables, prepared.features, ctx)


def recorded_before(known) -> callable:
    """A ``RunContext.recorded`` for keys recorded by an earlier run (``known`` None: every key)."""
    return lambda keys: {k: "2000-01-01T00:00:00+00:00" for k in keys if known is None or k in known}


def fired(ev, campaign="c") -> dict[str, str]:
    """customer id -> firing key of the campaign's offers."""
    offers = ev.campaign_offers(campaign)
    return dict(zip(offers["customer_id"], offers["firing_key"]))


def sms_campaign(when: str | None, extra: str = "") -> str:
    when_line = f"when: {when}" if when else "priority: 0"
    return f"""\
        c:
          {when_line}
          reward: {{message: {{}}}}
          channel: sms
          template: t
        {extra}"""


# ------------------------------------------------------------------ none / always


def test_no_trigger_fires_every_segment_member_with_run_period_key(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          segment: buyers
          reward: {message: {}}
          channel: sms
          template: t
        """, customer("C0001") + customer("C0002") + customer("C0003"),
        orders="O1,C0001,2026-05-01 10:00:00,50\nO2,C0003,2026-05-02 10:00:00,80\n",
        segments="{buyers: {where: orders_total >= 1}}")
    ev = run(ws, "2026-06-01T10:00")
    assert fired(ev) == {"C0001": "c:C0001:2026-06-01", "C0003": "c:C0003:2026-06-01"}
    # a later run (another day) is another period: fires again with a new key
    assert fired(run(ws, "2026-06-02T10:00", previous="2026-06-01T10:00")) == {
        "C0001": "c:C0001:2026-06-02", "C0003": "c:C0003:2026-06-02"}
    # the run period is the programme's calendar day: 23:30 UTC is already the next day in Shanghai
    assert set(fired(run(ws, "2026-06-01T23:30:00+00:00")).values()) == {
        "c:C0001:2026-06-02", "c:C0003:2026-06-02"}


def test_recorded_keys_do_not_fire_again(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign(None), customer("C0001") + customer("C0002"))
    ev = run(ws, "2026-06-01T10:00", recorded=recorded_before({"c:C0001:2026-06-01"}))
    assert fired(ev) == {"C0002": "c:C0002:2026-06-01"}
    assert ev.funnels["c"]["trigger"] == 1
    assert not ev.offers["recorded"].any()
    # a plain set of keys (older callers) means recorded by earlier runs
    ev = run(ws, "2026-06-01T10:00", recorded=lambda keys: {"c:C0001:2026-06-01"} & set(keys))
    assert fired(ev) == {"C0002": "c:C0002:2026-06-01"}
    # recorded by a run at this same as_of: decided again (a rerun), and marked as recorded
    same = parse_as_of("2026-06-01T10:00", TZ).tz_convert("UTC").isoformat(timespec="seconds")
    ev = run(ws, "2026-06-01T10:00", recorded=lambda keys: {k: same for k in keys if k.startswith("c:C0001")})
    assert fired(ev) == {"C0001": "c:C0001:2026-06-01", "C0002": "c:C0002:2026-06-01"}
    assert dict(zip(ev.offers["customer_id"], ev.offers["recorded"])) == {"C0001": True, "C0002": False}


# ------------------------------------------------------------------ birthday


def test_birthday_days_before(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign("{birthday: {days_before: 3}}"),
                        customer("C0001", birthday="1990-06-04")     # 3 days after 06-01: fires
                        + customer("C0002", birthday="1990-06-01")   # today: too late
                        + customer("C0003", birthday="1990-06-05")   # 4 days ahead: not yet
                        + customer("C0004", birthday="")             # unknown birthday
                        + customer("C0005", birthday="2026-06-04"))  # born on that day: no birthday yet
    assert fired(run(ws, "2026-06-01T10:00")) == {"C0001": "c:C0001:2026"}


def test_birthday_on_the_day_and_across_new_year(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign("{birthday: {days_before: 2}}"),
                        customer("C0001", birthday="1990-01-01") + customer("C0002", birthday="1990-12-30"))
    # 2 days before 1 Jan 2027 is 30 Dec 2026: the key is the birthday's year
    assert fired(run(ws, "2026-12-30T10:00")) == {"C0001": "c:C0001:2027"}
    ws0 = make_workspace(tmp_path / "ws0", sms_campaign("{birthday: {}}"),
                         customer("C0001", birthday="1990-01-01") + customer("C0002", birthday="1990-12-30"))
    assert fired(run(ws0, "2026-12-30T10:00")) == {"C0002": "c:C0002:2026"}


def test_birthday_29_february(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign("{birthday: {days_before: 0}}"),
                        customer("C0001", birthday="1992-02-29") + customer("C0002", birthday="1990-02-28")
                        + customer("C0003", birthday="1990-03-01"))
    # common year: 29 Feb is celebrated on 28 Feb
    assert fired(run(ws, "2026-02-28T10:00")) == {"C0001": "c:C0001:2026", "C0002": "c:C0002:2026"}
    assert fired(run(ws, "2026-03-01T10:00")) == {"C0003": "c:C0003:2026"}
    # leap year: on the day itself
    assert fired(run(ws, "2028-02-28T10:00")) == {"C0002": "c:C0002:2028"}
    assert fired(run(ws, "2028-02-29T10:00")) == {"C0001": "c:C0001:2028"}
    # a daily catch-up across 28 Feb - 1 Mar of a common year fires C0001 exactly once
    assert fired(run(ws, "2026-03-01T10:00", previous="2026-02-27T10:00")) == {
        "C0001": "c:C0001:2026", "C0002": "c:C0002:2026", "C0003": "c:C0003:2026"}


def test_birthday_in_the_customers_timezone(tmp_path):
    # 2026-06-02 01:00 in Shanghai is still 2026-06-01 (18:00) in London
    ws = make_workspace(tmp_path / "ws", sms_campaign("{birthday: {}}"),
                        customer("C0001", birthday="1990-06-02")
                        + customer("C0002", birthday="1990-06-02", tz="Europe/London")
                        + customer("C0003", birthday="1990-06-01", tz="Europe/London")
                        + customer("C0004", birthday="1990-06-01"))
    ev = run(ws, "2026-06-02T01:00", previous="2026-06-01T01:00")
    assert fired(ev) == {"C0001": "c:C0001:2026", "C0003": "c:C0003:2026"}
    # the London customer's day comes with the next run
    ev = run(ws, "2026-06-03T01:00", previous="2026-06-02T01:00")
    assert fired(ev) == {"C0002": "c:C0002:2026"}


def test_local_dates_per_customer_timezone():
    features = pd.DataFrame({"timezone": ["Asia/Shanghai", "America/Los_Angeles", None, "Not/AZone"]})
    at = pd.Timestamp("2026-06-02T01:00", tz=TZ)
    assert local_dates(features, at, TZ).astype(str).tolist() == [
        "2026-06-02", "2026-06-01", "2026-06-02", "2026-06-02"]


def test_birthday_catch_up_after_missed_runs(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign("{birthday: {days_before: 1}}"),
                        "".join(customer(f"C000{d}", birthday=f"1990-06-0{d}") for d in range(1, 8)))
    # previous run on 06-01, this one on 06-05: fire days 06-02..06-05, i.e. birthdays 06-03..06-06
    ev = run(ws, "2026-06-05T10:00", previous="2026-06-01T10:00")
    assert fired(ev) == {f"C000{d}": f"c:C000{d}:2026" for d in (3, 4, 5, 6)}
    # without a previous run only today counts
    assert fired(run(ws, "2026-06-05T10:00")) == {"C0006": "c:C0006:2026"}


def test_anniversary_of_a_date_column(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign("{anniversary: signup_date}"),
                        customer("C0001", signup="2024-06-01") + customer("C0002", signup="2026-06-01")
                        + customer("C0003", signup="2025-06-02") + customer("C0004", signup="2024-02-29"))
    # signed up today: no anniversary yet
    assert fired(run(ws, "2026-06-01T10:00")) == {"C0001": "c:C0001:2026"}
    assert fired(run(ws, "2027-02-28T10:00")) == {"C0004": "c:C0004:2027"}


# ------------------------------------------------------------------ dates


def test_dates_month_day_and_full_dates(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign('{dates: ["12-25", "2027-01-01"]}'),
                        customer("C0001") + customer("C0002", sms="false"))
    assert fired(run(ws, "2026-12-25T10:00")) == {"C0001": "c:C0001:2026-12-25"}
    assert fired(run(ws, "2026-12-24T10:00")) == {}
    assert fired(run(ws, "2027-12-25T10:00")) == {"C0001": "c:C0001:2027-12-25"}
    assert fired(run(ws, "2027-01-01T10:00")) == {"C0001": "c:C0001:2027-01-01"}
    assert fired(run(ws, "2028-01-01T10:00")) == {}   # a full date fires in its year only


def test_dates_catch_up_fires_once_with_the_latest_date(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign('{dates: ["12-25", "12-24", "01-01"]}'),
                        customer("C0001"))
    # the previous run was days ago: 12-24 and 12-25 both passed; one greeting, for the latest date
    ev = run(ws, "2026-12-26T10:00", previous="2026-12-20T10:00")
    assert fired(ev) == {"C0001": "c:C0001:2026-12-25"}
    assert ev.funnels["c"]["trigger"] == 1
    # a rerun with the latest key recorded does not pick up the earlier date
    ev = run(ws, "2026-12-26T10:00", previous="2026-12-20T10:00", recorded=recorded_before(None))
    assert fired(ev) == {}
    # across the new year
    assert fired(run(ws, "2027-01-02T10:00", previous="2026-12-31T10:00")) == {"C0001": "c:C0001:2027-01-01"}
    # nothing between
    assert fired(run(ws, "2026-12-27T10:00", previous="2026-12-26T10:00")) == {}


# ------------------------------------------------------------------ event


EVENTS = """\
    E1,C0001,2026-06-01 09:00:00,nps_response,4
    E2,C0002,2026-06-01 09:30:00,nps_response,9
    E3,C0003,2026-05-31 09:00:00,nps_response,2
    E4,C0004,2026-06-01 11:00:00,nps_response,1
    E5,C0005,2026-06-01 08:00:00,complaint,
    E6,C0006,2026-05-31 20:00:00,nps_response,3
    """


def test_event_with_where_only_since_previous_run(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign("{event: nps_response, where: event.score <= 6}"),
                        "".join(customer(f"C000{i}") for i in range(1, 7)), events=EVENTS)
    ev = run(ws, "2026-06-01T10:00", previous="2026-05-31T10:00")
    # E2 scores 9, E3 is before the previous run, E4 after as_of, E5 another type
    assert fired(ev) == {"C0001": "c:C0001:E1", "C0006": "c:C0006:E6"}
    offers = ev.campaign_offers("c").set_index("customer_id")
    assert offers.loc["C0001", "event.score"] == 4
    # with a previous run at 21:00 on 05-31, E6 (20:00) was already seen
    assert fired(run(ws, "2026-06-01T10:00", previous="2026-05-31T21:00")) == {"C0001": "c:C0001:E1"}
    # first run ever: the last day
    assert fired(run(ws, "2026-06-01T10:00")) == {"C0001": "c:C0001:E1", "C0006": "c:C0006:E6"}
    # an event exactly at as_of counts; one exactly at the previous run does not
    assert fired(run(ws, "2026-06-01T11:00", previous="2026-06-01T09:00")) == {"C0004": "c:C0004:E4"}


def test_event_several_events_of_one_customer_make_one_offer(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign("{event: complaint}"), customer("C0001") + customer("C0002"),
                        events="E9,C0001,2026-06-01 09:00:00,complaint,\nE1,C0001,2026-06-01 09:30:00,complaint,\n"
                               "E5,C0002,2026-06-01 08:00:00,complaint,\n")
    ev = run(ws, "2026-06-01T10:00", previous="2026-05-31T10:00")
    assert fired(ev) == {"C0001": "c:C0001:E1", "C0002": "c:C0002:E5"}   # the latest event
    assert ev.funnels["c"]["segment"] >= ev.funnels["c"]["trigger"] == 2


def test_event_where_can_use_customer_features(tmp_path):
    ws = make_workspace(tmp_path / "ws", sms_campaign('{event: nps_response, where: "event.score <= 6 and orders_total >= 1"}'),
                        "".join(customer(f"C000{i}") for i in range(1, 7)), events=EVENTS,
                        orders="O1,C0006,2026-05-01 10:00:00,50\n")
    assert fired(run(ws, "2026-06-01T10:00", previous="2026-05-31T10:00")) == {"C0006": "c:C0006:E6"}


# ------------------------------------------------------------------ inactive_for


def test_inactive_for_once_per_spell_keyed_by_last_order(tmp_path):
    orders = """\
        O1,C0001,2026-03-01 10:00:00,50
        O2,C0002,2026-04-01 10:00:00,50
        O3,C0003,2026-04-02 23:30:00,50
        """
    ws = make_workspace(tmp_path / "ws", sms_campaign("{inactive_for: 60d}"),
                        customer("C0001") + customer("C0002") + customer("C0003") + customer("C0004"),
                        orders=orders)
    # 2026-05-31 is 60 days after 2026-04-01; C0004 never ordered
    ev = run(ws, "2026-05-31T10:00")
    assert fired(ev) == {"C0001": "c:C0001:2026-03-01", "C0002": "c:C0002:2026-04-01"}
    recorded = set(ev.offers["firing_key"])
    # the next runs: the same spell has the same key, so it is not acted on again
    ev = run(ws, "2026-06-01T10:00", previous="2026-05-31T10:00", recorded=recorded_before(recorded))
    assert fired(ev) == {"C0003": "c:C0003:2026-04-02"}
    recorded |= set(ev.offers["firing_key"])

    # C0001 orders again on 06-05; 60 days later a new spell fires with the new key
    (tmp_path / "ws" / "data" / "orders.csv").write_text(
        "order_id,customer_id,timestamp,amount\n" + textwrap.dedent(orders) + "O4,C0001,2026-06-05 10:00:00,20\n",
        encoding="utf-8")
    ws = load_workspace(tmp_path / "ws")
    assert fired(run(ws, "2026-06-10T10:00", recorded=recorded_before(recorded))) == {}
    assert fired(run(ws, "2026-08-04T10:00", recorded=recorded_before(recorded))) == {
        "C0001": "c:C0001:2026-06-05"}


# ------------------------------------------------------------------ becomes


def test_becomes_fires_on_false_to_true_only(tmp_path):
    orders = "O1,C0001,2026-05-01 10:00:00,900\nO2,C0002,2026-05-01 10:00:00,1500\n"
    ws = make_workspace(tmp_path / "ws", sms_campaign("{becomes: lifetime_spend >= 1000}"),
                        customer("C0001") + customer("C0002") + customer("C0003"), orders=orders)
    first = run(ws, "2026-06-01T10:00")
    assert fired(first) == {}                       # first evaluation: remember, fire nobody
    assert first.edge_state["c"] == frozenset({"C0002"})
    assert first.funnels["c"]["trigger"] == 0

    (tmp_path / "ws" / "data" / "orders.csv").write_text(
        "order_id,customer_id,timestamp,amount\n" + orders + "O3,C0001,2026-06-01 12:00:00,200\n", encoding="utf-8")
    ws = load_workspace(tmp_path / "ws")
    second = run(ws, "2026-06-02T10:00", previous="2026-06-01T10:00", edge_state=first.edge_state)
    assert fired(second) == {"C0001": f"c:C0001:{parse_as_of('2026-06-02T10:00', TZ).isoformat()}"}
    assert second.edge_state["c"] == frozenset({"C0001", "C0002"})
    # staying true fires nobody
    assert fired(run(ws, "2026-06-03T10:00", edge_state=second.edge_state)) == {}
    # true -> false -> true fires again
    assert fired(run(ws, "2026-06-03T10:00", edge_state={"c": frozenset({"C0002"})})) == {
        "C0001": f"c:C0001:{parse_as_of('2026-06-03T10:00', TZ).isoformat()}"}


def test_trigger_on_an_empty_partition(tmp_path):
    for i, when in enumerate(["{birthday: {}}", "{anniversary: signup_date}", '{dates: ["12-25"]}',
                              "{event: complaint}", "{inactive_for: 30d}", None]):
        ws = make_workspace(tmp_path / f"ws{i}", sms_campaign(when), customer("C0001", birthday="1990-12-25", signup="2020-12-25"),
                            events="E1,C0001,2026-12-25 09:00:00,complaint,\n")
        at = parse_as_of("2026-12-25T10:00", TZ)
        prepared = prepare(ws, at)
        ctx = RunContext(at, None, empty_contacts(), {})
        ev = evaluate(ws, prepared.tables, prepared.features.iloc[0:0], ctx)
        assert len(ev.offers) == 0
        assert ev.funnels["c"]["trigger"] == 0
        assert len(evaluate(ws, prepared.tables, prepared.features, ctx).offers) == (0 if i == 4 else 1)


@pytest.mark.parametrize("when", ["{dates: [06-01]}", "{birthday: {}}", "{inactive_for: 1d}"])
def test_firings_only_for_segment_members(tmp_path, when):
    ws = make_workspace(tmp_path / "ws", f"""\
        c:
          segment: big
          when: {when}
          reward: {{message: {{}}}}
          channel: sms
          template: t
        """, customer("C0001", birthday="1990-06-01") + customer("C0002", birthday="1990-06-01"),
        orders="O1,C0001,2026-05-01 10:00:00,900\nO2,C0002,2026-05-01 10:00:00,10\n",
        segments="{big: {where: lifetime_spend >= 100}}")
    ev = run(ws, "2026-06-01T10:00")
    assert list(fired(ev)) == ["C0001"]
    assert ev.funnels["c"]["segment"] == 1
    assert np.all(ev.offers["customer_id"] == "C0001")
