"""Templates checked before sending: every campaign's template, per channel and locale."""

from __future__ import annotations

from .errors import Problem
from .model import Workspace


def check_workspace_templates(workspace: Workspace) -> list[Problem]:
    """Render-check every template a campaign uses; filled in once rendering lands."""
    return []
