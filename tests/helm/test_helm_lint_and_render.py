"""helm lint and helm template for the default values and every preset, and what each preset renders."""

from __future__ import annotations

import pytest
from helm_chart_tools import PRESETS, pod_templates

VALUE_SETS = [pytest.param([], id="defaults")] + [pytest.param([p], id=p.stem) for p in PRESETS]


def test_every_preset_is_listed():
    # The README and the issue promise these four; a renamed or lost preset should fail loudly.
    assert sorted(p.stem for p in PRESETS) == ["cpu-tiny", "h100-mxfp8", "h100x2-bf16", "h200-bf16"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_helm_lint_strict(chart, values):
    result = chart.lint(values)
    assert result.returncode == 0, result.output
    assert "0 chart(s) failed" in result.output


@pytest.mark.parametrize("values", VALUE_SETS)
def test_helm_template_renders_gateway_and_workers(chart, values):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in chart.render(values)}
    assert ("Deployment", "m3-m3serve-gateway") in kinds
    assert ("Service", "m3-m3serve-gateway") in kinds
    assert ("Service", "m3-m3serve-worker") in kinds
    assert ("Role", "m3-m3serve-gateway") in kinds
    assert ("ConfigMap", "m3-m3serve-worker-drain") in kinds
    multinode = any(p.stem == "h100x2-bf16" for p in values)
    assert (("LeaderWorkerSet", "m3-m3serve-worker") in kinds) == multinode
    assert (("Deployment", "m3-m3serve-worker") in kinds) == (not multinode)


EXPECTED_SHAPE = {
    # preset: (model served, GPUs per worker pod, pods per replica)
    "h200-bf16": ("MiniMaxAI/MiniMax-M3", 8, 1),
    "h100-mxfp8": ("MiniMaxAI/MiniMax-M3-MXFP8", 8, 1),
    "h100x2-bf16": ("MiniMaxAI/MiniMax-M3", 8, 2),
    "cpu-tiny": ("m3serve-tiny", None, 1),
}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_shape(chart, preset):
    model, gpus, pods = EXPECTED_SHAPE[preset.stem]
    objects = chart.render([preset])
    workers = [(n, t) for n, t in pod_templates(objects) if "worker" in n]
    assert len(workers) == (1 if pods == 1 else 2)
    for name, tmpl in workers:
        container = tmpl["spec"]["containers"][0]
        args = container["args"]
        assert args[args.index("--served-model-name") + 1] == model, name
        assert container["resources"].get("limits", {}).get("nvidia.com/gpu") == gpus, name
        assert int(args[args.index("--tp") + 1]) == (gpus or 1) * pods, name
    lws = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    if pods > 1:
        assert lws[0]["spec"]["leaderWorkerTemplate"]["size"] == pods
    else:
        assert not lws


def test_helm_package_ships_templates_and_presets_but_not_unit_tests(chart, tmp_path):
    import tarfile

    from helm_chart_tools import CHART, run

    result = run([chart.helm, "package", str(CHART), "-d", str(tmp_path)])
    assert result.returncode == 0, result.output
    (archive,) = tmp_path.glob("m3serve-*.tgz")
    names = set(tarfile.open(archive).getnames())
    assert "m3serve/templates/tests/test-models.yaml" in names  # the `helm test` pod
    assert "m3serve/files/drain.py" in names
    assert {f"m3serve/presets/{p.name}" for p in PRESETS} <= names
    assert not [n for n in names if n.startswith("m3serve/tests/")]
