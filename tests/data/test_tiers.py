"""Stored tiers (issue 17): a member's tier is state, reached by qualify:, kept by retain: at each
review, lost after the grace, lent by a campaign's trial; recorded with its history in the state
database, in the run's transaction. Real runs on hand-built workspaces in tmp_path."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cli import main
from engine import Workspace
from engine.app.scaffold import init_workspace
from engine.app.validation import validate_workspace
from engine.errors import RuleError
from engine.execution.pipeline import parse_as_of, prepare
from engine.state.store import StateStore

TZ = "Asia/Shanghai"
START = pd.Timestamp("2026-12-01")
FEATURES = "features:\n  spend_10d: {sum: amount, from: orders, within: 10d}\n"
TIERS = """\
tiers:
  platinum: {qualify: spend_10d >= 20000, retain: spend_10d >= 15000}
  gold:     {qualify: spend_10d >= 8000, retain: spend_10d >= 6000}
  silver:   {qualify: spend_10d >= 2000}
  bronze:   {where: true}
tier_review: {every: 5d, grace: 3d, step_down: STEP}
"""
TRIAL = """\
gold_trial:
  where: tier == "bronze" and orders_total >= 1
  reward: {tier: {to: gold, for: 7d}}
  channel: sms
  template: t
  cooldown: 365d
"""


def day(n: int, hour: int = 10) -> str:
    """Day ``n`` of the scenarios (day 0 is 1 December 2026), at ``hour`` in Shanghai."""
    return f"{(START + pd.Timedelta(days=n)).date()}T{hour:02d}:00:00+08:00"


def day_of(as_of: str) -> int:
    return (pd.Timestamp(as_of).tz_convert(TZ).tz_localize(None).normalize() - START).days


def programme(root: Path, members: list[str], orders: list[tuple[str, int, float]], campaigns: str = "",
              step: str = "one", tiers: str = TIERS, extra: str = "", no_sms: tuple = ()) -> Workspace:
    """A workspace whose members spend ``orders`` (member, day, amount: at 09:00 that day)."""
    init_workspace(root)
    (root / "loyalty.yaml").write_text(textwrap.dedent(f"""\
        program: {{name: Test, timezone: {TZ}, currency: CNY, locale: en-US}}
        data:
          customers: {{path: data/customers.csv}}
          orders:    {{path: data/orders.csv}}
          events:    {{path: data/events.csv}}
        contact_policy: {{max_messages: 100, per: 1d}}
        channels:
          sms: {{send: file, path: outbox/sms.jsonl}}
        """), encoding="utf-8")
    for old in (root / "rules").glob("*.yaml"):
        old.unlink()
    listed = "campaigns:\n" + textwrap.indent(textwrap.dedent(campaigns), "  ") if campaigns else "campaigns: {}\n"
    (root / "rules" / "programme.yaml").write_text(FEATURES + listed + extra, encoding="utf-8")
    (root / "rules" / "tiers.yaml").write_text(tiers.replace("STEP", step), encoding="utf-8")
    (root / "templates" / "t.sms.j2").write_text("Hi {{ customer.name }}\n", encoding="utf-8")
    rows = "".join(f"{m},N{m},1380000{i:04d},{str(m not in no_sms).lower()}\n" for i, m in enumerate(members))
    (root / "data" / "customers.csv").write_text("customer_id,name,phone,sms_opt_in\n" + rows, encoding="utf-8")
    (root / "data" / "orders.csv").write_text("order_id,customer_id,timestamp,amount\n" + "".join(
        f"O{i},{m},{day(d, 9)},{amount}\n" for i, (m, d, amount) in enumerate(orders)), encoding="utf-8")
    (root / "data" / "events.csv").write_text("event_id,customer_id,timestamp,type\n", encoding="utf-8")
    return Workspace(root)


def run_days(ws: Workspace, days, **options) -> list[dict]:
    return [ws.run(day(n), deliver=False, **options).tier_moves for n in days]


def moves(ws: Workspace, member: str) -> list[tuple]:
    """(day, from, to, reason) of each change of the member's tier state."""
    return [(day_of(c["as_of"]), c["from_tier"], c["to_tier"], c["reason"]) for c in ws.tier_history(member)]


