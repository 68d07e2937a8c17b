"""Redemptions: which issued coupons were used, and what each campaign brought in.

Redemptions come from two places: orders that carry a ``coupon_code`` (matched to
the codes the store issued, inside the attribution window) and files imported with
``loyalty import-redemptions``. Campaign results count offers, deliveries,
redemptions, attributed revenue, reward cost and ROI, per campaign and variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from engine.config.model import Settings
from engine.errors import DataError
from engine.state.store import StateStore

REDEMPTION_FIELDS = ["redemption_id", "code", "customer_id", "order_id", "amount", "redeemed_at"]
DEFAULT_ATTRIBUTION_DAYS = 30   # for a code without an expiry date
# what import files commonly call our columns
IMPORT_SYNONYMS = {
    "code": ("code", "coupon_code", "coupon", "voucher", "券码", "优惠码"),
    "order_id": ("order_id", "order_no", "order", "订单号"),
    "customer_id": ("customer_id", "member_id", "cust_no", "会员号"),
    "amount": ("amount", "order_amount", "revenue", "金额"),
    "redeemed_at": ("redeemed_at", "timestamp", "used_at", "time", "核销时间"),
}
MAX_BAD_ROWS_SHOWN = 20


def normalise_codes(codes: pd.Series) -> pd.Series:
    """Codes compared without case and surrounding spaces (what a cashier types)."""
    return codes.astype("object").where(codes.notna(), None).map(
        lambda c: None if c is None else str(c).strip().upper() or None)


def instants(values: pd.Series, timezone: str) -> pd.Series:
    """ISO 8601 text (with or without offset, or a bare date = the end of that day) as UTC."""
    text = values.astype("object").where(values.notna(), None).map(lambda v: None if v is None else str(v))
    bare = text.str.len().eq(10).fillna(False).to_numpy(dtype=bool)
    result = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us, UTC]")
    if (~bare).any():
        parsed = pd.to_datetime(text[~bare], utc=False, errors="coerce", format="ISO8601")
        if getattr(parsed.dt, "tz", None) is None:
            parsed = parsed.dt.tz_localize(timezone)
        result[~bare] = parsed.dt.tz_convert("UTC").dt.as_unit("us")
    if bare.any():
        days = pd.to_datetime(text[bare], errors="coerce", format="%Y-%m-%d")
        ends = (days + pd.Timedelta(days=1)).dt.tz_localize(timezone) - pd.Timedelta(microseconds=1)
        result[bare] = ends.dt.tz_convert("UTC").dt.as_unit("us")
    return result


def match_order_redemptions(orders: pd.DataFrame, codes: pd.DataFrame, offers: pd.DataFrame,
                            timezone: str, attribution_days: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Redemptions found in orders carrying a ``coupon_code``.

    An order redeems an issued code when it is placed after the offer's ``send_at``
    and within the attribution window: until the coupon expires by default, or
    ``attribution_days[campaign]`` days after the send. Each code is redeemed once,
    by its first matching order.
    """
    empty = pd.DataFrame({name: pd.Series([], dtype="object") for name in REDEMPTION_FIELDS})
    if orders.empty or "coupon_code" not in orders or codes.empty:
        return empty
    used = orders[orders["coupon_code"].notna()]
    if used.empty:
        return empty
    issued = codes.merge(offers[["offer_id", "send_at"]], on="offer_id", how="left")
    issued = issued.assign(key=normalise_codes(issued["code"]).to_numpy(),
                           sent=instants(issued["send_at"], timezone).to_numpy(),
                           expires=instants(issued["expires_at"], timezone).to_numpy())
    fixed = issued["sent"] + pd.Timedelta(days=DEFAULT_ATTRIBUTION_DAYS)
    window_end = issued["expires"].where(issued["expires"].notna(), fixed)
    for campaign, days in (attribution_days or {}).items():
        mine = (issued["campaign"] == campaign).to_numpy()
        window_end[mine] = (issued["sent"] + pd.Timedelta(days=int(days)))[mine]
    issued["window_end"] = window_end
    bought = pd.DataFrame({"key": normalise_codes(used["coupon_code"]).to_numpy(),
                           "order_id": used["order_id"].astype(str).to_numpy(),
                           "order_customer": used["customer_id"].astype(str).to_numpy(),
                           "amount": used["amount"].to_numpy(dtype=float),
                           "at": used["timestamp"].dt.tz_convert("UTC").to_numpy()})
    joined = bought.merge(issued, on="key", how="inner")
    after_send = joined["sent"].isna() | (joined["at"] >= joined["sent"])
    joined = joined[after_send & (joined["at"] <= joined["window_end"])]
    joined = joined.sort_values(["at", "order_id"], kind="stable").drop_duplicates("code")
    local = joined["at"].dt.tz_convert(timezone)
    return pd.DataFrame({
        "redemption_id": (joined["code"] + ":" + joined["order_id"]).to_numpy(),
        "code": joined["code"].to_numpy(), "customer_id": joined["order_customer"].to_numpy(),
        "order_id": joined["order_id"].to_numpy(), "amount": joined["amount"].to_numpy(),
        "redeemed_at": [t.isoformat() for t in local]}).reset_index(drop=True)


