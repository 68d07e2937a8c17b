"""The made-up world of a golden test file: its customers, orders, events and contacts as
tables loaded by the workspace's own loader, and its features (computed from that data,
then overridden by the values the file sets directly)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pandas as pd

from engine.config.model import LoadedWorkspace, SourceDef
from engine.config.rulefiles import SourceMap
from engine.config.schema import did_you_mean
from engine.data.features import assign_tiers, compute_features, feature_order
from engine.data.points import PointsHistory
from engine.data.tiers import TierState
from engine.data.sources import Tables, load_tables
from engine.execution.pipeline import parse_as_of

RESERVED = {"id", "orders", "events", "redemptions", "contacts", "features", "expect"}   # keys that are no customer column


def _timestamp(entry: dict, as_of: pd.Timestamp, timezone: str) -> str:
    if "days_ago" in entry:
        return (as_of - pd.Timedelta(days=float(entry["days_ago"]))).isoformat()
    return parse_as_of(str(entry["at"]), timezone).isoformat()


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fixture_tables(workspace: LoadedWorkspace, data: dict, as_of: pd.Timestamp, folder: Path) -> Tables:
    """The fixture as CSV files loaded by the workspace's own loader (types, checks, codes)."""
    settings = workspace.settings
    defaults = {}
    for channel in settings.channels.values():   # reachable unless the fixture says otherwise
        defaults[channel.consent_column] = True
        if channel.address_column != "customer_id":
            defaults[channel.address_column] = f"fixture-{channel.address_column}"
    defaults.update(data.get("defaults") or {})
    customers, orders, events, redemptions = [], [], [], []
    for customer in data["customers"]:
        cid = str(customer["id"])
        row = {"customer_id": cid, **defaults}
        row.update({k: v for k, v in customer.items() if k not in RESERVED})
        customers.append(row)
        for n, order in enumerate(customer.get("orders") or [], 1):
            extra = {k: v for k, v in order.items() if k not in ("at", "days_ago")}
            orders.append({"order_id": f"{cid}-O{n}", "customer_id": cid, "timestamp": _timestamp(order, as_of,
                           settings.timezone), "amount": extra.pop("amount", 0), **extra})
        for n, event in enumerate(customer.get("events") or [], 1):
            extra = {k: v for k, v in event.items() if k not in ("at", "days_ago", "type")}
            events.append({"event_id": f"{cid}-E{n}", "customer_id": cid, "type": event["type"],
                           "timestamp": _timestamp(event, as_of, settings.timezone), **extra})
        for n, spent in enumerate(customer.get("redemptions") or [], 1):
            redemptions.append({"redemption_id": f"{cid}-R{n}", "customer_id": cid, "points": spent["points"],
                                "timestamp": _timestamp(spent, as_of, settings.timezone)})
    sources = {}
    for table, rows in (("customers", customers), ("orders", orders), ("events", events),
                        ("point_redemptions", redemptions)):
        if not rows:
            continue
        _write_csv(folder / f"{table}.csv", rows)
        own = settings.data.get(table)
        sources[table] = SourceDef(table, path=folder / f"{table}.csv", format="csv",
                                   fields=dict(own.fields) if own is not None else {})
    fixture_settings = dataclasses.replace(settings, data=sources)
    return load_tables(fixture_settings, folder)


def fixture_features(workspace: LoadedWorkspace, tables: Tables, data: dict, as_of: pd.Timestamp,
                     history: PointsHistory | None = None, tiers: TierState | None = None) -> pd.DataFrame:
    """Features from the fixture data (and what earlier runs granted and left: points, stored
    tiers), then the fixture's feature values; tiers and expression features are computed
    again from them (RFM scores are not)."""
    features = compute_features(tables, workspace.program, workspace.settings, as_of, history, tiers)
    overrides = [(i, c.get("features") or {}) for i, c in enumerate(data["customers"])]
    if not any(values for _, values in overrides):
        return features
    positions = dict(zip(features["customer_id"].astype(str), range(len(features))))

    def apply(names=None):
        for i, values in overrides:
            pos = positions[str(data["customers"][i]["id"])]
            for name, value in values.items():
                if names is None or name in names:
                    features.loc[pos, name] = _typed(features[name], value)

    apply()
    program = workspace.program
    for name in feature_order(program.features, program.tiers):
        if name == "tier":      # stored tiers: from what the previous runs left
            features["tier"], features["tier_since"] = assign_tiers(program, features, as_of,
                                                                    workspace.settings.timezone, tiers)
        elif program.features[name].expr is not None:
            value = program.features[name].expr.evaluate(features, as_of)
            features[name] = pd.Series(value, index=features.index).astype(features[name].dtype)
        else:
            continue
        apply({name})
    return features


def _typed(column: pd.Series, value):
    if pd.api.types.is_datetime64_any_dtype(column.dtype) and value is not None:
        return pd.Timestamp(str(value))
    return value


def unknown_features(data: dict, features: pd.DataFrame, smap: SourceMap) -> list[tuple[int, str]]:
    """(line, message) for each feature value set in the fixture that is no feature."""
    found = []
    for i, customer in enumerate(data["customers"]):
        for name in customer.get("features") or {}:
            if name not in features.columns:
                line, _ = smap.key_position(("customers", i, "features", name))
                hint = did_you_mean(name, features.columns)
                found.append((line, f"unknown feature '{name}'" + (f" ({hint})" if hint else "")))
    return found


def fixture_contacts(data: dict, as_of, timezone) -> pd.DataFrame:
    """The messages the fixture's customers already received (``contacts:``), as contact history."""
    rows = []
    for customer in data["customers"]:
        for contact in customer.get("contacts") or []:
            at = _timestamp(contact, as_of, timezone) if ("at" in contact or "days_ago" in contact) \
                else as_of.isoformat()
            rows.append({"customer_id": str(customer["id"]), "campaign": contact["campaign"],
                         "channel": contact.get("channel", ""), "contacted_at": at})
    frame = pd.DataFrame(rows, columns=["customer_id", "campaign", "channel", "contacted_at"])
    return frame.astype({"customer_id": object, "campaign": object, "channel": object})
