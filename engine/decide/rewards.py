"""Rewards: cost estimates for budgets, and the reward each offer carries.

One entry per reward kind in ``REWARDS``. Costs are estimated per offer, column-at-a-time,
assuming every reward is used (an upper bound, which is what a budget needs):

- coupon ``amount_off``: the amount; ``percent_off``: the percentage of the larger of
  ``min_spend`` and the customer's average order value (``min_spend`` without orders);
- points: points x ``costs.point_value`` from loyalty.yaml (default 0.01);
- free shipping: ``costs.shipping`` (default 10); gift, tier: their ``cost:`` (default 0);
- message only: 0. Every kind takes an explicit ``cost:`` that overrides the estimate,
  and ``costs.message`` is added for sending.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from engine.config.catalogue import MAX_POINTS
from engine.config.model import RewardDef, Settings
from engine.config.tier_rules import trial_days

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"   # no 0/O, 1/I/L
_ALPHABET_BYTES = np.frombuffer(CODE_ALPHABET.encode("ascii"), dtype=np.uint8)




def _points(reward: RewardDef, scope: pd.DataFrame, as_of) -> np.ndarray:
    """Whole points per row of ``scope``, from the reward's amount expression.

    Clipped, not refused: a computed amount is floored and kept between 0 and ``MAX_POINTS``
    (so an overflow to infinity, e.g. `monetary_365d * 1e300`, credits ``MAX_POINTS``), and one
    that is null or not a number (NaN) credits 0, as a null always has. The data feeding the
    expression is bounded when it is loaded, so only arithmetic in the rule can get here; one
    customer's odd value must not stop the whole run, and inf or NaN must never reach costs,
    budgets or the points ledger (SQLite cannot store them as whole points).
    """
    values = reward.amount.evaluate(scope, as_of)
    numbers = pd.to_numeric(values, errors="coerce").astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    numbers = np.nan_to_num(numbers, nan=0.0, posinf=MAX_POINTS, neginf=0.0)
    return np.floor(numbers.clip(min=0, max=MAX_POINTS))


def _coupon_cost(reward, scope, settings, as_of):
    p = reward.params
    if "amount_off" in p:
        return np.full(len(scope), float(p["amount_off"]))
    basket = np.full(len(scope), float(p.get("min_spend", 0)))
    if "avg_order_value" in scope:
        aov = pd.to_numeric(scope["avg_order_value"], errors="coerce").astype("Float64").fillna(0).to_numpy(dtype=float)
        basket = np.maximum(basket, aov)
    return basket * float(p["percent_off"]) / 100


COSTS: dict[str, Callable] = {
    "coupon": _coupon_cost,
    "points": lambda r, scope, s, as_of: _points(r, scope, as_of) * s.point_value,
    "free_shipping": lambda r, scope, s, as_of: np.full(len(scope), s.shipping_cost),
    "gift": lambda r, scope, s, as_of: np.zeros(len(scope)),
    "tier": lambda r, scope, s, as_of: np.zeros(len(scope)),
    # the message announcing points an earn rule credited: the points are not the campaign's to give
    "earned": lambda r, scope, s, as_of: np.zeros(len(scope)),
    "message": lambda r, scope, s, as_of: np.zeros(len(scope)),
}


def estimate_cost(reward: RewardDef, scope: pd.DataFrame, settings: Settings, as_of) -> np.ndarray:
    """Estimated cost per offer for the rows of ``scope`` (features + event columns)."""
    if "cost" in reward.params:
        base = np.full(len(scope), float(reward.params["cost"]))
    else:
        base = COSTS[reward.kind](reward, scope, settings, as_of)
    return np.round(base + settings.message_cost, 2)


def points_for(reward: RewardDef, scope: pd.DataFrame, as_of) -> np.ndarray:
    """Points credited per offer (0 for other kinds): finite whole numbers from 0 to
    ``MAX_POINTS``, clipped as ``_points`` explains."""
    if reward.kind != "points":
        return np.zeros(len(scope))
    return _points(reward, scope, as_of)


DESCRIPTIONS = {
    "zh": {
        "percent_off": "{v:g}折优惠券", "amount_off": "立减{m}券", "points": "{v:g}积分",
        "free_shipping": "免运费", "gift": "礼品 {v}", "tier": "升级为{v}", "tier_trial": "体验{v} {d}天",
        "message": "关怀消息", "earned": "获得{v:g}积分",
        "min_spend": "（满{m}可用）",
    },
    "en": {
        "percent_off": "{v:g}% off coupon", "amount_off": "{m} off coupon", "points": "{v:g} points",
        "free_shipping": "free shipping", "gift": "gift {v}", "tier": "upgrade to {v}",
        "tier_trial": "{v} for {d} days", "message": "message", "earned": "{v:g} points earned",
        "min_spend": " (min. spend {m})",
    },
}

Money = Callable[[float], str]     # an amount in the programme's currency, e.g. 10 -> "¥10"


def describe(kind: str, params: dict, locale: str, points: float = 0, money: Money | None = None) -> str:
    """A short description of a reward in the customer's language; amounts of money in the
    programme's currency through ``money`` (``¥10``, ``$10``; a bare number without it)."""
    words = DESCRIPTIONS["zh" if str(locale).lower().startswith("zh") else "en"]
    money = money or (lambda amount: f"{amount:g}")
    if kind == "coupon":
        if "percent_off" in params:
            value = params["percent_off"]
            text = words["percent_off"].format(v=(100 - value) / 10 if words is DESCRIPTIONS["zh"] else value)
        else:
            text = words["amount_off"].format(m=money(params["amount_off"]))
        if params.get("min_spend"):
            text += words["min_spend"].format(m=money(params["min_spend"]))
        return text
    if kind in ("points", "earned"):
        return words[kind].format(v=points)
    if kind == "gift":
        return words["gift"].format(v=params.get("name", params.get("sku", "")))
    if kind == "tier" and params.get("for"):
        return words["tier_trial"].format(v=params.get("to", ""), d=trial_days(params["for"]))
    if kind == "tier":
        return words["tier"].format(v=params.get("to", ""))
    return words[kind]


