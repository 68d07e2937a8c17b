"""Hostile or careless templates (issue 18): templates that are links to files outside the
workspace, and templates slow enough to hold up a run.

Reproduced on the `loyalty init --example` workspace with the real command where the symptom is
what a marketer or an operator sees: the exit code, the file:line:col line, what was recorded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from engine.errors import TemplateError
from engine.messages import rendering
from engine.messages.rendering import Renderer

AS_OF = "2026-12-25T10:00:00+08:00"
WINBACK = ["templates/winback.sms.zh-CN.j2", "templates/winback.sms.en-US.j2", "templates/winback.sms.en.j2"]
PROGRAM = {"name": "星享会员", "currency": "CNY", "timezone": "Asia/Shanghai"}
SECRET = "Hello {{ SECRET_VAR }} {% if %}\nroot:x:0:0:SECRET-LINE\n"
OUTSIDE = "this file is a link to a file outside the workspace; it was not read"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example programme at its full 2,000 customers: the slow-template run needs dozens
    of win-back messages for its time budget to bind."""
    root = tmp_path_factory.mktemp("example") / "ws"
    result = CliRunner().invoke(main, ["init", str(root), "--example"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture()
def workspace(example, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(example, root, symlinks=True)
    return root


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def slow_loop(seconds: float) -> str:
    """Jinja that prints nothing and takes about ``seconds`` a message, within the sandbox's
    per-message limits (loop steps, text size, 1 s); measured here, since machines differ."""
    def loop(steps: int) -> str:
        return (f"{{% for i in range({steps}) %}}{{% set x = range(300)|list|sort(reverse=true)"
                "|join(',') %}{% endfor %}")

    folder = Path(tempfile.mkdtemp())
    (folder / "probe.sms.en.j2").write_text(loop(200) + "x", encoding="utf-8")
    probe = Renderer(folder, "en", PROGRAM)
    probe.render("probe", "sms", "en", {})
    started = time.perf_counter()
    probe.render("probe", "sms", "en", {})
    per_step = (time.perf_counter() - started) / 200
    shutil.rmtree(folder)
    return loop(max(1, min(4000, round(seconds / per_step))))


def slow_down(root: Path, seconds: float) -> dict[str, str]:
    """Make the winback campaign's templates slow; return their original text."""
    original = {}
    prefix = slow_loop(seconds)
    for file in WINBACK:
        path = root / file
        original[file] = path.read_text(encoding="utf-8")
        path.write_text(prefix + original[file], encoding="utf-8")
    return original


# --------------------------------------------------------------------------- links

def test_a_template_linking_outside_the_workspace_is_refused_unread(workspace, tmp_path):
    outside = tmp_path / "elsewhere" / "secret.j2"
    outside.parent.mkdir()
    outside.write_text(SECRET, encoding="utf-8")
    (workspace / WINBACK[0]).unlink()
    (workspace / WINBACK[0]).symlink_to(outside)
    result = invoke("validate", str(workspace))
    assert result.exit_code == 1
    assert (f"{WINBACK[0]}:1:1: {OUTSIDE} (copy the file into templates/ instead of linking to it)"
            in result.output)
    assert "SECRET" not in result.output
    assert outside.read_text(encoding="utf-8") == SECRET


def test_an_unused_template_linking_outside_is_refused_too(workspace, tmp_path):
    outside = tmp_path / "secret.j2"
    outside.write_text(SECRET, encoding="utf-8")
    (workspace / "templates" / "notes.sms.en.j2").symlink_to(outside)
    result = invoke("validate", str(workspace))
    assert result.exit_code == 1
    assert f"templates/notes.sms.en.j2:1:1: {OUTSIDE}" in result.output


def test_a_template_linking_inside_the_templates_folder_is_allowed(workspace):
    parts = workspace / "templates" / "parts"
    parts.mkdir()
    (workspace / WINBACK[2]).rename(parts / "winback.txt")
    (workspace / WINBACK[2]).symlink_to(Path("parts") / "winback.txt")
    result = invoke("validate", str(workspace))
    assert result.exit_code == 0, result.output


def test_the_renderer_checks_and_renders_no_template_linking_outside_its_folder(tmp_path):
    """Even when a link appears after `validate` (or only the renderer is used)."""
    templates = tmp_path / "templates"
    templates.mkdir()
    outside = tmp_path / "secret.j2"
    outside.write_text(SECRET, encoding="utf-8")
    (templates / "winback.sms.en.j2").symlink_to(outside)
    renderer = Renderer(templates, "en", PROGRAM)
    problems = renderer.check("winback", "sms", "en", {"customer": {}})
    assert [str(p) for p in problems] == [(
        "templates/winback.sms.en.j2:1:1: this template is a link to a file outside the templates "
        "folder; it was not read (copy the file into the templates folder instead of linking to it)")]
    with pytest.raises(TemplateError, match="link to a file outside") as error:
        renderer.render("winback", "sms", "en", {"customer": {}})
    assert "SECRET" not in str(error.value)


# --------------------------------------------------------------------------- slow templates

def test_validate_warns_about_a_slow_template_at_its_file(workspace):
    slow_down(workspace, 0.15)
    result = invoke("validate", str(workspace))
    assert result.exit_code == 0, result.output       # a warning, even for an SMS campaign
    for file in WINBACK:
        assert (f"{file}:1:1: warning: this template is slow: one message takes more than 50 ms "
                "to render (it took ") in result.output


def test_validate_does_not_warn_about_the_example_templates(workspace):
    result = invoke("validate", str(workspace))
    assert result.exit_code == 0 and "slow" not in result.output


def test_a_slow_template_stops_the_run_with_one_error_per_campaign(workspace, monkeypatch):
    """The run's render time is bounded; what was left out is not recorded, so the next run
    (with the template fixed) still makes those offers."""
    preview = invoke("preview", str(workspace), "--as-of", AS_OF, "--format", "json")
    offers = {c["id"]: c["offers"] for c in json.loads(preview.output)["campaigns"]}
    assert offers["winback_at_risk"] > 50
    monkeypatch.setattr(rendering, "MAX_RENDER_SECONDS_PER_RUN", 0.5, raising=False)
    original = slow_down(workspace, 0.1)   # 0.1 s a message: winback alone would take 5 s or more

    started = time.perf_counter()
    first = invoke("run", str(workspace), "--as-of", AS_OF, "--no-deliver", "--format", "json")
    assert first.exit_code == 1
    assert time.perf_counter() - started < 0.1 * offers["winback_at_risk"]
    result = json.loads(first.output)
    errors = result["render_errors"]
    campaigns = [e["campaign"] for e in errors]
    assert len(campaigns) == len(set(campaigns))      # one error per campaign, not one per offer
    winback = next(e for e in errors if e["campaign"] == "winback_at_risk")
    assert 0 < winback["not_rendered"] < offers["winback_at_risk"]
    assert winback["error"].startswith(
        f"campaign 'winback_at_risk': {winback['not_rendered']:,} messages not rendered: rendering "
        "this run's messages took longer than 0.5 s; they are not recorded, so a later run can "
        "still make them")
    assert result["new_offers"] == sum(offers.values()) - sum(e["not_rendered"] for e in errors)

    for file, text in original.items():
        (workspace / file).write_text(text, encoding="utf-8")
    second = invoke("run", str(workspace), "--as-of", AS_OF, "--no-deliver", "--format", "json")
    assert second.exit_code == 0, second.output
    again = json.loads(second.output)
    assert again["render_errors"] == []
    assert again["already_recorded"] == result["new_offers"]
    assert again["new_offers"] == sum(e["not_rendered"] for e in errors)


def test_offers_in_time_are_all_rendered(tmp_path):
    """Below the run's limit nothing is left out, and the time spent is counted."""
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "hi.sms.en.j2").write_text("Hi {{ customer.name }}", encoding="utf-8")
    renderer = Renderer(templates, "en", PROGRAM, max_render_seconds_per_run=60)
    for _ in range(3):
        renderer.render("hi", "sms", "en", {"customer": {"name": "Ann"}})
    assert 0 < renderer.seconds_spent < 60 and not renderer.out_of_time()
    assert Renderer(templates, "en", PROGRAM, max_render_seconds_per_run=0).out_of_time()
