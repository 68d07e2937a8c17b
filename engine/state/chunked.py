"""A run recorded from chunks: the same rows and the same one transaction as
``OfferBook.record_run``, for a run whose offers were rendered elsewhere (the dask engine's
workers) and arrive a chunk at a time, so that the recording process never holds them all.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd

from engine.config.tier_rules import trial_days
from engine.data.tiers import TierRun
from engine.state.database import gc_paused, now_utc
from engine.state.offers import OfferBook, RecordResult
from engine.state.tiers import TierBook
from engine.state.trigger_state import TriggerState


class ChunkedRecording(OfferBook, TierBook, TriggerState):
    """``record_run_chunks``."""

    def record_run_chunks(self, run_id: str, offers: Iterable[list[tuple[dict, dict]]] = (),
                          known: Iterable[list[Mapping]] = (),
                          trigger_state: Iterable[list[dict]] = (),
                          holdouts: Iterable[list[dict]] = (),
                          pending: Iterable[pd.DataFrame] = (),
                          tiers: TierRun | None = None,
                          tier_moves: Iterable[pd.DataFrame] = ()) -> RecordResult:
        """Record a run in ONE transaction from chunks, as ``record_run`` records it whole:
        ``offers``, chunks of ``prepare_offers`` rows (each chunk looked up in the offers
        table: a key recorded with the same meaning counts as existing, with another as a
        conflict); ``known``, chunks of offers found recorded before rendering (with their
        ``recorded_payload_hash``); trigger-state rows, holdouts, pending-firing outcomes
        (frames), and with ``tiers`` (its instant and rules) the stored tiers' own moves in
        ``tier_moves`` (frames) and those of the newly recorded tier rewards. Offers come
        first: the pending firings written after them see which of them were offered."""
        created = now_utc()
        new, existing, conflicts, rewards = 0, 0, [], []
        with gc_paused(), self._transaction() as conn:
            for chunk in offers:
                recorded = self.existing_offers(row["firing_key"] for row, _ in chunk)
                new_rows, same, clashes = self._sort_out(chunk, (), recorded)
                self._write_offers(conn, new_rows)
                new, existing, conflicts = new + len(new_rows), existing + same, conflicts + clashes
                rewards += [{"customer_id": row["customer_id"], "campaign": row["campaign"], "to": reward["to"],
                             "trial_days": trial_days(reward.get("for"))}
                            for row, reward in new_rows if reward and reward.get("kind") == "tier"]
            for chunk in known:
                _, same, clashes = self._sort_out((), chunk, {})
                existing, conflicts = existing + same, conflicts + clashes
            for rows in trigger_state:
                self._upsert_trigger_state(conn, rows, created)
            for rows in holdouts:
                self._write_holdouts(conn, rows, run_id)
            for frame in pending:
                self._write_pending(conn, frame, run_id)
            moved = self._record_tier_chunks(conn, run_id, tiers, tier_moves, rewards) if tiers is not None else {}
            conn.execute("UPDATE runs SET status = 'recorded' WHERE run_id = ?", (run_id,))
        return RecordResult(new=new, existing=existing, conflicts=conflicts, tier_moves=moved)
