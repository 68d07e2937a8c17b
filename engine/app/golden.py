"""Golden tests (`loyalty test`): fixture customers, an instant, and what must happen to them.

A golden file (``tests/*.yaml`` of a workspace) describes customers (their columns, orders
and events, or feature values directly), an ``as_of``, optionally earlier runs and contact
history, and per customer what the rules must decide. It runs through the same pipeline as
a preview (data loaded from the fixture, features, evaluation with the decision trace,
rendering) and each failed expectation is reported at the fixture's file:line with the
stage that decided and every condition's value.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from engine.app.golden_fixtures import fixture_contacts, fixture_features, fixture_tables, unknown_features
from engine.app.preview import explain_customer
from engine.app.replay import MemoryState
from engine.app.trace import trace_frame
from engine.app.validation import load_workspace
from engine.config.model import LoadedWorkspace
from engine.config.rulefiles import SourceMap, load_yaml
from engine.config.schema import did_you_mean
from engine.data.features import compute_features
from engine.decide.evaluation import STAGES, evaluate
from engine.errors import LoyaltyError, Problem
from engine.execution.pipeline import build_messages, parse_as_of
from engine.messages.offers import make_renderer

STOP_STAGES = [s for s in STAGES if s != "offers"]
_ACTIVITY = {"type": "object", "properties": {"at": {}, "days_ago": {"type": "number"}},
             "oneOf": [{"required": ["at"]}, {"required": ["days_ago"]}]}
_EXPECTATION = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {
        "offer": {"type": "string", "description": "the campaign whose offer the customer must get"},
        "variant": {"type": "string"},
        "channel": {"type": "string"},
        "points": {"type": "number"},
        "text_contains": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "text_excludes": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "no_offer": {"oneOf": [{"type": "boolean"}, {"type": "string"},
                               {"type": "array", "items": {"type": "string"}}]},
        "suppressed_by": {"enum": STOP_STAGES},
        "campaign": {"type": "string", "description": "with suppressed_by: the campaign concerned"},
        "points_balance": {"type": "number", "description": "the member's points balance at as_of"},
        "points_expiring_30d": {"type": "number", "description": "the member's points expiring within 30 days"},
        "tier": {"type": ["string", "null"], "description": "the member's tier at as_of (after the run's moves)"},
    },
}
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["as_of", "customers"],
    "properties": {
        "description": {"type": "string"},
        "as_of": {"description": "the instant of the run under test"},
        "previous_runs": {"type": "array", "items": {},
                          "description": "earlier runs replayed in memory first (contacts, triggers)"},
        "campaigns": {"type": "array", "items": {"type": "string"}},
        "defaults": {"type": "object", "description": "customer columns every customer gets unless set"},
        "customers": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {
                "id": {"type": ["string", "integer"]},
                "orders": {"type": "array", "items": _ACTIVITY},
                "events": {"type": "array", "items": {**_ACTIVITY, "required": ["type"]}},
                "redemptions": {"type": "array", "items": {**_ACTIVITY, "required": ["points"]},
                                "description": "points the member spent (the point_redemptions table)"},
                "contacts": {"type": "array", "items": {"type": "object", "required": ["campaign"],
                                                        "properties": {"campaign": {"type": "string"}}}},
                "features": {"type": "object"},
                "expect": {"oneOf": [{"const": "no_offer"}, _EXPECTATION, {
                    "type": "array", "minItems": 1,
                    "items": {"oneOf": [{"const": "no_offer"}, _EXPECTATION]}}]},
            },
            "required": ["id", "expect"],
        }},
    },
}
_VALIDATOR = Draft202012Validator(SCHEMA)


@dataclass
class Failure:
    file: str
    line: int
    message: str
    trace: list[str] = field(default_factory=list)   # the decision trace, one line each

    def __str__(self) -> str:
        return "\n".join([f"{self.file}:{self.line}: {self.message}"] + [f"    {t}" for t in self.trace])


@dataclass
class GoldenResult:
    passed: int = 0
    failed: list[Failure] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict:
        return {"passed": self.passed, "failed": [dataclasses.asdict(f) for f in self.failed],
                "files": self.files, "ok": self.ok}


def golden_files(root: Path, paths=None) -> list[Path]:
    """``tests/*.yaml`` of the workspace, or the given files and folders."""
    if not paths and not (Path(root) / "tests").is_dir():
        return []
    chosen = [Path(p) for p in paths] if paths else [Path(root) / "tests"]
    files: list[Path] = []
    for path in chosen:
        if path.is_dir():
            files += sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        elif path.exists():
            files.append(path)
        else:
            raise LoyaltyError(f"no golden test file or folder {path}")
    return files


def run_golden_tests(root: Path | str, paths=None) -> GoldenResult:
    """Run every golden file; a file that cannot load is one failure at its line."""
    workspace = load_workspace(root)
    result = GoldenResult()
    for path in golden_files(workspace.root, paths):
        display = _display(path, workspace.root)
        result.files.append(display)
        data, smap, problems = load_yaml(path, display)
        problems = problems or _check(data, smap, workspace)
        if problems:
            result.failed += [Failure(p.file, p.line, p.message + (f" ({p.hint})" if p.hint else ""))
                              for p in problems]
            continue
        try:
            passed, failures = _run_file(workspace, data, smap)
        except LoyaltyError as exc:
            result.failed.append(Failure(display, 1, f"could not run: {exc}"))
            continue
        result.passed += passed
        result.failed += failures
    return result


def _display(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- checks


def validate_golden_document(data, smap: SourceMap) -> list[Problem]:
    """The shape of a golden test file (no workspace needed): every problem at its line."""
    if not isinstance(data, dict):
        return [smap.problem((), "a golden test file is a mapping with as_of: and customers:")]
    problems = []
    for error in _VALIDATOR.iter_errors(data):
        error = best_match([error])   # of oneOf's alternatives, the one that came closest
        where = ".".join(str(p) for p in error.absolute_path) or "the file"
        message = error.message
        if error.validator in ("oneOf", "anyOf") and "expect" in error.absolute_path:
            message = (f"{error.instance!r} is not an expectation: write no_offer, or a mapping of "
                       f"{', '.join(_EXPECTATION['properties'])}")
        problems.append(smap.problem(tuple(error.absolute_path), f"{where}: {message}"))
    return sorted(problems, key=lambda p: (p.line, p.column))


def _check(data, smap: SourceMap, workspace: LoadedWorkspace) -> list[Problem]:
    problems = validate_golden_document(data, smap)
    if problems:
        return problems
    program = workspace.program
    for i, customer in enumerate(data["customers"]):
        expects = customer["expect"] if isinstance(customer["expect"], list) else [customer["expect"]]
        for j, expect in enumerate(expects):
            if not isinstance(expect, dict):
                continue
            base = ("customers", i, "expect") + ((j,) if isinstance(customer["expect"], list) else ())
            for name in sorted(_named(expect)):
                if name not in program.campaigns:
                    problems.append(smap.problem(base, f"no campaign '{name}'", did_you_mean(name, program.campaigns)))
    for name in data.get("campaigns") or []:
        if name not in program.campaigns:
            problems.append(smap.problem(("campaigns",), f"no campaign '{name}'"))
    return problems


# --------------------------------------------------------------------------- running a file


@dataclass
class _Outcome:
    """What the rules decided in the run under test, in the forms expectations look at."""

    evaluation: object
    features: pd.DataFrame
    stages: pd.DataFrame          # customer_id, campaign, stage (engine.app.trace.trace_frame)
    records: list[dict]           # rendered offers
    errors: list[dict]            # render errors
    state: MemoryState            # what the previous runs left (recorded firings)


def _run_file(workspace: LoadedWorkspace, data: dict, smap: SourceMap) -> tuple[int, list[Failure]]:
    settings = workspace.settings
    as_of = parse_as_of(str(data["as_of"]), settings.timezone)
    campaigns = data.get("campaigns")
    with tempfile.TemporaryDirectory(prefix="loyalty-golden-") as folder:
        tables = fixture_tables(workspace, data, as_of, Path(folder))
    probe = compute_features(tables, workspace.program, settings, as_of)
    unknown = unknown_features(data, probe, smap)
    if unknown:
        return 0, [Failure(smap.file, line, message) for line, message in unknown]
    state = MemoryState()
    state.add_contacts(fixture_contacts(data, as_of, settings.timezone))
    for earlier in sorted(parse_as_of(str(t), settings.timezone) for t in data.get("previous_runs") or []):
        if earlier >= as_of:
            line, _ = smap.value_position(("previous_runs",))
            return 0, [Failure(smap.file, line, f"previous run {earlier.isoformat()} is not before as_of")]
        context = state.context(workspace, earlier)
        features = fixture_features(workspace, tables, data, earlier, context.points, context.tiers)
        evaluation = evaluate(workspace, tables, features, context, campaigns)
        state.record(evaluation, evaluation.edge_state, workspace)
    context = state.context(workspace, as_of)
    features = fixture_features(workspace, tables, data, as_of, context.points, context.tiers)
    evaluation = evaluate(workspace, tables, features, context, campaigns, trace=True)
    records, errors = build_messages(workspace, evaluation, features, make_renderer(workspace))
    stages = trace_frame(evaluation, features)[["customer_id", "campaign", "stage"]]
    outcome = _Outcome(evaluation, features, stages, records, errors, state)
    passed, failures = 0, []
    for i, customer in enumerate(data["customers"]):
        expects = customer["expect"] if isinstance(customer["expect"], list) else [customer["expect"]]
        for j, expect in enumerate(expects):
            path = ("customers", i, "expect") + ((j,) if isinstance(customer["expect"], list) else ())
            problem = _judge(str(customer["id"]), expect, outcome)
            if problem is None:
                passed += 1
                continue
            line, _ = smap.value_position(path)
            trace = _trace(workspace, outcome, str(customer["id"]), _named(expect))
            failures.append(Failure(smap.file, line, f"customer {customer['id']}: {problem}", trace))
    return passed, failures


# --------------------------------------------------------------------------- judging


def _judge(customer_id: str, expect, outcome: _Outcome) -> str | None:
    """None when the expectation holds, else what went wrong, in a sentence."""
    offers = outcome.evaluation.offers
    mine = offers[offers["customer_id"].astype(str) == customer_id] if len(offers) else offers
    got = sorted(mine["campaign"]) if len(mine) else []
    got_text = ", ".join(got) if got else "no offer"
    if expect == "no_offer":
        expect = {"no_offer": True}
    if expect.get("no_offer") is True and got:
        return f"expected no offer, got {got_text}"
    refused = _names(expect.get("no_offer"))
    if set(refused) & set(got):
        return f"expected no offer from {', '.join(sorted(set(refused) & set(got)))}, got {got_text}"
    if "offer" in expect:
        campaign = expect["offer"]
        if campaign not in got:
            return f"expected offer {campaign}, got {got_text}"
        offer = mine[mine["campaign"] == campaign].iloc[0]
        for key in ("variant", "channel"):
            if key in expect and str(offer[key]) != str(expect[key]):
                return f"expected {campaign} {key} {expect[key]}, got {offer[key]}"
        if "points" in expect and float(offer["points"]) != float(expect["points"]):
            return f"expected {campaign} to credit {expect['points']:g} points, got {float(offer['points']):g}"
        problem = _text(customer_id, campaign, expect, outcome.records, outcome.errors)
        if problem:
            return problem
    if "suppressed_by" in expect:
        return _suppressed(customer_id, expect["suppressed_by"], expect.get("campaign"), outcome, got_text)
    if "tier" in expect:
        row = outcome.features[outcome.features["customer_id"].astype(str) == customer_id]
        tier = row["tier"].iloc[0] if len(row) else None
        tier = None if pd.isna(tier) else str(tier)
        if tier != expect["tier"]:
            return f"expected tier {expect['tier']}, got {tier}"
    for feature in ("points_balance", "points_expiring_30d"):
        if feature in expect:
            row = outcome.features[outcome.features["customer_id"].astype(str) == customer_id]
            value = float(row[feature].iloc[0]) if len(row) else 0.0
            if value != float(expect[feature]):
                return f"expected {feature} {expect[feature]:g}, got {value:g}"
    return None


def _suppressed(customer_id: str, stage: str, campaign: str | None, outcome: _Outcome,
                got_text: str) -> str | None:
    """``suppressed_by: STAGE`` holds when the campaign (or, without one, any campaign) stopped there."""
    rows = outcome.stages[outcome.stages["customer_id"] == customer_id]
    if campaign:
        rows = rows[rows["campaign"] == campaign]
    if (rows["stage"] == stage).any():
        return None
    if campaign:
        found = rows["stage"].iloc[0] if len(rows) else "not evaluated"
        found = "got the offer" if found == "offers" else f"stopped at {found}"
        return f"expected {campaign} to be stopped at {stage}, but it {found}" + \
            (f" (offers: {got_text})" if got_text != "no offer" else "")
    stopped = rows[~rows["stage"].isin(["segment", "trigger", "offers"])]
    found = ", ".join(f"{c} at {s}" for c, s in zip(stopped["campaign"], stopped["stage"]))
    found = f"got {found}" if found else "but none that fired was stopped"
    return f"expected a campaign to be stopped at {stage}, {found} (offers: {got_text})"


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []


def _text(customer_id, campaign, expect, records, errors) -> str | None:
    wanted = _names(expect.get("text_contains"))
    banned = _names(expect.get("text_excludes"))
    if not wanted and not banned:
        return None
    record = next((r for r in records if str(r["customer_id"]) == customer_id and r["campaign"] == campaign), None)
    if record is None:
        error = next((e["error"] for e in errors if str(e["customer_id"]) == customer_id
                      and e["campaign"] == campaign), "not rendered")
        return f"the {campaign} message did not render: {error}"
    text = "\n".join(str(record.get(k) or "") for k in ("subject", "body"))
    for fragment in wanted:
        if fragment not in text:
            return f"the {campaign} message does not contain '{fragment}': {text.strip()[:200]!r}"
    for fragment in banned:
        if fragment in text:
            return f"the {campaign} message contains '{fragment}': {text.strip()[:200]!r}"
    return None


# --------------------------------------------------------------------------- the decision trace


def _trace(workspace, outcome: _Outcome, customer_id: str, focus: set[str]) -> list[str]:
    """The decision trace of one customer: the stage that decided each campaign that got past
    its segment (or is named in the expectation), with every condition's value for the named ones."""
    explained = explain_customer(workspace, outcome.evaluation, outcome.features, customer_id)
    lines = []
    for item in explained.get("campaigns", []):
        if item["stage"] == "segment" and item["campaign"] not in focus:
            continue
        result = f"offer (variant {item['variant']})" if item["outcome"] == "offer" and item["variant"] \
            else item["outcome"]
        line = f"{item['campaign']}: {result} [stage: {item['stage']}]"
        if item["stage"] == "trigger":
            line += _already_acted_on(outcome.state, item["campaign"], customer_id,
                                      workspace.settings.timezone)
        lines.append(line)
        if item["campaign"] in focus:
            lines += [f"  {c['where']}: {c['expression']} = {_show(c['value'])}" for c in item["conditions"]]
            lines += _trigger_lines(workspace.program.campaigns[item["campaign"]], explained)
    return lines


# the feature each trigger kind looks at, shown beside the trigger in a failure's trace
_TRIGGER_FEATURES = {"inactive_for": "days_since_last_order", "birthday": "days_to_birthday"}


def _trigger_lines(campaign, explained: dict) -> list[str]:
    trigger = campaign.trigger
    if trigger.kind == "always":
        return []
    if trigger.kind == "earned":         # an earn rule's message: the rule, not its whole definition
        return [f"  when: a credit of the earn rule {trigger.params['rule'].name}"]
    params = ", ".join(f"{k}: {_show(v)}" for k, v in trigger.params.items())
    line = f"  when: {trigger.kind}" + (f" {{{params}}}" if params else "")
    feature = _TRIGGER_FEATURES.get(trigger.kind)
    if feature and feature in explained.get("features", {}):
        line += f"; {feature} = {_show(explained['features'][feature])}"
    return [line]


def _already_acted_on(state: MemoryState, campaign: str, customer_id: str, timezone: str) -> str:
    """Why a trigger did not fire again: the same firing was acted on by an earlier run."""
    prefix = f"{campaign}:{customer_id}:"
    earlier = sorted((at, key) for key, at in state.recorded.items() if key.startswith(prefix))
    if not earlier:
        return ""
    at, key = earlier[-1]
    local = pd.Timestamp(at).tz_convert(timezone).isoformat()
    return f" (the same firing {key} was already acted on by the run at {local})"


def _named(expect) -> set[str]:
    if not isinstance(expect, dict):
        return set()
    names = {expect.get("offer"), expect.get("campaign"), *_names(expect.get("no_offer"))}
    return {n for n in names if n}


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