def offers_of(ws: Workspace, member: str) -> list[dict]:
    """The offers in the member's history (which also lists their tier changes)."""
    return [row for row in ws.history(member) if row["kind"] == "offer"]


def tables(root: Path) -> tuple[list[tuple], list[tuple]]:
    """Both tier tables, without the run ids (which differ between two workspaces)."""
    with sqlite3.connect(root / "state" / "loyalty.db") as conn:
        history = conn.execute("SELECT customer_id, from_tier, to_tier, reason, as_of, seq, since, review_at, "
                               "grace_until, trial_until, trial_from FROM tier_history "
                               "ORDER BY customer_id, as_of_utc, seq").fetchall()
        members = conn.execute("SELECT customer_id, tier, since, review_at, grace_until, trial_until, trial_from, "
                               "as_of_utc, seq FROM member_tiers ORDER BY customer_id").fetchall()
    return history, members


def features_at(ws: Workspace, as_of: str) -> pd.DataFrame:
    """The features a run at ``as_of`` sees (the stored tiers after its moves)."""
    workspace = ws.load()
    with StateStore(workspace.settings.state_path) as store:
        return prepare(workspace, parse_as_of(as_of, TZ), store).features.set_index("customer_id")


# --------------------------------------------------------------------------- the rules


def test_qualify_moves_a_member_up_at_the_first_run_where_it_holds(tmp_path):
    ws = programme(tmp_path / "ws", ["M1", "M2"], [("M1", 3, 9000), ("M2", 0, 25000)], campaigns="""\
        gold_welcome:
          when: {becomes: tier == "gold"}
          reward: {message: {}}
          channel: sms
          template: t
        """)
    counts = run_days(ws, range(5))
    assert moves(ws, "M1") == [(0, None, "bronze", "joined"), (3, "bronze", "gold", "qualified")]
    assert moves(ws, "M2") == [(0, None, "platinum", "qualified")]
    assert ws.tier_history("M1")[1]["review_at"] == "2026-12-09"            # day 3 + 5 days
    assert counts[0] == {"up": {}, "down": {}, "joined": {"platinum": 1, "bronze": 1}}
    assert counts[3] == {"up": {"gold": 1}, "down": {}, "joined": {}}
    assert [c for c in counts if any(c.values())] == [counts[0], counts[3]]
    # the run at day 3 saw the tier after its own move: becomes: tier == "gold" fired then
    assert [(row["campaign"], day_of(row["as_of"])) for row in offers_of(ws, "M1")] == [("gold_welcome", 3)]
    seen = features_at(ws, day(4))
    assert seen.loc["M1", "tier"] == "gold" and seen.loc["M1", "tier_since"] == pd.Timestamp("2026-12-04")
    assert seen.loc["M2", "tier_since"] == pd.Timestamp("2026-12-01")
    explained = ws.preview(day(4), customer="M1", sample=0).explanation["features"]
    assert (explained["tier"], explained["tier_since"][:10]) == ("gold", "2026-12-04")


def test_a_member_is_kept_through_the_grace_then_steps_down_one_tier(tmp_path):
    ws = programme(tmp_path / "ws", ["M1"], [("M1", 0, 25000)])
    tiers_seen = {}
    for n in range(20):
        ws.run(day(n), deliver=False)
        if n in (9, 10, 11, 12, 13):
            tiers_seen[n] = features_at(ws, day(n)).loc["M1", "tier"]
    assert moves(ws, "M1") == [
        (0, None, "platinum", "qualified"),
        (5, "platinum", "platinum", "retained"),       # the order is within 10 days: retained
        (10, "platinum", "platinum", "grace"),         # it left the window: 3 days of grace
        (13, "platinum", "gold", "stepped down"),      # retain still fails at the end of the grace
        (18, "gold", "gold", "grace"),
    ]
    assert tiers_seen == {9: "platinum", 10: "platinum", 11: "platinum", 12: "platinum", 13: "gold"}
    rows = {day_of(c["as_of"]): c for c in ws.tier_history("M1")}
    assert (rows[5]["review_at"], rows[10]["grace_until"], rows[13]["review_at"]) == \
        ("2026-12-11", "2026-12-14", "2026-12-19")


