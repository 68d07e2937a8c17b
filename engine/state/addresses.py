"""Addresses checked per channel before anything is sent: exactly one e-mail mailbox, a
plausible phone number, a usable device token, never a control character.

A line break in an e-mail address would add mail headers and a comma a second recipient;
a bad address fails its offer alone (``BadAddress``), with a reason in plain words.
"""

from __future__ import annotations

import re
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.utils import getaddresses
from typing import Callable

from engine.config.model import ChannelDef
from engine.errors import BadAddress

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")    # line breaks, tabs, escapes, NUL
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# local-part@host as RFC 5322 dot-atoms, ASCII only: a strict subset of what the parser accepts
_PLAIN_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
_PHONE = re.compile(r"\+?[0-9]{6,15}")


def email_address(text: str) -> str:
    """The one e-mail mailbox ``text`` holds (``name@domain``); BadAddress in plain words
    otherwise. A line break would add mail headers, a comma a second recipient. The everyday
    form (a dot-atom at a host name) is recognised at once; anything else goes through the
    standard library's parser, which takes some 30 us an address."""
    if _PLAIN_EMAIL.fullmatch(text):
        return text
    if CONTROL_CHARACTERS.search(text):
        raise BadAddress("the e-mail address contains a line break or another control character")
    mailboxes = [found for _, found in getaddresses([text]) if found]
    if len(mailboxes) > 1:
        raise BadAddress(f"the e-mail address field holds {len(mailboxes)} addresses; "
                         "only one is allowed")
    try:
        return Address(addr_spec=text.strip()).addr_spec
    except (ValueError, HeaderParseError, IndexError):
        raise BadAddress("this is not a valid e-mail address (write it as name@domain)") from None


def phone_number(text: str) -> str:
    """``text`` when it is a plausible phone number: 6 to 15 digits with an optional leading
    +, once spaces and dashes are taken out; BadAddress otherwise."""
    if CONTROL_CHARACTERS.search(text):
        raise BadAddress("the phone number contains a line break or another control character")
    if not _PHONE.fullmatch(re.sub(r"[ -]", "", text.strip())):
        raise BadAddress("this is not a phone number (6 to 15 digits, optionally a leading +; "
                         "spaces and dashes are allowed)")
    return text


def device_token(text: str) -> str:
    """``text`` when it can be a push device token (not blank, no control characters)."""
    if CONTROL_CHARACTERS.search(text):
        raise BadAddress("the device token contains a line break or another control character")
    if not text.strip():
        raise BadAddress("the device token is blank")
    return text


ADDRESS_KINDS: dict[str, Callable[[str], str]] = {"email": email_address, "phone": phone_number,
                                                  "token": device_token}


def address_kind(channel: ChannelDef) -> str:
    """What a channel's addresses are: e-mail for SMTP, then by the channel's name (email,
    sms, push), then by its address column (email, phone or mobile); device tokens (or any
    other identifier) otherwise."""
    by_name = {"email": "email", "sms": "phone", "push": "token"}
    by_column = {"email": "email", "phone": "phone", "mobile": "phone"}
    if channel.send == "smtp":
        return "email"
    return by_name.get(channel.name) or by_column.get(channel.address_column.lower(), "token")
