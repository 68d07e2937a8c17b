"""Delivery against real servers: aiosmtpd, http.server, and the outbox file."""

import email
import email.policy
import json
import logging
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from engine.config.model import ChannelDef, ContactPolicy, Settings
from engine.decide.evaluation import offer_id
from engine.errors import DeliveryError
from engine.state.delivery import deliver
from engine.state.senders import SENDERS, FileSender
from engine.state.store import StateStore

AS_OF = pd.Timestamp("2024-05-01 10:00", tz="Asia/Shanghai")
NOW = AS_OF + pd.Timedelta(minutes=5)


def settings_with(**channels: ChannelDef) -> Settings:
    return Settings(name="星享会员", timezone="Asia/Shanghai", currency="CNY",
                    default_locale="zh-CN", data={}, state_path=Path("state/loyalty.db"),
                    contact_policy=ContactPolicy(), holdout=0.0, channels=channels)


def make_offer(i: int, channel: str, **changes) -> dict:
    key = f"winback|c{i}|{channel}"
    offer = {
        "offer_id": offer_id(key), "firing_key": key, "campaign": "winback",
        "campaign_name": "沉睡客唤醒", "customer_id": f"c{i}", "channel": channel, "variant": "A",
        "reward": {"kind": "coupon", "percent_off": 20, "code": f"W{i:05d}"}, "cost": 4.0,
        "send_at": AS_OF.isoformat(), "subject": f"Hello c{i}", "body": f"Your code W{i:05d}",
        "html": f"<p>Your code <b>W{i:05d}</b></p>", "address": f"+86138{i:08d}" if channel == "sms" else f"customer{i}@example.com",
        "locale": "en", "as_of": AS_OF.isoformat(), "explanation": {}, "rule_version": "v1",
    }
    offer.update(changes)
    return offer


def record(store: StateStore, offers: list[dict]) -> None:
    run_id = store.begin_run(AS_OF, {}, {}, ["winback"])
    store.record_run(run_id, offers)


def statuses(store: StateStore) -> dict[str, tuple[str, int, str | None]]:
    rows = store.db.execute("SELECT customer_id, status, attempts, last_error FROM offers")
    return {row[0]: row[1:] for row in rows}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- smtp


class Inbox:
    def __init__(self):
        self.messages = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bounce"):
            return f"550 5.1.1 <{address}>: no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, email.message_from_bytes(
            envelope.original_content, policy=email.policy.default)))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server():
    inbox = Inbox()
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"s3cret")

    controller = Controller(inbox, hostname="127.0.0.1", port=free_port(),
                            authenticator=authenticator, auth_require_tls=False)
    controller.start()
    inbox.port, inbox.logins = controller.port, logins
    yield inbox
    controller.stop()


def test_smtp_sends_multipart_mail_with_a_message_id_from_the_offer(store, tmp_path, smtp_server,
                                                                   monkeypatch, caplog):
    monkeypatch.setenv("LOYALTY_SMTP_USER", "rewards")
    monkeypatch.setenv("LOYALTY_SMTP_PASSWORD", "s3cret")
    email_channel = ChannelDef("email", "smtp", {
        "host": "127.0.0.1", "port": smtp_server.port, "sender": "rewards@example.com",
        "username_env": "LOYALTY_SMTP_USER", "password_env": "LOYALTY_SMTP_PASSWORD"})
    offers = [make_offer(i, "email") for i in range(3)]
    offers.append(make_offer(3, "email", address="bounce3@example.com"))
    offers.append(make_offer(4, "email", address=None))
    record(store, offers)
    caplog.set_level(logging.DEBUG, logger="loyalty.delivery")

    result = deliver(store, settings_with(email=email_channel), NOW, root=tmp_path)

    assert (result.sent, result.failed, result.skipped) == (3, 1, 1)
    assert smtp_server.logins == [(b"rewards", b"s3cret")]
    assert len(smtp_server.messages) == 3
    by_recipient = {tuple(recipients): message for recipients, message in smtp_server.messages}
    assert set(by_recipient) == {(f"customer{i}@example.com",) for i in range(3)}
    message = by_recipient[("customer0@example.com",)]
    assert message["Message-ID"] == f"<{offers[0]['offer_id']}@loyalty>"
    assert message["From"] == "rewards@example.com" and message["Subject"] == "Hello c0"
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("plain",)).get_content().strip() == "Your code W00000"
    assert "<b>W00000</b>" in message.get_body(("html",)).get_content()
    state = statuses(store)
    assert state["c3"][0] == "failed" and state["c3"][2] == "recipient refused (SMTP 550)"
    assert state["c4"] == ("suppressed", 0, "no email address")
    # logs carry ids, never addresses or message text
    assert "c3" in caplog.text and offers[3]["offer_id"] in caplog.text
    assert "@example.com" not in caplog.text and "Your code" not in caplog.text
    assert "@example.com" not in json.dumps(result.errors)