def all_redemptions(stored: pd.DataFrame, matched: pd.DataFrame) -> pd.DataFrame:
    """Stored (imported or synced) redemptions plus those matched from orders, one per (code, order)."""
    frames = [f[REDEMPTION_FIELDS] for f in (stored, matched) if f is not None and not f.empty]
    if not frames:
        return pd.DataFrame({name: pd.Series([], dtype="object") for name in REDEMPTION_FIELDS})
    both = pd.concat(frames, ignore_index=True)
    return both.drop_duplicates(["code", "order_id"]).reset_index(drop=True)


# --------------------------------------------------------------------------- import


@dataclass
class ImportResult:
    """What ``import_redemptions`` did: rows read, added, duplicates ignored, rows refused."""

    file: str
    rows: int = 0
    added: int = 0
    duplicates: int = 0
    bad_rows: list[dict] = field(default_factory=list)   # {"row": n, "message": ...}

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _read_import(path: Path) -> tuple[pd.DataFrame, int]:
    """The file as text columns, and the row number of its first data row."""
    label = path.name
    if not path.is_file():
        raise DataError(label, "no such file", hint="give the path of a CSV or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
            return frame.astype("object").where(frame.notna(), None), 1
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            sep="\t" if suffix == ".tsv" else ",")
        return frame, 2
    except UnicodeDecodeError as exc:
        raise DataError(label, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                        hint="save the file as UTF-8 CSV") from exc
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(label, f"cannot read the file: {exc}",
                        hint="redemptions are imported from CSV or Parquet") from exc


def _map_columns(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    lower = {str(c).strip().lower(): c for c in frame.columns}
    columns = {}
    for ours, names in IMPORT_SYNONYMS.items():
        found = next((lower[n] for n in names if n in lower), None)
        if found is not None:
            columns[ours] = frame[found]
    for required in ("code", "order_id"):
        if required not in columns:
            raise DataError(label, f"missing required column '{required}'; the columns are: "
                            f"{', '.join(map(str, frame.columns)) or '(none)'}", column=required,
                            hint="the file needs columns code and order_id; "
                                 "customer_id, amount and redeemed_at are optional")
    return pd.DataFrame(columns)


def _text(series: pd.Series) -> pd.Series:
    return series.astype("object").map(lambda v: None if v is None or (isinstance(v, float) and v != v)
                                       or str(v).strip() == "" else str(v).strip())


def validate_import(frame: pd.DataFrame, codes: pd.DataFrame, timezone: str,
                    first_row: int) -> tuple[pd.DataFrame, list[dict]]:
    """Good rows as redemption records, and each bad row with its number and reason."""
    n = len(frame)
    problems = pd.Series([None] * n, index=frame.index, dtype="object")

    def flag(mask, message):
        mask = pd.Series(np.asarray(mask, dtype=bool), index=frame.index) & problems.isna()
        problems[mask] = message[mask] if isinstance(message, pd.Series) else message

    code_text, order = _text(frame["code"]), _text(frame["order_id"])
    flag(code_text.isna(), "empty code")
    flag(order.isna(), "empty order_id")
    known = dict(zip(normalise_codes(codes["code"]), codes["code"]))
    owners = dict(zip(codes["code"], codes["customer_id"]))
    key = normalise_codes(code_text)
    issued = key.map(known)
    flag(issued.isna(), "code " + code_text.fillna("").map(repr) + " was not issued by this programme")
    amount = pd.Series([np.nan] * n, index=frame.index, dtype=float)
    if "amount" in frame:
        raw = _text(frame["amount"])
        amount = pd.to_numeric(raw, errors="coerce")
        flag(raw.notna() & amount.isna(), "amount " + raw.fillna("").map(repr) + " is not a number")
    when = pd.Series([None] * n, index=frame.index, dtype="object")
    if "redeemed_at" in frame:
        raw = _text(frame["redeemed_at"])
        parsed = instants(raw, timezone)
        flag(raw.notna() & parsed.isna(), "redeemed_at " + raw.fillna("").map(repr) + " is not a date or time")
        when = parsed.dt.tz_convert(timezone).map(lambda t: None if pd.isna(t) else t.isoformat())
    customer = _text(frame["customer_id"]) if "customer_id" in frame else pd.Series([None] * n, index=frame.index)
    customer = customer.where(customer.notna(), issued.map(owners))
    good = problems.isna().to_numpy()
    bad = [{"row": first_row + int(i), "message": str(m)}
           for i, m in zip(np.flatnonzero(~good), problems[~good])]
    records = pd.DataFrame({"code": issued[good], "customer_id": customer[good], "order_id": order[good],
                            "amount": amount[good], "redeemed_at": when[good]})
    records.insert(0, "redemption_id", records["code"] + ":" + records["order_id"])
    return records.reset_index(drop=True), bad


def import_redemptions(settings: Settings, file: Path | str) -> ImportResult:
    """Import redemptions from a CSV or Parquet file into the programme's state.

    Rows need a code this programme issued and an order id; bad rows are reported by
    row number and not imported; rows already stored (same code and order) are ignored.
    Raises DataError when the file cannot be read or lacks a required column.
    """
    path = Path(file)
    frame, first_row = _read_import(path)
    frame = _map_columns(frame, path.name)
    store = StateStore(settings.state_path)
    try:
        records, bad = validate_import(frame, store.coupon_codes(), settings.timezone, first_row)
        unique = records.drop_duplicates(["code", "order_id"])
        rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                for row in unique.to_dict("records")]
        added = store.record_redemptions(rows) if rows else 0
    finally:
        store.close()
    return ImportResult(file=str(path), rows=len(frame), added=added,
                        duplicates=len(records) - added, bad_rows=bad)


