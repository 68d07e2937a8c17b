"""JSON Schema validation of rule files and loyalty.yaml, reported at file:line:col.

The schemas in ``schemas/`` are the single source of truth for what a file may say.
Each jsonschema error's ``absolute_path`` is mapped back to the YAML position through
the source map, and turned into a sentence a marketer can act on.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator, validators

from engine.config.rulefiles import SourceMap, yaml11_hint
from engine.errors import Problem
from engine.resources import schemas_dir

_TYPE_WORDS = {
    "string": "text", "integer": "a whole number", "number": "a number",
    "boolean": "true or false", "object": "a mapping of keys", "array": "a list", "null": "empty",
}


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """Load ``schemas/<name>.schema.json``."""
    return json.loads((schemas_dir() / f"{name}.schema.json").read_text(encoding="utf-8"))


MAX_DURATION_DAYS = 3650                # the bound the schemas' duration pattern spells out
_ANY_DURATION = re.compile(r"^([0-9]+)([dhw])$")
_ANY_PERCENTAGE = re.compile(r"^[0-9]+(\.[0-9]+)?%$")


def duration_pattern() -> str:
    """The one duration pattern of both schemas: 0d to 3650d, 0w to 521w, 0h to 87600h."""
    return load_schema("rules")["$defs"]["duration"]["pattern"]


def is_finite_number(checker, instance: Any) -> bool:
    """JSON Schema's "number", without YAML's ``.nan``, ``.inf`` and ``-.inf``.

    JSON has no NaN or infinity, so a schema written for JSON never expects them; but YAML
    reads ``.nan`` and ``.inf`` as floats, and ``minimum``/``maximum`` let NaN through (every
    comparison with NaN is false). Redefining "number" rejects them wherever a number is
    allowed, and the bound keywords, which only look at numbers, then skip them.
    """
    if not Draft202012Validator.TYPE_CHECKER.is_type(instance, "number"):
        return False
    return isinstance(instance, int) or math.isfinite(instance)   # huge ints do not fit a float


_FiniteValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("number", is_finite_number))


@lru_cache(maxsize=None)
def _validator(name: str) -> Draft202012Validator:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    return _FiniteValidator(schema)


def did_you_mean(word: str, choices) -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else ""


def validate_document(name: str, data: Any, smap: SourceMap) -> list[Problem]:
    """Every schema problem of one loaded document, positioned and explained."""
    problems: list[Problem] = []
    for error in _validator(name).iter_errors(data):
        problems.extend(_explain(error, smap))
    # one problem per position and message is enough
    unique = {(p.line, p.column, p.message): p for p in problems}
    return sorted(unique.values(), key=lambda p: (p.line, p.column))


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "empty" if value is None else type(value).__name__


def _where(path) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "the file"


def _explain(error, smap: SourceMap) -> list[Problem]:
    path = tuple(error.absolute_path)
    kind = error.validator
    schema = error.schema
    instance = error.instance
    key = path[-1] if path else None

    if kind == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema.get("properties", {}))
        extras = [k for k in instance if k not in allowed]
        out = []
        for extra in extras:
            hint = did_you_mean(extra, allowed) or (
                "allowed here: " + ", ".join(allowed) if allowed else "")
            out.append(smap.problem(path + (extra,), f"unknown key '{extra}'", hint, at_key=True))
        return out
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [smap.problem(path, f"missing required key '{missing}' in {_where(path)}",
                             _required_hint(missing), at_key=bool(path))]
    if kind == "type" and _not_finite(instance):
        return [_not_finite_problem(path, instance, smap)]
    if kind == "type":
        expected = schema.get("type")
        expected_list = expected if isinstance(expected, list) else [expected]
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in expected_list)
        hint = ""
        if instance is None:
            hint = "write a value after the colon, or remove the key"
        elif "pattern" in schema and not _quoted_would_match(smap, path, schema["pattern"]) \
                and _pattern_words(schema["pattern"], key) is not None:
            hint = _pattern_words(schema["pattern"], key)[1]
        elif "string" in expected_list:
            hint = yaml11_hint(smap, path, "number" if not isinstance(instance, bool) else "true/false")
        elif expected_list == ["array"] and isinstance(instance, (str, int, float)):
            hint = f"write a list, e.g. {key}: [{instance}]"
        return [smap.problem(path, f"'{key}' should be {words}, not {_type_name(instance)}", hint)]
    if kind == "pattern" and "propertyNames" in error.schema_path:
        # a key that is not a valid name: jsonschema reports it at the mapping holding it
        return [smap.problem(path + (instance,), f"'{instance}' is not a valid name",
                             "use lower-case letters, digits and underscores, starting with a letter",
                             at_key=True)]
    if kind == "pattern":
        return [_pattern_problem(path, instance, schema, smap)]
    if kind == "enum":
        options = schema["enum"]
        hint = did_you_mean(instance, options) or "one of: " + ", ".join(map(str, options))
        return [smap.problem(path, f"'{instance}' is not allowed for '{key}'", hint)]
    if kind == "const":
        return [smap.problem(path, f"'{key}' must be {schema['const']}", "")]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": "at least", "maximum": "at most",
                 "exclusiveMinimum": "more than", "exclusiveMaximum": "less than"}[kind]
        written = smap.plain.get(path) or _number_text(instance)
        return [smap.problem(path, f"'{key}' is {written}; it must be {words} {_number_text(schema[kind])}")]
    if kind in ("minItems", "minProperties"):
        return [smap.problem(path, f"'{key}' must not be empty")]
    if kind == "maxProperties":
        return [smap.problem(path, f"'{key}' takes exactly one of: " + ", ".join(schema.get("properties", {})))]
    if kind in ("minLength", "maxLength"):
        return [smap.problem(path, f"'{key}' has the wrong length: {error.message}")]
    if kind == "anyOf" and _is_condition(schema):
        return _condition_problem(error, path, smap)
    return [smap.problem(path, f"{_where(path)}: {error.message}")]


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _not_finite_problem(path: tuple, value: float, smap: SourceMap) -> Problem:
    """``.nan`` or ``.inf`` where a number (or anything else) was expected."""
    key = path[-1] if path else "the value"
    written = smap.plain.get(tuple(path)) or str(value)
    meaning = "not a number" if math.isnan(value) else "infinity"
    return smap.problem(path, f"'{key}' is {written}, which YAML reads as {meaning}",
                        "write an ordinary number, e.g. 20")


def _number_text(value: Any) -> str:
    """A bound or a value as a marketer writes it: 1,000,000 rather than 1000000 or 1e+40."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not value.is_integer():
        return f"{value:g}"
    return f"{int(value):,}" if abs(value) < 1e15 else f"{value:g}"


