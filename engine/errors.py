"""One error hierarchy for the whole engine.

The CLI turns any ``LoyaltyError`` into a short message and an exit code in one
place: 1 for rules or data that are wrong, 3 for an outside failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class LoyaltyError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One finding in a rule file: ``file:line:col: message (hint)``."""

    file: str
    line: int
    column: int
    message: str
    hint: str = ""
    severity: str = "error"  # "error" or "warning"
    source_line: str = field(default="", compare=False)

    def __str__(self) -> str:
        level = "warning: " if self.severity == "warning" else ""
        text = f"{self.file}:{self.line}:{self.column}: {level}{self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


class RuleError(LoyaltyError):
    """Rule files (or loyalty.yaml) are wrong; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column))
        super().__init__("\n".join(str(p) for p in self.problems))


class ExpressionError(LoyaltyError):
    """An expression could not be parsed or type-checked.

    ``offset`` is the 0-based character offset inside the expression text;
    the workspace loader turns it into a file position.
    """

    def __init__(self, message: str, offset: int = 0, hint: str = ""):
        self.message = message
        self.offset = offset
        self.hint = hint
        super().__init__(message + (f" ({hint})" if hint else ""))


class DataError(LoyaltyError):
    """Customer data is wrong: names the source, and the row and column when known."""

    def __init__(self, source: str, message: str, row: int | None = None,
                 column: str | None = None, hint: str = ""):
        self.source = source
        self.message = message
        self.row = row
        self.column = column
        self.hint = hint
        where = source
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}" + (f" ({hint})" if hint else ""))


class TemplateError(LoyaltyError):
    """A template failed to load or render."""

    def __init__(self, template: str, message: str, line: int | None = None,
                 customer_id: str | None = None):
        self.template = template
        self.message = message
        self.line = line
        self.customer_id = customer_id
        where = template + (f":{line}" if line else "")
        who = f" (customer {customer_id})" if customer_id else ""
        super().__init__(f"{where}: {message}{who}")


class DeliveryError(LoyaltyError):
    """A channel could not deliver; an outside failure."""

    exit_code = 3


class StateError(LoyaltyError):
    """The state database is locked, newer than this version, or inconsistent."""

    exit_code = 3


class SendError(DeliveryError):
    """One offer could not be delivered; recorded on the offer, never raised to the user."""


class BadAddress(SendError):
    """An offer's address cannot be used on its channel: that offer fails, the others go on."""


class ChannelDown(SendError):
    """The channel's server cannot be reached (refused, silent, hung up): the offers left in
    this delivery stay pending, untouched, for the next one."""


class ClusterError(LoyaltyError):
    """The dask engine cannot run: Dask is not installed, the scheduler cannot be reached,
    a worker cannot see the workspace, or the cluster failed mid-evaluation."""

    exit_code = 3


class WorkerSetupError(ClusterError):
    """A worker cannot evaluate: it does not see the workspace, or sees other rules."""


class UsageError(LoyaltyError):
    """The command was asked for something it must refuse (an output over the state
    database or a rule file, ...): bad usage, like click's own errors."""

    exit_code = 2


class SecretNotSet(LoyaltyError):
    """loyalty.yaml takes a secret from an environment variable that is not set where loyalty
    runs: an outside failure (exit code 3), fixed in the environment, not in the rules."""

    exit_code = 3
