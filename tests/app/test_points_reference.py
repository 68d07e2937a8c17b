"""90 daily runs against a reference model of the points accounts.

Random orders (some refunded), point redemptions (some over the balance), check-in events a
points campaign rewards, consent switched on and off between runs, and the programme's
holdout. After the runs, a plain per-member replay of the same data and of the points the runs
recorded (oldest points first, each credit ending 30 days after it was earned) must give every
member's balance, earned, redeemed and expired points exactly as ``loyalty points`` does.
"""

from __future__ import annotations

import csv
import io
import math
import random
import sqlite3
from collections import deque
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from cli import main
from engine import Workspace

START = pd.Timestamp("2026-03-01T10:00:00+08:00")
DAYS = 90
EXPIRE = pd.Timedelta(days=30)

RULES = """
segments:
  everyone: {where: true}

campaigns:
  check_in_bonus:
    name: 签到积分
    segment: everyone
    when: {event: check_in}
    reward: {points: 25}
    channel: sms
    template: bonus

points:
  value: 0.01
  start: "2026-03-05"
  expire_after: 30d
  earn:
    purchases:
      on: order
      amount: floor(order.amount)
      notify: {channel: sms, template: bonus}
"""


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _data(rng: random.Random, members: list[str]) -> tuple[list, list, list]:
    orders, events, redemptions = [], [], []
    for day in range(DAYS):
        for member in members:
            at = START - pd.Timedelta(days=3) + pd.Timedelta(days=day, hours=rng.randint(0, 23))
            if rng.random() < 0.12:
                amount = round(rng.uniform(20, 400), 2) * (-1 if rng.random() < 0.15 else 1)
                orders.append([f"O{len(orders)}", member, at.isoformat(), amount])
            if rng.random() < 0.05:
                events.append([f"E{len(events)}", member, at.isoformat(), "check_in"])
            if rng.random() < 0.04:
                redemptions.append([f"R{len(redemptions)}", member, at.isoformat(), rng.choice([50, 100, 400, 2000])])
    return orders, events, redemptions


def _customers(rng: random.Random, members: list[str]) -> list[list]:
    return [[m, f"会员{m}", f"1380000{i:04d}", "zh-CN", "Asia/Shanghai", rng.random() < 0.6]
            for i, m in enumerate(members)]


def reference(orders, redemptions, grants, as_of: pd.Timestamp, start: pd.Timestamp) -> dict[str, dict]:
    """Each member's account, one entry at a time: credits as lots ending 30 days later,
    debits (refunds, kind 1; redemptions, kind 2) taking the oldest lots first and never
    more than the balance."""
    entries: dict[str, list] = {}
    for _, member, at, amount in orders:
        at = pd.Timestamp(at)
        if start <= at <= as_of:
            points = math.floor(abs(amount))
            if points:
                entries.setdefault(member, []).append((at, 1 if amount < 0 else 0, points))
    for member, points, at in grants:
        if at <= as_of:
            entries.setdefault(member, []).append((at, 0, points))
    for _, member, at, points in redemptions:
        at = pd.Timestamp(at)
        if at <= as_of:
            entries.setdefault(member, []).append((at, 2, points))
    accounts = {}
    for member, rows in entries.items():
        lots: deque = deque()
        earned = redeemed = expired = 0
        # at the same instant: credits, then redemptions, then refunds
        for at, kind, points in sorted(rows, key=lambda r: (r[0], (0, 2, 1)[r[1]])):
            while lots and lots[0][0] <= at:
                expired += lots.popleft()[1]
            if kind == 0:
                lots.append([at + EXPIRE, points])
                earned += points
                continue
            taken = 0
            while lots and taken < points:
                use = min(lots[0][1], points - taken)
                lots[0][1] -= use
                taken += use
                if not lots[0][1]:
                    lots.popleft()
            if kind == 1:
                earned -= taken
            else:
                redeemed += taken
        while lots and lots[0][0] <= as_of:
            expired += lots.popleft()[1]
        accounts[member] = {"balance": sum(lot[1] for lot in lots), "earned": earned, "redeemed": redeemed,
                            "expired": expired}
    return accounts


def test_ninety_daily_runs_agree_with_the_reference_model(tmp_path):
    root = tmp_path / "ws"
    assert CliRunner().invoke(main, ["init", str(root)]).exit_code == 0
    rng = random.Random(20261204)
    members = [f"M{i:03d}" for i in range(40)]
    orders, events, redemptions = _data(rng, members)
    data = root / "data"
    _write(data / "orders.csv", ["order_id", "customer_id", "timestamp", "amount"], orders)
    _write(data / "events.csv", ["event_id", "customer_id", "timestamp", "type"], events)
    _write(data / "point_redemptions.csv", ["redemption_id", "customer_id", "timestamp", "points"], redemptions)
    settings = (root / "loyalty.yaml").read_text(encoding="utf-8").replace(
        "  events:    {path: data/events.csv, fields: {score: number}}\n",
        "  events:    {path: data/events.csv}\n  point_redemptions: {path: data/point_redemptions.csv}\n")
    (root / "loyalty.yaml").write_text(settings, encoding="utf-8")
    for old in (root / "rules").glob("*.yaml"):
        old.unlink()
    (root / "rules" / "programme.yaml").write_text(RULES, encoding="utf-8")
    (root / "templates" / "bonus.sms.zh-CN.j2").write_text("{{ customer.name }}，{{ reward.points }}积分已到账。回T退订\n",
                                                        encoding="utf-8")
    header = ["customer_id", "name", "phone", "locale", "timezone", "sms_opt_in"]
    programme = Workspace(root)
    for day in range(DAYS):
        _write(data / "customers.csv", header, _customers(rng, members))   # consent changes every day
        as_of = START + pd.Timedelta(days=day)
        programme.run(as_of.isoformat(), deliver=False)
        if day == 45:                                                          # a rerun credits nothing twice
            assert programme.run(as_of.isoformat(), deliver=False).new_offers == 0
    with sqlite3.connect(root / "state" / "loyalty.db") as conn:
        grants = [(c, p, pd.Timestamp(at).tz_convert("Asia/Shanghai")) for c, p, at in conn.execute(
            "SELECT l.customer_id, l.points, r.as_of_utc FROM points_ledger l JOIN offers o USING (offer_id) "
            "JOIN runs r ON r.run_id = o.run_id")]
        notices = conn.execute("SELECT count(*) FROM offers WHERE campaign = 'points.purchases'").fetchone()[0]
    assert grants and notices, "the campaign granted points and some credits were announced"
    end = START + pd.Timedelta(days=DAYS - 1)
    launch = pd.Timestamp("2026-03-05T00:00:00+08:00")
    for as_of in (START + pd.Timedelta(days=30), end):
        result = CliRunner().invoke(main, ["points", str(root), "--as-of", as_of.isoformat(), "--format", "csv"])
        assert result.exit_code == 0, result.output
        got = {row["customer_id"]: {k: int(row[k]) for k in ("balance", "earned", "redeemed", "expired")}
               for row in csv.DictReader(io.StringIO(result.stdout))}
        want = {m: a for m, a in reference(orders, redemptions, grants, as_of, launch).items()
                if any(a.values())}
        assert got == want
        for account in got.values():
            assert account["balance"] == account["earned"] - account["redeemed"] - account["expired"] >= 0
