"""Points accounts against a reference model: one member at a time, one entry at a time.

The reference keeps each credit as a lot with its expiry, lets debits take the oldest lots
first, drops a lot when it expires, and takes only the balance when a debit asks for more.
``engine.data.points.accounts`` computes the same with sorted arrays for every member at once.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data.points import CREDIT, REDEMPTION, REFUND, Entries, accounts, shift_days

TZ = "Asia/Shanghai"
DAY = 86_400_000_000     # microseconds
EPOCH = pd.Timestamp("2026-01-01T10:00:00+08:00")


def reference(entries: list[tuple[int, int, float]], as_of: int, expire_days: int | None) -> dict:
    """One member's account from (time, kind, points) entries, plainly, in time order
    (credits before debits at the same instant)."""
    lots: deque = deque()
    earned = redeemed = expired = 0.0
    for at, kind, points in sorted(entries, key=lambda e: (e[0], e[1])):
        if at > as_of:
            break
        expired += _expire(lots, at)
        if kind == CREDIT:
            end = at + expire_days * DAY if expire_days is not None else None
            lots.append([end, points])
            earned += points
            continue
        taken = 0.0
        while lots and taken < points:
            use = min(lots[0][1], points - taken)
            lots[0][1] -= use
            taken += use
            if lots[0][1] == 0:
                lots.popleft()
        if kind == REDEMPTION:
            redeemed += taken
        else:
            earned -= taken
    expired += _expire(lots, as_of)
    balance = sum(lot[1] for lot in lots)
    soon = as_of + 30 * DAY
    expiring = sum(lot[1] for lot in lots if lot[0] is not None and lot[0] <= soon)
    next_end = min((lot[0] for lot in lots if lot[0] is not None and lot[1] > 0), default=-1)
    return {"balance": balance, "earned": earned, "redeemed": redeemed, "expired": expired,
            "expiring_30d": expiring, "next_expiry": next_end}


def _expire(lots: deque, at: int) -> float:
    """Drop the lots that expired at or before ``at``; their points."""
    gone = 0.0
    while lots and lots[0][0] is not None and lots[0][0] <= at:
        gone += lots.popleft()[1]
    return gone


def _in_order(members: list[list[tuple[int, int, float]]]) -> Entries:
    pos, at, points, kind = [], [], [], []
    for member, rows in enumerate(members):
        for when, what, amount in rows:
            pos.append(member)
            at.append(when)
            points.append(amount)
            kind.append(what)
    return Entries(np.array(pos, np.int64), np.array(at, np.int64), np.array(points, float),
                   np.array(kind, np.int8), np.array([str(i) for i in range(len(pos))], dtype=object))


def _entries(members: list[list[tuple[int, int, float]]]) -> Entries:
    """The members' entries, newest first: ``accounts`` takes them in any order, as the data comes."""
    entries = _in_order(members)
    return entries.take(np.arange(len(entries.pos))[::-1])


def _check(members, as_of_day: int, expire_days: int | None) -> None:
    as_of = EPOCH + pd.Timedelta(days=as_of_day)
    now = int(as_of.value) // 1000
    start = int(EPOCH.value) // 1000
    timed = [[(start + day * DAY, kind, pts) for day, kind, pts in rows] for rows in members]
    seen = [[e for e in rows if e[0] <= now] for rows in timed]
    got = accounts(_entries(seen), len(members), as_of, expire_days, TZ)
    for member, rows in enumerate(timed):
        want = reference(rows, now, expire_days)
        assert got.balance[member] == pytest.approx(want["balance"]), (member, rows)
        assert got.earned[member] == pytest.approx(want["earned"]), (member, rows)
        assert got.redeemed[member] == pytest.approx(want["redeemed"]), (member, rows)
        assert got.expired[member] == pytest.approx(want["expired"]), (member, rows)
        assert got.expiring_30d[member] == pytest.approx(want["expiring_30d"]), (member, rows)
        assert got.next_expiry[member] == want["next_expiry"], (member, rows)
        assert got.balance[member] == pytest.approx(got.earned[member] - got.redeemed[member]
                                                    - got.expired[member])
        assert got.balance[member] >= 0


