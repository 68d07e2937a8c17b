"""Deterministic sample data for the demo and the tests: a 星享会员 workspace.

``write_sample_workspace`` writes ``loyalty.yaml`` and a ``data/`` folder in the shapes a
real shop exports — customers as CSV (with its own column names, mapped in loyalty.yaml),
orders as Parquet, CRM events in a SQLite table — generated offline with numpy from one
seed, so the same seed always gives the same bytes. A handful of deliberately dirty rows
(orders of unknown customers, refunds with negative amounts, an invalid timezone or
locale) exercise the loader's warnings without stopping a run.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.sample_names import (
    CITIES,
    CN_GIVEN_FEMALE,
    CN_GIVEN_MALE,
    CN_SURNAMES,
    EN_FIRST_FEMALE,
    EN_FIRST_MALE,
    EN_LAST,
)
from engine.resources import example_rules_dir, example_templates_dir, example_tests_dir

PROGRAM_TZ = "Asia/Shanghai"
HISTORY_DAYS = 730            # orders and events cover the two years before as_of
SECONDS_PER_DAY = 86_400

ORDER_CHANNELS = (["app", "web", "store"], [0.55, 0.30, 0.15])
COMPLAINT_CATEGORIES = (["delivery", "quality", "service", "refund"], [0.4, 0.3, 0.2, 0.1])
NPS_SCORE_SHARES = [0.02, 0.01, 0.02, 0.03, 0.03, 0.05, 0.07, 0.12, 0.17, 0.22, 0.26]

INVALID_TIMEZONE = "Mars/Base"
INVALID_LOCALE = "中文"

LOYALTY_YAML = """\
# 星享会员 · Star Rewards — programme settings (sample workspace)
#
# Where the member data comes from, how days and money are counted, how often a member
# may be contacted, and how offers are delivered. The rules themselves live in rules/.
version: 1

program:
  name: 星享会员
  timezone: Asia/Shanghai
  currency: CNY
  locale: zh-CN

data:
  customers:
    path: data/customers.csv
    # the CRM export names its columns its own way: our name -> their column
    columns: {{customer_id: cust_no, phone: mobile}}
    fields: {{city: string, gender: string}}
  orders:
    path: data/orders.parquet
    fields: {{channel: string, coupon_code: string}}
  events:
    path: data/crm.db
    table: events
    fields: {{score: number, amount: number, category: string}}
  point_redemptions:            # points members spent (rules/campaigns_points.yaml: points:)
    path: data/point_redemptions.csv

state: state/loyalty.db

contact_policy:
  max_messages: 2
  per: 7d
  quiet_hours: "21:00-09:00"

holdout: 5%
salt: star-rewards

coupons:
  prefix: STAR-
  length: 10

costs:
  point_value: 0.01
  shipping: 12

channels:
  email: {{send: smtp, host: localhost, port: 1025, sender: rewards@example.com}}
  sms:   {{send: file, path: outbox/sms.jsonl, max_sms_segments: 2}}
  push:  {{send: file, path: outbox/push.jsonl}}
