"""`loyalty init`: a small workspace that validates clean and reads as a tutorial, with
CI, a pre-commit hook and editor support ready, so a rule mistake is caught before it is merged.

Beside the rule files, every new workspace gets:

- ``schemas/``: a copy of the JSON Schemas, which editors read for autocompletion and checks;
- a ``# yaml-language-server: $schema=…`` line at the top of loyalty.yaml and each rule file,
  pointing at that copy by a relative path (so it works wherever the workspace is cloned);
- ``.vscode/``: the same schemas wired for VS Code, including rule files added later;
- ``.github/workflows/loyalty.yml``: `loyalty validate` and `loyalty test` on every push and
  pull request, with problems shown on the lines of the pull request;
- ``.pre-commit-config.yaml``: the same two checks before each commit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.app.demo import build_demo_workspace
from engine.errors import LoyaltyError
from engine.resources import schemas_dir

SCHEMA_FOLDER = "schemas"       # committed with the rules, unlike .loyalty/ (see GITIGNORE)
MODELINE_PREFIX = "# yaml-language-server: $schema="
SETTINGS_MODELINE = f"{MODELINE_PREFIX}{SCHEMA_FOLDER}/loyalty.schema.json\n"
RULES_MODELINE = f"{MODELINE_PREFIX}../{SCHEMA_FOLDER}/rules.schema.json\n"

# The modelines are part of the texts below, in place of a line each, so that every line of
# the tutorial keeps its number (the docs and tests quote rules/programme.yaml:30).
FILES: dict[str, str] = {
    "loyalty.yaml": SETTINGS_MODELINE + """\
program:                      # programme settings; every key is explained in docs/rules.md
  name: My Rewards            # shown in messages as {{ program.name }}
  timezone: Asia/Shanghai     # days and quiet hours are counted in this timezone
  currency: CNY
  locale: zh-CN               # templates fall back to this locale

data:                         # your own files; map your column names under columns:
  customers: {path: data/customers.csv}
  orders:    {path: data/orders.csv}
  events:    {path: data/events.csv, fields: {score: number}}

state: state/loyalty.db       # created on the first `loyalty run`

contact_policy:
  max_messages: 2             # at most 2 messages ...
  per: 7d                     # ... per customer per 7 days, across all campaigns
  quiet_hours: "21:00-09:00"  # in quotes! nothing is sent at night, customer's local time

holdout: 5%                   # a control group that never gets offers, to measure uplift

channels:
  sms:   {send: file, path: outbox/sms.jsonl}
  email: {send: file, path: outbox/email.jsonl}
""",
    "rules/programme.yaml": RULES_MODELINE + """\
# Segments are groups of customers; campaigns say what they get and when.
# Try: change 5000 to 3000 below, then run `loyalty preview` and see the funnel change.
segments:
  high_value:
    description: 高价值客户 — frequent, big spenders
    where: monetary_365d >= 5000 and orders_365d >= 3
  at_risk:
    description: customers drifting away
    where:
      all:
        - 60 <= days_since_last_order <= 180
        - orders_365d >= 1

tiers:                        # first match wins
  gold:   {where: monetary_365d >= 5000}
  silver: {where: monetary_365d >= 1000}
  bronze: {where: true}

campaigns:
  winback:
    name: 沉睡客唤醒
    segment: at_risk
    exclude: [high_value]
    when: {inactive_for: 60d}           # fires once when a customer reaches 60 days without an order
    reward: {coupon: {percent_off: 20, min_spend: 100, valid_days: 14}}
    channel: sms
    template: winback                   # templates/winback.sms.zh-CN.j2 (and en-US)
    priority: 50
    cooldown: 30d

  vip_thanks:
    name: 专属权益
    segment: high_value
    when: {dates: ["12-25"]}
    reward: {points: {amount: floor(monetary_365d / 100)}}
    channel: email
    template: vip_thanks
    priority: 80
""",
    "templates/winback.sms.zh-CN.j2": (
        "{{ customer.name }}，好久不见！送您{{ reward.description }}，"
        "券码{{ reward.code }}，{{ reward.expires_at | date }}前有效。回T退订\n"),
    "templates/winback.sms.en-US.j2": (
        "Hi {{ customer.name }}, we miss you! Here is a {{ reward.description }}: code {{ reward.code }}, "
        "valid until {{ reward.expires_at | date }}. Reply STOP to opt out.\n"),
    "templates/vip_thanks.email.zh-CN.j2": """\
{% block subject %}{{ customer.name }}，感谢您一年的支持{% endblock %}
{% block text %}亲爱的{{ customer.name }}：

感谢您今年在{{ program.name }}的每一次光临。我们为您送上{{ reward.points }}积分。
{% endblock %}
{% block html %}<p>亲爱的{{ customer.name }}：</p><p>感谢您的支持，送上<b>{{ reward.points }}</b>积分。</p>{% endblock %}
""",
    "templates/vip_thanks.email.en-US.j2": """\
{% block subject %}Thank you for a wonderful year, {{ customer.name }}{% endblock %}
{% block text %}Dear {{ customer.name }},

