"""``loyalty points``: every member's points account at an instant, and the programme's totals.

The accounts are computed as the features are (``data.points``): from the earn rules over the
orders and events, the point redemptions, and what points campaigns granted in recorded runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from engine.app.validation import load_workspace
from engine.config.model import LoadedWorkspace
from engine.data.features import compute_features
from engine.data.points import CREDIT, REDEMPTION, Accounts, PointsHistory, accounts, member_entries, shift_days
from engine.data.sources import Tables, load_tables
from engine.errors import LoyaltyError
from engine.execution.pipeline import parse_as_of
from engine.state.database import storage_failures
from engine.state.store import open_store

COLUMNS = ["customer_id", "balance", "earned", "redeemed", "expired", "expiring_30d"]


@dataclass
class PointsReport:
    """Accounts at ``as_of``: one row per member with any points, the totals, the ledger lines
    of one member (``--customer``), and data warnings (redemptions over the balance)."""

    as_of: str
    point_value: float
    currency: str
    members: pd.DataFrame                      # COLUMNS + next_expiry
    totals: dict
    entries: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        members = self.members.astype(object).where(self.members.notna(), None)
        return {"as_of": self.as_of, "point_value": self.point_value, "currency": self.currency,
                "totals": self.totals, "customers": members.to_dict("records"), "entries": self.entries,
                "warnings": self.warnings}


def points_report(root: Path | str, as_of=None, customer: str | None = None) -> PointsReport:
    """Every member's points at ``as_of`` (default: now); with ``customer``, that member only,
    with each ledger line."""
    workspace = load_workspace(root)
    settings = workspace.settings
    as_of = parse_as_of(as_of, settings.timezone)
    tables = load_tables(settings, workspace.root)
    points = workspace.program.points
    expire = points.expire_days if points is not None else None
    features, entries, found = _accounts_at(workspace, tables, as_of)
    ids = features["customer_id"].astype(str).to_numpy(dtype=object)
    members = _members(found, ids, settings.timezone)
    source = settings.data.get("point_redemptions")
    warnings = _overdrawn_warnings(found, ids, str(source.path or source.sql_table) if source else "point_redemptions")
    lines: list[dict] = []
    if customer is not None:
        where = np.flatnonzero(ids == str(customer))
        if not len(where):
            raise LoyaltyError(f"no customer '{customer}' in the customers table")
        lines = _lines(entries, int(where[0]), expire, settings.timezone)
        members = members[members["customer_id"] == str(customer)]
        if not len(members):
            members = _members(found, ids, settings.timezone, keep_all=True).iloc[where]
    value = points.value if points is not None else settings.point_value
    return PointsReport(as_of.isoformat(), value, settings.currency, members.reset_index(drop=True),
                        _totals(found, value), lines, warnings)


def _accounts_at(workspace: LoadedWorkspace, tables: Tables, as_of: pd.Timestamp):
    """(features, entries, accounts) of every member at ``as_of``."""
    settings, points = workspace.settings, workspace.program.points
    history = _history(workspace, as_of)
    features = compute_features(tables, workspace.program, settings, as_of, history)
    entries = member_entries(points, tables, features, as_of, settings.timezone, history)
    expire = points.expire_days if points is not None else None
    return features, entries, accounts(entries, len(features), as_of, expire, settings.timezone)


def points_summary(workspace: LoadedWorkspace, tables: Tables, first: pd.Timestamp, last: pd.Timestamp) -> dict | None:
    """The report's points: what was outstanding at the end of the period (and its value),
    what expires in the next 30 days, what was earned, redeemed and expired in the period,
    and breakage (the share of all points earned that expired unused). None without points."""
    _, entries, end = _accounts_at(workspace, tables, last)
    if workspace.program.points is None and not len(entries.pos):
        return None
    _, _, start = _accounts_at(workspace, tables, first)
    value = workspace.program.points.value if workspace.program.points is not None else workspace.settings.point_value
    totals = _totals(end, value)
    totals["period"] = {"earned": int(round(float(end.earned.sum() - start.earned.sum()))),
                        "redeemed": int(round(float(end.redeemed.sum() - start.redeemed.sum()))),
                        "expired": int(round(float(end.expired.sum() - start.expired.sum())))}
    totals["point_value"] = value
    return totals


def _history(workspace: LoadedWorkspace, as_of: pd.Timestamp) -> PointsHistory:
    """What recorded runs granted up to and including ``as_of``."""
    store = open_store(workspace.settings.state_path, create=False)
    if store is None:
        return PointsHistory()
    try:
        with storage_failures(store.label, "read"):
            key = as_of.tz_convert("UTC").isoformat(timespec="seconds")
            changes = store.tier_changes(through=key) if workspace.program.stored_tiers else None
            return PointsHistory(grants=store.points_granted(through=key), tiers=changes)
    finally:
        store.close()


def _members(found: Accounts, ids: np.ndarray, timezone: str, keep_all: bool = False) -> pd.DataFrame:
    frame = pd.DataFrame({"customer_id": ids, "balance": found.balance, "earned": found.earned,
                          "redeemed": found.redeemed, "expired": found.expired,
                          "expiring_30d": found.expiring_30d, "next_expiry": _dates(found.next_expiry, timezone)})
    for column in COLUMNS[1:]:
        frame[column] = frame[column].round().astype(np.int64)
    if keep_all:
        return frame
    any_points = (found.earned != 0) | (found.redeemed != 0) | (found.expired != 0) | (found.balance != 0)
    return frame[any_points]


def _dates(micros: np.ndarray, timezone: str) -> list:
    none = micros < 0
    days = pd.DatetimeIndex(np.where(none, 0, micros).view("datetime64[us]")).tz_localize("UTC") \
        .tz_convert(timezone).strftime("%Y-%m-%d")
    return [None if gone else day for gone, day in zip(none, days)]


def _totals(found: Accounts, value: float) -> dict:
    earned = float(found.earned.sum())
    expired = float(found.expired.sum())
    outstanding = float(found.balance.sum())
    return {
        "members": int(((found.earned != 0) | (found.balance != 0) | (found.redeemed != 0)).sum()),
        "earned": int(round(earned)), "redeemed": int(round(float(found.redeemed.sum()))),
        "expired": int(round(expired)), "outstanding": int(round(outstanding)),
        "liability": round(outstanding * value, 2),
        "expiring_30d": int(round(float(found.expiring_30d.sum()))),
        "expiring_30d_value": round(float(found.expiring_30d.sum()) * value, 2),
        # breakage: the share of the points earned that expired unused
        "breakage": round(expired / earned, 4) if earned > 0 else None,
    }


def _overdrawn_warnings(found: Accounts, ids: np.ndarray, label: str) -> list[str]:
    redemptions = [(source, pos, asked, taken) for source, pos, asked, taken in found.overdrawn
                   if source.isdigit()]
    refunds = len(found.overdrawn) - len(redemptions)
    warnings = []
    if redemptions:
        rows = ", ".join(source for source, *_ in redemptions[:5])
        warnings.append(f"{label}: {len(redemptions)} redemption(s) of more points than the member had; only the "
                        f"balance was taken (rows {rows}{' ...' if len(redemptions) > 5 else ''}, e.g. customer "
                        f"{ids[redemptions[0][1]]} asked {redemptions[0][2]:g}, had {redemptions[0][3]:g})")
    if refunds:
        warnings.append(f"{refunds} refund(s) took back points the member had already spent or lost; "
                        "only what was left was taken back")
    return warnings


KIND_NAMES = {CREDIT: "earned", REDEMPTION: "redeemed"}


def _lines(entries, position: int, expire_days: int | None, timezone: str) -> list[dict]:
    """One member's ledger lines, oldest first."""
    mine = entries.take(entries.pos == position).sorted()
    at = mine.at
    ends = shift_days(at, expire_days, timezone) if expire_days is not None else np.full(len(at), -1)
    kinds = mine.kind
    dates = _dates(at, timezone)
    expires = _dates(np.where(kinds == CREDIT, ends, -1), timezone)
    return [{"date": day, "kind": KIND_NAMES.get(int(kind), "refund"),
             "source": f"point_redemptions row {source}" if kind == REDEMPTION else str(source),
             "points": int(round(points if kind == CREDIT else -points)), "expires": end}
            for day, kind, source, points, end in zip(dates, kinds, mine.source, mine.points,
                                                      expires)]


