"""Stored tiers: a member's tier as state, moved by qualifying, reviews, trials and campaigns.

With ``qualify:`` tiers (``Program.stored_tiers``) a member's tier is not decided again at each
run: it is what earlier runs recorded, moved at this run by these rules, in this order:

1. a trial (a campaign's ``tier: {to, for}``) that ends goes back to the tier held before it,
   or to the highest tier whose ``qualify:`` holds when that is higher;
2. ``qualify:`` of a higher tier moves the member up at once ("qualified"); a member with no
   stored tier enters the highest tier whose ``qualify:`` holds, else the base tier ("joined");
3. at the review date (``tier_review.every`` after reaching the tier, then every ``every``) a
   member keeps the tier when its ``retain:`` (or ``qualify:``) holds ("retained"); otherwise
   they keep it for ``grace`` days ("grace"), and step down ("stepped down") when retain still
   fails at the end of the grace: one tier, or to the highest tier whose qualify holds.

Dates are local calendar days in the programme's timezone. Everything is column-at-a-time over
the members; only campaign moves (a few offers of a run) go one at a time.

Frames of member states (``TierState.members``, and the moves, which add ``from_tier`` and
``reason``) have the ``STATE_COLUMNS``: customer_id, tier (None: no tier), since (UTC instant),
review_at, grace_until, trial_until (local dates, naive midnight; NaT: none), trial_from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa

from engine.config.model import Program, TierDef
from engine.data.keys import positions_in

STATE_COLUMNS = ["customer_id", "tier", "since", "review_at", "grace_until", "trial_until", "trial_from"]
MOVE_COLUMNS = STATE_COLUMNS + ["from_tier", "reason"]
DATES = ("review_at", "grace_until", "trial_until")
_NAT = np.datetime64("NaT", "D")


def empty_states(columns: list[str] = STATE_COLUMNS) -> pd.DataFrame:
    """A frame of member states (or moves) without rows, typed."""
    types = {"since": "datetime64[us, UTC]", **{name: "datetime64[s]" for name in DATES}}
    return pd.DataFrame({name: pd.Series(dtype=types.get(name, object)) for name in columns})


@dataclass(frozen=True)
class TierState:
    """What earlier runs recorded of the members' tiers: one row per member (``STATE_COLUMNS``)."""

    members: pd.DataFrame

    @classmethod
    def empty(cls) -> TierState:
        return cls(empty_states())

    def apply(self, moves: pd.DataFrame) -> TierState:
        """The state once ``moves`` (rows of new states) are recorded."""
        if not len(moves):
            return self
        moved = moves[STATE_COLUMNS].drop_duplicates("customer_id", keep="last")
        kept = self.members[~self.members["customer_id"].isin(moved["customer_id"])]
        frames = [frame for frame in (kept, moved) if len(frame)]
        return TierState(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True))

    def split(self, numbers: np.ndarray, count: int) -> list[TierState]:
        """One state per partition, ``numbers`` giving each member's partition."""
        return [TierState(self.members[numbers == number].reset_index(drop=True)) for number in range(count)]


@dataclass(frozen=True)
class TierRules:
    """What moving stored tiers needs of the programme: the tiers (highest first), which of
    them are reviewed (not the base tier), the review period, grace and step-down rule."""

    order: tuple[str, ...]
    reviewed: tuple[bool, ...]
    every_days: int
    grace_days: int
    step_down: str
    timezone: str

    @classmethod
    def of(cls, program: Program, timezone: str) -> TierRules:
        review = program.tier_review
        return cls(tuple(program.tiers), tuple(t.qualify is not None for t in program.tiers.values()),
                   review.every_days, review.grace_days, review.step_down, timezone)

    def rank(self, names) -> np.ndarray:
        """Each tier name's place (0: highest); ``len(order)`` for none or an unknown name."""
        codes = positions_in(names if isinstance(names, (pd.Series, np.ndarray)) else np.asarray(names, dtype=object),
                             pa.array(self.order, pa.string()))
        return np.where(codes < 0, len(self.order), codes).astype(np.int64)

    def name(self, ranks: np.ndarray) -> np.ndarray:
        names = np.array([*self.order, None], dtype=object)
        return names[np.asarray(ranks, dtype=np.int64)]

    def is_reviewed(self, ranks: np.ndarray) -> np.ndarray:
        return np.array([*self.reviewed, False], dtype=bool)[np.asarray(ranks, dtype=np.int64)]

    def today(self, as_of: pd.Timestamp) -> np.datetime64:
        return np.datetime64(as_of.tz_convert(self.timezone).date(), "D")


