"""Fault injection for crash-safety tests: a named checkpoint kills the process on request.

Set ``LOYALTY_CRASH_AT`` to a checkpoint name (``after_evaluation``, ``mid_transaction``,
``after_commit``, ``mid_delivery``; ``in_worker``: a worker process of ``parallel``) and the process is killed with SIGKILL there, as a power
cut or the OOM killer would. Unset, a checkpoint does nothing.
"""

from __future__ import annotations

import os
import signal

CHECKPOINTS = ("after_evaluation", "mid_transaction", "after_commit", "mid_delivery")   # of a run


def checkpoint(name: str) -> None:
    if os.environ.get("LOYALTY_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