def test_smtp_login_without_the_environment_variable_is_a_configuration_error(store, tmp_path,
                                                                              monkeypatch):
    monkeypatch.delenv("LOYALTY_MISSING", raising=False)
    channel = ChannelDef("email", "smtp", {"sender": "a@example.com", "username_env": "USER",
                                           "password_env": "LOYALTY_MISSING"})
    monkeypatch.setenv("USER", "me")
    record(store, [make_offer(1, "email")])
    with pytest.raises(DeliveryError, match="LOYALTY_MISSING is not set") as caught:
        deliver(store, settings_with(email=channel), NOW, root=tmp_path)
    assert caught.value.exit_code == 3
    assert statuses(store)["c1"] == ("pending", 0, None)


# --------------------------------------------------------------------------- webhook


class Endpoint(BaseHTTPRequestHandler):
    """An idempotent receiver: the first request of some keys gets a 500, of others a
    response slower than the client waits; a replayed key is acknowledged, not processed."""

    lock = threading.Lock()

    def do_POST(self):
        server = self.server
        key = self.headers["Idempotency-Key"]
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            server.requests[key] += 1
            first = server.requests[key] == 1
            customer = payload["customer_id"]
            if customer in server.rejected:
                status = 422
            elif first and customer in server.flaky:
                status = 500
            else:
                status = 200
                if key not in server.processed:
                    server.processed[key] = payload
                    server.times_processed[key] += 1
        if status == 200 and first and customer in server.slow:
            time.sleep(server.delay)          # processed, but the answer comes too late
        try:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:
            pass                               # the client already gave up

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.daemon_threads = True
    server.requests, server.times_processed = Counter(), Counter()
    server.processed, server.flaky, server.slow, server.rejected = {}, set(), set(), set()
    server.delay = 1.0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhook_retries_until_every_offer_arrives_exactly_once(store, tmp_path, webhook_server):
    webhook_server.flaky = {"c1", "c4"}
    webhook_server.slow = {"c2", "c5"}
    webhook_server.rejected = {"c3"}
    push = ChannelDef("push", "webhook", {
        "url": f"http://127.0.0.1:{webhook_server.server_port}/push",
        "timeout": 0.3, "retries": 3, "backoff": 0.01})
    offers = [make_offer(i, "push", address=f"device-{i}") for i in range(8)]
    record(store, offers)

    result = deliver(store, settings_with(push=push), NOW, root=tmp_path)

    good = {o["offer_id"] for o in offers if o["customer_id"] != "c3"}
    assert set(webhook_server.processed) == good
    assert set(webhook_server.times_processed.values()) == {1}
    for customer in ("c1", "c4", "c2", "c5"):
        assert webhook_server.requests[offer_id(f"winback|{customer}|push")] == 2
    assert (result.sent, result.failed) == (7, 1)
    state = statuses(store)
    assert state["c3"] == ("failed", 1, "HTTP 422 Unprocessable Entity")
    assert all(state[f"c{i}"][0] == "sent" for i in (0, 1, 2, 4, 5, 6, 7))
    assert webhook_server.processed[offers[0]["offer_id"]]["reward"]["code"] == "W00000"

    again = deliver(store, settings_with(push=push), NOW, root=tmp_path)  # only c3 is retried
    assert (again.sent, again.failed) == (0, 1)
    assert statuses(store)["c3"][1] == 2


def test_webhook_gives_up_after_its_retries(store, tmp_path):
    push = ChannelDef("push", "webhook", {"url": f"http://127.0.0.1:{free_port()}/push",
                                          "timeout": 0.2, "retries": 2, "backoff": 0.01})
    record(store, [make_offer(1, "push")])
    result = deliver(store, settings_with(push=push), NOW, root=tmp_path)
    assert result.failed == 1
    assert "after 3 attempts" in result.errors[0]["error"]


def test_only_http_urls_are_accepted(store, tmp_path):
    record(store, [make_offer(1, "push")])
    push = ChannelDef("push", "webhook", {"url": "file:///etc/passwd"})
    with pytest.raises(DeliveryError, match="not an http"):
        deliver(store, settings_with(push=push), NOW, root=tmp_path)


# --------------------------------------------------------------------------- file


