"""Secrets (issue 18): webhook headers, the SMTP login and a database password come from the
environment (`{env: NAME}`), a missing variable is named with where loyalty.yaml asks for it,
and no secret is ever printed, logged, stored or shown in a repr.

Real servers on loopback: an HTTP receiver, aiosmtpd (plain, SMTPS and STARTTLS), and a
minimal PostgreSQL speaker for pg8000 that asks for a clear-text password."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from click.testing import CliRunner

from cli import main
from engine import Workspace, init_example, init_workspace
from engine.config.model import ChannelDef, ContactPolicy, Settings
from engine.config.settings import EnvSecret, mask_secrets
from engine.decide.evaluation import offer_id
from engine.errors import DeliveryError, SecretNotSet
from engine.state.delivery import deliver
from engine.state.senders import make_sender
from engine.state.store import StateStore

ROOT = Path(__file__).resolve().parents[2]
PUSH_TOKEN = "Bearer tok-9f2c1d7e55"
SMTP_PASSWORD = "smtp-pw-71b3e0"
DB_PASSWORD = "db-pw-4c8a9e"
SMALL_AS_OF, SMALL_NOW = "2026-12-25T10:00:00+08:00", "2026-12-25T10:00:00+08:00"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def set_channels(workspace: Path, channels: str, marker: str = "channels:") -> Path:
    """loyalty.yaml with everything from ``channels:`` on replaced by ``channels``."""
    path = workspace / "loyalty.yaml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[:text.index(marker)] + channels, encoding="utf-8")
    return path


def position_of(path: Path, needle: str) -> str:
    """``file:line:col`` of the first ``needle`` in loyalty.yaml, as problems print it."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if needle in line:
            return f"loyalty.yaml:{number}:{line.index(needle) + 1}"
    raise AssertionError(f"{needle} not in {path}")


@pytest.fixture
def small(tmp_path) -> Path:
    init_workspace(tmp_path / "ws")
    return tmp_path / "ws"


# --------------------------------------------------------------------------- real servers


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.headers_seen.append(dict(self.headers))
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.headers_seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class Inbox:
    def __init__(self):
        self.recipients: list[list[str]] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 OK"


def smtp_controller(inbox: Inbox, **tls) -> Controller:
    def authenticator(server, session, envelope, mechanism, auth_data):
        inbox.logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == SMTP_PASSWORD.encode())

    return Controller(inbox, hostname="127.0.0.1", port=free_port(), authenticator=authenticator,
                      auth_require_tls=False, **tls)


@pytest.fixture
def smtp_server():
    inbox = Inbox()
    controller = smtp_controller(inbox)
    controller.start()
    inbox.port = controller.port
    yield inbox
    controller.stop()


