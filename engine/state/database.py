"""The state database: one SQLite file per workspace, its schema, transactions and run lock.

Timestamps are ISO 8601 strings with an offset. Columns used in range queries
(``runs.as_of_utc``, ``offers.due_at`` = ``contacts.contacted_at``) are stored in
UTC so that they compare correctly as text; human-facing copies
(``offers.send_at``, ``offers.as_of``, ``runs.as_of``) keep the programme offset.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson
import pandas as pd
import sqlite_utils

from engine.errors import StateError, UsageError

log = logging.getLogger("loyalty.store")

RESTORE_HINT = ("Restore the latest backup over it (`loyalty state backup FILE` makes one; see "
                "docs/operations.md), then run again; `loyalty state check` tells whether a file is sound")

SCHEMA_VERSION = 3
OFFER_STATUSES = ("pending", "sent", "failed", "suppressed")
JSON_OFFER_COLUMNS = ("reward", "explanation")

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, as_of TEXT NOT NULL, as_of_utc TEXT NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'recorded', 'delivered', 'failed')),
    rule_hashes TEXT, fingerprints TEXT, campaigns TEXT, timings TEXT, counts TEXT);
CREATE INDEX runs_as_of ON runs (as_of_utc);
CREATE TABLE offers (
    offer_id TEXT PRIMARY KEY, firing_key TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    campaign TEXT NOT NULL, campaign_name TEXT, customer_id TEXT NOT NULL,
    channel TEXT NOT NULL, variant TEXT, reward TEXT, cost REAL,
    send_at TEXT NOT NULL, due_at TEXT NOT NULL,
    subject TEXT, body TEXT, html TEXT, address TEXT, locale TEXT, as_of TEXT,
    explanation TEXT, rule_version TEXT, payload_hash TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'sent', 'failed', 'suppressed')),
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, sent_at TEXT,
    created_at TEXT NOT NULL);
CREATE INDEX offers_customer ON offers (customer_id);
CREATE INDEX offers_outbox ON offers (status, due_at);
CREATE INDEX offers_contacts ON offers (due_at, customer_id, campaign, channel)
    WHERE status != 'suppressed';
CREATE VIEW contacts AS
    SELECT offer_id, customer_id, campaign, channel, due_at AS contacted_at
    FROM offers WHERE status != 'suppressed';
CREATE TABLE points_ledger (
    entry_id TEXT PRIMARY KEY, offer_id TEXT UNIQUE, customer_id TEXT NOT NULL,
    points REAL NOT NULL, reason TEXT, as_of TEXT);
CREATE INDEX points_customer ON points_ledger (customer_id);
CREATE TABLE trigger_state (
    campaign TEXT NOT NULL, customer_id TEXT NOT NULL, key TEXT NOT NULL,
    value, updated_at TEXT,
    PRIMARY KEY (campaign, key, customer_id)) WITHOUT ROWID;
CREATE TABLE coupon_codes (
    code TEXT PRIMARY KEY, offer_id TEXT UNIQUE, campaign TEXT, customer_id TEXT,
    expires_at TEXT) WITHOUT ROWID;
CREATE TABLE redemptions (
    redemption_id TEXT PRIMARY KEY, code TEXT NOT NULL, customer_id TEXT,
    order_id TEXT NOT NULL, amount REAL, redeemed_at TEXT,
    UNIQUE (code, order_id));
CREATE INDEX redemptions_customer ON redemptions (customer_id);
CREATE TABLE holdouts (
    firing_key TEXT PRIMARY KEY, run_id TEXT, campaign TEXT NOT NULL,
    customer_id TEXT NOT NULL, holdout_group TEXT, as_of TEXT);
CREATE INDEX holdouts_customer ON holdouts (customer_id);
CREATE TABLE schedules (campaign TEXT PRIMARY KEY, last_run_at TEXT)
"""

