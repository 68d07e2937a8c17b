"""Numbers in the data: thousands separators, infinity, NaN and out-of-range values.

A value that is not a finite number within ±1e12 is a data error naming the source, row and
column, and nothing is recorded; computed points never become infinity or NaN.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cli import main
from engine.config.expressions import compile_expression
from engine.config.model import ContactPolicy, Location, RewardDef, Settings, SourceDef
from engine.data.sources import load_tables
from engine.decide.rewards import MAX_POINTS, points_for
from engine.errors import DataError

AS_OF = "2026-12-25T10:00:00+08:00"
RANGE_HINT = "(numbers in the data go from -1,000,000,000,000 to 1,000,000,000,000)"
FINITE_HINT = "(write an ordinary number, e.g. 1234.5)"
READ_HINT = "(numbers are written like 1234.5 or 1,234.5, without currency signs)"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), encoding="utf-8")


def recorded(workspace: Path) -> int:
    """Runs and offers in the state database (0 when it was never created)."""
    path = workspace / "state" / "loyalty.db"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return sum(db.execute(f"select count(*) from {table}").fetchone()[0]
                   for table in ("runs", "offers", "points_ledger"))


# data/orders.csv row 2 is `O1,C001,2026-08-20 14:00:00,320.00`; events.csv row 2 ends in `,9`
BAD_VALUES = {
    "order Infinity": ("orders.csv", ",320.00\n", ",Infinity\n", "amount",
                       f"'Infinity' is not a finite number {FINITE_HINT}"),
    "order -inf": ("orders.csv", ",320.00\n", ",-inf\n", "amount", f"'-inf' is not a finite number {FINITE_HINT}"),
    "order 1e309": ("orders.csv", ",320.00\n", ",1e309\n", "amount", f"'1e309' is not a finite number {FINITE_HINT}"),
    "order 1e30": ("orders.csv", ",320.00\n", ",1e30\n", "amount", f"'1e30' is out of range {RANGE_HINT}"),
    "order -2e12": ("orders.csv", ",320.00\n", ",-2000000000000\n", "amount",
                    f"'-2000000000000' is out of range {RANGE_HINT}"),
    "order NaN": ("orders.csv", ",320.00\n", ",NaN\n", "amount", f"cannot read 'NaN' as a number {READ_HINT}"),
    "order 1,2,3": ("orders.csv", ",320.00\n", ',"1,2,3"\n', "amount", f"cannot read '1,2,3' as a number {READ_HINT}"),
    "order 1,23": ("orders.csv", ",320.00\n", ',"1,23"\n', "amount", f"cannot read '1,23' as a number {READ_HINT}"),
    "order 1234,5": ("orders.csv", ",320.00\n", ',"1234,5"\n', "amount", f"cannot read '1234,5' as a number {READ_HINT}"),
    "event score inf": ("events.csv", ",9\n", ",inf\n", "score", f"'inf' is not a finite number {FINITE_HINT}"),
    "event score 1e30": ("events.csv", ",9\n", ",1e30\n", "score", f"'1e30' is out of range {RANGE_HINT}"),
}


@pytest.mark.parametrize("file,old,new,column,message", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_unusable_number_in_the_data_stops_the_run(workspace, file, old, new, column, message):
    replace_in(workspace / "data" / file, old, new)
    result = invoke("run", str(workspace), "--as-of", AS_OF)
    assert result.exit_code == 1
    assert f"error: data/{file}, row 2, column '{column}': {message}" in result.output.splitlines()
    assert recorded(workspace) == 0
    assert not (workspace / "outbox").exists()


# --------------------------------------------------------------------------- the loader


def settings(**data) -> Settings:
    return Settings(name="t", timezone="Asia/Shanghai", currency="CNY", default_locale="zh-CN",
                    data=data, state_path=Path("state.db"), contact_policy=ContactPolicy(),
                    holdout=0.0, channels={})


def csv_tables(root: Path, amounts: list[str], extra: str = "", fields: dict | None = None):
    """Load one customer with one order per amount; ``extra`` is a customer column's value."""
    (root / "customers.csv").write_text(f"customer_id,code\nC1,{extra}\n", encoding="utf-8")
    rows = "".join(f'{i},C1,2024-03-01,"{amount}"\n' for i, amount in enumerate(amounts))
    (root / "orders.csv").write_text("order_id,customer_id,timestamp,amount\n" + rows, encoding="utf-8")
    return load_tables(settings(
        customers=SourceDef("customers", path=Path("customers.csv"), fields=MappingProxyType(fields or {})),
        orders=SourceDef("orders", path=Path("orders.csv"))), root)


@pytest.mark.parametrize("text,value", [
    ("1,234.50", 1234.5), ("12,345,678", 12345678.0), ("-1,000", -1000.0), ("1,234", 1234.0),
    ("1234.5", 1234.5), ("1.5e3", 1500.0), ("999999999999", 999999999999.0), ("-1e12", -1e12),
])
def test_thousands_separators_in_groups_of_three_are_read(tmp_path, text, value):
    assert csv_tables(tmp_path, [text]).orders["amount"].tolist() == [value]


