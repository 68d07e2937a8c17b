"""The state store: migrations, idempotent recording, conflicts, atomicity, the run lock."""

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from engine.decide.evaluation import offer_id
from engine.decide.rewards import generate_codes
from engine.errors import StateError
from engine.state import database
from engine.state.outbox import MAX_ATTEMPTS
from engine.state.store import StateStore

AS_OF = pd.Timestamp("2024-05-01 10:00", tz="Asia/Shanghai")
ROOT = Path(__file__).resolve().parents[2]


def make_offer(i: int, campaign: str = "winback", code: str | None = None, **changes) -> dict:
    code = code or f"{campaign[:3].upper()}{i:06d}"
    offer = {
        "offer_id": offer_id(f"{campaign}|c{i}|2024"), "firing_key": f"{campaign}|c{i}|2024",
        "campaign": campaign, "campaign_name": "沉睡客唤醒", "customer_id": f"c{i}",
        "channel": "sms", "variant": "A",
        "reward": {"kind": "coupon", "percent_off": 20, "min_spend": 100,
                   "code": code, "expires_at": "2024-05-15"},
        "cost": 4.0, "send_at": "2024-05-01T10:00:00+08:00", "subject": None,
        "body": f"您好, 优惠码 {code}", "html": None,
        "address": f"+8613800{i:06d}", "locale": "zh-CN", "as_of": AS_OF.isoformat(),
        "explanation": {"days_since_last_order": 61}, "rule_version": "v1",
    }
    offer.update(changes)
    return offer


def new_run(store: StateStore, as_of=AS_OF) -> str:
    return store.begin_run(as_of, {"rules/winback.yaml": "abc"}, {"customers": "f1"}, ["winback"])


def count(store: StateStore, table: str) -> int:
    return store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# --------------------------------------------------------------------------- schema


def test_new_file_is_created_at_the_current_schema_version(tmp_path):
    path = tmp_path / "state" / "loyalty.db"
    with StateStore(path) as store:
        assert store.schema_version() == database.SCHEMA_VERSION == 3
        tables = set(store.db.table_names())
        assert {"meta", "runs", "offers", "points_ledger", "trigger_state", "coupon_codes",
                "redemptions", "schedules", "holdouts", "pending_firings", "member_tiers", "tier_history"} <= tables
        assert "contacts" in store.db.view_names()
        assert "suppressed_reason" in {c.name for c in store.db["offers"].columns}
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with StateStore(path) as again:          # reopening migrates nothing
        assert again.schema_version() == 3


def test_pending_migrations_are_applied_in_order(tmp_path, monkeypatch):
    path = tmp_path / "loyalty.db"
    StateStore(path).close()
    later = database.SCHEMA_VERSION + 1
    monkeypatch.setattr(database, "MIGRATIONS", database.MIGRATIONS + [
        (later, "CREATE TABLE notes (note TEXT); INSERT INTO notes VALUES ('hello')")])
    monkeypatch.setattr(database, "SCHEMA_VERSION", later)
    with StateStore(path) as store:
        assert store.schema_version() == later
        assert store.db.execute("SELECT note FROM notes").fetchone() == ("hello",)


def test_a_file_at_version_1_gets_versions_2_and_3_applied_and_keeps_its_offers(tmp_path):
    """A file of version 1 gets the stored tiers (2) and the pending firings (3)."""
    path = tmp_path / "loyalty.db"
    with sqlite3.connect(path) as conn:        # a state file as version 1 wrote it
        conn.executescript(dict(database.MIGRATIONS)[1] + ";\nINSERT INTO meta VALUES ('schema_version', '1');")
        conn.execute("INSERT INTO runs (run_id, as_of, as_of_utc, started_at, status) "
                     "VALUES ('r1', '2026-11-23T10:00:00+08:00', '2026-11-23T02:00:00+00:00', 'x', 'recorded')")
        conn.execute("INSERT INTO offers (offer_id, firing_key, run_id, campaign, customer_id, channel, send_at, "
                     "due_at, payload_hash, created_at) VALUES ('of_1', 'k1', 'r1', 'c', 'C1', 'sms', "
                     "'2026-11-23T10:00:00+08:00', '2026-11-23T02:00:00+00:00', 'h', 'x')")
    assert [version for version, _ in database.MIGRATIONS] == [1, 2, 3]
    with StateStore(path) as store:
        assert store.schema_version() == 3
        assert {"member_tiers", "tier_history"} <= set(store.db.table_names())
        assert store.tier_history("C1") == []
        assert store.db.execute("SELECT firing_key, status, suppressed_reason FROM offers").fetchall() == \
            [("k1", "pending", None)]
        assert store.db.execute("SELECT count(*) FROM pending_firings").fetchone() == (0,)
        assert store.recorded_at(["k1"]) == {"k1": "2026-11-23T02:00:00+00:00"}