@dataclass(frozen=True)
class TierRun:
    """What a run records of the stored tiers: its instant, the rules, and the moves it decided
    (qualifying, reviews, trials); its tier rewards are added where its offers are recorded."""

    as_of: pd.Timestamp
    rules: TierRules
    moves: pd.DataFrame


@dataclass
class TierDecision:
    """The members' tiers after this run's moves (aligned with the features frame), the date
    they reached them, and the moves: one row per member whose state changed (``MOVE_COLUMNS``)."""

    tier: pd.Series
    since: np.ndarray
    moves: pd.DataFrame
    rows: np.ndarray | None = None          # the moved members' rows in the features frame, ascending


# --------------------------------------------------------------------------- decided once

_KEPT = "_loyalty_tier_moves"      # an attribute of the frame itself: copies and slices do not carry it


@dataclass(frozen=True)
class _Kept:
    """The moves decided for the members of one features frame, and what they were decided from."""

    program: Program
    as_of: pd.Timestamp
    timezone: str
    state: TierState | None
    moves: pd.DataFrame
    rows: np.ndarray


def keep_moves(frame: pd.DataFrame, decision: TierDecision, program: Program, as_of: pd.Timestamp,
               timezone: str, state: TierState | None) -> None:
    """Keep with ``frame`` (the features the decision was taken on, or a frame of the same rows)
    the moves decided for its members, so that evaluation does not decide them again."""
    rows = decision.rows if decision.rows is not None else np.arange(len(decision.moves))
    object.__setattr__(frame, _KEPT, _Kept(program, as_of, timezone, state, decision.moves, rows))


def kept_moves(frame: pd.DataFrame, program: Program, as_of: pd.Timestamp, timezone: str,
               state: TierState | None) -> pd.DataFrame | None:
    """The moves ``keep_moves`` kept with ``frame`` when decided from the same programme,
    instant and stored state (None otherwise: decide them)."""
    kept = frame.__dict__.get(_KEPT)
    if kept is None or kept.program is not program or kept.state is not state or kept.timezone != timezone \
            or kept.as_of != as_of:
        return None
    return kept.moves.copy(deep=False)


def keep_slice(frame: pd.DataFrame, part: pd.DataFrame, start: int, stop: int) -> None:
    """``part`` (rows ``start:stop`` of ``frame``) keeps the moves of its own members."""
    kept = frame.__dict__.get(_KEPT)
    if kept is None:
        return
    first, last = np.searchsorted(kept.rows, [start, stop])
    moves = kept.moves.iloc[first:last].reset_index(drop=True)
    object.__setattr__(part, _KEPT, replace(kept, moves=moves, rows=kept.rows[first:last] - start))


# --------------------------------------------------------------------------- reviews and qualifying


def _masks(tiers: Mapping[str, TierDef], frame: pd.DataFrame, as_of) -> tuple[np.ndarray, np.ndarray]:
    """Per tier, who qualifies (the base tier: its ``where:``) and who keeps it at a review."""
    n = len(frame)
    qualify = np.zeros((len(tiers) + 1, n), dtype=bool)
    keeps = np.zeros((len(tiers) + 1, n), dtype=bool)
    for i, tier in enumerate(tiers.values()):
        condition = tier.qualify if tier.qualify is not None else tier.where
        qualify[i] = np.asarray(condition.mask(frame, as_of), dtype=bool)
        keeps[i] = qualify[i] if tier.keeps is None or tier.keeps is condition else \
            qualify[i] | np.asarray(tier.keeps.mask(frame, as_of), dtype=bool)
    return qualify, keeps


def _dates(values) -> np.ndarray:
    return pd.Series(values).to_numpy(dtype="datetime64[s]").astype("datetime64[D]")


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnat(a) & np.isnat(b))


class _Names:
    """Names as integer codes into ``names``, ``none`` the code of None. For tiers
    (``_Names.of``): a tier of the rules is its place (0: highest), ``len(order)`` is none, and
    the codes after it are names the rules do not have (read from the state)."""

    def __init__(self, names, none: int):
        self.names: list = list(names)
        self.none = none

    @classmethod
    def of(cls, rules: TierRules) -> _Names:
        return cls([*rules.order, None], len(rules.order))

    def codes(self, values) -> np.ndarray:
        """The code of each name (None or NaN: none)."""
        found, uniques = pd.factorize(np.asarray(values, dtype=object))
        known = {name: code for code, name in enumerate(self.names) if name is not None}
        for name in uniques:
            if name not in known:
                known[name] = len(self.names)
                self.names.append(name)
        table = np.array([known[name] for name in uniques] + [self.none], dtype=np.int64)
        return table[found]                      # -1 (null) takes the last entry: none

    def texts(self, codes: np.ndarray):
        """The names of ``codes`` as pandas makes a column of them from Python objects: text
        (Arrow) when any is a name, else objects (None); without building a million objects."""
        names = self.names
        if not len(codes) or not all(isinstance(name, str) for name in names if name is not None):
            return np.asarray(names, dtype=object)[codes]
        used = np.bincount(codes, minlength=len(names)) > 0
        if not any(used[code] for code, name in enumerate(names) if name is not None):
            return np.full(len(codes), None, dtype=object)
        return pd.array(pa.array(names, pa.large_string()).take(pa.array(codes)), dtype="str")


