"""Scheduled runs end to end: crash safety, the run lock, conflicts, real servers, a quarter.

Everything here runs the real thing: `python -m cli run` in a subprocess (killed with
SIGKILL at each fault-injection checkpoint), a real SMTP server (aiosmtpd) and a real
HTTP server on 127.0.0.1, and the SQLite state store read back with plain SQL.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner

from cli import main
from engine import Workspace
from engine.app.demo import build_demo_workspace
from engine.app.scaffold import init_workspace
from engine.app.validation import load_workspace
from engine.execution.pipeline import decide, parse_as_of
from engine.faults import CHECKPOINTS
from engine.messages.offers import unrendered_offers
from engine.state.store import StateStore

ROOT = Path(__file__).resolve().parents[2]
AS_OF = "2026-11-23T10:00:00+08:00"      # the demo data's instant
NOW = "2026-11-25T12:00:00+08:00"        # delivery clock: every quiet-hours wait is over
DEMO_CUSTOMERS = 300

FILE_CHANNELS = """channels:
  email: {send: file, path: outbox/email.jsonl}
  sms:   {send: file, path: outbox/sms.jsonl, max_sms_segments: 2}
  push:  {send: file, path: outbox/push.jsonl}
"""


# --------------------------------------------------------------------------- helpers


def set_channels(workspace: Path, block: str) -> None:
    """Replace the ``channels:`` block (the last block of the demo's loyalty.yaml)."""
    settings = workspace / "loyalty.yaml"
    text = settings.read_text(encoding="utf-8")
    head = text[:text.index("\nchannels:")]
    settings.write_text(head + "\n" + block, encoding="utf-8")


def cli_env(crash_at: str | None = None) -> dict[str, str]:
    """The environment of a `loyalty` subprocess, with the fault checkpoint to die at."""
    env = {k: v for k, v in os.environ.items() if k != "LOYALTY_CRASH_AT"}
    env["PYTHONPATH"] = str(ROOT)
    if crash_at is not None:
        env["LOYALTY_CRASH_AT"] = crash_at
    return env


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def invoke(*args: str):
    """`loyalty ARGS` in-process."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def query(workspace: Path, sql: str, params=()) -> list[tuple]:
    with sqlite3.connect(workspace / "state" / "loyalty.db") as conn:
        return conn.execute(sql, params).fetchall()


def recorded_offers(workspace: Path) -> dict[str, tuple[str, str]]:
    """firing key -> (offer_id, status), from the offers table; the status of points granted
    without a message (no consent: recorded suppressed, never sent) is ``granted``."""
    rows = query(workspace, "SELECT firing_key, offer_id, CASE WHEN suppressed_reason IS NULL THEN status "
                            "ELSE 'granted' END FROM offers")
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys)), "a firing key is recorded twice"
    return {key: (offer_id, status) for key, offer_id, status in rows}


def messages_of(offers: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """The offers that are messages: all but the points granted without one."""
    return {key: value for key, value in offers.items() if value[1] != "granted"}


def outbox_lines(workspace: Path) -> Counter:
    """offer_id -> how many lines carry it, over every outbox/*.jsonl file."""
    seen: Counter = Counter()
    for path in sorted((workspace / "outbox").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            offer = json.loads(line)          # a torn line would fail here
            seen[offer["offer_id"]] += 1
    return seen


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- the demo workspace


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory) -> Path:
    """The example programme on 300 sample customers, every channel a file sender."""
    workspace = build_demo_workspace(tmp_path_factory.mktemp("demo") / "ws", DEMO_CUSTOMERS)
    set_channels(workspace, FILE_CHANNELS)
    return workspace


def copy_of(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    return target


@pytest.fixture(scope="module")
def reference(demo_template, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """What an uncrashed run records: firing key -> (offer_id, status)."""
    workspace = copy_of(demo_template, tmp_path_factory.mktemp("reference") / "ws")
    result = Workspace(workspace).run(AS_OF, now=NOW)
    offers = recorded_offers(workspace)
    messages = messages_of(offers)
    assert result.new_offers == len(offers) >= 30, "the workspace should make several offers"
    assert result.delivery.sent == len(messages) and result.delivery.not_due == 0
    assert "sent" in {status for _, status in offers.values()} <= {"sent", "granted"}
    assert sum(result.granted_without_message.values()) == len(offers) - len(messages)
    assert outbox_lines(workspace) == Counter({offer_id: 1 for offer_id, _ in messages.values()})
    assert len({key.split(":")[0] for key in offers}) >= 4, "offers from several campaigns"
    return offers


# --------------------------------------------------------------------------- crashes


def start_run(workspace: Path, crash_at: str | None = None) -> subprocess.Popen:
    """`loyalty run` at the demo's instant, in the background."""
    return subprocess.Popen([sys.executable, "-m", "cli", "run", str(workspace), "--as-of", AS_OF,
                             "--now", NOW, "--format", "json"], cwd=ROOT, env=cli_env(crash_at),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def crashes(demo_template, tmp_path_factory) -> dict[str, dict]:
    """For each checkpoint, a workspace whose run was SIGKILLed there and then rerun.

    The four cases are independent, so their subprocesses run side by side; the reruns
    (`loyalty run` again, in-process) one after the other."""
    cases = {name: {"workspace": copy_of(demo_template, tmp_path_factory.mktemp(name) / "ws")}
             for name in CHECKPOINTS}
    running = {name: start_run(case["workspace"], crash_at=name) for name, case in cases.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=120)
        case = cases[name]
        case["crash_code"], case["crash_err"] = process.returncode, err
        case["after_crash"] = recorded_offers(case["workspace"])
        case["outbox_after_crash"] = outbox_lines(case["workspace"])
    for name, case in cases.items():
        rerun = CliRunner().invoke(main, ["run", str(case["workspace"]), "--as-of", AS_OF, "--now", NOW,
                                          "--format", "json"], env={"LOYALTY_CRASH_AT": None})
        case.update(rerun_code=rerun.exit_code, rerun_err=rerun.stderr or repr(rerun.exception), rerun=rerun.stdout)
    return cases


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_a_run_killed_at_any_checkpoint_is_completed_by_the_rerun(checkpoint, crashes, reference):
    case = crashes[checkpoint]
    workspace, after_crash = case["workspace"], case["after_crash"]
    assert case["crash_code"] == -9, (case["crash_code"], case["crash_err"])
    if checkpoint in ("after_evaluation", "mid_transaction"):
        assert after_crash == {}, "a killed transaction leaves nothing behind"
    else:
        assert set(after_crash) == set(reference)
    if checkpoint == "mid_delivery":
        # the first batch reached the file, but the store never heard that it was sent
        assert case["outbox_after_crash"]
        assert "pending" in {status for _, status in after_crash.values()} <= {"pending", "granted"}
    else:
        assert not case["outbox_after_crash"]

    assert case["rerun_code"] == 0, case["rerun_err"]
    result = json.loads(case["rerun"])
    assert result["conflicts"] == []
    offers = recorded_offers(workspace)
    assert offers.keys() == reference.keys(), "the same firings as a run that never crashed"
    assert {key: offer_id for key, (offer_id, _) in offers.items()} == \
        {key: offer_id for key, (offer_id, _) in reference.items()}
    assert result["new_offers"] == len(reference) - len(after_crash)
    assert result["already_recorded"] == len(after_crash)
    assert "sent" in {status for _, status in offers.values()} <= {"sent", "granted"}, "none lost"
    assert outbox_lines(workspace) == Counter({offer_id: 1 for offer_id, _ in messages_of(offers).values()}), \
        "every message exactly once in the outbox files"
    granted = query(workspace, "SELECT count(*) FROM offers o JOIN points_ledger p ON p.offer_id = o.offer_id "
                               "WHERE o.suppressed_reason IS NOT NULL")[0][0]
    granted_points = query(workspace, "SELECT count(*) FROM offers WHERE suppressed_reason IS NOT NULL "
                                      "AND json_extract(reward, '$.kind') = 'points'")[0][0]
    assert granted == granted_points, "every points reward granted without a message credited once"
    # every coupon offer has exactly one code
    codes = query(workspace, "SELECT offer_id, count(*) FROM coupon_codes GROUP BY offer_id")
    assert all(n == 1 for _, n in codes)
    coupon_offers = query(workspace, "SELECT count(*) FROM offers WHERE reward LIKE '%\"code\"%'")[0][0]
    assert len(codes) == coupon_offers > 0
    # every points offer credited exactly once, whatever the crash: the credit is in the offers' transaction
    credits = query(workspace, "SELECT offer_id, count(*) FROM points_ledger GROUP BY offer_id")
    assert all(n == 1 for _, n in credits)
    points_offers = query(workspace, "SELECT count(*) FROM offers WHERE json_extract(reward, '$.kind') = 'points'")[0][0]
    assert len(credits) == points_offers > 0
    runs = query(workspace, "SELECT status, count(*) FROM runs GROUP BY status")
    assert dict(runs).get("delivered") == 1


def test_a_third_run_after_a_crash_changes_nothing(crashes):
    workspace = crashes["mid_delivery"]["workspace"]
    before = query(workspace, "SELECT offer_id, status, attempts FROM offers ORDER BY offer_id")
    lines = outbox_lines(workspace)
    result = Workspace(workspace).run(AS_OF, now=NOW)
    assert (result.new_offers, result.delivery.sent) == (0, 0)
    assert query(workspace, "SELECT offer_id, status, attempts FROM offers ORDER BY offer_id") == before
    assert outbox_lines(workspace) == lines


# --------------------------------------------------------------------------- the run lock


@pytest.fixture()
def small_workspace(tmp_path) -> Path:
    init_workspace(tmp_path / "ws")
    return tmp_path / "ws"


def test_a_second_run_waits_for_the_lock_then_refuses_with_exit_3(small_workspace):
    state = small_workspace / "state" / "loyalty.db"
    state.parent.mkdir(parents=True)
    with StateStore(state) as store, store.lock():
        started = time.monotonic()
        blocked = cli("run", str(small_workspace), "--as-of", "2026-12-25T10:00:00+08:00",
                      "--format", "json")
        waited = time.monotonic() - started
    assert blocked.returncode == 3, (blocked.stdout, blocked.stderr)
    assert "another run is in progress" in blocked.stderr + blocked.stdout
    assert "Traceback" not in blocked.stderr
    assert 5.0 <= waited < 15.0, f"waited {waited:.1f} s for a 5 s lock timeout"
    assert query(small_workspace, "SELECT count(*) FROM runs")[0][0] == 0
    assert not (small_workspace / "outbox").exists() or not outbox_lines(small_workspace)

    # once the lock is free, the same run works
    done = Workspace(small_workspace).run("2026-12-25T10:00:00+08:00", now="2026-12-26T12:00:00+08:00")
    assert done.new_offers == 3 and done.delivery.sent == 3


# --------------------------------------------------------------------------- conflicts


def test_a_changed_reward_for_a_recorded_firing_is_a_conflict_and_sends_nothing(small_workspace):
    """`loyalty run` (in-process) twice, the reward changed in between: exit 1 and the conflicts."""
    args = ("run", str(small_workspace), "--as-of", "2026-12-25T10:00:00+08:00",
            "--now", "2026-12-26T12:00:00+08:00", "--format", "json")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    before = query(small_workspace, "SELECT firing_key, offer_id, payload_hash, reward FROM offers "
                                    "ORDER BY firing_key")
    outbox_before = outbox_lines(small_workspace)
    winback = [row[0] for row in before if row[0].startswith("winback:")]
    assert len(winback) == 2 and sum(outbox_before.values()) == 3

    rules = small_workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("percent_off: 20", "percent_off: 25"),
                     encoding="utf-8")
    second = invoke(*args)
    assert second.exit_code == 1, (second.stdout, second.stderr)
    result = json.loads(second.stdout)
    assert result["new_offers"] == 0
    assert sorted(c["firing_key"] for c in result["conflicts"]) == sorted(winback)
    assert all(c["campaign"] == "winback" for c in result["conflicts"])
    assert query(small_workspace, "SELECT firing_key, offer_id, payload_hash, reward FROM offers "
                                  "ORDER BY firing_key") == before, "the recorded offers stand"
    assert outbox_lines(small_workspace) == outbox_before, "nothing new was sent"


def test_a_changed_reward_never_records_or_sends_a_second_offer(small_workspace):
    """Through the library too: the recorded offers stand and nothing more is sent."""
    as_of, now = "2026-12-25T10:00:00+08:00", "2026-12-26T12:00:00+08:00"
    assert Workspace(small_workspace).run(as_of, now=now).new_offers == 3
    before = query(small_workspace, "SELECT firing_key, offer_id, payload_hash FROM offers")
    outbox_before = outbox_lines(small_workspace)
    rules = small_workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("percent_off: 20", "percent_off: 25"),
                     encoding="utf-8")
    second = Workspace(small_workspace).run(as_of, now=now)
    assert second.new_offers == 0 and second.delivery.sent == 0
    assert query(small_workspace, "SELECT firing_key, offer_id, payload_hash FROM offers") == before
    assert outbox_lines(small_workspace) == outbox_before


def test_a_rerun_never_renders_again_what_is_recorded(small_workspace):
    """Messages recorded by a run at this as_of are not rendered again by a rerun: templates
    broken since then neither fail the rerun nor change what was recorded."""
    as_of, now = "2026-12-25T10:00:00+08:00", "2026-12-26T12:00:00+08:00"
    assert Workspace(small_workspace).run(as_of, now=now).new_offers == 3
    before = query(small_workspace, "SELECT firing_key, payload_hash, subject, body FROM offers ORDER BY 1")
    outbox_before = outbox_lines(small_workspace)
    templates = [path for path in (small_workspace / "templates").rglob("*") if path.is_file()]
    assert templates
    for path in templates:     # still checks (the sample offer renders), fails for every real offer
        path.write_text('{% if offer.offer_id != "of_sample" %}{{ 1 // 0 }}{% endif %}' +
                        path.read_text(encoding="utf-8"), encoding="utf-8")
    assert all(c.errors for c in Workspace(small_workspace).preview(as_of).campaigns if c.offers), \
        "the templates fail for real offers"
    again = Workspace(small_workspace).run(as_of, now=now)
    assert (again.new_offers, again.already_recorded, again.conflicts) == (0, 3, [])
    assert again.render_errors == []
    assert query(small_workspace, "SELECT firing_key, payload_hash, subject, body FROM offers ORDER BY 1") == before
    assert outbox_lines(small_workspace) == outbox_before


def test_offers_taken_as_recorded_hash_as_their_recorded_rows(demo_template, tmp_path):
    """The payload hash worked out without rendering equals the one recorded with the message,
    for every reward the demo programme gives (coupons, points, free shipping, tiers...)."""
    workspace = copy_of(demo_template, tmp_path / "ws")
    Workspace(workspace).run(AS_OF, deliver=False)
    loaded = load_workspace(workspace)
    with StateStore(loaded.settings.state_path) as store:
        _, evaluation = decide(loaded, parse_as_of(AS_OF, loaded.settings.timezone), store, None, None)
    offers = evaluation.offers
    assert offers["recorded"].all() and offers["reward_kind"].nunique() >= 3
    recorded = dict(query(workspace, "SELECT firing_key, payload_hash FROM offers"))
    assert {row["firing_key"]: row["payload_hash"] for row in unrendered_offers(loaded, offers, recorded)} == \
        {key: recorded[key] for key in offers["firing_key"]}


# --------------------------------------------------------------------------- real servers


class Mailroom:
    """An SMTP handler that turns the first attempt of every third message away with a 451."""

    def __init__(self):
        self.order: dict[str, int] = {}
        self.attempts: Counter = Counter()
        self.accepted: Counter = Counter()
        self.recipients: dict[str, list[str]] = {}

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        message_id = message["Message-ID"]
        self.order.setdefault(message_id, len(self.order))
        self.attempts[message_id] += 1
        if self.order[message_id] % 3 == 0 and self.attempts[message_id] == 1:
            return "451 4.3.0 mailbox busy, try again later"
        self.accepted[message_id] += 1
        self.recipients[message_id] = list(envelope.rcpt_tos)
        return "250 OK"


class Receiver:
    """Counts webhook requests by Idempotency-Key. Of every 8 keys in order of arrival, one
    gets a 500 once (retried within the run), one twice (the run gives up after its two
    attempts, `deliver` sends it), and one is accepted but answered only after the client's
    timeout (so the client sends it again)."""

    def __init__(self, slow: float):
        self.slow = slow
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()
        self.accepted: Counter = Counter()       # requests the receiver processed
        self.bodies: dict[str, dict] = {}
        self.failures: dict[str, int] = {}
        self.slowed: set[str] = set()
        self.order: dict[str, int] = {}

    def plan(self, key: str) -> str:
        return {0: "500 once", 1: "slow", 2: "500 twice"}.get(self.order[key] % 8, "ok")

    def handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                key = self.headers["Idempotency-Key"]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.order.setdefault(key, len(receiver.order))
                    receiver.attempts[key] += 1
                    attempt = receiver.attempts[key]
                plan = receiver.plan(key)
                if (plan == "500 once" and attempt == 1) or (plan == "500 twice" and attempt <= 2):
                    receiver.failures[key] = receiver.failures.get(key, 0) + 1
                    self.send_response(500)
                    self.end_headers()
                    return
                with receiver.lock:
                    receiver.accepted[key] += 1
                    receiver.bodies[key] = body
                if plan == "slow" and attempt == 1:
                    receiver.slowed.add(key)
                    time.sleep(receiver.slow)
                try:
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        return Handler


def test_webhook_and_smtp_deliver_every_offer_exactly_once_through_failures(demo_template, tmp_path):
    workspace = copy_of(demo_template, tmp_path / "ws")
    mailroom = Mailroom()
    smtp = Controller(mailroom, hostname="127.0.0.1", port=free_port())
    receiver = Receiver(slow=1.0)
    http = ThreadingHTTPServer(("127.0.0.1", 0), receiver.handler())
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()
    set_channels(workspace, f"""channels:
  email: {{send: smtp, host: 127.0.0.1, port: {smtp.port}, sender: rewards@example.com, timeout: 5}}
  sms:   {{send: file, path: outbox/sms.jsonl, max_sms_segments: 2}}
  push:  {{send: webhook, url: "http://127.0.0.1:{http.server_address[1]}/push", timeout: 0.5, retries: 1}}
""")
    smtp.start()
    try:
        first = Workspace(workspace).run(AS_OF, now=NOW)
        assert first.delivery.failed > 0, "the servers' failures are visible in the run"
        retried = Workspace(workspace).deliver(now=NOW, progress=False)
        assert retried.failed == 0 and retried.sent == first.delivery.failed
        again = Workspace(workspace).deliver(now=NOW, progress=False)
        assert (again.sent, again.failed) == (0, 0)
        rerun = Workspace(workspace).run(AS_OF, now=NOW)
        assert rerun.new_offers == 0 and rerun.delivery.sent == 0
    finally:
        smtp.stop()
        http.shutdown()
        http.server_close()

    rows = query(workspace, "SELECT offer_id, channel, status, attempts, address FROM offers "
                            "WHERE suppressed_reason IS NULL")       # messages, not points granted without one
    by_channel = {name: {r[0]: r for r in rows if r[1] == name} for name in ("email", "sms", "push")}
    assert all(by_channel.values()), "offers on every channel"
    sent = {r[0] for r in rows if r[2] == "sent"}
    assert {r[2] for r in rows} <= {"sent", "suppressed"}
    assert all(r[2] == "sent" for r in rows if r[1] != "email" or r[4]), "only address-less mail is skipped"

    # SMTP: every sent mail accepted once, counted by its Message-ID
    mail_ids = {f"<{offer_id}@loyalty>" for offer_id in by_channel["email"] if offer_id in sent}
    assert len(mail_ids) >= 10
    assert mailroom.accepted == Counter({message_id: 1 for message_id in mail_ids})
    assert any(n == 2 for n in mailroom.attempts.values()), "some mail needed a second attempt"
    for offer_id, row in by_channel["email"].items():
        if offer_id in sent:
            assert mailroom.recipients[f"<{offer_id}@loyalty>"] == [row[4]]

    # webhook: every offer arrived, identified by its Idempotency-Key
    push_ids = set(by_channel["push"])
    assert push_ids <= sent and set(receiver.accepted) == push_ids
    plans = Counter(receiver.plan(key) for key in push_ids)
    assert plans["500 once"] and plans["slow"] and plans["500 twice"], plans
    assert receiver.slowed == {key for key in push_ids if receiver.plan(key) == "slow"}
    for key, count in receiver.accepted.items():
        # a request the receiver accepted but answered too late is sent again with the same
        # key, which is what the key is for; every other offer was accepted exactly once
        assert count == (2 if key in receiver.slowed else 1), key
        assert receiver.bodies[key]["offer_id"] == key
        failures = {"500 once": 1, "500 twice": 2}.get(receiver.plan(key), 0)
        assert receiver.failures.get(key, 0) == failures, key
        # the store counts delivery attempts: one for offers the run sent, two for those
        # the run gave up on and `deliver` sent
        assert by_channel["push"][key][3] == (2 if failures == 2 else 1), key

    # file: one line per sms offer
    assert outbox_lines(workspace) == Counter({offer_id: 1 for offer_id in by_channel["sms"]})


# --------------------------------------------------------------------------- a simulated quarter

QUARTER_SETTINGS = """\
program: {name: Quarter, timezone: Asia/Shanghai, currency: CNY, locale: en-US}
data:
  customers: {path: data/customers.csv}
  orders:    {path: data/orders.csv}
state: state/loyalty.db
contact_policy: {max_messages: 2, per: 7d, quiet_hours: "21:00-09:00"}
holdout: 0%
channels:
  sms:   {send: file, path: outbox/sms.jsonl}
  email: {send: file, path: outbox/email.jsonl}
"""

QUARTER_RULES = """\
segments:
  buyers: {where: orders_total >= 1}
campaigns:
  monthly_thanks:
    name: Monthly thanks
    segment: buyers
    reward: {points: {amount: 50}}
    channel: email
    template: thanks
    priority: 80
    cooldown: 30d
  daily_deal:
    name: Daily deal
    reward: {message: true}
    channel: sms
    template: deal
    priority: 10
"""

QUARTER_TEMPLATES = {
    "thanks.email.en-US.j2": "{% block subject %}Thanks {{ customer.name }}{% endblock %}\n"
                             "{% block text %}{{ reward.points }} points for you.{% endblock %}\n",
    "deal.sms.en-US.j2": "Hi {{ customer.name }}, today's deal is waiting.\n",
}
CUSTOMERS = 12
QUARTER_START = pd.Timestamp("2026-10-01 10:00", tz="Asia/Shanghai")
DAYS = 60


def customer_rows() -> list[dict]:
    rows = []
    for i in range(CUSTOMERS):
        rows.append({"customer_id": f"Q{i:02d}", "name": f"Member {i}", "email": f"m{i}@example.com",
                     "phone": f"1380000{i:04d}", "locale": "en-US",
                     "email_opt_in": "true" if i % 4 != 3 else "false",
                     "sms_opt_in": "true" if i % 5 != 4 else "false"})
    return rows


@pytest.fixture()
def quarter_workspace(tmp_path) -> Path:
    workspace = tmp_path / "quarter"
    (workspace / "rules").mkdir(parents=True)
    (workspace / "templates").mkdir()
    (workspace / "data").mkdir()
    (workspace / "loyalty.yaml").write_text(QUARTER_SETTINGS, encoding="utf-8")
    (workspace / "rules" / "programme.yaml").write_text(QUARTER_RULES, encoding="utf-8")
    for name, text in QUARTER_TEMPLATES.items():
        (workspace / "templates" / name).write_text(text, encoding="utf-8")
    pd.DataFrame(customer_rows()).to_csv(workspace / "data" / "customers.csv", index=False)
    orders = [{"order_id": f"O{i}", "customer_id": f"Q{i:02d}", "timestamp": "2026-06-01 12:00:00",
               "amount": 100 + i} for i in range(0, CUSTOMERS, 2)]
    pd.DataFrame(orders).to_csv(workspace / "data" / "orders.csv", index=False)
    assert Workspace(workspace).validate().ok
    return workspace


def expected_quarter() -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """(day, customer, campaign) of the contacts a correct engine records, and (day, customer)
    of the thank-you points it grants without a message: a reference model of the policy."""
    contacts: dict[str, list[tuple[pd.Timestamp, str]]] = {}
    grants: dict[str, list[pd.Timestamp]] = {}
    expected, granted = set(), set()
    for day in range(DAYS):
        as_of = QUARTER_START + pd.Timedelta(days=day)
        for row in customer_rows():
            customer = row["customer_id"]
            mine = contacts.setdefault(customer, [])
            recent = [t for t, _ in mine if t > as_of - pd.Timedelta(days=7)]
            thanked = [t for t, c in mine if c == "monthly_thanks" and t > as_of - pd.Timedelta(days=30)] + \
                [t for t in grants.get(customer, []) if t > as_of - pd.Timedelta(days=30)]
            buyer = int(customer[1:]) % 2 == 0
            if len(recent) >= 2:
                # points need no message: at the cap they are granted without one (not a contact,
                # but the campaign's cooldown counts it)
                if buyer and not thanked:
                    grants.setdefault(customer, []).append(as_of)
                    granted.add((str(as_of.date()), customer))
                continue
            if buyer and row["email_opt_in"] == "true" and not thanked:
                campaign = "monthly_thanks"
            elif row["sms_opt_in"] == "true":
                campaign = "daily_deal"
            else:
                continue
            mine.append((as_of, campaign))
            expected.add((str(as_of.date()), customer, campaign))
    return expected, granted


def ledger(workspace: Path) -> pd.DataFrame:
    frame = pd.DataFrame(query(workspace, "SELECT customer_id, campaign, contacted_at FROM contacts"),
                         columns=["customer_id", "campaign", "contacted_at"])
    frame["contacted_at"] = pd.to_datetime(frame["contacted_at"], utc=True, format="ISO8601")
    return frame


def test_sixty_daily_runs_respect_the_frequency_cap_and_cooldowns_exactly(quarter_workspace):
    days = [QUARTER_START + pd.Timedelta(days=d) for d in range(DAYS)]
    for as_of in days:
        result = Workspace(quarter_workspace).run(as_of, deliver=False)
        assert result.conflicts == [] and result.render_errors == []

    contacts = ledger(quarter_workspace)
    assert len(contacts) > 100
    # no customer ever has more than 2 contacts in any 7-day window
    for customer, group in contacts.groupby("customer_id"):
        times = group["contacted_at"].sort_values().tolist()
        for first, third in zip(times, times[2:]):
            assert third - first >= pd.Timedelta(days=7), (customer, first, third)
    # no campaign repeats to a customer within its cooldown
    thanks = contacts[contacts["campaign"] == "monthly_thanks"]
    assert len(thanks) > 0
    for customer, group in thanks.groupby("customer_id"):
        times = group["contacted_at"].sort_values()
        assert (times.diff().dropna() >= pd.Timedelta(days=30)).all(), customer
    # and exactly the contacts the policy allows, no fewer: the cap is not over-applied
    got = {(str(t.tz_convert("Asia/Shanghai").date()), c, k) for c, k, t in contacts.itertuples(index=False)}
    expected, granted = expected_quarter()
    assert got == expected
    silent = query(quarter_workspace, "SELECT as_of, customer_id, status, suppressed_reason FROM offers "
                                      "WHERE suppressed_reason IS NOT NULL")
    assert {(as_of[:10], customer) for as_of, customer, _, _ in silent} == granted and granted
    assert {(status, reason) for _, _, status, reason in silent} == {("suppressed", "frequency_cap")}
    points = query(quarter_workspace, "SELECT count(*), sum(points) FROM points_ledger")[0]
    credited = len(thanks) + len(granted)
    assert points == (credited, 50.0 * credited), "one ledger entry per points offer, with a message or not"

    # reruns of random days add nothing
    before = query(quarter_workspace, "SELECT firing_key, offer_id, payload_hash FROM offers ORDER BY 1")
    for as_of in random.Random(5).sample(days, 6):
        rerun = Workspace(quarter_workspace).run(as_of, deliver=False)
        assert rerun.new_offers == 0, as_of
    assert query(quarter_workspace, "SELECT firing_key, offer_id, payload_hash FROM offers ORDER BY 1") == before


def test_a_rerun_of_an_earlier_day_after_a_later_run_adds_nothing(quarter_workspace):
    first, later = QUARTER_START, QUARTER_START + pd.Timedelta(days=40)
    assert Workspace(quarter_workspace).run(first, deliver=False).new_offers > 0
    assert Workspace(quarter_workspace).run(later, deliver=False).new_offers > 0
    before = query(quarter_workspace, "SELECT firing_key, offer_id, payload_hash FROM offers ORDER BY 1")
    rerun = Workspace(quarter_workspace).run(first, deliver=False)
    assert rerun.new_offers == 0
    assert query(quarter_workspace, "SELECT firing_key, offer_id, payload_hash FROM offers ORDER BY 1") == before