"""


def write_sample_workspace(target: Path, customers: int = 2000, seed: int = 7,
                           as_of: str = "2026-11-23T10:00:00+08:00") -> dict:
    """Write loyalty.yaml and data/ for ``customers`` generated members; return paths and counts.

    The same arguments always produce the same bytes. Data is stamped up to ``as_of``.
    """
    if customers < 10:
        raise ValueError("the sample needs at least 10 customers")
    target = Path(target)
    data_dir = target / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (target / "outbox").mkdir(exist_ok=True)
    now = _as_of_local(as_of)
    rng = np.random.default_rng(seed)

    people = _customers(rng, customers, now)
    orders = _orders(rng, people, now)
    events = _events(rng, people, orders, now)
    dirty_orders = _dirty_orders(rng, people, orders)
    spent = _point_redemptions(rng, orders, now)

    paths = {
        "loyalty_yaml": target / "loyalty.yaml",
        "customers": data_dir / "customers.csv",
        "orders": data_dir / "orders.parquet",
        "events": data_dir / "crm.db",
        "point_redemptions": data_dir / "point_redemptions.csv",
    }
    paths["loyalty_yaml"].write_text(LOYALTY_YAML.format(), encoding="utf-8")
    _write_customers(people, paths["customers"])
    all_orders = pd.concat([orders, dirty_orders], ignore_index=True)
    _write_orders(all_orders, paths["orders"])
    _write_events(events, paths["events"])
    _write_point_redemptions(spent, paths["point_redemptions"])

    by_type = events["type"].value_counts().sort_index()
    return {
        "workspace": target,
        "as_of": now.isoformat(),
        "paths": paths,
        "counts": {
            "customers": len(people),
            "orders": len(all_orders),
            "events": len(events),
            "events_by_type": {str(k): int(v) for k, v in by_type.items()},
            "point_redemptions": len(spent),
        },
        "dirty": {
            "unknown_customer_orders": int((dirty_orders["kind"] == "unknown_customer").sum()),
            "negative_amount_orders": int((dirty_orders["kind"] == "refund").sum()),
            "invalid_timezone_customers": int((people["timezone"] == INVALID_TIMEZONE).sum()),
            "invalid_locale_customers": int((people["locale"] == INVALID_LOCALE).sum()),
        },
    }


def copy_example_programme(target: Path) -> list[Path]:
    """Copy the example programme's rules/, templates/ and golden tests (into tests/) into
    ``target``; return the files written."""
    written = []
    for source, folder, pattern in ((example_rules_dir(), "rules", "*.yaml"),
                                    (example_templates_dir(), "templates", "*.j2"),
                                    (example_tests_dir(), "tests", "*.yaml")):
        (Path(target) / folder).mkdir(parents=True, exist_ok=True)
        for path in sorted(source.glob(pattern)):
            written.append(Path(shutil.copyfile(path, Path(target) / folder / path.name)))
    return written


# --------------------------------------------------------------------------- time


def _as_of_local(as_of: str) -> pd.Timestamp:
    stamp = pd.Timestamp(as_of)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize(PROGRAM_TZ)
    return stamp.tz_convert(PROGRAM_TZ)


def _local_seconds(now: pd.Timestamp) -> int:
    """as_of as seconds since the epoch on the programme's wall clock (naive local time)."""
    return int(now.tz_localize(None).value // 1_000_000_000)


def _stamps(now: pd.Timestamp, days_ago: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Naive local datetime64[s] stamps ``days_ago`` whole days before as_of, at shop-like hours."""
    hour = rng.choice(24, size=len(days_ago), p=_HOUR_SHARES)
    seconds = hour * 3600 + rng.integers(0, 3600, size=len(days_ago))
    today = _local_seconds(now.normalize())
    stamp = today - days_ago.astype(np.int64) * SECONDS_PER_DAY + seconds
    limit = _local_seconds(now)
    stamp = np.where(stamp > limit, stamp - SECONDS_PER_DAY, stamp)   # today, but later than as_of
    return stamp.astype("datetime64[s]")


_HOUR_WEIGHTS = np.array([2, 1, 1, 0.5, 0.5, 0.5, 1, 2, 4, 5, 6, 7,
                          9, 8, 6, 6, 6, 7, 8, 10, 12, 12, 9, 5], dtype=float)
_HOUR_SHARES = _HOUR_WEIGHTS / _HOUR_WEIGHTS.sum()


# --------------------------------------------------------------------------- customers


def _pick(rng: np.random.Generator, options: list, size: int, shares=None) -> np.ndarray:
    """``size`` draws from ``options`` with the given shares (uniform when omitted)."""
    index = rng.choice(len(options), size=size, p=shares)
    return np.asarray(options, dtype=object)[index]


def _zipf_shares(count: int, exponent: float = 0.8) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return weights / weights.sum()


def _customers(rng: np.random.Generator, n: int, now: pd.Timestamp) -> pd.DataFrame:
    ids = np.array([f"C{i:06d}" for i in range(1, n + 1)], dtype=object)
    city_index = rng.choice(len(CITIES), size=n, p=[c[2] for c in CITIES])
    city = np.array([c[0] for c in CITIES], dtype=object)[city_index]
    timezone = np.array([c[1] for c in CITIES], dtype=object)[city_index]
    locale = np.empty(n, dtype=object)
    for k, (_, _, _, (locales, shares)) in enumerate(CITIES):
        members = np.flatnonzero(city_index == k)
        locale[members] = _pick(rng, locales, len(members), shares)

    gender = _pick(rng, ["female", "male", ""], n, [0.55, 0.40, 0.05])
    female = (gender == "female") | ((gender == "") & (rng.random(n) < 0.5))
    chinese = np.char.startswith(locale.astype(str), "zh")
    name, handle = _names(rng, n, chinese, female)

    domains = _pick(rng, ["example.com", "example.cn", "example.net", "example.org"], n,
                    [0.4, 0.3, 0.2, 0.1])
    email = np.array([f"{h}{i}@{d}" for h, i, d in zip(handle, range(1, n + 1), domains)], dtype=object)
    email[rng.random(n) < 0.05] = ""
    phone = _phones(rng, city_index, n)
    phone[rng.random(n) < 0.07] = ""

    birthday = _birthdays(rng, n, now)
    signup_ago = np.where(rng.random(n) < 0.04, rng.integers(0, 31, n), rng.integers(31, 5 * 365, n))
    today = now.tz_localize(None).normalize().to_datetime64().astype("datetime64[D]")
    signup = today - signup_ago.astype("timedelta64[D]")

    email_opt_in = (rng.random(n) < 0.72) & (email != "")
    sms_opt_in = (rng.random(n) < 0.60) & (phone != "")
    push_opt_in = rng.random(n) < 0.45

    # dirty rows: reported by the loader, the customers fall back to the programme's defaults
    odd = rng.choice(n, size=4, replace=False)
    timezone[odd[:2]] = INVALID_TIMEZONE
    locale[odd[2:]] = INVALID_LOCALE

    return pd.DataFrame({
        "customer_id": ids, "name": name, "email": email, "phone": phone,
        "birthday": birthday, "signup_date": signup, "locale": locale, "timezone": timezone,
        "email_opt_in": email_opt_in, "sms_opt_in": sms_opt_in, "push_opt_in": push_opt_in,
        "city": city, "gender": gender, "signup_ago": signup_ago,
    })


def _names(rng: np.random.Generator, n: int, chinese: np.ndarray, female: np.ndarray):
    """Full names (Chinese or English by locale) and matching e-mail handles."""
    surname = rng.choice(len(CN_SURNAMES), size=n, p=_zipf_shares(len(CN_SURNAMES)))
    given_f = rng.integers(0, len(CN_GIVEN_FEMALE), n)
    given_m = rng.integers(0, len(CN_GIVEN_MALE), n)
    first_f = rng.integers(0, len(EN_FIRST_FEMALE), n)
    first_m = rng.integers(0, len(EN_FIRST_MALE), n)
    last = rng.integers(0, len(EN_LAST), n)
    names, handles = [], []
    for i in range(n):
        if chinese[i]:
            family, family_py = CN_SURNAMES[surname[i]]
            given, given_py = (CN_GIVEN_FEMALE[given_f[i]] if female[i] else CN_GIVEN_MALE[given_m[i]])
            names.append(family + given)
            handles.append(f"{family_py}.{given_py}")
        else:
            first = EN_FIRST_FEMALE[first_f[i]] if female[i] else EN_FIRST_MALE[first_m[i]]
            names.append(f"{first} {EN_LAST[last[i]]}")
            handles.append(f"{first}.{EN_LAST[last[i]]}".lower())
    return np.array(names, dtype=object), handles


_CN_MOBILE_PREFIXES = ["130", "131", "135", "136", "137", "138", "139", "150", "152", "158",
                       "159", "176", "177", "182", "186", "187", "188", "189", "199"]
_LONDON, _NEW_YORK = 6, 7   # positions in CITIES


def _phones(rng: np.random.Generator, city_index: np.ndarray, n: int) -> np.ndarray:
    """E.164 numbers; UK and US numbers come from the ranges reserved for fiction."""
    prefix = _pick(rng, _CN_MOBILE_PREFIXES, n)
    digits = rng.integers(0, 100_000_000, n)
    tail = rng.integers(0, 100, n)
    phone = []
    for i in range(n):
        if city_index[i] == _LONDON:
            phone.append(f"+447700900{digits[i] % 1000:03d}")
        elif city_index[i] == _NEW_YORK:
            phone.append(f"+121255501{tail[i]:02d}")
        else:
            phone.append(f"+86{prefix[i]}{digits[i]:08d}")
    return np.array(phone, dtype=object)


def _birthdays(rng: np.random.Generator, n: int, now: pd.Timestamp) -> np.ndarray:
    """Birthdays of 18-70 year olds; some unknown, and a few on 29 February."""
    years = now.year - rng.integers(18, 71, n)
    starts = np.array([f"{y}-01-01" for y in range(now.year - 71, now.year + 1)], dtype="datetime64[D]")
    day = starts[years - (now.year - 71)] + rng.integers(0, 365, n).astype("timedelta64[D]")
    text = np.datetime_as_string(day, unit="D").astype(object)
    leap = rng.choice(n, size=max(2, n // 400), replace=False)
    text[leap] = [f"{year}-02-29" for year in rng.choice([1980, 1984, 1988, 1992, 1996, 2000, 2004], len(leap))]
    text[rng.random(n) < 0.08] = ""
    return text


def _write_customers(people: pd.DataFrame, path: Path) -> None:
    export = people.drop(columns=["signup_ago"]).rename(columns={"customer_id": "cust_no", "phone": "mobile"})
    export["signup_date"] = np.datetime_as_string(people["signup_date"].to_numpy().astype("datetime64[D]"), unit="D")
    export.to_csv(path, index=False, lineterminator="\n", encoding="utf-8")


# --------------------------------------------------------------------------- orders


def _orders(rng: np.random.Generator, people: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """Skewed purchase histories: many one-off buyers, some regulars, a few heavy buyers; some churn."""
    n = len(people)
    kind = rng.choice(4, size=n, p=[0.14, 0.34, 0.48, 0.04])   # never, one-off, regular, heavy
    start_ago = np.minimum(people["signup_ago"].to_numpy(), HISTORY_DAYS)
    churn_share = np.select([kind == 1, kind == 2, kind == 3], [0.45, 0.30, 0.10], 0.0)
    churned = (rng.random(n) < churn_share) & (start_ago > 45)
    end_ago = np.where(churned, rng.uniform(45, np.maximum(start_ago, 46)), 0.0)
    years = np.maximum(start_ago - end_ago, 0.5) / 365
    rate = np.where(kind == 3, rng.lognormal(np.log(36), 0.4, n), rng.lognormal(np.log(5), 0.6, n))
    count = np.select([kind == 0, kind == 1], [0, 1], np.maximum(1, rng.poisson(rate * years)))

    owner = np.repeat(np.arange(n), count)
    days_ago = end_ago[owner] + rng.random(len(owner)) * (start_ago[owner] - end_ago[owner])
    stamp = _stamps(now, np.floor(days_ago), rng)
    basket = rng.lognormal(0.0, 0.35, n) * np.where(kind == 3, 1.8, 1.0)
    amount = np.round(np.maximum(rng.lognormal(np.log(220), 0.75, len(owner)) * basket[owner], 9.9), 2)
    channel = _pick(rng, ORDER_CHANNELS[0], len(owner), ORDER_CHANNELS[1])

    order = np.lexsort((owner, stamp))
    frame = pd.DataFrame({
        "customer_id": people["customer_id"].to_numpy()[owner[order]],
        "local_time": stamp[order],
        "amount": amount[order],
        "channel": channel[order],
    })
    frame.insert(0, "order_id", [f"O{i:08d}" for i in range(1, len(frame) + 1)])
    return frame


def _dirty_orders(rng: np.random.Generator, people: pd.DataFrame, orders: pd.DataFrame) -> pd.DataFrame:
    """Three orders of customers not in the customer file, two refunds with negative amounts."""
    n = len(people)
    unknown = [f"C{n + 101 + k:06d}" for k in range(3)]
    refunded = orders.iloc[rng.choice(len(orders), size=2, replace=False)]
    rows = pd.DataFrame({
        "customer_id": unknown + refunded["customer_id"].tolist(),
        "local_time": np.concatenate([
            orders["local_time"].to_numpy()[rng.choice(len(orders), size=3)],
            refunded["local_time"].to_numpy() + np.timedelta64(1, "h"),
        ]),
        "amount": np.concatenate([np.round(rng.lognormal(np.log(220), 0.5, 3), 2),
                                  -refunded["amount"].to_numpy()]),
        "channel": ["web", "app", "web", "store", "store"],
        "kind": ["unknown_customer"] * 3 + ["refund"] * 2,
    })
    rows.insert(0, "order_id", [f"O{len(orders) + k:08d}" for k in range(1, 6)])
    return rows


def _point_redemptions(rng: np.random.Generator, orders: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """About one order in five is followed, 1 to 20 days later, by a redemption of half its
    points in hundreds (at least 100): always within the balance that order alone earned."""
    chosen = orders.iloc[np.flatnonzero(rng.random(len(orders)) < 0.2)]
    points = np.floor(chosen["amount"].to_numpy() * 0.5 / 100) * 100
    when = chosen["local_time"].to_numpy() + (rng.integers(1, 21, len(chosen)) * SECONDS_PER_DAY
                                             ).astype("timedelta64[s]")
    keep = (points >= 100) & (when <= np.datetime64(_local_seconds(now), "s"))
    frame = pd.DataFrame({"customer_id": chosen["customer_id"].to_numpy()[keep], "local_time": when[keep],
                          "points": points[keep].astype(np.int64)})
    frame = frame.sort_values(["local_time", "customer_id"], kind="stable", ignore_index=True)
    frame.insert(0, "redemption_id", [f"R{i:07d}" for i in range(1, len(frame) + 1)])
    return frame


def _write_point_redemptions(spent: pd.DataFrame, path: Path) -> None:
    stamps = np.datetime_as_string(spent["local_time"].to_numpy().astype("datetime64[s]"), unit="s")
    pd.DataFrame({"redemption_id": spent["redemption_id"], "customer_id": spent["customer_id"],
                  "timestamp": [s.replace("T", " ") + "+08:00" for s in stamps],
                  "points": spent["points"]}).to_csv(path, index=False)


def _write_orders(orders: pd.DataFrame, path: Path) -> None:
    local = orders["local_time"].to_numpy().astype("datetime64[us]")
    utc = local - np.timedelta64(8, "h")                   # Asia/Shanghai has no DST
    table = pa.table({
        "order_id": pa.array(orders["order_id"].tolist(), pa.string()),
        "customer_id": pa.array(orders["customer_id"].tolist(), pa.string()),
        "timestamp": pa.array(utc, pa.timestamp("us", tz="UTC")),
        "amount": pa.array(orders["amount"].to_numpy(dtype=float), pa.float64()),
        "channel": pa.array(orders["channel"].tolist(), pa.string()),
        "coupon_code": pa.nulls(len(orders), pa.string()),
    })
    pq.write_table(table, path, compression="zstd")


# --------------------------------------------------------------------------- events


def _events(rng: np.random.Generator, people: pd.DataFrame, orders: pd.DataFrame,
            now: pd.Timestamp) -> pd.DataFrame:
    """CRM events: a purchase per order, NPS answers, complaints and referrals."""
    limit = np.datetime64(_local_seconds(now), "s")
    purchase = pd.DataFrame({
        "customer_id": orders["customer_id"], "local_time": orders["local_time"],
        "type": "purchase", "amount": orders["amount"],
    })

    surveyed = orders.iloc[np.flatnonzero(rng.random(len(orders)) < 0.12)]
    nps_time = surveyed["local_time"].to_numpy() + (rng.integers(2, 5, len(surveyed)) * SECONDS_PER_DAY
                                                    ).astype("timedelta64[s]")
    keep = nps_time <= limit
    nps = pd.DataFrame({
        "customer_id": surveyed["customer_id"].to_numpy()[keep], "local_time": nps_time[keep],
        "type": "nps_response",
        "score": rng.choice(11, size=int(keep.sum()), p=NPS_SCORE_SHARES).astype(float),
    })

    complained = orders.iloc[np.flatnonzero(rng.random(len(orders)) < 0.01)]
    complaint_time = complained["local_time"].to_numpy() + (
        rng.integers(3600, 5 * SECONDS_PER_DAY, len(complained))).astype("timedelta64[s]")
    keep = complaint_time <= limit
    complaint = pd.DataFrame({
        "customer_id": complained["customer_id"].to_numpy()[keep], "local_time": complaint_time[keep],
        "type": "complaint",
        "category": _pick(rng, COMPLAINT_CATEGORIES[0], int(keep.sum()), COMPLAINT_CATEGORIES[1]),
    })

    buyers = orders["customer_id"].unique()
    referrers = rng.choice(buyers, size=max(1, len(people) // 16))
    # recent weeks are busier, so a demo run sees fresh referrals
    days_ago = np.where(rng.random(len(referrers)) < 0.2, rng.integers(0, 7, len(referrers)),
                        rng.integers(0, HISTORY_DAYS, len(referrers)))
    referral = pd.DataFrame({
        "customer_id": referrers, "local_time": _stamps(now, days_ago, rng), "type": "referral",
        "amount": np.round(rng.lognormal(np.log(260), 0.6, len(referrers)), 2),
    })

    events = pd.concat([purchase, nps, complaint, referral], ignore_index=True)
    events = events.sort_values(["local_time", "customer_id", "type"], kind="stable", ignore_index=True)
    events.insert(0, "event_id", [f"E{i:08d}" for i in range(1, len(events) + 1)])
    return events


def _write_events(events: pd.DataFrame, path: Path) -> None:
    if path.exists():
        path.unlink()
    stamp = np.datetime_as_string(events["local_time"].to_numpy().astype("datetime64[s]"), unit="s")
    rows = zip(
        events["event_id"].tolist(),
        events["customer_id"].tolist(),
        np.char.add(stamp, "+08:00").tolist(),
        events["type"].tolist(),
        _nullable(events["score"], int),
        _nullable(events["amount"], float),
        _nullable(events["category"], str),
    )
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE events (event_id TEXT NOT NULL, customer_id TEXT NOT NULL, "
                   "timestamp TEXT NOT NULL, type TEXT NOT NULL, score INTEGER, amount REAL, category TEXT)")
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()


def _nullable(column: pd.Series, kind: type) -> list:
    """Python values for SQLite, None where missing (sqlite3 cannot bind numpy scalars or NaN)."""
    missing = column.isna().to_numpy()
    if kind is str:
        values = column.to_numpy(dtype=object).copy()
    else:
        filled = column.to_numpy(dtype=float, na_value=0.0)
        values = np.array((filled.astype(np.int64) if kind is int else filled).tolist(), dtype=object)
    values[missing] = None
    return values.tolist()
