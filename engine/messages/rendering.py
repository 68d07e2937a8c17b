"""Render message templates: one sandboxed Jinja environment, locale fallback, SMS length.

Every template is loaded through ``make_environment``, built on the sandbox of
``engine.messages.sandbox`` (an immutable sandbox with a syntax-tree check and per-message
limits on loop steps, text size and time), with strict undefined names and our filters.
"""

from __future__ import annotations

import difflib
import functools
import re
import time
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

import jinja2
from jinja2 import StrictUndefined, meta, nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError, UndefinedError

from engine.config.settings import normalise_locale
from engine.errors import Problem, TemplateError
from engine.messages.sandbox import (
    MAX_STEPS,
    ConfinedLoader,
    MessageEnvironment,
    RefusedSyntax,
    check_time,
    message_budget,
    tree_problems,
)

# Per-message limits. A message is short; these leave a wide margin for honest templates.
MAX_OUTPUT_CHARS = 64 * 1024      # one rendered message (default for Renderer)
MAX_RENDER_SECONDS = 1.0          # one rendered message (default for Renderer)
# All the messages of one run or preview, in each process rendering them: a template that
# stays within the per-message limits but takes 0.3 s a message would otherwise make a run
# of a few thousand offers take many minutes. Honest templates take well under 1 ms.
MAX_RENDER_SECONDS_PER_RUN = 120.0
SLOW_MESSAGE_SECONDS = 0.05       # `validate` warns about a template slower than this per message

# ---------------------------------------------------------------------------- names and locales

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_template_name(name: str) -> None:
    """A template or channel name from a rule file is a name, not a path."""
    if not isinstance(name, str) or not name.strip():
        raise TemplateError(str(name), "template name is empty")
    if "/" in name or "\\" in name or ".." in name or ":" in name or not _NAME_RE.match(name):
        raise TemplateError(
            name, "template names are names, not paths: use letters, digits, '_', '-' and '.' "
            "(no '/', '\\', '..' or drive letters); the file is found in templates/ by name")


def locale_chain(locale: str | None, default: str) -> list[str]:
    """Locales to try, most specific first: ``zh-CN`` -> ``zh`` -> default (-> its language)."""
    chain: list[str] = []
    for tag in (normalise_locale(locale), normalise_locale(default)):
        while tag:
            if tag not in chain:
                chain.append(tag)
            tag = tag.rpartition("-")[0]
    return chain


# ---------------------------------------------------------------------------- money and dates

_ZH_SYMBOLS = {"CNY": "¥", "USD": "US$", "HKD": "HK$", "TWD": "NT$", "EUR": "€", "GBP": "£",
               "JPY": "JP¥", "KRW": "￦", "SGD": "SGD", "AUD": "AU$", "CAD": "CA$"}
_EN_SYMBOLS = {"USD": "$", "CNY": "CN¥", "HKD": "HK$", "TWD": "NT$", "EUR": "€", "GBP": "£",
               "JPY": "¥", "KRW": "₩", "SGD": "SGD", "AUD": "A$", "CAD": "CA$"}
_EN_GB_SYMBOLS = {**_EN_SYMBOLS, "USD": "US$", "JPY": "JP¥"}
_CURRENCY_DIGITS = {"JPY": 0, "KRW": 0, "TWD": 2}
_EN_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December"]
_EN_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_ZH_WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]

# Date patterns follow CLDR's; fields: y, yy, m, d, month, mon, weekday.
_LOCALE_RULES = {
    "zh": {"symbols": _ZH_SYMBOLS, "weekdays": _ZH_WEEKDAYS, "dates": {
        "full": "{y}年{m}月{d}日{weekday}", "long": "{y}年{m}月{d}日",
        "medium": "{y}年{m}月{d}日", "short": "{y}/{m}/{d}"}},
    "en": {"symbols": _EN_SYMBOLS, "weekdays": _EN_WEEKDAYS, "dates": {
        "full": "{weekday}, {month} {d}, {y}", "long": "{month} {d}, {y}",
        "medium": "{mon} {d}, {y}", "short": "{m}/{d}/{yy}"}},
    "en-GB": {"symbols": _EN_GB_SYMBOLS, "weekdays": _EN_WEEKDAYS, "dates": {
        "full": "{weekday} {d} {month} {y}", "long": "{d} {month} {y}",
        "medium": "{d} {mon} {y}", "short": "{dd}/{mm}/{y}"}},
}
DATE_FORMATS = ("full", "long", "medium", "short", "iso")


