"""Real SGLang servers on the tiny M3 for the serving tests: started once per module, always stopped."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from m3serve.serving.processes import ManagedProcess, free_port, wait_healthy
from m3serve.serving.worker import build_launch

STARTUP_TIMEOUT_S = float(os.environ.get("M3SERVE_TEST_STARTUP_TIMEOUT", "420"))


@dataclass
class RunningWorker:
    url: str
    model_path: Path
    marker_dir: Path
    log_path: Path
    process: ManagedProcess

    def get(self, path: str, timeout: float = 60) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 300) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def generate(self, timeout: float = 300, **body) -> dict:
        return self.post("/generate", body, timeout)


@contextlib.contextmanager
def running_worker(model_path: Path, workdir: Path, extra_args: list[str]):
    """`m3serve worker` on CPU on a free port, with the plugin marker folder set; stopped on exit."""
    port = free_port()
    marker_dir = workdir / "plugin-marker"
    log_path = workdir / "worker.log"
    env = dict(os.environ, M3SERVE_PLUGIN_MARKER_DIR=str(marker_dir), M3SERVE_PLUGIN_MARKER_EVERY_EVENT="1")
    launch = build_launch(
        ["--model-path", str(model_path), "--device", "cpu", "--port", str(port), *extra_args], env
    )
    proc = ManagedProcess("sglang worker", launch.command, launch.env, log_path).start()
    try:
        wait_healthy(launch.url, [proc], STARTUP_TIMEOUT_S)
        yield RunningWorker(launch.url, model_path, marker_dir, log_path, proc)
    finally:
        proc.stop()
        assert not proc.group_alive(), "worker processes survived stop()"


@pytest.fixture(scope="session")
def worker_factory():
    """`running_worker` as a fixture, for module-scoped server fixtures (conftest is not importable)."""
    return running_worker


def pytest_report_header(config):
    return f"serving tests: python {sys.version.split()[0]}, startup timeout {STARTUP_TIMEOUT_S:.0f} s"
