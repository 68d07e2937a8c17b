"""Points accounts: what each member earned, spent, lost to expiry and can still spend.

The account of a member at ``as_of`` is a function of their entries up to ``as_of``:

- credits: each order or event an earn rule (``points: earn:``) counts, at the order's time,
  multiplied by the member's tier at that time (a computed tier: the tier at ``as_of``; a stored
  tier: the one the recorded history gives at that time); and the points campaigns granted (recorded
  by earlier runs, ``PointsHistory.grants``);
- debits: point redemptions (the ``point_redemptions`` table) and refunds (an order with a
  negative amount takes back what that order would have earned).

Debits take the oldest credits first. A credit earned at ``t`` is valid at ``as_of`` while
``t > as_of - expire_after`` (it expires at the same local time ``expire_after`` days later).
A debit of more points than the balance takes only the balance and is reported.

With FIFO and one expiry period, the amount expired by ``t`` is
``max(0, max over credits k that expired by t of (C_k - D(e_k)))`` where ``C_k`` is the
member's cumulative credit through ``k`` and ``D(e_k)`` their cumulative debit before the
expiry ``e_k``: a per-member cumulative maximum, so the whole account is sorted arrays and
grouped cumulative sums. Only the members with a debit over their balance are replayed one
entry at a time (to clip those debits), then computed like the others.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine.config.catalogue import MAX_POINTS, POINTS_FEATURES
from engine.config.model import EarnRule, PointsDef
from engine.data.keys import positions_in

CREDIT, REDEMPTION, REFUND = 0, 1, 2
_US = 1_000          # nanoseconds in a microsecond: every instant here is int64 microseconds UTC
_EPS = 1e-6


@dataclass(frozen=True)
class PointsHistory:
    """What earlier runs recorded that the accounts need.

    ``grants``: customer_id, points, granted_at (UTC) of the points campaigns granted;
    ``tiers``: customer_id, tier, since (UTC) of the recorded changes of stored tiers (None:
    tiers are computed, and multiply at the tier of ``as_of``). A change recorded by the run
    at ``since`` counts for the orders after it: that run's own points were computed before it.
    """

    grants: pd.DataFrame = field(default_factory=lambda: pd.DataFrame({
        "customer_id": pd.Series(dtype=str), "points": pd.Series(dtype=float),
        "granted_at": pd.Series(dtype="datetime64[us, UTC]")}))
    tiers: pd.DataFrame | None = None

    @staticmethod
    def no_tier_changes() -> pd.DataFrame:
        return pd.DataFrame({"customer_id": pd.Series(dtype=object), "tier": pd.Series(dtype=object),
                             "since": pd.Series(dtype="datetime64[us, UTC]")})


@dataclass(frozen=True)
class Sources:
    """Where each entry comes from, as codes into a few names: an earn rule's ten million
    entries share one name (an array of ten million references to it is slow to make)."""

    codes: np.ndarray        # int64 positions in ``names``
    names: np.ndarray        # object: the texts

    @classmethod
    def of(cls, names) -> "Sources":
        """One name per entry (an array or list of texts)."""
        names = np.asarray(names, dtype=object)
        return cls(np.arange(len(names), dtype=np.int64), names)

    @classmethod
    def repeated(cls, name: str, count: int) -> "Sources":
        return cls(np.zeros(count, dtype=np.int64), np.array([name], dtype=object))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, rows):
        if isinstance(rows, (int, np.integer)):
            return self.names[self.codes[rows]]
        return Sources(self.codes[rows], self.names)

    def __iter__(self):
        return iter(self.names[self.codes])

    @classmethod
    def joined(cls, parts: list["Sources"]) -> "Sources":
        offsets = np.cumsum([0] + [len(p.names) for p in parts])
        return cls(np.concatenate([p.codes + offset for p, offset in zip(parts, offsets)]),
                   np.concatenate([p.names for p in parts]))


@dataclass
class Entries:
    """Entries of the members of one frame, in any order (``sorted``: by member, time,
    credits first)."""

    pos: np.ndarray          # member position in the features frame
    at: np.ndarray           # int64 microseconds UTC
    points: np.ndarray       # float64, positive
    kind: np.ndarray         # CREDIT | REDEMPTION | REFUND
    source: Sources          # earn rule, "campaign:ID" or the redemption's source row (as text)

    @classmethod
    def empty(cls) -> "Entries":
        return cls(np.array([], np.int64), np.array([], np.int64), np.array([], float),
                   np.array([], np.int8), Sources.of([]))

    def sorted(self) -> "Entries":
        return self.take(np.lexsort((self.kind, self.at, self.pos)))

    def take(self, rows: np.ndarray) -> "Entries":
        """The entries at ``rows`` (positions or a mask)."""
        return Entries(self.pos[rows], self.at[rows], self.points[rows], self.kind[rows], self.source[rows])

    @classmethod
    def joined(cls, parts: list["Entries"]) -> "Entries":
        parts = [p for p in parts if len(p.pos)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("pos", "at", "points", "kind")),
                   Sources.joined([p.source for p in parts]))


@dataclass
class Accounts:
    """Per member (aligned with the features frame) at ``as_of``; ``overdrawn``: the debits
    that asked for more than the balance (source, customer position, asked, taken)."""

    balance: np.ndarray
    earned: np.ndarray
    redeemed: np.ndarray
    expired: np.ndarray
    earned_365d: np.ndarray
    redeemed_365d: np.ndarray
    expiring_30d: np.ndarray
    next_expiry: np.ndarray            # int64 microseconds UTC; -1 when nothing expires
    overdrawn: list[tuple[str, int, float, float]] = field(default_factory=list)

    @classmethod
    def empty(cls, n: int) -> "Accounts":
        zeros = np.zeros(n)
        return cls(zeros, zeros, zeros, zeros, zeros, zeros, zeros, np.full(n, -1, dtype=np.int64))


# --------------------------------------------------------------------------- time


def _micros(stamps) -> np.ndarray:
    """Instants (a tz-aware Series or DatetimeIndex) as int64 microseconds UTC."""
    index = pd.DatetimeIndex(stamps)
    if index.tz is None:
        raise TypeError("instants need a timezone")
    return index.as_unit("us").asi8.astype(np.int64)      # held as UTC already


def _instant(stamp: pd.Timestamp) -> int:
    return int(stamp.value) // _US


_DAY = 86_400_000_000        # microseconds
_PROBES = np.array([0, _DAY // 4, _DAY // 2, 3 * _DAY // 4, _DAY - 1])
_MOST_DAYS = 200_000         # a wider span of days is shifted by pandas alone


def shift_days(at: np.ndarray, days: int, timezone: str) -> np.ndarray:
    """The same local wall-clock time ``days`` calendar days later (DST-aware, as windows are).

    The UTC offset is looked up per day, not converted per instant: a day whose offset holds
    from the day before to the day after has one answer (``later wall time - offset``); the
    few instants on days around a change of offset are shifted by pandas."""
    if not len(at):
        return at
    first, last = int(at.min()) // _DAY, int(at.max()) // _DAY
    low, high = min(first, first + days) - 2, max(last, last + days) + 2
    if high - low > _MOST_DAYS:
        return _shift_days(at, days, timezone)
    offset, steady = _day_offsets(np.arange(low, high + 1, dtype=np.int64), timezone)
    if steady.all() and (offset == offset[0]).all():        # one offset all along: no wall time is special
        return at + days * _DAY
    day = at // _DAY
    wall = at + offset[day - low]
    later = wall + days * _DAY
    later_day = later // _DAY - low
    # a wall time has exactly one instant when the offset is the same all through the UTC days
    # around it (offsets are under a day)
    settled = np.zeros(len(offset), dtype=bool)
    settled[1:-1] = steady[:-2] & steady[1:-1] & steady[2:] & (offset[:-2] == offset[1:-1]) \
        & (offset[1:-1] == offset[2:])
    shifted = later - offset[later_day]
    exact = steady[day - low] & settled[later_day]
    if not exact.all():
        shifted[~exact] = _shift_days(at[~exact], days, timezone)
    return shifted


def _day_offsets(days: np.ndarray, timezone: str) -> tuple[np.ndarray, np.ndarray]:
    """The UTC offset (microseconds) of each UTC day, and whether it holds all day."""
    probes = (days[:, None] * _DAY + _PROBES).ravel()
    local = pd.DatetimeIndex(probes.view("datetime64[us]")).tz_localize("UTC").tz_convert(timezone) \
        .tz_localize(None).as_unit("us").asi8
    offsets = (local - probes).reshape(len(days), len(_PROBES))
    return offsets[:, 0].copy(), (offsets == offsets[:, :1]).all(axis=1)


def _shift_days(at: np.ndarray, days: int, timezone: str) -> np.ndarray:
    """``shift_days`` by pandas, instant by instant (an ambiguous wall time is the first instant,
    a skipped one moves forward)."""
    wall = pd.DatetimeIndex(at.view("datetime64[us]")).tz_localize("UTC").tz_convert(timezone).tz_localize(None)
    later = (wall + pd.Timedelta(days=days)).tz_localize(timezone, ambiguous=np.ones(len(at), dtype=bool),
                                                          nonexistent="shift_forward")
    return _micros(later)


def _shift(stamp: pd.Timestamp, days: int) -> pd.Timestamp:
    wall = stamp.tz_localize(None) + pd.Timedelta(days=days)
    return wall.tz_localize(stamp.tz, ambiguous=True, nonexistent="shift_forward")


# --------------------------------------------------------------------------- entries


def member_entries(points: PointsDef | None, tables, features: pd.DataFrame, as_of: pd.Timestamp,
                   timezone: str, history: PointsHistory | None) -> Entries:
    """Every entry up to ``as_of`` of the members in ``features`` (whose row order the
    tables' ``cust_code`` follows), unsorted; without ``tables``, only what ``history`` granted."""
    parts: list[Entries] = []
    now = _instant(as_of)
    if points is not None and tables is not None:
        start = None
        if points.start is not None:
            start = _instant(pd.Timestamp(points.start).tz_localize(timezone))
        tier_at = _TierAt(features, history.tiers if history is not None else None)
        for rule in points.earn.values():
            table = tables.orders if rule.source == "orders" else tables.events
            parts.append(_earned(rule, table, features, as_of, now, start, tier_at))
    if history is not None and len(history.grants):
        parts.append(_granted(history.grants, features, now))
    redemptions = getattr(tables, "point_redemptions", None)
    if redemptions is not None and len(redemptions):
        at = _micros(redemptions["timestamp"])
        seen = at <= now
        parts.append(Entries(redemptions["cust_code"].to_numpy(np.int64)[seen], at[seen],
                             redemptions["points"].to_numpy(float)[seen],
                             np.full(int(seen.sum()), REDEMPTION, np.int8),
                             Sources.of(redemptions["source_row"].astype(str).to_numpy(object)[seen])))
    return Entries.joined(parts)


def _earned(rule: EarnRule, table: pd.DataFrame, features: pd.DataFrame, as_of: pd.Timestamp, now: int,
            start: int | None, tier_at: "_TierAt") -> Entries:
    """The credits (and, for orders, refunds) one earn rule gives."""
    rows = _rule_rows(rule, table, features, as_of, now, start, tier_at)
    if rows is None:
        return Entries.empty()
    pos, at, points, kind = rows
    return Entries(pos, at, points, kind, Sources.repeated(rule.name, len(pos)))


def earned_rows(points: PointsDef, rule: EarnRule, tables, features: pd.DataFrame, as_of: pd.Timestamp,
                since: pd.Timestamp, timezone: str, history: PointsHistory | None) -> pd.DataFrame:
    """The credits (not refunds) ``rule`` gave for orders or events in ``(since, as_of]``:
    pos, at, points, and the order's or event's columns (for the message announcing them)."""
    start = _instant(pd.Timestamp(points.start).tz_localize(timezone)) if points.start is not None else None
    table = tables.orders if rule.source == "orders" else tables.events
    if len(table):
        # only the rows since the previous run, linked to ``features`` by id: the rows a trigger
        # sees may be a subset of the customers the tables were loaded with
        at = _micros(table["timestamp"])
        table = table[(at > _instant(since)) & (at <= _instant(as_of))]
        codes = positions_in(table["customer_id"].astype(str), features["customer_id"].astype(str))
        table = table[codes >= 0].assign(cust_code=codes[codes >= 0])
    tier_at = _TierAt(features, history.tiers if history is not None else None)
    rows = _rule_rows(rule, table, features, as_of, _instant(as_of), start, tier_at, keep_columns=True)
    if rows is None:
        return pd.DataFrame({"pos": pd.Series(dtype=np.int64), "at": pd.Series(dtype=np.int64),
                             "points": pd.Series(dtype=float)})
    rows = rows[(rows["kind"] == CREDIT) & (rows["at"] > _instant(since))]
    return rows.drop(columns=["kind"]).reset_index(drop=True)


def _rule_rows(rule: EarnRule, table: pd.DataFrame, features: pd.DataFrame, as_of: pd.Timestamp, now: int,
               start: int | None, tier_at: "_TierAt", keep_columns: bool = False):
    """pos, at, points, kind (CREDIT or REFUND) of the rows ``rule`` gives points for (None:
    none), as arrays; with ``keep_columns``, a frame of them and the table's own columns
    (amounts as written)."""
    if not len(table):
        return None
    at = _micros(table["timestamp"])
    keep = at <= now
    if start is not None:
        keep &= at >= start
    if rule.event_type is not None:
        keep &= (table["type"] == rule.event_type).to_numpy(dtype=bool, na_value=False)
    if not keep.any():
        return None
    everything = keep.all()
    written = None
    if keep_columns:
        written = table.reset_index(drop=True) if everything else table[keep].reset_index(drop=True)

    def column(name: str) -> pd.Series:
        """A column of the kept rows (only what the rule reads: copying whole order tables is slow)."""
        if written is not None:
            return written[name]
        return table[name].reset_index(drop=True) if everything else table[name][keep].reset_index(drop=True)

    at = at if everything else at[keep]
    codes = table["cust_code"].to_numpy(np.int64)
    pos = codes if everything else codes[keep]
    refund = np.zeros(len(pos), dtype=bool)
    prefix = "order." if rule.source == "orders" else "event."
    used = [name for name in _names(rule) if name.startswith(prefix) and name[len(prefix):] in table]
    columns = {name: column(name[len(prefix):]) for name in used}
    if rule.source == "orders":
        amount = table["amount"].to_numpy(dtype=float)
        amount = amount if everything else amount[keep]
        refund = amount < 0
        if refund.any() and "order.amount" in columns:     # a refund takes back what the order would have earned
            columns["order.amount"] = pd.Series(np.abs(amount))
    scope = _scope(rule, columns, features, pos)
    values = pd.to_numeric(rule.amount.evaluate(scope, as_of), errors="coerce")
    base = np.nan_to_num(pd.Series(values).astype("Float64").to_numpy(dtype=float, na_value=np.nan),
                         nan=0.0, posinf=MAX_POINTS, neginf=0.0)
    base = np.floor(base.clip(min=0, max=MAX_POINTS))
    if rule.where is not None:
        base[~rule.where.mask(scope, as_of)] = 0
    if rule.multiplier:
        base = np.floor(np.minimum(base * tier_at.multiplier(pos, at, rule.multiplier), MAX_POINTS))
    given = base > 0
    kind = np.where(refund, REFUND, CREDIT).astype(np.int8)
    if not given.all():
        pos, at, base, kind = pos[given], at[given], base[given], kind[given]
    if not keep_columns:
        return pos, at, base, kind
    found = pd.DataFrame({"pos": pos, "at": at, "points": base, "kind": kind})
    own = written[given].drop(columns=["cust_code"]).reset_index(drop=True)
    return pd.concat([found, own], axis=1)


def _scope(rule: EarnRule, columns: dict[str, pd.Series], features: pd.DataFrame, pos: np.ndarray) -> pd.DataFrame:
    """``order.*``/``event.*`` of each row (``columns``) beside the member's features the rule reads."""
    prefix = "order." if rule.source == "orders" else "event."
    member = [name for name in _names(rule) if not name.startswith(prefix) and name in features]
    scope = features[member].iloc[pos].reset_index(drop=True) if member else pd.DataFrame(index=range(len(pos)))
    for name, column in columns.items():
        scope[name] = column
    return scope


def _names(rule: EarnRule) -> set[str]:
    """The names an earn rule's amount and condition read."""
    return set(rule.amount.names) | (set(rule.where.names) if rule.where is not None else set())


def _granted(grants: pd.DataFrame, features: pd.DataFrame, now: int) -> Entries:
    pos = positions_in(grants["customer_id"].astype(str), features["customer_id"].astype(str))
    at = _micros(grants["granted_at"])
    keep = (pos >= 0) & (at <= now) & (grants["points"].to_numpy(float) > 0)
    source = ("campaign:" + grants["campaign"].astype(str)).to_numpy(object) if "campaign" in grants \
        else np.full(len(grants), "campaign", dtype=object)
    return Entries(pos[keep].astype(np.int64), at[keep], grants["points"].to_numpy(float)[keep],
                   np.full(int(keep.sum()), CREDIT, np.int8), Sources.of(source[keep]))


def _factors(tiers, factors) -> np.ndarray:
    """Each tier's factor in ``factors`` (a tier name, or None), else 1."""
    factors = dict(factors)
    table = pd.Series(list(factors.values()) + [None], dtype=object).fillna(1.0).to_numpy(float)
    return table[positions_in(tiers, list(factors))]          # -1 (no factor) takes the last: 1


class _TierAt:
    """A member's tier at an instant. Computed tiers (no recorded changes): the tier at
    ``as_of``. Stored tiers: the last change recorded strictly before the instant (a run's
    change counts after it), no tier before the first one."""

    def __init__(self, features: pd.DataFrame, tiers: pd.DataFrame | None):
        self.current = features["tier"] if "tier" in features else np.full(len(features), None, dtype=object)
        self.changes = None
        if tiers is not None:
            pos = positions_in(tiers["customer_id"].astype(str), features["customer_id"].astype(str))
            keep = pos >= 0
            pos, since = pos[keep], _micros(tiers["since"])[keep]
            order = np.lexsort((since, pos))        # by member, then time (stable: the later row wins a tie)
            self.changes = (pos[order], since[order], tiers["tier"].astype(object).to_numpy()[keep][order])
            count = np.bincount(pos, minlength=len(features))
            self.first, self.count = np.r_[0, np.cumsum(count)[:-1]], count

    def multiplier(self, pos: np.ndarray, at: np.ndarray, factors) -> np.ndarray:
        """The factor of each (member, instant): the tier's in ``factors``, else 1."""
        if self.changes is None:
            return _factors(self.current, factors)[pos]
        _, since, tier = self.changes
        found = np.ones(len(pos))
        if not len(since) or not len(pos):
            return found
        change_factor = _factors(tier, factors)
        # a member has few changes: the k-th change of every member at once, the last one before
        # wins; per member, the instant and factor of its k-th change (none: never before)
        for k in range(int(self.count.max())):
            has = np.flatnonzero(self.count > k)
            at_k = np.full(len(self.count), np.iinfo(np.int64).max, dtype=np.int64)
            at_k[has] = since[self.first[has] + k]
            factor_k = np.ones(len(self.count))
            factor_k[has] = change_factor[self.first[has] + k]
            before = at_k[pos] < at
            found[before] = factor_k[pos[before]]
        return found


# --------------------------------------------------------------------------- accounts


def member_accounts(points: PointsDef | None, tables, features: pd.DataFrame, as_of: pd.Timestamp,
                    timezone: str, history: PointsHistory | None) -> Accounts:
    """The account at ``as_of`` of every member of ``features``."""
    entries = member_entries(points, tables, features, as_of, timezone, history)
    expire = points.expire_days if points is not None else None
    return accounts(entries, len(features), as_of, expire, timezone)


def accounts(entries: Entries, n: int, as_of: pd.Timestamp, expire_days: int | None, timezone: str) -> Accounts:
    """Every member's account at ``as_of`` from their entries (all at or before ``as_of``, in
    any order). Members without a debit need no order: what expired is every credit that ended.
    Only the entries of members with a debit are sorted and go through FIFO."""
    debit = entries.kind != CREDIT
    overdrawn: list[tuple[str, int, float, float]] = []
    plain, mixed = entries, Entries.empty()
    if debit.any():
        has_debit = np.zeros(n, dtype=bool)
        has_debit[entries.pos[debit]] = True
        involved = has_debit[entries.pos]
        plain, mixed = entries.take(~involved), entries.take(involved).sorted()
        bad = _overdrawn_members(mixed, expire_days, timezone)
        if len(bad):
            mixed, overdrawn = _clip_debits(mixed, bad, expire_days, timezone)
    year_ago = _instant(_shift(as_of, -365))
    earned, redeemed, earned_365d, redeemed_365d = (np.zeros(n) for _ in range(4))
    for part in (plain, mixed):
        pos, pts, kind = part.pos, part.points, part.kind
        if part is plain:       # credits only: nothing redeemed
            recent = part.at > year_ago
            earned += np.bincount(pos, pts, minlength=n)
            earned_365d += np.bincount(pos[recent], pts[recent], minlength=n)
            continue
        credit = np.where(kind == CREDIT, pts, 0.0) - np.where(kind == REFUND, pts, 0.0)
        redemption = np.where(kind == REDEMPTION, pts, 0.0)
        recent = part.at > year_ago
        earned += np.bincount(pos, credit, minlength=n)
        redeemed += np.bincount(pos, redemption, minlength=n)
        earned_365d += np.bincount(pos[recent], credit[recent], minlength=n)
        redeemed_365d += np.bincount(pos[recent], redemption[recent], minlength=n)
    expired = np.zeros(n)
    expiring = np.zeros(n)
    next_expiry = np.full(n, -1, dtype=np.int64)
    if expire_days is not None:
        now, month = _instant(as_of), _instant(_shift(as_of, 30))
        if len(plain.pos):
            expired, expiring, next_expiry = _expiry_without_debits(plain, n, expire_days, timezone, now, month)
        if len(mixed.pos):
            more = _expiry(mixed, n, expire_days, timezone, now, month)
            expired, expiring, next_expiry = expired + more[0], expiring + more[1], np.maximum(next_expiry, more[2])
    balance = (earned - redeemed - expired).clip(min=0)
    return Accounts(np.round(balance, 6), np.round(earned, 6), np.round(redeemed, 6), np.round(expired, 6),
                    np.round(earned_365d.clip(min=0), 6), np.round(redeemed_365d, 6), np.round(expiring, 6),
                    next_expiry, overdrawn)


def _expiry_without_debits(credits: Entries, n: int, expire_days: int, timezone: str, now: int,
                           month: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_expiry`` of members whose entries are all credits: what ended by ``now`` expired, what
    ends by ``month`` expires then, and the next expiry is the first end after ``now``."""
    pos, pts = credits.pos, credits.points
    ends = shift_days(credits.at, expire_days, timezone)
    gone = ends <= now
    expired = np.bincount(pos[gone], pts[gone], minlength=n)
    soon = ~gone & (ends <= month)
    expiring = np.bincount(pos[soon], pts[soon], minlength=n)
    never = np.iinfo(np.int64).max
    next_expiry = np.full(n, never, dtype=np.int64)
    np.minimum.at(next_expiry, pos[~gone], ends[~gone])
    next_expiry[next_expiry == never] = -1
    return expired, expiring, next_expiry


def _cumulative(pos: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Running sum within each member (``pos`` sorted)."""
    total = np.cumsum(values)
    if not len(pos):
        return total
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    before = np.r_[0.0, total][starts]           # the running sum before each member's first row
    return total - np.repeat(before, np.diff(np.r_[starts, len(pos)]))


def _grouped_cummax(pos: np.ndarray, values: np.ndarray) -> np.ndarray:
    if not len(values):
        return values
    return pd.Series(values).groupby(pos, sort=False).cummax().to_numpy()


def _before(pos_q: np.ndarray, at_q: np.ndarray, pos_v: np.ndarray, at_v: np.ndarray, values: np.ndarray,
            inclusive: bool, reduce: str = "sum") -> np.ndarray:
    """For each query (member, instant): the sum (or the last running maximum) of the member's
    ``values`` at instants before it (``inclusive``: at or before). ``pos_v, at_v`` sorted."""
    nq, nv = len(pos_q), len(pos_v)
    if not nq:
        return np.zeros(0)
    running = _cumulative(pos_v, values) if reduce == "sum" else values
    # merge queries and values: a value at the same instant counts when inclusive
    tag = np.r_[np.full(nv, 0 if inclusive else 1), np.full(nq, 1 if inclusive else 0)]
    all_pos, all_at = np.r_[pos_v, pos_q], np.r_[at_v, at_q]
    order = np.lexsort((tag, all_at, all_pos))
    is_value = order < nv
    last_value = np.where(is_value, np.arange(len(order)), -1)
    last_value = np.maximum.accumulate(last_value)      # the latest value row at or before each row
    result = np.zeros(nq)
    query_rows = np.flatnonzero(~is_value)
    latest = last_value[query_rows]
    found = latest >= 0
    value_index = order[latest[found]]
    same_member = all_pos[value_index] == pos_q[order[query_rows[found]] - nv]
    out = np.zeros(len(query_rows))
    hits = np.flatnonzero(found)[same_member]
    out[hits] = running[value_index[same_member]]
    result[order[query_rows] - nv] = out
    return result


def _expiry(entries: Entries, n: int, expire_days: int, timezone: str, now: int,
            month: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expired by ``now``, expiring by ``month`` (with no further debits), and the next expiry."""
    credit = entries.kind == CREDIT
    cpos, cat, cpts = entries.pos[credit], entries.at[credit], entries.points[credit]
    dpos, dat, dpts = entries.pos[~credit], entries.at[~credit], entries.points[~credit]
    ends = shift_days(cat, expire_days, timezone)
    total_credit = _cumulative(cpos, cpts)                            # C_k
    debit_before_end = _before(cpos, ends, dpos, dat, dpts, inclusive=False)   # D(< e_k)
    floor = _grouped_cummax(cpos, total_credit - debit_before_end)   # ends are in credit order
    debited = np.bincount(dpos, dpts, minlength=n)
    expired = np.zeros(n)
    due = ends <= now
    np.maximum.at(expired, cpos[due], floor[due])
    # by ``month``: the credits ending by then, with every debit up to now
    soon = (ends > now) & (ends <= month)
    expiring_floor = expired.copy()
    np.maximum.at(expiring_floor, cpos[soon], total_credit[soon] - debited[cpos[soon]])
    expiring = (expiring_floor - expired).clip(min=0)
    # the first credit not yet used up, among those still to expire
    used = debited + expired
    left = (ends > now) & (total_credit > used[cpos] + _EPS)
    next_expiry = np.full(n, -1, dtype=np.int64)
    first = np.flatnonzero(left)
    if len(first):
        members, at_first = np.unique(cpos[first], return_index=True)
        next_expiry[members] = ends[first[at_first]]
    return expired.clip(min=0), expiring, next_expiry


def _overdrawn_members(entries: Entries, expire_days: int | None, timezone: str) -> np.ndarray:
    """Members with a debit larger than their balance just before it."""
    debit = entries.kind != CREDIT
    if not debit.any():
        return np.array([], np.int64)
    credits = _cumulative(entries.pos, np.where(debit, 0.0, entries.points))
    debits = _cumulative(entries.pos, np.where(debit, entries.points, 0.0))
    balance_after = credits - debits
    if expire_days is not None:
        credit = ~debit
        cpos, cat = entries.pos[credit], entries.at[credit]
        ends = shift_days(cat, expire_days, timezone)
        total_credit = _cumulative(cpos, entries.points[credit])
        before_end = _before(cpos, ends, entries.pos[debit], entries.at[debit], entries.points[debit],
                             inclusive=False)
        floor = _grouped_cummax(cpos, total_credit - before_end)
        order = np.lexsort((ends, cpos))
        # expired by each debit: the running maximum of the floors of the credits ended at or before it
        expired = _before(entries.pos[debit], entries.at[debit], cpos[order], ends[order],
                          _grouped_cummax(cpos[order], floor[order]), inclusive=True, reduce="max")
        balance_after[debit] -= expired.clip(min=0)
    return np.unique(entries.pos[debit & (balance_after < -_EPS)])


def _clip_debits(entries: Entries, members: np.ndarray, expire_days: int | None,
                 timezone: str) -> tuple[Entries, list[tuple[str, int, float, float]]]:
    """Replay the given members one entry at a time (oldest credits first, expired lots
    dropped) and take only the balance where a debit asks for more."""
    points = entries.points.copy()
    ends = shift_days(entries.at, expire_days, timezone) if expire_days is not None else None
    overdrawn = []
    rows_of = pd.Series(np.arange(len(entries.pos))).groupby(entries.pos).indices
    for member in members:
        lots: deque = deque()          # [end, points] of the credits not used up, oldest first
        for row in rows_of[int(member)]:
            at = entries.at[row]
            while lots and ends is not None and lots[0][0] <= at:
                lots.popleft()
            if entries.kind[row] == CREDIT:
                lots.append([ends[row] if ends is not None else np.iinfo(np.int64).max, points[row]])
                continue
            wanted, taken = points[row], 0.0
            while lots and taken < wanted - _EPS:
                use = min(lots[0][1], wanted - taken)
                lots[0][1] -= use
                taken += use
                if lots[0][1] <= _EPS:
                    lots.popleft()
            if taken < wanted - _EPS:
                overdrawn.append((str(entries.source[row]), int(member), float(wanted), float(taken)))
                points[row] = taken
    keep = points > _EPS
    clipped = Entries(entries.pos[keep], entries.at[keep], points[keep], entries.kind[keep], entries.source[keep])
    return clipped, overdrawn


def points_columns(account: Accounts, timezone: str) -> dict[str, object]:
    """The points features of ``POINTS_FEATURES`` as nullable columns."""
    expiry = account.next_expiry
    none = expiry < 0
    dates = pd.DatetimeIndex(np.where(none, 0, expiry).view("datetime64[us]")).tz_localize("UTC") \
        .tz_convert(timezone).tz_localize(None).normalize()
    next_expiry = pd.Series(dates.as_unit("ns")).where(~none)
    columns = {
        "points_balance": pd.array(account.balance, dtype="Float64"),
        "points_earned_365d": pd.array(account.earned_365d, dtype="Float64"),
        "points_redeemed_365d": pd.array(account.redeemed_365d, dtype="Float64"),
        "points_expiring_30d": pd.array(account.expiring_30d, dtype="Float64"),
        "points_next_expiry": next_expiry.to_numpy(),
    }
    assert tuple(columns) == POINTS_FEATURES
    return columns
