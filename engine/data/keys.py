"""Membership of many keys (firing keys, customer ids) in many others, hashed in Arrow.

``Series.isin`` on pandas' Arrow-backed strings first turns the values looked for into a
Python list, one object per value (seconds for a million firing keys); Arrow hashes both
sides without leaving C++.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def _arrow(values) -> pa.Array:
    if isinstance(values, (pd.Series, pd.Index)):
        values = values.array
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if isinstance(values, pa.Array):
        return values
    try:
        arrays = (np.ndarray, pd.api.extensions.ExtensionArray)
        array = pa.array(values, from_pandas=True) if isinstance(values, arrays) \
            else pa.array(list(values), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):      # mixed types: compare their text
        array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return array


def _comparable(left: pa.Array, right: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Both sides of a look-up as one type: ``right`` read as ``left``'s, or both as text."""
    if left.type != right.type:
        if pa.types.is_dictionary(left.type):
            left = left.dictionary_decode()
        if pa.types.is_dictionary(right.type):
            right = right.dictionary_decode()
        if left.type != right.type:
            try:
                right = right.cast(left.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                left, right = left.cast(pa.string()), right.cast(pa.string())
    return left, right


def is_in(values, among: Iterable) -> np.ndarray:
    """Boolean array: whether each of ``values`` (a Series, array or list) is one of ``among``
    (a Series, array, set or list), the latter read as the former's type; nulls match nulls."""
    left = _arrow(values)
    if not len(left):
        return np.zeros(0, dtype=bool)
    right = _arrow(among)
    if not len(right):
        return np.zeros(len(left), dtype=bool)
    left, right = _comparable(left, right)
    return pc.is_in(left, value_set=right).to_numpy(zero_copy_only=False)


def sort_order(frame: pd.DataFrame, keys: list[tuple[str, bool]]) -> np.ndarray:
    """Positions of ``frame``'s rows sorted by ``keys`` ((column, ascending) pairs): stable,
    missing values (NaN, None, NaT) last, as ``DataFrame.sort_values(..., na_position="last",
    kind="stable")`` orders them. Arrow sorts text keys several times faster than pandas, which
    factorizes every key column before it sorts."""
    if not len(frame):
        return np.zeros(0, dtype=np.int64)
    table = pa.table({str(i): _arrow(frame[column]) for i, (column, _) in enumerate(keys)})
    options = pc.SortOptions(sort_keys=[(str(i), "ascending" if up else "descending", "at_end")
                                        for i, (_, up) in enumerate(keys)])
    return pc.sort_indices(table, options=options).to_numpy()


def positions_in(values, among) -> np.ndarray:
    """int64 array: the position in ``among`` (unique keys) of each of ``values``, -1 where it
    is not there or null; as ``is_in``, hashed in Arrow (``pd.Index.get_indexer`` makes a
    Python object of every Arrow string)."""
    left = _arrow(values)
    if not len(left):
        return np.zeros(0, dtype=np.int64)
    right = _arrow(among)
    if not len(right) or pa.types.is_null(left.type):
        return np.full(len(left), -1, dtype=np.int64)
    left, right = _comparable(left, right)
    found = pc.index_in(left, value_set=right, skip_nulls=True).fill_null(-1)
    return found.to_numpy(zero_copy_only=False).astype(np.int64)
