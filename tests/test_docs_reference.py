"""docs/reference.md is generated from the schemas, and the schemas describe every property."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.app.docgen import reference

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = sorted((ROOT / "schemas").glob("*.json"))


def test_reference_is_up_to_date():
    written = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert written == reference(), "regenerate it: python -m engine.app.docgen > docs/reference.md"


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        schema = root["$defs"][ref.split("/")[-1]]
    return schema


def _undescribed(schema, root: dict, where: str) -> list[str]:
    """Every property (at any depth) without a description of its own or of its $ref target."""
    missing = []
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            missing += _undescribed(item, root, f"{where}[{i}]")
        return missing
    if not isinstance(schema, dict):
        return missing
    for key, sub in schema.get("properties", {}).items():
        if "description" not in sub and "description" not in _resolve(sub, root):
            missing.append(f"{where}.{key}")
        missing += _undescribed(sub, root, f"{where}.{key}")
    for keyword in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "not"):
        if keyword in schema:
            missing += _undescribed(schema[keyword], root, f"{where}/{keyword}")
    for name, sub in schema.get("$defs", {}).items():
        missing += _undescribed(sub, root, f"$defs.{name}")
    return missing


@pytest.mark.parametrize("path", SCHEMAS, ids=[p.name for p in SCHEMAS])
def test_every_property_has_a_description(path):
    root = json.loads(path.read_text(encoding="utf-8"))
    assert "description" in root
    assert _undescribed(root, root, path.name) == []


@pytest.mark.parametrize("path", SCHEMAS, ids=[p.name for p in SCHEMAS])
def test_schema_is_valid_and_versioned(path):
    from jsonschema import Draft202012Validator
    root = json.loads(path.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(root)
    assert root["$id"].endswith("/v1.json")


def test_the_walker_notices_a_missing_description():
    root = {"properties": {"a": {"type": "string"}, "b": {"$ref": "#/$defs/d"}},
            "$defs": {"d": {"description": "ok", "type": "object",
                            "properties": {"c": {"type": "string"}}}}}
    assert _undescribed(root, root, "x") == ["x.a", "$defs.d.c"]