def _recv(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class FakePostgres:
    """Enough of the PostgreSQL protocol for a login: asks for a clear-text password, records
    it, and refuses the login with a message that repeats the password (a careless server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.logins: list[tuple[str, str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._login(conn)
                except OSError:
                    pass

    def _login(self, conn: socket.socket) -> None:
        while True:
            body = _recv(conn, struct.unpack("!i", _recv(conn, 4))[0] - 4)
            if struct.unpack("!i", body[:4])[0] != 80877103:      # not an SSLRequest
                break
            conn.sendall(b"N")
        params = body[4:].split(b"\0")
        user = params[params.index(b"user") + 1].decode()
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))                # AuthenticationCleartextPassword
        assert _recv(conn, 1) == b"p"
        password = _recv(conn, struct.unpack("!i", _recv(conn, 4))[0] - 4).rstrip(b"\0").decode()
        self.logins.append((user, password))
        text = f'password authentication failed for user "{user}" with password "{password}"'
        fields = b"SFATAL\0VFATAL\0C28P01\0M" + text.encode() + b"\0\0"
        conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- from the environment


def test_webhook_headers_and_the_smtp_login_come_from_the_environment(tmp_path, webhook, smtp_server,
                                                                      caplog):
    workspace = tmp_path / "ws"
    init_example(workspace)
    settings = set_channels(workspace, f"""channels:
  email:
    send: smtp
    host: 127.0.0.1
    port: {smtp_server.port}
    sender: rewards@example.com
    username: rewards
    password: {{env: SMTP_PASSWORD}}
  sms:   {{send: file, path: outbox/sms.jsonl, max_sms_segments: 2}}
  push:
    send: webhook
    url: http://127.0.0.1:{webhook.server_port}/push?sig=kept-out
    headers: {{Authorization: {{env: PUSH_TOKEN}}, X-Tenant: star}}
""")
    assert PUSH_TOKEN not in settings.read_text() and SMTP_PASSWORD not in settings.read_text()
    env = {"PUSH_TOKEN": PUSH_TOKEN, "SMTP_PASSWORD": SMTP_PASSWORD}
    caplog.set_level(logging.DEBUG)

    text = invoke("run", str(workspace), "--as-of", "2026-11-23", env=env)
    runs = invoke("runs", str(workspace), "--format", "json", env=env)

    assert text.exit_code == 0, text.output
    assert len(webhook.headers_seen) > 50
    assert {(h["Authorization"], h["X-Tenant"]) for h in webhook.headers_seen} == {(PUSH_TOKEN, "star")}
    assert smtp_server.logins == [(b"rewards", SMTP_PASSWORD.encode())]
    assert len(smtp_server.recipients) > 100
    loaded = Workspace(workspace).load().settings
    shown = [text.output, runs.output, caplog.text, repr(loaded),
             (workspace / "state" / "loyalty.db").read_bytes().decode("latin-1")]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        shown += [repr(make_sender(channel, workspace)) for channel in loaded.channels.values()]
    for secret in (PUSH_TOKEN, SMTP_PASSWORD, "tok-9f2c1d7e55"):
        assert not [place for place in shown if secret in place]
    assert loaded.channels["push"].options["headers"]["Authorization"] == EnvSecret(
        "PUSH_TOKEN", "channels.push.headers.Authorization", position_of(settings, "{env: PUSH_TOKEN}"))


@pytest.mark.parametrize("channels, key, variable, needle", [
    ("""channels:
  sms:
    send: webhook
    url: http://127.0.0.1:9/sms
    headers: {Authorization: {env: LOYALTY_TEST_UNSET}}
  email: {send: file, path: outbox/email.jsonl}
""", "channels.sms.headers.Authorization", "LOYALTY_TEST_UNSET", "{env: LOYALTY_TEST_UNSET}"),
    ("""channels:
  sms: {send: file, path: outbox/sms.jsonl}
  email:
    send: smtp
    sender: rewards@example.com
    username: {env: LOYALTY_TEST_UNSET}
    password: {env: LOYALTY_TEST_PASSWORD}
""", "channels.email.username", "LOYALTY_TEST_UNSET", "{env: LOYALTY_TEST_UNSET}"),
], ids=["webhook-header", "smtp-username"])
def test_a_missing_variable_names_the_key_the_variable_and_where_it_is_written(
        small, monkeypatch, channels, key, variable, needle):
    monkeypatch.delenv("LOYALTY_TEST_UNSET", raising=False)
    monkeypatch.setenv("LOYALTY_TEST_PASSWORD", "irrelevant")
    settings = set_channels(small, channels)

    assert invoke("validate", str(small)).exit_code == 0      # CI can validate without the secrets
    result = invoke("run", str(small), "--as-of", SMALL_AS_OF, "--now", SMALL_NOW)

    assert result.exit_code == 3
    assert (f"error: {position_of(settings, needle)}: {key}: the environment variable {variable} "
            "is not set") in result.output
    with StateStore(small / "state" / "loyalty.db") as store:     # recorded, waiting to be sent
        assert store.db.execute("SELECT DISTINCT status, attempts FROM offers").fetchall() == [("pending", 0)]


# --------------------------------------------------------------------------- database password


def database_source(workspace: Path, url: str, password: str | None) -> Path:
    path = workspace / "loyalty.yaml"
    text = path.read_text(encoding="utf-8")
    written = "  events:    {path: data/events.csv, fields: {score: number}}"
    assert written in text
    extra = f"\n    password: {password}" if password else ""
    path.write_text(text.replace(written, f"  events:\n    url: {url}\n    table: events{extra}"),
                    encoding="utf-8")
    return path


def test_the_database_password_comes_from_the_environment_and_is_masked(small, monkeypatch):
    server = FakePostgres()
    url = f"postgresql+pg8000://loyalty@127.0.0.1:{server.port}/crm"
    settings = database_source(small, url, "{env: CRM_DB_PASSWORD}")
    try:
        monkeypatch.delenv("CRM_DB_PASSWORD", raising=False)
        missing = invoke("preview", str(small), "--as-of", SMALL_AS_OF)
        monkeypatch.setenv("CRM_DB_PASSWORD", DB_PASSWORD)
        refused = invoke("preview", str(small), "--as-of", SMALL_AS_OF)
    finally:
        server.close()

    assert missing.exit_code == 3
    assert (f"{position_of(settings, '{env: CRM_DB_PASSWORD}')}: data.events.password: the environment "
            "variable CRM_DB_PASSWORD is not set") in missing.output
    assert server.logins == [("loyalty", DB_PASSWORD)]           # the password reached the server
    assert refused.exit_code == 1
    assert f"events table 'events' at {url}: cannot read from the database" in refused.output
    assert 'with password "***"' in refused.output and DB_PASSWORD not in refused.output


def test_passwords_written_in_urls_never_show_in_errors(small):
    closed = free_port()
    database_source(small, f"postgresql+pg8000://loyalty:hunter2@127.0.0.1:{closed}/crm?password=hunter3",
                    None)
    result = invoke("preview", str(small), "--as-of", SMALL_AS_OF)
    assert result.exit_code == 1
    assert f"postgresql+pg8000://loyalty:***@127.0.0.1:{closed}/crm?password=***" in result.output
    assert "hunter2" not in result.output and "hunter3" not in result.output

    channel = ChannelDef("push", "webhook", {"url": "ftp://ops:hunter2@files.example.com/in?token=hunter3"})
    with pytest.raises(DeliveryError) as raised:
        make_sender(channel, small)
    assert str(raised.value) == ("channels.push.url: 'ftp://ops:***@files.example.com/in?token=***' is "
                                 "not an http:// or https:// address")


@pytest.mark.parametrize("text, shown", [
    ("postgresql://loyalty:s3cret@db:5432/crm", "postgresql://loyalty:***@db:5432/crm"),
    ("mysql+pymysql://u:p@ss@db/crm failed", "mysql+pymysql://u:***@db/crm failed"),
    ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
    ("https://api.example.com/v1?key=abc&x=1&Password=p#top", "https://api.example.com/v1?key=***&x=1&Password=***#top"),
    ("http://127.0.0.1:8080/push", "http://127.0.0.1:8080/push"),
    ("postgresql://loyalty@db:5432/crm", "postgresql://loyalty@db:5432/crm"),
    ("login failed for 'tok-123'", "login failed for '***'"),
])
def test_mask_secrets(text, shown):
    assert mask_secrets(text, ["tok-123"]) == shown


def test_an_env_secret_holds_no_value_and_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("PUSH_TOKEN", PUSH_TOKEN)
    secret = EnvSecret("PUSH_TOKEN", "channels.push.headers.Authorization", "loyalty.yaml:31:36")
    assert secret.value() == PUSH_TOKEN and PUSH_TOKEN not in repr(secret) + str(secret)
    monkeypatch.delenv("PUSH_TOKEN")
    with pytest.raises(SecretNotSet) as raised:
        secret.value()
    assert raised.value.exit_code == 3
    assert str(raised.value).startswith("loyalty.yaml:31:36: channels.push.headers.Authorization: "
                                        "the environment variable PUSH_TOKEN is not set")


# --------------------------------------------------------------------------- checked at their line


@pytest.mark.parametrize("channel, needle, message", [
    ("{send: smtp, sender: a@example.com, port: 465, ssl: true, starttls: true}", "ssl:",
     "ssl and starttls cannot both be on"),
    ("{send: smtp, sender: a@example.com, password: {env: SMTP_PASSWORD}}", "password:",
     "password needs a username as well"),
    ("{send: smtp, sender: a@example.com, username: me, password: {env: P}, password_env: P}", "username:",
     "give the login once: username and password, or username_env and password_env"),
    ("{send: smtp, sender: a@example.com, username: me, password: hunter2}", "hunter2",
     "'password' should be a mapping of keys, not text"),
    ("{send: webhook, url: 'http://x/', headers: {Authorization: {env: 'not a name'}}}", "'not a name'",
     "'not a name' does not have the expected form for 'env'"),
])
def test_secret_options_are_checked_where_they_are_written(small, channel, needle, message):
    settings = set_channels(small, f"channels:\n  sms: {{send: file}}\n  email: {channel}\n")
    result = invoke("validate", str(small), "--format", "json")
    assert result.exit_code == 1
    problems = [p for p in json.loads(result.output) if message in p["message"]]
    assert problems, result.output
    line, column = position_of(settings, needle).split(":")[1:]
    assert (problems[0]["line"], problems[0]["column"]) == (int(line), int(column))


def test_a_database_password_needs_a_url_without_one(small):
    settings = database_source(small, "postgresql://loyalty:inline@db/crm", "{env: CRM_DB_PASSWORD}")
    result = invoke("validate", str(small))
    assert result.exit_code == 1
    assert (f"{position_of(settings, 'postgresql://')}: the url holds a password as well as password:"
            in result.output)


# --------------------------------------------------------------------------- docs and TLS


def documented_settings() -> list[str]:
    """The YAML examples of docs/operations.md that configure channels or data sources."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    return [block for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
            if re.match(r"(channels|data):", block)]


