"""The order a budget keeps candidates in (rank_by highest first, missing last, then the stable
hash of the customer, then the firing key), and the order offers come out in, are those of
pandas' stable sort, whatever the keys hold (missing ranks, ties, text)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data.keys import sort_order
from engine.decide.budgets import budget_sorted

rows = st.lists(st.tuples(st.sampled_from([2.0, 1.0, 0.0, -1.5, float("nan")]),
                          st.sampled_from([0.25, 0.5, 0.75]),
                          st.sampled_from(["milestone:C1:x", "milestone:C2:x", "birthday:C1:y", "生日:C3:z"]),
                          st.sampled_from(["C1", "C2", "会员3", None])),
                max_size=40)


@given(rows, st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_budget_and_offer_orders_are_pandas_stable_sort(values, random):
    frame = pd.DataFrame(values, columns=["rank", "tiebreak", "firing_key", "customer_id"])
    frame = frame.astype({"firing_key": "str", "customer_id": "str", "rank": float, "tiebreak": float})
    shuffled = list(range(len(frame)))
    random.shuffle(shuffled)
    frame.index = np.array(shuffled, dtype=np.int64) + 10        # an index out of order: positions count
    expected = frame.sort_values(["rank", "tiebreak", "firing_key"], ascending=[False, True, True],
                                 na_position="last", kind="stable")
    assert budget_sorted(frame).index.equals(expected.index)
    by_customer = frame.sort_values(["customer_id", "firing_key", "rank"], na_position="last", kind="stable")
    order = sort_order(frame, [("customer_id", True), ("firing_key", True), ("rank", True)])
    assert frame.take(order).index.equals(by_customer.index)