def test_a_file_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "state" / "loyalty.db"
    StateStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    with pytest.raises(StateError, match="newer version of loyalty"):
        StateStore(path)


# --------------------------------------------------------------------------- recording


def test_rerun_records_nothing_new(store):
    offers = [make_offer(i) for i in range(50)]
    first = store.record_run(new_run(store), offers)
    assert (first.new, first.existing, first.conflicts) == (50, 0, [])
    # a rerun draws fresh coupon codes and renders again: still the same firings
    rerun = [make_offer(i, code=f"OTHER{i:05d}") for i in range(50)]
    second = store.record_run(new_run(store), rerun)
    assert (second.new, second.existing, second.conflicts) == (0, 50, [])
    assert count(store, "offers") == count(store, "contacts") == count(store, "coupon_codes") == 50
    assert store.history("c3")[0]["reward"]["code"] == "WIN000003"


def test_a_changed_payload_is_a_conflict_and_keeps_the_recorded_offer(store):
    store.record_run(new_run(store), [make_offer(1), make_offer(2)])
    changed = make_offer(1, reward={"kind": "coupon", "percent_off": 30, "min_spend": 100,
                                    "code": "NEW1", "expires_at": "2024-05-15"})
    result = store.record_run(new_run(store), [changed, make_offer(2), make_offer(3)])
    assert (result.new, result.existing) == (1, 1)
    assert [c["firing_key"] for c in result.conflicts] == ["winback|c1|2024"]
    assert result.conflicts[0]["recorded_payload_hash"] != result.conflicts[0]["payload_hash"]
    assert store.history("c1")[0]["reward"]["percent_off"] == 20
    assert count(store, "offers") == 3


def test_a_reworded_description_is_the_same_offer_even_when_recorded_by_an_earlier_version(store):
    """Descriptions now carry the currency ("立减¥30券"); firings recorded by a version that
    hashed the old wording ("立减30元券") still count as recorded on a rerun, not as conflicts."""
    def legacy_hash(offer: dict) -> str:       # how loyalty 0.1 hashed: the description counted
        reward = {k: v for k, v in offer["reward"].items() if k not in ("code", "expires_at")}
        text = (f"{offer['campaign']}\x1f{offer['customer_id']}\x1f{offer['channel']}\x1f{offer['variant']}\x1f"
                + json.dumps(reward, ensure_ascii=False, sort_keys=True, default=str))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    old = make_offer(1, reward={"kind": "coupon", "amount_off": 30, "code": "OLD1", "description": "立减30元券"})
    old["payload_hash"] = legacy_hash(old)
    store.record_run(new_run(store), [old])
    reworded = make_offer(1, reward={"kind": "coupon", "amount_off": 30, "code": "NEW1", "description": "立减¥30券"})
    result = store.record_run(new_run(store), [reworded])
    assert (result.new, result.existing, result.conflicts) == (0, 1, [])
    changed = make_offer(1, reward={"kind": "coupon", "amount_off": 40, "code": "NEW2", "description": "立减¥40券"})
    assert len(store.record_run(new_run(store), [changed]).conflicts) == 1     # a real change still is one


def test_duplicate_firing_keys_within_one_batch_are_recorded_once(store):
    result = store.record_run(new_run(store), [make_offer(1), make_offer(1)])
    assert (result.new, result.existing) == (1, 1)


