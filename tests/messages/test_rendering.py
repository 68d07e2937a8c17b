"""Rendering: locale fallback, email blocks, filters, the sandbox's limits, SMS length, check()."""

from __future__ import annotations

import time
from datetime import date, datetime
from pathlib import Path

import pytest

from engine.errors import TemplateError
from engine.messages import rendering, sandbox
from engine.messages.rendering import (
    GSM7_BASIC,
    RenderedMessage,
    Renderer,
    check_template_name,
    format_date,
    format_money,
    locale_chain,
    make_environment,
    sms_segments,
    template_variables_doc,
)

PROGRAM = {"name": "星享会员", "currency": "CNY", "timezone": "Asia/Shanghai"}
CONTEXT = {
    "customer": {"customer_id": "C001", "name": "王芳", "tier": "gold", "orders_365d": 7},
    "offer": {"offer_id": "o-1", "campaign": "winback", "campaign_name": "沉睡客唤醒",
              "variant": "A", "channel": "sms", "send_at": "2026-11-20T09:00:00+08:00"},
    "reward": {"kind": "coupon", "percent_off": 20, "min_spend": 1234.5, "code": "WB-7KQ2",
               "expires_at": "2026-11-23", "cost": 12.0},
}


def write(folder: Path, files: dict[str, str]) -> Path:
    templates = folder / "templates"
    templates.mkdir(exist_ok=True)
    for name, text in files.items():
        (templates / name).parent.mkdir(parents=True, exist_ok=True)
        (templates / name).write_text(text, encoding="utf-8")
    return templates


def renderer(tmp_path: Path, files: dict[str, str], **kwargs) -> Renderer:
    return Renderer(write(tmp_path, files), "en-US", PROGRAM, **kwargs)


# --------------------------------------------------------------------------- names and locales

def test_locale_chain():
    assert locale_chain("zh-CN", "en-US") == ["zh-CN", "zh", "en-US", "en"]
    assert locale_chain("zh_cn", "en-US") == ["zh-CN", "zh", "en-US", "en"]
    assert locale_chain("en-GB", "en-US") == ["en-GB", "en", "en-US"]
    assert locale_chain(None, "zh-CN") == ["zh-CN", "zh"]
    assert locale_chain("../../etc", "zh-CN") == ["zh-CN", "zh"]  # not a locale tag: ignored


@pytest.mark.parametrize("present, locale, expected", [
    (["w.sms.zh-CN.j2", "w.sms.zh.j2", "w.sms.en-US.j2", "w.sms.j2"], "zh-CN", "w.sms.zh-CN.j2"),
    (["w.sms.zh.j2", "w.sms.en-US.j2", "w.sms.j2"], "zh-CN", "w.sms.zh.j2"),
    (["w.sms.en-US.j2", "w.sms.j2"], "zh-CN", "w.sms.en-US.j2"),
    (["w.sms.en.j2", "w.sms.j2"], "zh-CN", "w.sms.en.j2"),
    (["w.sms.j2"], "zh-CN", "w.sms.j2"),
    (["w.sms.zh.j2", "w.sms.j2"], "zh-TW", "w.sms.zh.j2"),
    (["w.sms.en-US.j2"], None, "w.sms.en-US.j2"),
    (["w.sms.zh.j2", "w.sms.en-US.j2"], "not a locale!", "w.sms.en-US.j2"),
])
def test_locale_fallback_chain(tmp_path, present, locale, expected):
    r = renderer(tmp_path, {name: "hi" for name in present})
    assert r.find("w", "sms", locale) == expected


def test_missing_template_lists_files_looked_for(tmp_path):
    r = renderer(tmp_path, {"w.email.zh-CN.j2": "x"})
    with pytest.raises(TemplateError) as err:
        r.find("w", "sms", "zh-CN")
    for name in ("w.sms.zh-CN.j2", "w.sms.zh.j2", "w.sms.en-US.j2", "w.sms.en.j2", "w.sms.j2"):
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["", " ", "../x", "a/b", "a\\b", "/etc/passwd", "..",
                                  "C:evil", "x..y", ".hidden", None])
