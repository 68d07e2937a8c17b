"""Fixtures of the state tests: a fresh state database."""

import pytest

from engine.state.store import StateStore


@pytest.fixture
def store(tmp_path):
    with StateStore(tmp_path / "state" / "loyalty.db") as opened:
        yield opened
