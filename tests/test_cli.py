"""End-to-end: the real `loyalty` commands on real files in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import csv_safe, main

ROOT = Path(__file__).resolve().parents[1]
AS_OF = "2026-12-25T10:00:00+08:00"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_init_workspace_validates_clean(workspace):
    result = invoke("validate", str(workspace))
    assert result.exit_code == 0, result.output
    assert "OK: 2 files, 2 campaigns" in result.output


@pytest.mark.skipif(not shutil.which("git"), reason="git is not installed")
def test_what_a_run_writes_stays_out_of_git(workspace):
    """A marketer keeps the workspace in git: rules and templates are tracked, while the
    state database, the file outbox and the partitioned data copy are ignored."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    assert invoke("run", str(workspace), "--as-of", AS_OF, "--partitions", "2",
                  "--now", AS_OF).exit_code in (0, 3)
    assert invoke("data", "convert", str(workspace), "--partitions", "2").exit_code == 0
    produced = {p.relative_to(workspace).parts[0] for p in workspace.rglob("*")
                if p.is_file() and ".git" not in p.relative_to(workspace).parts}
    assert {"state", "outbox", ".loyalty"} <= produced
    untracked = git("status", "--porcelain", "--untracked-files=all")
    listed = {line[3:].split("/")[0] for line in untracked.splitlines()}
    assert "rules" in listed and "loyalty.yaml" in listed
    assert not listed & {"state", "outbox", ".loyalty"}, untracked


def _closed_port() -> int:
    import socket
    with socket.socket() as probe:        # bound then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_failed_deliveries_are_summarised_per_channel_and_error_then_retried(workspace):
    """Unreachable servers: one line per channel and error says how many offers failed (the
    webhook, after its retries) or were deferred (the mail server is down: the rest of its batch
    waits, pending), not one line per offer; `deliver` retries them."""
    settings = workspace / "loyalty.yaml"
    port = _closed_port()
    settings.write_text(settings.read_text(encoding="utf-8").replace(
        "email: {send: file, path: outbox/email.jsonl}",
        f"email: {{send: smtp, host: 127.0.0.1, port: {port}, sender: rewards@example.com}}").replace(
        "sms:   {send: file, path: outbox/sms.jsonl}",
        f"sms: {{send: webhook, url: 'http://127.0.0.1:{port}/sms', retries: 0}}"), encoding="utf-8")
    run = invoke("run", str(workspace), "--as-of", AS_OF, "--now", AS_OF)
    assert run.exit_code == 3, run.output
    failed = json.loads(invoke("runs", str(workspace), "--format", "json").output)
    assert failed, "the run was recorded"
    retry = CliRunner().invoke(main, ["deliver", str(workspace), "--now", AS_OF])
    assert retry.exit_code == 3
    lines = [line for line in retry.output.splitlines() if line.startswith("delivery failed:")]
    assert len(lines) == 1, retry.output          # one per channel and error
    sms = lines[0]
    assert "on sms failed" in sms and sms.startswith("delivery failed: 2 offer(s)") and sms.count("of_") == 2, sms
    deferred = [line for line in retry.output.splitlines() if line.startswith("delivery deferred:")]
    assert len(deferred) == 1 and "on email left pending" in deferred[0], retry.output
    assert f"127.0.0.1:{port}" in deferred[0]


def test_init_refuses_a_non_empty_folder(workspace):
    result = invoke("init", str(workspace))
    assert result.exit_code == 1
    assert "not empty" in result.output


def test_validate_reports_file_line_column_and_exit_1(workspace):
    rules = workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace(
        "monetary_365d >= 5000 and orders_365d >= 3", "monetary_365d >= 5000 and order_365d >= 3"), encoding="utf-8")
    result = invoke("validate", str(workspace))
    assert result.exit_code == 1
    assert "rules/programme.yaml:7:" in result.output
    assert "order_365d" in result.output and "orders_365d" in result.output
    as_json = json.loads(invoke("validate", str(workspace), "--format", "json").output)
    assert as_json[0]["file"] == "rules/programme.yaml" and as_json[0]["line"] == 7
    github = invoke("validate", str(workspace), "--format", "github").output
    assert github.startswith("::error file=rules/programme.yaml,line=7,col=")