def test_bad_template_names(name):
    with pytest.raises(TemplateError, match="template name"):
        check_template_name(name)


@pytest.mark.parametrize("name", ["winback", "birthday_care", "vip-upgrade", "nps.v2"])
def test_good_template_names(name):
    check_template_name(name)


def test_renderer_refuses_path_template_names(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "hi"})
    with pytest.raises(TemplateError, match="not paths"):
        r.render("../templates/w", "sms", "zh-CN", CONTEXT)


# --------------------------------------------------------------------------- rendering

def test_sms_body_is_whole_template_trimmed(tmp_path):
    r = renderer(tmp_path, {"w.sms.zh-CN.j2": (
        "\n{{ customer.name }}您好，{{ offer.campaign_name }}：{{ reward.percent_off }}%券，"
        "满{{ reward.min_spend|money }}可用，{{ reward.expires_at|date }}前有效。\n\n")})
    msg = r.render("w", "sms", "zh-CN", CONTEXT, customer_id="C001")
    assert msg.body == "王芳您好，沉睡客唤醒：20%券，满¥1,234.50可用，2026年11月23日前有效。"
    assert (msg.subject, msg.html, msg.sms_encoding, msg.sms_segments, msg.too_long) == (
        None, None, "UCS-2", 1, False)
    assert msg.template_file == "templates/w.sms.zh-CN.j2"


def test_email_blocks_rendered_separately_html_escaped(tmp_path):
    r = renderer(tmp_path, {"w.email.en.j2": (
        "{% set who = customer.name ~ ' & co' %}\n"
        "{% block subject %}\n  {{ who }}, we\n miss you\n{% endblock %}\n"
        "{% block text %}\nHi {{ who }},\nspend {{ reward.min_spend|money }}.\n{% endblock %}\n"
        "{% block html %}<p>Hi {{ who }}</p>{% endblock %}\n")})
    ctx = {**CONTEXT, "customer": {**CONTEXT["customer"], "name": "<Tom>"}}
    msg = r.render("w", "email", "en-US", ctx)
    assert msg.subject == "<Tom> & co, we miss you"           # one line, not escaped
    assert msg.body == "Hi <Tom> & co,\nspend CN¥1,234.50."    # plain text: not escaped
    assert msg.html == "<p>Hi &lt;Tom&gt; &amp; co</p>"        # HTML: escaped
    assert msg.sms_segments is None


def test_email_blocks_inherited_from_a_layout(tmp_path):
    r = renderer(tmp_path, {
        "layout.j2": ("{% block subject %}{{ program.name }}{% endblock %}"
                      "{% block text %}{% block content %}{% endblock %}\n\n-- {{ program.name }}"
                      "{% endblock %}{% block html %}<div>{{ self.content() }}</div>"
                      "{% endblock %}"),
        "w.email.zh-CN.j2": ("{% extends 'layout.j2' %}"
                             "{% block subject %}{{ super() }}：{{ customer.name }}{% endblock %}"
                             "{% block content %}您好 {{ customer.name }}{% endblock %}")})
    msg = r.render("w", "email", "zh-CN", {**CONTEXT, "customer": {"name": "<王芳>"}})
    assert msg.subject == "星享会员：<王芳>"
    assert msg.body == "您好 <王芳>\n-- 星享会员"
    assert msg.html == "<div>您好 &lt;王芳&gt;</div>"


def test_email_without_subject_block_fails(tmp_path):
    r = renderer(tmp_path, {"w.email.j2": "{% block text %}hi{% endblock %}"})
    with pytest.raises(TemplateError, match="block subject"):
        r.render("w", "email", "en", CONTEXT)


