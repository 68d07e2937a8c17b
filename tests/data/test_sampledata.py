"""The sample workspace generator and the example programme (rules/ and templates/)."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from jinja2 import nodes
from jsonschema import Draft202012Validator

from engine.config.rulefiles import load_yaml
from engine.data.sampledata import INVALID_LOCALE, INVALID_TIMEZONE, copy_example_programme, write_sample_workspace

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "rules").glob("*.yaml"))
LOCALES = ("zh-CN", "en-US")
AS_OF = "2026-11-23T10:00:00+08:00"

BUILTIN_FEATURES = {
    "days_since_last_order", "days_since_first_order", "orders_total", "lifetime_spend",
    "avg_order_value", "orders_365d", "monetary_365d", "orders_last_90d", "orders_prev_90d",
    "days_since_signup", "days_to_birthday", "age", "tier", "rfm_r", "rfm_f", "rfm_m",
    "rfm_score", "last_nps_score", "complaints_90d",
    "points_balance", "points_earned_365d", "points_redeemed_365d", "points_expiring_30d", "points_next_expiry",
}
CUSTOMER_COLUMNS = {
    "customer_id", "name", "email", "phone", "birthday", "signup_date", "locale", "timezone",
    "email_opt_in", "sms_opt_in", "push_opt_in", "city", "gender",
}
FUNCTIONS = {"abs", "floor", "ceil", "round", "min", "max", "coalesce", "days_since", "days_until",
             "today", "date", "year", "month", "day", "lower", "upper", "len"}
KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false"}
TABLE_COLUMNS = {"orders": {"order_id", "customer_id", "timestamp", "amount", "channel", "coupon_code"},
                 "events": {"event_id", "customer_id", "timestamp", "type", "score", "amount", "category"}}
EVENT_ATTRIBUTES = {"event." + c for c in TABLE_COLUMNS["events"]}


# --------------------------------------------------------------------------- generator


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    return write_sample_workspace(tmp_path_factory.mktemp("ws"), customers=400, seed=7, as_of=AS_OF)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes(tmp_path, sample):
    write_sample_workspace(tmp_path / "again", customers=400, seed=7, as_of=AS_OF)
    first, second = _files(sample["workspace"]), _files(tmp_path / "again")
    assert set(first) == {"loyalty.yaml", "data/customers.csv", "data/orders.parquet", "data/crm.db",
                          "data/point_redemptions.csv"}
    assert first == second


def test_another_seed_gives_other_data(tmp_path, sample):
    write_sample_workspace(tmp_path / "other", customers=400, seed=8, as_of=AS_OF)
    first, other = _files(sample["workspace"]), _files(tmp_path / "other")
    for name in ("data/customers.csv", "data/orders.parquet", "data/crm.db"):
        assert first[name] != other[name], name


def test_counts_match_the_files(sample):
    counts, paths = sample["counts"], sample["paths"]
    assert counts["customers"] == 400 == len(pd.read_csv(paths["customers"]))
    assert counts["orders"] == pq.read_metadata(paths["orders"]).num_rows
    with sqlite3.connect(paths["events"]) as db:
        assert counts["events"] == db.execute("SELECT count(*) FROM events").fetchone()[0]
    assert set(counts["events_by_type"]) == {"purchase", "nps_response", "complaint", "referral"}


def test_customers_use_their_own_column_names_mapped_in_loyalty_yaml(sample):
    settings = yaml.safe_load(sample["paths"]["loyalty_yaml"].read_text(encoding="utf-8"))
    mapping = settings["data"]["customers"]["columns"]
    customers = pd.read_csv(sample["paths"]["customers"], dtype=str, keep_default_na=False)
    ours = {ours for ours, theirs in mapping.items() if theirs in customers.columns}
    ours |= set(customers.columns) - set(mapping.values())
    assert CUSTOMER_COLUMNS <= ours
    ids = customers[mapping["customer_id"]]
    assert ids.is_unique and ids.str.fullmatch(r"C\d{6}").all()
    assert set(customers["locale"]) >= {"zh-CN", "en-US", "zh", "en-GB"}
    assert set(customers["timezone"]) >= {"Asia/Shanghai", "America/New_York", "Europe/London"}
    assert set(customers["city"]) == {"上海", "北京", "广州", "深圳", "杭州", "成都", "London", "New York"}
    assert set(customers["email_opt_in"]) == {"True", "False"}
    known = customers["birthday"][customers["birthday"] != ""]
    assert pd.to_datetime(known, format="%Y-%m-%d").notna().all()
    assert known.str.endswith("-02-29").sum() >= 2


def test_orders_and_events_have_the_required_columns(sample):
    orders = pd.read_parquet(sample["paths"]["orders"])
    assert TABLE_COLUMNS["orders"] <= set(orders.columns)
    assert str(orders["timestamp"].dtype.tz) == "UTC"
    assert orders["order_id"].is_unique
    assert orders["coupon_code"].isna().all()
    as_of = pd.Timestamp(AS_OF)
    assert (orders["timestamp"] <= as_of).all()
    assert (orders["timestamp"] > as_of - pd.Timedelta(days=731)).all()
    with sqlite3.connect(sample["paths"]["events"]) as db:
        events = pd.read_sql("SELECT * FROM events", db)
    assert TABLE_COLUMNS["events"] <= set(events.columns)
    assert events["event_id"].is_unique
    stamps = pd.to_datetime(events["timestamp"], format="ISO8601")
    assert (stamps <= as_of).all()
    scores = events.loc[events["type"] == "nps_response", "score"]
    assert scores.between(0, 10).all() and scores.notna().all()
    assert events.loc[events["type"].isin(["purchase", "referral"]), "amount"].notna().all()


def test_dirty_rows_are_there_as_intended(sample):
    customers = pd.read_csv(sample["paths"]["customers"], dtype=str, keep_default_na=False)
    orders = pd.read_parquet(sample["paths"]["orders"])
    unknown = ~orders["customer_id"].isin(customers["cust_no"])
    assert unknown.sum() == 3
    assert (orders["amount"] < 0).sum() == 2
    assert not (unknown & (orders["amount"] < 0)).any()
    assert (customers["timezone"] == INVALID_TIMEZONE).sum() == 2
    assert (customers["locale"] == INVALID_LOCALE).sum() == 2
    assert sample["dirty"] == {"unknown_customer_orders": 3, "negative_amount_orders": 2,
                               "invalid_timezone_customers": 2, "invalid_locale_customers": 2}


def test_purchase_events_mirror_orders(sample):
    orders = pd.read_parquet(sample["paths"]["orders"])
    with sqlite3.connect(sample["paths"]["events"]) as db:
        purchases = pd.read_sql("SELECT customer_id, amount FROM events WHERE type = 'purchase'", db)
    customers = pd.read_csv(sample["paths"]["customers"], dtype=str)
    valid = orders[(orders["amount"] > 0) & orders["customer_id"].isin(customers["cust_no"])]
    assert len(purchases) == len(valid)
    assert purchases["amount"].sum() == pytest.approx(valid["amount"].sum())


def test_too_few_customers_is_refused(tmp_path):
    with pytest.raises(ValueError):
        write_sample_workspace(tmp_path, customers=3)


def test_example_programme_can_be_copied(tmp_path):
    written = copy_example_programme(tmp_path)
    assert {p.name for p in written} >= {"segments.yaml", "welcome_pack.email.zh-CN.j2"}


# --------------------------------------------------------------------------- schemas


def _validator(name: str) -> Draft202012Validator:
    schema = json.loads((ROOT / "schemas" / name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_validates_against_the_schema(path):
    data, _, problems = load_yaml(path, f"rules/{path.name}")
    assert problems == []
    assert data == yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator("rules.schema.json").iter_errors(data)]
    assert errors == []
    assert path.read_text(encoding="utf-8").startswith("#"), "each rule file starts with a comment header"


def test_loyalty_yaml_validates_against_the_schema(sample):
    data = yaml.safe_load(sample["paths"]["loyalty_yaml"].read_text(encoding="utf-8"))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator("loyalty.schema.json").iter_errors(data)]
    assert errors == []
    assert data["program"] == {"name": "星享会员", "timezone": "Asia/Shanghai", "currency": "CNY",
                               "locale": "zh-CN"}
    assert data["contact_policy"] == {"max_messages": 2, "per": "7d", "quiet_hours": "21:00-09:00"}
    assert data["holdout"] == "5%" and data["state"] == "state/loyalty.db"
    assert {"email", "sms", "push"} <= set(data["channels"])


# --------------------------------------------------------------------------- the programme


def _programme() -> dict:
    merged: dict = {}
    for path in RULE_FILES:
        for section, items in yaml.safe_load(path.read_text(encoding="utf-8")).items():
            if section == "version":
                continue
            overlap = set(merged.setdefault(section, {})) & set(items)
            assert not overlap, f"{path.name} redefines {overlap}"
            merged[section].update(items)
    return merged


PROGRAMME = _programme()
CAMPAIGNS = PROGRAMME["campaigns"]


def test_programme_is_complete():
    assert list(PROGRAMME["tiers"]) == ["platinum", "gold", "silver", "bronze"]
    assert len(CAMPAIGNS) >= 13
    triggers = {kind for c in CAMPAIGNS.values() for kind in c.get("when", {"always": 1})}
    assert triggers >= {"always", "birthday", "anniversary", "dates", "event", "inactive_for", "becomes"}
    rewards = {next(iter(c["reward"])) for c in CAMPAIGNS.values()}
    assert rewards >= {"coupon", "points", "free_shipping", "gift", "message"}
    assert {c["channel"] for c in CAMPAIGNS.values()} == {"email", "sms", "push"}
    assert any("holdout" in c for c in CAMPAIGNS.values())
    assert any("variants" in c for c in CAMPAIGNS.values())
    for cid, campaign in CAMPAIGNS.items():
        assert re.search(r"[\u4e00-\u9fff]", campaign["name"]), cid
        assert campaign["description"].isascii(), cid
        for segment in [campaign.get("segment"), *campaign.get("exclude", [])]:
            assert segment is None or segment in PROGRAMME["segments"], (cid, segment)


def _expressions():
    """(where, text, extra allowed names) for every expression in the programme."""
    def conditions(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from conditions(item)
        elif isinstance(value, list):
            for item in value:
                yield from conditions(item)

    for name, feature in PROGRAMME["features"].items():
        if "expr" in feature:
            yield f"features.{name}", feature["expr"], set()
        for text in conditions(feature.get("where")):
            yield f"features.{name}.where", text, TABLE_COLUMNS[feature["from"]]
    for section in ("segments", "tiers"):
        for name, item in PROGRAMME[section].items():
            for key in ("where", "qualify", "retain"):
                for text in conditions(item.get(key)):
                    yield f"{section}.{name}.{key}", text, set()
    for cid, campaign in CAMPAIGNS.items():
        when = campaign.get("when", {})
        event_names = EVENT_ATTRIBUTES if "event" in when else set()
        for text in conditions(campaign.get("where")):
            yield f"{cid}.where", text, set()
        for text in conditions(when.get("becomes")):
            yield f"{cid}.becomes", text, set()
        for text in conditions(when.get("where")):
            yield f"{cid}.when.where", text, event_names
        rewards = [campaign["reward"]] + [v["reward"] for v in campaign.get("variants", []) if "reward" in v]
        for reward in rewards:
            if isinstance(reward.get("points", {}).get("amount"), str):
                yield f"{cid}.points", reward["points"]["amount"], event_names
        if "rank_by" in campaign.get("budget", {}):
            yield f"{cid}.rank_by", campaign["budget"]["rank_by"], set()


@pytest.mark.parametrize("where,text,extra", list(_expressions()), ids=lambda v: v if isinstance(v, str) else "")
def test_expressions_only_use_known_names(where, text, extra):
    known = BUILTIN_FEATURES | CUSTOMER_COLUMNS | set(PROGRAMME["features"]) | extra
    bare = re.sub(r'"[^"]*"', '""', text)
    for match in re.finditer(r"[A-Za-z_][A-Za-z0-9_.]*(\s*\()?", bare):
        name, call = match.group(0).rstrip("( \t"), match.group(1)
        if call:
            assert name in FUNCTIONS, f"{where}: unknown function {name}"
        elif name not in KEYWORDS:
            assert name in known, f"{where}: unknown name {name}"


# --------------------------------------------------------------------------- templates
# Templates are rendered with the engine's own Renderer, so the check matches send time.

RENDER_LOCALES = ("zh-CN", "en-US", "en-GB")


def _template_uses():
    for name, rule in PROGRAMME.get("points", {}).get("earn", {}).items():   # the messages announcing credits
        if "notify" in rule:
            for locale in RENDER_LOCALES:
                yield f"points.{name}", rule["notify"]["template"], rule["notify"]["channel"], locale, \
                    {"earned": {}}
    for cid, campaign in CAMPAIGNS.items():
        names = {campaign["template"]} | {v["template"] for v in campaign.get("variants", []) if "template" in v}
        rewards = [campaign["reward"]] + [v["reward"] for v in campaign.get("variants", []) if "reward" in v]
        for name in sorted(names):
            for reward in rewards:
                for locale in RENDER_LOCALES:
                    yield cid, name, campaign["channel"], locale, reward


USES = list(_template_uses())


@pytest.fixture(scope="module")
def renderer():
    from engine.messages.rendering import Renderer
    return Renderer(ROOT / "templates", "zh-CN", {"name": "星享会员", "currency": "CNY", "timezone": "Asia/Shanghai"})


@pytest.mark.parametrize("cid,name,channel,locale,reward", USES,
                         ids=[f"{u[0]}-{u[3]}-{i}" for i, u in enumerate(USES)])
def test_every_template_exists_and_renders(renderer, cid, name, channel, locale, reward):
    for own in LOCALES:
        assert (ROOT / "templates" / f"{name}.{channel}.{own}.j2").is_file(), f"{cid} needs {name}.{channel}.{own}.j2"
    message = renderer.render(name, channel, locale, _context(reward, locale), customer_id="C000001")
    expected = {"zh-CN": "zh-CN", "en-US": "en-US", "en-GB": "en"}[locale]
    assert message.template_file.endswith(f"{name}.{channel}.{expected}.j2")
    text = message.body
    assert text and "None" not in text and "{{" not in text
    if channel == "email":
        assert message.subject and message.html and "\n" not in message.subject
        assert "None" not in message.subject
        assert "\n\n" in text, "the text part keeps its paragraphs"
    else:
        assert "\n" not in text
    if channel == "sms":
        assert not message.too_long, (message.sms_segments, text)
        opt_out = "回T退订" if locale.startswith("zh") else "Reply STOP to opt out"
        assert text.endswith(opt_out)
        if locale.startswith("zh"):
            assert len(text) <= 70, (len(text), text)          # one UCS-2 segment
        else:
            assert message.sms_segments == 1 and message.sms_encoding == "GSM-7", text
    if locale.startswith("en"):
        assert not re.search(r"[\u4e00-\u9fff]", text + (message.subject or "")), text


def test_no_template_is_left_unused():
    used = {f"{name}.{channel}.{locale}.j2" for _, name, channel, _, _ in USES for locale in (*LOCALES, "en")}
    assert {p.name for p in (ROOT / "templates").glob("*.j2")} == used


def test_templates_only_use_documented_variables():
    from jinja2 import Environment
    env = Environment()
    allowed = {"customer", "offer", "reward", "program", "tier_zh", "zhe"}
    for path in sorted((ROOT / "templates").glob("*.j2")):
        tree = env.parse(path.read_text(encoding="utf-8"))
        names = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"}
        assert names <= allowed, (path.name, names - allowed)
        filters = {f.name for f in tree.find_all(nodes.Filter)}
        assert filters <= {"money", "date", "int", "format", "capitalize", "round"}, (path.name, filters)


def _context(reward_def: dict, locale: str) -> dict:
    """A worst case for length: a four-character name and a full-length coupon code."""
    kind, params = next(iter(reward_def.items()))
    params = params if isinstance(params, dict) else {}
    reward = {"kind": kind, "description": kind, "cost": params.get("cost", 0)}
    if kind == "coupon":
        reward.update(code="STAR-7KQ2M9XW4P", expires_at=date(2026, 12, 23),
                      **{k: v for k, v in params.items() if k in ("percent_off", "amount_off", "min_spend")})
    elif kind == "points":
        reward["points"] = params["amount"] if isinstance(params["amount"], (int, float)) else 1234
    elif kind == "earned":
        reward["points"] = 25680
    elif kind == "gift":
        reward.update(sku=params["sku"], name=params.get("name", params["sku"]))
    elif kind == "free_shipping":
        reward["expires_at"] = date(2026, 12, 23)
    customer = {c: "" for c in CUSTOMER_COLUMNS} | {f: 0 for f in BUILTIN_FEATURES | set(PROGRAMME["features"])}
    customer.update(name="欧阳梦琪" if locale.startswith("zh") else "Charlotte Thompson", tier="gold",
                    monetary_365d=12345.6, lifetime_spend=10230.5, spend_to_gold=420.0,
                    days_since_signup=1096, locale=locale, points_balance=24800, points_expiring_30d=12600,
                    points_next_expiry=date(2026, 12, 5))
    offer = {"offer_id": "of_1", "campaign": "c", "campaign_name": "c", "variant": "A",
             "channel": "sms", "send_at": "2026-11-23T10:00:00+08:00"}
    return {"customer": customer, "offer": offer, "reward": reward,
            "program": {"name": "星享会员", "currency": "CNY", "timezone": "Asia/Shanghai"}}
