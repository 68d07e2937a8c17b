"""Contact policy: consent and address, the global frequency cap, cooldowns, quiet hours.

All functions work on whole columns: customer positions in, boolean masks or
timestamps out.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from engine.config.model import ChannelDef, ContactPolicy
from engine.data.keys import is_in

_TRUE = {"true", "1", "yes", "y", "是", "t"}


def _truthy(column: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(column.dtype):
        return column.fillna(False).to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(column.dtype):
        return (column.fillna(0) != 0).to_numpy(dtype=bool)
    return column.astype("string").str.strip().str.lower().isin(_TRUE).fillna(False).to_numpy(dtype=bool)


def reachable(features: pd.DataFrame, channel: ChannelDef) -> np.ndarray:
    """Customers who consented to the channel and have a contact address for it."""
    if channel.consent_column not in features or channel.address_column not in features:
        return np.zeros(len(features), dtype=bool)
    consent = _truthy(features[channel.consent_column])
    address = features[channel.address_column].astype("string").str.strip()
    has_address = (address.notna() & (address != "")).fillna(False).to_numpy(dtype=bool)
    return consent & has_address


def messages_in_window(features: pd.DataFrame, contacts: pd.DataFrame, as_of: pd.Timestamp,
                       per_days: int) -> np.ndarray:
    """Messages each customer got or has scheduled since ``as_of - per_days``. Rewards granted
    without a message (``message`` false in the contact history) are no message."""
    if contacts is None or contacts.empty:
        return np.zeros(len(features), dtype=int)
    recent = contacts[contacts["contacted_at"] > as_of - pd.Timedelta(days=per_days)]
    if "message" in recent:
        recent = recent[recent["message"].fillna(True).to_numpy(dtype=bool)]
    counts = recent["customer_id"].astype(str).value_counts()
    return features["customer_id"].astype(str).map(counts).fillna(0).to_numpy(dtype=int)


def cap_remaining(features, contacts, as_of, policy: ContactPolicy) -> np.ndarray:
    """How many more messages each customer may get in this run under the frequency cap."""
    per_run = np.full(len(features), policy.max_offers_per_run, dtype=int)
    if policy.max_messages is None:
        return per_run
    used = messages_in_window(features, contacts, as_of, policy.per_days)
    return np.minimum(per_run, np.maximum(policy.max_messages - used, 0))


def cooling_down(features: pd.DataFrame, contacts: pd.DataFrame, campaign: str,
                 as_of: pd.Timestamp, days: int | None) -> np.ndarray:
    """Customers this campaign contacted, or granted a reward without a message, less than
    ``days`` ago."""
    if not days or contacts is None or contacts.empty:
        return np.zeros(len(features), dtype=bool)
    mine = contacts[(contacts["campaign"] == campaign)
                    & (contacts["contacted_at"] > as_of - pd.Timedelta(days=days))]
    return is_in(features["customer_id"].astype(str), mine["customer_id"].astype(str))


def _minutes(text: str) -> int:
    hours, minutes = map(int, text.split(":"))
    return hours * 60 + minutes


def send_times(timezones: pd.Series, as_of: pd.Timestamp, policy: ContactPolicy,
               default_tz: str) -> pd.Series:
    """When each message may go out: ``as_of``, or the end of the customer's quiet hours.

    Quiet hours are local to the customer's timezone and may cross midnight
    (21:00-09:00). Returned as UTC timestamps aligned with ``timezones``.
    """
    as_of_utc = as_of.tz_convert("UTC")
    result = pd.Series(as_of_utc, index=timezones.index)
    if policy.quiet_start is None:
        return result
    start, end = _minutes(policy.quiet_start), _minutes(policy.quiet_end)
    zones = timezones.astype("object").where(timezones.notna(), default_tz)
    for zone, index in zones.groupby(zones, sort=False).groups.items():
        try:
            local = as_of.tz_convert(zone)
        except Exception:
            local = as_of.tz_convert(default_tz)
            zone = default_tz
        now = local.hour * 60 + local.minute
        quiet = (start <= now < end) if start < end else (now >= start or now < end)
        if not quiet:
            continue
        end_day = local.date()
        if start > end and now >= start:   # evening part of a window crossing midnight
            end_day = end_day + dt.timedelta(days=1)
        result.loc[index] = _release(end_day, end, zone, as_of_utc)
    return result


def _release(day: dt.date, minutes: int, zone: str, as_of_utc: pd.Timestamp) -> pd.Timestamp:
    """The instant the local wall clock in ``zone`` first reads ``day minutes`` at or after
    ``as_of``: a time skipped by a DST change moves forward, a repeated one is its first
    occurrence unless that has already passed."""
    wall = pd.Timestamp(dt.datetime.combine(day, dt.time(minutes // 60, minutes % 60)))
    for first in (True, False):
        release = wall.tz_localize(zone, nonexistent="shift_forward", ambiguous=first).tz_convert("UTC")
        if release >= as_of_utc:
            return release
    return release
