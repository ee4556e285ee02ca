"""`agentbus schema`: the JSON Schema of every payload family, as schemas/ holds it, or read as a list of fields."""

from __future__ import annotations

import json
from typing import Any

import click

from agentbus.schema import EXAMPLES, FAMILIES, RECORDS, dumps, generate, kind

NAMES = [f.name for f in (*FAMILIES, RECORDS)]


@click.command()
@click.argument("family", required=False, type=click.Choice(NAMES))
@click.option("--json", "as_json", is_flag=True, help="The JSON Schema itself (all families: one object by name).")
def schema(family: str | None, as_json: bool) -> None:
    """Payload schemas (subjects.md, Payloads): every family, or one with its fields; --json for the schema."""
    schemas = generate()
    if as_json:
        click.echo(dumps(schemas[family] if family else schemas), nl=False)
        return
    if family is None:
        for name in NAMES:
            click.echo(f"{name:<9} schemas/{name}.schema.json  {schemas[name]['title']}: {_kinds(name)}")
        click.echo("\n`agentbus schema FAMILY` lists the fields of each kind; --json prints the JSON Schema.")
        return
    click.echo(f"{schemas[family]['title']} (schemas/{family}.schema.json)\n{schemas[family]['description']}")
    for name, definition in _definitions(schemas[family]):
        click.echo(f"\n{name}" + (f": {_first_line(definition)}" if definition.get("description") else ""))
        required = set(definition.get("required", ()))
        for field, spec in definition.get("properties", {}).items():
            click.echo(f"  {field:<28} {_presence(field, spec, required):<30} {_type(spec)}")


def _definitions(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    defs: dict[str, dict[str, Any]] = schema.get("$defs", {})
    if "properties" in schema:
        return [("record", schema), *defs.items()]
    return list(defs.items())


def _kinds(family: str) -> str:
    names = [kind(e) for e in EXAMPLES.get(family, ())] or ["record"]
    return ", ".join(names) if len(names) < 6 else f"{len(names)} kinds ({', '.join(names[:4])}, ...)"


def _first_line(definition: dict[str, Any]) -> str:
    return str(definition["description"]).split("\n", 1)[0]


def _type(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return " | ".join(json.dumps(v) for v in spec["enum"])
    if "$ref" in spec:
        return str(spec["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in spec:
        return " or ".join(_type(s) for s in spec["anyOf"])
    kind = spec.get("type", "any")
    if kind == "array":
        return f"array of {_type(spec.get('items', {}))}"
    if "seconds since the Unix epoch" in spec.get("description", ""):
        return f"{kind}, seconds since the epoch"
    return str(kind)


def _presence(field: str, spec: dict[str, Any], required: set[str]) -> str:
    if field in required:
        return "required"
    if "default" in spec:
        return f"default {json.dumps(spec['default'])}"
    missing = {"ts": " (missing: the stream's time)", "v": " (missing: 1)"}
    return "optional" + missing.get(field, "")


__all__ = ["schema"]