def _required_hint(missing: str) -> str:
    return {
        "where": "add a condition, e.g. where: monetary_365d >= 5000",
        "reward": "add a reward, e.g. reward: {coupon: {percent_off: 10, valid_days: 14}}",
        "channel": "add the channel, e.g. channel: sms",
        "template": "add the template name, e.g. template: winback",
        "customers": "say where the customers table is, e.g. customers: {path: data/customers.csv}",
    }.get(missing, "")


def _quoted_would_match(smap: SourceMap, path: tuple, pattern: str) -> bool:
    """Whether a plain YAML number/bool would be valid once put in quotes."""
    raw = smap.plain.get(tuple(path))
    return raw is not None and re.search(pattern, raw) is not None


def _pattern_words(pattern: str, key) -> tuple[str, str] | None:
    """What a pattern stands for, and how to write it, for the patterns our schemas use."""
    if pattern == duration_pattern():
        return "a duration", ("write durations like 30d (days), 12h (hours) or 2w (weeks), "
                              f"at most {MAX_DURATION_DAYS}d")
    if pattern.endswith("%$"):
        return "a percentage", "write percentages like 10%, from 0% to 100%"
    if key == "template":
        return "a template name", "use letters, digits, - and _ only; the file is templates/NAME.CHANNEL.LOCALE.j2"
    if "[0-2][0-9]:[0-5][0-9]-" in pattern:
        return "a time range", 'write it like "21:00-09:00", in quotes'
    if "[0-9]{2}-[0-9]{2}" in pattern:
        return "a date", "write MM-DD (every year) or YYYY-MM-DD, in quotes"
    if pattern.startswith("^[a-z]"):
        return "a valid name", "use lower-case letters, digits and underscores, starting with a letter"
    return None