@functools.lru_cache(maxsize=256)
def _locale_rules(locale: str | None) -> dict:
    """Exact locale, then its language, then English."""
    tag = normalise_locale(locale) or "en"
    return _LOCALE_RULES.get(tag) or _LOCALE_RULES.get(tag.split("-")[0]) or _LOCALE_RULES["en"]


def _is_missing(value) -> bool:
    """None, NaN, pandas' NA and NaT: a value the data does not have."""
    return (value is None or (isinstance(value, float) and value != value)
            or type(value).__name__ in ("NAType", "NaTType"))


def _to_decimal(value, what: str) -> Decimal:
    if _is_missing(value) or isinstance(value, bool):
        raise ValueError(f"{what}: the value is empty or not a number ({value!r})")
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{what}: {value!r} is not a number") from None


def format_money(amount, currency: str, locale: str | None) -> str:
    """``1234.5`` in CNY -> ``¥1,234.50`` (zh-CN) or ``CN¥1,234.50`` (en-US)."""
    value = _to_decimal(amount, "money")
    code = str(currency or "").upper()
    if not re.fullmatch(r"[A-Z]{3}", code):
        raise ValueError(f"money: {currency!r} is not a currency code such as CNY or USD")
    digits = _CURRENCY_DIGITS.get(code, 2)
    if not value.is_finite():
        raise ValueError(f"money: {amount!r} is not a number")
    rounded = value.quantize(Decimal(1).scaleb(-digits), ROUND_HALF_UP)
    sign = "-" if rounded < 0 else ""
    number = f"{abs(rounded):,.{digits}f}"
    symbol = _locale_rules(locale)["symbols"].get(code)
    return f"{sign}{symbol}{number}" if symbol else f"{sign}{code} {number}"


@functools.lru_cache(maxsize=4096)     # a campaign's amounts repeat for every offer
def short_money(amount, currency: str, locale: str | None) -> str:
    """``format_money`` without zero cents, for descriptions: ``¥10``, ``$12.50``, ``CN¥100``."""
    text = format_money(amount, currency, locale)
    return text[:-3] if text.endswith(".00") else text


def money_in(currency: str, locale: str | None):
    """A formatter of amounts in ``currency`` for ``locale`` (for reward descriptions)."""
    return lambda amount: short_money(amount, currency, locale)


def format_number(value, decimals: int = 0) -> str:
    """``12345`` -> ``12,345``: grouping is the same in Chinese and English."""
    number = _to_decimal(value, "number")
    decimals = max(0, min(int(decimals), 10))
    return f"{number.quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP):,.{decimals}f}"


def _to_date(value) -> date:
    if _is_missing(value):
        raise ValueError("date: the value is empty")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"date: {value!r} is not an ISO date such as 2026-11-23") from None
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        value = value.to_pydatetime()
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    raise ValueError(f"date: the value is empty or not a date ({value!r})")


def format_date(value, fmt: str, locale: str | None) -> str:
    """A date in the locale's ``full``/``long``/``medium``/``short`` form, or ``iso``."""
    day = _to_date(value)
    if fmt == "iso":
        return day.isoformat()
    rules = _locale_rules(locale)
    pattern = rules["dates"].get(fmt)
    if pattern is None:
        raise ValueError(f"date: unknown format {fmt!r}; use one of {', '.join(DATE_FORMATS)}")
    return pattern.format(
        y=day.year, yy=f"{day.year % 100:02d}", m=day.month, mm=f"{day.month:02d}", d=day.day,
        dd=f"{day.day:02d}", month=_EN_MONTHS[day.month - 1], mon=_EN_MONTHS[day.month - 1][:3],
        weekday=rules["weekdays"][day.weekday()])


@pass_context
def _money_filter(context, amount, currency: str | None = None) -> str:
    if currency is None:
        program = context.get("program")
        currency = program.get("currency") if isinstance(program, dict) else None
        if not currency:
            raise ValueError("money: the programme has no currency; set program.currency in "
                             "loyalty.yaml or write amount|money('CNY')")
    return format_money(amount, currency, context.get("locale"))


@pass_context
def _date_filter(context, value, fmt: str = "long") -> str:
    return format_date(value, fmt, context.get("locale"))