def test_push_title_block_and_body(tmp_path):
    r = renderer(tmp_path, {"w.push.j2": (
        "{% block title %}{{ program.name }}{% endblock %}\n{{ customer.name }}，券已到账")})
    msg = r.render("w", "push", "zh-CN", CONTEXT)
    assert (msg.subject, msg.body) == ("星享会员", "王芳，券已到账")


def test_missing_values_print_as_nothing(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "[{{ customer.nick }}]{{ customer.nick or '会员' }}"})
    ctx = {**CONTEXT, "customer": {"nick": None}}
    assert r.render("w", "sms", "zh-CN", ctx).body == "[]会员"


def test_dict_fields_win_over_dict_methods(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "{{ reward.items }} {{ reward.values }}"})
    ctx = {**CONTEXT, "reward": {"items": "2 gifts", "values": 3}}
    assert r.render("w", "sms", "en", ctx).body == "2 gifts 3"


def test_compiled_templates_are_cached(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "{{ customer.name }}"})
    r.render("w", "sms", "zh-CN", CONTEXT)
    (tmp_path / "templates" / "w.sms.j2").write_text("changed", encoding="utf-8")
    assert r.render("w", "sms", "zh-CN", CONTEXT).body == "王芳"


# --------------------------------------------------------------------------- money and dates

@pytest.mark.parametrize("amount, currency, locale, expected", [
    (1234.5, "CNY", "zh-CN", "¥1,234.50"),
    (1234.5, "CNY", "zh", "¥1,234.50"),
    (1234.5, "CNY", "en-US", "CN¥1,234.50"),
    (1234.5, "USD", "en-US", "$1,234.50"),
    (1234.5, "USD", "en", "$1,234.50"),
    (1234.5, "USD", "zh-CN", "US$1,234.50"),
    (1234.5, "GBP", "en-GB", "£1,234.50"),
    (1234.5, "USD", "en-GB", "US$1,234.50"),
    (1234.5, "JPY", "en-US", "¥1,235"),
    (-0.005, "CNY", "zh-CN", "-¥0.01"),
    (0.004, "CNY", "zh-CN", "¥0.00"),
    (1000000, "CNY", "zh-CN", "¥1,000,000.00"),
    (2.675, "CNY", "zh-CN", "¥2.68"),
    (5, "CHF", "en-US", "CHF 5.00"),
    (5, "CNY", "fr-FR", "CN¥5.00"),
])
def test_money(amount, currency, locale, expected):
    assert format_money(amount, currency, locale) == expected


@pytest.mark.parametrize("value, fmt, locale, expected", [
    (date(2026, 11, 23), "long", "zh-CN", "2026年11月23日"),
    (date(2026, 11, 23), "long", "en-US", "November 23, 2026"),
    (date(2026, 11, 23), "long", "en-GB", "23 November 2026"),
    ("2026-11-23", "full", "zh-CN", "2026年11月23日星期一"),
    ("2026-11-23T22:30:00+08:00", "full", "en-US", "Monday, November 23, 2026"),
    (datetime(2026, 1, 5, 9), "short", "en-US", "1/5/26"),
    (datetime(2026, 1, 5, 9), "short", "zh-CN", "2026/1/5"),
    (datetime(2026, 1, 5, 9), "medium", "en-US", "Jan 5, 2026"),
    (date(2026, 1, 5), "iso", "zh-CN", "2026-01-05"),
])
def test_date(value, fmt, locale, expected):
    assert format_date(value, fmt, locale) == expected


def test_date_accepts_pandas_timestamp():
    pd = pytest.importorskip("pandas")
    assert format_date(pd.Timestamp("2026-11-23 08:00"), "long", "en-US") == "November 23, 2026"


