"""How long steps tell what they are doing: a callable that takes one line of text.

The CLI passes one that prints to stderr; library callers pass their own or None.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str], None]


def say(progress: Progress | None, message: str) -> None:
    """Tell ``progress`` what is being done, when anyone listens."""
    if progress is not None:
        progress(message)