def sms_channel(path="outbox/sms.jsonl") -> ChannelDef:
    return ChannelDef("sms", "file", {"path": path}, address_column="phone",
                      consent_column="sms_opt_in")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_file_sender_writes_one_json_line_per_offer(store, tmp_path):
    record(store, [make_offer(i, "sms", address=f"+86138{i:08d}") for i in range(3)])
    result = deliver(store, settings_with(sms=sms_channel()), NOW, root=tmp_path)
    assert result.sent == 3
    written = lines(tmp_path / "outbox" / "sms.jsonl")
    assert [line["customer_id"] for line in written] == ["c0", "c1", "c2"]
    assert {"offer_id", "campaign", "customer_id", "channel", "variant", "reward", "send_at",
            "subject", "body", "address", "locale"} <= set(written[0])
    assert written[0]["send_at"] == "2024-05-01T10:00:00+08:00"
    assert deliver(store, settings_with(sms=sms_channel()), NOW, root=tmp_path).sent == 0
    assert len(lines(tmp_path / "outbox" / "sms.jsonl")) == 3


def test_a_crash_between_append_and_mark_sent_writes_no_second_line(store, tmp_path):
    offers = [make_offer(i, "sms") for i in range(2)]
    record(store, offers)
    # the first delivery appended c0's line and died before marking it sent
    crashed = FileSender(sms_channel(), tmp_path)
    crashed.send(store.pending(NOW)[0])
    crashed.flush()
    crashed._file.close()
    # ... and a torn half line was left by a write interrupted mid-way
    outbox = tmp_path / "outbox" / "sms.jsonl"
    with open(outbox, "a", encoding="utf-8") as torn:
        torn.write('{"offer_id": "' + offers[1]["offer_id"][:6])
    assert statuses(store)["c0"][0] == "pending"

    result = deliver(store, settings_with(sms=sms_channel()), NOW, root=tmp_path)

    assert result.sent == 2
    assert [line["customer_id"] for line in lines(outbox)] == ["c0", "c1"]
    assert {s for s, _, _ in statuses(store).values()} == {"sent"}


def test_a_file_path_may_not_leave_the_workspace(store, tmp_path):
    record(store, [make_offer(1, "sms")])
    for path in ("../elsewhere.jsonl", "/tmp/outbox.jsonl"):
        with pytest.raises(DeliveryError, match="outside the workspace"):
            deliver(store, settings_with(sms=sms_channel(path)), NOW, root=tmp_path / "ws")


def test_big_deliveries_are_batched_behind_a_progress_bar(store, tmp_path):
    record(store, [make_offer(i, "sms") for i in range(1200)])
    result = deliver(store, settings_with(sms=sms_channel()), NOW, root=tmp_path, progress=True)
    assert result.sent == 1200
    assert len(lines(tmp_path / "outbox" / "sms.jsonl")) == 1200


# --------------------------------------------------------------------------- policy at send time


@pytest.mark.parametrize("consent", [
    lambda customer_id, channel: customer_id != "c1",
    {("c0", "sms"): True, ("c1", "sms"): False, ("c2", "sms"): True},
    pd.DataFrame({"customer_id": ["c0", "c1", "c2"], "sms_opt_in": [True, False, True]}),
], ids=["callable", "mapping", "frame"])
def test_consent_is_checked_again_at_delivery(store, tmp_path, consent):
    record(store, [make_offer(i, "sms") for i in range(3)])
    result = deliver(store, settings_with(sms=sms_channel()), NOW, consent=consent, root=tmp_path)
    assert (result.sent, result.skipped) == (2, 1)
    assert statuses(store)["c1"] == ("suppressed", 0, "no consent for sms at delivery")
    assert [line["customer_id"] for line in lines(tmp_path / "outbox" / "sms.jsonl")] == ["c0", "c2"]
    assert "c1" not in set(store.contact_history(AS_OF - pd.Timedelta(days=1))["customer_id"])
    # a later delivery never resurrects the opted-out customer
    assert deliver(store, settings_with(sms=sms_channel()), NOW, root=tmp_path).sent == 0


def test_an_offer_waits_for_its_send_at(store, tmp_path):
    later = (AS_OF + pd.Timedelta(hours=12)).isoformat()       # after quiet hours
    record(store, [make_offer(1, "sms"), make_offer(2, "sms", send_at=later)])
    first = deliver(store, settings_with(sms=sms_channel()), NOW, root=tmp_path)
    assert (first.sent, first.not_due) == (1, 1)
    assert statuses(store)["c2"][0] == "pending"
    second = deliver(store, settings_with(sms=sms_channel()), AS_OF + pd.Timedelta(hours=13),
                     root=tmp_path)
    assert (second.sent, second.not_due) == (1, 0)


def test_wrong_channel_configuration_raises(store, tmp_path):
    assert set(SENDERS) == {"file", "webhook", "smtp"}
    record(store, [make_offer(1, "sms")])
    with pytest.raises(DeliveryError, match="no channels.sms"):
        deliver(store, settings_with(), NOW, root=tmp_path)
    with pytest.raises(DeliveryError, match="unknown sender 'carrier-pigeon'"):
        deliver(store, settings_with(sms=ChannelDef("sms", "carrier-pigeon")), NOW, root=tmp_path)
    assert statuses(store)["c1"] == ("pending", 0, None)
