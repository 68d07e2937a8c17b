"""Stable group assignment: holdouts and A/B variants from a salted hash of the customer id.

The hash is pandas' SipHash of the id with a key derived from the programme's salt and
the scope (the campaign), so a customer lands in the same group in every run, every
partition and every machine, and groups of different campaigns are independent.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def stable_fraction(customer_ids: pd.Series, salt: str, scope: str) -> np.ndarray:
    """A number in [0, 1) per customer id, the same for the same (salt, scope, id)."""
    key = hashlib.sha256(f"{salt}:{scope}".encode()).hexdigest()[:16]
    hashed = pd.util.hash_pandas_object(customer_ids.astype(str), index=False,
                                        encoding="utf8", hash_key=key).to_numpy()
    return (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def in_holdout(customer_ids: pd.Series, salt: str, scope: str, share: float) -> np.ndarray:
    """True for the customers held out of ``scope`` (``"global"`` or a campaign id)."""
    if share <= 0:
        return np.zeros(len(customer_ids), dtype=bool)
    return stable_fraction(customer_ids, salt, f"holdout:{scope}") < share


def assign_variants(customer_ids: pd.Series, salt: str, campaign: str,
                    names: list[str], weights: list[float]) -> np.ndarray:
    """The variant name for each customer, in proportion to the weights."""
    if not names:
        return np.full(len(customer_ids), "", dtype=object)
    bounds = np.cumsum(np.asarray(weights, dtype=float))
    bounds = bounds / bounds[-1]
    position = stable_fraction(customer_ids, salt, f"variant:{campaign}")
    index = np.searchsorted(bounds, position, side="right")
    return np.asarray(names, dtype=object)[np.minimum(index, len(names) - 1)]
