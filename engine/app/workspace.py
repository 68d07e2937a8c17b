"""The front door: one workspace, and everything the command line can do with it.

    from engine import Workspace
    ws = Workspace("my-programme")
    ws.validate().ok
    ws.preview(as_of="2026-11-23").total_offers
    ws.run(as_of="2026-11-23").new_offers

Every method returns a result dataclass (``ValidationResult``, ``Preview``, ``RunResult``,
``DeliveryResult``, ``Simulation``, ``GoldenResult``, ``ImportResult``); the CLI formats them
as text, JSON or CSV. Errors are ``LoyaltyError`` subclasses with a fixed exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.app import preview as preview_stage
from engine.app import run as run_stage
from engine.app.golden import GoldenResult, run_golden_tests
from engine.app.outputs import check_output
from engine.app.points import PointsReport, points_report
from engine.app.preview import Preview, write_preview_trace
from engine.app.report_html import write_html_report
from engine.app.reporting import build_report
from engine.app.run import RunResult
from engine.app.simulation import Simulation, simulate
from engine.app.validation import load_workspace, validate_workspace
from engine.config.loading import ValidationResult, load_rules
from engine.config.model import LoadedWorkspace
from engine.execution.dask_engine import default_partitions
from engine.execution.partitioned_data import ensure_partitioned
from engine.progress import Progress
from engine.state.database import StateCheck, backup_database, check_database
from engine.state.delivery import DeliveryResult
from engine.state.redemptions import ImportResult, import_redemptions


@dataclass(frozen=True)
class Workspace:
    """A loyalty programme's folder: loyalty.yaml, rules/, templates/ (and its state)."""

    root: Path = Path(".")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # ----------------------------------------------------------------- rules

    def validate(self) -> ValidationResult:
        """Schema and semantic checks of every file and a trial render of every template."""
        return validate_workspace(self.root)

    def load(self) -> LoadedWorkspace:
        """The validated programme model; raises ``RuleError`` with every problem."""
        return load_workspace(self.root)

    def _rules(self) -> LoadedWorkspace:
        """loyalty.yaml and the rule files without the trial render of every template (a
        tenth of the time): what knows where the state, data and outputs are. A broken
        template must not stop a backup or an output check."""
        return load_rules(self.root)

    def test(self, paths: list[Path] | None = None) -> GoldenResult:
        """The workspace's golden tests (tests/*.yaml, or ``paths``)."""
        return run_golden_tests(self.root, paths or None)

    # ----------------------------------------------------------------- dry runs

    def preview(self, as_of: Any = None, **options) -> Preview:
        """A dry run at ``as_of`` (see ``app.preview.preview`` for the options). Writes nothing."""
        return preview_stage.preview(self.root, as_of, **options)

    def check_output(self, path: Path | str) -> Path:
        """``path`` resolved, when an output may be written there: never over the state
        database, loyalty.yaml, rule files, templates, golden tests or data (UsageError, exit 2)."""
        return check_output(self._rules(), path)

    def write_trace(self, preview: Preview, path: Path | str) -> int:
        """The decision trace of a preview made with ``trace=True``; returns the rows written."""
        return write_preview_trace(preview, self.check_output(path))

    def simulate(self, start: Any, end: Any, every: str = "1d", diff: Path | str | None = None,
                 **options) -> Simulation:
        """Forecast daily (or ``every``) runs from ``start`` to ``end`` in memory. Writes nothing."""
        return simulate(self.root, start, end, every, diff, **options)

    # ----------------------------------------------------------------- runs and state

    def run(self, as_of: Any = None, **options) -> RunResult:
        """Evaluate, record the offers in the state database, deliver them; safe to rerun."""
        return run_stage.run(self.root, as_of, **options)

    def deliver(self, now: Any = None, *, progress: bool = True, lock_timeout: float = 5.0) -> DeliveryResult:
        """Send what is recorded and due, retry failures; consent is checked again."""
        return run_stage.deliver(self.root, now, progress=progress, lock_timeout=lock_timeout)

    def history(self, customer_id: str) -> list[dict]:
        """Every offer a customer got, from which campaign and rule version, and why."""
        return run_stage.history(self.root, customer_id)

    def tier_history(self, customer_id: str) -> list[dict]:
        """Every change of a member's stored tier: as_of, from_tier, to_tier, reason, oldest first."""
        return run_stage.tier_history(self.root, customer_id)

    def runs(self, limit: int = 20) -> list[dict]:
        """The most recent runs, newest first."""
        return run_stage.runs(self.root, limit)

    def points(self, as_of: Any = None, customer: str | None = None) -> PointsReport:
        """Every member's points account at ``as_of`` (balance, earned, redeemed, expired,
        expiring in 30 days) and the programme's outstanding points and liability."""
        return points_report(self.root, as_of, customer)

    def check_state(self) -> StateCheck:
        """SQLite's integrity check of the state database, read-only (`loyalty state check`)."""
        return check_database(self._rules().settings.state_path)

    def backup_state(self, target: Path | str) -> Path:
        """A consistent copy of the state database (SQLite's online backup, safe during a run),
        checked after copying; never over an existing file or over the programme's own files."""
        workspace = self._rules()
        return backup_database(workspace.settings.state_path, check_output(workspace, target))

    def import_redemptions(self, file: Path | str) -> ImportResult:
        """Coupon redemptions from a CSV or Parquet file into the state."""
        return import_redemptions(self.load().settings, file)

    # ----------------------------------------------------------------- reports and data

    def report(self, start: Any = None, end: Any = None, **options) -> dict:
        """Campaign results, uplift over holdout and programme KPIs for a period (JSON-ready)."""
        return build_report(self.root, start, end, **options)

    def write_html_report(self, path: Path | str, report: dict | None = None, start: Any = None,
                          end: Any = None) -> Path:
        """The report as one self-contained HTML file with charts."""
        return write_html_report(self.root, self.check_output(path), start, end, report=report)

    def convert_data(self, partitions: int | None = None,
                     progress: Progress | None = None) -> tuple[Path, int]:
        """Write the customers, orders and events as partitioned Parquet (what the dask engine's
        workers and streamed previews read); nothing is rewritten while the data and the
        partition count are unchanged. Returns the folder and the partition count."""
        workspace = self.load()
        count = partitions or workspace.settings.partitions or default_partitions(workspace, workspace.root)
        return ensure_partitioned(workspace.settings, workspace.root, count, progress), count
