"""The ledgers: points credited per customer, coupon codes issued, redemptions recorded."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import pandas as pd

from engine.state.database import Database, instant_bounds, plain


class Ledger(Database):
    """The ``points_ledger``, ``coupon_codes`` and ``redemptions`` tables."""

    def points_balance(self) -> pd.DataFrame:
        """customer_id, points: the sum of the points ledger per customer."""
        return self._frame("SELECT customer_id, sum(points) FROM points_ledger "
                           "GROUP BY customer_id", [], ["customer_id", "points"])

    def points_granted(self, before: str | None = None, through: str | None = None) -> pd.DataFrame:
        """customer_id, points, granted_at (UTC), campaign of the points campaigns granted by
        runs at instants before ``before`` (or at or before ``through``), UTC ISO keys."""
        where, params = instant_bounds("granted", before, through)
        rows = self._frame(
            "SELECT customer_id, points, granted, campaign FROM (SELECT l.customer_id, l.points, "
            "coalesce(r.as_of_utc, l.as_of) AS granted, coalesce(o.campaign, '') AS campaign "
            "FROM points_ledger l LEFT JOIN offers o ON o.offer_id = l.offer_id "
            "LEFT JOIN runs r ON r.run_id = o.run_id)" + (" WHERE " + " AND ".join(where) if where else ""),
            params, ["customer_id", "points", "granted_at", "campaign"])
        rows["customer_id"] = rows["customer_id"].astype(str)
        rows["points"] = pd.to_numeric(rows["points"]).astype(float)
        rows["granted_at"] = pd.to_datetime(rows["granted_at"], utc=True, format="ISO8601").dt.as_unit("us")
        return rows

    def coupon_codes(self) -> pd.DataFrame:
        """code, offer_id, campaign, customer_id, expires_at of every issued code."""
        columns = ["code", "offer_id", "campaign", "customer_id", "expires_at"]
        return self._frame(f"SELECT {', '.join(columns)} FROM coupon_codes", [], columns)

    def record_redemptions(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Store redemptions (code, customer_id, order_id, amount, redeemed_at);
        a (code, order_id) pair already stored is ignored. Returns rows added."""
        values = [(r.get("redemption_id") or f"{r['code']}:{r['order_id']}", r["code"],
                   r.get("customer_id"), str(r["order_id"]), plain(r.get("amount")),
                   plain(r.get("redeemed_at"))) for r in rows]
        with self._transaction() as conn:
            before = conn.total_changes
            self._insert(conn, "redemptions", ("redemption_id", "code", "customer_id",
                                               "order_id", "amount", "redeemed_at"),
                         values, verb="INSERT OR IGNORE")
            return conn.total_changes - before

    def redemptions(self) -> pd.DataFrame:
        columns = ["redemption_id", "code", "customer_id", "order_id", "amount", "redeemed_at"]
        return self._frame(f"SELECT {', '.join(columns)} FROM redemptions", [], columns)
