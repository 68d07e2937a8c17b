"""The validated, immutable program model.

Once a workspace has loaded and validated, every later stage reads these frozen
dataclasses and never touches raw YAML dicts again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from engine.config.expressions import Expression


@dataclass(frozen=True)
class Location:
    """Where a definition was written, for messages and traces."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NOWHERE = Location("<none>", 0, 0)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SourceDef:
    """Where one table comes from (``data.customers`` etc. in loyalty.yaml)."""

    table: str                       # customers | orders | events | redemptions
    path: Path | None = None         # resolved inside the workspace
    url: str | None = None           # SQLAlchemy URL
    sql_table: str | None = None     # table name inside SQLite / SQL database
    format: str | None = None        # csv | parquet | sqlite | sql (guessed from path)
    columns: Mapping[str, str] = field(default_factory=dict)   # ours -> theirs
    encoding: str = "utf-8"
    delimiter: str = ","
    fields: Mapping[str, str] = field(default_factory=dict)    # extra column -> type
    password: Any = None             # the url's password: an EnvSecret (config.settings), read when used


@dataclass(frozen=True)
class ContactPolicy:
    max_messages: int | None = None
    per_days: int = 7
    quiet_start: str | None = None   # "21:00"
    quiet_end: str | None = None     # "09:00"
    max_offers_per_run: int = 1


@dataclass(frozen=True)
class ChannelDef:
    name: str
    send: str                        # file | webhook | smtp
    options: Mapping[str, Any] = field(default_factory=dict)   # secrets in it are EnvSecrets
    address_column: str = "email"    # which customer column holds the contact
    consent_column: str = "email_opt_in"


@dataclass(frozen=True)
class Settings:
    """Everything loyalty.yaml says."""

    name: str
    timezone: str
    currency: str
    default_locale: str
    data: Mapping[str, SourceDef]
    state_path: Path
    contact_policy: ContactPolicy
    holdout: float
    channels: Mapping[str, ChannelDef]
    coupon_prefix: str = ""
    coupon_length: int = 10
    salt: str = "loyalty"
    point_value: float = 0.01        # currency per point, for cost estimates
    shipping_cost: float = 10.0      # cost of one free-shipping reward
    message_cost: float = 0.0        # cost of sending one message
    engine: str = "local"            # local | dask
    scheduler: str | None = None     # a Dask scheduler address; None starts a local cluster
    partitions: int | None = None    # None: chosen from the data size and free memory
    workers: int | None = None       # processes deciding at once (local engine); None: from the cores


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class FeatureDef:
    """A custom feature: an aggregation over orders/events, or an expression."""

    name: str
    aggregate: str | None            # count | sum | avg | min | max | first | last | distinct
    column: str | None               # the aggregated column (count may aggregate the table)
    source: str | None               # orders | events
    where: Expression | None
    within_days: int | None
    expr: Expression | None
    type: str                        # number | string | bool | date
    location: Location = NOWHERE
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class SegmentDef:
    name: str
    where: Expression
    description: str = ""
    location: Location = NOWHERE


@dataclass(frozen=True)
class TierDef:
    """A tier: computed (``where:``, decided at every run) or stored (``qualify:``, reached
    and kept as the member's state; ``retain:`` keeps it at a review, default its qualify)."""

    name: str
    where: Expression | None
    benefits: tuple[str, ...] = ()
    location: Location = NOWHERE
    qualify: Expression | None = None
    retain: Expression | None = None

    @property
    def keeps(self) -> Expression | None:
        """What keeps the tier at a review: ``retain:``, else ``qualify:``."""
        return self.retain if self.retain is not None else self.qualify


@dataclass(frozen=True)
class TierReview:
    """``tier_review:``: when stored tiers are reviewed, and where a member who fails goes."""

    every_days: int = 365
    grace_days: int = 0
    step_down: str = "one"               # one | to_qualified
    location: Location = NOWHERE


@dataclass(frozen=True)
class TriggerDef:
    """``when:`` of a campaign; ``kind`` keys the trigger registry."""

    kind: str                        # always | birthday | anniversary | dates | event | inactive_for | becomes
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    where: Expression | None = None  # event.* condition, for event triggers
    expr: Expression | None = None   # for becomes
    location: Location = NOWHERE


