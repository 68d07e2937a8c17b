"""Fixtures of the data tests: the busy tier programme of test_tiers_everywhere, run daily once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

BUSY_DAYS = 60                          # day 0 to day 59
BUSY_KEPT = (12, 13, 14, 20, 29, 59)    # the days after which a copy of the workspace is kept


@pytest.fixture(scope="session")
def busy_days(tmp_path_factory) -> dict[int, Path]:
    """The busy tier programme (``test_tiers_everywhere.busy``) run once a day, ``deliver=False``,
    from day 0 to day 59: {n: the workspace as it is after the runs of days 0 to n} for each n
    of ``BUSY_KEPT``. Shared by several tests and modules: read-only, copy one to change it."""
    from test_tiers import day
    from test_tiers_everywhere import busy

    base = tmp_path_factory.mktemp("busy_days")
    ws = busy(base / "ws")
    kept = {}
    for n in range(BUSY_DAYS):
        ws.run(day(n), deliver=False)
        if n in BUSY_KEPT:
            kept[n] = Path(shutil.copytree(base / "ws", base / f"after_day_{n}"))
    return kept