# Stored tiers: each member's tier state now (member_tiers) and every change of it, with the
# state after it (tier_history), so that a rerun at an earlier instant reads the state of then.
_TIERS_V2 = """
CREATE TABLE member_tiers (
    customer_id TEXT PRIMARY KEY, tier TEXT, since TEXT, review_at TEXT, grace_until TEXT,
    trial_until TEXT, trial_from TEXT, run_id TEXT, as_of_utc TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX member_tiers_as_of ON member_tiers (as_of_utc);
CREATE TABLE tier_history (
    customer_id TEXT NOT NULL, from_tier TEXT, to_tier TEXT, reason TEXT NOT NULL, run_id TEXT,
    as_of TEXT NOT NULL, as_of_utc TEXT NOT NULL, seq INTEGER NOT NULL,
    since TEXT, review_at TEXT, grace_until TEXT, trial_until TEXT, trial_from TEXT,
    PRIMARY KEY (customer_id, as_of_utc, seq)) WITHOUT ROWID;
CREATE INDEX tier_history_as_of ON tier_history (as_of_utc)
"""

# Version 3 (issue 17, loyalty accounts): one-off firings that wait for a later run, and the
# reason a reward was granted without a message (an offer recorded as suppressed).
# ``first_as_of``, ``expires_at`` and ``status_as_of`` are UTC ISO text (they compare as text);
# ``status_as_of`` is the as_of of the run that last wrote the row, so that a rerun at the same
# as_of reads the firings as they stood before its first attempt.
_SCHEMA_V3 = """
CREATE TABLE pending_firings (
    firing_key TEXT PRIMARY KEY, campaign TEXT NOT NULL, customer_id TEXT NOT NULL,
    reason TEXT NOT NULL
        CHECK (reason IN ('consent', 'frequency_cap', 'cooldown', 'arbitration', 'budget', 'render')),
    first_as_of TEXT NOT NULL, expires_at TEXT NOT NULL, event TEXT,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'offered', 'expired', 'held_out')),
    status_as_of TEXT NOT NULL, updated_run TEXT REFERENCES runs (run_id)) WITHOUT ROWID;
CREATE INDEX pending_firings_open ON pending_firings (status, first_as_of);
CREATE INDEX pending_firings_changed ON pending_firings (status_as_of);
CREATE INDEX pending_firings_customer ON pending_firings (customer_id);
ALTER TABLE offers ADD COLUMN suppressed_reason TEXT
    CHECK (suppressed_reason IS NULL OR suppressed_reason IN ('consent', 'frequency_cap'));
CREATE INDEX offers_granted ON offers (due_at) WHERE suppressed_reason IS NOT NULL
"""

# (version, DDL) in order; a database at version N gets every later entry applied. Version 2
# (stored tiers) came after version 3 (pending firings): a file that reached version 3 without it
# gets it when it is opened (``_LATE``: a migration and a table only it makes).
MIGRATIONS: list[tuple[int, str]] = [(1, _SCHEMA_V1), (2, _TIERS_V2), (3, _SCHEMA_V3)]
_LATE = {2: "member_tiers"}
# --------------------------------------------------------------------------- helpers


def as_datetime(value: Any) -> datetime:
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    elif isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"timestamp must be timezone-aware, got {value!r}")
    return value


@lru_cache(maxsize=4096)   # a run's offers share a handful of send_at / as_of values
def iso(value: Any) -> str:
    """A tz-aware timestamp as ISO 8601 with its own offset, to the second."""
    return as_datetime(value).isoformat(timespec="seconds")


@lru_cache(maxsize=4096)
def iso_utc(value: Any) -> str:
    """A tz-aware timestamp as ISO 8601 in UTC (``+00:00``): sorts correctly as text."""
    return as_datetime(value).astimezone(timezone.utc).isoformat(timespec="seconds")


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_ORJSON = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def dumps_json(value: Any) -> str | None:
    """A stored JSON column (rewards, explanations, run details)."""
    if value is None:
        return None
    return orjson.dumps(value, option=_ORJSON, default=str).decode()


def decode_json(row: dict, columns: Iterable[str]) -> dict:
    for name in columns:
        if row.get(name) is not None:
            row[name] = orjson.loads(row[name])
    return row