def test_filters_follow_the_template_locale(tmp_path):
    files = {f"w.sms.{loc}.j2": "{{ reward.min_spend|money }} {{ reward.expires_at|date }} "
                                "{{ 12345|number }} {{ 5|money('USD') }}"
             for loc in ("zh", "en")}
    r = renderer(tmp_path, files)
    assert r.render("w", "sms", "zh-CN", CONTEXT).body == "¥1,234.50 2026年11月23日 12,345 US$5.00"
    assert r.render("w", "sms", "en-US", CONTEXT).body == (
        "CN¥1,234.50 November 23, 2026 12,345 $5.00")
    # an en-GB customer reading the "en" file gets British dates
    assert r.render("w", "sms", "en-GB", CONTEXT).body == (
        "CN¥1,234.50 23 November 2026 12,345 US$5.00")


@pytest.mark.parametrize("text, message", [
    ("{{ customer.none|money }}", "money: the value is empty"),
    ("{{ 'abc'|date }}", "not an ISO date"),
    ("{{ reward.expires_at|date('fancy') }}", "unknown format"),
])
def test_filter_errors_are_template_errors(tmp_path, text, message):
    r = renderer(tmp_path, {"w.sms.j2": "hello\n" + text})
    ctx = {**CONTEXT, "customer": {"none": None}}
    with pytest.raises(TemplateError, match=message) as err:
        r.render("w", "sms", "en", ctx, customer_id="C9")
    assert (err.value.line, err.value.customer_id) == (2, "C9")


# --------------------------------------------------------------------------- errors and sandbox

def test_strict_undefined_names_template_line_and_customer(tmp_path):
    r = renderer(tmp_path, {"w.sms.zh-CN.j2": "您好\n{{ customer.name }}\n{{ customer.nmae }}"})
    with pytest.raises(TemplateError) as err:
        r.render("w", "sms", "zh-CN", CONTEXT, customer_id="C001")
    e = err.value
    assert (e.template, e.line, e.customer_id) == ("templates/w.sms.zh-CN.j2", 3, "C001")
    assert str(e).startswith("templates/w.sms.zh-CN.j2:3: undefined: ")
    assert "nmae" in str(e) and "(customer C001)" in str(e)


def test_error_in_included_file_names_that_file(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "a\n{% include 'parts/footer.j2' %}",
                            "parts/footer.j2": "ok\n\n{{ nope }}"})
    with pytest.raises(TemplateError) as err:
        r.render("w", "sms", "en", CONTEXT, customer_id="C1")
    assert (err.value.template, err.value.line) == ("templates/parts/footer.j2", 3)


def test_syntax_error_names_file_and_line(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "hi\n{% if %}\n"})
    with pytest.raises(TemplateError, match="syntax error") as err:
        r.render("w", "sms", "en", CONTEXT)
    assert (err.value.template, err.value.line) == ("templates/w.sms.j2", 2)


HOSTILE = [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ x.append(1) }}", "unsafe"),
    ("{{ customer.update({'name': 1}) }}", "unsafe"),
    ("{{ cycler.__init__.__globals__ }}", "unsafe"),
    ("{{ '{0.__class__}'|attr('format')('x') }}", "unsafe"),
    ("{{ '{0.__class__.__mro__}'.format(x) }}", "unsafe"),
    ("{{ x|attr('__class__') }}", "unsafe"),
    ("{{ 3 ** 50000000 }}", "\\*\\* operator"),
    ("{{ 'a' * 10**8 }}", "not allowed"),
    ("{{ 'a' * n }}", "repeating text"),
    ("{{ x * (n * 1000) }}", "longer than"),
    ("{{ m * m * m * m * m * m * m * m }}", "number too big"),
    ("{% for i in range(1000000) %}x{% endfor %}", "range"),
    ("{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}", "loop steps"),
    ("{% macro f(k) %}{% if k %}{{ f(k-1) }}{{ f(k-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
     "loop steps"),
    ("{% for i in [1] recursive %}{{ loop([1]) }}{% endfor %}", "recursive"),
    ("{% set ns = namespace(s='x' * 1000) %}{% for i in range(30) %}"
     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "longer than"),
    ("{% set big %}{% for i in range(9000) %}" + "y" * 200 + "{% endfor %}{% endset %}ok",
     "characters of text"),
    ("{{ 'x'.center(1000000000) }}", "longer than"),
    ("{{ 'x'|center(1000000000) }}", "size above"),
    ("{{ 'x'|indent(1000000000) }}", "size above"),
    ("{{ '%0999999999d' % 1 }}", "format widths"),
    ("{{ '%0999999999d'|format(1) }}", "format widths"),
    ("{{ '{:>999999999}'.format(1) }}", "format widths"),
    ("{{ lipsum(1000000) }}", "'lipsum' is undefined"),
    ("{% include '../../etc/passwd' %}", "outside the templates folder"),
    ("{% extends '/etc/passwd' %}", "not a template name"),
    ("{% set p = '../' ~ 'secret.txt' %}{% include p %}", "outside the templates folder"),
    ("{% import '..\\\\x.j2' as m %}", "not a template name"),
]


