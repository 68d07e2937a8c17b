"""Terminal tables read cleanly (issue 19, presentation)."""

from __future__ import annotations

import io

from rich.console import Console

from engine.app import report_text
from engine.app.preview import CampaignPreview, Preview
from engine.app.simulation import CampaignForecast, Simulation, format_text
from engine.decide.evaluation import STAGES


def test_simulate_columns_never_run_into_each_other():
    long_id = "a_campaign_with_a_very_long_identifier_indeed"
    sim = Simulation(workspace="ws", start="2026-12-01", end="2026-12-31", every="1d", steps=["x"] * 31,
                     campaigns=[CampaignForecast(long_id, "长", offers=1234, cost=98765.5, points=123456,
                                                 budget_bound_runs=17, lost_to_budget=370),
                                CampaignForecast("vip", "VIP", offers=3, cost=1.0)],
                     weeks=[], budget_binding=[], top_customers=[])
    lines = format_text(sim).splitlines()
    header = next(line for line in lines if line.startswith("campaign"))
    row = next(line for line in lines if line.startswith(long_id))
    assert row.endswith("17 runs (-370)") and "123,456  17 runs (-370)" in row
    vip = next(line for line in lines if line.startswith("vip "))
    assert vip.index("3") > len(long_id)          # the numbers stand in their columns, right-aligned
    assert header.index("offers") + len("offers") == row.index("1234") + len("1234")


def test_funnel_table_has_no_empty_second_line_when_the_name_is_the_id():
    funnel = {stage: 1 for stage in STAGES}
    preview = Preview("2026-12-25", 10, [CampaignPreview("vip", "vip", "sms", funnel, 1, 2.0),
                                         CampaignPreview("winback", "沉睡客唤醒", "sms", funnel, 1, 2.0)])
    buffer = io.StringIO()
    report_text.print_preview(preview, Console(file=buffer, width=200, highlight=False))
    lines = buffer.getvalue().splitlines()
    vip = next(i for i, line in enumerate(lines) if "│ vip " in line)
    assert "│ vip " not in lines[vip + 1] and lines[vip + 1].split("│")[1].strip() != ""   # next row: winback
    winback = next(i for i, line in enumerate(lines) if "winback" in line)
    assert "沉睡客唤醒" in lines[winback + 1]


def test_long_commands_draw_a_progress_bar_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    """`loyalty simulate` in a real pseudo-terminal redraws one line with a bar; piped, it
    prints plain lines (for logs)."""
    import os
    import pty
    import subprocess
    import sys
    from pathlib import Path

    from engine.app.scaffold import init_workspace

    root = tmp_path / "ws"
    init_workspace(root)
    repo = Path(__file__).resolve().parents[2]
    args = [sys.executable, "-m", "cli", "simulate", str(root), "--from", "2026-12-01", "--to", "2026-12-05"]
    env = {**os.environ, "PYTHONPATH": str(repo), "COLUMNS": "120"}
    leader, follower = pty.openpty()
    process = subprocess.Popen(args, cwd=repo, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:          # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert process.wait(timeout=120) == 0
    text = seen.decode("utf-8", "replace")
    assert "████████████████████████ ws: simulated run 5/5" in text and "\r" in text
    piped = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0
    assert "ws: simulated run 1/5 (2026-12-01)\n" in piped.stderr and "█" not in piped.stderr


def test_explanations_show_amounts_without_floating_point_noise(tmp_path):
    """`monetary_365d=500.4`, not 500.40000000000003 (issue 19)."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from cli import main
    from engine.app.scaffold import init_workspace
    from engine.messages.offers import explained_value

    noisy = float(np.sum([320.1, 180.3]))
    assert repr(noisy) != "500.4"                        # the sum really is noisy in binary
    assert explained_value(noisy) == 500.4 and explained_value(np.float64(0.1) + 0.2) == 0.3
    root = tmp_path / "ws"
    init_workspace(root)
    orders = root / "data" / "orders.csv"
    text = orders.read_text(encoding="utf-8").replace(",320.00", ",320.1").replace(",180.50", ",180.3")
    orders.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["preview", str(root), "--as-of", "2026-11-23", "--customer", "C001",
                                       "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["explanation"]["features"]["monetary_365d"] == 500.4
    assert CliRunner().invoke(main, ["run", str(root), "--as-of", "2026-11-23", "--no-deliver"]).exit_code == 0
    history = CliRunner().invoke(main, ["history", str(root), "--customer", "C001"]).output
    assert "monetary_365d=500.4," in history and "500.400000" not in history
