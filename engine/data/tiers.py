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
from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.config.model import Program, TierDef

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
        codes = pd.Index(list(self.order), dtype=object).get_indexer(pd.Index(np.asarray(names, dtype=object)))
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


def decide_tiers(program: Program, frame: pd.DataFrame, as_of: pd.Timestamp, timezone: str,
                 state: TierState | None) -> TierDecision:
    """This run's moves of stored tiers for the members of ``frame`` (the features computed so
    far: every feature a ``qualify:`` or ``retain:`` reads), from what ``state`` recorded."""
    rules = TierRules.of(program, timezone)
    n, none = len(frame), len(rules.order)
    today = rules.today(as_of)
    every, grace = np.timedelta64(rules.every_days, "D"), np.timedelta64(rules.grace_days, "D")
    qualify, keeps = _masks(program.tiers, frame, as_of)
    best = np.where(qualify[:none].any(axis=0), qualify[:none].argmax(axis=0), none) if none else np.zeros(n, int)
    members = (state.members if state is not None else empty_states()).reset_index(drop=True)
    pos = pd.Index(frame["customer_id"].astype(str).to_numpy(dtype=object)).get_indexer(
        members["customer_id"].astype(str).to_numpy(dtype=object))
    found = pos >= 0
    members, pos = members[found].reset_index(drop=True), pos[found]

    def aligned(column, fill, kind=object):
        out = np.full(n, fill, dtype=kind)
        out[pos] = members[column].to_numpy(dtype=kind) if kind is object else _dates(members[column])
        return out

    stored_name = aligned("tier", None)
    has = np.zeros(n, dtype=bool)
    has[pos] = True
    old_rank = rules.rank(stored_name)
    has &= (old_rank < none) | pd.isna(stored_name)          # a tier the rules no longer have: enter again
    since = np.full(n, np.datetime64("NaT", "us"), dtype="datetime64[us]")
    since[pos] = members["since"].dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
    old = {"review_at": aligned("review_at", _NAT, "datetime64[D]"),
           "grace_until": aligned("grace_until", _NAT, "datetime64[D]"),
           "trial_until": aligned("trial_until", _NAT, "datetime64[D]")}
    trial_from = aligned("trial_from", None)
    rank = np.where(has, old_rank, none)
    review, grace_until, trial_until = (old[k].copy() for k in DATES)
    reason = np.full(n, None, dtype=object)

    def move_to(rows: np.ndarray, target: np.ndarray, why) -> None:
        """Members ``rows`` reach ``target`` (up, or down at a review): a new review date."""
        rank[rows] = target[rows]
        review[rows] = np.where(rules.is_reviewed(target[rows]), today + every, _NAT)
        grace_until[rows] = _NAT
        reason[rows] = why[rows] if isinstance(why, np.ndarray) else why

    # 1. trials that end: back to the tier held before, or higher when its qualify holds
    ending = has & ~np.isnat(trial_until) & (trial_until <= today)
    back = np.minimum(rules.rank(trial_from), best)
    qualified_back = ending & (back < rules.rank(trial_from))
    rank[ending] = back[ending]
    reason[ending] = "trial ended"
    move_to(qualified_back, back, "qualified")
    trial_until[ending], trial_from[ending] = _NAT, None
    # 2. qualifying for a higher tier (or entering, without a stored tier)
    up = (best < rank) | ~has
    entering = np.where(rules.is_reviewed(np.minimum(best, none - 1)) if none else False, "qualified", "joined")
    move_to(up & (best < none), best, entering)
    trial_until[up & (best < none)], trial_from[up & (best < none)] = _NAT, None
    # 3. reviews that are due (not during a trial)
    due = has & (rank < none) & rules.is_reviewed(rank) & ~np.isnat(review) & (review <= today) & np.isnat(trial_until)
    kept = keeps[rank, np.arange(n)] if n else np.zeros(0, dtype=bool)
    retained = due & kept
    if retained.any():
        late = (today - review[retained]).astype(np.int64) // rules.every_days + 1
        review[retained] = review[retained] + late * every
        grace_until[retained] = _NAT
        reason[retained] = "retained"
    failing = due & ~kept
    starts = failing & np.isnat(grace_until)
    grace_until[starts] = review[starts] + grace
    in_grace = starts & (grace_until > today)
    reason[in_grace] = "grace"
    down = failing & (grace_until <= today)
    target = np.minimum(rank + 1, none) if rules.step_down == "one" else np.maximum(best, rank + 1)
    move_to(down, np.minimum(target, none), "stepped down")

    changed = ~has & (rank < none)
    changed |= has & ((rank != np.where(has, old_rank, none)) | ~_same(review, old["review_at"])
                      | ~_same(grace_until, old["grace_until"]) | ~_same(trial_until, old["trial_until"]))
    new_tier = rank != np.where(has, old_rank, none)
    since[new_tier | (~has & (rank < none))] = np.datetime64(as_of.tz_convert("UTC").tz_localize(None), "us")
    since[rank == none] = np.datetime64("NaT", "us")
    names = rules.name(rank)
    rows = np.flatnonzero(changed)
    moves = pd.DataFrame({
        "customer_id": frame["customer_id"].astype(str).to_numpy(dtype=object)[rows],
        "tier": names[rows],
        "since": pd.DatetimeIndex(since[rows]).tz_localize("UTC"),
        **{name: values[rows].astype("datetime64[s]") for name, values in
           zip(DATES, (review, grace_until, trial_until))},
        "trial_from": trial_from[rows],
        "from_tier": stored_name[rows],
        "reason": reason[rows],
    }, columns=MOVE_COLUMNS)
    local_since = pd.DatetimeIndex(since).tz_localize("UTC").tz_convert(timezone).tz_localize(None).normalize()
    return TierDecision(pd.Series(names, index=frame.index, dtype="string"),
                        local_since.as_unit("ns").to_numpy(), moves)


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
    before = moves["from_tier"].to_numpy(dtype=object)
    after = moves["tier"].to_numpy(dtype=object)
    ranks_before, ranks_after = rules.rank(before), rules.rank(after)
    joined = pd.isna(before)
    for kind, mask in (("joined", joined & ~pd.isna(after)), ("up", ~joined & (ranks_after < ranks_before)),
                       ("down", ~joined & (ranks_after > ranks_before))):
        for name in after[mask]:
            key = name if isinstance(name, str) else "none"
            counts[kind][key] = counts[kind].get(key, 0) + 1
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
