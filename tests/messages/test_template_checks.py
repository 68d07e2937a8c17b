"""Templates checked before sending: `loyalty validate` renders every campaign's templates,
per channel and locale, for a synthetic customer, and names the template's file:line."""

from pathlib import Path

import pytest

from engine.app.scaffold import init_workspace
from engine.app.validation import load_workspace, validate_workspace
from engine.messages.template_checks import sample_customer

WINBACK_ZH = "templates/winback.sms.zh-CN.j2"
WINBACK_EN = "templates/winback.sms.en-US.j2"
VIP_ZH = "templates/vip_thanks.email.zh-CN.j2"


@pytest.fixture
def workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    init_workspace(root)
    return root


def _errors(root: Path) -> list[str]:
    return [str(p) for p in validate_workspace(root).problems if p.severity == "error"]


def test_the_scaffold_templates_pass(workspace):
    assert _errors(workspace) == []


@pytest.mark.parametrize("file, text, expected", [
    # a typo in a customer field, on line 2 of the template
    (WINBACK_ZH, "【My Rewards】\n{{ customer.nmae }}，好久不见！券码{{ reward.code }}。回T退订\n",
     f"{WINBACK_ZH}:2:1: customer has no field 'nmae' (did you mean 'name'?)"),
    # a typo in a top-level variable, inside a branch the sample customer would not take
    (WINBACK_EN, "Hi {{ customer.name }}!\n{% if customer.tier == 'none' %}\n{{ rewrd.code }}\n{% endif %}\n",
     f"{WINBACK_EN}:3:1: unknown variable 'rewrd' (did you mean 'reward'?)"),
    # a syntax error
    (VIP_ZH, "{% block subject %}谢谢{% endblock %}\n{% block text %}\n{{ reward.points }\n{% endblock %}\n",
     f"{VIP_ZH}:3:1: syntax error"),
    # an SMS of 3 parts where the channel allows 2 (Chinese: 70 characters a part, 67 when split)
    (WINBACK_ZH, "{{ customer.name }}，" + "好久不见，" * 30 + "回T退订\n",
     f"{WINBACK_ZH}:1:1: rendered for a sample customer, the SMS needs 3 segments"),
])
def test_a_broken_template_fails_validation_at_its_line(workspace, file, text, expected):
    settings = workspace / "loyalty.yaml"
    settings.write_text(settings.read_text(encoding="utf-8").replace(
        "sms:   {send: file, path: outbox/sms.jsonl}",
        "sms:   {send: file, path: outbox/sms.jsonl, max_sms_segments: 2}"), encoding="utf-8")
    (workspace / file).write_text(text, encoding="utf-8")
    result = validate_workspace(workspace)
    assert not result.ok
    errors = _errors(workspace)
    assert any(e.startswith(expected) for e in errors), errors


def test_every_locale_and_variant_template_is_checked(workspace):
    rules = workspace / "rules" / "programme.yaml"
    rules.write_text(rules.read_text(encoding="utf-8").replace(
        "    cooldown: 30d\n",
        "    cooldown: 30d\n    variants:\n      - {name: A, weight: 1}\n"
        "      - {name: B, weight: 1, template: winback_short}\n", 1), encoding="utf-8")
    (workspace / "templates" / "winback_short.sms.zh-CN.j2").write_text(
        "{{ customer.name }}，{{ reward.cod }}\n", encoding="utf-8")
    (workspace / "templates" / "winback_short.sms.en-US.j2").write_text(
        "{{ customer.name }}: {{ reward.code }} {{ offer.varient }}\n", encoding="utf-8")
    errors = _errors(workspace)
    assert any(e.startswith("templates/winback_short.sms.zh-CN.j2:1:1: reward has no field 'cod'")
               for e in errors), errors
    assert any(e.startswith("templates/winback_short.sms.en-US.j2:1:1: offer has no field 'varient'")
               for e in errors), errors


def test_custom_features_and_customer_columns_are_known_to_templates(workspace):
    rules = workspace / "rules" / "programme.yaml"
    rules.write_text("features:\n  spend_30d: {sum: amount, from: orders, within: 30d}\n\n"
                     + rules.read_text(encoding="utf-8"), encoding="utf-8")
    (workspace / "templates" / "winback.sms.zh-CN.j2").write_text(
        "{{ customer.name }}（{{ customer.birthday|date }}）近30天消费{{ customer.spend_30d|money }}，"
        "{{ customer.days_since_last_order }}天未下单。{{ reward.code }}\n", encoding="utf-8")
    assert _errors(workspace) == []
    customer = sample_customer(load_workspace(workspace))
    assert {"spend_30d", "days_since_last_order", "birthday", "tier", "name"} <= set(customer)


def test_a_template_shared_by_two_campaigns_is_reported_once(workspace):
    rules = workspace / "rules" / "programme.yaml"
    text = rules.read_text(encoding="utf-8")
    start = text.index("  winback:\n")
    end = text.index("  vip_thanks:\n")
    rules.write_text(text + text[start:end].replace("  winback:", "  winback_again:", 1), encoding="utf-8")
    (workspace / "templates" / "winback.sms.en-US.j2").write_text("{{ costumer.name }}\n", encoding="utf-8")
    assert _errors(workspace) == [
        f"{WINBACK_EN}:1:1: unknown variable 'costumer' (did you mean 'customer'?)"]
