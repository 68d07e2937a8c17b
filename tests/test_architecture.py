"""The package keeps its shape: layers import one way, no import cycles, one front door."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

from importlinter.cli import lint_imports

import engine

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """config -> data -> decide -> state -> messages -> execution -> app, and no cycles
    between the modules of a subpackage (the contracts in pyproject.toml)."""
    # import-linter configures logging with dictConfig, which disables every logger that exists
    # (loyalty.delivery's log lines would vanish from the tests that run after this one)
    loggers = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = [lg.disabled for lg in loggers]
    try:
        assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0
    finally:
        for lg, was in zip(loggers, disabled):
            lg.disabled = was


def test_imports_sit_at_the_top_of_modules_except_the_optional_dask_and_sqlalchemy():
    inside = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                    if names not in (["distributed"], ["sqlalchemy"], ["sqlalchemy.engine"]):
                        inside.append(f"{path.relative_to(ROOT)}:{node.lineno}: {names}")
    assert inside == []


def test_the_cli_goes_through_the_front_door():
    """Every command's work is a Workspace method; the CLI imports nothing that runs stages."""
    tree = ast.parse((ROOT / "cli.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    engine_modules = {m for m in imported if m and m.startswith("engine")}
    assert "engine" in engine_modules
    # besides the front door, only presentation helpers (text tables, CSV safety, stage names)
    assert engine_modules - {"engine"} <= {"engine.app.csv_export", "engine.app.points", "engine.app.report_text",
                                           "engine.app.reporting", "engine.app.simulation",
                                           "engine.decide.evaluation", "engine.state.delivery"}
    assert {"Workspace", "LoyaltyError", "RuleError"} <= set(engine.__all__)