Thank you for shopping with {{ program.name }} this year. We have added {{ reward.points }} points to your account.
{% endblock %}
{% block html %}<p>Dear {{ customer.name }},</p><p>We have added <b>{{ reward.points }}</b> points to your account.</p>{% endblock %}
""",
    "tests/programme.yaml": """\
# Golden tests: made-up customers, a moment, and what the rules must do for them.
# `loyalty test` runs every file in tests/ and exits 1 if one fails, naming the line below
# and the stage that decided (segment, trigger, consent, frequency_cap, cooldown, holdout,
# arbitration, budget). Add a customer here whenever you change a rule.
as_of: 2026-12-25T10:00:00+08:00      # Christmas morning: vip_thanks fires today
defaults: {locale: zh-CN, timezone: Asia/Shanghai}

customers:
  - id: T1                            # last order 90 days ago: the win-back SMS
    name: 王芳
    orders: [{days_ago: 90, amount: 320}]
    expect:
      offer: winback
      text_contains: ["王芳，好久不见", "回T退订"]

  - id: T2                            # the same in English
    name: Emma Clark
    locale: en-US
    orders: [{days_ago: 90, amount: 75}]
    expect: {offer: winback, text_contains: "we miss you"}

  - id: T3                            # said no to SMS: nothing is sent
    name: 张敏
    sms_opt_in: false
    orders: [{days_ago: 90, amount: 99}]
    expect: {suppressed_by: consent, campaign: winback}

  - id: T4                            # got the win-back SMS 10 days ago: cooldown 30d
    name: 李伟
    orders: [{days_ago: 90, amount: 320}]
    contacts: [{campaign: winback, days_ago: 10}]
    expect: {suppressed_by: cooldown, campaign: winback}

  - id: T5                            # a high-value customer: Christmas points, 1 per 100 spent
    name: 刘洋
    orders:
      - {days_ago: 20, amount: 2600}
      - {days_ago: 100, amount: 1800}
      - {days_ago: 200, amount: 1200}
    expect: {offer: vip_thanks, points: 56, text_contains: "56积分"}

  - id: T6                            # ordered last week: nothing to win back
    name: 陈静
    orders: [{days_ago: 7, amount: 120}]
    expect: no_offer
""",
    "data/customers.csv": """\
customer_id,name,email,phone,birthday,signup_date,locale,timezone,email_opt_in,sms_opt_in
C001,王芳,wang.fang@example.com,13800000001,1990-03-14,2023-01-05,zh-CN,Asia/Shanghai,true,true
C002,李伟,li.wei@example.com,13800000002,1985-12-25,2022-06-18,zh-CN,Asia/Shanghai,true,true
C003,Emma Clark,emma@example.com,+447700900003,1992-02-29,2024-03-01,en-US,Europe/London,true,false
C004,张敏,zhang.min@example.com,13800000004,1979-07-08,2021-11-11,zh-CN,Asia/Shanghai,false,true
""",
    "data/orders.csv": """\
order_id,customer_id,timestamp,amount
O1,C001,2026-08-20 14:00:00,320.00
O2,C001,2026-09-01 10:30:00,180.50
O3,C002,2026-03-02 19:00:00,2600.00
O4,C002,2026-07-15 12:00:00,1800.00
O5,C002,2026-11-01 09:00:00,1200.00
O6,C003,2026-08-01 08:00:00,75.00
O7,C004,2026-09-10 20:00:00,99.00
""",
    "data/events.csv": """\
event_id,customer_id,timestamp,type,score
E1,C001,2026-10-02 10:00:00,nps_response,9
E2,C004,2026-11-20 10:00:00,nps_response,4
""",
}


GITIGNORE = """\
# What runs produce, not what you edit: keep these out of git.
# The state database: back it up instead (docs/operations.md).
state/
# Messages written by the file channel.
outbox/
# The partitioned copy of the data, rebuilt automatically (loyalty data convert).
.loyalty/
# Customer data is personal data: keep it out of git. Point loyalty.yaml at where it lives
# (an absolute path, ~/exports/customers.csv or ${CRM_EXPORTS}/customers.csv); the sample
# data written by `loyalty init` sits in data/ for the tutorial only.
data/
"""


WORKFLOW = """\
# Checks this loyalty workspace on every push and pull request (written by `loyalty init`).
# A mistake in a rule file, loyalty.yaml or a template is shown on its line in the pull
# request, and the golden tests in tests/ must pass. Nothing is sent: no data, no state.
#
# Before the first run, say how to install loyalty: see LOYALTY_PACKAGE below.
# This file assumes the workspace is the root of the repository.
name: loyalty

on:
  push:
  pull_request:

permissions:
  contents: read

