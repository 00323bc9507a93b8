"""values.schema.json and the chart's own checks reject bad values, naming the value at fault."""

from __future__ import annotations

import pytest

BAD_VALUES = [
    # (--set arguments, text the error must contain)
    (["workers.tp=0"], "at '/workers/tp': minimum: got 0, want 1"),
    (["workers.nodes=0"], "at '/workers/nodes'"),
    (["workers.replicas=-1"], "at '/workers/replicas'"),
    (["workers.device=rocm"], "at '/workers/device': value must be one of 'cuda', 'cpu'"),
    (["workers.tpp=8"], "additional properties 'tpp' not allowed"),
    (["model.source=s3"], "at '/model/source': value must be one of 'download', 'pvc', 'tiny'"),
    (["model.source=pvc"], "at '/model/pvc/claimName'"),
    (["model.download.storage=hostPath"], "at '/model/download/storage'"),
    (["workers.resources.limits.memory=lots"], "at '/workers/resources/limits/memory'"),
    (["workers.shm.sizeLimit=big"], "at '/workers/shm/sizeLimit'"),
    (["workers.probes.startup.path=health"], "at '/workers/probes/startup/path'"),
    (["image.repository="], "at '/image/repository'"),
    (["gateway.service.type=Ingress"], "at '/gateway/service/type'"),
    (["gateway.workerUrls={10.0.0.1:30000}"], "at '/gateway/workerUrls/0'"),
    (["monitoring.serviceMonitor.interval=often"], "at '/monitoring/serviceMonitor/interval'"),
    (["workers.keda.prometheus.queueThreshold=many"], "at '/workers/keda/prometheus/queueThreshold'"),
    # Cross-field rules the schema cannot express, checked by the templates.
    (["workers.tp=8", "workers.nodes=3"], "workers.tp (8) must be a multiple of workers.nodes (3)"),
    (["model.source=tiny"], "model.source=tiny is the CPU test model: set workers.device=cpu"),
    (
        ["workers.device=cpu", "workers.nodes=2", "workers.tp=2"],
        "workers.nodes > 1 needs workers.device=cuda",
    ),
    (["gateway.discovery.enabled=false"], "gateway.discovery.enabled=false needs gateway.workerUrls"),
    (["rbac.create=false"], "gateway discovery needs RBAC to watch pods"),
]


@pytest.mark.parametrize(("sets", "message"), BAD_VALUES, ids=[" ".join(s) for s, _ in BAD_VALUES])
def test_helm_template_rejects_bad_values(chart, sets, message):
    result = chart.template(sets=sets)
    assert result.returncode != 0, f"helm template accepted {sets}"
    assert message in result.output, result.output


SCHEMA_CASES = [case for case in BAD_VALUES if "at '/" in case[1] or "not allowed" in case[1]]


# helm lint only fails on schema errors: it renders templates in "lint mode", where fail() is reported
# as an [INFO] line, so the cross-field checks above are covered by `helm template` (and install) only.
@pytest.mark.parametrize(("sets", "message"), SCHEMA_CASES, ids=[" ".join(s) for s, _ in SCHEMA_CASES])
def test_helm_lint_rejects_bad_values(chart, sets, message):
    result = chart.lint(sets=sets)
    assert result.returncode != 0, f"helm lint accepted {sets}"
    assert message in result.output, result.output


def test_bad_values_file_is_rejected(chart, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers:\n  tp: eight\n")
    result = chart.template(values_files=[bad])
    assert result.returncode != 0
    assert "at '/workers/tp'" in result.output and "want integer" in result.output
