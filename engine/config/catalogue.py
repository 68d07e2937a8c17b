"""The catalogue: every column, built-in feature, aggregate, trigger and reward kind the engine knows.

One place for these facts: the rule checker (``config.program``), the data loader
(``data.sources``), the features (``data.features``), template checks and the docs all read
them from here. Column types are those of the data (``timestamp`` for instants);
``expression_type`` says how rule expressions see them.
"""

from __future__ import annotations

from engine.config.model import Settings

ACTIVITY_TABLES = ("orders", "events")     # linked to the customers by customer_id
ACTIVITY_PREFIX = {"orders": "order", "events": "event"}   # order.amount, event.score in expressions

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": ("customer_id",),
    "orders": ("order_id", "customer_id", "timestamp", "amount"),
    "events": ("event_id", "customer_id", "timestamp", "type"),
    "redemptions": ("customer_id",),
    "point_redemptions": ("redemption_id", "customer_id", "timestamp", "points"),
}

CUSTOMER_COLUMNS: dict[str, str] = {
    "customer_id": "string",
    "name": "string",
    "email": "string",
    "phone": "string",
    "device_token": "string",
    "birthday": "date",
    "signup_date": "date",
    "locale": "string",
    "timezone": "string",
    "email_opt_in": "bool",
    "sms_opt_in": "bool",
    "push_opt_in": "bool",
    "city": "string",
    "country": "string",
    "gender": "string",
}

ORDER_COLUMNS: dict[str, str] = {
    "order_id": "string", "customer_id": "string", "timestamp": "timestamp", "amount": "number",
    "channel": "string", "coupon_code": "string", "store": "string",
}
EVENT_COLUMNS: dict[str, str] = {
    "event_id": "string", "customer_id": "string", "timestamp": "timestamp", "type": "string",
    "score": "number", "amount": "number",
}
REDEMPTION_COLUMNS: dict[str, str] = {
    "customer_id": "string", "coupon_code": "string", "order_id": "string",
    "timestamp": "timestamp", "redeemed_at": "timestamp",
}
POINT_REDEMPTION_COLUMNS: dict[str, str] = {
    "redemption_id": "string", "customer_id": "string", "timestamp": "timestamp", "points": "number",
}
KNOWN_COLUMNS = {"customers": CUSTOMER_COLUMNS, "orders": ORDER_COLUMNS,
                 "events": EVENT_COLUMNS, "redemptions": REDEMPTION_COLUMNS,
                 "point_redemptions": POINT_REDEMPTION_COLUMNS}
ID_COLUMNS = {"orders": "order_id", "events": "event_id", "point_redemptions": "redemption_id"}

BUILTIN_FEATURES: dict[str, tuple[str, str]] = {
    "days_since_last_order": ("number", "days from the local date of the last order up to as_of to as_of's date; null without orders"),
    "days_since_first_order": ("number", "days from the local date of the first order to as_of's date; null without orders"),
    "orders_total": ("number", "number of orders up to as_of"),
    "lifetime_spend": ("number", "sum of amount over all orders up to as_of (0 without orders)"),
    "avg_order_value": ("number", "lifetime_spend / orders_total; null without orders"),
    "orders_365d": ("number", "number of orders within 365d (as_of - 365 days < t <= as_of)"),
    "monetary_365d": ("number", "sum of amount of the orders within 365d"),
    "orders_last_90d": ("number", "number of orders within 90d"),
    "orders_prev_90d": ("number", "number of orders with as_of - 180 days < t <= as_of - 90 days"),
    "days_since_signup": ("number", "days from signup_date to as_of's date; null without signup_date"),
    "days_to_birthday": ("number", "days from as_of's date to the next birthday, 0 on the day (29 Feb: 28 Feb in common years)"),
    "age": ("number", "whole years from birthday to as_of's date"),
    "tier": ("string", ("computed tiers: the first tier in tiers: whose condition holds; stored tiers: the "
                        "member's tier after this run's moves; null when none")),
    "tier_since": ("date", "stored tiers: the date the member reached their tier; null with computed tiers"),
    "rfm_r": ("number", "recency score 1-5 (5 = most recent order), among customers with orders"),
    "rfm_f": ("number", "frequency score 1-5 from orders_365d, among customers with orders"),
    "rfm_m": ("number", "monetary score 1-5 from monetary_365d, among customers with orders"),
    "rfm_score": ("number", "rfm_r + rfm_f + rfm_m (3-15); null without orders"),
    "last_nps_score": ("number", "score of the latest nps_response event up to as_of; null without one"),
    "complaints_90d": ("number", "number of complaint events within 90d"),
    "points_balance": ("number", "points the member can spend at as_of: earned - redeemed - expired (never below 0)"),
    "points_earned_365d": ("number", "points earned within 365d, less the points of refunded orders"),
    "points_redeemed_365d": ("number", "points redeemed (point_redemptions) within 365d"),
    "points_expiring_30d": ("number", "points of the balance that expire within the next 30 days"),
    "points_next_expiry": ("date", "the date the oldest points of the balance expire; null when none expire"),
}
POINTS_FEATURES = ("points_balance", "points_earned_365d", "points_redeemed_365d", "points_expiring_30d",
                   "points_next_expiry")

MAX_POINTS = 1_000_000_000   # per credit or offer; the rule-file schema bounds a written amount the same way
AGGREGATES = ("count", "sum", "avg", "min", "max", "first", "last", "distinct")
REWARD_KINDS = ("coupon", "points", "free_shipping", "gift", "tier", "message")
TRIGGER_KINDS = ("birthday", "anniversary", "dates", "event", "inactive_for", "becomes")


def expression_type(kind: str) -> str:
    """How expressions see a column type: instants are dates."""
    return "date" if kind == "timestamp" else kind


def _declared(settings: Settings, table: str, known: dict[str, str]) -> dict[str, str]:
    names = {name: expression_type(kind) for name, kind in known.items()}
    source = settings.data.get(table)
    if source is not None:
        for name in source.columns:
            names.setdefault(name, "string")
        names.update(source.fields)
    return names


def table_columns(settings: Settings, table: str) -> dict[str, str]:
    """Columns of orders/events usable in `where:` filters, with their types."""
    return _declared(settings, table, KNOWN_COLUMNS[table])


def customer_catalogue(settings: Settings) -> dict[str, str]:
    """Customer columns usable in rules: the known ones plus those declared in loyalty.yaml."""
    return _declared(settings, "customers", CUSTOMER_COLUMNS)


def builtin_catalogue() -> dict[str, str]:
    """Built-in feature name -> type."""
    return {name: spec[0] for name, spec in BUILTIN_FEATURES.items()}
