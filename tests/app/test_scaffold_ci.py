"""CI out of the box (issue 19): the workflow, pre-commit hooks and editor schemas that
`loyalty init` and `loyalty init --example` write, checked by running their own commands.

The `loyalty …` lines are taken from the generated files themselves and run with this checkout's
cli.py in a fresh workspace, so the files cannot drift from what the CLI accepts. They run
in-process (click's test runner, in the workspace folder); tests/test_cli.py and
tests/app/test_data_outside.py run the command as a process of its own from other folders.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from cli import main
from engine.app.scaffold import MODELINE_PREFIX
from engine.resources import schemas_dir

WORKFLOW = ".github/workflows/loyalty.yml"
PRE_COMMIT = ".pre-commit-config.yaml"
NEW_FILES = [WORKFLOW, PRE_COMMIT, ".vscode/settings.json", ".vscode/extensions.json",
             "schemas/rules.schema.json", "schemas/loyalty.schema.json"]
# (workspace, rule file, a line of it, the same line with a typo in a feature name)
TYPOS = {
    "init": ("rules/programme.yaml", "monetary_365d >= 5000 and orders_365d >= 3",
             "monetary_365d >= 5000 and order_365d >= 3"),
    "example": ("rules/segments.yaml", "where: days_since_signup <= 30", "where: days_since_sigup <= 30"),
}


def _init(root: Path, *options: str) -> Path:
    result = CliRunner().invoke(main, ["init", str(root), *options], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, example_programme) -> dict[str, Path]:
    """One workspace made by `loyalty init`, one by `loyalty init --example` (the session's
    ``example_programme``, conftest.py). Read-only: ``copy_of`` one to break it."""
    base = tmp_path_factory.mktemp("scaffold_ci")
    return {"init": _init(base / "init"), "example": example_programme}


def copy_of(fresh: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    """A private copy of a fresh workspace, for a test that breaks it."""
    return Path(shutil.copytree(fresh[kind], tmp_path / kind))


def loyalty_commands(script: str) -> list[list[str]]:
    """The lines of a `run:` script or an `entry:` that call `loyalty`, split as a shell would."""
    commands = []
    for line in script.splitlines():
        words = shlex.split(line)
        if words and words[0] == "loyalty":
            commands.append(words)
    return commands


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_loyalty(words: list[str], cwd: Path) -> Ran:
    """Run `loyalty …` as CI would, with this checkout's cli.py, in the workspace folder."""
    with contextlib.chdir(cwd):
        result = CliRunner().invoke(main, words[1:])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ran(result.exit_code, result.stdout, result.stderr)


def workflow(root: Path) -> dict:
    return yaml.safe_load((root / WORKFLOW).read_text(encoding="utf-8"))


def workflow_commands(root: Path) -> list[list[str]]:
    steps = [step for job in workflow(root)["jobs"].values() for step in job["steps"]]
    return [words for step in steps if "run" in step for words in loyalty_commands(step["run"])]


def hooks(root: Path) -> list[dict]:
    config = yaml.safe_load((root / PRE_COMMIT).read_text(encoding="utf-8"))
    return [hook for repo in config["repos"] for hook in repo["hooks"]]


@pytest.fixture(scope="module")
def ran(fresh) -> dict[tuple[str, tuple[str, ...]], Ran]:
    """Each distinct `loyalty …` line of a fresh workspace's workflow steps and pre-commit
    entries, run once in that workspace: {(kind, words): result}. (The workflow and the hooks
    both run `loyalty test`; neither command changes the workspace.)"""
    results = {}
    for kind, root in fresh.items():
        lines = workflow_commands(root) + [words for hook in hooks(root) for words in loyalty_commands(hook["entry"])]
        for words in lines:
            if (kind, tuple(words)) not in results:
                results[kind, tuple(words)] = run_loyalty(words, root)
    return results


def break_rule(root: Path, kind: str) -> tuple[str, int]:
    """Put a typo in a rule file; return the file and the line of the typo."""
    name, old, new = TYPOS[kind]
    path = root / name
    text = path.read_text(encoding="utf-8")
    assert old in text
    text = text.replace(old, new, 1)
    path.write_text(text, encoding="utf-8")
    return name, text[: text.index(new)].count("\n") + 1


# --------------------------------------------------------------------------- what init writes


