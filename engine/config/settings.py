"""Reading loyalty.yaml into validated ``Settings``."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from engine.config.model import ChannelDef, ContactPolicy, Settings, SourceDef
from engine.config.rulefiles import SourceMap
from engine.config.schema import did_you_mean
from engine.errors import LoyaltyError, Problem, SecretNotSet

_DURATION = re.compile(r"^(\d+)([dhw])$")
_LOCALE = re.compile(r"^([A-Za-z]{2,3})(?:[-_]([A-Za-z]{4}))?(?:[-_]([A-Za-z]{2}|\d{3}))?$")

DEFAULT_ADDRESS = {"email": "email", "sms": "phone", "push": "customer_id"}

# A password in a URL (scheme://user:SECRET@host) and secret-looking query parameters.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s/@:]*:)[^\s/?#]*(?=@)", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|pass|secret|client_secret|token|"
                           r"access_token|auth|api_?key|key|signature|sig)=)[^&#\s'\"]*", re.IGNORECASE)
MASK = "***"


@dataclass(frozen=True)
class EnvSecret:
    """A secret that loyalty.yaml names but does not hold (``{env: NAME}``).

    The value is read from the environment only when it is used, so it never sits in git,
    in the settings or in a repr; ``key`` and ``where`` say which option wants it."""

    variable: str
    key: str = ""            # e.g. channels.push.headers.Authorization
    where: str = ""          # e.g. loyalty.yaml:31:36

    def value(self) -> str:
        """The secret from the environment; SecretNotSet naming the key and the variable."""
        if self.variable not in os.environ:
            place = f"{self.where}: " if self.where else ""
            raise SecretNotSet(f"{place}{self.key or 'a secret'}: the environment variable {self.variable} "
                               "is not set (set it where loyalty runs, e.g. in the cron line or the "
                               "systemd EnvironmentFile)")
        return os.environ[self.variable]

    def __str__(self) -> str:
        return f"{{env: {self.variable}}}"


def reveal(value: object) -> str:
    """A plain option value as text, or an EnvSecret's value from the environment."""
    return value.value() if isinstance(value, EnvSecret) else str(value)


