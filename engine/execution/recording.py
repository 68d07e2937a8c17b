"""What a run makes of its evaluation for the state store: each offer's message rendered
and made into the store's rows (in several processes where it pays), and the trigger-state
rows of ``becomes:`` edges. Used by the client on the local engine and by each partition's
task on the dask engine (``partition_run``), so both record the same rows."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.decide.evaluation import Evaluation
from engine.execution.parallel import MIN_OFFERS_PER_WORKER, in_workers, worker_count
from engine.messages.offers import customer_records, merge_out_of_time_errors, render_offers
from engine.messages.rendering import Renderer
from engine.state.database import gc_paused

EVALUATED = "*"   # trigger-state row saying a `becomes` condition has been evaluated before


def edge_state_rows(evaluation: Evaluation, previous: dict, evaluated: bool = True) -> list[dict]:
    """Trigger-state rows to store: who is true now, who stopped being true; and, with
    ``evaluated``, one row per campaign saying it was evaluated (``EVALUATED``)."""
    rows = []
    for campaign, now_true in evaluation.edge_state.items():
        before = previous.get(campaign, frozenset())
        if evaluated:
            rows.append(evaluated_row(campaign))
        rows.extend({"campaign": campaign, "customer_id": c, "key": "becomes", "value": "1"}
                    for c in now_true - before)
        rows.extend({"campaign": campaign, "customer_id": c, "key": "becomes", "value": "0"}
                    for c in before - now_true)
    return rows


def evaluated_row(campaign: str) -> dict:
    return {"campaign": campaign, "customer_id": EVALUATED, "key": "becomes", "value": "1"}


def build_messages(workspace: LoadedWorkspace, evaluation: Evaluation, features: pd.DataFrame,
                   renderer: Renderer, rows: pd.DataFrame | None = None,
                   codes: dict[str, str] | None = None, workers: int | None = 1,
                   finish: Callable[[list[dict]], list] | None = None) -> tuple[list, list[dict]]:
    """Offer records with rewards and rendered messages; and the render errors.

    One bad template never stops the others: a failed render is reported per offer. Rendering
    stops when the renderer's time for the run is used up, with one error per campaign left out.
    ``workers``: processes rendering at once (``parallel``; None: automatic from the
    number of messages); the records come in the same order. ``finish``: what to make of
    each share of records where it was rendered (e.g. the state store's rows); its
    results, concatenated, are returned instead of the records.
    """
    settings = workspace.settings
    rows = evaluation.offers if rows is None else rows
    send_at = pd.to_datetime(rows["send_at"], utc=True).dt.tz_convert(settings.timezone).tolist()
    workers = worker_count(len(rows), workers, MIN_OFFERS_PER_WORKER)
    # the first share is rendered here, which then also unpickles the others' messages: a bigger share
    shares = np.array([1.2] + [1.0] * (workers - 1))
    bounds = np.round(np.concatenate([[0], np.cumsum(shares)]) / shares.sum() * len(rows)).astype(np.int64)

    def render(number: int) -> tuple[list[dict], list[dict]]:
        start, stop = int(bounds[number]), int(bounds[number + 1])
        part = rows.iloc[start:stop]
        customers = customer_records(features, part["pos"])
        records: list[dict] = []
        errors: list[dict] = []
        render_offers(workspace, evaluation, renderer, part, customers, send_at[start:stop], codes, records, errors)
        return (records if finish is None else finish(records)), errors

    with gc_paused():
        parts = in_workers(render, workers)
        errors = merge_out_of_time_errors([e for _, errors in parts for e in errors],
                                          renderer.max_render_seconds_per_run)
        return [r for records, _ in parts for r in records], errors
