"""Channel senders: one class per way of sending (``send:`` in loyalty.yaml), in ``SENDERS``.

Every sender is safe to retry: the file sender never writes an offer twice, the webhook
sends ``Idempotency-Key: <offer_id>``, mail carries ``Message-ID: <offer_id@loyalty>``. A
sender raises ``SendError`` for one offer, ``ChannelDown`` when its server cannot be reached.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from email.utils import formatdate
from http.client import HTTPException
from pathlib import Path
from typing import Any, Mapping

import orjson

from engine.config.model import ChannelDef
from engine.config.settings import EnvSecret, mask_secrets, reveal
from engine.errors import BadAddress, ChannelDown, DeliveryError, SendError
from engine.state.addresses import ADDRESS_KINDS, CONTROL_CHARACTERS, address_kind, email_address

log = logging.getLogger("loyalty.delivery")

# The JSON fields an outside system receives for an offer (file line, webhook body).
OFFER_FIELDS = ("offer_id", "campaign", "campaign_name", "customer_id", "channel", "variant",
                "reward", "send_at", "subject", "body", "html", "address", "locale")


def offer_payload(offer: Mapping[str, Any]) -> dict:
    """What an outside system receives for one offer."""
    return {name: offer.get(name) for name in OFFER_FIELDS}


class Sender:
    """Base of the channel senders; ``send`` raises SendError for one failed offer.

    Construction checks the channel options and raises DeliveryError when they
    are wrong. ``batch_size`` offers are sent before ``flush`` and one store
    update; senders that cannot tell a retry from a first send keep it at 1.
    """

    needs_address = False
    batch_size = 1

    def __init__(self, channel: ChannelDef, root: Path):
        self.channel = channel
        self.root = Path(root)
        self.options = dict(channel.options)
        self.check_address = ADDRESS_KINDS[address_kind(channel)]
        self.secrets: tuple[str, ...] = ()      # values masked in every message about this channel

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.channel.name!r})"

    def option(self, name: str, kind: type | tuple[type, ...], default: Any = None,
               required: bool = False) -> Any:
        """A channel option of the given type; DeliveryError when missing or mistyped."""
        value = self.options.get(name, default)
        if value is None and required:
            raise DeliveryError(f"channels.{self.channel.name}: '{name}' is required for "
                                f"send: {self.channel.send}")
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if value is not None and (not isinstance(value, kinds)
                                  or isinstance(value, bool) and bool not in kinds):
            raise DeliveryError(f"channels.{self.channel.name}.{name}: expected "
                                f"{getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def send(self, offer: dict) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make what ``send`` accepted durable before the store marks it sent."""

    def close(self) -> None:
        pass


class FileSender(Sender):
    """Appends one JSON line per offer to ``path`` (inside the workspace), fsynced.

    The file's offer ids are read once when the sender opens: an offer already
    in the file (written before a crash, never marked sent) is not written again,
    so the file holds one line per offer however often delivery is retried. A
    torn last line from a crash mid-write is cut off first.
    """

    batch_size = 20_000        # offers written, fsynced and marked sent together (a page)

    def __init__(self, channel: ChannelDef, root: Path):
        super().__init__(channel, root)
        relative = self.option("path", str, f"outbox/{channel.name}.jsonl")
        base = self.root.resolve()
        target = (base / relative).resolve()
        if Path(relative).is_absolute() or not target.is_relative_to(base):
            raise DeliveryError(f"channels.{channel.name}.path: '{relative}' is outside the "
                                "workspace (use a path relative to the workspace folder)")
        self.path = target
        self._file = None
        self._written: set[str] = set()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            with open(self.path, "rb+") as existing:
                data = existing.read()
                if data and not data.endswith(b"\n"):
                    keep = data.rfind(b"\n") + 1
                    log.warning("%s: cutting off a torn last line left by an interrupted write",
                                self.path.name)
                    existing.truncate(keep)
                    data = data[:keep]
            for line in data.splitlines():
                try:
                    self._written.add(orjson.loads(line)["offer_id"])
                except (ValueError, KeyError, TypeError):
                    continue
        self._file = open(self.path, "ab", buffering=1 << 20)   # UTF-8 lines, as orjson writes them

    def send(self, offer: dict) -> None:
        if self._file is None:
            self._open()
        if offer["offer_id"] in self._written:
            return
        line = orjson.dumps(offer_payload(offer), default=str)
        try:
            self._file.write(line + b"\n")
        except OSError as exc:
            raise SendError(f"cannot write {self.path.name}: {exc.strerror}") from exc
        self._written.add(offer["offer_id"])

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None


