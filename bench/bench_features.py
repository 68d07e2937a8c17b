"""Benchmark: built-in features with engine.data.features versus the equivalent DuckDB SQL.

Generates a deterministic, skewed data set as Parquet (default 1M customers, 10M orders,
2M events), then times in the same run:

* ``load_tables``     Parquet -> validated Tables (ids factorised to integer codes)
* ``compute_features`` every built-in feature (days, counts, spend, windows, birthday, age, RFM, NPS)
* DuckDB: the same features in one SQL query over the Parquet files (scan included), and
  over tables already loaded into DuckDB (compute only)

and checks that both agree on every built-in feature.

    /work/venv/bin/python bench/bench_features.py                 # 1M customers / 10M orders
    /work/venv/bin/python bench/bench_features.py --customers 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config.model import ContactPolicy, Program, Settings, SourceDef  # noqa: E402
from engine.data.features import BUILTIN_FEATURES, compute_features, days_before, local_as_of  # noqa: E402
from engine.data.sources import load_tables  # noqa: E402

TIMEZONE = "Asia/Shanghai"
AS_OF = pd.Timestamp("2025-06-30 12:00", tz=TIMEZONE)


def _ids(prefix: str, count: int, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(count)), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def generate(folder: Path, customers: int, orders_per_customer: float, events_per_customer: float,
             seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    n = customers
    ids = _ids("C", n, 8)
    birthday = np.datetime64("1950-01-01") + rng.integers(0, 365 * 55, n).astype("timedelta64[D]")
    signup = np.datetime64("2015-01-01") + rng.integers(0, 365 * 10, n).astype("timedelta64[D]")
    pq.write_table(pa.table({
        "customer_id": ids,
        "email": pc.binary_join_element_wise(ids, pa.scalar("@example.com"), ""),
        "birthday": pa.array(np.where(rng.random(n) < 0.1, np.datetime64("NaT"), birthday)),
        "signup_date": pa.array(signup),
        "sms_opt_in": pa.array(rng.random(n) < 0.6),
        "city": pa.array(rng.choice(["上海", "北京", "广州", "深圳", "杭州"], n)),
    }), folder / "customers.parquet")

    m = int(n * orders_per_customer)
    codes = (n * rng.random(m) ** 2).astype(np.int64)          # skewed: low codes buy a lot
    end = AS_OF.tz_convert("UTC").value // 1000 + 30 * 86_400_000_000   # some orders after as_of
    stamps = end - (rng.random(m) * 3 * 365 * 86_400_000_000).astype(np.int64)
    pq.write_table(pa.table({
        "order_id": _ids("O", m, 9),
        "customer_id": pc.take(ids, pa.array(codes)),
        "timestamp": pa.array(stamps, type=pa.timestamp("us", tz="UTC")),
        "amount": np.round(rng.lognormal(4.5, 0.8, m), 2),
        "channel": pa.array(rng.choice(["web", "app", "store"], m)).dictionary_encode(),
    }), folder / "orders.parquet", row_group_size=1_000_000)

    k = int(n * events_per_customer)
    kinds = rng.choice(["page_view", "nps_response", "complaint"], k, p=[0.7, 0.2, 0.1])
    scores = np.where(kinds == "nps_response", rng.integers(0, 11, k), -1)
    pq.write_table(pa.table({
        "event_id": _ids("E", k, 9),
        "customer_id": pc.take(ids, pa.array(rng.integers(0, n, k))),
        "timestamp": pa.array(end - (rng.random(k) * 365 * 86_400_000_000).astype(np.int64),
                              type=pa.timestamp("us", tz="UTC")),
        "type": pa.array(kinds),
        "score": pa.array(scores, mask=scores < 0),
    }), folder / "events.parquet")


def settings_for(folder: Path) -> Settings:
    data = {t: SourceDef(t, path=folder / f"{t}.parquet") for t in ("customers", "orders", "events")}
    return Settings(name="bench", timezone=TIMEZONE, currency="CNY", default_locale="zh-CN", data=data,
                    state_path=folder / "state.db", contact_policy=ContactPolicy(), holdout=0.0, channels={})


def duckdb_sql(source: dict[str, str]) -> str:
    """The built-in features as one DuckDB query; ``source`` names the three relations."""
    b = {d: days_before(AS_OF, d).tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S+00")
         for d in (365, 180, 90)}
    now = AS_OF.tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S+00")
    today = AS_OF.date().isoformat()

    def quintile(column: str, direction: str) -> str:
        # mid-rank percentile: floor(5 * (rank_min + (ties - 1) / 2 - 0.5) / N) + 1
        window = f"(PARTITION BY has_orders ORDER BY {column} {direction})"
        return (f"CASE WHEN has_orders THEN CAST(floor(5 * (rank() OVER {window} + "
                f"(count(*) OVER (PARTITION BY has_orders, {column}) - 1) / 2.0 - 0.5) / "
                f"count(*) OVER (PARTITION BY has_orders)) + 1 AS INTEGER) END")

    adj = ("CASE WHEN month(birthday) = 2 AND day(birthday) = 29 AND NOT ({y} % 4 = 0 AND "
           "({y} % 100 <> 0 OR {y} % 400 = 0)) THEN 28 ELSE day(birthday) END")
    ty = f"year(DATE '{today}')"
    this_year = f"make_date({ty}, month(birthday), {adj.format(y=ty)})"
    next_year = f"make_date({ty} + 1, month(birthday), {adj.format(y=ty + ' + 1')})"
    return f"""
    WITH o AS (
        SELECT customer_id,
               count(*) AS orders_total, sum(amount) AS lifetime_spend,
               max(timestamp) AS last_ts, min(timestamp) AS first_ts,
               count(*) FILTER (WHERE timestamp > TIMESTAMPTZ '{b[365]}') AS orders_365d,
               coalesce(sum(amount) FILTER (WHERE timestamp > TIMESTAMPTZ '{b[365]}'), 0) AS monetary_365d,
               count(*) FILTER (WHERE timestamp > TIMESTAMPTZ '{b[90]}') AS orders_last_90d,
               count(*) FILTER (WHERE timestamp > TIMESTAMPTZ '{b[180]}'
                                  AND timestamp <= TIMESTAMPTZ '{b[90]}') AS orders_prev_90d
        FROM {source['orders']} WHERE timestamp <= TIMESTAMPTZ '{now}'
        GROUP BY customer_id
    ), e AS (
        SELECT customer_id,
               count(*) FILTER (WHERE type = 'complaint' AND timestamp > TIMESTAMPTZ '{b[90]}') AS complaints_90d,
               arg_max(score, timestamp) FILTER (WHERE type = 'nps_response') AS last_nps_score
        FROM {source['events']} WHERE timestamp <= TIMESTAMPTZ '{now}'
        GROUP BY customer_id
    ), base AS (
        SELECT c.*,
               date_diff('day', CAST(o.last_ts AS DATE), DATE '{today}') AS days_since_last_order,
               date_diff('day', CAST(o.first_ts AS DATE), DATE '{today}') AS days_since_first_order,
               coalesce(o.orders_total, 0) AS orders_total,
               coalesce(o.lifetime_spend, 0) AS lifetime_spend,
               o.lifetime_spend / o.orders_total AS avg_order_value,
               coalesce(o.orders_365d, 0) AS orders_365d,
               coalesce(o.monetary_365d, 0) AS monetary_365d,
               coalesce(o.orders_last_90d, 0) AS orders_last_90d,
               coalesce(o.orders_prev_90d, 0) AS orders_prev_90d,
               date_diff('day', CAST(c.signup_date AS DATE), DATE '{today}') AS days_since_signup,
               date_diff('day', DATE '{today}', CASE WHEN {this_year} >= DATE '{today}'
                         THEN {this_year} ELSE {next_year} END) AS days_to_birthday,
               {ty} - year(birthday) - CASE WHEN month(DATE '{today}') < month(birthday)
                    OR (month(DATE '{today}') = month(birthday) AND day(DATE '{today}') < {adj.format(y=ty)})
                    THEN 1 ELSE 0 END AS age,
               coalesce(e.complaints_90d, 0) AS complaints_90d,
               e.last_nps_score,
               o.orders_total IS NOT NULL AS has_orders
        FROM {source['customers']} c
        LEFT JOIN o USING (customer_id) LEFT JOIN e USING (customer_id)
    ), scored AS (
        SELECT *, {quintile('days_since_last_order', 'DESC')} AS rfm_r,
                  {quintile('orders_365d', 'ASC')} AS rfm_f,
                  {quintile('round(monetary_365d, 6)', 'ASC')} AS rfm_m
        FROM base
    )
    SELECT * EXCLUDE (has_orders), rfm_r + rfm_f + rfm_m AS rfm_score FROM scored
    """


def timed(label: str, function, repeat: int = 1):
    best, result = None, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def compare(ours: pd.DataFrame, theirs: pd.DataFrame) -> list[str]:
    """Names of built-in features on which the two results disagree."""
    theirs = theirs.set_index("customer_id").reindex(ours["customer_id"]).reset_index()
    differ = []
    for name in BUILTIN_FEATURES:
        if name not in theirs or name == "tier":
            continue
        a = ours[name].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        b = pd.to_numeric(theirs[name], errors="coerce").astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        if not np.allclose(a, b, equal_nan=True, rtol=1e-9, atol=1e-6):
            differ.append(name)
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--orders-per-customer", type=float, default=10.0)
    parser.add_argument("--events-per-customer", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions (the best is shown)")
    parser.add_argument("--dir", type=Path, help="where to write the Parquet files (default: a temp dir)")
    args = parser.parse_args()

    import duckdb

    with tempfile.TemporaryDirectory() as temp:
        folder = args.dir or Path(temp)
        folder.mkdir(parents=True, exist_ok=True)
        gen_time, _ = timed("generate", lambda: generate(folder, args.customers, args.orders_per_customer,
                                                         args.events_per_customer))
        settings = settings_for(folder)
        program = Program(features={}, segments={}, tiers={}, campaigns={})
        load_time, tables = timed("load", lambda: load_tables(settings, folder))
        ours_time, ours = timed("features", lambda: compute_features(tables, program, settings, AS_OF),
                                args.repeat)

        con = duckdb.connect()
        con.execute(f"SET TimeZone = '{TIMEZONE}'")
        files = {t: f"read_parquet('{folder / (t + '.parquet')}')" for t in ("customers", "orders", "events")}
        sql_parquet = duckdb_sql(files)
        duck_parquet_time, theirs = timed("duckdb parquet", lambda: con.execute(sql_parquet).df(), args.repeat)
        for table, relation in files.items():
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM {relation}")
        sql_memory = duckdb_sql({t: t for t in files})
        duck_memory_time, _ = timed("duckdb memory", lambda: con.execute(sql_memory).df(), args.repeat)

        differ = compare(ours, theirs)
        rows = [
            ("generate Parquet (not compared)", gen_time),
            ("ours: load_tables (Parquet -> validated Tables)", load_time),
            ("ours: compute_features (all built-ins)", ours_time),
            ("ours: load_tables + compute_features", load_time + ours_time),
            ("DuckDB: SQL over the Parquet files (scan included)", duck_parquet_time),
            ("DuckDB: SQL over tables already in DuckDB", duck_memory_time),
        ]
        print(f"\n{args.customers:,} customers, {len(tables.orders):,} orders, {len(tables.events):,} events; "
              f"as_of {AS_OF}; best of {args.repeat}; duckdb {duckdb.__version__}, "
              f"threads {con.execute('select current_setting(' + repr('threads') + ')').fetchone()[0]}")
        width = max(len(label) for label, _ in rows)
        for label, seconds in rows:
            print(f"  {label:<{width}}  {seconds:8.3f} s")
        print(f"  compute_features / DuckDB over Parquet:  {ours_time / duck_parquet_time:5.2f}x")
        print(f"  compute_features / DuckDB in memory:     {ours_time / duck_memory_time:5.2f}x")
        print("  results agree on every built-in feature" if not differ else f"  DISAGREE on: {differ}")


if __name__ == "__main__":
    main()
