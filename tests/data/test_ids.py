"""Linking orders to customers and finding duplicate ids, whatever the ids look like.

Ids shaped like one prefix and a fixed number of digits ("C000123", "100234") are compared
as numbers (sources._Numbered); every other id as text. Either way an order belongs to the
customer whose id is the same text, and two rows with the same text are duplicates: ids
that are equal as numbers but not as text ("C01" and "C1", "00042" and "042") never mix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine.config.model import ContactPolicy, Settings, SourceDef
from engine.data.sources import load_tables
from engine.errors import DataError

PREFIXES = ["", "C", "VIP-", "会员"]


@st.composite
def ids(draw, prefix: str, width: int) -> str:
    """Mostly ids of the programme's shape, some near misses."""
    number = draw(st.integers(0, 10 ** width - 1))
    kind = draw(st.sampled_from(["shaped"] * 6 + ["short", "long", "other_prefix", "letter", "non_ascii_digit"]))
    text = f"{number:0{width}d}"
    if kind == "short":
        text = text[1:] or "0"
    elif kind == "long":
        text = "0" + text
    elif kind == "other_prefix":
        return "X" + text
    elif kind == "letter":
        text = text[:-1] + "a"
    elif kind == "non_ascii_digit":
        text = text[:-1] + "٣"
    return prefix + text


@st.composite
def programmes(draw):
    prefix = draw(st.sampled_from(PREFIXES))
    width = draw(st.integers(1, 4))
    customers = draw(st.lists(ids(prefix, width), min_size=1, max_size=30, unique=True))
    known = st.sampled_from(customers)
    orders = draw(st.lists(st.one_of(known, known, ids(prefix, width)), min_size=1, max_size=60))
    return customers, orders


def _settings(root: Path, customers: list[str], orders: list[str]) -> Settings:
    (root / "customers.csv").write_text("customer_id\n" + "".join(f"{c}\n" for c in customers), encoding="utf-8")
    (root / "orders.csv").write_text("order_id,customer_id,timestamp,amount\n" + "".join(
        f"{number},{c},2024-01-01,1\n" for number, c in enumerate(orders)), encoding="utf-8")
    return Settings(name="t", timezone="Asia/Shanghai", currency="CNY", default_locale="zh-CN",
                    data={"customers": SourceDef("customers", path=Path("customers.csv")),
                          "orders": SourceDef("orders", path=Path("orders.csv"))},
                    state_path=Path("state.db"), contact_policy=ContactPolicy(), holdout=0.0, channels={})


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(programmes())
def test_each_order_goes_to_the_customer_with_the_same_id_text(tmp_path, programme):
    customers, orders = programme
    tables = load_tables(_settings(tmp_path, customers, orders), tmp_path)
    linked = tables.orders
    # every kept order sits with the customer of exactly its id; the others are unknown customers
    assert list(tables.customers["customer_id"].iloc[linked["cust_code"]]) == list(linked["customer_id"])
    assert list(linked["customer_id"]) == [c for c in orders if c in set(customers)]
    dropped = sum(c not in set(customers) for c in orders)
    assert any(f"{dropped} order(s) for unknown customers dropped" in w for w in tables.warnings) == (dropped > 0)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PREFIXES), st.integers(1, 3), st.data())
def test_duplicate_ids_are_found_as_text(tmp_path, prefix, width, data):
    customers = data.draw(st.lists(ids(prefix, width), min_size=2, max_size=25))
    settings = _settings(tmp_path, customers, [customers[0]])
    if len(set(customers)) == len(customers):
        assert list(load_tables(settings, tmp_path).customers["customer_id"]) == customers
    else:
        with pytest.raises(DataError, match="duplicate customer_id"):
            load_tables(settings, tmp_path)


def test_numbers_equal_but_texts_different_are_different_customers(tmp_path):
    settings = _settings(tmp_path, ["C01", "C1", "0042", "042"], ["C1", "042", "C001", "42"])
    tables = load_tables(settings, tmp_path)
    assert list(tables.orders["customer_id"]) == ["C1", "042"]
    assert list(tables.orders["cust_code"]) == [1, 3]


def test_numbered_ids_far_apart_link_and_repeat_like_any_others(tmp_path):
    customers = ["C100000000000000001", "C000000000000000007", "C999999999999999999"]
    tables = load_tables(_settings(tmp_path, customers, ["C999999999999999999", "C000000000000000007", "C7"]),
                         tmp_path)
    assert list(tables.orders["cust_code"]) == [2, 1]
    with pytest.raises(DataError, match="duplicate customer_id.*'C000000000000000007' \\(rows 3, 5\\)"):
        load_tables(_settings(tmp_path, customers + ["C000000000000000007"], ["C7"]), tmp_path)
