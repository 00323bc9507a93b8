"""The command lines the chart renders are accepted by the real `m3serve worker` parser.

The chart and python/m3serve evolve separately; this catches a flag the chart passes that the worker no
longer understands (or a value it refuses), without starting SGLang.
"""

from __future__ import annotations

import pytest
from helm_chart_tools import PRESETS, pod_templates

# What the kubelet substitutes for $(VAR) in a LeaderWorkerSet pod (a 2-node group, rank 1).
LWS_ENV = {"$(LWS_GROUP_SIZE)": "2", "$(LWS_WORKER_INDEX)": "1", "$(LWS_LEADER_ADDRESS)": "10.0.0.7"}


def _expand(arg: str) -> str:
    for var, value in LWS_ENV.items():
        arg = arg.replace(var, value)
    return arg


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_worker_args_are_accepted_by_m3serve_worker(chart, preset, tiny_checkpoint):
    from m3serve.serving.worker import build_launch

    for name, tmpl in pod_templates(chart.render([preset])):
        container = tmpl["spec"]["containers"][0]
        if container["command"] != ["m3serve", "worker"]:
            continue
        args = [_expand(a) for a in container["args"]]
        args[args.index("--model-path") + 1] = str(
            tiny_checkpoint
        )  # the real file check, on a real checkpoint
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        launch = build_launch(args, environ=env)
        assert launch.port == int(args[args.index("--port") + 1]), name
        assert launch.host == "0.0.0.0", name
        sglang = launch.command
        assert sglang[sglang.index("--tp-size") + 1] == args[args.index("--tp") + 1], name
        assert "--enable-metrics" in sglang, (
            name
        )  # /metrics feeds the drain hook, KEDA and the ServiceMonitor
        if "--nnodes" in args:
            assert sglang[sglang.index("--dist-init-addr") + 1] == "10.0.0.7:20000", name


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_gateway_args_are_accepted_by_m3serve_gateway(chart, preset):
    from m3serve.gateway import build_parser, config_from_args

    objects = chart.render([preset], ["gateway.auth.apiKeys={sk-test-aaaaaaaa}"])
    gateway = next(t for n, t in pod_templates(objects) if n.endswith("-gateway"))
    container = gateway["spec"]["containers"][0]
    assert container["command"] == ["m3serve", "gateway"]
    config = config_from_args(build_parser().parse_args(container["args"]))
    worker = next(t for n, t in pod_templates(objects) if "worker" in n and "follower" not in n)
    worker_port = worker["spec"]["containers"][0]["ports"][0]["containerPort"]
    labels = worker["metadata"]["labels"]
    discovery = config["kubernetes"]
    # The gateway calls the port the workers listen on, on pods carrying the labels it selects.
    assert discovery["port"] == worker_port
    assert all(labels.get(k) == v for k, v in (kv.split("=") for kv in discovery["label_selector"].split(",")))
    assert config["served_model_name"] == yaml_value(worker, "--served-model-name")
    assert config["port"] == gateway["spec"]["containers"][0]["ports"][0]["containerPort"]
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert config["api_key_file"].rsplit("/", 1)[0] in mounted
    assert config["model_path"].startswith(tuple(mounted))


def yaml_value(pod_template: dict, flag: str) -> str:
    args = pod_template["spec"]["containers"][0]["args"]
    return args[args.index(flag) + 1]
