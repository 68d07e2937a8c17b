"""Loading a workspace: loyalty.yaml, rules/*.yaml and templates/, validated as a whole."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .errors import Problem, RuleError
from .model import Workspace
from .program import ProgramBuilder
from .rulefiles import load_yaml
from .schema import validate_document
from .settings import build_settings

SETTINGS_FILE = "loyalty.yaml"


@dataclass
class ValidationResult:
    """Every problem found in a workspace, and the workspace when there was none."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    workspace: Workspace | None = None
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


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def validate_workspace(root: Path | str, *, check_templates: bool = True) -> ValidationResult:
    """Schema and semantic checks of every file; never raises for rule problems."""
    root = Path(root).resolve()
    result = ValidationResult(root)
    settings_path = root / SETTINGS_FILE
    if not settings_path.is_file():
        result.problems.append(Problem(SETTINGS_FILE, 1, 1, f"no {SETTINGS_FILE} in {root}",
                                       "run `loyalty init DIR` to create a workspace, or pass its folder"))
        return result
    data, smap, problems = load_yaml(settings_path, SETTINGS_FILE)
    result.files.append(SETTINGS_FILE)
    result.problems.extend(problems)
    if data is None or problems:
        return result
    schema_problems = validate_document("loyalty", data, smap)
    result.problems.extend(schema_problems)
    if schema_problems:
        return result
    settings, problems = build_settings(data, smap, root)
    result.problems.extend(problems)
    if problems:
        return result

    templates_dir = root / "templates"
    builder = ProgramBuilder(settings, templates_dir)
    files = rule_files(root)
    if not files:
        result.problems.append(Problem("rules", 1, 1, "no rule files in rules/",
                                       "add rules/*.yaml with segments and campaigns"))
        return result
    hashes = {SETTINGS_FILE: _hash(settings_path)}
    schema_ok = True
    for path in files:
        display = path.relative_to(root).as_posix()
        result.files.append(display)
        hashes[display] = _hash(path)
        data, smap, problems = load_yaml(path, display)
        result.problems.extend(problems)
        if data is None or problems:
            schema_ok = False
            continue
        if not isinstance(data, dict):
            result.problems.append(smap.problem((), "a rule file must be a mapping of segments:, campaigns: ...",
                                                "start the file with a key such as `campaigns:`"))
            schema_ok = False
            continue
        schema_problems = validate_document("rules", data, smap)
        result.problems.extend(schema_problems)
        if schema_problems:
            schema_ok = False
            continue
        builder.add_file(data, smap)
    if not schema_ok:
        # semantic checks on the files that did load still help the marketer fix everything at once
        builder.build()
        result.problems.extend(builder.problems)
        return result
    program = builder.build()
    result.problems.extend(builder.problems)
    if program is None:
        return result
    for template in sorted(templates_dir.glob("*.j2")) if templates_dir.is_dir() else []:
        hashes[template.relative_to(root).as_posix()] = _hash(template)
    workspace = Workspace(root=root, settings=settings, program=program,
                          rule_hashes=MappingProxyType(hashes), templates_dir=templates_dir)
    if check_templates:
        from .template_checks import check_workspace_templates
        result.problems.extend(check_workspace_templates(workspace))
    if result.ok:
        result.workspace = workspace
    return result


def load_workspace(root: Path | str) -> Workspace:
    """Load and validate a workspace; raise RuleError with every problem when it is wrong."""
    result = validate_workspace(root)
    if not result.ok:
        raise RuleError(result.errors)
    return result.workspace


def rule_version(workspace: Workspace) -> str:
    """One short hash over every rule file, loyalty.yaml and template: the rules' version."""
    digest = hashlib.sha256()
    for name, value in sorted(workspace.rule_hashes.items()):
        digest.update(f"{name}:{value}\n".encode())
    return digest.hexdigest()[:12]