# why a member's state changed this run (0: it did not)
REASONS = (None, "trial ended", "qualified", "joined", "retained", "grace", "stepped down")
_TRIAL_ENDED, _QUALIFIED, _JOINED, _RETAINED, _GRACE, _STEPPED_DOWN = range(1, len(REASONS))


def _texts(values: pd.Series):
    """Texts as a column of them made from Python objects would hold them (objects when empty)."""
    return values.astype(str).array if len(values) else np.array([], dtype=object)


@dataclass
class _Members:
    """The members of a features frame as this run moves them, one array per state field;
    ``rank`` is the tier's place (``len(order)``: none), tier names are ``_Names`` codes, dates
    are ``datetime64[D]``."""

    has: np.ndarray              # a stored state of a tier the rules know (or of none)
    stored: np.ndarray           # the stored tier (none without one)
    rank: np.ndarray
    since: np.ndarray            # datetime64[us], UTC
    review: np.ndarray
    grace_until: np.ndarray
    trial_until: np.ndarray
    trial_from: np.ndarray
    reason: np.ndarray           # why the state changed this run (``REASONS``; 0: it did not)

    @classmethod
    def of(cls, names: _Names, frame: pd.DataFrame, state: TierState | None) -> _Members:
        n, none = len(frame), names.none
        members = (state.members if state is not None else empty_states()).reset_index(drop=True)
        pos = positions_in(members["customer_id"].astype(str), frame["customer_id"].astype(str))
        found = pos >= 0
        pos = pos[found]
        members = members[found].reset_index(drop=True) if not found.all() else members

        def aligned(column: str, dates: bool = False) -> np.ndarray:
            if dates:
                out = np.full(n, _NAT, dtype="datetime64[D]")
                out[pos] = _dates(members[column])
            else:
                out = np.full(n, none, dtype=np.int64)
                out[pos] = names.codes(members[column])
            return out

        stored = aligned("tier")
        has = np.zeros(n, dtype=bool)
        has[pos] = True
        has &= stored <= none                  # a tier the rules no longer have: enter again
        since = np.full(n, np.datetime64("NaT", "us"), dtype="datetime64[us]")
        since[pos] = members["since"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
        return cls(has, stored, np.where(has, stored, none), since, aligned("review_at", True),
                   aligned("grace_until", True), aligned("trial_until", True), aligned("trial_from"),
                   np.zeros(n, dtype=np.int8))

    def copy(self) -> _Members:
        return _Members(*(getattr(self, name).copy() for name in self.__dataclass_fields__))

    def move(self, rows: np.ndarray, target: np.ndarray, why, rules: TierRules, today: np.datetime64) -> None:
        """Members ``rows`` reach ``target`` (up, or down at a review): a new review date."""
        self.rank[rows] = target[rows]
        self.review[rows] = np.where(rules.is_reviewed(target[rows]),
                                     today + np.timedelta64(rules.every_days, "D"), _NAT)
        self.grace_until[rows] = _NAT
        self.reason[rows] = why[rows] if isinstance(why, np.ndarray) else why


def _end_trials(m: _Members, rules: TierRules, best: np.ndarray, today: np.datetime64) -> None:
    """Trials that end: back to the tier held before, or higher when its qualify holds."""
    none = len(rules.order)
    ending = m.has & ~np.isnat(m.trial_until) & (m.trial_until <= today)
    before = np.minimum(m.trial_from, none)
    back = np.minimum(before, best)
    m.rank[ending] = back[ending]
    m.reason[ending] = _TRIAL_ENDED
    m.move(ending & (back < before), back, _QUALIFIED, rules, today)
    m.trial_until[ending], m.trial_from[ending] = _NAT, none


def _qualify(m: _Members, rules: TierRules, best: np.ndarray, today: np.datetime64) -> None:
    """Up to the highest tier whose qualify holds (ending a trial of a lower one); a member
    without a stored tier enters it, or the base tier."""
    none = len(rules.order)
    up = ((best < m.rank) | ~m.has) & (best < none)
    base = ~rules.is_reviewed(best)
    m.move(up, best, np.where(base, _JOINED, _QUALIFIED).astype(np.int8), rules, today)
    m.trial_until[up], m.trial_from[up] = _NAT, none


def _review(m: _Members, rules: TierRules, best: np.ndarray, keeps: np.ndarray, today: np.datetime64,
            moved: np.ndarray) -> None:
    """Reviews that are due (not during a trial): retained, into the grace, or stepped down at
    its end. ``moved``: members whose tier this run already changed (their reason stays)."""
    none, n = len(rules.order), len(m.rank)
    every, grace = np.timedelta64(rules.every_days, "D"), np.timedelta64(rules.grace_days, "D")
    due = m.has & (m.rank < none) & rules.is_reviewed(m.rank) & ~np.isnat(m.review) & (m.review <= today) \
        & np.isnat(m.trial_until)
    kept = keeps[m.rank, np.arange(n)] if n else np.zeros(0, dtype=bool)
    retained = due & kept
    if retained.any():        # the next review is `every` after the review date (after today)
        periods = (today - m.review[retained]).astype(np.int64) // rules.every_days + 1
        m.review[retained] = m.review[retained] + periods * every
        m.grace_until[retained] = _NAT
    failing = due & ~kept
    starts = failing & np.isnat(m.grace_until)
    m.grace_until[starts] = m.review[starts] + grace
    m.reason[retained & ~moved] = _RETAINED
    m.reason[starts & (m.grace_until > today) & ~moved] = _GRACE
    target = np.minimum(m.rank + 1, none) if rules.step_down == "one" else np.maximum(best, m.rank + 1)
    m.move(failing & (m.grace_until <= today), np.minimum(target, none), _STEPPED_DOWN, rules, today)


def _local_days(since: np.ndarray, timezone: str) -> np.ndarray:
    """UTC instants (datetime64[us], NaT: none) as their local date at midnight (datetime64[ns]),
    converted once per distinct instant: the members' tiers were reached at a few runs' instants."""
    codes, uniques = pd.factorize(since)
    local = pd.DatetimeIndex(uniques).tz_localize("UTC").tz_convert(timezone).tz_localize(None).normalize()
    return np.append(local.as_unit("ns").to_numpy(), np.datetime64("NaT", "ns"))[codes]


def decide_tiers(program: Program, frame: pd.DataFrame, as_of: pd.Timestamp, timezone: str,
                 state: TierState | None) -> TierDecision:
    """This run's moves of stored tiers for the members of ``frame`` (the features computed so
    far: every feature a ``qualify:`` or ``retain:`` reads), from what ``state`` recorded."""
    rules = TierRules.of(program, timezone)
    none, today = len(rules.order), rules.today(as_of)
    qualify, keeps = _masks(program.tiers, frame, as_of)
    best = np.where(qualify[:none].any(axis=0), qualify[:none].argmax(axis=0), none)
    names = _Names.of(rules)
    old = _Members.of(names, frame, state)
    m = old.copy()
    _end_trials(m, rules, best, today)
    _qualify(m, rules, best, today)
    _review(m, rules, best, keeps, today, moved=m.rank != old.rank)
    new_tier = (m.rank != old.rank) | (~old.has & (m.rank < none))
    changed = new_tier | (old.has & (~_same(m.review, old.review) | ~_same(m.grace_until, old.grace_until)
                                     | ~_same(m.trial_until, old.trial_until)))
    m.since[new_tier] = np.datetime64(as_of.tz_convert("UTC").tz_localize(None), "us")
    m.since[m.rank == none] = np.datetime64("NaT", "us")
    rows = np.flatnonzero(changed)
    moves = pd.DataFrame({
        "customer_id": _texts(frame["customer_id"].take(rows)),
        "tier": names.texts(m.rank[rows]),
        "since": pd.DatetimeIndex(m.since[rows]).tz_localize("UTC"),
        **{name: values[rows].astype("datetime64[s]") for name, values in
           zip(DATES, (m.review, m.grace_until, m.trial_until))},
        "trial_from": names.texts(m.trial_from[rows]),
        "from_tier": names.texts(old.stored[rows]),
        "reason": _Names(REASONS, 0).texts(m.reason[rows].astype(np.int64)),
    }, columns=MOVE_COLUMNS)
    tier = pd.array(pa.array([*rules.order, None], pa.large_string()).take(pa.array(m.rank)), dtype="string")
    return TierDecision(pd.Series(tier, index=frame.index), _local_days(m.since, timezone), moves, rows)


# --------------------------------------------------------------------------- campaigns


def campaign_moves(rules: TierRules, as_of: pd.Timestamp, current: pd.DataFrame,
                   rewards: pd.DataFrame) -> pd.DataFrame:
    """The moves of tier rewards recorded at ``as_of`` (``rewards``: customer_id, campaign, to,
    trial_days in order), from the members' ``current`` states after this run's other moves.

    A reward moves a member up to ``to`` (never down): at once and for good, or for
    ``trial_days``, after which the member goes back (``decide_tiers``). During a trial, a
    reward of the trial's tier makes it permanent (or, as a trial, extends it)."""
    today = rules.today(as_of)
    now = as_of.tz_convert("UTC").as_unit("us")
    states = {row["customer_id"]: row for row in current[STATE_COLUMNS].to_dict("records")}
    moves = []
    for reward in rewards.to_dict("records"):
        cid = str(reward["customer_id"])
        state = states.get(cid) or {"customer_id": cid, "tier": None, "since": pd.NaT, "review_at": pd.NaT,
                                    "grace_until": pd.NaT, "trial_until": pd.NaT, "trial_from": None}
        before = dict(state)
        held, to = int(rules.rank([state["tier"]])[0]), int(rules.rank([reward["to"]])[0])
        days = reward.get("trial_days")
        days = None if days is None or pd.isna(days) else int(days)
        in_trial = not pd.isna(state["trial_until"])
        if to > held or (to == held and not in_trial):
            continue                                  # no move down, nothing to do at the same tier
        if to < held:
            state.update(tier=reward["to"], since=now)
            if days is not None and not in_trial:
                state["trial_from"] = before["tier"]
        if days is None:
            review = today + np.timedelta64(rules.every_days, "D") if rules.is_reviewed(np.array([to]))[0] else _NAT
            state.update(review_at=pd.Timestamp(review), grace_until=pd.NaT, trial_until=pd.NaT, trial_from=None)
        else:
            until = pd.Timestamp(today + np.timedelta64(days, "D"))
            if to == held and not pd.isna(state["trial_until"]):
                until = max(until, pd.Timestamp(state["trial_until"]))
            state["trial_until"] = until
        states[cid] = state
        moves.append({**state, "from_tier": before["tier"], "reason": f"campaign {reward['campaign']}"})
    if not moves:
        return empty_states(MOVE_COLUMNS)
    frame = pd.DataFrame(moves, columns=MOVE_COLUMNS)
    frame["since"] = pd.to_datetime(frame["since"], utc=True).dt.as_unit("us")
    for name in DATES:
        frame[name] = pd.to_datetime(frame[name]).astype("datetime64[s]")
    return frame


# --------------------------------------------------------------------------- counting


def move_counts(rules: TierRules, moves: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Members moving ``up`` into, ``down`` into and ``joined`` at each tier (``none``: out
    of every tier); a move within the same tier (retained, grace) is no move."""
    counts: dict[str, dict[str, int]] = {"up": {}, "down": {}, "joined": {}}
    if not len(moves):
        return counts
    before, after = moves["from_tier"], moves["tier"]
    ranks_before, ranks_after = rules.rank(before), rules.rank(after)
    joined = before.isna().to_numpy()
    # each distinct name counted once, with bincount: keys in the order they first come
    codes, uniques = pd.factorize(after)
    keys = [name if isinstance(name, str) else "none" for name in uniques] + ["none"]
    codes = np.where(codes < 0, len(uniques), codes)
    for kind, mask in (("joined", joined & ~after.isna().to_numpy()), ("up", ~joined & (ranks_after < ranks_before)),
                       ("down", ~joined & (ranks_after > ranks_before))):
        picked = codes[mask]
        found = np.bincount(picked, minlength=len(keys))
        present = np.flatnonzero(found)
        for code in sorted(present, key=lambda code: int(np.argmax(picked == code))):
            counts[kind][keys[code]] = counts[kind].get(keys[code], 0) + int(found[code])
    return {kind: dict(sorted(found.items(), key=lambda item: rules.rank([item[0]])[0]))
            for kind, found in counts.items()}


def add_counts(*parts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Move counts added up (of several partitions, or of reviews and campaigns)."""
    total: dict[str, dict[str, int]] = {"up": {}, "down": {}, "joined": {}}
    for part in parts:
        for kind, counts in part.items():
            for name, count in counts.items():
                total[kind][name] = total[kind].get(name, 0) + count
    return total
