"""Stable assignment of holdouts and variants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.decide.assignment import assign_variants, in_holdout, stable_fraction

ROOT = Path(__file__).resolve().parents[2]
IDS = pd.Series([f"C{i:05d}" for i in range(2000)] + ["王芳", "", "12345", "c00001"])

customer_ids = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True)


def test_fraction_is_in_unit_interval_and_spread():
    values = stable_fraction(IDS, "loyalty", "holdout:global")
    assert values.shape == (len(IDS),)
    assert ((values >= 0) & (values < 1)).all()
    assert 0.45 < values.mean() < 0.55
    assert len(np.unique(values)) == len(IDS)


def test_same_in_another_process():
    code = ("import json, sys; import pandas as pd; from engine.decide.assignment import stable_fraction, assign_variants;"
            "ids = pd.Series(json.loads(sys.stdin.read()));"
            "print(json.dumps([stable_fraction(ids, 'salt', 'holdout:c').tolist(),"
            " assign_variants(ids, 'salt', 'c', ['A', 'B', 'C'], [1, 2, 3]).tolist()]))")
    ids = IDS.iloc[::7].tolist()
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                         cwd=ROOT, check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""})
    fractions, variants = json.loads(out.stdout)
    series = pd.Series(ids)
    assert fractions == stable_fraction(series, "salt", "holdout:c").tolist()
    assert variants == assign_variants(series, "salt", "c", ["A", "B", "C"], [1, 2, 3]).tolist()


@settings(max_examples=40, deadline=None)
@given(customer_ids, st.data())
def test_partitioning_gives_the_same_values(ids, data):
    series = pd.Series(ids)
    cut = data.draw(st.integers(0, len(ids)))
    order = data.draw(st.permutations(range(len(ids))))
    whole = stable_fraction(series, "s", "holdout:x")
    parts = np.concatenate([stable_fraction(series.iloc[:cut], "s", "holdout:x"),
                            stable_fraction(series.iloc[cut:].reset_index(drop=True), "s", "holdout:x")])
    assert whole.tolist() == parts.tolist()
    shuffled = stable_fraction(series.iloc[list(order)], "s", "holdout:x")
    assert shuffled.tolist() == whole[list(order)].tolist()
    variants = assign_variants(series, "s", "x", ["A", "B"], [30, 70])
    assert (np.concatenate([assign_variants(series.iloc[:cut], "s", "x", ["A", "B"], [30, 70]),
                            assign_variants(series.iloc[cut:], "s", "x", ["A", "B"], [30, 70])])
            == variants).all()


def test_ids_of_other_dtypes_hash_like_their_text():
    as_text = stable_fraction(pd.Series(["1", "22", "333"]), "s", "x")
    assert stable_fraction(pd.Series([1, 22, 333]), "s", "x").tolist() == as_text.tolist()
    assert stable_fraction(pd.Series(["1", "22", "333"], dtype="object"), "s", "x").tolist() == as_text.tolist()
    assert stable_fraction(pd.Series(["1", "22", "333"], dtype="string"), "s", "x").tolist() == as_text.tolist()


def test_salt_and_scope_change_the_assignment():
    base = stable_fraction(IDS, "loyalty", "holdout:global")
    assert not np.array_equal(base, stable_fraction(IDS, "other", "holdout:global"))
    assert not np.array_equal(base, stable_fraction(IDS, "loyalty", "holdout:winback"))
    # groups of different scopes are (nearly) independent
    a = in_holdout(IDS, "loyalty", "global", 0.5)
    b = in_holdout(IDS, "loyalty", "winback", 0.5)
    assert 0.2 < (a & b).mean() < 0.3


def test_holdout_share():
    assert not in_holdout(IDS, "s", "global", 0).any()
    assert in_holdout(IDS, "s", "global", 1.0).all()
    share = in_holdout(IDS, "s", "global", 0.1).mean()
    assert 0.08 < share < 0.12
    # a bigger share keeps everyone of the smaller one (same hash, larger threshold)
    small, big = in_holdout(IDS, "s", "c", 0.05), in_holdout(IDS, "s", "c", 0.2)
    assert (big | ~small).all()


def test_variants_follow_weights():
    variants = assign_variants(IDS, "s", "c", ["A", "B", "C"], [50, 25, 25])
    counts = pd.Series(variants).value_counts(normalize=True)
    assert abs(counts["A"] - 0.5) < 0.04 and abs(counts["B"] - 0.25) < 0.04 and abs(counts["C"] - 0.25) < 0.04
    assert set(assign_variants(IDS, "s", "c", ["only"], [3])) == {"only"}
    assert assign_variants(IDS, "s", "c", [], []).tolist() == [""] * len(IDS)
    # the assignment is the same fraction split by cumulative weights
    fraction = stable_fraction(IDS, "s", "variant:c")
    assert (variants[fraction < 0.5] == "A").all()
    assert (variants[(fraction >= 0.5) & (fraction < 0.75)] == "B").all()
    assert (variants[fraction >= 0.75] == "C").all()