def mask_secrets(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """``text`` fit to print: URL passwords (``postgresql://user:***@host``), secret query
    parameters (``?password=***``) and the given secret values masked."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    return _QUERY_SECRET.sub(lambda m: m.group("head") + MASK, text)


def with_secrets(value: object, smap: SourceMap, path: tuple) -> object:
    """``value`` with every ``{env: NAME}`` mapping in it turned into an EnvSecret that knows
    its key and where loyalty.yaml writes it."""
    if isinstance(value, dict):
        if set(value) == {"env"}:
            line, column = smap.value_position(path)
            return EnvSecret(str(value["env"]), ".".join(map(str, path)), f"{smap.file}:{line}:{column}")
        return {key: with_secrets(item, smap, path + (key,)) for key, item in value.items()}
    return value


def duration_days(text: str) -> float:
    """``30d`` -> 30, ``12h`` -> 0.5, ``2w`` -> 14."""
    number, unit = _DURATION.match(text).groups()
    return int(number) * {"d": 1, "h": 1 / 24, "w": 7}[unit]


def whole_days_problem(smap: SourceMap, path: tuple, text: str) -> Problem | None:
    """Days are whole calendar days: `36h` would silently become 1 day, `12h` none at all."""
    days = duration_days(text)
    if days == int(days):
        return None
    return smap.problem(path, f"'{text}' is not a whole number of days",
                        "days are whole calendar days: write 1d, 7d, 2w (or 24h, 48h)")


def chosen_engine(settings: Settings, engine: str | None, scheduler: str | None) -> str:
    """The engine a command runs on: its --engine, else loyalty.yaml's engine.kind (local by
    default); a scheduler address only makes sense with the dask engine."""
    engine = engine or settings.engine
    if engine not in ("local", "dask"):
        raise LoyaltyError(f"unknown engine '{engine}': use local or dask")
    if engine == "local" and scheduler:
        raise LoyaltyError("--scheduler needs the dask engine: add --engine dask, "
                           "or set engine: {kind: dask} in loyalty.yaml")
    return engine


def percentage(text: str) -> float:
    """``5%`` -> 0.05."""
    return float(text.rstrip("%")) / 100


def is_valid_timezone(name: str) -> bool:
    try:
        ZoneInfo(name)
        return True
    except (ZoneInfoNotFoundError, ValueError):
        return False


@functools.lru_cache(maxsize=1024)
def normalise_locale(value: str | None) -> str | None:
    """A locale tag in its canonical form (``zh_cn`` -> ``zh-CN``, ``zh-hant-tw`` -> ``zh-Hant-TW``);
    None for anything that is not one. The one locale grammar of loyalty.yaml, customer data
    and templates."""
    match = _LOCALE.match(value.strip()) if isinstance(value, str) else None
    if not match:
        return None
    language, script, region = match.groups()
    parts = [language.lower()] + ([script.title()] if script else []) + ([region.upper()] if region else [])
    return "-".join(parts)


def is_valid_locale(name: str) -> bool:
    """A locale written in its canonical form, as loyalty.yaml needs it (``zh-CN``, not ``zh_cn``)."""
    return normalise_locale(str(name)) == str(name)


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def data_path(root: Path, text: str) -> tuple[Path | None, str | None]:
    """Where a data file is: anywhere the operator points, so that customer data can stay out
    of the git repository. ``${VAR}`` (or ``$VAR``) is taken from the environment, ``~`` is the
    home folder, a relative path is relative to the workspace, and links are followed. Returns
    the path, or None and what is wrong (a variable that is not set)."""
    unset = [first or second for first, second in _VARIABLE.findall(text) if (first or second) not in os.environ]
    if unset:
        return None, f"the environment variable {unset[0]} in '{text}' is not set"
    expanded = Path(_VARIABLE.sub(lambda m: os.environ[m.group(1) or m.group(2)], text)).expanduser()
    return (root / expanded).resolve(), None


def inside(root: Path, relative: str) -> Path | None:
    """Resolve ``relative`` under ``root``; None when it would escape the workspace."""
    candidate = (root / relative).resolve()
    try:
        candidate.relative_to(root.resolve())
    except ValueError:
        return None
    return candidate


def _source_password_problems(spec: dict, smap: SourceMap, path: tuple) -> list[Problem]:
    """A data source's ``password`` goes with a database url that does not hold one already."""
    if "password" not in spec:
        return []
    url = spec.get("url")
    if url is None:
        return [smap.problem(path + ("password",), "a password is only used with a database url",
                             "remove it, or give the source a url")]
    if _URL_PASSWORD.search(url):
        return [smap.problem(path + ("url",), "the url holds a password as well as password:",
                             "keep the password out of the url: postgresql://user@host/db")]
    return []


def _smtp_problems(spec: dict, smap: SourceMap, path: tuple) -> list[Problem]:
    """An SMTP login comes whole (username with password), once; and TLS is chosen once."""
    problems = []
    given = [key for key in ("username", "password") if key in spec]
    if len(given) == 1:
        missing = "password" if given == ["username"] else "username"
        problems.append(smap.problem(path + (given[0],), f"{given[0]} needs a {missing} as well",
                                     "e.g. username: rewards, password: {env: SMTP_PASSWORD}", at_key=True))
    if given and ("username_env" in spec or "password_env" in spec):
        problems.append(smap.problem(path + (given[0],), "give the login once: username and password, "
                                     "or username_env and password_env", at_key=True))
    if spec.get("ssl") and spec.get("starttls"):
        problems.append(smap.problem(path + ("ssl",), "ssl and starttls cannot both be on",
                                     "ssl: true for port 465 (TLS from the start), starttls: true for "
                                     "port 587", at_key=True))
    return problems