def test_retain_holding_again_during_the_grace_keeps_the_tier(tmp_path):
    ws = programme(tmp_path / "ws", ["M1"], [("M1", 0, 25000), ("M1", 11, 16000)])
    run_days(ws, range(15))
    assert moves(ws, "M1") == [(0, None, "platinum", "qualified"), (5, "platinum", "platinum", "retained"),
                               (10, "platinum", "platinum", "grace"), (11, "platinum", "platinum", "retained")]
    assert ws.tier_history("M1")[-1]["review_at"] == "2026-12-16"          # from the review date, not the day


@pytest.mark.parametrize("step, lands", [("one", "gold"), ("to_qualified", "silver")])
def test_step_down_one_tier_or_to_the_highest_tier_still_qualified_for(tmp_path, step, lands):
    ws = programme(tmp_path / "ws", ["M1"], [("M1", 0, 25000), ("M1", 9, 3000)], step=step)
    run_days(ws, range(14))
    assert moves(ws, "M1")[-1] == (13, "platinum", lands, "stepped down")


def test_a_trial_tier_ends_and_returns_the_member(tmp_path):
    ws = programme(tmp_path / "ws", ["M2", "M3"], [("M2", 0, 100), ("M3", 0, 100), ("M3", 7, 2500)],
                   campaigns=TRIAL)
    during = {}
    for n in range(10):
        ws.run(day(n), deliver=False)
        during[n] = dict(features_at(ws, day(n))["tier"])
    assert moves(ws, "M2") == [(0, None, "bronze", "joined"), (0, "bronze", "gold", "campaign gold_trial"),
                               (7, "gold", "bronze", "trial ended")]
    # M3 qualifies for silver while on trial: at its end, silver (higher than before the trial)
    assert moves(ws, "M3") == [(0, None, "bronze", "joined"), (0, "bronze", "gold", "campaign gold_trial"),
                               (7, "gold", "silver", "qualified")]
    assert ws.tier_history("M2")[1]["trial_until"] == "2026-12-08"
    assert [during[n]["M2"] for n in range(10)] == ["bronze"] + ["gold"] * 6 + ["bronze"] * 3
    assert [row["campaign"] for row in offers_of(ws, "M2")] == ["gold_trial"]        # once: cooldown
    offer = offers_of(ws, "M2")[0]
    assert offer["reward"]["for"] == "7d" and offer["reward"]["description"] == "gold for 7 days"


def test_a_permanent_tier_reward_moves_up_only(tmp_path):
    ws = programme(tmp_path / "ws", ["M1", "M2"], [("M1", 0, 100), ("M2", 0, 25000)], campaigns="""\
        to_gold:
          where: orders_total >= 1
          reward: {tier: {to: gold}}
          channel: sms
          template: t
          cooldown: 365d
        """)
    assert run_days(ws, [0])[0] == {"up": {"gold": 1}, "down": {}, "joined": {"platinum": 1, "bronze": 1}}
    assert moves(ws, "M1") == [(0, None, "bronze", "joined"), (0, "bronze", "gold", "campaign to_gold")]
    assert moves(ws, "M2") == [(0, None, "platinum", "qualified")]       # a platinum member is not moved down
    assert ws.tier_history("M1")[1]["review_at"] == "2026-12-06"


def test_without_a_base_tier_members_below_every_tier_hold_none(tmp_path):
    tiers = "tiers:\n  gold: {qualify: spend_10d >= 8000, retain: spend_10d >= 6000}\ntier_review: {every: 5d}\n"
    ws = programme(tmp_path / "ws", ["M1", "M2"], [("M1", 0, 9000)], tiers=tiers)
    counts = run_days(ws, range(11))
    assert moves(ws, "M1") == [(0, None, "gold", "qualified"), (5, "gold", "gold", "retained"),
                               (10, "gold", None, "stepped down")]
    assert moves(ws, "M2") == []
    assert counts[10] == {"up": {}, "down": {"none": 1}, "joined": {}}
    assert pd.isna(features_at(ws, day(10)).loc["M1", "tier"])


