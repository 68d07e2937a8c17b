"""Delivery: send the store's due offers through one sender per channel kind.

``deliver`` reads pending offers whose ``send_at`` has come, checks consent again
(an opt-out after the run suppresses the offer), hands each to its channel's
sender and records the outcome. Failures are recorded and retried by the next
delivery; only a wrong channel configuration raises (DeliveryError, exit code 3).
Every sender is safe to retry: the file sender never writes an offer twice, the
webhook sends ``Idempotency-Key: <offer_id>``, mail carries ``Message-ID:
<offer_id@loyalty>``. Logs name offers and customers, never addresses or texts.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import formatdate
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable, Mapping

import orjson
import pandas as pd
from rich.console import Console
from rich.progress import Progress

from engine.config.model import ChannelDef, Settings
from engine.errors import DeliveryError, SendError
from engine.faults import checkpoint
from engine.state.database import gc_paused
from engine.state.outbox import MAX_ATTEMPTS
from engine.state.store import StateStore

log = logging.getLogger("loyalty.delivery")

PROGRESS_THRESHOLD = 500
# The JSON fields an outside system receives for an offer (file line, webhook body).
OFFER_FIELDS = ("offer_id", "campaign", "campaign_name", "customer_id", "channel", "variant",
                "reward", "send_at", "subject", "body", "html", "address", "locale")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")


@dataclass
class DeliveryResult:
    """Counts of one delivery; ``skipped`` offers were suppressed (consent, no address)."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    not_due: int = 0
    errors: list[dict] = field(default_factory=list)


def offer_payload(offer: Mapping[str, Any]) -> dict:
    """What an outside system receives for one offer."""
    return {name: offer.get(name) for name in OFFER_FIELDS}


def redact(text: str, offer: Mapping[str, Any]) -> str:
    """An error message fit for logs: the offer's address and any e-mail address removed."""
    address = offer.get("address")
    if address:
        text = text.replace(str(address), "<address>")
    return _EMAIL.sub("<address>", text)


