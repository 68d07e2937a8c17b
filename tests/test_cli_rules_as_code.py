"""End to end: `loyalty test`, `loyalty simulate`, `loyalty preview --trace` and the
template checks of `loyalty validate`, run as a marketer or a CI job would."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cli import main
from engine import Workspace
from engine.data.sampledata import copy_example_programme, write_sample_workspace

AS_OF = "2026-11-23T10:00:00+08:00"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """The `loyalty init` tutorial workspace, with its golden test file."""
    result = invoke("init", tmp_path / "ws")
    assert result.exit_code == 0, result.output
    return tmp_path / "ws"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example programme on 200 sample customers, with the golden files it ships."""
    root = tmp_path_factory.mktemp("cli-example") / "ws"
    write_sample_workspace(root, customers=200)
    copy_example_programme(root)
    return root


# --------------------------------------------------------------------------- loyalty test


def test_the_init_workspace_golden_tests_pass(workspace):
    assert (workspace / "tests" / "programme.yaml").is_file()
    result = invoke("test", workspace)
    assert result.exit_code == 0, result.output
    assert "6 passed, 0 failed (1 file(s))" in result.output


def test_a_rule_change_that_breaks_a_golden_test_fails_ci(workspace):
    rules = workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("inactive_for: 60d", "inactive_for: 120d"),
                     encoding="utf-8")
    result = invoke("test", workspace)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "FAIL tests/programme.yaml:13: customer T1: expected offer winback, got no offer" in lines
    assert "    winback: stopped at trigger [stage: trigger]" in lines
    assert "      when: inactive_for {days: 120}; days_since_last_order = 90" in lines
    assert any(line.startswith("FAIL tests/programme.yaml:20: customer T2") for line in lines)
    # T3 and T4 expected the win-back to be stopped at consent / cooldown: now the trigger decides
    assert any("customer T3: expected winback to be stopped at consent, but it stopped at trigger" in line
               for line in lines), result.output
    assert lines[-1] == "2 passed, 4 failed (1 file(s))."


