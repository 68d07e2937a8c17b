"""Generating docs/reference.md from the JSON Schemas, so the reference never drifts.

Run ``python -m engine.app.docgen > docs/reference.md``; a test fails when it is stale.
"""

from __future__ import annotations

from engine.config.schema import load_schema


def _type(schema: dict, root: dict) -> str:
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        target = root["$defs"][name]
        if name in ("duration", "percentage", "condition", "name"):
            return name
        return _type(target, root) if "type" in target and target.get("type") != "object" else name
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        return f"list of {_type(schema.get('items', {}), root)}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict) and not schema.get("properties"):
        return f"mapping of name → {_type(schema['additionalProperties'], root)}"
    return kind


def _description(schema: dict, root: dict) -> str:
    text = schema.get("description")
    if text is None and "$ref" in schema:
        text = root["$defs"][schema["$ref"].split("/")[-1]].get("description", "")
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _table(title: str, schema: dict, root: dict, lines: list[str]) -> None:
    properties = schema.get("properties", {})
    if not properties:
        return
    required = set(schema.get("required", []))
    lines += [f"### {title}", "", _description(schema, root), "",
              "| key | type | required | meaning |", "|---|---|---|---|"]
    for key, sub in properties.items():
        lines.append(f"| `{key}` | {_type(sub, root)} | {'yes' if key in required else ''} | "
                     f"{_description(sub, root)} |")
    lines.append("")


def _walk(title: str, schema: dict, root: dict, lines: list[str], seen: set) -> None:
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        if name in seen:
            return
        seen.add(name)
        schema = root["$defs"][name]
    _table(title, schema, root, lines)
    for key, sub in schema.get("properties", {}).items():
        target = sub
        if "$ref" in sub:
            target = root["$defs"][sub["$ref"].split("/")[-1]]
        if target.get("properties") and target.get("type") == "object":
            _walk(f"{title} → `{key}`", sub, root, lines, seen)
        elif isinstance(target.get("additionalProperties"), dict):
            _walk(f"{title} → `{key}` → *name*", target["additionalProperties"], root, lines, seen)
        elif target.get("type") == "array" and isinstance(target.get("items"), dict):
            _walk(f"{title} → `{key}` → item", target["items"], root, lines, seen)


def reference() -> str:
    lines = ["# Rule-file and settings reference", "",
             "Generated from `schemas/*.schema.json` by `python -m engine.app.docgen`; do not edit by hand.", ""]
    for name, title in (("loyalty", "loyalty.yaml"), ("rules", "rules/*.yaml")):
        root = load_schema(name)
        lines += [f"## {title}", "", f"Schema: `schemas/{name}.schema.json` (`{root['$id']}`)", ""]
        _walk(title, root, root, lines, set())
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(reference(), end="")
