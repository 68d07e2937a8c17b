"""Delivery: send the store's due offers through one sender per channel kind.

``deliver`` reads pending offers whose ``send_at`` has come, checks consent again
(an opt-out after the run suppresses the offer), hands each to its channel's
sender and records the outcome. Failures are recorded and retried by the next
delivery; only a wrong channel configuration raises (DeliveryError, exit code 3).
An address that cannot be used on its channel (two e-mail addresses in one, a line break,
a phone number without digits) fails that offer alone. When a channel's server cannot be
reached, the rest of that channel's offers stay pending for the next delivery instead of
each waiting out the timeout. Every sender is safe to retry: the file sender never writes an offer twice, the
webhook sends ``Idempotency-Key: <offer_id>``, mail carries ``Message-ID:
<offer_id@loyalty>``. Logs name offers and customers, never addresses or texts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
from rich.console import Console
from rich.progress import Progress

from engine.config.model import Settings
from engine.config.settings import mask_secrets
from engine.errors import ChannelDown, DeliveryError, SendError
from engine.faults import checkpoint
from engine.state.database import gc_paused
from engine.state.outbox import MAX_ATTEMPTS
from engine.state.senders import OFFER_FIELDS, Sender, make_sender
from engine.state.store import StateStore

log = logging.getLogger("loyalty.delivery")

PROGRESS_THRESHOLD = 500
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")    # line breaks, tabs, escapes, NUL
_PHONE = re.compile(r"\+?[0-9]{6,15}")


@dataclass
class DeliveryResult:
    """Counts of one delivery; ``skipped`` offers were suppressed (consent, no address);
    ``deferred`` offers stayed pending because their channel's server could not be reached,
    with the reason per channel in ``deferred_channels`` (channel -> offers, reason)."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    not_due: int = 0
    deferred: int = 0
    errors: list[dict] = field(default_factory=list)
    deferred_channels: dict[str, dict] = field(default_factory=dict)


def redact(text: str, offer: Mapping[str, Any], secrets: tuple[str, ...] = ()) -> str:
    """An error message fit for logs: the offer's address, any e-mail address and the
    channel's secrets removed."""
    text = mask_secrets(text, secrets)
    address = offer.get("address")
    if address:
        text = text.replace(str(address), "<address>")
    return _EMAIL.sub("<address>", text)


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
    configuration; each offer's failure is recorded and retried next time. When a
    channel's server cannot be reached, its remaining offers are left pending (counted in
    ``deferred``) so that one dead server costs one timeout, not one per offer.
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
                        if name in result.deferred_channels:
                            _defer(result, name, len(batch))
                        else:
                            _deliver_batch(store, sender, batch, allowed, result)
                        advance(len(batch))
    finally:
        for sender in senders.values():
            sender.close()
    for name, deferral in result.deferred_channels.items():     # printed by deferral_summary
        log.info("channel %s: %s; %d offer(s) left pending for the next delivery",
                    name, deferral["reason"], deferral["offers"])
    log.info("delivery: %d sent, %d failed, %d suppressed, %d deferred, %d not yet due",
             result.sent, result.failed, result.skipped, result.deferred, result.not_due)
    return result


def _defer(result: DeliveryResult, channel: str, count: int, reason: str | None = None) -> None:
    """Count ``count`` offers of ``channel`` as left pending (the first time, with why)."""
    deferral = result.deferred_channels.setdefault(channel, {"offers": 0, "reason": reason or ""})
    deferral["offers"] += count
    result.deferred += count


def _deliver_batch(store: StateStore, sender: Sender, batch: list[dict],
                   allowed: Callable[[str, str], bool], result: DeliveryResult) -> None:
    sent: list[str] = []
    failed: list[tuple[str, str]] = []
    suppressed: list[tuple[str, str]] = []
    for position, offer in enumerate(batch):
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
            if offer.get("address"):
                sender.check_address(str(offer["address"]))
            sender.send(offer)
        except ChannelDown as exc:        # this offer and the rest of the batch wait, untouched
            _defer(result, channel, len(batch) - position, redact(str(exc), offer, sender.secrets))
            break
        except SendError as exc:
            _record_failure(result, failed, offer, redact(str(exc), offer, sender.secrets))
            continue
        except Exception as exc:  # noqa: BLE001 - one offer's unforeseen failure must not stop the others
            message = redact(f"could not be sent ({type(exc).__name__}: {exc})", offer, sender.secrets)
            _record_failure(result, failed, offer, message)
            log.warning("offer %s: unexpected %s while sending", offer_id, type(exc).__name__)
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


def _record_failure(result: DeliveryResult, failed: list[tuple[str, str]], offer: dict,
                    message: str) -> None:
    """One offer failed with ``message`` (already redacted): recorded, retried next delivery."""
    failed.append((offer["offer_id"], message))
    result.errors.append({"offer_id": offer["offer_id"], "customer_id": offer["customer_id"],
                          "channel": offer["channel"], "error": message})
    log.info("offer %s to customer %s on %s failed: %s",   # summarised by failure_summary
             offer["offer_id"], offer["customer_id"], offer["channel"], message)


def deferral_summary(result: DeliveryResult) -> list[str]:
    """One line per channel whose server could not be reached: how many offers wait, and why."""
    return [f"{deferral['offers']} offer(s) on {channel} left pending: {deferral['reason']}; "
            "the next `loyalty deliver` sends them"
            for channel, deferral in sorted(result.deferred_channels.items())]


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