def reward_payload(kind: str, params: dict, points: float, send_at: pd.Timestamp,
                   code: str | None, locale: str, cost: float, money: Money | None = None) -> dict:
    """The reward as it is recorded, sent and shown to templates; ``money`` formats amounts
    in the programme's currency for the description."""
    payload = {"kind": kind, **{k: v for k, v in params.items() if k not in ("amount",)}}
    payload["cost"] = round(float(cost), 2)
    if kind in ("points", "earned"):     # earned: credited by an earn rule, announced here
        payload["points"] = int(points)
    valid_days = params.get("valid_days")
    if valid_days:
        expires = (send_at + pd.Timedelta(days=int(valid_days))).date()
        payload["expires_at"] = expires.isoformat()
    if code is not None:
        payload["code"] = code
    payload["description"] = describe(kind, params, locale, points, money)
    return payload


def generate_codes(count: int, prefix: str = "", length: int = 10, taken: Iterable[str] = (),
                   share: tuple[int, int] = (0, 1)) -> list[str]:
    """``count`` unguessable, unique coupon codes, none of them in ``taken``.

    Randomness comes from ``secrets`` (the OS generator), drawn in bulk and
    mapped by rejection sampling onto an alphabet without look-alike characters
    (0/O, 1/I/L); 10 characters carry about 50 bits. The store's unique index on
    ``coupon_codes.code`` stays the final guard against a collision.

    ``share``: (index, shares) when several processes make the codes of one run (the
    dask engine's partitions): the last characters of each code, read as a number, leave
    the remainder ``index`` when divided by ``shares``, so two shares never make the same
    code (each share's codes carry log2(shares) bits less).
    """
    if length < 6:
        raise ValueError("coupon codes need at least 6 random characters")
    index, shares = share
    tail = min(length, TAIL_SYMBOLS)
    slots = len(CODE_ALPHABET) ** tail // shares
    if not 0 <= index < shares or slots < 1:
        raise ValueError(f"coupon codes cannot be split into {shares} shares")
    if count > slots * len(CODE_ALPHABET) ** (length - tail) // 2:
        raise ValueError(f"{count:,} coupon codes do not fit in codes of {length} characters: "
                         "make them longer (coupons: length)")
    taken = set(taken)
    codes: list[str] = []
    fresh: set[str] = set()
    while len(codes) < count:
        need = count - len(codes)
        heads = _symbols(need, length - tail)
        ends = _tails(need, tail, slots, index, shares)
        for head, end in zip(heads, ends):
            code = prefix + head + end
            if code not in taken and code not in fresh:
                fresh.add(code)
                codes.append(code)
    return codes


TAIL_SYMBOLS = 4          # the characters that tell the shares of one run's codes apart


def _symbols(count: int, length: int) -> list[str]:
    """``count`` uniformly random strings of ``length`` characters of the alphabet."""
    if length == 0:
        return [""] * count
    limit = 256 - 256 % len(CODE_ALPHABET)      # uniform: reject bytes >= 248
    chosen = np.zeros(0, dtype=np.uint8)
    while len(chosen) < count * length:
        raw = np.frombuffer(secrets.token_bytes((count * length - len(chosen)) * 9 // 8 + 64), dtype=np.uint8)
        chosen = np.concatenate([chosen, raw[raw < limit] % len(CODE_ALPHABET)])
    text = _ALPHABET_BYTES[chosen[:count * length]].tobytes().decode("ascii")
    return [text[start:start + length] for start in range(0, count * length, length)]


def _tails(count: int, length: int, slots: int, index: int, shares: int) -> list[str]:
    """``count`` strings of ``length`` characters whose value in base 31 is ``index`` plus
    ``shares`` times a uniformly random slot below ``slots``."""
    limit = (2 ** 32 // slots) * slots           # uniform: reject draws >= limit
    drawn = np.zeros(0, dtype=np.uint64)
    while len(drawn) < count:
        raw = np.frombuffer(secrets.token_bytes(((count - len(drawn)) * 9 // 8 + 16) * 4), dtype=np.uint32)
        drawn = np.concatenate([drawn, (raw[raw < limit] % slots).astype(np.uint64)])
    values = drawn[:count] * np.uint64(shares) + np.uint64(index)
    digits = np.empty((count, length), dtype=np.uint8)
    for position in range(length - 1, -1, -1):
        digits[:, position] = values % np.uint64(len(CODE_ALPHABET))
        values //= np.uint64(len(CODE_ALPHABET))
    text = _ALPHABET_BYTES[digits.reshape(-1)].tobytes().decode("ascii")
    return [text[start:start + length] for start in range(0, count * length, length)]


def expires_on(send_at: dt.datetime, valid_days: int) -> dt.date:
    return (send_at + dt.timedelta(days=valid_days)).date()