def test_preview_json_contract(workspace):
    result = invoke("preview", str(workspace), "--as-of", AS_OF, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    by_id = {c["id"]: c for c in data["campaigns"]}
    assert set(by_id) == {"winback", "vip_thanks"}
    assert list(by_id["winback"]["funnel"]) == ["segment", "trigger", "consent", "frequency_cap", "cooldown",
                                                "holdout", "arbitration", "budget", "offers"]
    # C001 and C004 are 60-180 days without an order and have SMS consent; C003 has no SMS consent
    assert by_id["winback"]["funnel"]["segment"] == 3
    assert by_id["winback"]["offers"] == 2
    # C002 spent 5600 in the last year: the only high-value customer, greeted on 12-25
    assert by_id["vip_thanks"]["offers"] == 1
    assert by_id["vip_thanks"]["samples"][0]["customer_id"] == "C002"


def test_preview_explains_one_customer(workspace):
    result = invoke("preview", str(workspace), "--as-of", AS_OF, "--customer", "C003", "--sample", "0")
    assert result.exit_code == 0, result.output
    assert "stopped at consent" in result.output
    assert "`monetary_365d >= 5000` -> False" in result.output


def test_preview_writes_no_state(workspace):
    invoke("preview", str(workspace), "--as-of", AS_OF)
    assert not (workspace / "state").exists()


def test_preview_diff_counts_added_customers(workspace, tmp_path):
    other = tmp_path / "other"
    invoke("init", str(other))
    rules = other / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("monetary_365d >= 5000 and orders_365d >= 3",
                                                               "monetary_365d >= 300"), encoding="utf-8")
    data = json.loads(invoke("preview", str(workspace), "--as-of", AS_OF, "--diff", str(other),
                             "--format", "json").output)
    vip = next(d for d in data["diff"] if d["campaign"] == "vip_thanks")
    # before: the other rules (a lower bar), after: this workspace's: C001 drops out
    assert vip["after"] == 1 and vip["removed"] >= 1 and "C001" in vip["removed_examples"]
    assert vip["before"] == vip["after"] + vip["removed"] - vip["added"]
    assert vip["cost_change"] == round(vip["cost_after"] - vip["cost_before"], 2) < 0


def test_preview_diff_after_a_recorded_run_compares_against_the_same_history(workspace, tmp_path):
    """Once a programme has run, --diff still works and decides as before the run: a preview
    at the run's own instant re-decides exactly what the run recorded, for both versions."""
    other = tmp_path / "other"
    invoke("init", str(other))
    rules = other / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("monetary_365d >= 5000 and orders_365d >= 3",
                                                               "monetary_365d >= 300"), encoding="utf-8")
    args = ("preview", str(workspace), "--as-of", AS_OF, "--diff", str(other), "--format", "json")
    before_run = json.loads(invoke(*args).output)["diff"]
    assert invoke("run", str(workspace), "--as-of", AS_OF, "--no-deliver").exit_code == 0
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["diff"] == before_run
    vip = next(d for d in before_run if d["campaign"] == "vip_thanks")
    assert vip["after"] == 1 and "C001" in vip["removed_examples"]

def test_run_twice_records_and_sends_once(workspace):
    first = invoke("run", str(workspace), "--as-of", AS_OF, "--now", "2026-12-26T12:00:00+08:00",
                   "--format", "json")
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert data["new_offers"] == 3
    second = json.loads(invoke("run", str(workspace), "--as-of", AS_OF, "--now", "2026-12-26T12:00:00+08:00",
                               "--format", "json").output)
    assert second["new_offers"] == 0 and second["already_recorded"] == 3
    lines = (workspace / "outbox" / "sms.jsonl").read_text(encoding="utf-8").splitlines()
    offers = [json.loads(line) for line in lines]
    assert sorted(o["customer_id"] for o in offers) == ["C001", "C004"]
    for offer in offers:
        for key in ("offer_id", "campaign", "customer_id", "channel", "variant", "reward", "send_at", "body"):
            assert key in offer
        assert offer["reward"]["code"] in offer["body"]
    history = invoke("history", str(workspace), "--customer", "C001")
    assert "winback" in history.output and "days_since_last_order" in history.output


def test_csv_cells_are_safe_from_formula_injection():
    assert csv_safe("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert csv_safe("+1") == "'+1" and csv_safe("-2") == "'-2" and csv_safe("@x") == "'@x"
    assert csv_safe("\tx") == "'\tx" and csv_safe("\rx") == "'\rx"
    assert csv_safe("上海") == "上海"


def test_preview_csv_escapes_campaign_names(workspace):
    rules = workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("name: 沉睡客唤醒", 'name: "=cmd|calc"'),
                     encoding="utf-8")
    out = invoke("preview", str(workspace), "--as-of", AS_OF, "--format", "csv").output
    assert "'=cmd|calc" in out


def test_installed_command_runs_from_any_directory(workspace, tmp_path):
    """`python cli.py` stands in for the console script; it must not depend on the cwd."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "cli", "validate", str(workspace)], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_bad_as_of_is_a_clear_error(workspace):
    result = invoke("preview", str(workspace), "--as-of", "yesterday-ish")
    assert result.exit_code == 1
    assert "is not a date or time" in result.output


def test_init_example_validates_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("init", "programme", "--example", "--customers", "200")
    assert result.exit_code == 0, result.output
    assert "rules/campaigns_lifecycle.yaml" in result.output
    check = invoke("validate", "programme")
    assert check.exit_code == 0, check.output
    assert "campaigns" in check.output


def test_github_annotations_escape_newlines_and_percent():
    from cli import _github_escape
    assert _github_escape("50% off\nnext") == "50%25 off%0Anext"
    assert _github_escape("rules/a:b,c.yaml", True) == "rules/a%3Ab%2Cc.yaml"


def test_caret_lines_up_under_chinese_text(workspace):
    rules = workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace(
        "where: monetary_365d >= 5000 and orders_365d >= 3",
        'where: city == "上海" and order_365d >= 3'), encoding="utf-8")
    out = invoke("validate", str(workspace)).output.splitlines()
    quoted = next(i for i, l in enumerate(out) if l.startswith("    ") and "order_365d" in l)
    prefix = out[quoted][: out[quoted].index("order_365d")]
    wide = sum(1 for c in prefix if c in "上海")
    assert out[quoted + 1].index("^") == len(prefix) + wide
