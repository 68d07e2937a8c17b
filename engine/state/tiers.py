"""Stored tiers: each member's tier now, and every change of it with the run and the reason.

``member_tiers`` holds one row per member: the state the latest recording left, with the
instant (``as_of_utc``) and order (``seq``) of the recording that wrote it, so that a rerun of
an earlier instant never overwrites a later state. ``tier_history`` holds every change of a
member's state (a move of tier, or a review's "retained" and "grace") with the state after it,
unique by (customer_id, as_of_utc, seq): a rerun at the same instant writes nothing twice, and
the state before any instant can be read back. ``seq`` 0 is a run's own moves (qualifying,
reviews, trials); 1, 2, ... its tier rewards, applied on top in the order of its offers.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Iterable

import pandas as pd

from engine.config.tier_rules import trial_days
from engine.data.keys import is_in
from engine.data.tiers import DATES, STATE_COLUMNS, TierRun, TierState, campaign_moves, move_counts
from engine.state.database import Database, instant_bounds, iso, iso_utc

_STATE_SQL = "customer_id, tier, since, review_at, grace_until, trial_until, trial_from"
_HISTORY_COLUMNS = ("customer_id", "from_tier", "to_tier", "reason", "run_id", "as_of", "as_of_utc", "seq",
                    "since", "review_at", "grace_until", "trial_until", "trial_from")


class TierBook(Database):
    """The ``member_tiers`` and ``tier_history`` tables."""

    def tier_state(self, before: str) -> TierState:
        """Every member's stored tier as the runs before ``before`` (UTC ISO) left it."""
        rows = self.db.execute(
            f"SELECT {_STATE_SQL} FROM member_tiers WHERE as_of_utc < ? UNION ALL "
            f"SELECT customer_id, to_tier, since, review_at, grace_until, trial_until, trial_from FROM ("
            f"SELECT h.*, row_number() OVER (PARTITION BY customer_id ORDER BY as_of_utc DESC, seq DESC) AS n "
            f"FROM tier_history h WHERE as_of_utc < ? AND customer_id IN "
            f"(SELECT customer_id FROM member_tiers WHERE as_of_utc >= ?)) WHERE n = 1",
            [before, before, before]).fetchall()
        return TierState(_states(pd.DataFrame(rows, columns=STATE_COLUMNS)))

    def tier_changes(self, before: str | None = None, through: str | None = None) -> pd.DataFrame:
        """customer_id, tier, since (UTC) of every change of tier recorded by runs at instants
        before ``before`` (or at or before ``through``), UTC ISO keys: what points multiply by."""
        bounds, params = instant_bounds("as_of_utc", before, through)
        where = ["from_tier IS NOT to_tier", *bounds]
        frame = self._frame("SELECT customer_id, to_tier, as_of_utc FROM tier_history WHERE "
                            + " AND ".join(where) + " ORDER BY as_of_utc, seq", params,
                            ["customer_id", "tier", "since"])
        frame["customer_id"] = frame["customer_id"].astype(str).astype(object)
        frame["tier"] = frame["tier"].astype(object)
        frame["since"] = pd.to_datetime(frame["since"], utc=True, format="ISO8601").dt.as_unit("us")
        return frame

    def tier_history(self, customer_id: str) -> list[dict]:
        """Every change of a member's tier state, oldest first: as_of, from_tier, to_tier,
        reason, run_id and the review, grace and trial dates after it."""
        columns = ["as_of", "from_tier", "to_tier", "reason", "run_id", "review_at", "grace_until", "trial_until"]
        rows = self.db.execute(f"SELECT {', '.join(columns)} FROM tier_history WHERE customer_id = ? "
                               "ORDER BY as_of_utc, seq", [str(customer_id)]).fetchall()
        return [dict(zip(columns, row)) for row in rows]

    def _record_tiers(self, conn: sqlite3.Connection, run_id: str, run: TierRun,
                      new_rows: list[tuple[dict, dict]]) -> dict[str, dict[str, int]]:
        """Write a run's moves and those of its newly recorded tier rewards; return the moves
        written, counted per tier (``data.tiers.move_counts``). Moves already written by an
        earlier attempt at this instant are not written again."""
        at_utc = iso_utc(run.as_of)
        done: dict[str, int] = {}
        for customer_id, seq in conn.execute("SELECT customer_id, seq FROM tier_history WHERE as_of_utc = ?",
                                             [at_utc]):
            done[customer_id] = max(done.get(customer_id, -1), seq)
        own = run.moves[~is_in(run.moves["customer_id"].astype(str), list(done))] if done else run.moves
        self._write_moves(conn, run_id, run, own, [0] * len(own))
        rewards = [{"customer_id": row["customer_id"], "campaign": row["campaign"], "to": reward["to"],
                    "trial_days": trial_days(reward.get("for"))}
                   for row, reward in new_rows if reward and reward.get("kind") == "tier"]
        written = [own]
        if rewards:
            written.append(self._write_reward_moves(conn, run_id, run, rewards, done))
        return move_counts(run.rules, pd.concat([w for w in written if len(w)] or [own], ignore_index=True))

    def _write_reward_moves(self, conn: sqlite3.Connection, run_id: str, run: TierRun, rewards: list[dict],
                            done: dict[str, int]) -> pd.DataFrame:
        """Write the moves of a run's newly recorded tier rewards, each after the member's
        moves already written at this instant (``done``: customer -> last seq, updated); return them."""
        ids = sorted({reward["customer_id"] for reward in rewards})
        current = conn.execute(f"SELECT {_STATE_SQL} FROM member_tiers WHERE customer_id IN "
                               "(SELECT value FROM json_each(?))", [json.dumps(ids)])
        states = _states(pd.DataFrame(current.fetchall(), columns=STATE_COLUMNS))
        moves = campaign_moves(run.rules, run.as_of, states, pd.DataFrame(rewards))
        seqs = []
        for customer_id in moves["customer_id"]:
            done[customer_id] = max(done.get(customer_id, 0), 0) + 1
            seqs.append(done[customer_id])
        self._write_moves(conn, run_id, run, moves, seqs)
        return moves

    def _record_tier_chunks(self, conn: sqlite3.Connection, run_id: str, run: TierRun,
                            moves: Iterable[pd.DataFrame], rewards: list[dict]) -> dict[str, dict[str, int]]:
        """``_record_tiers`` for a run whose own moves come a chunk at a time (``moves``) and
        whose newly recorded tier rewards are ``rewards`` (customer_id, campaign, to,
        trial_days, in the order of its offers): the same rows written, the same counts."""
        at_utc = iso_utc(run.as_of)
        counts: dict[str, dict[str, int]] = {"up": {}, "down": {}, "joined": {}}
        for chunk in moves:
            if not len(chunk):
                continue
            done = self._tier_seqs(conn, at_utc, chunk["customer_id"].astype(str).tolist())
            own = chunk[~is_in(chunk["customer_id"].astype(str), list(done))] if done else chunk
            self._write_moves(conn, run_id, run, own, [0] * len(own))
            counts = _added_counts(counts, move_counts(run.rules, own))
        if rewards:
            done = self._tier_seqs(conn, at_utc, sorted({reward["customer_id"] for reward in rewards}))
            moved = self._write_reward_moves(conn, run_id, run, rewards, done)
            counts = _added_counts(counts, move_counts(run.rules, moved))
        return {kind: dict(sorted(found.items(), key=lambda item: run.rules.rank([item[0]])[0]))
                for kind, found in counts.items()}

    @staticmethod
    def _tier_seqs(conn: sqlite3.Connection, at_utc: str, customer_ids: list[str]) -> dict[str, int]:
        """customer_id -> the last ``seq`` written for them at the instant ``at_utc``."""
        done: dict[str, int] = {}
        for start in range(0, len(customer_ids), 50_000):
            done.update(conn.execute(
                "SELECT customer_id, max(seq) FROM tier_history WHERE as_of_utc = ? AND customer_id IN "
                "(SELECT value FROM json_each(?)) GROUP BY customer_id",
                [at_utc, json.dumps(customer_ids[start:start + 50_000])]).fetchall())
        return done

    @staticmethod
    def _write_moves(conn: sqlite3.Connection, run_id: str, run: TierRun, moves: pd.DataFrame,
                     seqs: list[int]) -> None:
        if not len(moves):
            return
        at, at_utc = iso(run.as_of), iso_utc(run.as_of)
        zone = run.rules.timezone
        since = _texts(moves["since"], lambda value: iso(value.tz_convert(zone)))
        dates = {name: _texts(moves[name], lambda value: value.strftime("%Y-%m-%d")) for name in DATES}
        ids, tiers = moves["customer_id"].astype(str).tolist(), moves["tier"].tolist()
        trial_from, from_tier, reason = (moves[name].tolist() for name in ("trial_from", "from_tier", "reason"))
        Database._insert(conn, "tier_history", _HISTORY_COLUMNS, zip(
            ids, from_tier, tiers, reason, [run_id] * len(ids), [at] * len(ids), [at_utc] * len(ids), seqs,
            since, dates["review_at"], dates["grace_until"], dates["trial_until"], trial_from))
        conn.executemany(
            f"INSERT INTO member_tiers ({_STATE_SQL}, run_id, as_of_utc, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (customer_id) DO UPDATE SET tier = excluded.tier, since = excluded.since, "
            "review_at = excluded.review_at, grace_until = excluded.grace_until, "
            "trial_until = excluded.trial_until, trial_from = excluded.trial_from, run_id = excluded.run_id, "
            "as_of_utc = excluded.as_of_utc, seq = excluded.seq "
            "WHERE (excluded.as_of_utc, excluded.seq) > (member_tiers.as_of_utc, member_tiers.seq)",
            zip(ids, tiers, since, dates["review_at"], dates["grace_until"], dates["trial_until"], trial_from,
                [run_id] * len(ids), [at_utc] * len(ids), seqs))


def _added_counts(left: dict[str, dict[str, int]], right: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {kind: {tier: left.get(kind, {}).get(tier, 0) + right.get(kind, {}).get(tier, 0)
                   for tier in {**left.get(kind, {}), **right.get(kind, {})}} for kind in ("up", "down", "joined")}


def _texts(values: pd.Series, text) -> list:
    """``text`` of each instant or date (None for none), formatting each distinct value once:
    a run's moves share a handful of them."""
    codes, uniques = pd.factorize(values)
    texts = [text(value) for value in uniques] + [None]
    return [texts[code] for code in codes.tolist()]


def _states(frame: pd.DataFrame) -> pd.DataFrame:
    """Member states read back from text: instants and dates typed as ``data.tiers`` has them."""
    frame["customer_id"] = frame["customer_id"].astype(str).astype(object)
    for name in ("tier", "trial_from"):
        frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
    frame["since"] = pd.to_datetime(frame["since"], utc=True, format="ISO8601").dt.as_unit("us")
    for name in DATES:
        frame[name] = pd.to_datetime(frame[name], format="%Y-%m-%d").astype("datetime64[s]")
    return frame[STATE_COLUMNS]

