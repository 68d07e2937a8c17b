"""Customer data outside the workspace (and out of git): the README tour works with it (issue 19)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cli import main
from engine.app.scaffold import init_workspace

ROOT = Path(__file__).resolve().parents[2]
AS_OF = "2026-11-23"


def test_the_tour_runs_with_data_from_an_env_variable_and_the_home_folder(tmp_path):
    workspace, home, exports = tmp_path / "my-programme", tmp_path / "home", tmp_path / "crm-exports"
    init_workspace(workspace)
    exports.mkdir()
    (home / "exports").mkdir(parents=True)
    shutil.move(workspace / "data" / "customers.csv", exports / "customers.csv")
    shutil.move(workspace / "data" / "orders.csv", home / "exports" / "orders.csv")
    settings = workspace / "loyalty.yaml"
    text = settings.read_text(encoding="utf-8")
    assert "customers: {path: data/customers.csv}" in text and "orders:" in text
    text = text.replace("customers: {path: data/customers.csv}", "customers: {path: \"${CRM_EXPORTS}/customers.csv\"}")
    text = text.replace("{path: data/orders.csv}", "{path: ~/exports/orders.csv}")
    settings.write_text(text, encoding="utf-8")
    env = {"CRM_EXPORTS": str(exports), "HOME": str(home)}

    def loyalty(*args: str, env: dict = env):
        """`loyalty ARGS` in the workspace folder with ``env`` (in-process; see the run below)."""
        with contextlib.chdir(workspace):
            return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    def loyalty_process(*args: str) -> subprocess.CompletedProcess:
        """`loyalty ARGS` as a process of its own, in the workspace folder, with ``env``."""
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=workspace, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)

    for args in (["validate"], ["preview", "--as-of", AS_OF], ["preview", "--as-of", AS_OF, "--customer", "C002"],
                 ["test"]):
        result = loyalty(*args)
        assert result.exit_code == 0, (args, result.output)
    ran = loyalty_process("run", "--as-of", AS_OF, "--no-deliver")    # the run: a real process
    assert ran.returncode == 0, (ran.stdout, ran.stderr)
    for args in (["history", "--customer", "C002"], ["report", "--to", AS_OF], ["points", "--as-of", AS_OF]):
        result = loyalty(*args)
        assert result.exit_code == 0, (args, result.output)
    assert "C002" in loyalty("preview", "--as-of", AS_OF, "--customer", "C002").stdout
    assert not (workspace / "data" / "customers.csv").exists()      # nothing was copied back in
    missing = loyalty("validate", env={**env, "CRM_EXPORTS": None})  # the variable unset
    assert missing.exit_code == 1
    assert "loyalty.yaml:" in missing.stdout and "CRM_EXPORTS" in missing.stdout


def test_init_keeps_data_out_of_git(tmp_path):
    workspace = tmp_path / "ws"
    init_workspace(workspace)
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    ignored = subprocess.run(["git", "-C", str(workspace), "check-ignore", "data/customers.csv", "rules/programme.yaml"],
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["data/customers.csv"]
