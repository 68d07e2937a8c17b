"""`loyalty init`: a small workspace that validates clean and reads as a tutorial."""

from __future__ import annotations

from pathlib import Path

from engine.app.demo import build_demo_workspace
from engine.errors import LoyaltyError

FILES: dict[str, str] = {
    "loyalty.yaml": """\
# Programme settings. Every key is explained in docs/rules.md.
program:
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
    "rules/programme.yaml": """\
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
"""


def init_workspace(directory: Path) -> list[str]:
    """Write the tutorial workspace into ``directory`` (which must be empty or new)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise LoyaltyError(f"{directory} is not empty; choose a new folder for the workspace")
    for name, text in {**FILES, ".gitignore": GITIGNORE}.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return sorted([*FILES, ".gitignore"])


def init_example(directory: Path, customers: int = 2000) -> list[str]:
    """The complete example programme with generated sample data, ready to validate and preview."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise LoyaltyError(f"{directory} is not empty; choose a new folder for the workspace")
    build_demo_workspace(directory, customers)
    (directory / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
