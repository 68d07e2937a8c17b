"""Offers: a run's offers recorded in one transaction, unique by firing key; contact history.

A rerun records nothing twice: a firing key already recorded with the same payload counts
as existing, with another payload as a conflict (nothing new is sent for it). Contact
history is the ``contacts`` view over offers that were not suppressed."""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import orjson
import pandas as pd

from engine.data.tiers import TierRun
from engine.decide.evaluation import offer_id
from engine.errors import StateError
from engine.faults import checkpoint
from engine.state.database import (
    JSON_OFFER_COLUMNS,
    decode_json,
    dumps_json,
    gc_paused,
    instant_bounds,
    iso,
    iso_utc,
    now_utc,
    plain,
)
from engine.state.pending import PendingFirings

# Reward fields that legitimately differ between two recordings of the same firing: the code
# and expiry, and the wording (``description``, derived from the other fields).
VOLATILE_REWARD_FIELDS = ("code", "expires_at", "description")
_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)   # payload hashes


_OFFER_COLUMNS = (
    "offer_id", "firing_key", "run_id", "campaign", "campaign_name", "customer_id",
    "channel", "variant", "reward", "cost", "send_at", "due_at", "subject", "body",
    "html", "address", "locale", "as_of", "explanation", "rule_version",
    "payload_hash", "status", "attempts", "created_at", "suppressed_reason",
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
    tier_moves: dict = field(default_factory=dict)      # stored tiers: the moves written, per tier


def payload_hash(offer: Mapping[str, Any]) -> str:
    """Hash of what an offer *means*: campaign, customer, channel, variant and reward.

    Coupon codes, expiry dates and rendered text (which embeds them) are left
    out, so re-recording the same firing at a later ``as_of`` is "existing", while
    a changed reward, variant or channel is a conflict.
    """
    get = offer.get
    return meaning_hash(get("campaign"), get("customer_id"), get("channel"), get("variant"),
                        reward_meaning(get("reward") or {}))


def reward_meaning(reward: Mapping[str, Any]) -> str:
    """The part of a reward that ``payload_hash`` counts, as text: one per reward, however many
    offers share it."""
    return _JSON.encode({k: v for k, v in reward.items() if k not in VOLATILE_REWARD_FIELDS})


def meaning_hash(campaign, customer_id, channel, variant, reward_text: str) -> str:
    """``payload_hash`` from its parts (``reward_text`` from ``reward_meaning``)."""
    text = f"{campaign}\x1f{customer_id}\x1f{channel}\x1f{variant}\x1f{reward_text}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]



class OfferBook(PendingFirings):
    """The ``offers``, ``holdouts`` and ``coupon_codes`` rows a run writes (with its pending
    firings), and what reads them back."""

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
        """firing key -> as_of (UTC) of the run that acted on it: that recorded its offer, or
        closed it as a pending firing that expired or was held out (``pending_firings``); for
        the given keys (all such firings with None), of runs at an as_of before ``before``
        (UTC ISO) if given. ``RunContext.recorded``: none of them fires again."""
        keys = None if firing_keys is None else list(firing_keys)
        where, params = instant_bounds("r.as_of_utc", before, None)
        sql = "SELECT o.firing_key, r.as_of_utc FROM offers o JOIN runs r ON r.run_id = o.run_id WHERE 1"
        return self.closed_firings(keys, before) | self._pairs_for_keys(" AND ".join([sql, *where]), params,
                                                                        "o.firing_key", keys)

    def budget_used(self, starts: Mapping[str, str], before: str) -> dict[str, tuple[int, float]]:
        """Campaign -> (offers, cost) recorded by runs at an as_of from its period's start up
        to, not including, ``before`` (UTC ISO): what a budget longer than a run has spent.
        Offers suppressed at delivery (an opt-out) cost nothing and do not count; rewards granted
        without a message (``suppressed_reason``) were given, and count."""
        used: dict[str, tuple[int, float]] = {}
        for campaign, start in starts.items():
            count, cost = self.db.execute(
                "SELECT count(*), coalesce(sum(o.cost), 0) FROM offers o JOIN runs r ON r.run_id = o.run_id "
                "WHERE o.campaign = ? AND (o.status != 'suppressed' OR o.suppressed_reason IS NOT NULL) "
                "AND r.as_of_utc >= ? AND r.as_of_utc < ?",
                [campaign, start, before]).fetchone()
            if count:
                used[campaign] = (int(count), float(cost))
        return used

    def _same_meaning(self, firing_key: str, new_hash: str) -> bool:
        """Whether the recorded offer of ``firing_key`` means what a payload hashing to
        ``new_hash`` means, by the hash of the recorded row as this version computes it (a row
        recorded by an earlier version, whose hash counted other fields, still matches)."""
        row = self.db.execute("SELECT campaign, customer_id, channel, variant, reward FROM offers "
                              "WHERE firing_key = ?", [firing_key]).fetchone()
        if row is None:
            return False
        recorded = dict(zip(("campaign", "customer_id", "channel", "variant"), row[:4]))
        recorded["reward"] = orjson.loads(row[4]) if row[4] else {}
        return payload_hash(recorded) == new_hash

    @staticmethod
    def prepare_offers(offers: Iterable[Mapping[str, Any]], run_id: str) -> list[tuple[dict, dict]]:
        """The offers-table rows ``record_run`` writes for these offer dicts, with their
        rewards: the per-offer work of recording (JSON, payload hashes), which a caller may
        do ahead, e.g. in the processes that rendered the messages."""
        created = now_utc()
        with gc_paused():
            return [OfferBook._offer_row(offer, run_id, created) for offer in offers]

    def record_run(self, run_id: str, offers: list[dict] = (),
                   trigger_state_rows: Iterable[dict] | pd.DataFrame = (),
                   points_rows: list[dict] | None = None,
                   holdouts: Iterable[dict] = (),
                   prepared: list[tuple[dict, dict]] | None = None,
                   pending: pd.DataFrame | None = None,
                   tiers: TierRun | None = None,
                   known: Iterable[Mapping[str, Any]] = (), absent: bool = False) -> RecordResult:
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
        instead of ``offers``. ``pending``: what the run decided about one-off firings that wait
        (``Evaluation.pending``), written to ``pending_firings`` in the same transaction. An offer
        with a ``suppressed_reason`` (a reward granted without a message) is recorded as
        ``suppressed``: never delivered and no contact, but its points are credited.
        ``tiers``: the run's moves of stored tiers, written with those of its newly recorded
        tier rewards (``tiers.TierBook``), granted with or without a message. ``known``: offers
        found recorded before their messages were rendered (firing_key, offer_id, campaign,
        customer_id, payload_hash and the recorded_payload_hash found, ``unrendered_offers``): they
        count as existing or as conflicts like the others, and are never written. ``absent``: the
        caller found none of the ``prepared`` offers recorded, under the run lock, so they are not
        looked up again (the unique firing key still refuses a second copy of one).
        """
        created = now_utc()
        if prepared is None:
            prepared = self.prepare_offers(offers, run_id)
        with gc_paused(), self._transaction() as conn:
            known = list(known)
            recorded = {} if absent else self.existing_offers(row["firing_key"] for row, _ in prepared)
            new_rows, existing, conflicts = self._sort_out(prepared, known, recorded)
            self._write_offers(conn, new_rows, points_rows)
            self._upsert_trigger_state(conn, trigger_state_rows, created)
            self._write_holdouts(conn, holdouts, run_id)
            self._write_pending(conn, pending, run_id)
            moved = self._record_tiers(conn, run_id, tiers, new_rows) if tiers is not None else {}
            conn.execute("UPDATE runs SET status = 'recorded' WHERE run_id = ?", (run_id,))
        return RecordResult(new=len(new_rows), existing=existing, conflicts=conflicts, tier_moves=moved)

    def _sort_out(self, prepared: Iterable[tuple[dict, dict]], known: Iterable[Mapping[str, Any]],
                  recorded: dict[str, str]) -> tuple[list[tuple[dict, dict]], int, list[dict]]:
        """The offers that are new, how many are recorded already with the same meaning, and
        the conflicts (recorded with another); ``recorded``: firing key -> recorded payload
        hash, which the new ones join."""
        recorded.update((row["firing_key"], row["recorded_payload_hash"]) for row in known)
        new_rows: list[tuple[dict, dict]] = []
        conflicts: list[dict] = []
        existing = 0
        for row, reward in itertools.chain(prepared, ((row, None) for row in known)):
            prior = recorded.get(row["firing_key"])
            if prior is None:
                recorded[row["firing_key"]] = row["payload_hash"]
                new_rows.append((row, reward))
            elif prior == row["payload_hash"] or self._same_meaning(row["firing_key"], row["payload_hash"]):
                existing += 1
            else:
                conflicts.append({k: row[k] for k in (
                    "firing_key", "offer_id", "campaign", "customer_id", "payload_hash")}
                    | {"recorded_payload_hash": prior})
        return new_rows, existing, conflicts

    def _write_offers(self, conn: sqlite3.Connection, new_rows: list[tuple[dict, dict]],
                      points_rows: list[dict] | None = None) -> None:
        """The new offers' rows, their coupon codes and their points (``points_rows``, by
        default one per new points offer)."""
        self._insert(conn, "offers", _OFFER_COLUMNS, (tuple(row.values()) for row, _ in new_rows))
        checkpoint("mid_transaction")
        self._insert_codes(conn, new_rows)
        if points_rows is None:
            points_rows = [self._points_row(row, reward) for row, reward in new_rows
                           if reward and reward.get("kind") == "points" and reward.get("points") is not None]
        new_ids = {row["offer_id"] for row, _ in new_rows}
        self._insert(conn, "points_ledger",
                     ("entry_id", "offer_id", "customer_id", "points", "reason", "as_of"),
                     ((p.get("entry_id") or f"pts-{p.get('offer_id') or secrets.token_hex(8)}",
                       p.get("offer_id"), str(p["customer_id"]), plain(p["points"]),
                       p.get("reason"), plain(p.get("as_of")))
                      for p in points_rows
                      if p.get("offer_id") is None or p["offer_id"] in new_ids),
                     verb="INSERT OR IGNORE")

    def _write_holdouts(self, conn: sqlite3.Connection, holdouts: Iterable[dict], run_id: str) -> None:
        """Firings held out, once per firing key."""
        self._insert(conn, "holdouts", ("firing_key", "run_id", "campaign", "customer_id",
                                        "holdout_group", "as_of"),
                     ((h["firing_key"], h.get("run_id") or run_id, h["campaign"],
                       str(h["customer_id"]), h.get("group"),
                       iso(h["as_of"]) if h.get("as_of") is not None else None)
                      for h in holdouts), verb="INSERT OR IGNORE")

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
            "reward": dumps_json(reward),
            "cost": plain(get("cost")),
            "send_at": iso(when),
            "due_at": iso_utc(when),
            "subject": get("subject"),
            "body": get("body"),
            "html": get("html"),
            "address": get("address"),
            "locale": get("locale"),
            "as_of": iso(as_of) if as_of is not None else None,
            "explanation": dumps_json(get("explanation")),
            "rule_version": get("rule_version"),
            "payload_hash": get("payload_hash") or payload_hash(offer),
            "status": "suppressed" if get("suppressed_reason") else "pending",
            "attempts": 0,
            "created_at": created,
            "suppressed_reason": get("suppressed_reason") or None,
        }
        return row, reward

    @staticmethod
    def _points_row(row: dict, reward: dict) -> dict:
        return {"offer_id": row["offer_id"], "customer_id": row["customer_id"],
                "points": reward["points"], "reason": row["campaign"], "as_of": row["as_of"]}

    def _insert_codes(self, conn: sqlite3.Connection, rows: list[tuple[dict, dict]]) -> None:
        codes = sorted((reward["code"], row["offer_id"], row["campaign"], row["customer_id"],
                        plain(reward.get("expires_at")))
                       for row, reward in rows if reward and reward.get("code"))
        try:
            self._insert(conn, "coupon_codes",
                         ("code", "offer_id", "campaign", "customer_id", "expires_at"), codes)
        except sqlite3.IntegrityError as exc:
            raise StateError(f"{self.label}: a coupon code was issued twice ({exc}); "
                             "nothing was recorded, run again for fresh codes") from exc

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

    def history(self, customer_id: str) -> list[dict]:
        """Every offer a customer got, oldest first, with its explanation."""
        rows = self.db.query("SELECT * FROM offers WHERE customer_id = ? "
                             "ORDER BY due_at, created_at, offer_id", [str(customer_id)])
        return [decode_json(row, JSON_OFFER_COLUMNS) for row in rows]
