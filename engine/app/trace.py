"""Decision trace export (`loyalty preview --trace FILE`): one row per customer and campaign.

For every customer considered and every campaign evaluated: the outcome and the stage that
decided it (``segment`` for customers outside the campaign's segment, ``trigger`` for members
who did not fire, then consent, frequency_cap, cooldown, holdout, arbitration, budget, or
``offers``), with columns an analyst filters on (city, tier, locale). A firing stopped by an
earlier run that came back (``decide.pending``) says since when it waits (``pending_since``);
``waits_until`` says until when a firing stopped in this run waits for a later one. Parquet
when the file name ends in .parquet, else CSV with spreadsheet formulas neutralised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from engine.app.csv_export import csv_safe_frame
from engine.decide.evaluation import Evaluation

OUTCOMES = {"segment": "not in segment", "trigger": "did not fire", "holdout": "held out",
            "offers": "offer"}
CUSTOMER_COLUMNS = ("city", "tier", "locale", "timezone")


def trace_frame(evaluation: Evaluation, features: pd.DataFrame) -> pd.DataFrame:
    """The trace as a frame: as_of, customer_id, city, tier, locale, timezone, campaign,
    outcome, stage, variant, firing_key, cost, pending_since, waits_until. Needs an evaluation
    made with ``trace=True``."""
    if evaluation.stops is None and evaluation.funnels:
        if any(f["segment"] > f["offers"] for f in evaluation.funnels.values()):
            raise ValueError("the evaluation has no trace: evaluate with trace=True")
    n = len(features)
    stops = evaluation.stops if evaluation.stops is not None else pd.DataFrame(
        columns=["campaign", "pos", "stage", "firing_key"])
    offers = evaluation.offers
    frames = []
    for campaign in evaluation.funnels:
        stage = np.full(n, "segment", dtype=object)
        key = np.full(n, "", dtype=object)
        variant = np.full(n, "", dtype=object)
        cost = np.full(n, np.nan)
        mine = stops[stops["campaign"] == campaign]
        positions = mine["pos"].to_numpy(dtype=int)
        stage[positions] = mine["stage"].to_numpy(dtype=object)
        key[positions] = mine["firing_key"].astype(object).to_numpy()
        if len(offers):
            got = offers[offers["campaign"] == campaign]
            positions = got["pos"].to_numpy(dtype=int)
            stage[positions] = "offers"
            key[positions] = got["firing_key"].to_numpy(dtype=object)
            variant[positions] = got["variant"].astype(object).to_numpy()
            cost[positions] = got["cost"].to_numpy(dtype=float)
        frames.append(pd.DataFrame({"campaign": campaign, "pos": np.arange(n), "stage": stage,
                                    "variant": variant, "firing_key": key, "cost": cost}))
    if not frames:
        return pd.DataFrame(columns=["as_of", "customer_id", *CUSTOMER_COLUMNS, "campaign", "outcome", "stage",
                                     "variant", "firing_key", "cost", "pending_since", "waits_until"])
    trace = pd.concat(frames, ignore_index=True)
    rows = trace["pos"].to_numpy()
    columns = {"as_of": evaluation.as_of.isoformat(),
               "customer_id": features["customer_id"].astype(str).to_numpy(dtype=object)[rows]}
    for name in CUSTOMER_COLUMNS:
        columns[name] = features[name].astype(object).to_numpy()[rows] if name in features else None
    result = pd.DataFrame(columns)
    result["campaign"] = trace["campaign"].to_numpy()
    result["outcome"] = trace["stage"].map(lambda s: OUTCOMES.get(s, "stopped")).to_numpy()
    for name in ("stage", "variant", "firing_key", "cost"):
        result[name] = trace[name].to_numpy()
    result["pending_since"], result["waits_until"] = _waiting(evaluation, trace["firing_key"])
    return result


def _waiting(evaluation: Evaluation, keys: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per firing key: since when it waited if it came back from an earlier run, and until when
    it waits if it was stopped (now or again); empty otherwise."""
    outcomes = evaluation.pending
    none = np.full(len(keys), "", dtype=object)
    if not len(outcomes):
        return none, none.copy()
    as_of = evaluation.as_of.tz_convert("UTC").isoformat(timespec="seconds")
    zone = evaluation.as_of.tz
    shown: dict[str, str] = {}     # UTC key -> local time: the firings share a handful of instants

    def local_time(instant: str) -> str:
        if instant not in shown:
            shown[instant] = pd.Timestamp(instant).tz_convert(zone).isoformat()
        return shown[instant]

    since = {key: local_time(first)
             for key, first in zip(outcomes["firing_key"], outcomes["first_as_of"]) if first and first < as_of}
    waiting = outcomes[outcomes["status"] == "pending"]
    until = {key: local_time(end) for key, end in zip(waiting["firing_key"], waiting["expires_at"])}
    return _looked_up(keys, since), _looked_up(keys, until)


def _looked_up(keys: pd.Series, table: dict[str, str]) -> np.ndarray:
    if not table:
        return np.full(len(keys), "", dtype=object)
    found = keys.map(table).astype(object)
    return found.where(found.notna(), "").to_numpy(dtype=object)


def write_trace(evaluation: Evaluation, features: pd.DataFrame, path: Path | str) -> int:
    """Write the decision trace to ``path`` (.parquet, else CSV); return the number of rows."""
    path = Path(path)
    frame = trace_frame(evaluation, features)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    else:
        csv_safe_frame(frame).to_csv(path, index=False, encoding="utf-8")
    return len(frame)
