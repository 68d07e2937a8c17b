"""Trigger state: per campaign and customer, what a trigger remembers between runs (``becomes:`` edges)."""

from __future__ import annotations

import sqlite3
from typing import Iterable

import pandas as pd

from engine.state.database import Database, column_values, plain


class TriggerState(Database):
    """The ``trigger_state`` table."""

    def trigger_state(self, campaign: str, key: str | None = None) -> pd.DataFrame:
        """Stored trigger state of a campaign: customer_id, value (plus key when not given)."""
        if key is None:
            return self._frame("SELECT customer_id, key, value FROM trigger_state "
                               "WHERE campaign = ?", [campaign], ["customer_id", "key", "value"])
        return self._frame("SELECT customer_id, value FROM trigger_state "
                           "WHERE campaign = ? AND key = ?", [campaign, key],
                           ["customer_id", "value"])

    @staticmethod
    def _upsert_trigger_state(conn: sqlite3.Connection, rows: Iterable[dict] | pd.DataFrame,
                              updated: str) -> None:
        if isinstance(rows, pd.DataFrame):
            if rows.empty:
                return
            stamps = (column_values(rows["updated_at"]) if "updated_at" in rows
                      else [updated] * len(rows))
            values = zip(rows["campaign"].astype(str).tolist(),
                         rows["customer_id"].astype(str).tolist(),
                         rows["key"].astype(str).tolist(),
                         column_values(rows["value"]), stamps)
        else:
            values = ((r["campaign"], str(r["customer_id"]), r["key"], plain(r.get("value")),
                       r.get("updated_at") or updated) for r in rows)
        conn.executemany(
            "INSERT INTO trigger_state (campaign, customer_id, key, value, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (campaign, key, customer_id) DO UPDATE SET "
            "value = excluded.value, updated_at = excluded.updated_at", values)
