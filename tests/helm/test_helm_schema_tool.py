"""deploy/tools/make_kubeconform_schemas.py: CRD and Kubernetes schemas converted for kubeconform."""

from __future__ import annotations

import importlib.util
import json
import zipfile

from helm_chart_tools import REPO

spec = importlib.util.spec_from_file_location(
    "m3serve_make_schemas", REPO / "deploy" / "tools" / "make_kubeconform_schemas.py"
)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  names: {kind: Widget, plural: widgets}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {x-kubernetes-int-or-string: true}
                note: {type: string, nullable: true}
                free: {type: object, x-kubernetes-preserve-unknown-fields: true, properties: {a: {type: string}}}
"""


def test_crd_schema_is_strict_and_maps_kubernetes_extensions(tmp_path):
    crd = tmp_path / "crd.yaml"
    crd.write_text(CRD)
    strict = tool.crd_schemas(crd, strict=True)["example.com/widget_v1.json"]
    spec_ = strict["properties"]["spec"]
    assert spec_["additionalProperties"] is False
    assert spec_["properties"]["size"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert spec_["properties"]["note"]["type"] == ["string", "null"]
    assert "additionalProperties" not in spec_["properties"]["free"]  # preserve-unknown-fields stays open
    assert strict["properties"]["apiVersion"]["enum"] == ["example.com/v1"]
    loose = tool.crd_schemas(crd, strict=False)["example.com/widget_v1.json"]
    assert "additionalProperties" not in loose["properties"]["spec"]


def test_kind_schemas_become_standalone(tmp_path):
    # A miniature kubernetes-validate wheel: one kind whose refs point into the shared definitions file.
    folder = "kubernetes_validate/kubernetes-json-schema/v1.30.0-local-strict/"
    defs = {
        "$defs": {
            "Spec": {"type": "object", "properties": {"inner": {"$ref": "#/$defs/Inner"}}},
            "Inner": {"type": "string"},
            "Unused": {"type": "integer"},
        },
        "$schema": "https://json-schema.org/draft/2020-12/schema",
    }
    kind = {
        "type": "object",
        "x-kubernetes-group-version-kind": [{"kind": "Thing"}],
        "$id": "https://x",
        "properties": {"spec": {"$ref": "/api/_definitions.json#/$defs/Spec"}},
    }
    wheel = tmp_path / "kv.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(folder + "_definitions.json", json.dumps(defs))
        zf.writestr(folder + "thing-v1.json", json.dumps(kind))
        zf.writestr(folder + "thingspec-v1.json", json.dumps(defs["$defs"]["Spec"]))  # a fragment: skipped
    out = tool.standalone_kind_schemas(wheel, "1.30.0", strict=True)
    assert list(out) == ["thing-v1.json"]
    thing = out["thing-v1.json"]
    assert thing["properties"]["spec"]["$ref"] == "#/$defs/Spec"
    assert set(thing["$defs"]) == {"Spec", "Inner"}  # the transitive closure, nothing more
    assert "$id" not in thing
