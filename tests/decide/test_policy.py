"""Contact policy: consent and addresses, frequency cap, cooldown, quiet hours."""

from __future__ import annotations

import pandas as pd
import pytest
from test_triggers import TZ, customer, fired, make_workspace, run

from engine.config.model import ChannelDef, ContactPolicy
from engine.decide.policy import cap_remaining, cooling_down, messages_in_window, reachable, send_times
from engine.execution.pipeline import parse_as_of


def contacts(*rows) -> pd.DataFrame:
    """(customer_id, campaign, ISO time) -> a contact-history frame."""
    frame = pd.DataFrame(rows, columns=["customer_id", "campaign", "contacted_at"])
    frame["channel"] = "sms"
    frame["contacted_at"] = pd.to_datetime(frame["contacted_at"], utc=True, format="ISO8601")
    return frame[["customer_id", "campaign", "channel", "contacted_at"]]


SMS = ChannelDef("sms", "file", address_column="phone", consent_column="sms_opt_in")


# ------------------------------------------------------------------ consent


def test_reachable_needs_consent_and_an_address():
    features = pd.DataFrame({
        "customer_id": ["A", "B", "C", "D", "E", "F", "G"],
        "sms_opt_in": ["true", "yes", "是", "false", None, "1", "TRUE "],
        "phone": ["1", "2", "3", "4", "5", "  ", None],
    })
    assert reachable(features, SMS).tolist() == [True, True, True, False, False, False, False]
    features["sms_opt_in"] = pd.array([True, True, None, False, True, True, True], dtype="boolean")
    assert reachable(features, SMS).tolist() == [True, True, False, False, True, False, False]
    assert reachable(features.drop(columns="phone"), SMS).tolist() == [False] * 7
    assert reachable(features.drop(columns="sms_opt_in"), SMS).tolist() == [False] * 7


def test_consent_stage_in_evaluation(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {message: {}}
          channel: sms
          template: t
        e:
          reward: {message: {}}
          channel: email
          template: t
        """, customer("C0001") + customer("C0002", sms="false") + customer("C0003", phone="")
        + customer("C0004", email="false"), policy="{max_offers_per_run: 2}")
    ev = run(ws, "2026-06-01T10:00")
    assert sorted(fired(ev, "c")) == ["C0001", "C0004"]
    assert sorted(fired(ev, "e")) == ["C0001", "C0002", "C0003"]
    assert ev.funnels["c"]["trigger"] == 4 and ev.funnels["c"]["consent"] == 2


# ------------------------------------------------------------------ frequency cap


AS_OF = "2026-06-10T10:00"


def test_messages_in_window_counts_past_and_scheduled_contacts():
    at = parse_as_of(AS_OF, TZ)
    features = pd.DataFrame({"customer_id": ["A", "B", "C", "D"]})
    history = contacts(("A", "x", "2026-06-09T01:00Z"), ("A", "y", "2026-06-04T01:00Z"),
                       ("B", "x", "2026-06-03T02:00Z"),                      # exactly 7 days before: out
                       ("B", "x", "2026-06-03T02:00:01Z"),
                       ("C", "x", "2026-06-11T01:00Z"),                      # scheduled after as_of
                       ("Z", "x", "2026-06-09T01:00Z"))                      # someone else
    assert messages_in_window(features, history, at, 7).tolist() == [2, 1, 1, 0]
    assert messages_in_window(features, history.iloc[0:0], at, 7).tolist() == [0, 0, 0, 0]
    policy = ContactPolicy(max_messages=2, per_days=7, max_offers_per_run=2)
    assert cap_remaining(features, history, at, policy).tolist() == [0, 1, 1, 2]
    assert cap_remaining(features, history, at, ContactPolicy(max_offers_per_run=3)).tolist() == [3, 3, 3, 3]


def test_frequency_cap_from_contact_history(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {message: {}}
          channel: sms
          template: t
          priority: 5
        d:
          reward: {message: {}}
          channel: sms
          template: t
        """, "".join(customer(f"C000{i}") for i in range(1, 6)),
        policy="{max_messages: 2, per: 7d, max_offers_per_run: 2}")
    history = contacts(
        ("C0001", "x", "2026-06-09T01:00Z"), ("C0001", "y", "2026-06-05T01:00Z"),   # 2 this week: capped
        ("C0002", "x", "2026-06-09T01:00Z"),                                        # 1: one more
        ("C0003", "x", "2026-06-09T01:00Z"), ("C0003", "y", "2026-05-20T01:00Z"),   # old one does not count
        ("C0004", "x", "2026-06-08T01:00Z"), ("C0004", "x", "2026-06-11T01:00Z"),   # future scheduled counts
    )
    ev = run(ws, AS_OF, contacts=history)
    per_customer = ev.offers.groupby("customer_id")["campaign"].apply(sorted).to_dict()
    assert per_customer == {"C0002": ["c"], "C0003": ["c"], "C0005": ["c", "d"]}
    assert ev.funnels["c"]["frequency_cap"] == 3 and ev.funnels["d"]["frequency_cap"] == 3
    assert ev.funnels["d"]["arbitration"] == 1