def sync_order_redemptions(settings: Settings, orders: pd.DataFrame,
                           attribution_days: Mapping[str, int] | None = None) -> int:
    """Record the redemptions found in the orders' ``coupon_code`` column; returns rows added."""
    store = StateStore(settings.state_path)
    try:
        matched = match_order_redemptions(orders, store.coupon_codes(), store.offers_frame(),
                                          settings.timezone, attribution_days)
        return store.record_redemptions(matched.to_dict("records")) if len(matched) else 0
    finally:
        store.close()


# --------------------------------------------------------------------------- campaign results

RESULT_COUNTS = ("offers", "delivered", "failed", "pending", "suppressed", "redeemed")


def offer_outcomes(offers: pd.DataFrame, codes: pd.DataFrame, redemptions: pd.DataFrame) -> pd.DataFrame:
    """One row per offer: campaign, variant, status, cost, redeemed (bool), revenue (its redemption's amount)."""
    frame = offers[["offer_id", "campaign", "customer_id", "variant", "status", "cost", "send_at"]].copy()
    frame["variant"] = frame["variant"].astype("object").where(frame["variant"].notna(), "-")
    frame["cost"] = pd.to_numeric(frame["cost"], errors="coerce").fillna(0.0)
    first = redemptions.drop_duplicates("code") if len(redemptions) else redemptions
    by_code = pd.DataFrame({"code": first["code"].to_numpy(),
                            "revenue": pd.to_numeric(first["amount"], errors="coerce").fillna(0.0).to_numpy(),
                            "redeemed_at": first["redeemed_at"].to_numpy()})
    linked = codes[["code", "offer_id"]].merge(by_code, on="code", how="inner")
    frame = frame.merge(linked[["offer_id", "revenue", "redeemed_at"]], on="offer_id", how="left")
    frame["redeemed"] = frame["redeemed_at"].notna() | frame["revenue"].notna()
    frame["revenue"] = frame["revenue"].fillna(0.0)
    return frame


def _summarise(group: pd.DataFrame) -> dict:
    status = group["status"]
    delivered = int((status == "sent").sum())
    revenue = float(group["revenue"].sum())
    cost = float(group.loc[status == "sent", "cost"].sum())
    redeemed = int(group["redeemed"].sum())
    return {"offers": int(len(group)), "delivered": delivered, "failed": int((status == "failed").sum()),
            "pending": int((status == "pending").sum()), "suppressed": int((status == "suppressed").sum()),
            "redeemed": redeemed, "redemption_rate": redeemed / delivered if delivered else None,
            "revenue": revenue, "cost": cost, "roi": (revenue - cost) / cost if cost else None}


def campaign_results(outcomes: pd.DataFrame, names: Mapping[str, str] | None = None) -> list[dict]:
    """Per campaign (in ``names`` order, then any other recorded campaign) and per variant."""
    names = dict(names or {})
    order = list(names) + sorted(set(outcomes["campaign"]) - set(names))
    results = []
    for campaign in order:
        mine = outcomes[outcomes["campaign"] == campaign]
        row = {"id": campaign, "name": names.get(campaign, campaign), **_summarise(mine)}
        named = len(mine) and (~mine["variant"].astype(str).isin(["-", ""])).any()   # A/B variants, not just the campaign
        row["variants"] = [{"variant": str(v), **_summarise(g)}
                           for v, g in mine.groupby("variant", sort=True)] if named else []
        results.append(row)
    return results