env:
  # How to install loyalty, in words pip understands. Pin a version, so that every check
  # uses the same engine as your scheduled runs. Either set a repository variable
  # (Settings > Secrets and variables > Actions > Variables > New: LOYALTY_PACKAGE),
  # or replace the value below. For example:
  #   loyalty @ git+https://github.com/YOUR-ORG/loyalty@v0.1.0
  #   loyalty==0.1.0                  (from your company's package index)
  LOYALTY_PACKAGE: ${{ vars.LOYALTY_PACKAGE }}

jobs:
  check:
    name: validate and golden tests
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.12"
      - name: Install loyalty
        run: |
          if [ -z "$LOYALTY_PACKAGE" ]; then
            echo "::error file=.github/workflows/loyalty.yml::Say how to install loyalty: set LOYALTY_PACKAGE (see the top of this file)"
            exit 1
          fi
          python -m pip install "$LOYALTY_PACKAGE"
      - name: Check rule files, loyalty.yaml and templates
        run: loyalty validate --format github
      - name: Golden tests
        run: loyalty test
"""

PRE_COMMIT_CONFIG = """\
# Runs loyalty's checks before each commit that touches the rules (written by `loyalty init`).
# Once: `pip install pre-commit && pre-commit install`. Needs `loyalty` on the PATH.
repos:
  - repo: local
    hooks:
      - id: loyalty-validate
        name: loyalty validate (rule files, loyalty.yaml, templates)
        entry: loyalty validate
        language: system
        files: ^(loyalty\\.yaml|rules/.*\\.ya?ml|templates/.*)$
        pass_filenames: false
      - id: loyalty-test
        name: loyalty test (golden tests)
        entry: loyalty test
        language: system
        files: ^(loyalty\\.yaml|rules/.*\\.ya?ml|templates/.*|tests/.*\\.ya?ml)$
        pass_filenames: false
"""

VSCODE_SETTINGS = {
    "yaml.schemas": {
        f"./{SCHEMA_FOLDER}/rules.schema.json": ["rules/*.yaml", "rules/*.yml"],
        f"./{SCHEMA_FOLDER}/loyalty.schema.json": ["loyalty.yaml"],
    },
}
VSCODE_EXTENSIONS = {"recommendations": ["redhat.vscode-yaml"]}


def checks_and_editor_files() -> dict[str, str]:
    """The CI workflow, the pre-commit hooks, VS Code's settings and the .gitignore, by path."""
    return {
        ".gitignore": GITIGNORE,
        ".github/workflows/loyalty.yml": WORKFLOW,
        ".pre-commit-config.yaml": PRE_COMMIT_CONFIG,
        ".vscode/settings.json": json.dumps(VSCODE_SETTINGS, indent=2) + "\n",
        ".vscode/extensions.json": json.dumps(VSCODE_EXTENSIONS, indent=2) + "\n",
    }


def init_workspace(directory: Path) -> list[str]:
    """Write the tutorial workspace into ``directory`` (which must be empty or new); return
    the files written, relative to it."""
    directory = _new_folder(directory)
    _write_files(directory, FILES)
    return sorted([*FILES, *add_checks_and_editor_support(directory)])


def init_example(directory: Path, customers: int = 2000) -> list[str]:
    """The complete example programme with generated sample data, ready to validate and preview."""
    directory = _new_folder(directory)
    build_demo_workspace(directory, customers)
    add_checks_and_editor_support(directory)
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def add_checks_and_editor_support(directory: Path) -> list[str]:
    """Write the .gitignore, CI workflow, pre-commit hooks and editor settings, copy the schemas
    and put a schema line on top of loyalty.yaml and every rule file; return the files written."""
    written = _write_files(directory, checks_and_editor_files())
    written += _copy_schemas(directory)
    _add_schema_lines(directory)
    return written


def _new_folder(directory: Path) -> Path:
    """A workspace starts in an empty or new folder, so nothing of the user's is overwritten."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise LoyaltyError(f"{directory} is not empty; choose a new folder for the workspace")
    return directory


def _write_files(directory: Path, files: dict[str, str]) -> list[str]:
    for name, text in files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return list(files)


def _copy_schemas(directory: Path) -> list[str]:
    """Copy the installed JSON Schemas into the workspace: a relative path from a rule file
    then reaches them in every clone, whatever Python or folder loyalty is installed in."""
    target = directory / SCHEMA_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for schema in sorted(schemas_dir().glob("*.schema.json")):
        shutil.copyfile(schema, target / schema.name)
        copied.append(f"{SCHEMA_FOLDER}/{schema.name}")
    return copied


def _add_schema_lines(directory: Path) -> None:
    """Put the editor's schema line on top of loyalty.yaml and each rule file that lacks one.
    It is a YAML comment: `loyalty validate` reads the file exactly as before."""
    targets = [(directory / "loyalty.yaml", SETTINGS_MODELINE)]
    rules = directory / "rules"
    targets += [(path, RULES_MODELINE) for path in sorted([*rules.glob("*.yaml"), *rules.glob("*.yml")])]
    for path, modeline in targets:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if not text.startswith(MODELINE_PREFIX):
            path.write_text(modeline + text, encoding="utf-8")
