"""Customer data never drives the operator's terminal (issue 18, item 9)."""

from __future__ import annotations

from click.testing import CliRunner

from cli import main
from engine.app.report_text import terminal_text, without_escapes
from engine.app.scaffold import init_workspace

AS_OF = "2026-12-25T10:00:00+08:00"
HOSTILE = "王芳\x1b[2J\x1b]0;pwned\x07\x1b[31m[bold]红[/bold]\x9b1m\x08\r"


def test_escape_sequences_and_control_characters_are_removed():
    assert without_escapes(HOSTILE) == "王芳[bold]红[/bold]"
    assert without_escapes("line one\n\tline two") == "line one\n\tline two"
    assert terminal_text("[red]x[/red]") == "\\[red]x\\[/red]"        # rich prints it as typed


def test_preview_and_history_print_hostile_names_as_plain_text(tmp_path):
    root = tmp_path / "ws"
    init_workspace(root)
    customers = root / "data" / "customers.csv"
    customers.write_text(customers.read_text(encoding="utf-8").replace("王芳", HOSTILE.replace("\r", "")),
                         encoding="utf-8")
    preview = CliRunner().invoke(main, ["preview", str(root), "--as-of", AS_OF, "--sample", "5",
                                        "--customer", "C001"])
    assert preview.exit_code == 0, preview.output
    assert "\x1b" not in preview.output and "\x07" not in preview.output and "\x9b" not in preview.output
    assert "王芳[bold]红[/bold]" in preview.output          # the name itself, markup shown as typed
    run = CliRunner().invoke(main, ["run", str(root), "--as-of", AS_OF, "--no-deliver"])
    assert run.exit_code == 0, run.output
    history = CliRunner().invoke(main, ["history", str(root), "--customer", "C001"])
    assert history.exit_code == 0 and "\x1b" not in history.output
