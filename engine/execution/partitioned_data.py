"""Partitioned data: the workspace's tables rewritten as Parquet, one folder per customer partition.

The one storage of partitioned evaluation, local or on a cluster: a streamed preview
(``partitions.evaluate_streamed``) and a Dask worker evaluating partition ``p`` both read
``part-000p/customers.parquet``, ``orders.parquet`` and ``events.parquet`` and nothing
else, so no process ever holds more than one partition's rows. The files keep the
source's own column names and values (CSV cells stay text), so they are loaded with the
ordinary loader and the same ``columns:`` mapping, types and checks as the source.

Rows go to the partition of their customer id (``partition_numbers``, a stable hash).
The conversion streams each source (CSV, Parquet, SQLite or a SQL database) in batches,
so its memory is that of one batch whatever the table size, and it is done once: a
manifest records the partition count and each source's size and modification time, and
a stale or missing conversion is redone (``loyalty data convert`` does it ahead of time).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config.model import Settings, SourceDef
from engine.data.sources import FIRST_ROW_KEY, FORMATS, LABEL_KEY, ROW_COLUMN, _as_text, _label, _resolve, open_database
from engine.decide.assignment import stable_fraction
from engine.errors import DataError

TABLES = ("customers", "orders", "events", "point_redemptions")    # coupon redemptions are not evaluated
BATCH_ROWS = 1_000_000
FOLDER = Path(".loyalty") / "partitioned"
MANIFEST = "manifest.json"
PARTITION_SALT = "loyalty"            # independent of the programme's salt: partitions are not groups


def partition_numbers(customer_ids: pd.Series, count: int) -> np.ndarray:
    """The partition (0..count-1) of each customer id; the same id always lands in the same one."""
    if count <= 1:
        return np.zeros(len(customer_ids), dtype=np.int64)
    fraction = stable_fraction(pd.Series(customer_ids).astype(str), PARTITION_SALT, "partition")
    return np.minimum((fraction * count).astype(np.int64), count - 1)


def partitioned_folder(root: Path | str) -> Path:
    return Path(root) / FOLDER


def partition_folder(folder: Path, number: int) -> Path:
    return folder / f"part-{number:04d}"


def _source_stamp(source: SourceDef, root: Path) -> dict:
    """What identifies a source's content cheaply: its path, size and modification time."""
    if source.path is None:
        return {"url": source.url, "table": source.sql_table}
    path = _resolve(source, root)
    if not path.is_file():
        raise DataError(str(source.path), "file not found", hint="paths are relative to the workspace folder")
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "columns": dict(source.columns or {})}


LAYOUT = 2     # 2: each row's source position (ROW_COLUMN) and the source's label are kept


def _expected_manifest(settings: Settings, root: Path, count: int) -> dict:
    data = settings.data or {}
    return {"layout": LAYOUT, "partitions": count,
            "sources": {t: _source_stamp(data[t], root) for t in TABLES if data.get(t) is not None}}


def read_manifest(root: Path | str) -> dict | None:
    path = partitioned_folder(root) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(settings: Settings, root: Path | str, count: int) -> bool:
    """True when the partitioned copy exists for ``count`` partitions and every source is unchanged."""
    manifest = read_manifest(root)
    if manifest is None:
        return False
    expected = _expected_manifest(settings, Path(root), count)
    return {k: manifest.get(k) for k in expected} == expected


def estimated_customers(settings: Settings, root: Path | str) -> int | None:
    """The customers table's row count when it is cheap to know (Parquet metadata), else None."""
    source = (settings.data or {}).get("customers")
    if source is None or source.path is None:
        return None
    path = _resolve(source, Path(root))
    if (source.format or FORMATS.get(path.suffix.lower())) != "parquet" or not path.is_file():
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - the loader reports a broken file properly
        return None


def convert(settings: Settings, root: Path | str, count: int,
            progress: Callable[[str], None] | None = None) -> Path:
    """Rewrite customers, orders and events as ``count`` partition folders; return the folder.

    The previous conversion is replaced only once the new one is complete."""
    root = Path(root)
    folder = partitioned_folder(root)
    staging = folder.with_name(folder.name + ".new")
    _remove(staging)
    staging.mkdir(parents=True)
    data = settings.data or {}
    for table in TABLES:
        source = data.get(table)
        if source is None:
            continue
        _split_source(source, root, table, count, staging, progress)
    (staging / MANIFEST).write_text(json.dumps(_expected_manifest(settings, root, count), indent=1),
                                    encoding="utf-8")
    old = folder.with_name(folder.name + ".old")
    _remove(old)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    _remove(old)
    return folder


def ensure_partitioned(settings: Settings, root: Path | str, count: int,
                       progress: Callable[[str], None] | None = None) -> Path:
    """The partitioned copy for ``count`` partitions, converting first when it is missing or stale."""
    if not is_current(settings, root, count):
        convert(settings, root, count, progress)
    return partitioned_folder(root)


def partition_settings(settings: Settings, folder: Path, number: int) -> Settings:
    """``settings`` with every evaluated table read from partition ``number``'s Parquet files."""
    data = {}
    for table in TABLES:
        source = (settings.data or {}).get(table)
        if source is not None:
            path = partition_folder(folder, number) / f"{table}.parquet"
            data[table] = replace(source, path=path, url=None, sql_table=None, format="parquet")
    return replace(settings, data=data)