def format_points(report: PointsReport, limit: int = 20) -> str:
    """The report for a terminal: totals, then the members with the largest balances (or the
    one member and their ledger lines)."""
    totals = report.totals
    value = report.point_value
    breakage = "-" if totals["breakage"] is None else f"{totals['breakage']:.1%}"
    lines = [f"Points at {report.as_of} (1 point = {value:g} {report.currency})",
             f"  members with points  {totals['members']:,}",
             f"  earned               {totals['earned']:,}",
             f"  redeemed             {totals['redeemed']:,}",
             f"  expired              {totals['expired']:,}  (breakage {breakage} of the points earned)",
             f"  outstanding          {totals['outstanding']:,}  (liability {totals['liability']:,.2f} "
             f"{report.currency})",
             f"  expiring in 30 days  {totals['expiring_30d']:,}  ({totals['expiring_30d_value']:,.2f} "
             f"{report.currency})"]
    members = report.members
    if report.entries or len(members) == 1:
        for row in members.to_dict("records"):
            lines.append("")
            lines.append(f"Customer {row['customer_id']}: balance {row['balance']:,}, earned {row['earned']:,}, "
                         f"redeemed {row['redeemed']:,}, expired {row['expired']:,}, expiring in 30 days "
                         f"{row['expiring_30d']:,}" + (f" (next on {row['next_expiry']})" if row['next_expiry']
                                                        else ""))
        for entry in report.entries:
            expires = f"  expires {entry['expires']}" if entry["expires"] else ""
            lines.append(f"  {entry['date']}  {entry['kind']:<8}  {entry['points']:>+10,}  {entry['source']}{expires}")
    elif len(members):
        top = members.sort_values(["balance", "customer_id"], ascending=[False, True]).head(limit)
        lines.append("")
        lines.append(f"{'customer':<14} {'balance':>10} {'earned':>10} {'redeemed':>10} {'expired':>10} "
                     f"{'expiring 30d':>13}")
        for row in top.to_dict("records"):
            lines.append(f"{row['customer_id']:<14} {row['balance']:>10,} {row['earned']:>10,} "
                         f"{row['redeemed']:>10,} {row['expired']:>10,} {row['expiring_30d']:>13,}")
        if len(members) > limit:
            lines.append(f"... and {len(members) - limit:,} more (--format csv lists every member)")
    return "\n".join(lines)
