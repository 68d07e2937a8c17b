"""The outbox: recorded offers due for delivery, read page by page and marked sent, failed or suppressed."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from engine.state.database import JSON_OFFER_COLUMNS, Database, decode_json, iso, iso_utc, now_utc

MAX_ATTEMPTS = 5          # delivery attempts before a failed offer is left alone


class Outbox(Database):
    """Delivery's side of the ``offers`` table."""

    _DUE = ("(status = 'pending' OR (status = 'failed' AND attempts < ?)) AND due_at <= ?")

    def pending(self, now: Any, limit: int | None = None,
                max_attempts: int = MAX_ATTEMPTS) -> list[dict]:
        """Offers due for delivery: pending, or failed with attempts < max_attempts,
        and ``send_at <= now``; by send_at, then in recording order."""
        sql = ("SELECT * FROM offers WHERE (status = 'pending' OR (status = 'failed' "
               "AND attempts < ?)) AND due_at <= ? ORDER BY due_at, rowid")
        params: list = [max_attempts, iso_utc(now)]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [decode_json(row, JSON_OFFER_COLUMNS) for row in self.db.query(sql, params)]

    def due_pages(self, now: Any, page: int = 20_000, limit: int | None = None,
                  max_attempts: int = MAX_ATTEMPTS,
                  columns: Iterable[str] | None = None) -> Iterator[list[dict]]:
        """``pending`` a page at a time (in the same order), so that a big delivery holds
        one page of offers in memory; ``columns``: the ones wanted (default: all but the
        ``explanation``, which is never sent). The order is read once: an offer marked while
        paging (failed, to be retried by a later delivery) is not read again."""
        params: list = [max_attempts, iso_utc(now)]
        order = [row[0] for row in self.db.execute(
            f"SELECT rowid FROM offers WHERE {self._DUE} ORDER BY due_at, rowid"
            + (" LIMIT ?" if limit is not None else ""), params + ([limit] if limit is not None else []))]
        known = [c.name for c in self.db["offers"].columns]
        columns = [c for c in known if c != "explanation"] if columns is None else list(columns)
        if unknown := set(columns) - set(known):
            raise ValueError(f"offers have no column(s) {sorted(unknown)}")
        select = (f"SELECT rowid, {', '.join(columns)} FROM offers "
                  "WHERE rowid IN (SELECT value FROM json_each(?))")
        decoded = [c for c in JSON_OFFER_COLUMNS if c in columns]
        for start in range(0, len(order), page):
            chunk = order[start:start + page]
            rows = {row[0]: dict(zip(columns, row[1:])) for row in self.db.execute(select, [json.dumps(chunk)])}
            yield [decode_json(rows[rowid], decoded) for rowid in chunk if rowid in rows]

    def due_summary(self, now: Any, max_attempts: int = MAX_ATTEMPTS) -> dict[str, int]:
        """channel -> how many offers are due for delivery (what ``pending`` would return)."""
        return dict(self.db.execute(f"SELECT channel, count(*) FROM offers WHERE {self._DUE} GROUP BY channel",
                                    [max_attempts, iso_utc(now)]).fetchall())

    def not_due(self, now: Any) -> int:
        """How many pending offers wait for a later ``send_at`` (quiet hours)."""
        return self.db.execute("SELECT count(*) FROM offers WHERE status = 'pending' "
                               "AND due_at > ?", [iso_utc(now)]).fetchone()[0]

    def mark_many(self, sent: Iterable[str] = (), sent_at: Any = None,
                  failed: Iterable[tuple[str, str]] = (),
                  suppressed: Iterable[tuple[str, str]] = ()) -> None:
        """Record delivery outcomes of many offers in one transaction.

        ``sent``: offer ids handed to their channel at ``sent_at`` (default now);
        ``failed``: (offer_id, error), retried later until MAX_ATTEMPTS;
        ``suppressed``: (offer_id, reason), never sent and no longer a contact.
        """
        stamp = iso(sent_at) if sent_at is not None else now_utc()
        with self._transaction() as conn:
            conn.executemany("UPDATE offers SET status = 'sent', sent_at = ?, "
                             "attempts = attempts + 1, last_error = NULL WHERE offer_id = ?",
                             ((stamp, offer_id) for offer_id in sent))
            conn.executemany("UPDATE offers SET status = 'failed', attempts = attempts + 1, "
                             "last_error = ? WHERE offer_id = ?",
                             ((error, offer_id) for offer_id, error in failed))
            conn.executemany("UPDATE offers SET status = 'suppressed', last_error = ? "
                             "WHERE offer_id = ?",
                             ((reason, offer_id) for offer_id, reason in suppressed))

    def mark_sent(self, offer_id: str, sent_at: Any = None) -> None:
        """The offer was handed to its channel."""
        self.mark_many(sent=[offer_id], sent_at=sent_at)

    def mark_failed(self, offer_id: str, error: str) -> None:
        """A delivery attempt failed; retried by later deliveries until MAX_ATTEMPTS."""
        self.mark_many(failed=[(offer_id, error)])

    def mark_suppressed(self, offer_id: str, reason: str) -> None:
        """The offer will not be sent (e.g. consent withdrawn); it is no longer a contact."""
        self.mark_many(suppressed=[(offer_id, reason)])
