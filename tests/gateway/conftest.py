"""Fixtures for gateway tests: fake SGLang workers (in this process) and the real Rust gateway
(a subprocess started the way `m3serve serve` starts it), all on 127.0.0.1 with free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_worker import FakeWorker  # noqa: E402

MODEL = "fake-m3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def metric(self, name: str) -> float:
        """Sum of all samples of a metric (any labels)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def fake_workers() -> Iterator[Callable[[int], list[FakeWorker]]]:
    made: list[FakeWorker] = []

    def make(n: int) -> list[FakeWorker]:
        ws = [FakeWorker() for _ in range(n)]
        made.extend(ws)
        return ws

    yield make
    for w in made:
        try:
            w.stop()
        except OSError:
            pass


@pytest.fixture
def start_gateway(tmp_path) -> Iterator[Callable[..., Gateway]]:
    """Start a gateway in bytes (test) mode in front of the given worker URLs."""
    from m3serve.gateway import gateway_command

    started: list[Gateway] = []

    def start(
        worker_urls: list[str],
        *extra: str,
        model_mode: str = "bytes",
        model_path: str | None = None,
        env: dict[str, str] | None = None,
        expect_ready: bool = True,
    ) -> Gateway:
        port = free_port()
        args = [
            "--served-model-name",
            MODEL,
            "--health-interval",
            "0.5",
            "--log-format",
            "json",
            "--shutdown-grace",
            "3",
            *extra,
        ]
        if model_mode == "bytes":
            args += ["--tokenizer-mode", "bytes"]
        urls = worker_urls or ["http://127.0.0.1:9"]
        cmd = gateway_command(urls, model_path or str(tmp_path), "127.0.0.1", port, args)
        if not worker_urls:  # start with no workers at all
            i = cmd.index("--worker-urls")
            del cmd[i + 1]
        log_path = tmp_path / f"gateway-{port}.log"
        proc = subprocess.Popen(
            cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        gw = Gateway(proc, port, log_path)
        started.append(gw)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{gw.log()}")
            try:
                if httpx.get(gw.url + "/liveness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"gateway did not come up:\n{gw.log()}")
        if expect_ready and worker_urls:
            wait_until(lambda: httpx.get(gw.url + "/health", timeout=1).status_code == 200, 10)
        return gw

    yield start
    for gw in started:
        gw.stop()


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception:  # noqa: BLE001 - polling through transient errors
            pass
        time.sleep(step)
    return False
