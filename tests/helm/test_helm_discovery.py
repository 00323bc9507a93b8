"""The gateway finds exactly the worker pods that serve HTTP, for every preset.

The gateway watches pods through the Kubernetes API with the label selector the chart passes as
--k8s-selector; this checks that selector against the labels the chart really puts on the pods.
"""

from __future__ import annotations

import pytest
from helm_chart_tools import NAMESPACE, PRESETS, pod_templates

VALUE_SETS = [pytest.param([], id="defaults")] + [pytest.param([p], id=p.stem) for p in PRESETS]


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from gateway args {args}"
    return args[args.index(flag) + 1]


def _selector(text: str) -> dict[str, str]:
    """Parse an equality-based label selector (the only form the chart emits)."""
    pairs = [item.split("=", 1) for item in text.split(",")]
    assert all(len(p) == 2 and p[0] and p[1] for p in pairs), text
    return dict(pairs)


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("values", VALUE_SETS)
def test_discovery_selector_matches_serving_worker_pods_only(chart, values):
    objects = chart.render(values)
    gateway = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-gateway")
    )
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    selector = _selector(_flag(args, "--k8s-selector"))
    assert _flag(args, "--k8s-namespace") == NAMESPACE

    pods = dict(pod_templates(objects))
    serving = {n: t for n, t in pods.items() if "worker" in n and "follower" not in n}
    followers = {n: t for n, t in pods.items() if "follower" in n}
    assert serving, pods.keys()
    for name, tmpl in serving.items():
        labels = tmpl["metadata"]["labels"]
        assert _matches(selector, labels), f"{name} labels {labels} not matched by {selector}"
        # What the gateway discovers must be what answers on the port it will call.
        ports = {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}
        assert "http" in ports
    for name, tmpl in followers.items():
        assert not _matches(selector, tmpl["metadata"]["labels"]), (
            f"{name} (no HTTP server) would be discovered"
        )
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert not _matches(selector, gateway_labels), "the gateway would discover itself"


@pytest.mark.parametrize("values", VALUE_SETS)
def test_worker_service_and_pdb_select_the_worker_pods(chart, values):
    objects = chart.render(values)
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-worker"))
    pdb = (
        next(
            o
            for o in objects
            if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"].endswith("-worker")
        )
        if any(
            o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"].endswith("-worker") for o in objects
        )
        else None
    )
    for name, tmpl in pod_templates(objects):
        labels = tmpl["metadata"]["labels"]
        if "gateway" in name:
            assert not _matches(service["spec"]["selector"], labels)
            continue
        assert _matches(service["spec"]["selector"], labels) == ("follower" not in name), name
        if pdb:
            assert _matches(pdb["spec"]["selector"]["matchLabels"], labels), name


def test_rbac_grants_the_gateway_account_pod_watching(chart):
    objects = chart.render()
    gateway = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-gateway")
    )
    account = gateway["spec"]["template"]["spec"]["serviceAccountName"]
    role = next(o for o in objects if o["kind"] == "Role")
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding["subjects"]
    pod_rules = [r for r in role["rules"] if "pods" in r["resources"]]
    assert pod_rules and {"get", "list", "watch"} <= set(pod_rules[0]["verbs"])