def test_everything_of_a_run_is_one_transaction(store):
    run_id = new_run(store)

    def state_rows():
        yield {"campaign": "winback", "customer_id": "c1", "key": "becomes", "value": 1}
        raise RuntimeError("the machine fell over mid-record")

    with pytest.raises(RuntimeError):
        store.record_run(run_id, [make_offer(i) for i in range(20)], state_rows())
    for table in ("offers", "contacts", "coupon_codes", "points_ledger", "trigger_state"):
        assert count(store, table) == 0, table
    assert store.runs(1)[0]["status"] == "running"
    assert store.record_run(run_id, [make_offer(i) for i in range(20)]).new == 20


def test_the_unique_code_index_is_the_last_guard(store):
    store.record_run(new_run(store), [make_offer(1, code="SAME")])
    with pytest.raises(StateError, match="coupon code was issued twice"):
        store.record_run(new_run(store), [make_offer(2), make_offer(3, code="SAME")])
    assert count(store, "offers") == 1


def test_points_ledger_trigger_state_and_holdouts(store):
    points_offer = make_offer(5, campaign="birthday",
                              reward={"kind": "points", "points": 200, "description": "生日积分"})
    run_id = new_run(store)
    state = pd.DataFrame({"campaign": "milestone", "customer_id": ["c1", "c2", "*"],
                          "key": "becomes", "value": [True, False, True]})
    holdouts = [{"campaign": "winback", "customer_id": "c9", "firing_key": "winback|c9|2024",
                 "group": "campaign", "as_of": AS_OF.isoformat()}]
    store.record_run(run_id, [points_offer, make_offer(1)], state, holdouts=holdouts)
    store.record_run(new_run(store), [points_offer], [
        {"campaign": "milestone", "customer_id": "c2", "key": "becomes", "value": "1"}],
        holdouts=holdouts)
    assert store.points_balance().to_dict("records") == [{"customer_id": "c5", "points": 200.0}]
    values = dict(store.trigger_state("milestone", "becomes").itertuples(index=False))
    assert values == {"c1": 1, "c2": "1", "*": 1}
    assert store.holdouts_frame()[["customer_id", "group"]].values.tolist() == [["c9", "campaign"]]


# --------------------------------------------------------------------------- reading


def test_outbox_compares_instants_not_text(store):
    store.record_run(new_run(store), [
        make_offer(1, send_at="2024-05-01T09:00:00+08:00"),     # 01:00 UTC
        make_offer(2, send_at="2024-05-01T03:30:00+00:00"),     # 03:30 UTC
    ])
    now = pd.Timestamp("2024-05-01 02:00", tz="UTC")            # 10:00 in Shanghai
    assert [o["customer_id"] for o in store.pending(now)] == ["c1"]
    assert store.not_due(now) == 1
    assert store.pending(now)[0]["reward"]["percent_off"] == 20  # JSON decoded


def test_due_pages_read_the_outbox_in_order_a_page_at_a_time(store):
    store.record_run(new_run(store), [make_offer(i, send_at=f"2024-05-01T0{i % 3}:00:00+00:00")
                                      for i in range(7)])
    now = pd.Timestamp("2024-05-01 08:00", tz="UTC")
    everything = store.pending(now)
    pages = list(store.due_pages(now, page=3))
    assert [len(p) for p in pages] == [3, 3, 1]
    without_explanation = [{k: v for k, v in o.items() if k != "explanation"} for o in everything]
    assert [o for page in pages for o in page] == without_explanation  # same rows, order, decoding
    sending = ("offer_id", "reward", "subject")                        # only what a sender needs
    assert [o for page in store.due_pages(now, page=3, columns=sending) for o in page] == \
        [{k: o[k] for k in sending} for o in everything]
    with pytest.raises(ValueError, match="no column"):
        next(store.due_pages(now, columns=("offer_id", "subjet")))
    assert [len(p) for p in store.due_pages(now, page=3, limit=5)] == [3, 2]
    assert store.due_summary(now) == {everything[0]["channel"]: 7}
    seen = []
    for page in store.due_pages(now, page=2):                           # marked while paging
        seen += [o["offer_id"] for o in page]
        store.mark_failed(page[0]["offer_id"], "HTTP 503")
    assert seen == [o["offer_id"] for o in everything]                   # each read once