@dataclass(frozen=True)
class RewardDef:
    """``reward:``; ``kind`` keys the reward registry."""

    kind: str                        # coupon | points | free_shipping | gift | tier | message
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    amount: Expression | None = None  # points amount as an expression
    location: Location = NOWHERE


@dataclass(frozen=True)
class VariantDef:
    name: str
    weight: float
    reward: RewardDef | None = None   # None: the campaign's reward
    template: str | None = None       # None: the campaign's template


@dataclass(frozen=True)
class BudgetDef:
    max_offers: int | None = None
    max_cost: float | None = None
    rank_by: Expression | None = None
    per: str = "run"                 # run | day | week | month | campaign


MESSAGELESS_REWARDS = ("points", "tier")    # rewards a member gets whether or not a message can be sent
DEFAULT_PENDING_DAYS = 7                    # ``pending:`` when a campaign does not say


@dataclass(frozen=True)
class CampaignDef:
    id: str
    name: str
    segment: str | None
    exclude: tuple[str, ...]
    where: Expression | None
    trigger: TriggerDef
    reward: RewardDef
    channel: str
    template: str
    priority: int = 0
    cooldown_days: int | None = None
    holdout: float = 0.0
    budget: BudgetDef = BudgetDef()
    variants: tuple[VariantDef, ...] = ()
    schedule: str | None = None
    enabled: bool = True
    location: Location = NOWHERE
    pending_days: int = DEFAULT_PENDING_DAYS   # how long a stopped one-off firing waits for another run (0: not at all)

    @property
    def one_off(self) -> bool:
        """Whether each firing happens once (a ``when:`` trigger); without one the campaign
        fires for every member at every run, so a stopped firing needs no second chance."""
        return self.trigger.kind != "always"

    @property
    def keeps_pending(self) -> bool:
        """Whether a firing stopped by the contact policy, arbitration or a budget waits
        (``pending:``) for a later run instead of being used up."""
        return self.one_off and self.pending_days > 0

    @property
    def needs_no_message(self) -> bool:
        """Whether every reward of the campaign (its own and its variants') is granted without a
        message (points, a tier): such a reward is given even when the message cannot be sent."""
        rewards = [self.reward, *(v.reward for v in self.variants if v.reward is not None)]
        return all(reward.kind in MESSAGELESS_REWARDS for reward in rewards)


@dataclass(frozen=True)
class EarnRule:
    """One way to earn points (``points: earn: NAME``): once per order or per event of a type."""

    name: str
    source: str                          # orders | events
    amount: Expression                   # over order.* / event.* and customer columns
    event_type: str | None = None        # for events
    where: Expression | None = None
    multiplier: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    notify_channel: str | None = None
    notify_template: str | None = None
    notify_priority: int = 0
    location: Location = NOWHERE


@dataclass(frozen=True)
class PointsDef:
    """``points:``: what a point is worth, when credits expire, how members earn them."""

    value: float
    start: dt.date | None = None
    expire_days: int | None = None       # None: points never expire
    earn: Mapping[str, EarnRule] = field(default_factory=lambda: MappingProxyType({}))
    location: Location = NOWHERE


@dataclass(frozen=True)
class Program:
    """All rule files of a workspace, merged and validated."""

    features: Mapping[str, FeatureDef]
    segments: Mapping[str, SegmentDef]
    tiers: Mapping[str, TierDef]
    campaigns: Mapping[str, CampaignDef]
    points: PointsDef | None = None
    tier_review: TierReview = TierReview()

    @property
    def stored_tiers(self) -> bool:
        """Whether tiers are a member's stored state (some tier has ``qualify:``), not computed."""
        return any(tier.qualify is not None for tier in self.tiers.values())


@dataclass(frozen=True)
class LoadedWorkspace:
    """A loaded, validated workspace: settings, program and where they came from."""

    root: Path
    settings: Settings
    program: Program
    rule_hashes: Mapping[str, str]    # relative file -> sha256
    templates_dir: Path