# --------------------------------------------------------------------------- senders


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
            raise DeliveryError(f"channels.{channel.name}.url: '{self.url}' is not an "
                                "http:// or https:// address")
        self.timeout = float(self.option("timeout", (int, float), 10))
        self.retries = int(self.option("retries", int, 3))
        self.backoff = float(self.option("backoff", (int, float), 0.5))
        self.headers = {str(k): str(v) for k, v in self.option("headers", dict, {}).items()}

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

    Options: host, port, sender, ``starttls: true`` or ``ssl: true``, and the
    names of environment variables holding the login (``username_env``,
    ``password_env``) so secrets stay out of loyalty.yaml.
    """

    needs_address = True

    def __init__(self, channel: ChannelDef, root: Path):
        super().__init__(channel, root)
        self.host = self.option("host", str, "localhost")
        self.port = int(self.option("port", int, 25))
        self.sender = self.option("sender", str, required=True)
        self.starttls = bool(self.option("starttls", bool, False))
        self.use_ssl = bool(self.option("ssl", bool, False))
        self.timeout = float(self.option("timeout", (int, float), 30))
        self.login = self._login()
        self._smtp: smtplib.SMTP | None = None

    def _login(self) -> tuple[str, str] | None:
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

    def _connect(self) -> smtplib.SMTP:
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
        except (OSError, smtplib.SMTPException) as exc:
            raise SendError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return smtp

    def message(self, offer: dict) -> EmailMessage:
        """The e-mail for one offer; its Message-ID is derived from the offer id."""
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = offer["address"]
        message["Subject"] = offer.get("subject") or offer.get("campaign_name") or ""
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<{offer['offer_id']}@loyalty>"
        message.set_content(offer.get("body") or "")
        if offer.get("html"):
            message.add_alternative(offer["html"], subtype="html")
        return message

    def send(self, offer: dict) -> None:
        message = self.message(offer)
        for attempt in range(2):          # one reconnect when the server hung up
            if self._smtp is None:
                self._smtp = self._connect()
            try:
                self._smtp.send_message(message)
                return
            except smtplib.SMTPServerDisconnected:
                self._smtp = None
                if attempt:
                    raise SendError("the SMTP server closed the connection") from None
            except smtplib.SMTPRecipientsRefused as exc:
                codes = sorted({code for code, _ in exc.recipients.values()})
                raise SendError(f"recipient refused (SMTP {', '.join(map(str, codes))})") from None
            except smtplib.SMTPResponseException as exc:
                text = exc.smtp_error.decode(errors="replace") if isinstance(
                    exc.smtp_error, bytes) else str(exc.smtp_error)
                raise SendError(f"SMTP {exc.smtp_code} {text}") from None
            except (smtplib.SMTPException, OSError) as exc:
                self._smtp = None
                raise SendError(f"SMTP error: {exc}") from None

    def close(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._smtp = None


SENDERS: dict[str, type[Sender]] = {"file": FileSender, "webhook": WebhookSender,
                                    "smtp": SmtpSender}


def make_sender(channel: ChannelDef, root: Path) -> Sender:
    """The sender for a channel; DeliveryError when its configuration is wrong."""
    kind = SENDERS.get(channel.send)
    if kind is None:
        raise DeliveryError(f"channels.{channel.name}.send: unknown sender '{channel.send}' "
                            f"(one of {', '.join(sorted(SENDERS))})")
    return kind(channel, root)


def check_channels(settings: Settings, root: Path) -> None:
    """Build every configured sender once, so a wrong option fails before a run."""
    for channel in settings.channels.values():
        make_sender(channel, root).close()


# --------------------------------------------------------------------------- deliver

Consent = Callable[[str, str], bool] | Mapping[tuple[str, str], bool] | pd.DataFrame | None


def consent_checker(consent: Consent, settings: Settings) -> Callable[[str, str], bool]:
    """``(customer_id, channel) -> bool`` from a callable, a mapping or a customers frame.

    A mapping without the pair, or a frame without the customer, means no consent.
    A frame without the channel's consent column cannot say no.
    """
    if consent is None:
        return lambda customer_id, channel: True
    if isinstance(consent, pd.DataFrame):
        ids = consent["customer_id"].astype(str)
        allowed: dict[str, set[str] | None] = {}
        for name, channel in settings.channels.items():
            column = channel.consent_column
            if column in consent:
                yes = consent[column].astype("boolean").fillna(False).to_numpy(dtype=bool)
                allowed[name] = set(ids[yes])
            else:
                allowed[name] = None
        known = set(ids)
        return lambda customer_id, channel: (
            str(customer_id) in known if allowed.get(channel) is None
            else str(customer_id) in allowed[channel])
    if callable(consent):
        return lambda customer_id, channel: bool(consent(customer_id, channel))
    return lambda customer_id, channel: bool(consent.get((customer_id, channel), False))


def deliver(store: StateStore, settings: Settings, now: Any, consent: Consent = None,
            progress: bool = True, root: Path | str | None = None, limit: int | None = None,
            max_attempts: int = MAX_ATTEMPTS) -> DeliveryResult:
    """Send every due offer (``send_at <= now``) once and record how it went.

    ``root`` is the workspace folder that file-channel paths are relative to
    (default: the current directory). Raises DeliveryError only for channel
    configuration; each offer's failure is recorded and retried next time.
    """
    waiting = store.due_summary(now, max_attempts)
    total = sum(waiting.values()) if limit is None else min(limit, sum(waiting.values()))
    result = DeliveryResult(not_due=store.not_due(now))
    allowed = consent_checker(consent, settings)
    senders: dict[str, Sender] = {}
    try:
        for name in sorted(waiting):
            if name not in settings.channels:
                raise DeliveryError(f"offers are waiting for channel '{name}', but loyalty.yaml "
                                    f"has no channels.{name}")
            senders[name] = make_sender(settings.channels[name], Path(root or "."))
        with _progress_bar(total, progress) as advance, gc_paused():
            # a page of due offers at a time, each channel's in batches of its sender's size
            for page in store.due_pages(now, limit=limit, max_attempts=max_attempts,
                                          columns=OFFER_FIELDS):
                for name, sender in senders.items():
                    offers = [offer for offer in page if offer["channel"] == name]
                    for start in range(0, len(offers), sender.batch_size):
                        batch = offers[start:start + sender.batch_size]
                        _deliver_batch(store, sender, batch, allowed, result)
                        advance(len(batch))
    finally:
        for sender in senders.values():
            sender.close()
    log.info("delivery: %d sent, %d failed, %d suppressed, %d not yet due",
             result.sent, result.failed, result.skipped, result.not_due)
    return result


def _deliver_batch(store: StateStore, sender: Sender, batch: list[dict],
                   allowed: Callable[[str, str], bool], result: DeliveryResult) -> None:
    sent: list[str] = []
    failed: list[tuple[str, str]] = []
    suppressed: list[tuple[str, str]] = []
    for offer in batch:
        offer_id, customer_id, channel = offer["offer_id"], offer["customer_id"], offer["channel"]
        if not allowed(customer_id, channel):
            suppressed.append((offer_id, f"no consent for {channel} at delivery"))
            log.info("offer %s suppressed: customer %s has no consent for %s",
                     offer_id, customer_id, channel)
            continue
        if sender.needs_address and not offer.get("address"):
            suppressed.append((offer_id, f"no {channel} address"))
            log.info("offer %s suppressed: customer %s has no %s address",
                     offer_id, customer_id, channel)
            continue
        try:
            sender.send(offer)
        except SendError as exc:
            message = redact(str(exc), offer)
            failed.append((offer_id, message))
            result.errors.append({"offer_id": offer_id, "customer_id": customer_id,
                                  "channel": channel, "error": message})
            log.info("offer %s to customer %s on %s failed: %s",   # summarised by failure_summary
                     offer_id, customer_id, channel, message)
            continue
        sent.append(offer_id)
        log.debug("offer %s sent to customer %s on %s", offer_id, customer_id, channel)
    try:
        sender.flush()
    except OSError as exc:
        failed.extend((offer_id, f"cannot write the outbox file: {exc.strerror}")
                      for offer_id in sent)
        sent = []
    checkpoint("mid_delivery")
    store.mark_many(sent=sent, sent_at=datetime.now(timezone.utc), failed=failed,
                    suppressed=suppressed)
    result.sent += len(sent)
    result.failed += len(failed)
    result.skipped += len(suppressed)


def failure_summary(errors: list[dict], examples: int = 3) -> list[str]:
    """One line per channel and error, with how many offers and a few offer ids: what an
    operator reads after a delivery (the offers stay failed and are retried by `deliver`)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for error in errors:
        groups.setdefault((error["channel"], error["error"]), []).append(error["offer_id"])
    return [f"{len(ids)} offer(s) on {channel} failed: {message} (e.g. {', '.join(ids[:examples])})"
            for (channel, message), ids in sorted(groups.items(), key=lambda item: -len(item[1]))]


class _progress_bar:
    """A rich progress bar on stderr for big deliveries; a no-op otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.bar = None
        if enabled and total > PROGRESS_THRESHOLD:
            self.bar = Progress(console=Console(stderr=True), transient=True)

    def __enter__(self) -> Callable[[int], None]:
        if self.bar is None:
            return lambda n: None
        self.bar.start()
        task = self.bar.add_task("delivering", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.stop()
