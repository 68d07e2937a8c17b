"""Decision trace export: one row per customer and campaign with the stage that decided,
read back with pandas the way an analyst would."""

from pathlib import Path

import pandas as pd
import pytest

from engine import Workspace
from engine.app.preview import write_preview_trace
from engine.app.trace import trace_frame, write_trace
from engine.data.sampledata import copy_example_programme, write_sample_workspace
from engine.decide.evaluation import STAGES

AS_OF = "2026-11-23T10:00:00+08:00"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The example programme on 300 sample customers, where the CRM export lost the SMS
    consent of every customer in Shanghai (the question the trace must answer)."""
    root = tmp_path_factory.mktemp("trace") / "ws"
    write_sample_workspace(root, customers=300)
    copy_example_programme(root)
    path = root / "data" / "customers.csv"
    customers = pd.read_csv(path, dtype=str, keep_default_na=False)
    customers.loc[customers["city"] == "上海", "sms_opt_in"] = "False"
    customers.loc[customers.index[-1], "city"] = "=HYPERLINK(\"http://x.example\")"
    customers.to_csv(path, index=False)
    return root


@pytest.fixture(scope="module")
def preview(workspace):
    return Workspace(workspace).preview(AS_OF, trace=True)


def test_why_was_nobody_in_shanghai_targeted(preview, tmp_path):
    path = tmp_path / "trace.parquet"
    rows = write_preview_trace(preview, path)
    trace = pd.read_parquet(path)
    assert len(trace) == rows == 300 * len(preview.campaigns)
    winback = trace[trace["campaign"] == "winback_at_risk"]
    shanghai = winback[winback["city"] == "上海"]
    elsewhere = winback[winback["city"] != "上海"]
    assert len(shanghai) > 20 and (elsewhere["stage"] == "offers").sum() > 0
    # the answer: every Shanghai member who fired was stopped at consent
    assert set(shanghai["stage"]) == {"segment", "consent"}
    assert set(shanghai.loc[shanghai["stage"] == "consent", "outcome"]) == {"stopped"}
    assert set(shanghai.loc[shanghai["stage"] == "segment", "outcome"]) == {"not in segment"}
    # email campaigns still reach Shanghai
    assert ((trace["city"] == "上海") & (trace["stage"] == "offers")).any()


def test_the_trace_adds_up_to_the_funnel(preview):
    trace = trace_frame(preview._evaluation, preview._features)
    order = {stage: i for i, stage in enumerate(STAGES)}
    for campaign in preview.campaigns:
        mine = trace[trace["campaign"] == campaign.id]
        reached = mine["stage"].map(order)
        for stage in STAGES[:-1]:   # passed a stage = decided at a later one
            assert (reached > order[stage]).sum() == campaign.funnel[stage], (campaign.id, stage)
        offers = mine[mine["stage"] == "offers"]
        assert len(offers) == campaign.offers == campaign.funnel["offers"]
        assert (offers["outcome"] == "offer").all() and offers["firing_key"].str.startswith(campaign.id).all()
        assert mine.loc[mine["stage"] != "offers", "cost"].isna().all()


def test_variants_and_costs_of_offers_are_in_the_trace(preview):
    trace = trace_frame(preview._evaluation, preview._features)
    winback = trace[(trace["campaign"] == "winback_at_risk") & (trace["stage"] == "offers")]
    assert set(winback["variant"]) <= {"A", "B"} and len(winback)
    assert set(winback["cost"].round(2)) <= {25.0, 32.0}
    held = trace[(trace["campaign"] == "winback_at_risk") & (trace["stage"] == "holdout")]
    assert (held["outcome"] == "held out").all()


def test_csv_trace_is_spreadsheet_safe(preview, tmp_path):
    path = tmp_path / "out" / "trace.csv"
    rows = write_trace(preview._evaluation, preview._features, path)
    trace = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert len(trace) == rows
    cities = set(trace["city"])
    assert "'=HYPERLINK(\"http://x.example\")" in cities
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cities)
    assert set(trace.columns) >= {"customer_id", "city", "tier", "campaign", "outcome", "stage", "variant"}


def test_a_preview_without_trace_cannot_be_exported(workspace):
    plain = Workspace(workspace).preview(AS_OF)
    with pytest.raises(ValueError, match="trace=True"):
        trace_frame(plain._evaluation, plain._features)
