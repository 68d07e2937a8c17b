"""preview --campaign and --diff say what a marketer means (issue 19)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from cli import main
from engine.app.demo import DEMO_AS_OF, build_demo_workspace


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return build_demo_workspace(tmp_path_factory.mktemp("example") / "ws", 1500)


def preview_json(*args) -> dict:
    result = CliRunner().invoke(main, ["preview", *map(str, args), "--as-of", DEMO_AS_OF, "--format", "json",
                                       "--sample", "1"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_one_campaign_is_shown_as_it_fares_within_the_whole_programme(example):
    full = {c["id"]: c for c in preview_json(example)["campaigns"]}
    lost = [c for c in full.values() if c["funnel"]["arbitration"] < c["funnel"]["holdout"]]
    assert lost, "some campaign of the example loses customers to arbitration"
    campaign = lost[0]["id"]
    only = preview_json(example, "--campaign", campaign)
    assert [c["id"] for c in only["campaigns"]] == [campaign] and only["shown"] == [campaign]
    assert only["campaigns"][0]["funnel"] == full[campaign]["funnel"]
    assert only["campaigns"][0]["offers"] == full[campaign]["offers"] == only["total_offers"]
    text = CliRunner().invoke(main, ["preview", str(example), "--as-of", DEMO_AS_OF, "--campaign", campaign])
    assert "decided together with every campaign" in text.output


def test_diff_goes_from_the_other_rules_before_to_this_workspace_after(example, tmp_path):
    before = tmp_path / "main-rules"
    shutil.copytree(example, before)
    rules = before / "rules" / "campaigns_lifecycle.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("segment: new\n", "segment: new\n    where: false\n"),
                     encoding="utf-8")
    data = preview_json(example, "--diff", before)
    welcome = next(d for d in data["diff"] if d["campaign"] == "welcome_pack")
    mine = next(c for c in data["campaigns"] if c["id"] == "welcome_pack")
    assert welcome["before"] == 0 and welcome["after"] == mine["offers"] > 0
    assert welcome["added"] == welcome["after"] and welcome["removed"] == 0
    assert welcome["cost_before"] == 0 and welcome["cost_after"] == welcome["cost_change"] == pytest.approx(
        mine["cost"], abs=0.01)
    text = CliRunner().invoke(main, ["preview", str(example), "--as-of", DEMO_AS_OF, "--diff", str(before)])
    assert "Before: the rules given with --diff; after: this workspace's rules." in text.output
    assert f"0 → {welcome['after']}" in text.output
