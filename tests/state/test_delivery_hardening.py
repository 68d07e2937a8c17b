"""Delivery hardening (issue 18): a bad address fails its own offer only, and a dead or silent
SMTP server defers the rest of its channel instead of costing a timeout per offer.

Everything runs against real servers on loopback (aiosmtpd, http.server, plain sockets), real
files in tmp_path and, end to end, the `loyalty init --example` workspace."""

from __future__ import annotations

import csv
import email
import email.policy
import json
import logging
import shutil
import socket
import sqlite3
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from test_delivery import free_port, record, statuses

from cli import main
from engine import init_example
from engine.config.model import ChannelDef, ContactPolicy, Settings
from engine.decide.evaluation import offer_id
from engine.state.delivery import deliver

AS_OF = pd.Timestamp("2024-05-01 10:00", tz="Asia/Shanghai")
NOW = AS_OF + pd.Timedelta(minutes=5)
EXAMPLE_AS_OF = "2026-11-23"


# --------------------------------------------------------------------------- helpers


def settings_with(**channels: ChannelDef) -> Settings:
    return Settings(name="星享会员", timezone="Asia/Shanghai", currency="CNY",
                    default_locale="zh-CN", data={}, state_path=Path("state/loyalty.db"),
                    contact_policy=ContactPolicy(), holdout=0.0, channels=channels)


def make_offer(i: int, channel: str, address: str | None = None, **changes) -> dict:
    key = f"winback|c{i}|{channel}"
    default = {"email": f"customer{i}@example.com", "sms": f"+86 138-0000-{i:04d}"}.get(channel, f"device-{i}")
    offer = {
        "offer_id": offer_id(key), "firing_key": key, "campaign": "winback",
        "campaign_name": "沉睡客唤醒", "customer_id": f"c{i}", "channel": channel, "variant": "A",
        "reward": {"kind": "coupon", "percent_off": 20, "code": f"W{i:05d}"}, "cost": 4.0,
        "send_at": AS_OF.isoformat(), "subject": f"Hello c{i}", "body": f"Your code W{i:05d}",
        "html": None, "address": address if address is not None else default,
        "locale": "en", "as_of": AS_OF.isoformat(), "explanation": {}, "rule_version": "v1",
    }
    offer.update(changes)
    return offer


class Inbox:
    """An SMTP sink that refuses recipients starting with ``bounce``."""

    def __init__(self):
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bounce"):
            return f"550 5.1.1 <{address}>: no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((list(envelope.rcpt_tos), email.message_from_bytes(
            envelope.original_content, policy=email.policy.default)))
        return "250 Message accepted for delivery"


def start_smtp(port: int | None = None) -> tuple[Controller, Inbox]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port or free_port())
    controller.start()
    return controller, inbox


@pytest.fixture
def smtp_server():
    controller, inbox = start_smtp()
    inbox.port = controller.port
    yield inbox
    controller.stop()


def smtp_channel(port: int, **options) -> ChannelDef:
    return ChannelDef("email", "smtp", {"host": "127.0.0.1", "port": port,
                                        "sender": "rewards@example.com", **options})


# --------------------------------------------------------------------------- 1. bad addresses

BAD_EMAILS = [
    ("x@example.cn\r\nBcc: a@evil.example",
     "the e-mail address contains a line break or another control character"),
    ("alice@x.cn, attacker@evil.example", "the e-mail address field holds 2 addresses; only one is allowed"),
    ("alice@x.cn;attacker@evil.example", "the e-mail address field holds 2 addresses; only one is allowed"),
    ("Alice <alice@evil.example>", "this is not a valid e-mail address (write it as name@domain)"),
    ("alice.evil.example", "this is not a valid e-mail address (write it as name@domain)"),
]


@pytest.mark.parametrize("address, reason", BAD_EMAILS, ids=["crlf-bcc", "comma", "semicolon",
                                                               "display-name", "no-at"])
def test_a_bad_email_address_fails_that_offer_alone(store, tmp_path, smtp_server, caplog,
                                                     address, reason):
    offers = [make_offer(i, "email") for i in range(4)]
    offers.insert(1, make_offer(9, "email", address=address))
    record(store, offers)
    caplog.set_level(logging.DEBUG, logger="loyalty.delivery")

    result = deliver(store, settings_with(email=smtp_channel(smtp_server.port)), NOW, root=tmp_path)

    assert (result.sent, result.failed, result.deferred) == (4, 1, 0)
    assert statuses(store)["c9"] == ("failed", 1, reason)
    assert result.errors == [{"offer_id": offers[1]["offer_id"], "customer_id": "c9",
                              "channel": "email", "error": reason}]
    # every mail went to exactly one recipient, its own; nothing reached the attacker
    assert sorted(recipients for recipients, _ in smtp_server.messages) == \
        [[f"customer{i}@example.com"] for i in range(4)]
    assert all(message["To"] == recipients[0] for recipients, message in smtp_server.messages)
    assert "evil" not in caplog.text and "x@example.cn" not in caplog.text


