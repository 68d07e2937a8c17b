"""loyalty: a rules-driven campaign engine for loyalty and retention programmes.

The front door is ``Workspace``: ``Workspace("my-programme").preview(as_of="2026-11-23")``.
``init_workspace``/``init_example`` create a workspace, ``run_demo`` runs the whole tour, and
every error raised on purpose is a ``LoyaltyError``. docs/architecture.md maps the package.
"""

__version__ = "0.1.0"

from engine.app.demo import run_demo
from engine.app.scaffold import init_example, init_workspace
from engine.app.workspace import Workspace
from engine.errors import LoyaltyError, RuleError

__all__ = ["Workspace", "LoyaltyError", "RuleError", "init_workspace", "init_example", "run_demo", "__version__"]