@pytest.mark.parametrize("text, message", HOSTILE)
def test_hostile_templates_fail_clearly(tmp_path, text, message):
    (tmp_path / "secret.txt").write_text("TOP SECRET", encoding="utf-8")
    r = renderer(tmp_path, {"h.sms.j2": "hello {{ customer.name }}\n" + text})
    ctx = {**CONTEXT, "x": [1, 2], "n": 200, "m": 10 ** 600}
    started = time.perf_counter()
    with pytest.raises(TemplateError, match=message) as err:
        r.render("h", "sms", "zh-CN", ctx, customer_id="C001")
    assert time.perf_counter() - started < 2
    assert err.value.template == "templates/h.sms.j2"
    assert err.value.line == 2
    assert "TOP SECRET" not in str(err.value)


def test_include_inside_folder_is_allowed(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "{% include 'parts/sig.j2' %}", "parts/sig.j2": "—星享"})
    assert r.render("w", "sms", "zh-CN", CONTEXT).body == "—星享"


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.txt").write_text("TOP SECRET", encoding="utf-8")
    templates = write(tmp_path, {"w.sms.j2": "{% include 'link.j2' %}"})
    (templates / "link.j2").symlink_to(tmp_path / "secret.txt")
    r = Renderer(templates, "en-US", PROGRAM)
    with pytest.raises(TemplateError, match="outside the templates folder") as err:
        r.render("w", "sms", "en", CONTEXT)
    assert "TOP SECRET" not in str(err.value)


def test_small_repetition_is_fine(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "{{ '-' * 5 }}{% for i in range(3) %}{{ i }}{% endfor %}"})
    assert r.render("w", "sms", "en", CONTEXT).body == "-----012"


def test_output_size_cap(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "{% for i in range(5000) %}{{ '0123456789' * 2 }}"
                                        "{% endfor %}"})
    with pytest.raises(TemplateError, match="longer than 65,536 characters") as err:
        r.render("w", "sms", "en", CONTEXT, customer_id="C7")
    assert err.value.customer_id == "C7"
    write(tmp_path, {"short.sms.j2": "0123456789"})
    small = Renderer(tmp_path / "templates", "en-US", PROGRAM, max_output_chars=5)
    with pytest.raises(TemplateError, match="longer than 5 characters"):
        small.render("short", "sms", "en", CONTEXT)


def test_render_time_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(rendering, "MAX_STEPS", 10 ** 9)
    r = renderer(tmp_path, {"w.sms.j2": "{% for i in range(9000) %}{% for j in range(9000) %}"
                                        "{% endfor %}{% endfor %}"}, max_render_seconds=0.2)
    started = time.perf_counter()
    with pytest.raises(TemplateError, match="longer than 0.2 s"):
        r.render("w", "sms", "en", CONTEXT)
    assert time.perf_counter() - started < 2


