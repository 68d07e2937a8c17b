"""Loading a workspace: loyalty.yaml, rules/*.yaml and templates/, validated as a whole."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from engine.config.model import LoadedWorkspace, Settings
from engine.config.program import ProgramBuilder
from engine.config.rulefiles import load_yaml
from engine.config.schema import validate_document
from engine.config.settings import build_settings
from engine.errors import Problem, RuleError

SETTINGS_FILE = "loyalty.yaml"


@dataclass
class ValidationResult:
    """Every problem found in a workspace, and the workspace when there was none."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    workspace: LoadedWorkspace | None = None
    files: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors


def rule_files(root: Path) -> list[Path]:
    rules = root / "rules"
    if not rules.is_dir():
        return []
    return sorted([*rules.glob("*.yaml"), *rules.glob("*.yml")])


def _stays_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symbolic link followed, is a file of the workspace ``root``
    (already resolved): a link to a file elsewhere would be read, and quoted in errors."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a loop of links: reading it reports "cannot read file"
        return True


def _outside_problem(display: str, folder: str) -> Problem:
    """A rule file or template linking outside the workspace: named, never read or quoted."""
    return Problem(display, 1, 1, "this file is a link to a file outside the workspace; it was not read",
                   f"copy the file into {folder} instead of linking to it")


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_rules(root: Path | str) -> ValidationResult:
    """Schema and semantic checks of loyalty.yaml and every rule file (templates are checked
    on top of this by ``app.validation``); never raises for rule problems.

    Every file is checked even when another one is broken, so that one validation
    reports everything; the problems come sorted by file, line and column.
    """
    root = Path(root).resolve()
    result = ValidationResult(root)
    try:
        _validate(root, result)
    finally:
        result.problems.sort(key=lambda p: (p.file, p.line, p.column))
    if not result.ok:
        result.workspace = None
    return result


def _validate(root: Path, result: ValidationResult) -> None:
    settings_path = root / SETTINGS_FILE
    hashes: dict[str, str] = {}
    settings = None
    if not settings_path.is_file():
        result.problems.append(Problem(SETTINGS_FILE, 1, 1, f"no {SETTINGS_FILE} in {root}",
                                       "run `loyalty init DIR` to create a workspace, or pass its folder"))
    else:
        hashes[SETTINGS_FILE] = _hash(settings_path)
        settings = _load_settings(settings_path, root, result)
    documents = _load_rule_files(root, result, hashes)
    templates_dir = root / "templates"
    template_hashes = _template_hashes(root, templates_dir, result)
    if settings is None:
        return
    builder = ProgramBuilder(settings, templates_dir)
    for data, smap in documents:
        if smap is None:
            builder.add_broken_file(data)
        else:
            builder.add_file(data, smap)
    # semantic checks of the files that did load help even when another file is broken
    program = builder.build()
    result.problems.extend(builder.problems)
    if program is None or not result.ok:
        return
    hashes.update(template_hashes)
    if program.points is not None:        # points: value is what a point costs everywhere
        settings = replace(settings, point_value=program.points.value)
    workspace = LoadedWorkspace(root=root, settings=settings, program=program,
                          rule_hashes=MappingProxyType(hashes), templates_dir=templates_dir)
    result.workspace = workspace


def _template_hashes(root: Path, templates_dir: Path, result: ValidationResult) -> dict[str, str]:
    """The hash of every template, part of the rules' version; a template linking outside
    the workspace is a problem and is not read."""
    hashes = {}
    for template in sorted(templates_dir.glob("*.j2")) if templates_dir.is_dir() else []:
        display = template.relative_to(root).as_posix()
        if not _stays_inside(template, root):
            result.problems.append(_outside_problem(display, "templates/"))
        elif template.is_file():
            hashes[display] = _hash(template)
    return hashes


def _load_settings(path: Path, root: Path, result: ValidationResult) -> Settings | None:
    """loyalty.yaml: YAML, schema, then semantic checks; None when any of them failed."""
    result.files.append(SETTINGS_FILE)
    data, smap, problems = load_yaml(path, SETTINGS_FILE)
    result.problems.extend(problems)
    if data is None or problems:
        return None
    if not isinstance(data, dict):
        result.problems.append(smap.problem((), f"{SETTINGS_FILE} must be a mapping of program:, data: ...",
                                            "start from the file `loyalty init DIR` writes"))
        return None
    schema_problems = validate_document("loyalty", data, smap)
    result.problems.extend(schema_problems)
    if schema_problems:
        return None
    settings, problems = build_settings(data, smap, root)
    result.problems.extend(problems)
    return None if problems else settings


def _load_rule_files(root: Path, result: ValidationResult, hashes: dict[str, str]) -> list[tuple]:
    """Every rule file loaded and schema-checked: (data, source map), the map None when it has problems."""
    files = rule_files(root)
    if not files:
        result.problems.append(Problem("rules", 1, 1, "no rule files in rules/",
                                       "add rules/*.yaml with segments and campaigns"))
        return []
    documents = []
    for path in files:
        display = path.relative_to(root).as_posix()
        result.files.append(display)
        if not _stays_inside(path, root):
            result.problems.append(_outside_problem(display, "rules/"))
            continue
        hashes[display] = _hash(path)
        data, smap, problems = load_yaml(path, display)
        result.problems.extend(problems)
        if data is None:
            continue
        if not isinstance(data, dict):
            result.problems.append(smap.problem((), "a rule file must be a mapping of segments:, campaigns: ...",
                                                "start the file with a key such as `campaigns:`"))
            continue
        schema_problems = validate_document("rules", data, smap)
        result.problems.extend(schema_problems)
        documents.append((data, None if problems or schema_problems else smap))
    return documents


def load_rules(root: Path | str) -> LoadedWorkspace:
    """Load a workspace whose rules were checked already (a worker process's copy);
    raise RuleError with every problem when it is wrong."""
    result = check_rules(root)
    if not result.ok:
        raise RuleError(result.errors)
    return result.workspace


def rule_version(workspace: LoadedWorkspace) -> str:
    """One short hash over every rule file, loyalty.yaml and template: the rules' version."""
    digest = hashlib.sha256()
    for name, value in sorted(workspace.rule_hashes.items()):
        digest.update(f"{name}:{value}\n".encode())
    return digest.hexdigest()[:12]