@pytest.mark.parametrize("declared,inferred", [("1234567890123456789", "string"), ("1,2,3", "string"),
                                               ("Infinity", "string"), ("1,234", "number")])
def test_undeclared_column_is_a_number_only_when_every_value_is_usable(tmp_path, declared, inferred):
    tables = csv_tables(tmp_path, ["1"], extra=f'"{declared}"')
    assert tables.types["customers"]["code"] == inferred


@pytest.mark.parametrize("value,message", [
    ("1,2,3", f"cannot read '1,2,3' as a number {READ_HINT}"),
    ("Infinity", f"'Infinity' is not a finite number {FINITE_HINT}"),
    ("1234567890123456789", f"'1234567890123456789' is out of range {RANGE_HINT}"),
])
def test_declared_number_column_refuses_unusable_values(tmp_path, value, message):
    with pytest.raises(DataError) as info:
        csv_tables(tmp_path, ["1"], extra=f'"{value}"', fields={"code": "number"})
    assert str(info.value) == f"customers.csv, row 2, column 'code': {message}"


@pytest.mark.parametrize("value,message", [
    (float("inf"), f"'inf' is not a finite number {FINITE_HINT}"),
    (-float("inf"), f"'-inf' is not a finite number {FINITE_HINT}"),
    (1e30, f"'1e+30' is out of range {RANGE_HINT}"),
])
def test_numbers_stored_as_numbers_are_checked_too(tmp_path, value, message):
    """SQLite REAL and Parquet float columns skip the text parser; the bounds still apply."""
    (tmp_path / "customers.csv").write_text("customer_id\nC1\n", encoding="utf-8")
    with sqlite3.connect(tmp_path / "crm.db") as db:
        db.execute("create table events (event_id text, customer_id text, timestamp text, type text, "
                   "amount real)")
        db.execute("insert into events values ('e1', 'C1', '2024-03-01', 'purchase', 5.0)")
        db.execute("insert into events values ('e2', 'C1', '2024-03-02', 'purchase', ?)", (value,))
    with pytest.raises(DataError) as info:
        load_tables(settings(customers=SourceDef("customers", path=Path("customers.csv")),
                             events=SourceDef("events", path=Path("crm.db"))), tmp_path)
    assert str(info.value) == f"crm.db, row 2, column 'amount': {message}"


def test_empty_float_in_parquet_is_empty_not_an_error(tmp_path):
    (tmp_path / "customers.csv").write_text("customer_id\nC1\n", encoding="utf-8")
    pd.DataFrame({"event_id": ["e1", "e2"], "customer_id": ["C1", "C1"], "timestamp": ["2024-03-01"] * 2,
                  "type": ["nps_response"] * 2, "score": [9.0, np.nan]}).to_parquet(tmp_path / "events.parquet")
    tables = load_tables(settings(customers=SourceDef("customers", path=Path("customers.csv")),
                                  events=SourceDef("events", path=Path("events.parquet"))), tmp_path)
    assert tables.events["score"].isna().tolist() == [False, True]


# --------------------------------------------------------------------------- computed points


@pytest.mark.parametrize("expression,points", [
    ("spend * 1e300", MAX_POINTS),                    # finite but huge: clipped
    ("spend * 1e300 * 1e300", MAX_POINTS),            # overflows to infinity: clipped
    ("spend * 1e300 * 1e300 - spend * 1e300 * 1e300", 0),   # inf - inf is NaN: no points
    ("0 - spend * 1e300 * 1e300", 0),                 # minus infinity: no points
    ("spend * 2.5", 25),                              # ordinary amounts: floored
])
def test_computed_points_are_finite_whole_numbers(expression, points):
    reward = RewardDef("points", MappingProxyType({"amount": expression}),
                       compile_expression(expression, {"spend": "number"}), Location("r.yaml", 1, 1))
    scope = pd.DataFrame({"spend": pd.Series([10.0], dtype="Float64")})
    with np.errstate(all="ignore"):
        credited = points_for(reward, scope, pd.Timestamp(AS_OF))
    assert credited.tolist() == [points]
    assert np.isfinite(credited).all()


def test_run_with_a_huge_computed_points_amount_records_the_clipped_amount(workspace):
    replace_in(workspace / "rules" / "programme.yaml", "floor(monetary_365d / 100)", "monetary_365d * 1e300")
    result = invoke("run", str(workspace), "--as-of", AS_OF, "--no-deliver")
    assert result.exit_code == 0, result.output
    with sqlite3.connect(workspace / "state" / "loyalty.db") as db:
        points = [row[0] for row in db.execute("select points from points_ledger")]
    assert points and set(points) == {MAX_POINTS}
