#!/usr/bin/env python3
"""Build the JSON schemas kubeconform needs, offline, from files fetched through package registries.

kubeconform normally downloads schemas from GitHub, which CI cannot reach. Instead:

* Kubernetes' own kinds come from the `kubernetes-validate` wheel (PyPI). It ships one schema per kind
  whose `$ref`s point into a shared `/api/_definitions.json`; kubeconform wants *standalone* files, so
  each kind's file gets the definitions it transitively uses inlined under `$defs`.
* Custom resources (LeaderWorkerSet, ServiceMonitor, ScaledObject) come from the CRD YAML inside their
  projects' Go module zips. Each CRD version's `openAPIV3Schema` is turned into a JSON schema, and in
  strict form objects reject unknown fields (what the API server's structural pruning would drop silently).

Output layout (matches kubeconform's `-schema-location` templates):
  OUT/v1.33.0-standalone[-strict]/deployment-apps-v1.json
  OUT/crds[-strict]/leaderworkerset.x-k8s.io/leaderworkerset_v1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import zipfile
from pathlib import Path

WHEEL_SCHEMA_DIR = "kubernetes_validate/kubernetes-json-schema"
DEFS_PREFIX = "/api/_definitions.json#/$defs/"


def _refs(node) -> set[str]:
    """Names of every `$defs` entry a schema fragment refers to (either ref spelling)."""
    text = json.dumps(node)
    return set(re.findall(r'"\$ref": "(?:/api/_definitions\.json)?#/\$defs/([^"]+)"', text))


def _localize(node):
    """Rewrite shared-file refs into refs to the file's own `$defs`."""
    if isinstance(node, dict):
        return {
            k: (
                "#/$defs/" + v[len(DEFS_PREFIX) :]
                if k == "$ref" and isinstance(v, str) and v.startswith(DEFS_PREFIX)
                else _localize(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_localize(v) for v in node]
    return node


def standalone_kind_schemas(wheel: Path, version: str, strict: bool) -> dict[str, dict]:
    """{file name: standalone schema} for every top-level kind of one Kubernetes version."""
    folder = f"{WHEEL_SCHEMA_DIR}/v{version}-local{'-strict' if strict else ''}/"
    out: dict[str, dict] = {}
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.startswith(folder) and n.endswith(".json")]
        if not names:
            raise SystemExit(f"{wheel} has no schemas for Kubernetes {version} (looked in {folder})")
        all_defs = json.loads(zf.read(folder + "_definitions.json"))["$defs"]
        for name in names:
            base = name[len(folder) :]
            if base.startswith("_") or base == "all.json":
                continue
            schema = json.loads(zf.read(name))
            # Only objects a manifest can be (they carry a kind); the rest are fragments.
            if "x-kubernetes-group-version-kind" not in schema:
                continue
            needed: set[str] = set()
            todo = _refs(schema)
            while todo:
                ref = todo.pop()
                if ref not in needed:
                    needed.add(ref)
                    todo |= _refs(all_defs[ref])
            schema = _localize(schema)
            schema["$defs"] = {ref: all_defs[ref] for ref in sorted(needed)}
            schema.pop("$id", None)  # its https id would make kubeconform resolve refs against the web
            out[base] = schema
    return out


def _crd_node_to_json_schema(node, strict: bool):
    """OpenAPI v3 (Kubernetes structural schema) fragment -> JSON schema fragment."""
    if isinstance(node, list):
        return [_crd_node_to_json_schema(v, strict) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _crd_node_to_json_schema(v, strict) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out.pop("pattern", None)  # a pattern on an int-or-string only constrains the string branch
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields", False)
    if strict and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def crd_schemas(crd_file: Path, strict: bool) -> dict[str, dict]:
    """{relative path: schema} for every served version of every CRD in a YAML file."""
    import yaml  # only this half needs PyYAML

    out: dict[str, dict] = {}
    for doc in yaml.safe_load_all(crd_file.read_text()):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        group, kind = spec["group"], spec["names"]["kind"]
        for ver in spec["versions"]:
            raw = (ver.get("schema") or {}).get("openAPIV3Schema")
            if raw is None:
                continue
            schema = _crd_node_to_json_schema(copy.deepcopy(raw), strict)
            props = schema.setdefault("properties", {})
            # Pin apiVersion and kind so a manifest is checked against the version it claims.
            props["apiVersion"] = {"type": "string", "enum": [f"{group}/{ver['name']}"]}
            props["kind"] = {"type": "string", "enum": [kind]}
            props["metadata"] = {"type": "object"}
            schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
            out[f"{group}/{kind.lower()}_{ver['name']}.json"] = schema
    if not out:
        raise SystemExit(f"{crd_file}: no CustomResourceDefinition with an openAPIV3Schema found")
    return out


def _write_all(folder: Path, schemas: dict[str, dict]) -> None:
    for rel, schema in schemas.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="schema root passed to kubeconform")
    ap.add_argument("--k8s-wheel", type=Path, help="kubernetes-validate wheel file")
    ap.add_argument("--k8s-version", action="append", default=[], help="e.g. 1.33.0 (repeatable)")
    ap.add_argument("--crd", type=Path, action="append", default=[], help="CRD YAML file (repeatable)")
    args = ap.parse_args(argv)

    for version in args.k8s_version:
        if args.k8s_wheel is None:
            ap.error("--k8s-version needs --k8s-wheel")
        for strict in (False, True):
            schemas = standalone_kind_schemas(args.k8s_wheel, version, strict)
            _write_all(args.out / f"v{version}-standalone{'-strict' if strict else ''}", schemas)
            print(f"kubernetes {version}{' strict' if strict else ''}: {len(schemas)} kinds")
    for crd in args.crd:
        for strict in (False, True):
            schemas = crd_schemas(crd, strict)
            _write_all(args.out / ("crds-strict" if strict else "crds"), schemas)
        print(f"{crd.name}: {', '.join(sorted(schemas))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