class WebhookSender(Sender):
    """POSTs each offer as JSON with ``Idempotency-Key: <offer_id>`` (urllib).

    Timeouts, connection errors, 5xx and 429 are retried ``retries`` times with
    exponential backoff (``backoff`` seconds, doubled each time); another 4xx
    fails the offer with the status and reason.
    """

    def __init__(self, channel: ChannelDef, root: Path):
        super().__init__(channel, root)
        self.url = self.option("url", str, required=True)
        if not re.match(r"https?://", self.url):
            raise DeliveryError(f"channels.{channel.name}.url: '{mask_secrets(self.url)}' is not an "
                                "http:// or https:// address")
        self.timeout = float(self.option("timeout", (int, float), 10))
        self.retries = int(self.option("retries", int, 3))
        self.backoff = float(self.option("backoff", (int, float), 0.5))
        written = self.option("headers", dict, {})
        self.headers = {str(name): self._header(str(name), value) for name, value in written.items()}
        self.secrets = tuple(self.headers[str(name)] for name, value in written.items()
                             if isinstance(value, EnvSecret))

    def _header(self, name: str, value: Any) -> str:
        """A header's value, from the environment for ``{env: NAME}``; a line break would
        smuggle in another header, so it is refused (without printing the value)."""
        text = reveal(value)
        if CONTROL_CHARACTERS.search(name) or CONTROL_CHARACTERS.search(text):
            raise DeliveryError(f"channels.{self.channel.name}.headers.{name}: the header contains a "
                                "line break or another control character")
        return text

    def send(self, offer: dict) -> None:
        body = orjson.dumps(offer_payload(offer), default=str)
        headers = {"Content-Type": "application/json", "User-Agent": "loyalty",
                   **self.headers, "Idempotency-Key": offer["offer_id"]}
        problem = "not sent"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                return
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code} {exc.reason}"
                if exc.code < 500 and exc.code != 429:
                    raise SendError(problem) from None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                problem = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        raise SendError(f"{problem} (after {self.retries + 1} attempts)")