def test_bad_phone_numbers_and_device_tokens_fail_alone(store, tmp_path):
    received: list[dict] = []

    class Push(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Push)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sms = ChannelDef("sms", "file", {"path": "outbox/sms.jsonl"}, address_column="phone",
                     consent_column="sms_opt_in")
    push = ChannelDef("push", "webhook", {"url": f"http://127.0.0.1:{server.server_port}/push",
                                          "retries": 0}, address_column="device_token")
    phones = {1: "+8613800000001", 2: "138 0000 0002", 3: "+86 138-0000\n0003", 4: "12345",
              5: "call me", 6: "+1234567890123456"}
    tokens = {11: "device-11", 12: "tok\r\nX-Injected: 1", 13: "   "}
    record(store, [make_offer(i, "sms", phone) for i, phone in phones.items()]
           + [make_offer(i, "push", token) for i, token in tokens.items()])
    try:
        result = deliver(store, settings_with(sms=sms, push=push), NOW, root=tmp_path)
    finally:
        server.shutdown()
        server.server_close()

    state = statuses(store)
    not_a_phone = ("this is not a phone number (6 to 15 digits, optionally a leading +; "
                   "spaces and dashes are allowed)")
    assert {c: state[c][2] for c in ("c3", "c4", "c5", "c6", "c12", "c13")} == {
        "c3": "the phone number contains a line break or another control character",
        "c4": not_a_phone, "c5": not_a_phone, "c6": not_a_phone,
        "c12": "the device token contains a line break or another control character",
        "c13": "the device token is blank"}
    assert (result.sent, result.failed) == (3, 6)
    written = [json.loads(line)["customer_id"]
               for line in (tmp_path / "outbox" / "sms.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written == ["c1", "c2"]
    assert [payload["customer_id"] for payload in received] == ["c11"]


def test_an_unexpected_error_from_one_offer_does_not_stop_the_batch(store, tmp_path, smtp_server):
    """A subject with a line break makes the e-mail library raise ValueError: that offer fails
    with the reason recorded; the offers after it are still sent."""
    offers = [make_offer(0, "email"), make_offer(1, "email", subject="Hi\r\nBcc: a@evil.example"),
              make_offer(2, "email")]
    record(store, offers)

    result = deliver(store, settings_with(email=smtp_channel(smtp_server.port)), NOW, root=tmp_path)

    assert (result.sent, result.failed) == (2, 1)
    status, attempts, error = statuses(store)["c1"]
    assert (status, attempts) == ("failed", 1)
    assert error.startswith("could not be sent (ValueError: Header values may not contain linefeed")
    assert sorted(r for r, _ in smtp_server.messages) == [["customer0@example.com"], ["customer2@example.com"]]


# --------------------------------------------------------------------------- 2. dead servers


def test_a_refused_connection_defers_the_channel_and_spends_no_attempt(store, tmp_path):
    port = free_port()
    sms = ChannelDef("sms", "file", {"path": "outbox/sms.jsonl"}, address_column="phone",
                     consent_column="sms_opt_in")
    record(store, [make_offer(i, "email") for i in range(5)] + [make_offer(i, "sms") for i in range(5, 8)])
    settings = settings_with(email=smtp_channel(port, timeout=2), sms=sms)

    result = deliver(store, settings, NOW, root=tmp_path)

    assert (result.sent, result.failed, result.deferred) == (3, 0, 5)
    assert result.deferred_channels == {"email": {
        "offers": 5, "reason": f"cannot connect to the SMTP server at 127.0.0.1:{port}: "
                              "connection refused (is the server running, and on this port?)"}}
    state = statuses(store)
    assert [state[f"c{i}"] for i in range(5)] == [("pending", 0, None)] * 5
    assert all(state[f"c{i}"][0] == "sent" for i in range(5, 8))

    controller, inbox = start_smtp(port)        # the server is back: the next delivery sends them
    try:
        again = deliver(store, settings, NOW, root=tmp_path)
    finally:
        controller.stop()
    assert (again.sent, again.failed, again.deferred) == (5, 0, 0)
    assert Counter(r[0] for r, _ in inbox.messages) == Counter(f"customer{i}@example.com" for i in range(5))
    assert {statuses(store)[f"c{i}"][:2] for i in range(5)} == {("sent", 1)}


def test_a_server_that_never_answers_costs_one_timeout_not_one_per_offer(store, tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)                        # connections are accepted by the kernel, never answered
    port = silent.getsockname()[1]
    record(store, [make_offer(i, "email") for i in range(20)])
    try:
        started = time.monotonic()
        result = deliver(store, settings_with(email=smtp_channel(port, timeout=0.5)), NOW, root=tmp_path)
        elapsed = time.monotonic() - started
    finally:
        silent.close()

    assert elapsed < 3, f"{elapsed:.1f} s: each offer waited for the timeout"
    assert (result.sent, result.failed, result.deferred) == (0, 0, 20)
    assert result.deferred_channels["email"]["reason"] == (
        f"cannot connect to the SMTP server at 127.0.0.1:{port}: no answer within 0.5 s")
    assert set(statuses(store).values()) == {("pending", 0, None)}


def test_a_refused_recipient_is_not_a_connection_failure(store, tmp_path, smtp_server):
    record(store, [make_offer(0, "email", "bounce0@example.com")]
           + [make_offer(i, "email") for i in range(1, 4)])

    result = deliver(store, settings_with(email=smtp_channel(smtp_server.port, timeout=2)), NOW,
                     root=tmp_path)

    assert (result.sent, result.failed, result.deferred) == (3, 1, 0)
    assert statuses(store)["c0"] == ("failed", 1, "recipient refused (SMTP 550)")
    assert len(smtp_server.messages) == 3


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def example_template(tmp_path_factory) -> Path:
    """`loyalty init --example`, made once and copied by each test."""
    workspace = tmp_path_factory.mktemp("example") / "ws"
    init_example(workspace)
    return workspace


def example_copy(template: Path, target: Path, email_channel: str) -> Path:
    shutil.copytree(template, target)
    settings = target / "loyalty.yaml"
    text = settings.read_text(encoding="utf-8")
    written = "  email: {send: smtp, host: localhost, port: 1025, sender: rewards@example.com}"
    assert written in text
    settings.write_text(text.replace(written, f"  email: {email_channel}"), encoding="utf-8")
    return target


def poison_email(workspace: Path, customer: str, address: str) -> None:
    path = workspace / "data" / "customers.csv"
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    column = rows[0].index("email")
    for row in rows[1:]:
        if row[0] == customer:
            row[column] = address
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows(rows)


def offer_rows(workspace: Path) -> list[tuple]:
    """The offers that are messages (points granted without a message are recorded suppressed)."""
    with sqlite3.connect(workspace / "state" / "loyalty.db") as db:
        return db.execute("SELECT customer_id, channel, status, attempts, last_error FROM offers "
                          "WHERE suppressed_reason IS NULL").fetchall()


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_the_example_run_and_deliver_survive_a_crlf_email_address(example_template, tmp_path):
    controller, inbox = start_smtp()
    workspace = example_copy(example_template, tmp_path / "ws",
                             f"{{send: smtp, host: 127.0.0.1, port: {controller.port}, "
                             "sender: rewards@example.com, timeout: 5}")
    poison_email(workspace, "C000002", "x@example.cn\r\nBcc: a@evil.example")   # gets an e-mail offer
    try:
        run = invoke("run", str(workspace), "--as-of", EXAMPLE_AS_OF)
        again = invoke("deliver", str(workspace))
    finally:
        controller.stop()

    reason = "the e-mail address contains a line break or another control character"
    assert run.exit_code == 3, run.output               # some offer failed: an outside failure, no traceback
    assert reason in run.output and "Traceback" not in run.output
    rows = offer_rows(workspace)
    bad = [row for row in rows if row[0] == "C000002" and row[1] == "email"]
    assert bad == [("C000002", "email", "failed", 2, reason)]       # failed again by `deliver`
    others = [row for row in rows if row not in bad]
    assert len(others) > 200 and {row[2] for row in others} == {"sent"}
    assert {row[3] for row in others} == {1}                         # nothing sent twice
    assert again.exit_code == 3 and again.output.startswith("sent 0, failed 1, skipped 0")
    emails = [row for row in others if row[1] == "email"]
    assert len(inbox.messages) == len(emails)
    assert all(len(recipients) == 1 and "evil" not in recipients[0] for recipients, _ in inbox.messages)


def test_the_example_defers_email_while_its_server_is_down_and_sends_it_after(example_template, tmp_path):
    port = free_port()
    workspace = example_copy(example_template, tmp_path / "ws",
                             f"{{send: smtp, host: 127.0.0.1, port: {port}, "
                             "sender: rewards@example.com, timeout: 2}")
    run = invoke("run", str(workspace), "--as-of", EXAMPLE_AS_OF)
    deferred = [row for row in offer_rows(workspace) if row[1] == "email"]
    assert run.exit_code == 3, run.output
    assert len(deferred) > 100 and {row[2:] for row in deferred} == {("pending", 0, None)}
    assert {row[2] for row in offer_rows(workspace) if row[1] != "email"} == {"sent"}

    down = invoke("deliver", str(workspace))
    assert down.exit_code == 3
    assert (f"delivery deferred: {len(deferred)} offer(s) on email left pending: cannot connect to "
            f"the SMTP server at 127.0.0.1:{port}: connection refused") in down.output

    controller, inbox = start_smtp(port)
    try:
        up = invoke("deliver", str(workspace))
    finally:
        controller.stop()
    assert up.exit_code == 0, up.output
    assert up.output.startswith(f"sent {len(deferred)}, failed 0")
    assert len(inbox.messages) == len(deferred)
    assert {row[2:4] for row in offer_rows(workspace)} == {("sent", 1)}