FILTERS_DOC = {
    "money": "an amount in the programme's currency, written the locale's way: 1234.5 -> "
             "¥1,234.50 (zh-CN), CN¥1,234.50 (en-US); `money('USD')` picks another currency",
    "date": "a date the locale's way: `date` (long) -> 2026年11月23日 / November 23, 2026; "
            "also `date('full')`, `date('medium')`, `date('short')`, `date('iso')`",
    "number": "a number with thousands separators: 12345 -> 12,345; `number(2)` keeps 2 decimals",
}

# ---------------------------------------------------------------------------- SMS length

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM7_EXTENSION = frozenset("\x0c^{}\\[~]|€")  # each takes two septets (escape + char)


def _pack(costs: list[int], per_part: int) -> int:
    """Parts needed when a character (escape pair or surrogate pair) never straddles parts."""
    parts, used = 1, 0
    for cost in costs:
        if used + cost > per_part:
            parts, used = parts + 1, 0
        used += cost
    return parts


def sms_segments(text: str) -> tuple[str, int]:
    """(encoding, segments): GSM-7 160 single / 153 a part, else UCS-2 70 / 67 UTF-16 units."""
    chars = set(text)
    if chars <= GSM7_BASIC | GSM7_EXTENSION:
        extension = chars & GSM7_EXTENSION
        septets = len(text) + sum(text.count(c) for c in extension)
        if septets <= 160:
            return "GSM-7", 1 if text else 0
        return "GSM-7", _pack([2 if c in extension else 1 for c in text], 153)
    units = len(text.encode("utf-16-le")) // 2
    if units <= 70:
        return "UCS-2", 1
    return "UCS-2", _pack([2 if ord(c) > 0xFFFF else 1 for c in text], 67)


def _finalize(value):
    """Missing values print as nothing rather than 'None' or 'nan'."""
    return "" if _is_missing(value) else value


def make_environment(templates_dir: Path, *, autoescape: bool = False) -> MessageEnvironment:
    """The one Jinja environment factory, used by validate, preview and delivery alike.

    ``autoescape=True`` is for the HTML part of emails; text, subjects, SMS and push use False.
    """
    env = MessageEnvironment(
        loader=ConfinedLoader(Path(templates_dir)), undefined=StrictUndefined,
        autoescape=autoescape, finalize=_finalize, trim_blocks=True, lstrip_blocks=True,
        auto_reload=False, cache_size=1000)
    env.filters.update(money=_money_filter, date=_date_filter, number=format_number)
    return env


# ---------------------------------------------------------------------------- the renderer

template_variables_doc = {
    "customer": "the customer's columns and every feature, e.g. customer.name, "
                "customer.orders_365d, customer.tier",
    "offer": "offer_id, campaign, campaign_name, variant, channel, send_at",
    "reward": "kind, description, cost, code, percent_off, amount_off, min_spend, expires_at, "
              "points, sku, tier (only the fields the reward has)",
    "program": "name, currency, timezone",
    "locale": "the locale of the template file being rendered, e.g. zh-CN",
}
_CHECKED_ATTRIBUTES = ("customer", "offer", "reward", "program")


@dataclass(frozen=True)
class RenderedMessage:
    """One rendered message; ``template_file`` is workspace-relative (templates/x.sms.zh-CN.j2)."""

    subject: str | None
    body: str
    html: str | None
    template_file: str
    sms_segments: int | None
    too_long: bool
    sms_encoding: str | None = None


SMS_TOO_LONG = "the SMS needs"   # how the over-long SMS warning starts (an error for SMS campaigns)


def _no_output(context):
    return iter(())


