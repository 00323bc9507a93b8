"""values.yaml and values.schema.json describe the same settings."""

from __future__ import annotations

import json

import yaml
from helm_chart_tools import CHART

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _object_paths(schema: dict, prefix: str = "") -> dict[str, dict]:
    """Dotted path -> schema, for every property reachable through nested object schemas."""
    out = {}
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        out[path] = sub
        if sub.get("type") == "object" and "properties" in sub:
            out.update(_object_paths(sub, path + "."))
    return out


def _value_paths(values: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        out.add(path)
        if isinstance(value, dict) and value:
            out |= _value_paths(value, path + ".")
    return out


def test_every_schema_setting_has_a_default_in_values_yaml():
    # "global" is Helm's, for parent charts; it is allowed but never set here.
    phantom = set(_object_paths(SCHEMA)) - _value_paths(VALUES) - {"global"}
    assert not phantom, f"schema describes settings values.yaml lacks: {sorted(phantom)}"


def test_schema_closes_every_object_it_describes():
    # Closed objects are what turn a misspelt key into an install error instead of a silent no-op.
    open_objects = [
        path
        for path, sub in _object_paths(SCHEMA).items()
        if sub.get("type") == "object" and "properties" in sub and sub.get("additionalProperties") is not False
    ]
    assert not open_objects, open_objects
