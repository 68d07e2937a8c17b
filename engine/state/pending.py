"""Pending firings: one-off firings that were stopped and wait for a later run (``decide.pending``).

One row per firing key in ``pending_firings``: the campaign and customer, the reason that
stopped it last, when it first fired and when it expires, the ``event.*`` values it fired
with (JSON), and its status: ``pending``, or closed as ``offered``, ``expired`` or
``held_out``. A run writes its rows in the transaction that records its offers
(``OfferBook.record_run``), so a crash or a rerun neither loses nor doubles one. A run reads
them as they stood before its ``as_of`` (``pending_before``): a rerun at the same instant
sees what its first attempt saw.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

import pandas as pd

from engine.decide.pending import CONTEXT_COLUMNS
from engine.state.database import Database, instant_bounds

_CLOSED = ("expired", "held_out")      # acted on without an offer: never fires again


class PendingFirings(Database):
    """The ``pending_firings`` table."""

    def pending_before(self, as_of_utc: str) -> pd.DataFrame:
        """The firings still pending before a run at ``as_of_utc`` (UTC ISO): first fired by an
        earlier run, and pending then (pending now, or changed by a run at this instant or later)."""
        frame = self._frame(
            f"SELECT {', '.join(CONTEXT_COLUMNS)} FROM pending_firings WHERE first_as_of < ? "
            "AND (status = 'pending' OR status_as_of >= ?) ORDER BY campaign, customer_id, first_as_of, firing_key",
            [as_of_utc, as_of_utc], CONTEXT_COLUMNS)
        return frame.astype(object)

    def closed_firings(self, firing_keys: Iterable[str] | None = None,
                       before: str | None = None) -> dict[str, str]:
        """firing key -> as_of (UTC) of the run that closed it without an offer (expired, held out)."""
        where, params = instant_bounds("status_as_of", before, None)
        sql = "SELECT firing_key, status_as_of FROM pending_firings WHERE status IN ('expired', 'held_out')"
        return self._pairs_for_keys(" AND ".join([sql, *where]), params, "firing_key", firing_keys)

    def pending_firings(self, customer_id: str | None = None) -> list[dict]:
        """Every pending firing (of one customer), oldest first."""
        sql = "SELECT * FROM pending_firings"
        params: list = []
        if customer_id is not None:
            sql += " WHERE customer_id = ?"
            params.append(str(customer_id))
        rows = self.db.query(sql + " ORDER BY first_as_of, campaign, firing_key", params)
        return [dict(row, event=json.loads(row["event"]) if row.get("event") else None) for row in rows]

    @staticmethod
    def _write_pending(conn: sqlite3.Connection, outcomes: pd.DataFrame | None, run_id: str) -> None:
        """Write what a run decided about pending firings (``decide.pending.OUTCOME_COLUMNS``):
        new and still-pending firings upserted (first firing, expiry and event kept), closed ones
        updated. A firing recorded as an offer is offered, never pending again; a firing closed
        by a run at another instant stays closed."""
        if outcomes is None or not len(outcomes):
            return
        as_of = conn.execute("SELECT as_of_utc FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
        keys = outcomes["firing_key"].astype(str).tolist()
        offered = set()
        stored: dict[str, tuple] = {}       # firing key -> (reason, status, status_as_of) written before
        for start in range(0, len(keys), 50_000):
            chunk = [json.dumps(keys[start:start + 50_000])]
            offered.update(row[0] for row in conn.execute(
                "SELECT firing_key FROM offers WHERE firing_key IN (SELECT value FROM json_each(?))", chunk))
            stored.update((row[0], row[1:]) for row in conn.execute(
                "SELECT firing_key, reason, status, status_as_of FROM pending_firings "
                "WHERE firing_key IN (SELECT value FROM json_each(?))", chunk))
        rows = outcomes.astype(object).where(outcomes.notna(), None)
        status = [("offered" if key in offered else s) for key, s in zip(keys, rows["status"])]
        # a row that already says this (a rerun at the same instant) is not written again
        fresh = [(key, campaign, str(customer), reason, first, expires, event, state, as_of, run_id)
                 for key, campaign, customer, reason, first, expires, event, state in zip(
                     keys, rows["campaign"], rows["customer_id"], rows["reason"], rows["first_as_of"],
                     rows["expires_at"], rows["event"], status)
                 if reason is not None and expires is not None and stored.get(key) != (reason, state, as_of)]
        conn.executemany(
            "INSERT INTO pending_firings (firing_key, campaign, customer_id, reason, first_as_of, expires_at, event, "
            "status, status_as_of, updated_run) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (firing_key) DO UPDATE SET reason = excluded.reason, status = excluded.status, "
            "status_as_of = excluded.status_as_of, updated_run = excluded.updated_run "
            "WHERE pending_firings.status = 'pending' OR pending_firings.status_as_of = excluded.status_as_of",
            fresh)
        closed = [(state, as_of, run_id, key, as_of) for key, reason, expires, state in zip(
            keys, rows["reason"], rows["expires_at"], status)
            if (reason is None or expires is None) and stored.get(key, (None,))[1:] != (state, as_of)]
        conn.executemany(
            "UPDATE pending_firings SET status = ?, status_as_of = ?, updated_run = ? "
            "WHERE firing_key = ? AND (status = 'pending' OR status_as_of = ?)", closed)
