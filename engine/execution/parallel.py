"""Work on this machine's other CPU cores: processes forked from this one.

Once the data is loaded and the features are computed, deciding for each customer
(segments, triggers, contact policy, holdouts, arbitration) and rendering a run's messages
are most of the time left, and both are Python work that one process does on one core.
``in_workers`` runs a task's shares in several processes at once: the first share in this
process, the others in processes forked from it, which see everything it has loaded
without copies and send back their results.

* ``evaluate_in_workers``: the customers split into runs of neighbouring rows, each decided
  alone; the global steps (budgets over every slice, funnels summed) then run once, as for
  partitions (``partitions.combine_parts``), so the offers are exactly one process's.
* ``pipeline.build_messages(workers=...)``: the offers split likewise, each share rendered
  (and, in a run, made into the state store's rows) where it is.

A share that fails in its process (an error, a killed worker) is done again here, so an
error is raised just as in one process. Worker processes need ``fork`` (Linux); elsewhere,
and for small programmes, everything stays in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Callable, TypeVar

import numpy as np
import pandas as pd

from engine.config.model import LoadedWorkspace
from engine.data.sources import Tables
from engine.data.tiers import keep_slice
from engine.decide.budgets import budget_caps
from engine.decide.triggers import RunContext
from engine.execution.parts import Decided, combine_parts, decide_part
from engine.faults import checkpoint

__all__ = ["MIN_CORES_TO_DECIDE", "MIN_CUSTOMERS_PER_WORKER", "MIN_OFFERS_PER_WORKER", "can_fork",
           "deciding_workers", "evaluate_in_workers", "in_workers", "worker_count"]

MIN_CUSTOMERS_PER_WORKER = 50_000     # below these, starting a process costs more than it saves
MIN_OFFERS_PER_WORKER = 20_000        # messages rendered
# Deciding in worker processes pays only with more cores than two: the decisions are about a
# third of a preview, and forking, the pages a worker's reference counts copy and sending its
# offers and their customers' features back cost about what a second core saves (measured at
# 1M customers on 2 cores: 8.0 s with two processes against 6.7 s in one; docs/performance.md).
MIN_CORES_TO_DECIDE = 4
T = TypeVar("T")


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


def can_fork() -> bool:
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def worker_count(items: int, configured: int | None = None, per_worker: int = MIN_CUSTOMERS_PER_WORKER) -> int:
    """How many processes work on ``items`` (customers, messages): ``configured``
    (``--workers``, ``engine.workers``), else one per core with at least ``per_worker``
    items each; 1 without fork."""
    if not can_fork():
        return 1
    if configured is not None:
        return max(1, int(configured))
    return max(1, min(cores(), items // per_worker))


def deciding_workers(customers: int, configured: int | None = None) -> int:
    """How many processes take the decisions for ``customers``: ``configured``, else, with at
    least MIN_CORES_TO_DECIDE cores, ``worker_count``; one process on smaller machines."""
    if configured is None and cores() < MIN_CORES_TO_DECIDE:
        return 1
    return worker_count(customers, configured)


# The task the forked workers run: set by in_workers just before it forks them.
_TASK: tuple[Callable[[int], object], int] | None = None


def _run_task(number: int):
    task, parent = _TASK
    if os.getpid() != parent:
        checkpoint("in_worker")
    return task(number)


def in_workers(task: Callable[[int], T], count: int) -> list[T]:
    """``[task(0), ..., task(count - 1)]``: task 0 in this process while the others run in
    processes forked from it (they see everything this process has, without copies, and
    send back their results). A task that fails in its process (an error, a killed worker)
    runs again here, so an error is raised as it would be in one process."""
    global _TASK
    if count <= 1:
        return [task(number) for number in range(count)]
    _TASK = (task, os.getpid())
    try:
        with ProcessPoolExecutor(count - 1, mp_context=multiprocessing.get_context("fork")) as pool:
            others = {number: pool.submit(_run_task, number) for number in range(1, count)}
            results = [task(0)]
            for number, future in others.items():
                try:
                    results.append(future.result())
                except Exception:  # noqa: BLE001 - run again here: an error is raised as in one process
                    results.append(task(number))
    finally:
        _TASK = None
    return results


def evaluate_in_workers(workspace: LoadedWorkspace, tables: Tables, features: pd.DataFrame, ctx: RunContext,
                        workers: int, campaigns: list[str] | None = None,
                        progress: Callable[[str], None] | None = None) -> Decided:
    """The decision over every customer of ``features`` (all customers, global RFM included),
    taken in ``workers`` processes; identical to ``evaluation.evaluate``'s. The features of
    the result are the offered customers' rows (as with several partitions)."""
    # any split decides the same (as partitions do); runs of neighbouring customers are cheapest to cut
    bounds = np.linspace(0, len(features), workers + 1).astype(np.int64)
    caps = budget_caps(workspace, ctx.budget_used)
    codes = tables.events["cust_code"].to_numpy(dtype=np.int64)
    points = workspace.program.points
    # the messages announcing points (earn rules on orders) read the orders too
    order_codes = tables.orders["cust_code"].to_numpy(dtype=np.int64) if points is not None and any(
        rule.source == "orders" and rule.notify_template for rule in points.earn.values()) else None

    def decide_slice(number: int):
        start, stop = int(bounds[number]), int(bounds[number + 1])
        mine = (codes >= start) & (codes < stop)
        events = tables.events[mine].reset_index(drop=True).assign(cust_code=codes[mine] - start)
        orders = tables.orders.iloc[0:0]
        if order_codes is not None:
            own = (order_codes >= start) & (order_codes < stop)
            orders = tables.orders[own].reset_index(drop=True).assign(cust_code=order_codes[own] - start)
        # deciding reads the customers' features and, for event triggers, their events
        part = replace(tables, customers=tables.customers.iloc[start:stop].reset_index(drop=True),
                       orders=orders, events=events, redemptions=None)
        mine = features.iloc[start:stop].reset_index(drop=True)
        keep_slice(features, mine, start, stop)           # the stored tiers' moves decided with the features
        return decide_part(workspace, part, mine, ctx, campaigns, caps)

    if progress is not None:
        progress(f"deciding in {workers} processes")
    results = in_workers(decide_slice, workers)
    return combine_parts(workspace, ctx, [(decision, rows, len(rows)) for decision, rows in results],
                         len(features), 1)