class SmtpSender(Sender):
    """Mails each offer (multipart text + HTML) through one SMTP connection.

    Options: host, port, sender, ``starttls: true`` or ``ssl: true``, ``timeout`` (seconds
    per SMTP command), and the login: ``username`` with ``password: {env: NAME}``, or the
    names of environment variables holding it (``username_env``, ``password_env``), so
    secrets stay out of loyalty.yaml. A server that cannot be reached, hangs or hangs up
    raises ChannelDown; a refused recipient fails that offer alone.
    """

    needs_address = True

    def __init__(self, channel: ChannelDef, root: Path):
        super().__init__(channel, root)
        self.host = self.option("host", str, "localhost")
        self.port = int(self.option("port", int, 25))
        self.sender = self.option("sender", str, required=True)
        try:
            email_address(self.sender)
        except BadAddress as exc:
            raise DeliveryError(f"channels.{channel.name}.sender: {exc}") from None
        self.starttls = bool(self.option("starttls", bool, False))
        self.use_ssl = bool(self.option("ssl", bool, False))
        self.timeout = float(self.option("timeout", (int, float), 30))
        self.check_address = email_address
        self.login = self._login()
        self.secrets = (self.login[1],) if self.login else ()
        self._smtp: smtplib.SMTP | None = None

    def _login(self) -> tuple[str, str] | None:
        """(user, password) from ``username``/``password`` or the ``*_env`` variables; None
        without a login."""
        username, password = self.options.get("username"), self.options.get("password")
        if username is not None or password is not None:
            if username is None or password is None:
                raise DeliveryError(f"channels.{self.channel.name}: give both username and password, "
                                    "or neither")
            return reveal(username), reveal(password)
        names = [self.option("username_env", str), self.option("password_env", str)]
        if not any(names):
            return None
        if not all(names):
            raise DeliveryError(f"channels.{self.channel.name}: give both username_env and "
                                "password_env, or neither")
        missing = [name for name in names if name not in os.environ]
        if missing:
            raise DeliveryError(f"channels.{self.channel.name}: environment variable "
                                f"{missing[0]} is not set")
        return os.environ[names[0]], os.environ[names[1]]

    @property
    def server(self) -> str:
        return f"the SMTP server at {self.host}:{self.port}"

    def _connect(self) -> smtplib.SMTP:
        """A connection, with TLS and login as configured; ChannelDown when there is none."""
        smtp = None
        try:
            if self.use_ssl:
                smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout,
                                        context=ssl.create_default_context())
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
            if self.login:
                smtp.login(*self.login)
        except smtplib.SMTPAuthenticationError as exc:
            _close_quietly(smtp)
            raise ChannelDown(f"{self.server} refused the login (SMTP {exc.smtp_code})") from None
        except (OSError, smtplib.SMTPException) as exc:
            _close_quietly(smtp)
            raise ChannelDown(f"cannot connect to {self.server}: "
                              f"{connection_problem(exc, self.timeout)}") from None
        return smtp

    def message(self, offer: dict, recipient: str | None = None) -> EmailMessage:
        """The e-mail for one offer; its Message-ID is derived from the offer id."""
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = recipient or email_address(str(offer["address"]))
        message["Subject"] = offer.get("subject") or offer.get("campaign_name") or ""
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<{offer['offer_id']}@loyalty>"
        message.set_content(offer.get("body") or "")
        if offer.get("html"):
            message.add_alternative(offer["html"], subtype="html")
        return message

    def send(self, offer: dict) -> None:
        recipient = email_address(str(offer["address"]))
        message = self.message(offer, recipient)
        for attempt in range(2):          # one reconnect when the server hung up between mails
            if self._smtp is None:
                self._smtp = self._connect()
            try:
                self._smtp.send_message(message, to_addrs=[recipient])   # never the To header's list
                return
            except smtplib.SMTPServerDisconnected as exc:
                self._drop()
                if attempt or _timed_out(exc):
                    raise ChannelDown(f"{self.server} stopped answering: "
                                      f"{connection_problem(exc, self.timeout)}") from None
            except smtplib.SMTPRecipientsRefused as exc:
                codes = sorted({code for code, _ in exc.recipients.values()})
                raise SendError(f"recipient refused (SMTP {', '.join(map(str, codes))})") from None
            except smtplib.SMTPResponseException as exc:
                text = exc.smtp_error.decode(errors="replace") if isinstance(
                    exc.smtp_error, bytes) else str(exc.smtp_error)
                if exc.smtp_code == 421:      # the server is shutting the connection
                    self._drop()
                    raise ChannelDown(f"{self.server} is not available (SMTP 421 {text})") from None
                raise SendError(f"SMTP {exc.smtp_code} {text}") from None
            except smtplib.SMTPException as exc:
                raise SendError(f"SMTP error: {exc}") from None
            except OSError as exc:            # a timeout or reset in the middle of a mail
                self._drop()
                raise ChannelDown(f"{self.server} stopped answering: "
                                  f"{connection_problem(exc, self.timeout)}") from None

    def _drop(self) -> None:
        _close_quietly(self._smtp)
        self._smtp = None

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._smtp = None


def _close_quietly(smtp: smtplib.SMTP | None) -> None:
    if smtp is not None:
        try:
            smtp.close()
        except OSError:
            pass


def _timed_out(exc: BaseException) -> bool:
    """Whether a connection error is, or was caused by, a timeout (smtplib wraps them)."""
    return isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)


def connection_problem(exc: BaseException, timeout: float) -> str:
    """Why a server connection failed, in plain words."""
    if _timed_out(exc):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running, and on this port?)"
    if isinstance(exc, socket.gaierror):
        return "unknown host name"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return "the server closed the connection"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return "the server does not offer STARTTLS"
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        return f"the server answered SMTP {exc.smtp_code} {text}"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


SENDERS: dict[str, type[Sender]] = {"file": FileSender, "webhook": WebhookSender,
                                    "smtp": SmtpSender}


def make_sender(channel: ChannelDef, root: Path) -> Sender:
    """The sender for a channel; DeliveryError when its configuration is wrong."""
    kind = SENDERS.get(channel.send)
    if kind is None:
        raise DeliveryError(f"channels.{channel.name}.send: unknown sender '{channel.send}' "
                            f"(one of {', '.join(sorted(SENDERS))})")
    return kind(channel, root)
