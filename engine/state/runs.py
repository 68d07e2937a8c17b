"""Runs: when each run happened, with which rules and data, and how it ended; campaign schedules."""

from __future__ import annotations

import secrets
from datetime import timezone
from typing import Any, Iterable, Mapping

from engine.state.database import Database, as_datetime, decode_json, dumps_json, iso, iso_utc, now_utc

RUN_STATUSES = ("running", "recorded", "delivered", "failed")
JSON_RUN_COLUMNS = ("rule_hashes", "fingerprints", "campaigns", "timings", "counts")


def new_run_id(as_of: Any) -> str:
    """A run's id: its ``as_of`` in UTC and a random suffix."""
    return f"{as_datetime(as_of).astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"



class RunLog(Database):
    """The ``runs`` and ``schedules`` tables."""

    def begin_run(self, as_of: Any, rule_hashes: Mapping[str, str],
                  fingerprints: Mapping[str, str], campaigns: Iterable[str] = (),
                  run_id: str | None = None) -> str:
        """Start a run at ``as_of`` (status ``running``); returns its run id (``run_id``,
        from ``new_run_id``, when the offers were prepared before the run began)."""
        as_of_dt = as_datetime(as_of)
        run_id = run_id or new_run_id(as_of_dt)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, as_of, as_of_utc, started_at, status, rule_hashes, "
                "fingerprints, campaigns) VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                (run_id, iso(as_of_dt), iso_utc(as_of_dt), now_utc(), dumps_json(dict(rule_hashes)),
                 dumps_json(dict(fingerprints)), dumps_json(list(campaigns))))
        return run_id

    def finish_run(self, run_id: str, status: str, timings: Mapping[str, float] | None = None,
                   counts: Mapping[str, Any] | None = None) -> None:
        """Close a run with a final status (recorded | delivered | failed)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self._transaction() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, timings = coalesce(?, timings), "
                "counts = coalesce(?, counts) WHERE run_id = ?",
                (status, now_utc(), dumps_json(timings), dumps_json(counts), run_id))

    def previous_run(self, before_as_of: Any = None) -> dict | None:
        """The latest recorded or delivered run (with ``as_of`` before the given one)."""
        sql = "SELECT * FROM runs WHERE status IN ('recorded', 'delivered')"
        params: list = []
        if before_as_of is not None:
            sql += " AND as_of_utc < ?"
            params.append(iso_utc(before_as_of))
        sql += " ORDER BY as_of_utc DESC, started_at DESC LIMIT 1"
        rows = list(self.db.query(sql, params))
        return decode_json(rows[0], JSON_RUN_COLUMNS) if rows else None

    def runs(self, limit: int = 20) -> list[dict]:
        """The most recent runs, newest first."""
        rows = self.db.query("SELECT * FROM runs ORDER BY started_at DESC, rowid DESC LIMIT ?",
                             [limit])
        return [decode_json(row, JSON_RUN_COLUMNS) for row in rows]

    def schedule_last_run(self, campaign: str) -> str | None:
        """When the campaign's schedule last ran (ISO 8601), or None."""
        row = self.db.execute("SELECT last_run_at FROM schedules WHERE campaign = ?",
                              [campaign]).fetchone()
        return row[0] if row else None

    def set_schedule_last_run(self, campaign: str, at: Any) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO schedules (campaign, last_run_at) VALUES (?, ?) "
                         "ON CONFLICT (campaign) DO UPDATE SET last_run_at = excluded.last_run_at",
                         (campaign, iso(at)))
