"""Benchmark: `loyalty simulate` of the example programme over daily steps.

    /work/venv/bin/python bench/bench_simulate.py [--customers 100000] [--days 30 90] [--check 3] [--dir DIR]

Builds (or reuses) the workspace of bench/bench_pipeline.py (the example programme's rules
and templates on generated Parquet data: ~10 orders and ~3 events a customer, skewed),
without its extra newsletter campaign, then times ``engine.app.simulation.simulate`` for each
``--days`` from START, loading included, in a fresh process each. ``--check N`` first
replays N steps twice, once with the simulation's candidate pre-filter and once evaluating
every customer, and fails if the offers differ.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pandas as pd  # noqa: E402

START = "2026-08-25T10:00:00+08:00"      # 90 daily steps end on 22 November, before the data does


def build(directory: Path, customers: int) -> None:
    from bench_pipeline import generate
    started = time.perf_counter()
    counts = generate(directory, customers)
    (directory / "rules" / "bench.yaml").unlink()      # the example programme only
    print(f"built {counts['customers']:,} customers, {counts['orders']:,} orders, {counts['events']:,} events "
          f"in {time.perf_counter() - started:.1f} s: {directory}")


def check_exact(directory: Path, steps: int) -> None:
    """The pre-filtered evaluation gives exactly the offers of evaluating everyone."""
    from engine.app.replay import MemoryState, step_times
    from engine.app.validation import load_workspace
    from engine.data.features import compute_features
    from engine.data.sources import load_tables
    from engine.decide.evaluation import evaluate
    from engine.decide.step_candidates import evaluate_step
    workspace = load_workspace(directory)
    tables = load_tables(workspace.settings, workspace.root)
    state = MemoryState()
    for as_of in step_times(START, "2026-12-31", "1d", workspace.settings.timezone)[:steps]:
        features = compute_features(tables, workspace.program, workspace.settings, as_of)
        ctx = state.context(workspace, as_of)
        fast, edge_state = evaluate_step(workspace, tables, features, ctx)
        full = evaluate(workspace, tables, features, ctx)
        columns = ["campaign", "customer_id", "firing_key", "variant", "cost", "points"]
        a = fast.offers[columns].sort_values("firing_key").reset_index(drop=True)
        b = full.offers[columns].sort_values("firing_key").reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
        assert edge_state == full.edge_state, "becomes state differs"
        print(f"  {as_of.date()}: {len(a)} offers, identical")
        state.record(full, full.edge_state)


def measure(directory: Path, days: int) -> dict:
    """One simulation in this process: wall and CPU seconds, peak memory."""
    from engine.app.simulation import simulate
    end = (pd.Timestamp(START) + pd.Timedelta(days=days - 1)).isoformat()
    started, cpu = time.perf_counter(), time.process_time()
    result = simulate(directory, START, end, "1d", fresh=True)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"days": days, "steps": len(result.steps), "customers": result.customers,
            "offers": result.total_offers, "cost": result.total_cost, "seconds": round(seconds, 1),
            "cpu": round(cpu, 1), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--days", type=int, nargs="+", default=[30, 90])
    parser.add_argument("--check", type=int, default=0, help="check N steps against a full evaluation")
    parser.add_argument("--dir", type=Path, default=None, help="reuse or build the workspace here")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)   # one measurement, in a subprocess
    args = parser.parse_args()
    directory = args.dir or Path(f"/tmp/loyalty-bench-simulate-{args.customers}")
    if args.measure:
        print(json.dumps(measure(directory, args.measure)))
        return
    if not (directory / "loyalty.yaml").exists():
        build(directory, args.customers)
    if args.check:
        print(f"checking {args.check} steps against a full evaluation:")
        check_exact(directory, args.check)
    for days in args.days:
        out = subprocess.run([sys.executable, __file__, "--dir", str(directory), "--measure", str(days)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"simulate: {r['steps']} daily steps, {r['customers']:,} customers, {r['offers']:,} offers, "
              f"cost {r['cost']:,.2f}: {r['seconds']:.1f} s ({r['seconds'] / max(r['steps'], 1):.2f} s a step, "
              f"loading included; CPU {r['cpu']:.1f} s; peak memory {r['peak_mb']:,} MB)")


if __name__ == "__main__":
    main()
