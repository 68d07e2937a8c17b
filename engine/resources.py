"""Where the bundled schemas and example programme live, installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_BUNDLED = _PACKAGE / "_bundled"
_CHECKOUT = _PACKAGE.parent


def _pick(bundled: Path, checkout: Path) -> Path:
    return bundled if bundled.is_dir() else checkout


def schemas_dir() -> Path:
    """The JSON Schemas (``schemas/`` in a checkout)."""
    return _pick(_BUNDLED / "schemas", _CHECKOUT / "schemas")


def example_rules_dir() -> Path:
    """The example programme's rule files."""
    return _pick(_BUNDLED / "example" / "rules", _CHECKOUT / "rules")


def example_templates_dir() -> Path:
    """The example programme's templates."""
    return _pick(_BUNDLED / "example" / "templates", _CHECKOUT / "templates")


def example_tests_dir() -> Path:
    """The example programme's golden tests (``tests/golden`` in a checkout)."""
    return _pick(_BUNDLED / "example" / "tests", _CHECKOUT / "tests" / "golden")
