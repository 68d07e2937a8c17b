"""Loading the customer data: customers, orders, events (and redemptions).

Each table comes from CSV, Parquet, a SQLite table or a SQL database by URL, with
the user's column names mapped to ours. Everything is loaded and validated before
anything is returned, so a run never works on half a data set. Customer ids are
factorised once here (``cust_code`` in orders and events) so that features can
aggregate on integer codes instead of text ids.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.config.catalogue import ACTIVITY_TABLES, BUILTIN_FEATURES, ID_COLUMNS, KNOWN_COLUMNS, REQUIRED_COLUMNS
from engine.config.model import Settings, SourceDef
from engine.config.settings import mask_secrets, normalise_locale, reveal
from engine.errors import DataError

# What users commonly call our required columns, for the "map it" hint.
SYNONYMS = {
    "customer_id": ("cust_id", "cust_no", "member_id", "member_no", "user_id", "client_id", "id",
                    "customer", "customer_no", "customerid", "会员号", "会员id", "客户id"),
    "order_id": ("id", "order_no", "order_number", "orderid", "订单号"),
    "event_id": ("id", "eventid", "event_no"),
    "timestamp": ("created_at", "order_time", "ordered_at", "time", "date", "datetime", "ts",
                  "event_time", "occurred_at", "下单时间", "时间"),
    "amount": ("total", "order_total", "price", "value", "revenue", "sales", "金额", "实付金额"),
    "type": ("event_type", "kind", "event", "name", "类型"),
}

TRUE_WORDS = {"true", "t", "yes", "y", "1", "是", "on"}
FALSE_WORDS = {"false", "f", "no", "n", "0", "否", "off"}
FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet",
           ".db": "sqlite", ".sqlite": "sqlite", ".sqlite3": "sqlite"}
MAX_EXAMPLES = 3
TABLE_ORDER = {"customers": 0, "orders": 1, "events": 2, "point_redemptions": 3}
TEXT = pd.StringDtype("pyarrow", na_value=np.nan)   # pandas' default "str"
MAX_NUMBER = 1e12        # numbers in the data (amounts, scores, ...) go from -1e12 to 1e12
_THOUSANDS = r"^[+-]?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]*)?$"    # 1,234 and 12,345,678.90
_OFFSET = re.compile(r"\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$", re.I)


@dataclass(frozen=True)
class Tables:
    """The loaded, validated data of a workspace."""

    customers: pd.DataFrame
    orders: pd.DataFrame
    events: pd.DataFrame
    redemptions: pd.DataFrame | None
    warnings: tuple[str, ...] = ()
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    types: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # table -> column -> type
    # points spent: redemption_id, customer_id, timestamp, points, source_row, cust_code (None: no table)
    point_redemptions: pd.DataFrame | None = None

    @classmethod
    def read_elsewhere(cls, warnings) -> "Tables":
        """No rows here: the data was read partition by partition (a streamed preview, the
        workers of a cluster); only what its loaders warned about."""
        return cls(customers=pd.DataFrame({"customer_id": pd.Series(dtype=str)}), orders=pd.DataFrame(),
                   events=pd.DataFrame(), redemptions=None, warnings=tuple(warnings))


def column_types(tables: Tables, table: str = "customers") -> dict[str, str]:
    """Column name -> type (number/string/bool/date/timestamp) of one loaded table."""
    return dict(tables.types.get(table, {}))


# --------------------------------------------------------------------------- reading


@dataclass
class _Raw:
    frame: pd.DataFrame
    label: str            # how messages name the source
    first_row: int        # the row number users see for the first data row
    fingerprint: str
    rows: np.ndarray | None = None   # a partitioned copy: each row's position in the source


# A partitioned copy of a source (partitioned_data) keeps each row's position in the source
# in this column, and the source's label and first row number in the Parquet metadata, so
# that messages about a partition can name the user's file and row.
ROW_COLUMN = "__loyalty_row"
LABEL_KEY = b"loyalty.label"
FIRST_ROW_KEY = b"loyalty.first_row"


class DataWarning(str):
    """A warning about the data: its text, and what merging the warnings of several
    partitions of one table into the text of one load needs (count, first examples)."""

    def __new__(cls, order: tuple, template: str, count: int | None = None,
                examples: tuple[tuple[int, str], ...] = (), everywhere: bool = False):
        text = template.replace("\0count\0", str(count)).replace(
            "\0examples\0", ", ".join(text for _, text in examples[:MAX_EXAMPLES]))
        warning = super().__new__(cls, text)
        warning.order, warning.template, warning.count = order, template, count
        warning.examples, warning.everywhere = tuple(examples[:MAX_EXAMPLES]), everywhere
        return warning

    def __reduce__(self):
        return DataWarning, (self.order, self.template, self.count, self.examples, self.everywhere)


def merge_warnings(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The warnings of one load from the warnings of its partitions' loads: counts summed,
    the first examples by source row, each once; a warning about an empty table only when
    every partition gave it."""
    merged: dict[tuple, list] = {}
    for warnings in parts:
        for warning in warnings:
            if not isinstance(warning, DataWarning):
                merged.setdefault((("~",), str(warning)), [warning, 0])[1] += 1
                continue
            key = (warning.order, warning.template)
            if key not in merged:
                merged[key] = [warning, 1]
                continue
            first, seen = merged[key]
            count = None if first.count is None else first.count + warning.count
            examples = tuple(sorted(first.examples + warning.examples))
            merged[key] = [DataWarning(first.order, first.template, count, examples, first.everywhere), seen + 1]
    kept = [(key, warning) for key, (warning, seen) in merged.items()
            if not getattr(warning, "everywhere", False) or seen == len(parts)]
    return tuple(warning for _, warning in sorted(kept, key=lambda item: item[0]))