# ------------------------------------------------------------------ cooldown


def test_cooling_down_only_this_campaign_within_days():
    at = parse_as_of(AS_OF, TZ)
    features = pd.DataFrame({"customer_id": ["A", "B", "C", "D"]})
    history = contacts(("A", "c", "2026-05-20T01:00Z"), ("B", "c", "2026-05-01T01:00Z"),
                       ("C", "other", "2026-06-09T01:00Z"), ("D", "c", "2026-06-12T01:00Z"))
    assert cooling_down(features, history, "c", at, 30).tolist() == [True, False, False, True]
    assert cooling_down(features, history, "c", at, None).tolist() == [False] * 4
    assert cooling_down(features, history, "c", at, 5).tolist() == [False, False, False, True]


def test_cooldown_stage_in_evaluation(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {message: {}}
          channel: sms
          template: t
          cooldown: 30d
        """, "".join(customer(f"C000{i}") for i in range(1, 5)))
    history = contacts(("C0001", "c", "2026-05-20T01:00Z"), ("C0002", "c", "2026-05-01T01:00Z"),
                       ("C0003", "other", "2026-06-09T01:00Z"))
    ev = run(ws, AS_OF, contacts=history)
    assert sorted(fired(ev)) == ["C0002", "C0003", "C0004"]
    assert ev.funnels["c"]["frequency_cap"] == 4 and ev.funnels["c"]["cooldown"] == 3


# ------------------------------------------------------------------ quiet hours

QUIET = ContactPolicy(quiet_start="21:00", quiet_end="09:00")


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


@pytest.mark.parametrize("as_of, zone, expected", [
    # Shanghai (UTC+8): 10:00 is outside the window, send now
    ("2026-06-10T10:00+08:00", "Asia/Shanghai", "2026-06-10T10:00+08:00"),
    # 22:30 local: evening part, released at 09:00 the next morning
    ("2026-06-10T22:30+08:00", "Asia/Shanghai", "2026-06-11T09:00+08:00"),
    # 02:00 local: morning part, released at 09:00 the same day
    ("2026-06-10T02:00+08:00", "Asia/Shanghai", "2026-06-10T09:00+08:00"),
    # edges: 21:00 is quiet, 09:00 is not
    ("2026-06-10T21:00+08:00", "Asia/Shanghai", "2026-06-11T09:00+08:00"),
    ("2026-06-10T09:00+08:00", "Asia/Shanghai", "2026-06-10T09:00+08:00"),
    ("2026-06-10T20:59+08:00", "Asia/Shanghai", "2026-06-10T20:59+08:00"),
    # 10:00 in Shanghai is 03:00 in London (BST): quiet there until 09:00 London
    ("2026-06-10T10:00+08:00", "Europe/London", "2026-06-10T09:00+01:00"),
    # 10:00 in Shanghai is 22:00 the day before in New York: until 09:00 New York, next day
    ("2026-06-10T10:00+08:00", "America/New_York", "2026-06-10T09:00-04:00"),
    # New York springs forward on 2026-03-08: 23:00 EST on the 7th -> 09:00 EDT (13:00 UTC, not 14:00)
    ("2026-03-07T23:00-05:00", "America/New_York", "2026-03-08T09:00-04:00"),
    ("2026-03-08T01:30-05:00", "America/New_York", "2026-03-08T09:00-04:00"),
    # ... and falls back on 2026-11-01: 22:00 EDT on 31 Oct -> 09:00 EST (14:00 UTC)
    ("2026-10-31T22:00-04:00", "America/New_York", "2026-11-01T09:00-05:00"),
    # London springs forward on 2026-03-29
    ("2026-03-28T23:30+00:00", "Europe/London", "2026-03-29T09:00+01:00"),
])
def test_quiet_hours_across_midnight_in_customer_timezones(as_of, zone, expected):
    at = pd.Timestamp(as_of).tz_convert(TZ)
    result = send_times(pd.Series([zone]), at, QUIET, TZ)
    assert result.iloc[0] == utc(expected)


def test_quiet_hours_window_ending_in_a_skipped_or_repeated_hour():
    at = pd.Timestamp("2026-03-07T23:00-05:00")
    skipped = ContactPolicy(quiet_start="22:00", quiet_end="02:30")  # 02:30 does not exist on 2026-03-08
    assert send_times(pd.Series(["America/New_York"]), at, skipped, TZ).iloc[0] == utc("2026-03-08T03:00-04:00")
    repeated = ContactPolicy(quiet_start="22:00", quiet_end="01:30")  # 01:30 happens twice on 2026-11-01
    at = pd.Timestamp("2026-10-31T23:00-04:00")
    assert send_times(pd.Series(["America/New_York"]), at, repeated, TZ).iloc[0] == utc("2026-11-01T01:30-04:00")
    # already in the repeated hour (01:10 EST, after the first 01:30): never a send_at in the past
    at = pd.Timestamp("2026-11-01T01:10-05:00")
    assert send_times(pd.Series(["America/New_York"]), at, repeated, TZ).iloc[0] == utc("2026-11-01T01:30-05:00")


def test_quiet_hours_within_a_day_missing_and_invalid_zones():
    lunch = ContactPolicy(quiet_start="12:00", quiet_end="14:00")
    at = pd.Timestamp("2026-06-10T12:30+08:00").tz_convert(TZ)
    zones = pd.Series(["Asia/Shanghai", None, "Bad/Zone", "Europe/London"], index=[5, 6, 7, 8])
    result = send_times(zones, at, lunch, TZ)
    assert list(result.index) == [5, 6, 7, 8]
    assert result.tolist() == [utc("2026-06-10T14:00+08:00")] * 3 + [utc(at.isoformat())]
    assert send_times(zones, at, ContactPolicy(), TZ).tolist() == [utc(at.isoformat())] * 4


def test_send_at_in_evaluation_uses_each_customers_timezone(tmp_path):
    ws = make_workspace(tmp_path / "ws", """\
        c:
          reward: {message: {}}
          channel: sms
          template: t
        """, customer("C0001") + customer("C0002", tz="America/New_York") + customer("C0003", tz="Europe/London"),
        policy='{quiet_hours: "21:00-09:00"}')
    ev = run(ws, "2026-03-08T12:00")    # 23:00 EST on the 7th in New York, 04:00 in London
    send_at = dict(zip(ev.offers["customer_id"], ev.offers["send_at"]))
    assert send_at == {"C0001": utc("2026-03-08T12:00+08:00"), "C0002": utc("2026-03-08T09:00-04:00"),
                       "C0003": utc("2026-03-08T09:00+00:00")}
    assert all(ev.offers["send_at"] >= utc("2026-03-08T12:00+08:00"))