# --------------------------------------------------------------------------- recording


def test_a_rerun_at_the_same_instant_records_nothing_twice(tmp_path):
    ws = programme(tmp_path / "ws", ["M1", "M2"], [("M1", 0, 25000), ("M2", 0, 100)], campaigns=TRIAL)
    for n in (0, 5, 10, 13):
        first = ws.run(day(n), deliver=False)
        recorded = tables(tmp_path / "ws")
        again = ws.run(day(n), deliver=False)
        assert not any(again.tier_moves.values()) and tables(tmp_path / "ws") == recorded, n
        assert (again.new_offers, again.already_recorded) == (0, first.new_offers)
    once = programme(tmp_path / "once", ["M1", "M2"], [("M1", 0, 25000), ("M2", 0, 100)], campaigns=TRIAL)
    run_days(once, (0, 5, 10, 13))
    assert tables(tmp_path / "ws") == tables(tmp_path / "once")
    assert moves(ws, "M1") == [(0, None, "platinum", "qualified"), (5, "platinum", "platinum", "retained"),
                               (10, "platinum", "platinum", "grace"), (13, "platinum", "gold", "stepped down")]


def test_a_rerun_of_an_earlier_instant_reads_the_tiers_of_then(tmp_path):
    ws = programme(tmp_path / "ws", ["M1"], [("M1", 0, 25000)])
    run_days(ws, (0, 5, 10, 13))
    before = tables(tmp_path / "ws")
    assert features_at(ws, day(13)).loc["M1", "tier"] == "gold"
    assert features_at(ws, day(11)).loc["M1", "tier"] == "platinum"      # as it was then, not gold
    assert ws.preview(day(13), sample=0).tier_moves == {"up": {}, "down": {"gold": 1}, "joined": {}}
    assert not any(ws.run(day(13), deliver=False).tier_moves.values())   # decided as then: already recorded
    assert tables(tmp_path / "ws") == before


def test_history_lists_the_tier_changes(tmp_path):
    root = tmp_path / "ws"
    ws = programme(root, ["M1"], [("M1", 0, 25000)])
    run_days(ws, (0, 5, 10, 13))
    text = CliRunner().invoke(main, ["history", str(root), "--customer", "M1"])
    assert text.exit_code == 0, text.output
    assert text.output.splitlines() == [
        "2026-12-01T10:00:00+08:00  tier - -> platinum  (qualified, review 2026-12-06)",
        "2026-12-06T10:00:00+08:00  tier platinum -> platinum  (retained, review 2026-12-11)",
        "2026-12-11T10:00:00+08:00  tier platinum -> platinum  (grace, review 2026-12-11, grace until 2026-12-14)",
        "2026-12-14T10:00:00+08:00  tier platinum -> gold  (stepped down, review 2026-12-19)"]
    rows = json.loads(CliRunner().invoke(main, ["history", str(root), "--customer", "M1", "--format", "json"]).output)
    assert [(r["kind"], r["from_tier"], r["to_tier"], r["reason"]) for r in rows] == [
        ("tier_change", None, "platinum", "qualified"), ("tier_change", "platinum", "platinum", "retained"),
        ("tier_change", "platinum", "platinum", "grace"), ("tier_change", "platinum", "gold", "stepped down")]


def test_preview_shows_the_moves_the_run_then_makes(tmp_path):
    ws = programme(tmp_path / "ws", ["M1", "M2", "M3"], [("M1", 0, 25000), ("M2", 0, 100), ("M3", 4, 9000)],
                   campaigns=TRIAL)
    for n in range(15):
        previewed = ws.preview(day(n), sample=0).tier_moves
        assert ws.run(day(n), deliver=False).tier_moves == previewed, n
    result = CliRunner().invoke(main, ["preview", str(tmp_path / "ws"), "--as-of", day(15), "--format", "json"])
    assert json.loads(result.output)["tier_moves"] == ws.preview(day(15)).tier_moves
    table = CliRunner().invoke(main, ["preview", str(tmp_path / "ws"), "--as-of", day(15)]).output
    moved = ws.preview(day(15)).tier_moves
    assert ("Tier moves this run would make: none." if not any(moved.values()) else
            "Tier moves this run would make: ") in table


