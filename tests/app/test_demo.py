"""`loyalty demo` at a small size: offline, end to end, ending with a report and an outbox."""

from __future__ import annotations

import json
import mailbox
import re

from click.testing import CliRunner

from cli import main


def test_demo_runs_end_to_end(tmp_path):
    target = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--dir", str(target), "--customers", "400"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Validated" in result.output and "0 new offers" in result.output
    golden = re.search(r"Golden tests .*: (\d+) passed, (\d+) failed", result.output)
    assert golden and int(golden[1]) > 0 and golden[2] == "0", result.output
    assert (target / "tests").is_dir()    # the workspace carries its golden tests for `loyalty test`
    report = target / "report.html"
    assert report.is_file() and "<svg" in report.read_text(encoding="utf-8")
    lines = [json.loads(line) for path in (target / "outbox").glob("*.jsonl")
             for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines, "the file outboxes are empty"
    assert len({o["offer_id"] for o in lines}) == len(lines), "an offer was written twice"
    received = mailbox.Maildir(str(target / "outbox" / "smtp-received"), create=False)
    assert len(received) > 0
    # the report lists variants only for the A/B-tested campaign, once per campaign
    from engine.app.reporting import build_report
    campaigns = build_report(target, end="2026-12-23")["campaigns"]
    assert len({c["id"] for c in campaigns}) == len(campaigns)
    with_variants = {c["id"] for c in campaigns if c["variants"]}
    assert with_variants <= {"winback_at_risk"}
    # the dirty sample rows are reported, not fatal
    assert "invalid timezone" in result.output and "unknown customers" in result.output


def test_demo_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "x.txt").write_text("keep me", encoding="utf-8")
    result = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path), "--customers", "50"])
    assert result.exit_code == 1
    assert "not empty" in result.output
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == "keep me"