def test_environment_factory_settings(tmp_path):
    env = make_environment(write(tmp_path, {}))
    assert env.sandboxed and not env.autoescape and "lipsum" not in env.globals
    assert {"money", "date", "number"} <= set(env.filters)
    assert make_environment(tmp_path / "templates", autoescape=True).autoescape is True


def test_old_jinja_is_refused():
    with pytest.raises(TemplateError, match=">= 3.1.6"):
        sandbox._require_jinja("3.1.5")
    sandbox._require_jinja("3.1.6")
    sandbox._require_jinja("3.2.0")


# --------------------------------------------------------------------------- SMS length

def test_gsm7_charset_has_127_characters():
    assert len(GSM7_BASIC) == 127


@pytest.mark.parametrize("text, expected", [
    ("", ("GSM-7", 0)),
    ("a" * 160, ("GSM-7", 1)),
    ("a" * 161, ("GSM-7", 2)),
    ("a" * 306, ("GSM-7", 2)),
    ("a" * 307, ("GSM-7", 3)),
    ("€" * 80, ("GSM-7", 1)),            # extension characters count double
    ("€" * 81, ("GSM-7", 2)),
    ("a" * 159 + "[", ("GSM-7", 2)),
    ("a" * 152 + "{" + "a" * 10, ("GSM-7", 2)),  # an escape pair never straddles two parts
    ("a" * 152 + "{" + "a" * 152, ("GSM-7", 3)),
    ("Ünöcödé? ñ, é, ü, à and Ç are GSM", ("GSM-7", 1)),
    ("中" * 70, ("UCS-2", 1)),
    ("中" * 71, ("UCS-2", 2)),
    ("中" * 134, ("UCS-2", 2)),
    ("中" * 135, ("UCS-2", 3)),
    ("😀" * 35, ("UCS-2", 1)),           # emoji are two UTF-16 units
    ("😀" * 36, ("UCS-2", 2)),
    ("a" * 159 + "ç", ("UCS-2", 3)),     # ç (lower case) is not GSM-7
])
def test_sms_segments(text, expected):
    assert sms_segments(text) == expected


def test_too_long_sms_is_flagged(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "{{ '中' * 140 }}"})
    msg = r.render("w", "sms", "zh-CN", CONTEXT)
    assert (msg.sms_segments, msg.too_long) == (3, True)
    assert Renderer(tmp_path / "templates", "en", PROGRAM, max_sms_segments=3).render(
        "w", "sms", "zh-CN", CONTEXT).too_long is False


# --------------------------------------------------------------------------- check()

def test_check_finds_typo_with_line_and_hint(tmp_path):
    r = renderer(tmp_path, {"winback.sms.zh-CN.j2": "您好\n\n{{ customer.nmae }}，{{ reward.code }}"})
    problems = r.check("winback", "sms", "zh-CN", CONTEXT)
    assert len(problems) == 1
    p = problems[0]
    assert (p.file, p.line, p.column) == ("templates/winback.sms.zh-CN.j2", 3, 1)
    assert "nmae" in p.message and p.hint == "did you mean 'name'?"
    assert str(p).startswith("templates/winback.sms.zh-CN.j2:3:1: customer has no field 'nmae'")


def test_check_unknown_top_level_variable(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "hi\n{{ costumer.name }}"})
    [p] = r.check("w", "sms", "zh-CN", CONTEXT)
    assert (p.line, p.message, p.hint) == (2, "unknown variable 'costumer'",
                                           "did you mean 'customer'?")


def test_check_syntax_error(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "a\nb\n{% for x in %}"})
    [p] = r.check("w", "sms", "zh-CN", CONTEXT)
    assert (p.file, p.line) == ("templates/w.sms.j2", 3) and "syntax error" in p.message