class Renderer:
    """Finds, compiles (once) and renders a campaign's templates for each customer."""

    def __init__(self, templates_dir: Path, default_locale: str, program: dict, *,
                 max_sms_segments: int = 2, max_output_chars: int = MAX_OUTPUT_CHARS,
                 max_render_seconds: float = MAX_RENDER_SECONDS,
                 max_render_seconds_per_run: float | None = None):
        self.templates_dir = Path(templates_dir)
        self.default_locale = normalise_locale(default_locale) or "en"
        self.program = dict(program)
        self.max_sms_segments = max_sms_segments
        self.max_output_chars = max_output_chars
        self.max_render_seconds = max_render_seconds
        self.max_render_seconds_per_run = (MAX_RENDER_SECONDS_PER_RUN if max_render_seconds_per_run is None
                                           else max_render_seconds_per_run)
        self.seconds_spent = 0.0    # rendering with this renderer so far, in this process
        self.text_env = make_environment(self.templates_dir)
        self.html_env = make_environment(self.templates_dir, autoescape=True)
        self._prefix = self.templates_dir.name or "templates"
        self._found: dict[tuple[str, str, str | None], tuple[str, str]] = {}
        self._loaded: dict[tuple[str, bool], jinja2.Template] = {}
        self._globals: dict[jinja2.Template, dict] = {}     # each template's globals, copied once

    # -- finding and loading

    def _candidates(self, template: str, channel: str, locale: str | None) -> list[tuple[str, str]]:
        check_template_name(template)
        check_template_name(channel)
        own = normalise_locale(locale) or self.default_locale
        candidates = []
        for tag in locale_chain(locale, self.default_locale):
            # Format money and dates for the customer's own locale when the file is in its
            # language (en-GB reading the "en" file gets British dates), else the file's.
            fmt = next((full for full in (own, self.default_locale)
                        if full == tag or full.startswith(tag + "-")), tag)
            candidates.append((f"{template}.{channel}.{tag}.j2", fmt))
        return candidates + [(f"{template}.{channel}.j2", own)]

    def _find(self, template: str, channel: str, locale: str | None) -> tuple[str, str]:
        key = (template, channel, locale)
        found = self._found.get(key)
        if found is None:
            candidates = self._candidates(template, channel, locale)
            for name, tag in candidates:
                if (self.templates_dir / name).is_file():
                    found = self._found[key] = (name, tag)
                    break
            else:
                looked = ", ".join(name for name, _ in candidates)
                raise TemplateError(template, f"no {channel} template found in {self._prefix}/; "
                                              f"looked for {looked}")
        return found

    def find(self, template: str, channel: str, locale: str) -> str:
        """The template file name (inside the templates folder) used for this locale."""
        return self._find(template, channel, locale)[0]

    def _confine(self, file: str) -> None:
        """Refuse a template file that links outside the templates folder, before reading it,
        so that nothing of the file it points to is rendered or quoted in an error."""
        folder = self.templates_dir.resolve()
        if not (self.templates_dir / file).resolve().is_relative_to(folder):
            raise TemplateError(f"{self._prefix}/{file}", "this template is a link to a file outside "
                                "the templates folder; it was not read")

    def _load(self, file: str, html: bool = False) -> jinja2.Template:
        tmpl = self._loaded.get((file, html))
        if tmpl is None:
            self._confine(file)
            env = self.html_env if html else self.text_env
            try:
                tmpl = env.get_template(file)
            except Exception as exc:  # noqa: BLE001 - every loading failure becomes a TemplateError
                raise self._error(exc, file, None) from exc
            self._loaded[(file, html)] = tmpl
        return tmpl

    # -- rendering

    def render(self, template: str, channel: str, locale: str | None, context: dict,
               customer_id: str | None = None) -> RenderedMessage:
        """Render one message; TemplateError names the file, the line and the customer."""
        file, file_locale = self._find(template, channel, locale)
        variables = dict(context)
        variables.setdefault("program", self.program)
        variables["locale"] = file_locale
        started = time.perf_counter()
        try:
            with message_budget(self.max_render_seconds, MAX_STEPS):
                return self._render(file, channel, variables, customer_id)
        finally:
            self.seconds_spent += time.perf_counter() - started

    def out_of_time(self) -> bool:
        """Whether this run's rendering time (``max_render_seconds_per_run``) is used up."""
        return self.seconds_spent >= self.max_render_seconds_per_run

    def _render(self, file: str, channel: str, variables: dict, customer_id) -> RenderedMessage:
        where = f"{self._prefix}/{file}"
        tmpl = self._load(file)
        if channel == "email":
            _, parts, names = self._parts(tmpl, variables, ("subject", "text"), file, customer_id)
            for name in ("subject", "text"):
                if name not in parts:
                    raise TemplateError(where, f"an email template needs "
                                               f"{{% block {name} %}}...{{% endblock %}}")
            html = None
            if "html" in names:  # autoescaped: rendered by the HTML environment's compilation
                _, html_parts, _ = self._parts(self._load(file, html=True), variables, ("html",),
                                            file, customer_id)
                html = html_parts.get("html")
                html = html.strip() if html is not None else None
            return RenderedMessage(" ".join(parts["subject"].split()), parts["text"].strip(),
                                   html, where, None, False)
        body, parts, _ = self._parts(tmpl, variables, ("title",), file, customer_id,
                                     want_body=True)
        title = " ".join(parts["title"].split()) if "title" in parts else None
        body = body.strip()
        if channel != "sms":
            return RenderedMessage(title, body, None, where, None, False)
        encoding, segments = sms_segments(body)
        return RenderedMessage(title, body, None, where, segments,
                               segments > self.max_sms_segments, encoding)

    def _parts(self, tmpl, variables: dict, blocks: tuple[str, ...], file: str, customer_id,
               want_body: bool = False) -> tuple[str, dict[str, str], set[str]]:
        """Render the template body with ``blocks`` left out, then each of those blocks alone.

        The body pass runs top-level ``{% set %}``/``{% import %}`` and ``{% extends %}`` so
        that blocks see them and inherit parent blocks; its output is discarded unless wanted.
        """
        # what Template.new_context(variables) makes, without copying the template's globals
        # (a ChainMap) key by key for every message
        globals_ = self._globals.get(tmpl)
        if globals_ is None:
            globals_ = self._globals[tmpl] = dict(tmpl.globals)
        ctx = tmpl.new_context({**globals_, **variables}, shared=True)
        for name in blocks:
            ctx.blocks[name] = [_no_output] + ctx.blocks.get(name, [])
        body = self._collect(tmpl, tmpl.root_render_func, ctx, file, customer_id)
        parts = {}
        for name in blocks:
            chain = [f for f in ctx.blocks.get(name, []) if f is not _no_output]
            if chain:
                ctx.blocks[name] = chain
                parts[name] = self._collect(tmpl, chain[0], ctx, file, customer_id)
        return (body if want_body else ""), parts, set(ctx.blocks)

    def _collect(self, tmpl, render_func, ctx, file: str, customer_id) -> str:
        try:
            # all at once: the sandbox's budget (MAX_WORK_CHARS, MAX_STEPS) bounds what a
            # template can produce, and the whole message is checked against the limit below
            text = "".join(render_func(ctx))
            check_time()
        except Exception:  # noqa: BLE001 - rewrite the traceback to template lines, then convert
            try:
                tmpl.environment.handle_exception()
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, file, customer_id) from exc
        if len(text) > self.max_output_chars:
            raise TemplateError(f"{self._prefix}/{file}", f"the message is longer than "
                                f"{self.max_output_chars:,} characters", customer_id=customer_id)
        return text

    def _error(self, exc: BaseException, file: str, customer_id) -> TemplateError:
        """A TemplateError at the innermost template line of the traceback."""
        if isinstance(exc, TemplateError):
            return exc
        line, where = None, file
        if isinstance(exc, TemplateSyntaxError):
            line, where = exc.lineno, exc.name or file
            kind = "not allowed" if isinstance(exc, RefusedSyntax) else "syntax error"
            message = f"{kind}: {exc.message}"
        else:
            tb = exc.__traceback__
            while tb is not None:
                if "__jinja_exception__" in tb.tb_frame.f_globals:
                    line = tb.tb_lineno
                    path = Path(tb.tb_frame.f_code.co_filename)
                    if path.resolve().is_relative_to(self.templates_dir.resolve()):
                        where = path.resolve().relative_to(self.templates_dir.resolve()).as_posix()
                tb = tb.tb_next
            message = _describe(exc)
        return TemplateError(f"{self._prefix}/{where}", message, line, customer_id)

    # -- validation

    def check(self, template: str, channel: str, locale: str | None,
              context: dict) -> list[Problem]:
        """Problems ``validate`` reports: syntax, unknown names and fields, a trial render."""
        try:
            file, file_locale = self._find(template, channel, locale)
        except TemplateError as exc:
            try:
                wanted = f"{self._prefix}/{self._candidates(template, channel, locale)[0][0]}"
            except TemplateError:
                wanted = self._prefix
            return [Problem(wanted, 1, 1, exc.message,
                            "create the file, or fix the campaign's template or channel")]
        where = f"{self._prefix}/{file}"
        try:
            self._confine(file)
            source = (self.templates_dir / file).read_text(encoding="utf-8")
            tree = self.text_env.parse(source, name=file)
        except TemplateError as exc:
            return [Problem(where, 1, 1, exc.message, "copy the file into the templates folder "
                            "instead of linking to it")]
        except UnicodeDecodeError:
            return [Problem(where, 1, 1, "template file is not UTF-8 text")]
        except TemplateSyntaxError as exc:
            return [Problem(where, exc.lineno or 1, 1, f"syntax error: {exc.message}")]
        problems = [Problem(where, line, 1, message) for line, message in tree_problems(tree)]
        variables = dict(context)
        variables.setdefault("program", self.program)
        variables["locale"] = file_locale
        problems += self._name_problems(tree, variables, where)
        if channel == "email" and not any(tree.find_all(nodes.Extends)):
            defined = {b.name for b in tree.find_all(nodes.Block)}
            problems += [Problem(where, 1, 1, f"an email template needs {{% block {name} %}}")
                         for name in ("subject", "text") if name not in defined]
        if problems:
            return problems
        try:
            message, seconds = self._timed_render(template, channel, locale, context)
        except TemplateError as exc:
            return [Problem(exc.template, exc.line or 1, 1, exc.message)]
        if seconds > SLOW_MESSAGE_SECONDS:
            problems.append(self._slow_problem(where, seconds))
        if message.too_long:
            problems.append(Problem(where, 1, 1, f"{SMS_TOO_LONG} {message.sms_segments} segments "
                            f"({message.sms_encoding}, {len(message.body)} characters); the "
                            f"limit is {self.max_sms_segments}",
                            "shorten the text; Chinese or emoji make SMS parts 70/67 "
                            "characters instead of 160/153", severity="warning"))
        return problems

    def _timed_render(self, template: str, channel: str, locale: str | None,
                      context: dict) -> tuple[RenderedMessage, float]:
        """A trial render and how long one message took. A slow first render is timed again,
        so that loading and compiling the template are not counted."""
        seconds = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            message = self.render(template, channel, locale, context)
            seconds = min(seconds, time.perf_counter() - started)
            if seconds <= SLOW_MESSAGE_SECONDS:
                break
        return message, seconds

    def _slow_problem(self, where: str, seconds: float) -> Problem:
        """A template that renders, but slowly enough to hold up a run."""
        per_run = self.max_render_seconds_per_run
        return Problem(
            where, 1, 1, f"this template is slow: one message takes more than "
            f"{SLOW_MESSAGE_SECONDS * 1000:.0f} ms to render",
            f"it took {seconds * 1000:.0f} ms for a sample customer; a run renders for at most "
            f"{per_run:g} s, about {per_run / seconds:,.0f} such messages; simplify its loops and "
            "filters", severity="warning")

    def _name_problems(self, tree: nodes.Template, variables: dict, where: str) -> list[Problem]:
        known = set(variables) | set(self.text_env.globals)
        problems = []
        for name in sorted(meta.find_undeclared_variables(tree) - known):
            line = next((n.lineno for n in tree.find_all(nodes.Name) if n.name == name), 1)
            problems.append(Problem(where, line, 1, f"unknown variable '{name}'",
                                    _did_you_mean(name, known)))
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            if not (isinstance(node.node, nodes.Name) and node.node.name in _CHECKED_ATTRIBUTES):
                continue
            if isinstance(node, nodes.Getattr):
                field = node.attr
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                field = node.arg.value
            else:
                continue
            sample = variables.get(node.node.name)
            if isinstance(sample, dict) and field not in sample and not hasattr(dict, field):
                problems.append(Problem(
                    where, node.lineno, 1, f"{node.node.name} has no field '{field}'",
                    _did_you_mean(field, sample)))
        return problems


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f"did you mean '{close[0]}'?" if close else ""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TemplateNotFound):
        if exc.message != exc.name:
            return f"not allowed: {exc.message}"
        return (f"included template '{exc.name}' not found (names are relative to the "
                "templates folder)")
    if isinstance(exc, UndefinedError):
        return f"undefined: {exc.message}"
    if isinstance(exc, SecurityError):
        return f"not allowed: {exc}"
    if isinstance(exc, RecursionError):
        return "not allowed: the template calls itself too deeply"
    if isinstance(exc, MemoryError):
        return "not allowed: the template used too much memory"
    return f"{type(exc).__name__}: {exc}"