def _label(source: SourceDef, root: Path, path: Path | None) -> str:
    if path is not None:
        try:
            text = path.relative_to(root).as_posix()
        except ValueError:
            text = str(path)
        return text + (f" (table {source.sql_table})" if source.sql_table else "")
    try:
        url = mask_secrets(sql().engine.make_url(source.url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - a malformed URL is reported when connecting
        url = "<database>"
    return f"{source.table} table '{source.sql_table or source.table}' at {url}"


def _resolve(source: SourceDef, root: Path) -> Path:
    """The data file: anywhere the operator points (settings resolved ``~`` and ``${VAR}``);
    relative paths are relative to the workspace, links are followed."""
    return (root.resolve() / Path(source.path).expanduser()).resolve()


def _format(source: SourceDef, path: Path | None, label: str) -> str:
    if source.format:
        return source.format.lower()
    if path is None:
        return "sql"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(label, f"cannot tell the format of '{path.name}' from its extension",
                        hint="say it in loyalty.yaml, e.g. format: csv (csv, parquet, sqlite)")
    return fmt


def _file_hash(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read(source: SourceDef, root: Path, as_source: bool = False) -> _Raw:
    path = _resolve(source, root) if source.path is not None else None
    if path is None and not source.url:
        raise DataError(f"data.{source.table}", "no path or url given",
                        hint=f"e.g. {source.table}: {{path: data/{source.table}.csv}}")
    label = _label(source, root.resolve(), path)
    fmt = _format(source, path, label)
    if path is not None and not path.is_file():
        raise DataError(label, "file not found", hint="relative paths are relative to the workspace folder; "
                        "absolute paths, ~ and ${VARIABLE} work too")
    if fmt == "csv":
        return _Raw(_read_csv(source, path, label), label, 2, _file_hash(path))
    if fmt == "parquet":
        try:
            frame = pd.read_parquet(path, engine="pyarrow")
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds
            raise DataError(label, f"not a readable Parquet file: {exc}") from exc
        raw = _Raw(frame, label, 1, _file_hash(path))
        if ROW_COLUMN in frame.columns:
            raw.rows = frame.pop(ROW_COLUMN).to_numpy(dtype=np.int64)
            metadata = pq.read_schema(path).metadata or {}
            if as_source and LABEL_KEY in metadata:
                raw.label = metadata[LABEL_KEY].decode()
                raw.first_row = int(metadata[FIRST_ROW_KEY])
            else:
                raw.rows = None
        return raw
    if fmt == "sqlite":
        return _Raw(_read_sqlite(source, path, label), label, 1, _file_hash(path))
    if fmt == "sql":
        frame = _read_sql_url(source, label)
        return _Raw(frame, label, 1, _frame_hash(frame))
    raise DataError(label, f"unknown format '{fmt}'", hint="use csv, parquet, sqlite or a url")


def _read_csv(source: SourceDef, path: Path, label: str) -> pd.DataFrame:
    encoding = source.encoding or "utf-8"
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"   # tolerate the byte-order mark spreadsheet programs write
    delimiter = source.delimiter
    if path.suffix.lower() == ".tsv" and delimiter == ",":
        delimiter = "\t"
    try:
        return pd.read_csv(path, dtype=str, encoding=encoding, sep=delimiter,
                           keep_default_na=False, na_values=[""], skipinitialspace=False)
    except UnicodeDecodeError as exc:
        raise _encoding_error(path, label, source.encoding or "utf-8", delimiter) from exc
    except LookupError as exc:
        raise DataError(label, f"unknown encoding '{source.encoding}'",
                        hint="e.g. encoding: utf-8, gbk, gb18030, big5, shift_jis, latin-1") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(label, "the file is empty (no header row)") from exc
    except pd.errors.ParserError as exc:
        raise DataError(label, f"not a well-formed CSV file: {exc}",
                        hint="check the delimiter (delimiter: ';') and quoting") from exc


def _encoding_error(path: Path, label: str, encoding: str, delimiter: str) -> DataError:
    data = path.read_bytes()
    row = column = None
    where = ""
    try:
        data.decode(encoding)
    except UnicodeDecodeError as exc:
        row = data[:exc.start].count(b"\n") + 1
        where = f" (byte {exc.start})"
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        before = data[line_start:exc.start].decode(encoding, errors="replace")
        header = data.split(b"\n", 1)[0].decode(encoding, errors="replace").strip().split(delimiter)
        index = before.count(delimiter)
        column = header[index].strip() if index < len(header) else None
    except LookupError:
        pass
    guesses = [enc for enc in ("utf-8", "gb18030", "big5", "shift_jis", "cp1252")
               if enc != encoding and _decodes(data, enc)]
    guess = guesses[0] if guesses else "gbk"
    if guess == "gb18030":
        guess = "gbk"   # the name users know; gb18030 is its superset
    return DataError(label, f"cannot read the file as {encoding}{where}", row=row, column=column,
                     hint=f"set the file's encoding in loyalty.yaml, e.g. encoding: {guess}")


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _read_sqlite(source: SourceDef, path: Path, label: str) -> pd.DataFrame:
    table = source.sql_table or source.table
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            names = [r[0] for r in conn.execute(
                "select name from sqlite_master where type in ('table', 'view')")]
            if table not in names:
                close = difflib.get_close_matches(table, names, n=1)
                hint = f"did you mean table: {close[0]}?" if close else f"its tables: {', '.join(names) or 'none'}"
                raise DataError(label, f"no table '{table}' in the database", hint=hint)
            quoted = '"' + table.replace('"', '""') + '"'
            return pd.read_sql_query(f"select * from {quoted}", conn)
    except sqlite3.DatabaseError as exc:
        raise DataError(label, f"not a readable SQLite database: {exc}") from exc


def sql():
    """SQLAlchemy, imported when a data source is a database URL: only those sources need it,
    and every other command would pay its 0.25 s of start-up."""
    import sqlalchemy  # optional at run time: only for `url:` sources
    import sqlalchemy.engine
    return sqlalchemy


def open_database(source: SourceDef, label: str):
    """An SQLAlchemy engine for a ``url:`` source, its password (``password: {env: NAME}``)
    read from the environment here; and the secrets to mask in messages. DataError when the
    URL or its driver is wrong."""
    password = reveal(source.password) if source.password is not None else None
    secrets = (password,) if password else ()
    try:
        url = sql().engine.make_url(source.url)
        if password is not None:
            url = url.set(password=password)
        return sql().create_engine(url), secrets
    except Exception as exc:  # noqa: BLE001 - bad URL, missing driver
        raise DataError(label, f"cannot open the database: {mask_secrets(str(exc), secrets)}",
                        hint="check the url and that its driver is installed") from None


def _read_sql_url(source: SourceDef, label: str) -> pd.DataFrame:
    """A table from a database URL; the password (``password: {env: NAME}``) is read from
    the environment here and masked in every message."""
    table = source.sql_table or source.table
    engine, secrets = open_database(source, label)
    try:
        with engine.connect() as conn:
            schema, _, name = table.rpartition(".")
            return pd.read_sql_table(name, conn, schema=schema or None)
    except ValueError as exc:
        raise DataError(label, f"no table '{table}' in the database") from exc
    except sql().exc.SQLAlchemyError as exc:
        raise DataError(label, f"cannot read from the database: {mask_secrets(str(exc), secrets)}") from None
    finally:
        engine.dispose()


def _frame_hash(frame: pd.DataFrame) -> str:
    digest = hashlib.sha256("\x1f".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- columns


def _apply_mapping(raw: _Raw, source: SourceDef) -> pd.DataFrame:
    frame = raw.frame
    frame.columns = [str(c).strip() for c in frame.columns]
    mapping = dict(source.columns or {})
    for ours, theirs in mapping.items():
        if theirs not in frame.columns:
            close = difflib.get_close_matches(theirs, list(frame.columns), n=1)
            hint = f"did you mean `{close[0]}`?" if close else ""
            raise DataError(raw.label, f"columns: maps {ours} to '{theirs}', which is not a column here;"
                            f" the columns are: {', '.join(frame.columns)}", column=theirs, hint=hint)
    renames = {theirs: ours for ours, theirs in mapping.items()}
    # A column already named like one of ours that the mapping replaces is dropped.
    shadowed = [c for c in frame.columns if c in mapping and c not in renames]
    frame = frame.drop(columns=shadowed).rename(columns=renames)
    if frame.columns.duplicated().any():
        dup = frame.columns[frame.columns.duplicated()][0]
        raise DataError(raw.label, "two columns have the same name", column=dup,
                        hint="rename one of them or map them with columns:")
    return frame


def _check_required(frame: pd.DataFrame, table: str, raw: _Raw) -> None:
    label = raw.label
    for column in REQUIRED_COLUMNS[table]:
        if column in frame.columns:
            continue
        there = list(frame.columns)
        candidates = [c for c in there if c.lower() in SYNONYMS.get(column, ())]
        candidates += difflib.get_close_matches(column, there, n=1, cutoff=0.5)
        hint = (f"if it is `{candidates[0]}`, map it in loyalty.yaml: "
                f"columns: {{{column}: {candidates[0]}}}" if candidates
                else f"map yours in loyalty.yaml, e.g. columns: {{{column}: your_column}}")
        raise DataError(label, f"missing required column '{column}'; the columns are: "
                        f"{', '.join(there) or '(none)'}", column=column, hint=hint,
                        row=1 if raw.first_row == 2 else None)


def _row(raw: _Raw, position: int) -> int:
    return raw.first_row + int(position if raw.rows is None else raw.rows[position])


def _examples(raw: _Raw, positions, values) -> tuple[tuple[int, str], ...]:
    """(row, "row N: value") of the first few positions."""
    return tuple((_row(raw, p), f"row {_row(raw, p)}: {getattr(v, 'item', lambda: v)()!r}") for p, v in
                 zip(list(positions)[:MAX_EXAMPLES], list(values)[:MAX_EXAMPLES]))


def _arrow(series: pd.Series) -> pa.Array:
    """A column as an Arrow array; mixed Python objects (e.g. from SQLite) become their text."""
    try:
        array = pa.array(series, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        text = series.map(lambda v: v if isinstance(v, str) else str(v), na_action="ignore")
        array = pa.array(text, from_pandas=True, type=pa.large_string())
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array


def _as_text(series: pd.Series) -> pd.Series:
    """Any column as stripped strings (integers without a trailing .0); empty text is NA."""
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=float, na_value=np.nan)
        present = values[~np.isnan(values)]
        # whole numbers without ".0"; infinity and floats past 2**53 cannot become integers
        if present.size and np.all(np.abs(present) < 2**53) and np.all(present == np.round(present)):
            series = series.astype("Int64")
    array = _arrow(series)
    if pa.types.is_null(array.type):
        array = array.cast(pa.large_string())
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = pc.cast(array, pa.large_string())
    array = pc.utf8_trim_whitespace(array)
    array = pc.if_else(pc.equal(array, ""), pa.scalar(None, array.type), array)
    return pd.Series(array, dtype=TEXT, index=series.index)


def _ids(raw: _Raw, frame: pd.DataFrame, column: str) -> pd.Series:
    ids = _as_text(frame[column])
    missing = ids.isna().to_numpy()
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise DataError(raw.label, f"empty {column}", row=_row(raw, first), column=column)
    return ids


_NUMBERED = re.compile(r"([^\d]*)(\d{1,18})")


@dataclass(frozen=True)
class _Numbered:
    """Ids written as one prefix and a fixed number of digits ("C000123456", "100234"), as
    most systems number customers and orders. Two ids of this shape are equal exactly when
    their numbers are, so they are compared as integers: far cheaper than hashing text."""

    prefix: str
    width: int          # characters of the whole id

    @classmethod
    def of(cls, array: pa.Array) -> "tuple[_Numbered, np.ndarray] | None":
        """The shape every id of ``array`` has and each id's number, or None."""
        if not len(array):
            return None
        first = array[0].as_py()
        match = _NUMBERED.fullmatch(first)
        if match is None or not match.group(1).isascii():
            return None
        shape = cls(match.group(1), len(first))
        numbers, fits = shape.numbers(array)
        return (shape, numbers) if fits is None else None

    def numbers(self, array: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
        """Each id's number (0 where the id has another shape) and which ids have this
        shape (None: all of them)."""
        fits = pc.equal(pc.utf8_length(array), self.width)
        if self.prefix:
            fits = pc.and_(fits, pc.starts_with(array, pattern=self.prefix))
        digits = pc.utf8_slice_codeunits(array, start=len(self.prefix), stop=self.width)
        fits = pc.and_(fits, pc.ascii_is_decimal(digits))
        if pc.all(fits).as_py():
            return pc.cast(digits, pa.int64()).to_numpy(), None
        mask = fits.to_numpy(zero_copy_only=False)
        numbers = np.zeros(len(array), dtype=np.int64)
        numbers[mask] = pc.cast(pc.filter(digits, fits), pa.int64()).to_numpy()
        return numbers, mask


def _dense(numbers: np.ndarray) -> bool:
    """Numbers close enough together for a table indexed by number."""
    return len(numbers) > 0 and int(numbers.max()) - int(numbers.min()) <= 4 * len(numbers) + 1024


def _has_duplicates(ids: pd.Series) -> bool:
    """Numbered ids: counted by number; others: a sort and a look at neighbours (several
    times faster than hashing every id)."""
    if len(ids) < 2:
        return False
    array = _arrow(ids)
    numbered = _Numbered.of(array)
    if numbered is not None:
        numbers = numbered[1]
        if _dense(numbers):
            return bool(np.bincount(numbers - numbers.min()).max() > 1)
        numbers = np.sort(numbers)
        return bool((numbers[1:] == numbers[:-1]).any())
    ordered = array.take(pc.sort_indices(array))
    return bool(pc.any(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))).as_py())


def _check_unique(raw: _Raw, ids: pd.Series, column: str) -> None:
    if not _has_duplicates(ids):
        return
    dup = ids.duplicated(keep=False).to_numpy()
    positions = np.flatnonzero(dup)
    groups: dict[str, list[int]] = {}
    for pos in positions[:1000]:
        groups.setdefault(ids.iat[pos], []).append(_row(raw, pos))
    shown = list(groups.items())[:MAX_EXAMPLES]
    text = "; ".join(f"'{k}' (rows {', '.join(map(str, v[:5]))})" for k, v in shown)
    first_dup = int(np.flatnonzero(ids.duplicated().to_numpy())[0])
    raise DataError(raw.label, f"duplicate {column}: {text}", row=_row(raw, first_dup),
                    column=column, hint=f"each {column} must appear once")


def _parse_timestamps(raw: _Raw, series: pd.Series, column: str, tz: str) -> pd.Series:
    """Timestamps as tz-aware in the programme's timezone; naive ones are local."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert(tz)
    if pd.api.types.is_datetime64_dtype(series.dtype):
        return _localize(series, tz)
    if series.dtype == object:
        array = _arrow(series)
        if pa.types.is_date(array.type):
            array = array.cast(pa.timestamp("us"))
        if pa.types.is_timestamp(array.type):
            return _parse_timestamps(raw, pd.Series(array.to_pandas(), index=series.index), column, tz)
    text = _as_text(series)
    present = text.notna().to_numpy()
    offsets = pc.match_substring_regex(_arrow(text), _OFFSET.pattern, ignore_case=True)
    aware = present & np.asarray(offsets.fill_null(False), dtype=bool)
    result = pd.Series(pd.NaT, index=series.index, dtype=f"datetime64[us, {tz}]")
    if aware.any():
        parsed = _to_datetime(text[aware], utc=True)
        result[aware] = parsed.dt.tz_convert(tz).dt.as_unit("us")
    naive = present & ~aware
    if naive.any():
        parsed = _to_datetime(text[naive], utc=False)
        if isinstance(parsed.dtype, pd.DatetimeTZDtype):   # "mixed" may still find an offset
            parsed = parsed.dt.tz_convert(tz).dt.tz_localize(None)
        result[naive] = _localize(parsed, tz).dt.as_unit("us")
    bad = present & result.isna().to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(raw.label, f"cannot read '{text.iat[first]}' as a date/time", row=_row(raw, first),
                        column=column, hint="write dates as 2024-03-31 or 2024-03-31 14:05:00 (+08:00)")
    return result


def _to_datetime(text: pd.Series, utc: bool) -> pd.Series:
    parsed = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=utc)
    failed = parsed.isna().to_numpy()
    if failed.any():   # slow path only for the rows the ISO parser could not read
        retry = text[failed]
        try:
            again = pd.to_datetime(retry, format="mixed", errors="coerce", utc=utc)
        except (ValueError, TypeError):
            again = pd.Series(pd.NaT, index=retry.index)
        if not utc and isinstance(again.dtype, pd.DatetimeTZDtype):
            again = again.dt.tz_localize(None)
        parsed = parsed.astype(again.dtype) if again.notna().any() else parsed
        parsed[failed] = again
    return parsed


def _localize(series: pd.Series, tz: str) -> pd.Series:
    """Naive local wall times -> aware; the first of two ambiguous times, a skipped time moves forward."""
    return series.dt.tz_localize(tz, ambiguous=np.ones(len(series), dtype=bool),
                                 nonexistent="shift_forward")


def _parse_dates(raw: _Raw, series: pd.Series, column: str, tz: str) -> pd.Series:
    """Calendar dates as naive midnight datetime64 (aware inputs converted to local time first)."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert(tz).dt.tz_localize(None).dt.normalize().astype("datetime64[us]")
    if pd.api.types.is_datetime64_dtype(series.dtype):
        return series.dt.normalize().astype("datetime64[us]")
    stamped = _parse_timestamps(raw, series, column, tz)
    return stamped.dt.tz_localize(None).dt.normalize().astype("datetime64[us]")


def _numbers_from_text(text: pd.Series) -> pd.Series:
    """Text as Float64; NA where it is not a number.

    A comma is a thousands separator only between groups of three digits before the decimal
    point (``1,234.50``, ``12,345,678``); any other comma (``1,2,3``, ``1,23``, ``1234,5``)
    makes the value unreadable rather than silently a different number. Out-of-range and
    infinite values come back as they are: ``_check_range`` refuses them.
    """
    if not text.notna().any():
        return pd.Series(pd.NA, index=text.index, dtype="Float64")
    array = _arrow(text)
    comma = np.asarray(pc.match_substring(array, ",").fill_null(False), dtype=bool)
    if comma.any():
        grouped = np.asarray(pc.match_substring_regex(array, _THOUSANDS).fill_null(False), dtype=bool)
        separated = text.str.replace(",", "", regex=False).where(grouped)   # a stray comma: NA
        text = text.where(~comma, separated)
    return pd.to_numeric(text, errors="coerce").astype("Float64")


def _check_range(raw: _Raw, numbers: pd.Series, column: str, shown: pd.Series | None = None) -> None:
    """Refuse infinite numbers and numbers beyond ±MAX_NUMBER, naming the first one's row.

    ``1e309`` and ``Infinity`` read as infinity, and an amount of 1e30 is a typing error that
    would make its customer platinum and turn sums, costs and budgets into nonsense.
    """
    values = numbers.to_numpy(dtype=float, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        bad = np.isinf(values) | (np.abs(values) > MAX_NUMBER)
    if not bad.any():
        return
    first = int(np.flatnonzero(bad)[0])
    written = shown.iat[first] if shown is not None else f"{values[first]:g}"
    if np.isinf(values[first]):
        raise DataError(raw.label, f"'{written}' is not a finite number", row=_row(raw, first),
                        column=column, hint="write an ordinary number, e.g. 1234.5")
    raise DataError(raw.label, f"'{written}' is out of range", row=_row(raw, first), column=column,
                    hint=f"numbers in the data go from -{MAX_NUMBER:,.0f} to {MAX_NUMBER:,.0f}")


def _parse_numbers(raw: _Raw, series: pd.Series, column: str, required: bool = False) -> pd.Series:
    """A number column as Float64: finite, within ±MAX_NUMBER, empty as NA (a DataError otherwise)."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        numbers = series.astype("Float64")
        _check_range(raw, numbers, column)
    else:
        text = _as_text(series)
        numbers = _numbers_from_text(text)
        bad = (text.notna() & numbers.isna()).to_numpy()
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise DataError(raw.label, f"cannot read '{text.iat[first]}' as a number",
                            row=_row(raw, first), column=column,
                            hint="numbers are written like 1234.5 or 1,234.5, without currency signs")
        _check_range(raw, numbers, column, text)
    if required:
        missing = numbers.isna().to_numpy()
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            raise DataError(raw.label, f"empty {column}", row=_row(raw, first), column=column)
    return numbers


def _parse_bools(raw: _Raw, series: pd.Series, column: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.astype("boolean")
    text = _as_text(series).str.lower()
    values = pd.Series(pd.NA, index=series.index, dtype="boolean")
    values[text.isin(TRUE_WORDS).to_numpy()] = True
    values[text.isin(FALSE_WORDS).to_numpy()] = False
    bad = (text.notna() & values.isna()).to_numpy()
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(raw.label, f"cannot read '{series.iat[first]}' as yes/no", row=_row(raw, first),
                        column=column, hint="use true/false, yes/no, 1/0 or 是/否")
    return values


def _usable_numbers(numbers: pd.Series) -> bool:
    """Every value present is finite and within ±MAX_NUMBER (what a number column may hold)."""
    values = numbers.dropna().to_numpy(dtype=float)
    return bool(np.all(np.abs(values) <= MAX_NUMBER))


def _infer_type(series: pd.Series) -> str:
    """number, bool, date or string, from the dtype or (for text) from every value present.

    An undeclared column is a number only when every value is a usable number (finite, within
    ±MAX_NUMBER); otherwise, like long codes such as 19-digit card numbers, it stays text
    instead of failing the load. Declared and known number columns are checked instead.
    """
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_numeric_dtype(dtype):
        return "number" if _usable_numbers(series.astype("Float64")) else "string"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "date"
    text = _as_text(series).dropna()
    if text.empty:
        return "string"
    numbers = _numbers_from_text(text)
    if numbers.notna().all() and _usable_numbers(numbers):
        return "number"
    lowered = text.str.lower()
    if lowered.isin(TRUE_WORDS | FALSE_WORDS).all():
        return "bool"
    if text.str.match(r"^\d{4}-\d{1,2}-\d{1,2}$").all() and \
            pd.to_datetime(text, format="ISO8601", errors="coerce").notna().all():
        return "date"
    return "string"


def _convert(raw: _Raw, frame: pd.DataFrame, column: str, kind: str, tz: str) -> pd.Series:
    series = frame[column]
    if kind == "number":
        return _parse_numbers(raw, series, column)
    if kind == "bool":
        return _parse_bools(raw, series, column)
    if kind == "date":
        return _parse_dates(raw, series, column, tz)
    if kind == "timestamp":
        return _parse_timestamps(raw, series, column, tz)
    if kind == "string":
        return _as_text(series).astype("string")
    raise DataError(raw.label, f"unknown type '{kind}'", column=column,
                    hint="fields: types are number, string, bool, date")


def _typed_columns(raw: _Raw, frame: pd.DataFrame, source: SourceDef, table: str,
                   tz: str) -> tuple[dict[str, pd.Series], dict[str, str]]:
    """Every non-required column converted to its declared, known or inferred type."""
    known = KNOWN_COLUMNS[table]
    columns, types = {}, {}
    for column in frame.columns:
        if column in REQUIRED_COLUMNS[table]:
            continue
        kind = (source.fields or {}).get(column) or known.get(column) or _infer_type(frame[column])
        columns[column] = _convert(raw, frame, column, kind, tz)
        types[column] = "date" if kind == "timestamp" and table == "customers" else kind
    return columns, types


# --------------------------------------------------------------------------- tables


def _valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ValueError, KeyError, OSError):
        return False
    return True


def _fallback_column(raw: _Raw, customers: pd.Series, values: pd.Series, column: str,
                     check, default: str, warnings: list[str]) -> pd.Series:
    """Validate a per-customer setting; invalid or empty values fall back to the programme's."""
    text = values.astype("str")
    codes, distinct = pd.factorize(text)            # a few distinct values among many rows
    verdicts = np.array([check(v) for v in distinct] + [None], dtype=object)   # code -1 (NA): None
    fixed = pd.Series(verdicts[codes], index=text.index, dtype="str")
    bad = (text.notna() & fixed.isna()).to_numpy()
    if bad.any():
        positions = np.flatnonzero(bad)
        examples = tuple((_row(raw, p), f"row {_row(raw, p)} customer {customers.iat[p]} '{text.iat[p]}'")
                         for p in positions[:MAX_EXAMPLES])
        warnings.append(DataWarning((0, 0 if column == "timezone" else 1),
                                    f"{raw.label}: \0count\0 customer(s) with an invalid {column}, "
                                    f"using the programme's {column} '{default}' for them (e.g. \0examples\0)",
                                    len(positions), examples))
    return fixed.fillna(default).astype("string")


def _load_customers(source: SourceDef, root: Path, settings: Settings, as_source: bool,
                    warnings: list[str]) -> tuple[pd.DataFrame, dict[str, str], _Raw, pd.Series]:
    raw = _read(source, root, as_source)
    frame = _apply_mapping(raw, source)
    _check_required(frame, "customers", raw)
    if frame.empty:
        raise DataError(raw.label, "the customers table has no rows")
    ids = _ids(raw, frame, "customer_id")
    _check_unique(raw, ids, "customer_id")
    columns, types = _typed_columns(raw, frame, source, "customers", settings.timezone)
    for column in ("email_opt_in", "sms_opt_in", "push_opt_in"):
        if column in columns:   # no answer is no consent
            columns[column] = columns[column].fillna(False).astype(bool)
    tz_values = columns.get("timezone", pd.Series(None, index=frame.index, dtype="str"))
    columns["timezone"] = _fallback_column(raw, ids, tz_values, "timezone",
                                           lambda v: v if _valid_timezone(v) else None,
                                           settings.timezone, warnings)
    locale_values = columns.get("locale", pd.Series(None, index=frame.index, dtype="str"))
    columns["locale"] = _fallback_column(raw, ids, locale_values, "locale", normalise_locale,
                                         settings.default_locale, warnings)
    types["timezone"] = types["locale"] = "string"
    for column in [c for c in columns if c in BUILTIN_FEATURES]:
        warnings.append(DataWarning((0, 2), f"{raw.label}: column '{column}' has the name of a built-in "
                                            f"feature and is ignored (to keep it, give it another name: "
                                            f"columns: {{my_{column}: {column}}})"))
        del columns[column], types[column]
    customers = pd.DataFrame({"customer_id": ids, **columns})
    customers.index = pd.RangeIndex(len(customers))
    return customers, {"customer_id": "string", **types}, raw, frame["customer_id"]


def _customer_codes(customer_ids: pd.Series, customer_raw: pd.Series, ids: pd.Series,
                    raw_ids: pd.Series) -> np.ndarray:
    """Position of each row's customer in the customers table (-1 when unknown)."""
    if pd.api.types.is_integer_dtype(customer_raw.dtype) and pd.api.types.is_integer_dtype(raw_ids.dtype):
        return pd.Index(customer_raw.to_numpy()).get_indexer(raw_ids.to_numpy()).astype(np.int64)
    known, wanted = _arrow(customer_ids), _arrow(ids)
    numbered = _Numbered.of(known)
    if numbered is None:
        found = pc.index_in(wanted, value_set=known)
        return np.asarray(found.fill_null(-1), dtype=np.int64)
    shape, customer_numbers = numbered
    numbers, fits = shape.numbers(wanted)       # an id of another shape is no customer's
    if _dense(customer_numbers):
        low = int(customer_numbers.min())
        table = np.full(int(customer_numbers.max()) - low + 2, -1, dtype=np.int64)   # last: not found
        table[customer_numbers - low] = np.arange(len(customer_numbers))
        slots = numbers - low
        outside = (slots < 0) | (slots >= len(table) - 1)
        if fits is not None:
            outside |= ~fits
        slots[outside] = len(table) - 1
        return table[slots]
    codes = pd.Index(customer_numbers).get_indexer(numbers).astype(np.int64)
    if fits is not None:
        codes[~fits] = -1
    return codes


@dataclass
class _Activity:
    """Orders or events read and validated, not yet linked to the customers."""

    raw: _Raw | None
    frame: pd.DataFrame
    types: dict[str, str]
    warnings: list[str]
    raw_ids: pd.Series | None = None     # customer_id as read (integer ids link without text)


def _read_activity(source: SourceDef | None, table: str, root: Path, settings: Settings,
                   as_source: bool = False) -> _Activity:
    """Orders or events read, validated and typed (needs nothing of the customers table)."""
    id_column = ID_COLUMNS[table]
    tz = settings.timezone
    warnings: list[str] = []
    if source is None:
        frame = _empty_activity(table, tz)
        return _Activity(None, frame, {c: KNOWN_COLUMNS[table][c] for c in REQUIRED_COLUMNS[table]}, warnings)
    raw = _read(source, root, as_source)
    frame = _apply_mapping(raw, source)
    _check_required(frame, table, raw)
    if frame.empty:
        warnings.append(DataWarning((TABLE_ORDER[table], 0), f"{raw.label}: the {table} table has no rows",
                                    everywhere=True))
    ids = _ids(raw, frame, id_column)
    _check_unique(raw, ids, id_column)
    cust = _ids(raw, frame, "customer_id")
    stamps = _parse_timestamps(raw, frame["timestamp"], "timestamp", tz).dt.as_unit("us")
    missing = stamps.isna().to_numpy()
    if missing.any():
        raise DataError(raw.label, "empty timestamp", row=_row(raw, int(np.flatnonzero(missing)[0])),
                        column="timestamp")
    columns: dict[str, pd.Series] = {id_column: ids, "customer_id": cust, "timestamp": stamps}
    types = {id_column: "string", "customer_id": "string", "timestamp": "timestamp"}
    if table == "orders":
        amount = _parse_numbers(raw, frame["amount"], "amount", required=True)
        columns["amount"] = amount.astype("float64")
        types["amount"] = "number"
        negative = np.flatnonzero(columns["amount"].to_numpy() < 0)
        if negative.size:
            warnings.append(DataWarning((1, 1), f"{raw.label}: \0count\0 order(s) with a negative amount, "
                                                f"counted as refunds (e.g. \0examples\0)", negative.size,
                                        _examples(raw, negative, columns['amount'].to_numpy()[negative])))
    elif table == "point_redemptions":
        points = _parse_numbers(raw, frame["points"], "points", required=True).astype("float64")
        negative = np.flatnonzero(points.to_numpy() <= 0)
        if negative.size:
            raise DataError(raw.label, f"a redemption of {points.iloc[negative[0]]:g} points",
                            row=_row(raw, int(negative[0])), column="points",
                            hint="points redeemed are a positive number; a refund of points is an order")
        columns["points"], types["points"] = points, "number"
        rows = np.arange(len(frame)) if raw.rows is None else np.asarray(raw.rows)
        columns["source_row"] = pd.Series(raw.first_row + rows, dtype="int64")
    else:
        kinds = _as_text(frame["type"])
        empty = kinds.isna().to_numpy()
        if empty.any():
            raise DataError(raw.label, "empty type", row=_row(raw, int(np.flatnonzero(empty)[0])), column="type")
        columns["type"], types["type"] = kinds, "string"
    extra, extra_types = _typed_columns(raw, frame, source, table, tz)
    columns.update(extra)
    types.update(extra_types)
    return _Activity(raw, pd.DataFrame(columns), types, warnings, frame["customer_id"])


def _link_activity(activity: _Activity, table: str, customers: pd.DataFrame, customer_raw: pd.Series,
                   warnings: list[str]) -> tuple[pd.DataFrame, dict[str, str], str | None]:
    """Each row's customer as ``cust_code``; rows of unknown customers dropped with a warning."""
    raw, result, types = activity.raw, activity.frame, activity.types
    if raw is None:
        return result, types, None
    cust = result["customer_id"]
    codes = _customer_codes(customers["customer_id"], customer_raw, cust, activity.raw_ids)
    unknown = np.flatnonzero(codes < 0)
    if unknown.size:
        warnings.append(DataWarning((TABLE_ORDER[table], 2), f"{raw.label}: \0count\0 {table[:-1]}(s) for "
                                    f"unknown customers dropped (e.g. \0examples\0)", unknown.size,
                                    _examples(raw, unknown, cust.to_numpy()[unknown])))
        keep = codes >= 0
        result, codes = result[keep], codes[keep]
    result["cust_code"] = codes
    return result.reset_index(drop=True), types, raw.fingerprint


def _empty_activity(table: str, tz: str) -> pd.DataFrame:
    columns = {c: pd.Series([], dtype="str") for c in REQUIRED_COLUMNS[table]}
    columns["timestamp"] = pd.Series([], dtype=f"datetime64[us, {tz}]")
    if table == "orders":
        columns["amount"] = pd.Series([], dtype="float64")
    columns["cust_code"] = pd.Series([], dtype="int64")
    return pd.DataFrame(columns)


def _load_redemptions(source: SourceDef, root: Path, settings: Settings,
                      customers: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str], str]:
    raw = _read(source, root)
    frame = _apply_mapping(raw, source)
    _check_required(frame, "redemptions", raw)
    cust = _ids(raw, frame, "customer_id")
    extra, types = _typed_columns(raw, frame, source, "redemptions", settings.timezone)
    result = pd.DataFrame({"customer_id": cust, **extra})
    found = pc.index_in(pa.array(cust), value_set=pa.array(customers["customer_id"]))
    result["cust_code"] = np.asarray(found.fill_null(-1), dtype=np.int64)
    return result, {"customer_id": "string", **types}, raw.fingerprint


def load_tables(settings: Settings, root: Path, *, as_source: bool = False) -> Tables:
    """Load, validate and link every table of ``settings.data``; raises DataError.

    Nothing is returned until every table has loaded and passed its checks. ``as_source``:
    messages about a partitioned copy (``partitioned_data``) name the user's source file
    and its row numbers, and merge across partitions with ``merge_warnings``.
    """
    root = Path(root)
    data = dict(settings.data or {})
    if "customers" not in data:
        raise DataError("loyalty.yaml", "no customers table under data:",
                        hint="e.g. data: {customers: {path: data/customers.csv}}")
    # The three tables load side by side (reading, parsing and checking are mostly Arrow and
    # numpy work, which runs outside the GIL); orders and events wait for the customers only
    # to be linked to them. Errors and warnings come in table order, as from one at a time.
    said: dict[str, list[str]] = {table: [] for table in ("customers", *ACTIVITY_TABLES)}
    with ThreadPoolExecutor(max_workers=1 + len(ACTIVITY_TABLES), thread_name_prefix="loyalty-load") as pool:
        loading = pool.submit(_load_customers, data["customers"], root, settings, as_source,
                              said["customers"])

        def activity(table: str):
            read = _read_activity(data.get(table), table, root, settings, as_source)
            said[table].extend(read.warnings)
            customers, _, _, customer_raw = loading.result()
            return _link_activity(read, table, customers, customer_raw, said[table])

        linking = {table: pool.submit(activity, table) for table in ACTIVITY_TABLES}
        customers, customer_types, raw, customer_raw = loading.result()
        fingerprints = {"customers": raw.fingerprint}
        types = {"customers": customer_types}
        frames = {}
        for table in ACTIVITY_TABLES:
            frame, table_types, fingerprint = linking[table].result()
            frames[table], types[table] = frame, table_types
            if fingerprint:
                fingerprints[table] = fingerprint
    point_redemptions = None
    if data.get("point_redemptions") is not None:
        said["point_redemptions"] = []
        read = _read_activity(data["point_redemptions"], "point_redemptions", root, settings, as_source)
        said["point_redemptions"].extend(read.warnings)
        point_redemptions, types["point_redemptions"], fingerprint = _link_activity(
            read, "point_redemptions", customers, customer_raw, said["point_redemptions"])
        fingerprints["point_redemptions"] = fingerprint
    warnings = [warning for table in said for warning in said[table]]
    redemptions = None
    if data.get("redemptions") is not None:
        redemptions, types["redemptions"], fingerprints["redemptions"] = _load_redemptions(
            data["redemptions"], root, settings, customers)
    return Tables(customers=customers, orders=frames["orders"], events=frames["events"],
                  redemptions=redemptions, warnings=tuple(warnings), fingerprints=fingerprints,
                  types=types, point_redemptions=point_redemptions)
