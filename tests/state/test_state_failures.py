"""A damaged, emptied or unwritable state database is an outside failure (exit 3) that says how
to recover, never a traceback and never a new programme (issue 18, items 4 and 5)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from engine.app.scaffold import init_workspace

ROOT = Path(__file__).resolve().parents[2]
AS_OF = "2026-12-25T10:00:00+08:00"
NEXT = "2026-12-26T10:00:00+08:00"


def loyalty(*args: str, preexec=None) -> subprocess.CompletedProcess:
    """`loyalty ARGS` as a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=preexec)


def invoke(*args: str):
    """`loyalty ARGS` in-process (its ``exit_code``, ``stdout`` and ``stderr``): an unexpected
    exception is exit code 1 with the exception kept, as a process would end with a traceback."""
    return CliRunner().invoke(main, list(args))


def offers(root: Path) -> list[tuple]:
    with sqlite3.connect(root / "state" / "loyalty.db") as conn:
        return conn.execute("SELECT offer_id, firing_key, payload_hash FROM offers ORDER BY offer_id").fetchall()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """The tutorial workspace after one run (read-only: ``workspace`` is a copy of it)."""
    root = tmp_path_factory.mktemp("recorded") / "ws"
    init_workspace(root)
    first = loyalty("run", str(root), "--as-of", AS_OF, "--no-deliver")
    assert first.returncode == 0, first.stderr
    assert offers(root)
    return root


@pytest.fixture
def workspace(recorded, tmp_path) -> Path:
    return Path(shutil.copytree(recorded, tmp_path / "ws"))


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for page in range(1, len(data) // 4096):            # every page but the header
        data[page * 4096 + 8: page * 4096 + 200] = b"\xff" * 192
    path.write_bytes(bytes(data))


def test_an_emptied_state_file_is_refused_not_taken_for_a_new_programme(workspace):
    state = workspace / "state" / "loyalty.db"
    state.write_bytes(b"")
    for name in ("loyalty.db-wal", "loyalty.db-shm"):
        (state.parent / name).unlink(missing_ok=True)
    result = loyalty("run", str(workspace), "--as-of", NEXT, "--no-deliver")
    assert result.returncode == 3, result.stderr
    assert "is empty (0 bytes)" in result.stderr and "backup" in result.stderr
    assert "Traceback" not in result.stderr
    assert state.stat().st_size == 0                        # nothing was re-recorded into it


def test_a_damaged_state_file_stops_every_command_with_exit_3_and_the_way_back(workspace):
    state = workspace / "state" / "loyalty.db"
    backup = workspace.parent / "backup.db"
    saved = invoke("state", "backup", str(backup), str(workspace))
    assert saved.exit_code == 0, saved.output
    damage(state)
    for args in (["run", str(workspace), "--as-of", NEXT, "--no-deliver"],
                 ["preview", str(workspace), "--as-of", NEXT]):
        result = loyalty(*args)
        assert result.returncode == 3, (args, result.stderr)
        assert "damaged" in result.stderr and "Restore the latest backup" in result.stderr
        assert "Traceback" not in result.stderr
    check = invoke("state", "check", str(workspace))
    assert check.exit_code == 3 and "problem:" in check.stderr
    # the way back: the backup restored, the state checks out and a rerun records nothing twice
    state.write_bytes(backup.read_bytes())
    for name in ("loyalty.db-wal", "loyalty.db-shm"):
        (state.parent / name).unlink(missing_ok=True)
    assert invoke("state", "check", str(workspace)).exit_code == 0
    before = offers(workspace)
    again = invoke("run", str(workspace), "--as-of", AS_OF, "--no-deliver", "--format", "json")
    assert again.exit_code == 0, again.output
    assert offers(workspace) == before


def test_state_backup_is_a_checked_single_file_and_never_overwrites(workspace):
    target = workspace.parent / "backups" / "state-1.db"
    made = CliRunner().invoke(main, ["state", "backup", str(target), str(workspace)])
    assert made.exit_code == 0, made.output
    assert "checked" in made.output
    assert not Path(f"{target}-wal").exists() and not Path(f"{target}-shm").exists()
    with sqlite3.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM offers").fetchone()[0] == len(offers(workspace))
    again = CliRunner().invoke(main, ["state", "backup", str(target), str(workspace)])
    assert again.exit_code == 2 and "exists already" in again.output
    onto_state = CliRunner().invoke(main, ["state", "backup", str(workspace / "state" / "loyalty.db-wal"),
                                           str(workspace)])
    assert onto_state.exit_code == 2 and "the state database" in onto_state.output


def test_state_check_reports_a_sound_file(workspace):
    result = CliRunner().invoke(main, ["state", "check", str(workspace), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"ok": true' in result.output and '"unfinished_runs": 0' in result.output


def test_a_full_disk_fails_the_run_with_exit_3_marks_it_failed_and_the_next_run_recovers(tmp_path):
    """The file-size limit makes every write past it fail as on a full disk (EFBIG)."""
    root = tmp_path / "ws"
    init_workspace(root)
    assert invoke("run", str(root), "--as-of", AS_OF, "--no-deliver").exit_code == 0
    recorded = offers(root)
    state = root / "state" / "loyalty.db"
    with sqlite3.connect(state) as conn:
        runs_before = conn.execute("SELECT count(*) FROM runs").fetchone()[0]

    def full_disk():      # no write may reach past the first 8 KB of any file: the log fills at once
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    result = loyalty("run", str(root), "--as-of", "2027-03-14T10:00:00+08:00", "--no-deliver", preexec=full_disk)
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "cannot write the state database" in result.stderr and "Traceback" not in result.stderr
    assert "run again" in result.stderr
    assert offers(root) == recorded                            # nothing half-recorded
    with sqlite3.connect(state) as conn:
        statuses = [row[0] for row in conn.execute("SELECT status FROM runs ORDER BY started_at")]
    assert "running" not in statuses                           # a run that began is marked failed
    assert statuses[runs_before:] in ([], ["failed"])
    after = invoke("run", str(root), "--as-of", "2027-03-14T10:00:00+08:00", "--no-deliver")
    assert after.exit_code == 0, after.output
    assert set(recorded) < set(offers(root))


def test_a_state_folder_that_cannot_be_made_is_exit_3(tmp_path):
    root = tmp_path / "ws"
    init_workspace(root)
    (root / "state").write_text("a file where the state folder should be", encoding="utf-8")
    result = loyalty("run", str(root), "--as-of", AS_OF, "--no-deliver")
    assert result.returncode == 3, result.stderr
    assert "cannot open the state database" in result.stderr and "Traceback" not in result.stderr