# --------------------------------------------------------------------------- splitting


def _split_source(source: SourceDef, root: Path, table: str, count: int, staging: Path,
                  progress: Callable[[str], None] | None = None) -> None:
    """Each row of the source to its customer's partition file, with its position in the
    source (ROW_COLUMN) and the source's label for the loader's messages."""
    id_column = dict(source.columns or {}).get("customer_id", "customer_id")
    path = _resolve(source, root) if source.path is not None else None
    fmt = (source.format or (FORMATS.get(path.suffix.lower()) if path else "sql") or "").lower()
    origin = {LABEL_KEY: _label(source, root.resolve(), path).encode(),
              FIRST_ROW_KEY: b"2" if fmt == "csv" else b"1"}
    writers: dict[int, pq.ParquetWriter] = {}
    schema = None
    offset = 0
    try:
        for batch in _batches(source, root):
            if progress is not None:
                progress(f"partitioning {table} into {count} partitions: {offset:,} rows done")
            batch = batch.append_column(ROW_COLUMN, pa.array(np.arange(offset, offset + batch.num_rows)))
            offset += batch.num_rows
            schema = schema or batch.schema.with_metadata(origin)
            batch = batch.cast(schema) if batch.schema != schema else batch
            if id_column not in batch.column_names:   # the loader names the missing column
                numbers = np.zeros(batch.num_rows, dtype=np.int64)
            else:
                ids = _as_text(batch.column(id_column).to_pandas())
                numbers = partition_numbers(ids, count)
            order = np.argsort(numbers, kind="stable")
            bounds = np.searchsorted(numbers[order], np.arange(count + 1))
            for number in range(count):
                rows = order[bounds[number]:bounds[number + 1]]
                if len(rows):
                    if number not in writers:
                        writers[number] = pq.ParquetWriter(_target(staging, number, table), schema)
                    writers[number].write_table(batch.take(pa.array(rows)))
    finally:
        for writer in writers.values():
            writer.close()
    if schema is None:
        schema = pa.schema([(ROW_COLUMN, pa.int64())], metadata=origin)
    for number in range(count):
        if number not in writers:   # an empty table with the source's columns
            pq.write_table(schema.empty_table(), _target(staging, number, table))


def _target(staging: Path, number: int, table: str) -> Path:
    part = partition_folder(staging, number)
    part.mkdir(exist_ok=True)
    return part / f"{table}.parquet"


def _batches(source: SourceDef, root: Path) -> Iterator[pa.Table]:
    """The source's rows in batches, with the values the loader would see."""
    path = _resolve(source, root) if source.path is not None else None
    fmt = (source.format or (FORMATS.get(path.suffix.lower()) if path else "sql") or "").lower()
    label = str(source.path or source.table)
    if path is not None and not path.is_file():
        raise DataError(label, "file not found", hint="paths are relative to the workspace folder")
    if fmt == "parquet":
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            yield pa.Table.from_batches([batch])
    elif fmt == "csv":
        yield from _csv_batches(source, path)
    elif fmt in ("sqlite", "sql"):
        yield from _sql_batches(source, path, fmt)
    else:
        raise DataError(label, f"unknown format '{fmt}'", hint="use csv, parquet, sqlite or a url")


def _csv_batches(source: SourceDef, path: Path) -> Iterator[pa.Table]:
    """CSV as text cells, read as ``sources`` reads it (empty cell = missing, nothing else)."""
    encoding = source.encoding or "utf-8"
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"
    delimiter = "\t" if path.suffix.lower() == ".tsv" and source.delimiter == "," else source.delimiter
    try:
        reader = pd.read_csv(path, dtype=str, encoding=encoding, sep=delimiter, keep_default_na=False,
                             na_values=[""], skipinitialspace=False, chunksize=BATCH_ROWS)
        for chunk in reader:
            chunk.columns = [str(c) for c in chunk.columns]
            schema = pa.schema([(c, pa.string()) for c in chunk.columns])
            yield pa.Table.from_pandas(chunk, schema=schema, preserve_index=False)
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(str(source.path), f"cannot be read as CSV ({exc})",
                        hint="run `loyalty validate` for the exact row") from exc


def _sql_batches(source: SourceDef, path: Path | None, fmt: str) -> Iterator[pa.Table]:
    table = source.sql_table or source.table
    quoted = '"' + table.replace('"', '""') + '"'
    if fmt == "sqlite":
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    else:
        connection = open_database(source, _label(source, Path("."), None))[0].connect()
    try:
        for chunk in pd.read_sql_query(f"select * from {quoted}", connection, chunksize=BATCH_ROWS):
            # SQL columns may mix types between batches: keep every value as its text
            text = {c: _as_text(chunk[c]).astype(object) for c in chunk.columns}
            yield pa.Table.from_pandas(pd.DataFrame(text), preserve_index=False,
                                       schema=pa.schema([(str(c), pa.string()) for c in chunk.columns]))
    finally:
        connection.close()


def _remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