def test_computed_tiers_are_decided_at_every_run_and_stored_nowhere(tmp_path):
    computed = "tiers:\n  gold: {where: spend_10d >= 8000}\n  bronze: {where: true}\n"
    ws = programme(tmp_path / "ws", ["M1"], [("M1", 0, 9000)], tiers=computed)
    assert ws.preview(day(0), sample=0).tier_moves is None
    assert run_days(ws, (0, 10)) == [{}, {}]
    assert tables(tmp_path / "ws") == ([], [])
    features = features_at(ws, day(10))
    assert features.loc["M1", "tier"] == "bronze" and pd.isna(features.loc["M1", "tier_since"])


def test_points_multiplied_while_platinum_keep_their_double_after_a_step_down(tmp_path):
    points = textwrap.dedent("""\
        points:
          earn:
            purchases: {on: order, amount: floor(order.amount), multiplier: {platinum: 2}}
        """)
    ws = programme(tmp_path / "ws", ["M1"], [("M1", 0, 25000), ("M1", 2, 100), ("M1", 15, 100)], extra=points)
    run_days(ws, range(17))
    assert moves(ws, "M1")[3] == (13, "platinum", "gold", "stepped down")
    # 25,000 earned before the first recorded tier (x1), 100 while platinum (x2), 100 as gold (x1)
    assert features_at(ws, day(17)).loc["M1", "points_balance"] == 25000 + 200 + 100
    member = ws.points(day(17), customer="M1")
    assert member.members["balance"].tolist() == [25300]


# --------------------------------------------------------------------------- rule files


TIER_ERRORS = [
    ("mixed", "tiers:\n  gold: {qualify: spend_10d >= 8000}\n  silver: {where: spend_10d >= 2000}\n",
     "rules/tiers.yaml:3:19: tier 'silver' is computed (where:) but the other tiers are stored (qualify:)"),
    ("base not last", "tiers:\n  bronze: {where: true}\n  gold: {qualify: spend_10d >= 8000}\n",
     "rules/tiers.yaml:2:3: the base tier 'bronze' (where: true) must be the last tier"),
    ("both", "tiers:\n  gold: {qualify: spend_10d >= 8000, where: spend_10d >= 1}\n",
     "rules/tiers.yaml:2:38: a tier takes where: or qualify:, not both"),
    ("retain alone", "tiers:\n  gold: {where: spend_10d >= 8000, retain: spend_10d >= 1}\n",
     "rules/tiers.yaml:2:36: retain: goes with qualify: (stored tiers)"),
    ("reads its tier", "tiers:\n  gold: {qualify: spend_10d >= 8000, retain: days_since(tier_since) < 400}\n",
     "rules/tiers.yaml:2:57: a tier condition cannot use `tier` or `tier_since`"),
    ("review of computed", "tiers:\n  gold: {where: spend_10d >= 8000}\ntier_review: {every: 30d}\n",
     "rules/tiers.yaml:3:1: tier_review: applies to stored tiers (qualify:) only"),
    ("review every 0d", "tiers:\n  gold: {qualify: spend_10d >= 8000}\ntier_review: {every: 0d}\n",
     "rules/tiers.yaml:3:22: tiers cannot be reviewed every 0 days"),
    ("review in hours", "tiers:\n  gold: {qualify: spend_10d >= 8000}\ntier_review: {grace: 36h}\n",
     "rules/tiers.yaml:3:22: '36h' is not a whole number of days"),
    ("unknown step", "tiers:\n  gold: {qualify: spend_10d >= 8000}\ntier_review: {step_down: two}\n",
     "rules/tiers.yaml:3:26: 'two' is not allowed for 'step_down'"),
]


@pytest.mark.parametrize("tiers, expected", [pytest.param(t, e, id=i) for i, t, e in TIER_ERRORS])
def test_tier_rules_that_make_no_sense_are_refused_at_their_line(tmp_path, tiers, expected):
    programme(tmp_path / "ws", ["M1"], [], tiers=tiers)
    result = validate_workspace(tmp_path / "ws")
    assert not result.ok
    assert any(str(p).startswith(expected) for p in result.errors), "\n".join(map(str, result.problems))