def test_delivery_marks_and_retry_limit(store):
    store.record_run(new_run(store), [make_offer(i) for i in range(3)])
    now = AS_OF + pd.Timedelta(hours=1)
    ids = [o["offer_id"] for o in store.pending(now)]
    store.mark_sent(ids[0], now)
    store.mark_suppressed(ids[1], "no consent for sms at delivery")
    for _ in range(MAX_ATTEMPTS):
        assert [o["offer_id"] for o in store.pending(now)] == [ids[2]]
        store.mark_failed(ids[2], "HTTP 503 Service Unavailable")
    assert store.pending(now) == []
    by_id = {o["offer_id"]: o for o in store.history("c0") + store.history("c1") + store.history("c2")}
    assert by_id[ids[0]]["status"] == "sent" and by_id[ids[0]]["attempts"] == 1
    assert by_id[ids[1]]["status"] == "suppressed"
    assert by_id[ids[2]]["attempts"] == 5 and by_id[ids[2]]["last_error"].startswith("HTTP 503")
    # a suppressed offer is not a contact for frequency caps
    contacts = store.contact_history(AS_OF - pd.Timedelta(days=7))
    assert sorted(contacts["customer_id"]) == ["c0", "c2"]
    assert str(contacts["contacted_at"].dt.tz) == "UTC"


def test_contact_history_windows_and_last_contact(store):
    first = AS_OF - pd.Timedelta(days=10)
    store.record_run(new_run(store, first), [make_offer(1, send_at=first.isoformat())])
    store.record_run(new_run(store), [make_offer(1, campaign="birthday"),
                                      make_offer(2, campaign="birthday")])
    recent = store.contact_history(AS_OF - pd.Timedelta(days=7))
    assert sorted(recent["customer_id"]) == ["c1", "c2"]
    assert len(store.contact_history(AS_OF - pd.Timedelta(days=30), until=first)) == 1
    last = store.last_contact_by_campaign()
    assert len(last) == 3
    mine = last[(last.campaign == "winback") & (last.customer_id == "c1")]["last_at"].iloc[0]
    assert mine == first
    assert len(store.last_contact_by_campaign(until=first)) == 1


def test_runs_previous_run_and_schedules(store):
    early = new_run(store, AS_OF - pd.Timedelta(days=1))
    store.record_run(early, [])
    late = new_run(store)
    store.finish_run(late, "failed", {"total": 1.5}, {"new": 0})
    assert store.previous_run()["run_id"] == early
    assert store.previous_run(before_as_of=AS_OF - pd.Timedelta(days=1)) is None
    latest = store.runs(1)[0]
    assert latest["run_id"] == late and latest["timings"] == {"total": 1.5}
    assert latest["as_of"] == "2024-05-01T10:00:00+08:00"
    assert store.schedule_last_run("winback") is None
    store.set_schedule_last_run("winback", AS_OF)
    assert store.schedule_last_run("winback") == "2024-05-01T10:00:00+08:00"


def test_redemptions_are_unique_by_code_and_order(store):
    rows = [{"code": "A1", "customer_id": "c1", "order_id": "o1", "amount": 99.0,
             "redeemed_at": "2024-05-02T12:00:00+08:00"}]
    assert store.record_redemptions(rows) == 1
    assert store.record_redemptions(rows) == 0
    assert len(store.redemptions()) == 1


# --------------------------------------------------------------------------- coupon codes


def test_coupon_codes_are_unique_unambiguous_and_avoid_existing():
    codes = generate_codes(50_000, prefix="VIP-", length=8)
    assert len(set(codes)) == 50_000
    assert all(c.startswith("VIP-") and len(c) == 12 for c in codes)
    assert not set("".join(c[4:] for c in codes)) & set("01OIL")
    again = generate_codes(1_000, prefix="VIP-", length=8, taken=codes)
    assert not set(again) & set(codes)
    with pytest.raises(ValueError):
        generate_codes(1, length=4)


# --------------------------------------------------------------------------- the run lock

HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from engine.state.store import StateStore
    store = StateStore({path!r})
    with store.lock():
        print("locked", flush=True)
        sys.stdin.read()          # hold the lock until the test closes our stdin
""")


def test_the_run_lock_excludes_another_process(tmp_path):
    path = tmp_path / "state" / "loyalty.db"
    StateStore(path).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), path=str(path))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with StateStore(path) as store:
            started = time.monotonic()
            with pytest.raises(StateError) as caught:
                with store.lock(timeout=0.3):
                    pass
            assert time.monotonic() - started >= 0.3
            assert str(caught.value) == ("another run is in progress on this workspace "
                                         "(state/loyalty.db); try again when it finishes")
            holder.stdin.close()
            holder.wait(timeout=10)
            with store.lock(timeout=2):        # free again once the holder is gone
                pass
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- speed


def test_recording_200k_offers(store, capsys):
    codes = generate_codes(200_000, "W-", 10)
    offers = [make_offer(i, code=codes[i]) for i in range(200_000)]
    run_id = new_run(store)
    started = time.perf_counter()
    result = store.record_run(run_id, offers)
    elapsed = time.perf_counter() - started
    assert result.new == 200_000
    with capsys.disabled():
        print(f"\nrecorded 200,000 offers in {elapsed:.2f} s")


def test_a_big_commit_is_copied_into_the_database_file_and_the_log_cut_back(tmp_path, monkeypatch):
    """A run's big commit does not wait for its pages to be copied out of the write-ahead log
    (a thread does it); afterwards the log is cut back to its limit, and once the store is
    closed the state file alone, as a backup would copy it, holds every offer."""
    limit = 64 * 1024
    monkeypatch.setattr(database, "WAL_CHECKPOINT_BYTES", limit)
    path = tmp_path / "state" / "loyalty.db"
    wal = path.with_name("loyalty.db-wal")
    store = StateStore(path)
    store.record_run(new_run(store), [make_offer(i) for i in range(2_000)])
    assert wal.stat().st_size > limit                  # the commit wrote well past the limit
    assert store.offers_frame().shape[0] == 2_000      # and reads go on meanwhile
    store.close()
    assert not wal.exists()
    backup = tmp_path / "backup" / "loyalty.db"
    backup.parent.mkdir()
    backup.write_bytes(path.read_bytes())              # the file alone, without its log
    with sqlite3.connect(backup) as conn:
        assert conn.execute("SELECT count(*) FROM offers").fetchone()[0] == 2_000

    store = StateStore(path)                           # then a delivery's small commits:
    store.record_run(new_run(store, "2024-05-02T10:00:00+08:00"),
                     [make_offer(i, campaign="birthday") for i in range(2_000)])
    assert wal.stat().st_size > limit
    ids = iter(o["offer_id"] for o in store.pending(pd.Timestamp("2024-06-01", tz="UTC")))
    deadline = time.monotonic() + 30
    while wal.stat().st_size > limit:                  # the log is copied out, starts again
        assert time.monotonic() < deadline, "the log was never cut back"   # from the top, cut
        store.mark_sent(next(ids))                     # back to its limit: it never piles up
    store.close()


def test_a_file_that_reached_version_3_without_the_tier_tables_gets_them(tmp_path):
    """Version 2 (stored tiers) came after version 3: a file made at 3 without it gets it."""
    path = tmp_path / "loyalty.db"
    with sqlite3.connect(path) as conn:        # a state file as version 3 wrote it before version 2 came
        for version in (1, 3):
            conn.executescript(dict(database.MIGRATIONS)[version])
        conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
        conn.execute("INSERT INTO runs (run_id, as_of, as_of_utc, started_at, status) "
                     "VALUES ('r1', '2026-11-23T10:00:00+08:00', '2026-11-23T02:00:00+00:00', 'x', 'recorded')")
    with StateStore(path) as store:
        assert store.schema_version() == 3
        assert {"member_tiers", "tier_history", "pending_firings"} <= set(store.db.table_names())
        assert count(store, "runs") == 1
    with StateStore(path) as again:            # nothing more to do
        assert again.schema_version() == 3 and not again._skipped(3)