def test_check_refused_construct(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": "a\n{{ 2 ** 8 }}"})
    [p] = r.check("w", "sms", "zh-CN", CONTEXT)
    assert p.line == 2 and "**" in p.message


def test_check_trial_render_and_sms_length(tmp_path):
    r = renderer(tmp_path, {"a.sms.j2": "{{ reward.code|money }}",
                            "b.sms.j2": "{{ '长' * 200 }}",
                            "c.email.j2": "{% block text %}x{% endblock %}",
                            "d.sms.zh.j2": "{{ customer.name }} {{ reward['code'] }} {{ locale }}"})
    [p] = r.check("a", "sms", "zh-CN", CONTEXT)
    assert "not a number" in p.message and p.line == 1
    [p] = r.check("b", "sms", "zh-CN", CONTEXT)
    assert p.severity == "warning" and "segments" in p.message
    [p] = r.check("c", "email", "zh-CN", CONTEXT)
    assert "block subject" in p.message
    assert r.check("d", "sms", "zh-CN", CONTEXT) == []


def test_check_missing_template(tmp_path):
    r = renderer(tmp_path, {})
    [p] = r.check("nope", "sms", "zh-CN", CONTEXT)
    assert p.file == "templates/nope.sms.zh-CN.j2" and "looked for" in p.message


# --------------------------------------------------------------------------- docs and speed

def test_docs_describe_every_variable_and_filter():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "templates.md").read_text("utf-8")
    for name in list(template_variables_doc) + list(rendering.FILTERS_DOC):
        assert f"`{name}" in docs, name
    assert "RenderedMessage" not in docs  # written for marketers


def test_render_speed(tmp_path, capsys):
    r = renderer(tmp_path, {"w.sms.zh-CN.j2": (
        "【{{ program.name }}】{{ customer.name }}，送您{{ reward.percent_off }}%券，"
        "满{{ reward.min_spend|money }}可用，{{ reward.expires_at|date }}前有效，"
        "码{{ reward.code }}。退订回T")})
    contexts = [{**CONTEXT, "customer": {"name": f"客户{i}"},
                 "reward": {**CONTEXT["reward"], "code": f"C{i:06d}"}} for i in range(20_000)]
    started = time.perf_counter()
    for i, ctx in enumerate(contexts):
        msg = r.render("w", "sms", "zh-CN", ctx, customer_id=str(i))
    elapsed = time.perf_counter() - started
    assert isinstance(msg, RenderedMessage) and msg.body.endswith("码C019999。退订回T")
    with capsys.disabled():
        print(f"\n  rendered {len(contexts):,} SMS in {elapsed:.2f} s: "
              f"{len(contexts) / elapsed:,.0f} messages/s ({elapsed / len(contexts) * 1e6:.1f} µs each)")


def test_honest_uses_of_sized_operations_still_work(tmp_path):
    r = renderer(tmp_path, {"w.sms.j2": (
        "{{ '%d pts'|format(25000) }} {{ '%s/%s' % (1, 2) }} {{ '{:,}'.format(12345) }} "
        "{{ 'abc'|center(7) }}|{{ 'long text here'|truncate(5000) }} {{ [1, 2]|join('-') }} "
        "{{ 'a-b'|replace('-', '+') }} {{ 'x'.ljust(3) }}|")})
    assert r.render("w", "sms", "en", CONTEXT).body == (
        "25000 pts 1/2 12,345   abc  |long text here 1-2 a+b x  |")


def test_pandas_missing_values(tmp_path):
    pd = pytest.importorskip("pandas")
    r = renderer(tmp_path, {"w.sms.j2": "[{{ customer.a }}][{{ customer.b }}][{{ customer.c }}]"})
    ctx = {**CONTEXT, "customer": {"a": pd.NA, "b": pd.NaT, "c": float("nan")}}
    assert r.render("w", "sms", "en", ctx).body == "[][][]"
    with pytest.raises(ValueError, match="empty"):
        format_money(pd.NA, "CNY", "zh-CN")
    with pytest.raises(ValueError, match="empty"):
        format_date(pd.NaT, "long", "zh-CN")
