"""Shared test set-up: the repository root is importable; workspaces many modules start from."""

import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cli import main  # noqa: E402  (importable once the root is on the path)


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """The tutorial workspace `loyalty init` writes (a module may define its own instead)."""
    result = CliRunner().invoke(main, ["init", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    return tmp_path / "ws"


@pytest.fixture(scope="session")
def example_programme(tmp_path_factory) -> Path:
    """The example programme (星享会员) with 200 generated customers, made once: copy it
    (``example_copy``) before changing it."""
    root = tmp_path_factory.mktemp("example") / "ws"
    result = CliRunner().invoke(main, ["init", str(root), "--example", "--customers", "200"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture()
def example_copy(example_programme, tmp_path) -> Path:
    """A private copy of the example programme, links kept as links."""
    root = tmp_path / "ws"
    shutil.copytree(example_programme, root, symlinks=True)
    return root


@pytest.fixture(scope="session")
def dask_cluster():
    """One LocalCluster of 2 single-threaded worker processes for every module that needs one
    (started at the first, stopped at the end of the session). Each module connects its own
    Client to it; a test that kills a worker waits for its replacement."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as local:
        yield local