def _pattern_problem(path, instance, schema, smap: SourceMap) -> Problem:
    pattern = schema.get("pattern", "")
    key = path[-1] if path else ""
    words = _pattern_words(pattern, key)
    if key == "template":
        return smap.problem(path, f"template '{instance}' must be a name, not a path", words[1])
    out_of_range = _out_of_range(instance, words)
    if out_of_range is not None:
        return smap.problem(path, *out_of_range)
    if words is not None:
        return smap.problem(path, f"'{instance}' is not {words[0]}", words[1])
    return smap.problem(path, f"'{instance}' does not have the expected form for '{key}'")


def _out_of_range(instance: Any, words: tuple[str, str] | None) -> tuple[str, str] | None:
    """Message and hint for a well-formed duration or percentage beyond the schema's bound."""
    if words is None or not isinstance(instance, str):
        return None
    duration = _ANY_DURATION.match(instance)
    if words[0] == "a duration" and duration:
        number, unit = duration.groups()
        if int(number) * {"d": 24, "w": 168, "h": 1}[unit] > MAX_DURATION_DAYS * 24:
            hint = (f"durations go up to {MAX_DURATION_DAYS}d (10 years), "
                    f"{MAX_DURATION_DAYS // 7}w or {MAX_DURATION_DAYS * 24}h")
            return f"'{instance}' is longer than {MAX_DURATION_DAYS} days", hint
    if words[0] == "a percentage" and _ANY_PERCENTAGE.match(instance) and float(instance[:-1]) > 100:
        return f"'{instance}' is more than 100%", "a share of customers goes from 0% to 100%"
    return None


def _is_condition(schema: dict) -> bool:
    return any(isinstance(s, dict) and "all" in s.get("properties", {}) for s in schema.get("anyOf", []))


def _condition_problem(error, path, smap: SourceMap) -> list[Problem]:
    instance = error.instance
    if isinstance(instance, dict):
        keys = list(instance)
        unknown = [k for k in keys if k not in ("all", "any", "not")]
        if unknown:
            return [smap.problem(path + (k,), f"unknown key '{k}' in a condition",
                                 did_you_mean(k, ["all", "any", "not"]) or "use all:, any: or not:",
                                 at_key=True) for k in unknown]
        if len(keys) != 1:
            return [smap.problem(path, "a condition takes exactly one of all:, any: or not:",
                                 "nest them: all: [..., {any: [...]}]")]
        # the error is deeper: report the most specific sub-error
        deepest = max(error.context, key=lambda e: len(e.absolute_path), default=None)
        if deepest is not None and len(deepest.absolute_path) > len(path):
            return _explain(deepest, smap)
        return [smap.problem(path, "all:, any: and not: take conditions")]
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        return [smap.problem(path, f"'{instance}' is not a condition",
                             "write a comparison such as `orders_365d >= 6`, or true/false")]
    if isinstance(instance, list):
        return [smap.problem(path, "a list is not a condition",
                             "put the list under all: (every one must hold) or any: (one is enough)")]
    if instance is None:
        return [smap.problem(path, f"'{path[-1] if path else 'condition'}' is empty",
                             "write a condition such as `monetary_365d >= 5000`, or true")]
    return [smap.problem(path, "this is not a condition",
                         "write an expression such as `monetary_365d >= 5000`")]