def build_settings(data: dict, smap: SourceMap, root: Path) -> tuple[Settings | None, list[Problem]]:
    """Semantic checks of a schema-valid loyalty.yaml, and the Settings it describes."""
    problems: list[Problem] = []
    program = data.get("program", {})
    timezone = program.get("timezone", "UTC")
    if not is_valid_timezone(timezone):
        problems.append(smap.problem(("program", "timezone"), f"unknown timezone '{timezone}'",
                                     did_you_mean(timezone, sorted(available_timezones()))
                                     or "use an IANA name such as Asia/Shanghai or Europe/London"))
    locale = program.get("locale", "en-US")
    if not is_valid_locale(locale):
        problems.append(smap.problem(("program", "locale"), f"'{locale}' is not a locale",
                                     "write a locale such as zh-CN or en-US"))

    sources = {}
    for table, spec in data.get("data", {}).items():
        path = None
        if "path" in spec:
            path, wrong = data_path(root, str(spec["path"]))
            if wrong:
                problems.append(smap.problem(("data", table, "path"), wrong,
                                             "set it where loyalty runs (e.g. export CRM_EXPORTS=/srv/crm) "
                                             "or write the path itself"))
        if "path" not in spec and "url" not in spec:
            problems.append(smap.problem(("data", table), f"the {table} source needs a path or a url",
                                         f"e.g. {table}: {{path: data/{table}.csv}}", at_key=True))
        problems.extend(_source_password_problems(spec, smap, ("data", table)))
        sources[table] = SourceDef(
            table=table, path=path, url=spec.get("url"), sql_table=spec.get("table"),
            format=spec.get("format"), columns=MappingProxyType(dict(spec.get("columns", {}))),
            encoding=spec.get("encoding", "utf-8"), delimiter=spec.get("delimiter", ","),
            fields=MappingProxyType(dict(spec.get("fields", {}))),
            password=with_secrets(spec.get("password"), smap, ("data", table, "password")))

    state_text = data.get("state", "state/loyalty.db")
    state_path = inside(root, state_text)
    if state_path is None:
        problems.append(smap.problem(("state",), f"'{state_text}' is outside the workspace",
                                     "keep the state database inside the workspace folder"))
        state_path = root / "state" / "loyalty.db"

    policy_data = data.get("contact_policy", {})
    quiet_start = quiet_end = None
    if "quiet_hours" in policy_data:
        quiet_start, quiet_end = policy_data["quiet_hours"].split("-")
        for value in (quiet_start, quiet_end):
            hours, minutes = map(int, value.split(":"))
            if hours > 23:
                problems.append(smap.problem(("contact_policy", "quiet_hours"),
                                             f"'{value}' is not a time of day", "hours go from 00 to 23"))
    if "per" in policy_data:
        problem = whole_days_problem(smap, ("contact_policy", "per"), policy_data["per"])
        if problem is not None:
            problems.append(problem)
    policy = ContactPolicy(
        max_messages=policy_data.get("max_messages"),
        per_days=int(duration_days(policy_data.get("per", "7d"))),
        quiet_start=quiet_start, quiet_end=quiet_end,
        max_offers_per_run=policy_data.get("max_offers_per_run", 1))

    channels = {}
    for name, spec in data.get("channels", {}).items():
        options = {k: with_secrets(v, smap, ("channels", name, k))
                   for k, v in spec.items() if k not in ("send", "address", "consent")}
        problems.extend(_smtp_problems(spec, smap, ("channels", name)))
        if spec["send"] == "file":
            target = spec.get("path", f"outbox/{name}.jsonl")
            resolved = inside(root, target)
            if resolved is None:
                problems.append(smap.problem(("channels", name, "path"), f"'{target}' is outside the workspace",
                                             "keep outbox files inside the workspace folder"))
            options["path"] = target
        if spec["send"] == "webhook" and "url" not in spec:
            problems.append(smap.problem(("channels", name), "a webhook channel needs a url",
                                         "e.g. url: http://127.0.0.1:8080/push", at_key=True))
        if spec["send"] == "smtp" and "sender" not in spec:
            problems.append(smap.problem(("channels", name), "an smtp channel needs a sender address",
                                         "e.g. sender: rewards@example.com", at_key=True))
        channels[name] = ChannelDef(
            name=name, send=spec["send"], options=MappingProxyType(options),
            address_column=spec.get("address", DEFAULT_ADDRESS.get(name, "email")),
            consent_column=spec.get("consent", f"{name}_opt_in"))

    coupons = data.get("coupons", {})
    costs = data.get("costs", {})
    engine = data.get("engine", {})
    settings = Settings(
        name=program.get("name", "loyalty"), timezone=timezone,
        currency=program.get("currency", "CNY"), default_locale=locale,
        data=MappingProxyType(sources), state_path=state_path, contact_policy=policy,
        holdout=percentage(data["holdout"]) if "holdout" in data else 0.0,
        channels=MappingProxyType(channels),
        coupon_prefix=coupons.get("prefix", ""), coupon_length=coupons.get("length", 10),
        salt=data.get("salt", "loyalty"),
        point_value=costs.get("point_value", 0.01), shipping_cost=costs.get("shipping", 10.0),
        message_cost=costs.get("message", 0.0),
        engine=engine.get("kind", "local"), scheduler=engine.get("scheduler"), partitions=engine.get("partitions"),
        workers=engine.get("workers"))
    return settings, problems