def test_a_trial_needs_stored_tiers(tmp_path):
    computed = "tiers:\n  gold: {where: spend_10d >= 8000}\n  bronze: {where: true}\n"
    programme(tmp_path / "ws", ["M1"], [], campaigns=TRIAL, tiers=computed)
    result = validate_workspace(tmp_path / "ws")
    assert any(str(p).startswith("rules/programme.yaml:6:31: a trial (for:) needs stored tiers")
               for p in result.errors), "\n".join(map(str, result.problems))


def test_the_report_counts_the_recorded_tiers(tmp_path):
    ws = programme(tmp_path / "ws", ["M1", "M2"], [("M1", 0, 25000), ("M2", 0, 100)])
    run_days(ws, range(14))
    assert ws.report(end="2026-12-14")["kpis"]["tiers"] == {"platinum": 0, "gold": 1, "silver": 0, "bronze": 1}
    assert ws.report(end="2026-12-05")["kpis"]["tiers"] == {"platinum": 1, "gold": 0, "silver": 0, "bronze": 1}


def test_stored_tiers_may_qualify_on_the_points_they_multiply(tmp_path):
    earn = "points:\n  earn:\n    purchases: {on: order, amount: floor(order.amount), multiplier: {gold: 2}}\n"
    stored = "tiers:\n  gold: {qualify: points_earned_365d >= 8000}\n  bronze: {where: true}\n"
    ws = programme(tmp_path / "stored", ["M1"], [("M1", 0, 9000), ("M1", 2, 100)], tiers=stored, extra=earn)
    run_days(ws, range(4))
    assert moves(ws, "M1") == [(0, None, "gold", "qualified")]
    assert features_at(ws, day(4)).loc["M1", "points_balance"] == 9000 + 200
    computed = "tiers:\n  gold: {where: points_earned_365d >= 8000}\n  bronze: {where: true}\n"
    programme(tmp_path / "computed", ["M1"], [], tiers=computed, extra=earn)
    with pytest.raises(RuleError, match="cycle"):
        Workspace(tmp_path / "computed").run(day(0), deliver=False)


def test_a_review_due_during_a_trial_happens_when_it_ends(tmp_path):
    trial = TRIAL.replace('tier == "bronze" and orders_total >= 1', 'tier == "silver"')
    ws = programme(tmp_path / "ws", ["M1", "M2"], [("M1", -4, 2500), ("M2", 0, 2500), ("M2", 6, 500)],
                   campaigns=trial)
    run_days(ws, range(8))
    # silver's review (day 5) waits for the end of the gold trial (day 7), and then keeps M2 in silver
    # for another 5 days from it; M1, whose spend left the window, gets silver's grace instead
    assert moves(ws, "M2")[1:] == [(0, "silver", "gold", "campaign gold_trial"), (7, "gold", "silver", "trial ended")]
    assert ws.tier_history("M2")[-1]["review_at"] == "2026-12-11"
    assert moves(ws, "M1")[-1] == (7, "gold", "silver", "trial ended")
    assert ws.tier_history("M1")[-1]["grace_until"] == "2026-12-09"


def test_a_tier_reward_moves_the_member_even_without_a_message(tmp_path):
    ws = programme(tmp_path / "ws", ["M1", "M2"], [("M1", 0, 100), ("M2", 0, 100)], campaigns=TRIAL, no_sms=("M2",))
    assert run_days(ws, [0])[0]["up"] == {"gold": 2}
    assert [(o["status"], o["suppressed_reason"]) for o in offers_of(ws, "M2")] == [("suppressed", "consent")]
    assert moves(ws, "M2")[1] == (0, "bronze", "gold", "campaign gold_trial")
    simulated = programme(tmp_path / "sim", ["M1", "M2"], [("M1", 0, 100), ("M2", 0, 100)], campaigns=TRIAL,
                          no_sms=("M2",)).simulate(day(0), day(0), fresh=True)
    assert simulated.tier_moves["up"] == {"gold": 2}
