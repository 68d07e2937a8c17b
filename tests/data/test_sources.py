"""engine.data.sources: reading CSV/Parquet/SQLite/SQL, mapping columns, validating data."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from engine.config.catalogue import CUSTOMER_COLUMNS
from engine.config.model import ContactPolicy, Program, Settings, SourceDef
from engine.data.features import compute_features
from engine.data.sources import column_types, load_tables
from engine.errors import DataError

CUSTOMERS = """cust_no,name,email,birthday,signup_date,timezone,locale,sms_opt_in,email_opt_in,vip_level,city
C1,Ann,ann@example.com,1990-02-28,2020-01-01,Europe/Berlin,zh_cn,是,yes,3,上海
C2,Bob,bob@example.com,,2021-05-06,Mars/Base,en-US,否,0,,北京
C3,Cy,,2000-02-29,2022-07-01,,,1,,1,上海
"""
ORDERS = """order_id,customer_id,timestamp,amount,channel
1,C1,2024-03-01 10:00,100.5,web
2,C2,2024-03-02T10:00:00+00:00,-5,app
3,ZZ,2024-03-02,7,web
4,C1,2024-06-01 23:30:00,20,store
"""
EVENTS = """event_id,customer_id,timestamp,type,score
e1,C1,2024-03-01,nps_response,9
e2,C1,2024-05-03 08:00,nps_response,4
e3,C2,2024-05-01,complaint,
"""
AS_OF = pd.Timestamp("2024-06-15 12:00", tz="Asia/Shanghai")
EMPTY = Program(features={}, segments={}, tiers={}, campaigns={})


def settings(**data) -> Settings:
    return Settings(name="t", timezone="Asia/Shanghai", currency="CNY", default_locale="zh-CN",
                    data=data, state_path=Path("state.db"), contact_policy=ContactPolicy(),
                    holdout=0.0, channels={})


def source(table: str, path: str, **kw) -> SourceDef:
    return SourceDef(table, path=Path(path), **kw)


def write(root: Path, name: str, text: str, encoding: str = "utf-8") -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return name


def csv_settings(root: Path, customers=CUSTOMERS, orders=ORDERS, events=EVENTS) -> Settings:
    return settings(
        customers=source("customers", write(root, "data/customers.csv", customers),
                         columns={"customer_id": "cust_no"}),
        orders=source("orders", write(root, "data/orders.csv", orders)),
        events=source("events", write(root, "data/events.csv", events)))


def load_error(root: Path, **data) -> DataError:
    with pytest.raises(DataError) as info:
        load_tables(settings(**data), root)
    return info.value


# --------------------------------------------------------------------------- happy path


def test_csv_loads_typed_and_linked(tmp_path):
    tables = load_tables(csv_settings(tmp_path), tmp_path)
    c = tables.customers
    assert list(c["customer_id"]) == ["C1", "C2", "C3"]
    assert str(c["birthday"].dtype) == "datetime64[us]"
    assert list(c["sms_opt_in"]) == [True, False, True]
    assert list(c["email_opt_in"]) == [True, False, False]     # empty answer: no consent
    assert c["sms_opt_in"].dtype == bool
    assert list(c["locale"]) == ["zh-CN", "en-US", "zh-CN"]
    assert list(c["timezone"]) == ["Europe/Berlin", "Asia/Shanghai", "Asia/Shanghai"]
    assert column_types(tables)["vip_level"] == "number"
    assert column_types(tables)["city"] == "string"
    o = tables.orders
    assert list(o["order_id"]) == ["1", "2", "4"]
    assert str(o["timestamp"].dtype) == "datetime64[us, Asia/Shanghai]"
    # naive = programme time; aware converted
    assert o["timestamp"].iloc[0] == pd.Timestamp("2024-03-01 10:00", tz="Asia/Shanghai")
    assert o["timestamp"].iloc[1] == pd.Timestamp("2024-03-02 18:00", tz="Asia/Shanghai")
    assert list(o["cust_code"]) == [0, 1, 0]
    assert list(tables.events["cust_code"]) == [0, 0, 1]
    assert set(tables.fingerprints) == {"customers", "orders", "events"}
    assert all(len(v) == 64 for v in tables.fingerprints.values())


def test_warnings_are_counted_with_examples(tmp_path):
    tables = load_tables(csv_settings(tmp_path), tmp_path)
    text = "\n".join(tables.warnings)
    assert "data/orders.csv: 1 order(s) for unknown customers dropped (e.g. row 4: 'ZZ')" in text
    assert "1 order(s) with a negative amount" in text and "row 3" in text
    assert "1 customer(s) with an invalid timezone" in text and "C2" in text and "Mars/Base" in text
    # an invalid locale falls back too, and the customer stays
    bad = CUSTOMERS.replace("en-US", "not a locale")
    tables = load_tables(csv_settings(tmp_path, customers=bad), tmp_path)
    assert any("invalid locale" in w and "'not a locale'" in w for w in tables.warnings)
    assert len(tables.customers) == 3 and tables.customers["locale"].iloc[1] == "zh-CN"


def test_fields_declare_types_and_keep_extras(tmp_path):
    root = tmp_path
    s = settings(customers=source("customers", write(root, "c.csv", "customer_id,code,member_since\n1,007,2020-01-02\n"),
                                  fields={"code": "string"}))
    tables = load_tables(s, root)
    assert tables.customers["code"].iloc[0] == "007"
    assert column_types(tables)["member_since"] == "date"
    assert "name" in CUSTOMER_COLUMNS and CUSTOMER_COLUMNS["birthday"] == "date"


def test_tsv_delimiter_and_bom(tmp_path):
    write(tmp_path, "c.tsv", "\ufeffcustomer_id\tname\n1\tA\n")
    write(tmp_path, "d.csv", "customer_id;name\n1;A\n")
    a = load_tables(settings(customers=source("customers", "c.tsv")), tmp_path)
    b = load_tables(settings(customers=source("customers", "d.csv", delimiter=";")), tmp_path)
    assert list(a.customers["name"]) == list(b.customers["name"]) == ["A"]


def test_gbk_file_with_encoding(tmp_path):
    write(tmp_path, "c.csv", "customer_id,name\n1,张三\n", encoding="gbk")
    tables = load_tables(settings(customers=source("customers", "c.csv", encoding="gbk")), tmp_path)
    assert tables.customers["name"].iloc[0] == "张三"


def test_missing_orders_and_events_tables_are_empty(tmp_path):
    tables = load_tables(settings(customers=source("customers", write(tmp_path, "c.csv", "customer_id\n1\n"))), tmp_path)
    assert tables.orders.empty and tables.events.empty and tables.redemptions is None
    features = compute_features(tables, EMPTY, settings(), AS_OF)
    assert features["orders_total"].iloc[0] == 0


def test_fingerprint_follows_content(tmp_path):
    s = csv_settings(tmp_path)
    first = load_tables(s, tmp_path).fingerprints
    write(tmp_path, "data/orders.csv", ORDERS + "5,C3,2024-01-01,1,web\n")
    second = load_tables(s, tmp_path).fingerprints
    assert first["customers"] == second["customers"] and first["orders"] != second["orders"]


# --------------------------------------------------------------------------- other sources


def _to_parquet(root: Path, frames: dict[str, pd.DataFrame]) -> Settings:
    for name, frame in frames.items():
        frame.to_parquet(root / f"{name}.parquet")
    return settings(**{name: source(name, f"{name}.parquet",
                                    columns={"customer_id": "cust_no"} if name == "customers" else {})
                       for name in frames})


def _csv_frames(root: Path) -> dict[str, pd.DataFrame]:
    csv_settings(root)
    return {name: pd.read_csv(root / f"data/{name}.csv", dtype=str)
            for name in ("customers", "orders", "events")}


def _features(tables) -> pd.DataFrame:
    return compute_features(tables, EMPTY, settings(), AS_OF)


def test_csv_parquet_sqlite_and_url_give_identical_features(tmp_path):
    reference = _features(load_tables(csv_settings(tmp_path), tmp_path))
    frames = _csv_frames(tmp_path)
    parquet = load_tables(_to_parquet(tmp_path, frames), tmp_path)
    with sqlite3.connect(tmp_path / "crm.db") as conn:
        for name, frame in frames.items():
            frame.to_sql(f"t_{name}", conn, index=False)
    lite = settings(**{name: SourceDef(name, path=Path("crm.db"), sql_table=f"t_{name}",
                                       columns={"customer_id": "cust_no"} if name == "customers" else {})
                       for name in frames})
    url = settings(**{name: SourceDef(name, url=f"sqlite:///{tmp_path / 'crm.db'}", sql_table=f"t_{name}",
                                      columns={"customer_id": "cust_no"} if name == "customers" else {})
                      for name in frames})
    for other in (parquet, load_tables(lite, tmp_path), load_tables(url, tmp_path)):
        pd.testing.assert_frame_equal(_features(other), reference, check_dtype=False)


def test_typed_parquet_with_integer_ids_and_dates(tmp_path):
    pd.DataFrame({"customer_id": [10, 20], "birthday": [pd.Timestamp("1990-01-01").date(), None],
                  "sms_opt_in": [True, False]}).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame({"order_id": [1, 2], "customer_id": [20, 30],
                  "timestamp": pd.to_datetime(["2024-01-01 00:00", "2024-01-02 00:00"]).tz_localize("UTC"),
                  "amount": [1.5, 2.0]}).to_parquet(tmp_path / "o.parquet")
    tables = load_tables(settings(customers=source("customers", "c.parquet"),
                                  orders=source("orders", "o.parquet")), tmp_path)
    assert list(tables.customers["customer_id"]) == ["10", "20"]
    assert tables.customers["birthday"].iloc[0] == pd.Timestamp("1990-01-01")
    assert list(tables.orders["customer_id"]) == ["20"] and list(tables.orders["cust_code"]) == [1]
    assert tables.orders["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 08:00", tz="Asia/Shanghai")
    assert any("o.parquet: 1 order(s) for unknown customers dropped (e.g. row 2: '30')" in w
               for w in tables.warnings)


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


def test_postgresql_url_gives_identical_features(tmp_path):
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb/pg_ctl) not found on PATH or in /usr/lib/postgresql")
    driver = next((d for d in ("pg8000", "psycopg", "psycopg2") if _importable(d)), None)
    if driver is None:
        pytest.skip("no PostgreSQL driver for SQLAlchemy installed (pg8000, psycopg or psycopg2)")
    run_as: list[str] = []
    if os.geteuid() == 0:   # initdb refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root and no 'postgres' user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    # the server's folder must be reachable by the server's user: pytest's tmp_path may not be
    server_dir = Path(tempfile.mkdtemp(prefix="loyalty-pg-"))
    os.chmod(server_dir, 0o777)
    data = server_dir / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(run_as + [str(bin_dir / "initdb"), "-D", str(data), "-U", "loyalty", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(server_dir / "pg.log"),
                             "-o", f"-p {port} -k {server_dir} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        import sqlalchemy
        url = f"postgresql+{driver}://loyalty@127.0.0.1:{port}/postgres"
        engine = sqlalchemy.create_engine(url)
        reference = _features(load_tables(csv_settings(tmp_path), tmp_path))
        with engine.begin() as conn:
            for name, frame in _csv_frames(tmp_path).items():
                frame.to_sql(f"t_{name}", conn, index=False)
        engine.dispose()
        pg = settings(**{name: SourceDef(name, url=url, sql_table=f"t_{name}",
                                         columns={"customer_id": "cust_no"} if name == "customers" else {})
                         for name in ("customers", "orders", "events")})
        tables = load_tables(pg, tmp_path)
        assert any("t_orders' at postgresql+" in w for w in tables.warnings)   # named by table and url
        pd.testing.assert_frame_equal(_features(tables), reference, check_dtype=False)
    finally:
        subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(server_dir, ignore_errors=True)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- errors


def test_missing_required_column_suggests_mapping(tmp_path):
    error = load_error(tmp_path, customers=source("customers", write(tmp_path, "c.csv", "member_id,name\n1,A\n")))
    assert error.source == "c.csv" and error.column == "customer_id" and error.row == 1
    assert "the columns are: member_id, name" in str(error)
    assert "columns: {customer_id: member_id}" in str(error)
    error = load_error(tmp_path, customers=source("customers", write(tmp_path, "c2.csv", "customer_id\n1\n")),
                       orders=source("orders", write(tmp_path, "o.csv", "order_id,customer_id,created_at,total\n1,1,2024-01-01,3\n")))
    assert error.source == "o.csv" and error.column == "timestamp"
    assert "columns: {timestamp: created_at}" in str(error)


def test_mapping_to_a_missing_column(tmp_path):
    error = load_error(tmp_path, customers=source("customers", write(tmp_path, "c.csv", "cust_id\n1\n"),
                                                  columns={"customer_id": "custid"}))
    assert error.column == "custid" and "did you mean `cust_id`" in str(error)


@pytest.mark.parametrize("table,text,row,column,words", [
    ("customers", "customer_id,name\nA,x\nB,y\nA,z\nB,w\n", 4, "customer_id", ["'A' (rows 2, 4)", "'B' (rows 3, 5)"]),
    ("customers", "customer_id,birthday\nA,1990-01-01\nB,31/31/1990\n", 3, "birthday", ["'31/31/1990'"]),
    ("customers", "customer_id,sms_opt_in\nA,yes\nB,maybe\n", 3, "sms_opt_in", ["'maybe'"]),
    ("customers", "customer_id,name\nA,x\n,y\n", 3, "customer_id", ["empty customer_id"]),
    ("orders", "order_id,customer_id,timestamp,amount\n1,A,2024-01-01,1\n2,A,yesterday,2\n", 3, "timestamp", ["'yesterday'"]),
    ("orders", "order_id,customer_id,timestamp,amount\n1,A,2024-01-01,1\n2,A,2024-01-01,¥12\n", 3, "amount", ["'¥12'"]),
    ("orders", "order_id,customer_id,timestamp,amount\n1,A,2024-01-01,1\n1,A,2024-01-02,2\n", 3, "order_id", ["duplicate order_id", "'1' (rows 2, 3)"]),
    ("orders", "order_id,customer_id,timestamp,amount\n1,A,,1\n", 2, "timestamp", ["empty timestamp"]),
    ("events", "event_id,customer_id,timestamp,type\ne1,A,2024-01-01,x\ne1,A,2024-01-01,y\n", 3, "event_id", ["duplicate event_id"]),
])
def test_bad_data_names_source_row_and_column(tmp_path, table, text, row, column, words):
    data = {"customers": source("customers", write(tmp_path, "data/c.csv", "customer_id\nA\nB\n"))}
    data[table] = source(table, write(tmp_path, f"data/{table}_in.csv", text))
    error = load_error(tmp_path, **data)
    assert (error.source, error.row, error.column) == (f"data/{table}_in.csv", row, column)
    message = str(error)
    assert message.startswith(f"data/{table}_in.csv, row {row}, column '{column}': ")
    for word in words:
        assert word in message


def test_bad_value_in_parquet_counts_rows_from_one(tmp_path):
    pd.DataFrame({"customer_id": ["A", "B", "A"]}).to_parquet(tmp_path / "c.parquet")
    error = load_error(tmp_path, customers=source("customers", "c.parquet"))
    assert (error.source, error.row, error.column) == ("c.parquet", 3, "customer_id")


def test_wrong_encoding_suggests_gbk(tmp_path):
    write(tmp_path, "c.csv", "customer_id,name,city\n1,Ann,Paris\n2,张三,上海\n", encoding="gbk")
    error = load_error(tmp_path, customers=source("customers", "c.csv"))
    assert (error.source, error.row, error.column) == ("c.csv", 3, "name")
    assert "encoding: gbk" in str(error)


def test_empty_tables(tmp_path):
    error = load_error(tmp_path, customers=source("customers", write(tmp_path, "c.csv", "customer_id,name\n")))
    assert error.source == "c.csv" and "no rows" in str(error)
    error = load_error(tmp_path, customers=source("customers", write(tmp_path, "z.csv", "")))
    assert error.source == "z.csv" and "empty" in str(error)
    tables = load_tables(settings(customers=source("customers", "data/x.csv") if False else
                                  source("customers", write(tmp_path, "c1.csv", "customer_id\n1\n")),
                                  orders=source("orders", write(tmp_path, "o.csv", "order_id,customer_id,timestamp,amount\n"))),
                         tmp_path)
    assert any("o.csv: the orders table has no rows" in w for w in tables.warnings)


def test_data_can_live_outside_the_workspace(tmp_path):
    """Personal data need not sit next to the rule files in git: a path outside the workspace,
    or a link to one, is read; errors name the file where it is."""
    root = tmp_path / "ws"
    root.mkdir()
    write(tmp_path, "exports/customers.csv", "customer_id,name\nC1,Ann\n")
    for path in ("../exports/customers.csv", str(tmp_path / "exports" / "customers.csv")):
        tables = load_tables(settings(customers=source("customers", path)), root)
        assert tables.customers["customer_id"].tolist() == ["C1"]
    (root / "link.csv").symlink_to(tmp_path / "exports" / "customers.csv")
    assert load_tables(settings(customers=source("customers", "link.csv")), root).customers["name"].tolist() \
        == ["Ann"]
    write(tmp_path, "exports/bad.csv", "customer_id\nC1\nC1\n")
    error = load_error(root, customers=source("customers", str(tmp_path / "exports" / "bad.csv")))
    assert str(tmp_path / "exports" / "bad.csv") in str(error) and "row 3" in str(error)


def test_missing_file_unknown_format_and_sqlite_table(tmp_path):
    assert "file not found" in str(load_error(tmp_path, customers=source("customers", "nope.csv")))
    write(tmp_path, "c.xlsx", "x")
    assert "format: csv" in str(load_error(tmp_path, customers=source("customers", "c.xlsx")))
    with sqlite3.connect(tmp_path / "crm.db") as conn:
        conn.execute("create table customer (customer_id text)")
    error = load_error(tmp_path, customers=SourceDef("customers", path=Path("crm.db"), sql_table="customers"))
    assert error.source == "crm.db (table customers)" and "did you mean table: customer" in str(error)


def test_customer_column_named_like_a_builtin_is_reported(tmp_path):
    write(tmp_path, "c.csv", "customer_id,age,tier\n1,30,gold\n")
    tables = load_tables(settings(customers=source("customers", "c.csv")), tmp_path)
    assert "age" not in tables.customers and "tier" not in tables.customers
    assert any("column 'age' has the name of a built-in feature" in w for w in tables.warnings)
    write(tmp_path, "d.csv", "customer_id,age\n1,30\n")
    tables = load_tables(settings(customers=source("customers", "d.csv", columns={"my_age": "age"})), tmp_path)
    assert tables.customers["my_age"].iloc[0] == 30