def test_init_prints_the_new_files(tmp_path):
    result = CliRunner().invoke(main, ["init", str(tmp_path / "ws")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    listed = {line.strip() for line in result.output.splitlines()}
    assert set(NEW_FILES) | {".gitignore", "rules/programme.yaml"} <= listed


@pytest.mark.parametrize("kind", ["init", "example"])
def test_both_kinds_of_workspace_get_ci_and_editor_files(fresh, kind):
    missing = [name for name in NEW_FILES if not (fresh[kind] / name).is_file()]
    assert not missing


@pytest.mark.skipif(not shutil.which("git"), reason="git is not installed")
def test_gitignore_keeps_the_new_files_and_still_ignores_what_runs_produce(tmp_path):
    root = _init(tmp_path / "ws")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)

    def ignored(name: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", name], cwd=root).returncode == 0

    assert not [name for name in NEW_FILES if ignored(name)]
    assert all(ignored(name) for name in ("state/loyalty.db", "outbox/sms.jsonl", ".loyalty/partitioned/x"))


# --------------------------------------------------------------------------- the GitHub workflow


def test_workflow_runs_on_push_and_pull_request_and_says_how_to_install(fresh):
    text = (fresh["init"] / WORKFLOW).read_text(encoding="utf-8")
    flow = workflow(fresh["init"])
    triggers = flow.get("on", flow.get(True))          # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = flow["jobs"].values()
    uses = [step.get("uses", "") for step in job["steps"]]
    assert any(u.startswith("actions/checkout@") for u in uses)
    assert any(u.startswith("actions/setup-python@") for u in uses)
    install = next(step["run"] for step in job["steps"] if "pip install" in step.get("run", ""))
    assert '"$LOYALTY_PACKAGE"' in install and "exit 1" in install
    assert flow["env"]["LOYALTY_PACKAGE"] == "${{ vars.LOYALTY_PACKAGE }}"
    assert "loyalty @ git+https://" in text            # the example in the comment
    assert workflow_commands(fresh["init"]) == [["loyalty", "validate", "--format", "github"],
                                                ["loyalty", "test"]]


@pytest.mark.parametrize("kind", ["init", "example"])
def test_workflow_steps_pass_on_a_fresh_workspace(fresh, ran, kind):
    for words in workflow_commands(fresh[kind]):
        result = ran[kind, tuple(words)]
        assert result.returncode == 0, (words, result.stdout, result.stderr)


@pytest.mark.parametrize("kind", ["init", "example"])
def test_workflow_validate_step_annotates_the_broken_line(fresh, kind, tmp_path):
    root = copy_of(fresh, kind, tmp_path)
    name, line = break_rule(root, kind)
    (validate,) = [words for words in workflow_commands(root) if words[1] == "validate"]
    result = run_loyalty(validate, root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(rf"^::error file={re.escape(name)},line={line},col=\d+::unknown feature",
                     result.stdout, re.M), result.stdout


# --------------------------------------------------------------------------- pre-commit


def test_pre_commit_hooks_are_local_and_watch_the_rules(fresh):
    config = yaml.safe_load((fresh["init"] / PRE_COMMIT).read_text(encoding="utf-8"))
    assert [repo["repo"] for repo in config["repos"]] == ["local"]
    by_id = {hook["id"]: hook for hook in hooks(fresh["init"])}
    assert set(by_id) == {"loyalty-validate", "loyalty-test"}
    for hook in by_id.values():
        assert hook["language"] == "system" and hook["pass_filenames"] is False
        watched = re.compile(hook["files"])
        for changed in ("loyalty.yaml", "rules/programme.yaml", "rules/extra.yml",
                        "templates/winback.sms.zh-CN.j2"):
            assert watched.search(changed), (hook["id"], changed)
        for unrelated in ("data/orders.csv", "README.md", "state/loyalty.db", "old/loyalty.yaml"):
            assert not watched.search(unrelated), (hook["id"], unrelated)
    assert re.search(by_id["loyalty-test"]["files"], "tests/programme.yaml")


@pytest.mark.parametrize("kind", ["init", "example"])
def test_pre_commit_entries_pass_on_a_fresh_workspace(fresh, ran, kind):
    for hook in hooks(fresh[kind]):
        (words,) = loyalty_commands(hook["entry"])
        result = ran[kind, tuple(words)]
        assert result.returncode == 0, (hook["id"], result.stdout, result.stderr)


def test_pre_commit_validate_hook_stops_a_broken_rule(fresh, tmp_path):
    root = copy_of(fresh, "init", tmp_path)
    name, line = break_rule(root, "init")
    (hook,) = [hook for hook in hooks(root) if hook["id"] == "loyalty-validate"]
    result = run_loyalty(loyalty_commands(hook["entry"])[0], root)
    assert result.returncode == 1
    assert f"{name}:{line}:" in result.stdout


# --------------------------------------------------------------------------- editor support


def schema_files(root: Path) -> list[Path]:
    return [root / "loyalty.yaml", *sorted((root / "rules").glob("*.yaml"))]


@pytest.mark.parametrize("kind", ["init", "example"])
def test_every_settings_and_rule_file_names_the_copied_schema(fresh, kind):
    """The first line points, relative to the file's folder, at a copy of the bundled schema;
    the schema accepts the file as an editor would check it."""
    for path in schema_files(fresh[kind]):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(MODELINE_PREFIX), path
        schema = (path.parent / first[len(MODELINE_PREFIX):]).resolve()
        assert schema.is_file(), (path, schema)
        assert schema.parent == (fresh[kind] / "schemas").resolve()
        assert schema.read_bytes() == (schemas_dir() / schema.name).read_bytes()
        expected = "loyalty.schema.json" if path.name == "loyalty.yaml" else "rules.schema.json"
        assert schema.name == expected
        validator = jsonschema.Draft202012Validator(json.loads(schema.read_text(encoding="utf-8")))
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8")))]
        assert errors == [], path


def test_vscode_settings_map_the_copied_schemas_to_the_files(fresh):
    root = fresh["example"]
    settings = json.loads((root / ".vscode/settings.json").read_text(encoding="utf-8"))
    covered = set()
    for schema, globs in settings["yaml.schemas"].items():
        assert (root / schema).is_file(), schema
        covered |= {p.relative_to(root).as_posix() for p in schema_files(root)
                    if any(fnmatch(p.relative_to(root).as_posix(), g) for g in globs)}
    assert covered == {p.relative_to(root).as_posix() for p in schema_files(root)}
    recommended = json.loads((root / ".vscode/extensions.json").read_text(encoding="utf-8"))
    assert "redhat.vscode-yaml" in recommended["recommendations"]