entry = st.tuples(st.integers(0, 400), st.sampled_from([CREDIT, CREDIT, REDEMPTION, REFUND]),
                  st.integers(1, 500).map(float))


@settings(max_examples=300, deadline=None)
@given(members=st.lists(st.lists(entry, max_size=12), min_size=1, max_size=6),
       as_of_day=st.integers(0, 420), expire_days=st.one_of(st.none(), st.integers(1, 120)))
def test_accounts_agree_with_the_reference_model(members, as_of_day, expire_days):
    _check(members, as_of_day, expire_days)


def test_debits_take_the_oldest_credits_first():
    # 100 on day 0, 50 on day 10, 120 redeemed on day 20: the day-0 credit is used up and
    # 30 of day 10's; on day 40 (30-day expiry) day 10's remaining 30 expire, nothing of day 0's
    members = [[(0, CREDIT, 100.0), (10, CREDIT, 50.0), (20, REDEMPTION, 120.0)]]
    got = accounts(_entries([[(int(EPOCH.value) // 1000 + d * DAY, k, p) for d, k, p in members[0]]]), 1,
                   EPOCH + pd.Timedelta(days=40), 30, TZ)
    assert (got.balance[0], got.redeemed[0], got.expired[0]) == (0, 120, 30)


def test_a_redemption_over_the_balance_takes_only_the_balance_and_is_reported():
    start = int(EPOCH.value) // 1000
    entries = _entries([[(start, CREDIT, 100.0), (start + DAY, REDEMPTION, 150.0)]])
    got = accounts(entries, 1, EPOCH + pd.Timedelta(days=2), None, TZ)
    assert got.balance[0] == 0 and got.redeemed[0] == 100
    assert [(asked, taken) for _, _, asked, taken in got.overdrawn] == [(150.0, 100.0)]


def test_a_credit_is_valid_until_the_same_local_time_expire_after_days_later():
    start = int(EPOCH.value) // 1000
    entries = _entries([[(start, CREDIT, 10.0)]])
    still = accounts(entries, 1, EPOCH + pd.Timedelta(days=30) - pd.Timedelta(seconds=1), 30, TZ)
    gone = accounts(entries, 1, EPOCH + pd.Timedelta(days=30), 30, TZ)
    assert (still.balance[0], gone.balance[0], gone.expired[0]) == (10, 0, 10)
    assert shift_days(np.array([start]), 30, TZ)[0] == start + 30 * DAY


def _shifted_by_pandas(at: np.ndarray, days: int, timezone: str) -> np.ndarray:
    """The same local wall-clock time ``days`` later, instant by instant (the first of two, or
    moved forward over a gap)."""
    wall = [pd.Timestamp(int(t) * 1000, tz="UTC").tz_convert(timezone).tz_localize(None) for t in at]
    later = [(w + pd.Timedelta(days=days)).tz_localize(timezone, ambiguous=True, nonexistent="shift_forward")
             for w in wall]
    return np.array([t.value // 1000 for t in later], dtype=np.int64)


@pytest.mark.parametrize("timezone", ["Europe/London", "America/New_York", "Australia/Lord_Howe", "Pacific/Apia",
                                      "Asia/Shanghai"])
@pytest.mark.parametrize("days", [365, 30, 1])
def test_shift_days_keeps_the_wall_clock_across_changes_of_offset(timezone, days):
    """Instants around every change of offset from 2010 to 2013 (and those landing on one)."""
    hours = pd.date_range("2010-01-01", "2013-01-01", freq="h", tz="UTC")
    offsets = hours.tz_convert(timezone).tz_localize(None).as_unit("us").asi8 - hours.as_unit("us").asi8
    changes = hours.as_unit("us").asi8[np.flatnonzero(np.diff(offsets))]
    near = (changes[:, None] + np.arange(-25 * 3600, 25 * 3600, 1799)[None, :] * 1_000_000).ravel()
    at = np.concatenate([near, near - days * DAY, [int(EPOCH.value) // 1000]])
    assert np.array_equal(shift_days(at, days, timezone), _shifted_by_pandas(at, days, timezone))
