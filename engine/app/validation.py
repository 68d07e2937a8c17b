"""Validating a whole workspace: loyalty.yaml and the rule files, then every template."""

from __future__ import annotations

from pathlib import Path

from engine.config.loading import ValidationResult, check_rules
from engine.config.model import LoadedWorkspace
from engine.config.schema import did_you_mean
from engine.errors import LoyaltyError, RuleError
from engine.messages.template_checks import check_workspace_templates


def validate_workspace(root: Path | str) -> ValidationResult:
    """Schema and semantic checks of every file, then a trial render of every template a
    campaign uses; never raises for rule problems. Problems come sorted by file and position."""
    result = check_rules(root)
    if result.workspace is not None:
        result.problems.extend(check_workspace_templates(result.workspace))
        result.problems.sort(key=lambda p: (p.file, p.line, p.column))
        if not result.ok:
            result.workspace = None
    return result


def load_workspace(root: Path | str) -> LoadedWorkspace:
    """Load and validate a workspace; raise RuleError with every problem when it is wrong."""
    result = validate_workspace(root)
    if not result.ok:
        raise RuleError(result.errors)
    return result.workspace


def check_campaigns(workspace: LoadedWorkspace, campaigns: list[str] | None) -> None:
    """Every campaign named on the command line exists (with a "did you mean" when not)."""
    for name in campaigns or []:
        if name not in workspace.program.campaigns:
            hint = did_you_mean(name, workspace.program.campaigns)
            raise LoyaltyError(f"no campaign '{name}'" + (f" ({hint})" if hint else ""))
