"""The state store: one SQLite file per workspace, the memory of every run.

It holds runs, the offer outbox (one row per offer, unique by firing key), the points
ledger, trigger state (``becomes:`` edges, event watermarks), coupon codes, redemptions,
holdouts, campaign schedules, pending firings (one-off firings waiting for a later run) and
stored tiers. A run records all of its offers in one transaction;
delivery reads them back from here, so a rerun or a crash at any point neither duplicates
nor loses an offer.

``StateStore`` is assembled from one part per kind of record, each in its own module over
the same file (``database.Database``): ``runs.RunLog``, ``offers.OfferBook`` (with
``pending.PendingFirings`` and ``tiers.TierBook``, written in the same transaction),
``outbox.Outbox``, ``ledger.Ledger`` and ``trigger_state.TriggerState``; ``chunked.ChunkedRecording``
records a run whose offers arrive in chunks (rendered by the dask engine's workers).
"""

from __future__ import annotations

from pathlib import Path

from engine.state.chunked import ChunkedRecording
from engine.state.ledger import Ledger
from engine.state.offers import OfferBook
from engine.state.outbox import Outbox
from engine.state.pending import PendingFirings
from engine.state.runs import RunLog
from engine.state.tiers import TierBook
from engine.state.trigger_state import TriggerState


class StateStore(RunLog, ChunkedRecording, OfferBook, Outbox, Ledger, PendingFirings, TierBook, TriggerState):
    """The one SQLite state file of a workspace.

    ``StateStore(path)`` creates the file and applies pending migrations; a file
    written by a newer version of loyalty raises StateError.
    """


def open_store(path: Path, create: bool) -> StateStore | None:
    """The state database at ``path``; None when it does not exist and ``create`` is false."""
    if not create and not path.exists():
        return None
    return StateStore(path)          # which makes its folder, or says why it cannot