def plain(value: Any) -> Any:
    """A value SQLite can store: numpy scalars, timestamps and NA made plain."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if hasattr(value, "item"):            # numpy scalar
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, bool):
        return int(value)
    return value


def column_values(series: pd.Series) -> list:
    if series.dtype == object or isinstance(series.dtype, pd.StringDtype) or \
            str(series.dtype) in ("boolean", "Int64", "Float64") or \
            series.dtype.kind == "M" or series.isna().any():
        return [plain(v) for v in series.tolist()]
    return series.tolist()


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while 200k small dicts are made (rows, records, a
    delivery's pages): the collector would rescan them over and over (a third of the time
    or more). For work that creates no reference cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------- storage failures

_FULL = ("disk is full", "database or disk is full", "no space left")
_READ_ONLY = ("readonly", "read-only")
_DAMAGED = ("malformed", "not a database", "file is encrypted")
_IO = ("disk i/o error",)


def storage_error(label: str, exc: BaseException, doing: str = "write") -> StateError:
    """A failure of the disk or of the state file itself as a StateError (exit 3) in plain
    words: disk full, read-only, damaged, or another outside failure."""
    text = str(exc).lower()
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or \
            any(word in text for word in _FULL):
        return StateError(f"cannot {doing} the state database {label}: the disk is full ({exc}). Nothing was "
                          "recorded or sent twice: free some space and run again")
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or \
            any(word in text for word in _READ_ONLY):
        return StateError(f"cannot {doing} the state database {label}: it or its folder is read-only ({exc}). "
                          "Give the user running loyalty write access to the state folder and run again")
    if isinstance(exc, OSError) and exc.errno == errno.EIO or any(word in text for word in _IO):
        return StateError(f"cannot {doing} the state database {label}: the disk reported an input/output error "
                          f"({exc}); it may be full or failing. Nothing was recorded or sent twice: check the free "
                          "space and the disk, then run again (`loyalty state check` tells whether the file is sound)")
    if any(word in text for word in _DAMAGED):
        return StateError(f"the state database {label} is damaged ({exc}); nothing was changed. {RESTORE_HINT}")
    return StateError(f"cannot {doing} the state database {label}: {exc}")


@contextmanager
def storage_failures(label: str, doing: str = "write") -> Iterator[None]:
    """Turn SQLite's and the operating system's storage errors into a StateError (exit 3)."""
    try:
        yield
    except (sqlite3.DatabaseError, OSError) as exc:
        raise storage_error(label, exc, doing) from exc


# --------------------------------------------------------------------------- the file


_HELD_LOCKS: set[int] = set()       # descriptors of the run locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child: close the run locks' descriptors it inherited. An flock belongs to
    the open file, so a worker process outliving a killed run would otherwise keep the
    workspace locked; closing a copy leaves the parent's lock as it is."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


# Checkpoints copy committed pages from the write-ahead log into the database file. SQLite
# does it inside the COMMIT that makes the log pass 1,000 pages, so a run's big commit would
# wait for its ~400 MB to be copied; here a thread with its own connection does it alongside.
WAL_CHECKPOINT_BYTES = 4 * 1024 * 1024       # SQLite's own threshold: 1,000 pages of 4 KB
_CHECKPOINT_THREAD = "loyalty-checkpoint"


def _checkpoint(path: Path) -> None:
    try:
        conn = sqlite3.connect(path, timeout=0)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:      # harmless: the pages stay in the log for the next one
        log.debug("checkpoint of %s not done: %s", path, exc)


def _finish_checkpoints() -> None:
    """Before a fork: no checkpoint thread may be inside SQLite (a child would inherit its
    locks without the thread that releases them)."""
    for thread in threading.enumerate():
        if thread.name == _CHECKPOINT_THREAD:
            thread.join()


os.register_at_fork(before=_finish_checkpoints, after_in_child=_drop_inherited_locks)


class Database:
    """The SQLite file under the state store: connection (sqlite-utils, WAL mode), schema
    and migrations, write transactions, checkpoints and the run lock.

    Opening it creates the file and applies pending migrations; a file written by a newer
    version of loyalty raises StateError.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._pid = os.getpid()
        self._forked_reader: tuple[int, sqlite3.Connection] | None = None
        self._checkpointer: threading.Thread | None = None
        self.label = f"{self.path.parent.name}/{self.path.name}" if self.path.parent.name \
            else self.path.name
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise StateError(f"{self.label} is empty (0 bytes), but a state database was expected: it may have "
                             f"been emptied by mistake. {RESTORE_HINT} (If this programme has never run, delete "
                             "the empty file and run again.)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite_utils.Database(self.path)
            self.db.enable_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA cache_size = -131072")   # 128 MB: big runs stay in memory
            self.db.execute("PRAGMA wal_autocheckpoint = 0")  # done alongside: _checkpoint_behind
            # a log copied in full starts again from the top, cut back to this size
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_BYTES}")
            self._migrate()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise storage_error(self.label, exc, "open") from exc

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the file; the last connection to close copies the rest of the log into it."""
        if self._checkpointer is not None:
            self._checkpointer.join()
        self.db.close()

    def _reader(self) -> sqlite3.Connection:
        """This process's connection for reads. A process forked from the one that opened the
        store (``parallel``: evaluation in several processes) must not touch the parent's
        connection (SQLite's rule for fork); it reads through its own, read-only one."""
        pid = os.getpid()
        if pid == self._pid:
            return self.db.conn
        if self._forked_reader is None or self._forked_reader[0] != pid:
            self._forked_reader = (pid, sqlite3.connect(f"file:{self.path}?mode=ro", uri=True))
        return self._forked_reader[1]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE): all of it commits, or none."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._checkpoint_behind()

    def _checkpoint_behind(self) -> None:
        """Once the log holds over WAL_CHECKPOINT_BYTES, copy it into the database file in a
        thread (PASSIVE: readers and writers go on meanwhile). Pages committed while one is
        under way wait for the next commit's, or for ``close``."""
        if self._checkpointer is not None and self._checkpointer.is_alive():
            return
        try:
            if os.path.getsize(f"{self.path}-wal") <= WAL_CHECKPOINT_BYTES:
                return
        except OSError:
            return
        self._checkpointer = threading.Thread(target=_checkpoint, args=(self.path,),
                                              name=_CHECKPOINT_THREAD, daemon=True)
        self._checkpointer.start()

    def schema_version(self) -> int:
        """The schema version recorded in ``meta`` (0 for an empty file)."""
        if not self.db["meta"].exists():
            return 0
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StateError(
                f"{self.label} was written by a newer version of loyalty (schema "
                f"{version}, this version knows {SCHEMA_VERSION}); upgrade loyalty")

    def _migrate(self) -> None:
        self._check_version(self.schema_version())
        if self.schema_version() == 0 and self.db["runs"].exists():
            raise StateError(f"the state database {self.label} is damaged (its schema version is lost); nothing "
                             f"was changed. {RESTORE_HINT}")
        if self.schema_version() == SCHEMA_VERSION and not self._skipped(SCHEMA_VERSION):
            return                       # the usual case: no write lock needed
        with self._transaction() as conn:
            version = self.schema_version()          # again, under the write lock
            self._check_version(version)
            skipped = self._skipped(version)
            for target, script in MIGRATIONS:
                if target <= version and target not in skipped:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES "
                             "('schema_version', ?)", (str(max(target, version)),))

    def _skipped(self, version: int) -> set[int]:
        """Migrations numbered at or below ``version`` that the file never got (``_LATE``)."""
        return {target for target, table in _LATE.items() if target <= version and not self.db[table].exists()}

    @contextmanager
    def lock(self, timeout: float = 5.0) -> Iterator[None]:
        """Exclusive cross-process run lock (``flock`` on ``<db>.lock``).

        Waits up to ``timeout`` seconds, then raises StateError. Hold it around a
        whole run or delivery so two schedulers never work on one workspace.
        """
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StateError(
                            f"another run is in progress on this workspace ({self.label}); "
                            "try again when it finishes") from None
                    time.sleep(0.05)
            _HELD_LOCKS.add(fd)
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                yield
            finally:
                _HELD_LOCKS.discard(fd)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


    @staticmethod
    def _insert(conn: sqlite3.Connection, table: str, columns: tuple[str, ...],
                rows: Iterable[Iterable[Any]], verb: str = "INSERT") -> None:
        marks = ", ".join("?" * len(columns))
        conn.executemany(f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _frame(self, sql: str, params: list, columns: list[str]) -> pd.DataFrame:
        return pd.DataFrame(self.db.execute(sql, params).fetchall(), columns=columns)

    def _pairs_for_keys(self, sql: str, params: list, column: str, keys: Iterable[str] | None) -> dict:
        """The (key, value) rows of ``sql`` (which ends in a WHERE clause) as a dict; with
        ``keys``, only the rows whose ``column`` is one of them, looked up 50,000 at a time."""
        db = self._reader()
        if keys is None:
            return dict(db.execute(sql, params).fetchall())
        keys = list(keys)
        found: dict = {}
        for start in range(0, len(keys), 50_000):
            found.update(db.execute(f"{sql} AND {column} IN (SELECT value FROM json_each(?))",
                                    [*params, orjson.dumps(keys[start:start + 50_000]).decode()]).fetchall())
        return found


def instant_bounds(column: str, before: str | None, through: str | None) -> tuple[list[str], list[str]]:
    """SQL conditions (and their parameters) keeping the rows whose ``column`` (a UTC ISO key)
    is before ``before`` and at or before ``through``, where given."""
    where, params = [], []
    if before is not None:
        where.append(f"{column} < ?")
        params.append(before)
    if through is not None:
        where.append(f"{column} <= ?")
        params.append(through)
    return where, params


# --------------------------------------------------------------------------- check and backup


@dataclass
class StateCheck:
    """What `loyalty state check` found: SQLite's integrity check, the schema, the runs."""

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    schema_version: int | None = None
    runs: int | None = None
    offers: int | None = None
    unfinished_runs: int | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def check_database(path: Path) -> StateCheck:
    """SQLite's full integrity check and foreign-key check of the state file, read-only."""
    label = str(path)
    if not path.is_file():
        return StateCheck(label, False, [f"{label} does not exist (the programme has not run yet?)"])
    if path.stat().st_size == 0:
        return StateCheck(label, False, [f"{label} is empty (0 bytes). {RESTORE_HINT}"])
    try:
        conn = _read_only(path)
        try:
            found = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall() if row[0] != "ok"]
            found += [f"offer row {row[1]} of {row[0]} points at a missing {row[2]} row"
                      for row in conn.execute("PRAGMA foreign_key_check").fetchall()]
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            counts = conn.execute("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM offers), "
                                  "(SELECT count(*) FROM runs WHERE status = 'running')").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return StateCheck(label, False, [f"{label} cannot be read as a state database ({exc}). {RESTORE_HINT}"])
    return StateCheck(label, not found, found, int(version[0]) if version else None, *counts)


def backup_database(path: Path, target: Path) -> Path:
    """A consistent copy of the state file made with SQLite's online backup (safe while a run
    writes), checked after copying; never over an existing file."""
    if not path.is_file() or path.stat().st_size == 0:
        raise StateError(f"there is no state database to back up at {path}")
    if target.exists():
        raise UsageError(f"{target} exists already: choose a new file name for the backup")
    target.parent.mkdir(parents=True, exist_ok=True)
    with storage_failures(str(target), "write the backup of"):
        source = _read_only(path)
        try:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
                copy.execute("PRAGMA journal_mode = DELETE")    # one self-contained file
            finally:
                copy.close()
        finally:
            source.close()
    checked = check_database(target)
    if not checked.ok:
        target.unlink(missing_ok=True)
        raise StateError(f"the backup of {path} failed its check ({'; '.join(checked.problems[:3])}): "
                         "the state database itself may be damaged; run `loyalty state check`")
    return target
