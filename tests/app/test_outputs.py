"""Outputs written on request never land on what the programme lives on (issue 18, item 2)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from engine.app.scaffold import init_workspace

AS_OF = "2026-12-25T10:00:00+08:00"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """The tutorial workspace after one run (read-only: ``workspace`` is a copy of it)."""
    root = tmp_path_factory.mktemp("outputs") / "ws"
    init_workspace(root)
    assert CliRunner().invoke(main, ["run", str(root), "--as-of", AS_OF, "--no-deliver"]).exit_code == 0
    return root


@pytest.fixture
def workspace(recorded, tmp_path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "ws"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target, what", [
    ("state/loyalty.db", "the state database"),
    ("state/loyalty.db-wal", "the state database"),
    ("rules/programme.yaml", "rules/ folder"),
    ("rules/new.yaml", "rules/ folder"),
    ("templates/winback.sms.zh-CN.j2", "templates/ folder"),
    ("loyalty.yaml", "loyalty.yaml"),
    ("data/customers.csv", "the customers data"),
    ("data/orders.csv", "the orders data"),
])
@pytest.mark.parametrize("command", ["trace", "html"])
def test_outputs_refuse_the_programmes_own_files(workspace, target, what, command):
    path = workspace / target
    before = digest(path) if path.exists() else None
    args = (["preview", str(workspace), "--as-of", AS_OF, "--trace", str(path)] if command == "trace" else
            ["report", str(workspace), "--html", str(path)])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "refusing to write" in result.output and what in result.output
    assert (digest(path) if path.exists() else None) == before


def test_a_link_to_the_state_database_is_refused_too(workspace, tmp_path):
    link = tmp_path / "innocent.csv"
    link.symlink_to(workspace / "state" / "loyalty.db")
    before = digest(workspace / "state" / "loyalty.db")
    result = CliRunner().invoke(main, ["preview", str(workspace), "--as-of", AS_OF, "--trace", str(link)])
    assert result.exit_code == 2 and "the state database" in result.output
    assert digest(workspace / "state" / "loyalty.db") == before


def test_an_ordinary_output_file_is_written(workspace, tmp_path):
    result = CliRunner().invoke(main, ["preview", str(workspace), "--as-of", AS_OF,
                                       "--trace", str(workspace / "output" / "why.csv")])
    assert result.exit_code == 0, result.output
    assert (workspace / "output" / "why.csv").read_text(encoding="utf-8").startswith("as_of,customer_id")