def test_golden_results_as_json_for_ci_tools(workspace):
    rules = workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("monetary_365d / 100", "monetary_365d / 50"),
                     encoding="utf-8")
    result = invoke("test", workspace, "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["passed"] == 5 and report["files"] == ["tests/programme.yaml"]
    [failure] = report["failed"]
    assert (failure["file"], failure["line"]) == ("tests/programme.yaml", 40)
    assert failure["message"] == "customer T5: expected vip_thanks to credit 56 points, got 112"
    assert "vip_thanks: offer [stage: offers]" in failure["trace"]


def test_one_golden_file_can_be_run_on_its_own(workspace, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("as_of: 2026-12-25T10:00:00+08:00\ncustomers:\n  - id: X1\n"
                     "    orders: [{days_ago: 3, amount: 50}]\n    expect: {offer: winback}\n", encoding="utf-8")
    result = invoke("test", workspace, extra)
    assert result.exit_code == 1
    assert f"FAIL {extra}:5: customer X1: expected offer winback, got no offer" in result.output
    assert "0 passed, 1 failed (1 file(s))." in result.output
    assert invoke("test", workspace, workspace / "tests" / "programme.yaml").exit_code == 0


def test_a_broken_golden_file_is_reported_at_its_line(workspace):
    (workspace / "tests" / "broken.yaml").write_text(
        "as_of: 2026-12-25\ncustomers:\n  - id: X1\n    expect: {ofer: winback}\n", encoding="utf-8")
    result = invoke("test", workspace)
    assert result.exit_code == 1
    assert "FAIL tests/broken.yaml:4: customers.0.expect: Additional properties are not allowed " \
           "('ofer' was unexpected)" in result.output


def test_a_workspace_without_golden_tests(workspace):
    shutil.rmtree(workspace / "tests")
    result = invoke("test", workspace)
    assert result.exit_code == 0
    assert "No golden tests found" in result.output
    missing = invoke("test", workspace, workspace / "nope.yaml")
    assert missing.exit_code == 1 and "no golden test file or folder" in missing.output


def test_init_example_ships_golden_tests_that_pass(example_programme):
    """`loyalty init --example` (the session's ``example_programme``, conftest.py) ships the
    example programme's golden files, and `loyalty test` passes all 84 of them."""
    assert (example_programme / "tests" / "winback.yaml").is_file()
    check = invoke("test", example_programme)
    assert check.exit_code == 0, check.output
    assert "84 passed, 0 failed (11 file(s))." in check.output


# --------------------------------------------------------------------------- templates


def test_validate_names_the_template_line_of_a_typo(workspace):
    template = workspace / "templates" / "winback.sms.en-US.j2"
    template.write_text("Hi {{ customer.name }},\nwe miss you! Code {{ reward.coed }}.\n", encoding="utf-8")
    result = invoke("validate", workspace)
    assert result.exit_code == 1
    assert ("templates/winback.sms.en-US.j2:2:1: reward has no field 'coed' (did you mean 'code'?)"
            in result.output), result.output


# --------------------------------------------------------------------------- loyalty simulate


def test_simulate_prints_the_forecast_and_writes_nothing(example):
    result = invoke("simulate", example, "--from", "2026-11-23T10:00", "--to", "2026-12-06")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Simulated 14 runs from 2026-11-23T10:00:00+08:00" in out
    assert "from scratch" in out and "the state database was not changed" in out
    assert "winback_at_risk" in out and "2026-W49" in out and "Contacted most:" in out
    assert not (example / "state").exists()


def test_simulate_json_and_csv(example):
    as_json = invoke("simulate", example, "--from", "2026-11-23T10:00", "--to", "2026-11-29", "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert len(data["steps"]) == 7 and data["total_offers"] == sum(c["offers"] for c in data["campaigns"])
    assert {"id", "offers", "cost", "discount_value", "points", "points_value", "budget_bound_runs"} <= \
        set(data["campaigns"][0])
    as_csv = invoke("simulate", example, "--from", "2026-11-23T10:00", "--to", "2026-11-29", "--format", "csv")
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows and set(rows[0]) == {"week", "campaign", "offers", "cost", "discount_value", "points",
                                     "points_value"}
    assert sum(int(r["offers"]) for r in rows) == data["total_offers"]
    assert not any(v.startswith(("=", "+", "@")) for r in rows for v in r.values())


def test_simulate_diff_compares_two_versions_of_the_rules(example, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(example, other)
    rules = other / "rules" / "campaigns_lifecycle.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("segment: new\n", "segment: new\n    where: false\n"),
                     encoding="utf-8")
    result = invoke("simulate", example, "--from", "2026-11-23T10:00", "--to", "2026-11-26", "--diff", other,
                    "--format", "json")
    assert result.exit_code == 0, result.output
    row = next(d for d in json.loads(result.stdout)["diff"] if d["campaign"] == "welcome_pack")
    # before: the other rules (welcome pack switched off), after: the workspace's own
    assert row["offers_before"] == 0 and row["offers_after"] > 0
    assert row["offers_change"] == row["offers_after"]


def test_simulate_continues_from_the_recorded_runs_and_leaves_the_state_alone(workspace):
    run = invoke("run", workspace, "--as-of", "2026-12-25T10:00:00+08:00")
    assert run.exit_code == 0, run.output
    state = workspace / "state" / "loyalty.db"
    before = (state.read_bytes(), state.stat().st_mtime_ns)
    result = invoke("simulate", workspace, "--from", "2026-12-26T10:00", "--to", "2026-12-31")
    assert result.exit_code == 0, result.output
    assert "Continued from 1 recorded run(s), the last at 2026-12-25T10:00:00+08:00; " \
           "the state database was not changed." in result.output
    assert (state.read_bytes(), state.stat().st_mtime_ns) == before
    fresh = invoke("simulate", workspace, "--from", "2026-12-26T10:00", "--to", "2026-12-31", "--fresh")
    assert fresh.exit_code == 0 and "Started from scratch" in fresh.output
    assert (state.read_bytes(), state.stat().st_mtime_ns) == before


@pytest.mark.parametrize("args, words", [
    (["--from", "2026-11-23", "--to", "2026-11-30", "--every", "daily"], "is not a step"),
    (["--from", "2026-11-30", "--to", "2026-11-23"], "is before --from"),
])
def test_simulate_bad_ranges_are_clear_errors(workspace, args, words):
    result = invoke("simulate", workspace, *args)
    assert result.exit_code == 1 and words in result.output, result.output


# --------------------------------------------------------------------------- preview --trace


@pytest.mark.parametrize("name", ["trace.parquet", "trace.csv"])
def test_preview_trace_writes_one_row_per_customer_and_campaign(example, tmp_path, name):
    path = tmp_path / name
    result = invoke("preview", example, "--as-of", AS_OF, "--trace", path)
    assert result.exit_code == 0, result.output
    campaigns = len(Workspace(example).load().program.campaigns)      # the example's, and its points notice
    assert campaigns == 21
    assert f"decision trace: {200 * campaigns} rows written to {path}" in result.stderr
    trace = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path, dtype={"customer_id": str})
    assert len(trace) == 200 * campaigns and trace["customer_id"].nunique() == 200
    shanghai = trace[(trace["city"] == "上海") & (trace["campaign"] == "winback_at_risk")]
    assert len(shanghai) and set(shanghai["stage"]) <= {"segment", "trigger", "consent", "frequency_cap",
                                                         "cooldown", "holdout", "arbitration", "budget", "offers"}
    assert not (example / "state").exists()
