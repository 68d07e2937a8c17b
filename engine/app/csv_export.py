"""CSV written for spreadsheets, safe from formula injection.

A cell that starts with = + - @, a tab or a carriage return is read by Excel, LibreOffice
and Google Sheets as a formula; such cells get a leading ' so they show as text.
"""

from __future__ import annotations

import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value) -> str:
    """One cell as text, a leading ' where a spreadsheet would see a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_safe_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every text cell made safe as ``csv_safe`` does (numbers, dates and
    missing values unchanged)."""
    safe = frame.copy()
    for name in safe.columns:
        if safe[name].dtype.kind in "fiub" or pd.api.types.is_datetime64_any_dtype(safe[name].dtype):
            continue
        text = safe[name].astype(object)
        risky = text.map(lambda v: isinstance(v, str) and v.startswith(FORMULA_START)).to_numpy(dtype=bool)
        if risky.any():
            text = text.copy()
            text[risky] = "'" + text[risky].astype(str)
            safe[name] = text
    return safe
