"""Helpers for the Helm chart tests: the chart, its presets, and the tools that check it offline.

The tools (helm, helm-unittest, kubeconform) and kubeconform's schemas are installed into .tools/ by
scripts/install_helm_tools.sh, which scripts/bootstrap.sh runs. A missing tool is a failure, not a skip:
CI must never report the chart as tested when it was not.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "m3serve"
PRESETS = sorted((CHART / "presets").glob("*.yaml"))
TOOLS = Path(os.environ.get("M3SERVE_TOOLS_DIR", REPO / ".tools"))
# Kubernetes releases the rendered manifests are validated against (install_helm_tools.sh builds both).
K8S_VERSIONS = ("1.30.0", "1.36.0")
RELEASE, NAMESPACE = "m3", "llm"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(cmd: list[str], timeout: float = 120) -> Run:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def _tool(name: str) -> str:
    path = TOOLS / "bin" / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `bash scripts/install_helm_tools.sh {TOOLS / 'bin'}`")
    return str(path)


class Chart:
    """helm and kubeconform, pointed at the m3serve chart."""

    def __init__(self) -> None:
        self.helm = _tool("helm")
        self.kubeconform = _tool("kubeconform")
        self.unittest = _tool("helm-unittest")
        self.schemas = TOOLS / "schemas"
        if not (self.schemas / ".stamp").exists():
            pytest.fail(
                f"{self.schemas} is missing: run `bash scripts/install_helm_tools.sh {TOOLS / 'bin'}`"
            )

    @staticmethod
    def _value_args(values_files=(), sets=()) -> list[str]:
        args: list[str] = []
        for f in values_files:
            args += ["-f", str(f)]
        for s in sets:
            args += ["--set", s]
        return args

    def template(self, values_files=(), sets=()) -> Run:
        return run(
            [
                self.helm,
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                *self._value_args(values_files, sets),
            ]
        )

    def render(self, values_files=(), sets=()) -> list[dict]:
        """The rendered objects; fails the test if rendering fails."""
        result = self.template(values_files, sets)
        assert result.returncode == 0, f"helm template failed:\n{result.output}"
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def lint(self, values_files=(), sets=()) -> Run:
        return run([self.helm, "lint", "--strict", str(CHART), *self._value_args(values_files, sets)])

    def validate(self, manifest_file: Path, k8s_version: str) -> Run:
        """kubeconform in strict mode (unknown fields are errors), against the offline schemas only."""
        s = self.schemas
        return run(
            [
                self.kubeconform,
                "-strict",
                "-summary",
                "-output",
                "text",
                "-kubernetes-version",
                k8s_version,
                "-schema-location",
                f"{s}/{{{{.NormalizedKubernetesVersion}}}}-standalone{{{{.StrictSuffix}}}}/"
                "{{.ResourceKind}}{{.KindSuffix}}.json",
                "-schema-location",
                f"{s}/crds{{{{.StrictSuffix}}}}/{{{{.Group}}}}/"
                "{{.ResourceKind}}_{{.ResourceAPIVersion}}.json",
                str(manifest_file),
            ]
        )


def pod_templates(objects: list[dict]) -> list[tuple[str, dict]]:
    """(description, pod template) for every workload object: Deployments and LeaderWorkerSet roles."""
    out = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Deployment":
            out.append((name, obj["spec"]["template"]))
        elif obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            out.append((f"{name} leader", lwt["leaderTemplate"]))
            out.append((f"{name} follower", lwt["workerTemplate"]))
    return out


def dump_all(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)
