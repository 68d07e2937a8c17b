"""The state store: one SQLite file per workspace, the memory of every run.

It holds runs, the offer outbox (one row per offer, unique by firing key), the
points ledger, trigger state (``becomes:`` edges, event watermarks), coupon codes,
redemptions, holdouts and campaign schedules. Contact history is the ``contacts``
view over offers that were not suppressed (``contacted_at`` = the offer's
send_at), backed by a covering index, so it can never disagree with the outbox.
A run records all of its offers in one transaction; delivery reads them back
from here, so a rerun or a crash at any point neither duplicates nor loses an offer.

Timestamps are ISO 8601 strings with an offset. Columns used in range queries
(``runs.as_of_utc``, ``offers.due_at`` = ``contacts.contacted_at``) are stored in
UTC so that they compare correctly as text; human-facing copies
(``offers.send_at``, ``offers.as_of``, ``runs.as_of``) keep the programme offset.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import orjson
import pandas as pd
import sqlite_utils

from engine.decide.evaluation import offer_id
from engine.errors import StateError
from engine.faults import checkpoint

log = logging.getLogger("loyalty.store")

SCHEMA_VERSION = 1
MAX_ATTEMPTS = 5          # delivery attempts before a failed offer is left alone
RUN_STATUSES = ("running", "recorded", "delivered", "failed")
OFFER_STATUSES = ("pending", "sent", "failed", "suppressed")
JSON_OFFER_COLUMNS = ("reward", "explanation")
JSON_RUN_COLUMNS = ("rule_hashes", "fingerprints", "campaigns", "timings", "counts")
# Reward fields that legitimately differ between two recordings of the same firing.
VOLATILE_REWARD_FIELDS = ("code", "expires_at")

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

# (version, DDL) in order; a database at version N gets every later entry applied.
MIGRATIONS: list[tuple[int, str]] = [(1, _SCHEMA_V1)]

_OFFER_COLUMNS = (
    "offer_id", "firing_key", "run_id", "campaign", "campaign_name", "customer_id",
    "channel", "variant", "reward", "cost", "send_at", "due_at", "subject", "body",
    "html", "address", "locale", "as_of", "explanation", "rule_version",
    "payload_hash", "status", "attempts", "created_at",
)


@dataclass(frozen=True)
class RecordResult:
    """What ``record_run`` did: new offers, already-recorded ones, and conflicts.

    A conflict is a firing key already recorded with a different payload (the
    rules changed between a crash and the rerun); nothing new is sent for it.
    """

    new: int
    existing: int
    conflicts: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _as_datetime(value: Any) -> datetime:
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
    return _as_datetime(value).isoformat(timespec="seconds")


@lru_cache(maxsize=4096)
def iso_utc(value: Any) -> str:
    """A tz-aware timestamp as ISO 8601 in UTC (``+00:00``): sorts correctly as text."""
    return _as_datetime(value).astimezone(timezone.utc).isoformat(timespec="seconds")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)   # payload hashes
_ORJSON = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _dumps(value: Any) -> str | None:
    """A stored JSON column (rewards, explanations, run details)."""
    if value is None:
        return None
    return orjson.dumps(value, option=_ORJSON, default=str).decode()


def _decode(row: dict, columns: Iterable[str]) -> dict:
    for name in columns:
        if row.get(name) is not None:
            row[name] = orjson.loads(row[name])
    return row


def new_run_id(as_of: Any) -> str:
    """A run's id: its ``as_of`` in UTC and a random suffix."""
    return f"{_as_datetime(as_of).astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def payload_hash(offer: Mapping[str, Any]) -> str:
    """Hash of what an offer *means*: campaign, customer, channel, variant and reward.

    Coupon codes, expiry dates and rendered text (which embeds them) are left
    out, so re-recording the same firing at a later ``as_of`` is "existing", while
    a changed reward, variant or channel is a conflict.
    """
    get = offer.get
    reward = {k: v for k, v in (get("reward") or {}).items() if k not in VOLATILE_REWARD_FIELDS}
    text = (f"{get('campaign')}\x1f{get('customer_id')}\x1f{get('channel')}\x1f"
            f"{get('variant')}\x1f{_JSON.encode(reward)}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _plain(value: Any) -> Any:
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


def _column_values(series: pd.Series) -> list:
    if series.dtype == object or isinstance(series.dtype, pd.StringDtype) or \
            str(series.dtype) in ("boolean", "Int64", "Float64") or \
            series.dtype.kind == "M" or series.isna().any():
        return [_plain(v) for v in series.tolist()]
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


# --------------------------------------------------------------------------- the store


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


class StateStore:
    """The one SQLite state file of a workspace (sqlite-utils, WAL mode).

    ``StateStore(path)`` creates the file and applies pending migrations; a file
    written by a newer version of loyalty raises StateError.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._pid = os.getpid()
        self._forked_reader: tuple[int, sqlite3.Connection] | None = None
        self._checkpointer: threading.Thread | None = None
        self.label = f"{self.path.parent.name}/{self.path.name}" if self.path.parent.name \
            else self.path.name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite_utils.Database(self.path)
            self.db.enable_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA cache_size = -131072")   # 128 MB: big runs stay in memory
            self.db.execute("PRAGMA wal_autocheckpoint = 0")  # done alongside: _checkpoint_behind
            # a log copied in full starts again from the top, cut back to this size
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_BYTES}")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.label}: cannot open the state database: {exc}") from exc

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

    def __enter__(self) -> "StateStore":
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
        if self.schema_version() == SCHEMA_VERSION:
            return                       # the usual case: no write lock needed
        with self._transaction() as conn:
            version = self.schema_version()          # again, under the write lock
            self._check_version(version)
            for target, script in MIGRATIONS:
                if target <= version:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES "
                             "('schema_version', ?)", (str(target),))

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

    # ----------------------------------------------------------------- runs

    def begin_run(self, as_of: Any, rule_hashes: Mapping[str, str],
                  fingerprints: Mapping[str, str], campaigns: Iterable[str] = (),
                  run_id: str | None = None) -> str:
        """Start a run at ``as_of`` (status ``running``); returns its run id (``run_id``,
        from ``new_run_id``, when the offers were prepared before the run began)."""
        as_of_dt = _as_datetime(as_of)
        run_id = run_id or new_run_id(as_of_dt)
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, as_of, as_of_utc, started_at, status, rule_hashes, "
                "fingerprints, campaigns) VALUES (?, ?, ?, ?, 'running', ?, ?, ?)",
                (run_id, iso(as_of_dt), iso_utc(as_of_dt), _now(), _dumps(dict(rule_hashes)),
                 _dumps(dict(fingerprints)), _dumps(list(campaigns))))
        return run_id

    def finish_run(self, run_id: str, status: str, timings: Mapping[str, float] | None = None,
                   counts: Mapping[str, Any] | None = None) -> None:
        """Close a run with a final status (recorded | delivered | failed)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self._transaction() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, timings = coalesce(?, timings), "
                "counts = coalesce(?, counts) WHERE run_id = ?",
                (status, _now(), _dumps(timings), _dumps(counts), run_id))

    def previous_run(self, before_as_of: Any = None) -> dict | None:
        """The latest recorded or delivered run (with ``as_of`` before the given one)."""
        sql = "SELECT * FROM runs WHERE status IN ('recorded', 'delivered')"
        params: list = []
        if before_as_of is not None:
            sql += " AND as_of_utc < ?"
            params.append(iso_utc(before_as_of))
        sql += " ORDER BY as_of_utc DESC, started_at DESC LIMIT 1"
        rows = list(self.db.query(sql, params))
        return _decode(rows[0], JSON_RUN_COLUMNS) if rows else None

    def runs(self, limit: int = 20) -> list[dict]:
        """The most recent runs, newest first."""
        rows = self.db.query("SELECT * FROM runs ORDER BY started_at DESC, rowid DESC LIMIT ?",
                             [limit])
        return [_decode(row, JSON_RUN_COLUMNS) for row in rows]

    # ----------------------------------------------------------------- recording

    def existing_offers(self, firing_keys: Iterable[str]) -> dict[str, str]:
        """firing key -> payload hash, for the given keys that are already recorded."""
        keys = list(dict.fromkeys(firing_keys))
        found: dict[str, str] = {}
        for start in range(0, len(keys), 50_000):
            found.update(self.db.execute(
                "SELECT firing_key, payload_hash FROM offers WHERE firing_key IN (SELECT value FROM json_each(?))",
                [json.dumps(keys[start:start + 50_000])]).fetchall())
        return found

    def recorded_at(self, firing_keys: Iterable[str] | None = None, before: str | None = None) -> dict[str, str]:
        """firing key -> as_of (UTC) of the run that recorded it: for the given keys (all
        recorded firings with None), of runs at an as_of before ``before`` (UTC ISO) if given."""
        sql = "SELECT o.firing_key, r.as_of_utc FROM offers o JOIN runs r ON r.run_id = o.run_id WHERE 1"
        params: list = []
        if before is not None:
            sql += " AND r.as_of_utc < ?"
            params.append(before)
        db = self._reader()
        if firing_keys is None:
            return dict(db.execute(sql, params).fetchall())
        keys = list(firing_keys)
        found: dict[str, str] = {}
        for start in range(0, len(keys), 50_000):
            found.update(db.execute(sql + " AND o.firing_key IN (SELECT value FROM json_each(?))",
                                         [*params, json.dumps(keys[start:start + 50_000])]).fetchall())
        return found

    @staticmethod
    def prepare_offers(offers: Iterable[Mapping[str, Any]], run_id: str) -> list[tuple[dict, dict]]:
        """The offers-table rows ``record_run`` writes for these offer dicts, with their
        rewards: the per-offer work of recording (JSON, payload hashes), which a caller may
        do ahead, e.g. in the processes that rendered the messages."""
        created = _now()
        with gc_paused():
            return [StateStore._offer_row(offer, run_id, created) for offer in offers]

    def record_run(self, run_id: str, offers: list[dict] = (),
                   trigger_state_rows: Iterable[dict] | pd.DataFrame = (),
                   points_rows: list[dict] | None = None,
                   holdouts: Iterable[dict] = (),
                   prepared: list[tuple[dict, dict]] | None = None) -> RecordResult:
        """Record a run's offers and state in ONE transaction; set the run ``recorded``.

        Offers are unique by ``firing_key``: an already-recorded key with the same
        payload hash is skipped, one with a different hash is a conflict (reported,
        nothing new stored or sent). New offers become contacts (``contacted_at``
        = send_at) and get their coupon code row (when ``reward.code``) and
        points ledger row. ``points_rows`` defaults to one row per new points
        offer (``reward.points``). ``trigger_state_rows`` (dicts or a frame with
        campaign, customer_id, key, value) are upserted. ``holdouts`` (campaign,
        customer_id, firing_key, group, as_of) log firings held out for uplift
        reports, once per firing key. ``prepared``: the offers as ``prepare_offers`` gave them,
        instead of ``offers``.
        """
        created = _now()
        if prepared is None:
            prepared = self.prepare_offers(offers, run_id)
        with gc_paused(), self._transaction() as conn:
            recorded = self.existing_offers(row["firing_key"] for row, _ in prepared)
            new_rows: list[tuple[dict, dict]] = []
            conflicts: list[dict] = []
            existing = 0
            for row, reward in prepared:
                prior = recorded.get(row["firing_key"])
                if prior is None:
                    recorded[row["firing_key"]] = row["payload_hash"]
                    new_rows.append((row, reward))
                elif prior == row["payload_hash"]:
                    existing += 1
                else:
                    conflicts.append({k: row[k] for k in (
                        "firing_key", "offer_id", "campaign", "customer_id", "payload_hash")}
                        | {"recorded_payload_hash": prior})
            self._insert(conn, "offers", _OFFER_COLUMNS,
                         (tuple(row.values()) for row, _ in new_rows))
            checkpoint("mid_transaction")
            self._insert_codes(conn, new_rows)
            if points_rows is None:
                points_rows = [self._points_row(row, reward) for row, reward in new_rows
                               if reward and reward.get("points") is not None]
            new_ids = {row["offer_id"] for row, _ in new_rows}
            self._insert(conn, "points_ledger",
                         ("entry_id", "offer_id", "customer_id", "points", "reason", "as_of"),
                         ((p.get("entry_id") or f"pts-{p.get('offer_id') or secrets.token_hex(8)}",
                           p.get("offer_id"), str(p["customer_id"]), _plain(p["points"]),
                           p.get("reason"), _plain(p.get("as_of")))
                          for p in points_rows
                          if p.get("offer_id") is None or p["offer_id"] in new_ids),
                         verb="INSERT OR IGNORE")
            self._upsert_trigger_state(conn, trigger_state_rows, created)
            self._insert(conn, "holdouts", ("firing_key", "run_id", "campaign", "customer_id",
                                            "holdout_group", "as_of"),
                         ((h["firing_key"], h.get("run_id") or run_id, h["campaign"],
                           str(h["customer_id"]), h.get("group"),
                           iso(h["as_of"]) if h.get("as_of") is not None else None)
                          for h in holdouts), verb="INSERT OR IGNORE")
            conn.execute("UPDATE runs SET status = 'recorded' WHERE run_id = ?", (run_id,))
        return RecordResult(new=len(new_rows), existing=existing, conflicts=conflicts)

    @staticmethod
    def _offer_row(offer: Mapping[str, Any], run_id: str, created: str) -> tuple[dict, dict]:
        """The offers-table row (keys in _OFFER_COLUMNS order) and the reward dict."""
        get = offer.get
        reward = get("reward")
        when = get("send_at") or get("as_of")
        as_of = get("as_of")
        row = {
            "offer_id": get("offer_id") or offer_id(offer["firing_key"]),
            "firing_key": offer["firing_key"],
            "run_id": get("run_id") or run_id,
            "campaign": get("campaign"),
            "campaign_name": get("campaign_name"),
            "customer_id": str(get("customer_id")),
            "channel": get("channel"),
            "variant": get("variant"),
            "reward": _dumps(reward),
            "cost": _plain(get("cost")),
            "send_at": iso(when),
            "due_at": iso_utc(when),
            "subject": get("subject"),
            "body": get("body"),
            "html": get("html"),
            "address": get("address"),
            "locale": get("locale"),
            "as_of": iso(as_of) if as_of is not None else None,
            "explanation": _dumps(get("explanation")),
            "rule_version": get("rule_version"),
            "payload_hash": get("payload_hash") or payload_hash(offer),
            "status": "pending",
            "attempts": 0,
            "created_at": created,
        }
        return row, reward

    @staticmethod
    def _points_row(row: dict, reward: dict) -> dict:
        return {"offer_id": row["offer_id"], "customer_id": row["customer_id"],
                "points": reward["points"], "reason": row["campaign"], "as_of": row["as_of"]}

    @staticmethod
    def _insert(conn: sqlite3.Connection, table: str, columns: tuple[str, ...],
                rows: Iterable[Iterable[Any]], verb: str = "INSERT") -> None:
        marks = ", ".join("?" * len(columns))
        conn.executemany(f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _insert_codes(self, conn: sqlite3.Connection, rows: list[tuple[dict, dict]]) -> None:
        codes = sorted((reward["code"], row["offer_id"], row["campaign"], row["customer_id"],
                        _plain(reward.get("expires_at")))
                       for row, reward in rows if reward and reward.get("code"))
        try:
            self._insert(conn, "coupon_codes",
                         ("code", "offer_id", "campaign", "customer_id", "expires_at"), codes)
        except sqlite3.IntegrityError as exc:
            raise StateError(f"{self.label}: a coupon code was issued twice ({exc}); "
                             "nothing was recorded, run again for fresh codes") from exc

    @staticmethod
    def _upsert_trigger_state(conn: sqlite3.Connection, rows: Iterable[dict] | pd.DataFrame,
                              updated: str) -> None:
        if isinstance(rows, pd.DataFrame):
            if rows.empty:
                return
            stamps = (_column_values(rows["updated_at"]) if "updated_at" in rows
                      else [updated] * len(rows))
            values = zip(rows["campaign"].astype(str).tolist(),
                         rows["customer_id"].astype(str).tolist(),
                         rows["key"].astype(str).tolist(),
                         _column_values(rows["value"]), stamps)
        else:
            values = ((r["campaign"], str(r["customer_id"]), r["key"], _plain(r.get("value")),
                       r.get("updated_at") or updated) for r in rows)
        conn.executemany(
            "INSERT INTO trigger_state (campaign, customer_id, key, value, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (campaign, key, customer_id) DO UPDATE SET "
            "value = excluded.value, updated_at = excluded.updated_at", values)

    # ----------------------------------------------------------------- reading state

    def contact_history(self, since: Any, until: Any = None) -> pd.DataFrame:
        """Contacts with ``since < contacted_at <= until``: customer_id, campaign,
        channel, contacted_at (tz-aware UTC). Suppressed offers are not contacts."""
        sql = ("SELECT customer_id, campaign, channel, contacted_at FROM contacts "
               "WHERE contacted_at > ?")
        params = [iso_utc(since)]
        if until is not None:
            sql += " AND contacted_at <= ?"
            params.append(iso_utc(until))
        frame = self._frame(sql, params, ["customer_id", "campaign", "channel", "contacted_at"])
        frame["contacted_at"] = pd.to_datetime(frame["contacted_at"], utc=True)
        return frame

    def last_contact_by_campaign(self, until: Any = None) -> pd.DataFrame:
        """Latest contact per campaign and customer (for cooldowns): campaign,
        customer_id, last_at (tz-aware UTC); only contacts at or before ``until``."""
        sql = "SELECT campaign, customer_id, max(contacted_at) FROM contacts"
        params: list = []
        if until is not None:
            sql += " WHERE contacted_at <= ?"
            params.append(iso_utc(until))
        sql += " GROUP BY campaign, customer_id"
        frame = self._frame(sql, params, ["campaign", "customer_id", "last_at"])
        frame["last_at"] = pd.to_datetime(frame["last_at"], utc=True)
        return frame

    def trigger_state(self, campaign: str, key: str | None = None) -> pd.DataFrame:
        """Stored trigger state of a campaign: customer_id, value (plus key when not given)."""
        if key is None:
            return self._frame("SELECT customer_id, key, value FROM trigger_state "
                               "WHERE campaign = ?", [campaign], ["customer_id", "key", "value"])
        return self._frame("SELECT customer_id, value FROM trigger_state "
                           "WHERE campaign = ? AND key = ?", [campaign, key],
                           ["customer_id", "value"])

    def points_balance(self) -> pd.DataFrame:
        """customer_id, points: the sum of the points ledger per customer."""
        return self._frame("SELECT customer_id, sum(points) FROM points_ledger "
                           "GROUP BY customer_id", [], ["customer_id", "points"])

    def offers_frame(self, campaign: str | None = None) -> pd.DataFrame:
        """Every recorded offer (without rendered text or addresses), for reports."""
        columns = ["offer_id", "run_id", "campaign", "customer_id", "channel", "variant",
                   "cost", "send_at", "as_of", "status", "attempts", "sent_at"]
        sql = f"SELECT {', '.join(columns)} FROM offers"
        params: list = []
        if campaign is not None:
            sql += " WHERE campaign = ?"
            params.append(campaign)
        return self._frame(sql, params, columns)

    def holdouts_frame(self, campaign: str | None = None) -> pd.DataFrame:
        """Firings held out (campaign, customer_id, firing_key, group, run_id, as_of)."""
        sql = ("SELECT campaign, customer_id, firing_key, holdout_group, run_id, as_of "
               "FROM holdouts")
        params: list = []
        if campaign is not None:
            sql += " WHERE campaign = ?"
            params.append(campaign)
        return self._frame(sql, params, ["campaign", "customer_id", "firing_key", "group",
                                         "run_id", "as_of"])

    def coupon_codes(self) -> pd.DataFrame:
        """code, offer_id, campaign, customer_id, expires_at of every issued code."""
        columns = ["code", "offer_id", "campaign", "customer_id", "expires_at"]
        return self._frame(f"SELECT {', '.join(columns)} FROM coupon_codes", [], columns)

    def record_redemptions(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Store redemptions (code, customer_id, order_id, amount, redeemed_at);
        a (code, order_id) pair already stored is ignored. Returns rows added."""
        values = [(r.get("redemption_id") or f"{r['code']}:{r['order_id']}", r["code"],
                   r.get("customer_id"), str(r["order_id"]), _plain(r.get("amount")),
                   _plain(r.get("redeemed_at"))) for r in rows]
        with self._transaction() as conn:
            before = conn.total_changes
            self._insert(conn, "redemptions", ("redemption_id", "code", "customer_id",
                                               "order_id", "amount", "redeemed_at"),
                         values, verb="INSERT OR IGNORE")
            return conn.total_changes - before

    def redemptions(self) -> pd.DataFrame:
        columns = ["redemption_id", "code", "customer_id", "order_id", "amount", "redeemed_at"]
        return self._frame(f"SELECT {', '.join(columns)} FROM redemptions", [], columns)

    def history(self, customer_id: str) -> list[dict]:
        """Every offer a customer got, oldest first, with its explanation."""
        rows = self.db.query("SELECT * FROM offers WHERE customer_id = ? "
                             "ORDER BY due_at, created_at, offer_id", [str(customer_id)])
        return [_decode(row, JSON_OFFER_COLUMNS) for row in rows]

    def _frame(self, sql: str, params: list, columns: list[str]) -> pd.DataFrame:
        return pd.DataFrame(self.db.execute(sql, params).fetchall(), columns=columns)

    # ----------------------------------------------------------------- the outbox

    def pending(self, now: Any, limit: int | None = None,
                max_attempts: int = MAX_ATTEMPTS) -> list[dict]:
        """Offers due for delivery: pending, or failed with attempts < max_attempts,
        and ``send_at <= now``; by send_at, then in recording order."""
        sql = ("SELECT * FROM offers WHERE (status = 'pending' OR (status = 'failed' "
               "AND attempts < ?)) AND due_at <= ? ORDER BY due_at, rowid")
        params: list = [max_attempts, iso_utc(now)]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_decode(row, JSON_OFFER_COLUMNS) for row in self.db.query(sql, params)]

    _DUE = ("(status = 'pending' OR (status = 'failed' AND attempts < ?)) AND due_at <= ?")

    def due_pages(self, now: Any, page: int = 20_000, limit: int | None = None,
                  max_attempts: int = MAX_ATTEMPTS,
                  columns: Iterable[str] | None = None) -> Iterator[list[dict]]:
        """``pending`` a page at a time (in the same order), so that a big delivery holds
        one page of offers in memory; ``columns``: the ones wanted (default: all but the
        ``explanation``, which is never sent). The order is read once: an offer marked while
        paging (failed, to be retried by a later delivery) is not read again."""
        params: list = [max_attempts, iso_utc(now)]
        order = [row[0] for row in self.db.execute(
            f"SELECT rowid FROM offers WHERE {self._DUE} ORDER BY due_at, rowid"
            + (" LIMIT ?" if limit is not None else ""), params + ([limit] if limit is not None else []))]
        known = [c.name for c in self.db["offers"].columns]
        columns = [c for c in known if c != "explanation"] if columns is None else list(columns)
        if unknown := set(columns) - set(known):
            raise ValueError(f"offers have no column(s) {sorted(unknown)}")
        select = (f"SELECT rowid, {', '.join(columns)} FROM offers "
                  "WHERE rowid IN (SELECT value FROM json_each(?))")
        decoded = [c for c in JSON_OFFER_COLUMNS if c in columns]
        for start in range(0, len(order), page):
            chunk = order[start:start + page]
            rows = {row[0]: dict(zip(columns, row[1:])) for row in self.db.execute(select, [json.dumps(chunk)])}
            yield [_decode(rows[rowid], decoded) for rowid in chunk if rowid in rows]

    def due_summary(self, now: Any, max_attempts: int = MAX_ATTEMPTS) -> dict[str, int]:
        """channel -> how many offers are due for delivery (what ``pending`` would return)."""
        return dict(self.db.execute(f"SELECT channel, count(*) FROM offers WHERE {self._DUE} GROUP BY channel",
                                    [max_attempts, iso_utc(now)]).fetchall())

    def not_due(self, now: Any) -> int:
        """How many pending offers wait for a later ``send_at`` (quiet hours)."""
        return self.db.execute("SELECT count(*) FROM offers WHERE status = 'pending' "
                               "AND due_at > ?", [iso_utc(now)]).fetchone()[0]

    def mark_many(self, sent: Iterable[str] = (), sent_at: Any = None,
                  failed: Iterable[tuple[str, str]] = (),
                  suppressed: Iterable[tuple[str, str]] = ()) -> None:
        """Record delivery outcomes of many offers in one transaction.

        ``sent``: offer ids handed to their channel at ``sent_at`` (default now);
        ``failed``: (offer_id, error), retried later until MAX_ATTEMPTS;
        ``suppressed``: (offer_id, reason), never sent and no longer a contact.
        """
        stamp = iso(sent_at) if sent_at is not None else _now()
        with self._transaction() as conn:
            conn.executemany("UPDATE offers SET status = 'sent', sent_at = ?, "
                             "attempts = attempts + 1, last_error = NULL WHERE offer_id = ?",
                             ((stamp, offer_id) for offer_id in sent))
            conn.executemany("UPDATE offers SET status = 'failed', attempts = attempts + 1, "
                             "last_error = ? WHERE offer_id = ?",
                             ((error, offer_id) for offer_id, error in failed))
            conn.executemany("UPDATE offers SET status = 'suppressed', last_error = ? "
                             "WHERE offer_id = ?",
                             ((reason, offer_id) for offer_id, reason in suppressed))

    def mark_sent(self, offer_id: str, sent_at: Any = None) -> None:
        """The offer was handed to its channel."""
        self.mark_many(sent=[offer_id], sent_at=sent_at)

    def mark_failed(self, offer_id: str, error: str) -> None:
        """A delivery attempt failed; retried by later deliveries until MAX_ATTEMPTS."""
        self.mark_many(failed=[(offer_id, error)])

    def mark_suppressed(self, offer_id: str, reason: str) -> None:
        """The offer will not be sent (e.g. consent withdrawn); it is no longer a contact."""
        self.mark_many(suppressed=[(offer_id, reason)])

    # ----------------------------------------------------------------- schedules

    def schedule_last_run(self, campaign: str) -> str | None:
        """When the campaign's schedule last ran (ISO 8601), or None."""
        row = self.db.execute("SELECT last_run_at FROM schedules WHERE campaign = ?",
                              [campaign]).fetchone()
        return row[0] if row else None

    def set_schedule_last_run(self, campaign: str, at: Any) -> None:
        with self._transaction() as conn:
            conn.execute("INSERT INTO schedules (campaign, last_run_at) VALUES (?, ?) "
                         "ON CONFLICT (campaign) DO UPDATE SET last_run_at = excluded.last_run_at",
                         (campaign, iso(at)))


def open_store(path: Path, create: bool) -> StateStore | None:
    """The state database at ``path``; None when it does not exist and ``create`` is false."""
    if not create and not path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return StateStore(path)