def test_the_documented_channel_and_secret_examples_validate(small):
    blocks = documented_settings()
    documented = "\n".join(blocks)
    for option in ("ssl: true", "starttls: true", "headers:", "{env: PUSH_TOKEN}",
                   "password: {env: SMTP_PASSWORD}", "password: {env: CRM_DB_PASSWORD}"):
        assert option in documented, option
    base = yaml.safe_load((small / "loyalty.yaml").read_text(encoding="utf-8"))
    for block in blocks:
        data = {**base, "channels": dict(base["channels"])}
        for key, value in yaml.safe_load(block).items():
            data[key] = {**data[key], **value}
        (small / "loyalty.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        result = invoke("validate", str(small))
        assert result.exit_code == 0, block + result.output


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_smtp_over_tls_with_the_password_from_the_environment(tmp_path, certificate, monkeypatch, mode):
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))          # the client trusts our test certificate
    monkeypatch.setenv("SMTP_PASSWORD", SMTP_PASSWORD)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    inbox = Inbox()
    controller = smtp_controller(inbox, **({"ssl_context": context} if mode == "ssl" else {"tls_context": context}))
    controller.start()
    channel = ChannelDef("email", "smtp", {
        "host": "127.0.0.1", "port": controller.port, "sender": "rewards@example.com", mode: True,
        "username": "rewards", "password": EnvSecret("SMTP_PASSWORD", "channels.email.password")})
    settings = Settings(name="x", timezone="Asia/Shanghai", currency="CNY", default_locale="zh-CN",
                        data={}, state_path=Path("state/loyalty.db"), contact_policy=ContactPolicy(),
                        holdout=0.0, channels={"email": channel})
    as_of = pd.Timestamp("2024-05-01 10:00", tz="Asia/Shanghai")
    offer = {"offer_id": offer_id("k|c1|email"), "firing_key": "k|c1|email", "campaign": "k",
             "campaign_name": "K", "customer_id": "c1", "channel": "email", "variant": None,
             "reward": {"kind": "message"}, "cost": 0.0, "send_at": as_of.isoformat(), "subject": "Hi",
             "body": "Hello", "html": None, "address": "c1@example.com", "locale": "en",
             "as_of": as_of.isoformat(), "explanation": {}, "rule_version": "v1"}
    try:
        with StateStore(tmp_path / "state.db") as store:
            store.record_run(store.begin_run(as_of, {}, {}, ["k"]), [offer])
            result = deliver(store, settings, as_of, root=tmp_path)
    finally:
        controller.stop()
    assert (result.sent, result.failed, result.deferred) == (1, 0, 0), result
    assert inbox.recipients == [["c1@example.com"]]
    assert inbox.logins == [(b"rewards", SMTP_PASSWORD.encode())]
