"""Stored tiers on the dask engine: each partition's task reads its members' stored tiers and
hands back their moves; runs, previews and simulations record and show what the local engine does.
One LocalCluster of 2 single-threaded worker processes (the session's, conftest.py) serves the module."""

from __future__ import annotations

import pytest

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")

from test_tiers import day, tables
from test_tiers_everywhere import busy, offers, recorded_moves, simulated_moves


@pytest.fixture(scope="module")
def cluster(dask_cluster):
    """The session's LocalCluster (2 single-threaded worker processes) and a client of this module's."""
    with distributed.Client(dask_cluster) as client:
        yield dask_cluster, client


def test_runs_on_dask_record_the_tiers_the_local_engine_records(tmp_path, cluster):
    address = cluster[0].scheduler_address
    local, remote = busy(tmp_path / "local"), busy(tmp_path / "remote")
    for n in (0, 3, 6, 10, 13, 16):
        previewed = remote.preview(day(n), sample=2, engine="dask", scheduler=address, partitions=3).tier_moves
        assert previewed == local.preview(day(n), sample=2).tier_moves, n
        moved = remote.run(day(n), deliver=False, engine="dask", scheduler=address, partitions=3).tier_moves
        assert moved == local.run(day(n), deliver=False).tier_moves == previewed, n
    assert tables(tmp_path / "remote") == tables(tmp_path / "local")
    assert offers(tmp_path / "remote") == offers(tmp_path / "local")


def test_a_simulation_on_dask_moves_the_tiers_the_local_simulation_moves(tmp_path, cluster, busy_days):
    address = cluster[0].scheduler_address
    root = tmp_path / "ws"
    ws = busy(root)
    local = ws.simulate(day(0), day(14), fresh=True)
    remote = ws.simulate(day(0), day(14), fresh=True, engine="dask", scheduler=address, partitions=3)
    assert simulated_moves(remote.tier_history) == simulated_moves(local.tier_history)
    assert remote.tier_moves == local.tier_moves
    # what the daily runs of days 0 to 14 record (the shared busy_days fixture made them)
    assert simulated_moves(local.tier_history) == recorded_moves(busy_days[14])
