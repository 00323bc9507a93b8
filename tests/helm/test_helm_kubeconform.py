"""Rendered manifests validated offline against Kubernetes' and the custom resources' JSON schemas."""

from __future__ import annotations

import re

import pytest
import yaml
from helm_chart_tools import K8S_VERSIONS, PRESETS, dump_all

# Every optional object on, so the CRD-backed kinds (ServiceMonitor, ScaledObject) are checked too.
ALL_ON = [
    "monitoring.serviceMonitor.enabled=true",
    "workers.keda.enabled=true",
    "gateway.auth.apiKeys={sk-test-aaaaaaaa}",
]
CASES = [pytest.param([], [], id="defaults")]
CASES += [pytest.param([p], [], id=p.stem) for p in PRESETS]
CASES += [pytest.param([p], ALL_ON, id=f"{p.stem}-all-on") for p in PRESETS]


def _summary(output: str) -> dict[str, int]:
    m = re.search(
        r"(\d+) resources found.*Valid: (\d+), Invalid: (\d+), Errors: (\d+), Skipped: (\d+)", output
    )
    assert m, f"no kubeconform summary in:\n{output}"
    found, valid, invalid, errors, skipped = map(int, m.groups())
    return {"found": found, "valid": valid, "invalid": invalid, "errors": errors, "skipped": skipped}


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize(("values", "sets"), CASES)
def test_manifests_match_schemas(chart, tmp_path, values, sets, k8s_version):
    rendered = chart.template(values, sets)
    assert rendered.returncode == 0, rendered.output
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    # helm's own output, not a re-dump: kubeconform's strict mode also rejects duplicate keys.
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(rendered.stdout)
    result = chart.validate(manifest, k8s_version)
    summary = _summary(result.output)
    assert result.returncode == 0, result.output
    # Nothing skipped: every kind, custom resources included, had a schema to be checked against.
    assert summary == {"found": len(objects), "valid": len(objects), "invalid": 0, "errors": 0, "skipped": 0}
    if sets:
        kinds = {o["kind"] for o in objects}
        assert {"ServiceMonitor", "ScaledObject", "Secret"} <= kinds


@pytest.mark.parametrize(
    ("kind", "breakage", "complaint"),
    [
        # A misplaced field in a core kind, in a LeaderWorkerSet, and a wrong type in a KEDA ScaledObject:
        # proof that the schemas are strict and really consulted, not silently skipped.
        ("Deployment", lambda o: o["spec"]["template"]["spec"].update(gpuCount=8), "'gpuCount' not allowed"),
        (
            "LeaderWorkerSet",
            lambda o: o["spec"]["leaderWorkerTemplate"].update(nodes=2),
            "'nodes' not allowed",
        ),
        ("ScaledObject", lambda o: o["spec"].update(cooldownPeriod="soon"), "cooldownPeriod"),
        (
            "ServiceMonitor",
            lambda o: o["spec"]["endpoints"][0].update(intervall="15s"),
            "'intervall' not allowed",
        ),
    ],
)
def test_schemas_catch_broken_manifests(chart, tmp_path, kind, breakage, complaint):
    preset = next(p for p in PRESETS if p.stem == "h100x2-bf16")
    objects = chart.render([preset], ALL_ON)
    target = next(o for o in objects if o["kind"] == kind)
    breakage(target)
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(dump_all([target]))
    result = chart.validate(manifest, K8S_VERSIONS[0])
    assert result.returncode != 0, result.output
    assert complaint in result.output
