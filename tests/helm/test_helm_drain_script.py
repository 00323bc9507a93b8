"""The worker's preStop drain script (deploy/helm/m3serve/files/drain.py) against a fake SGLang /metrics."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helm_chart_tools import CHART

spec = importlib.util.spec_from_file_location("m3serve_chart_drain", CHART / "files" / "drain.py")
drain_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drain_mod)

METRICS = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{{model_name="m",engine_type="unified"}} {running}
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{{model_name="m",engine_type="unified"}} {queued}
sglang:num_used_tokens{{model_name="m"}} 4096.0
"""


class FakeWorker:
    """Serves /metrics whose busy counts follow a list, one entry per request (the last one repeats)."""

    def __init__(self, states: list[tuple[int, int]]):
        self.states, self.hits = list(states), 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                running, queued = owner.states[min(owner.hits, len(owner.states) - 1)]
                owner.hits += 1
                body = METRICS.format(running=float(running), queued=float(queued)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def worker_factory():
    made = []

    def make(states):
        made.append(FakeWorker(states))
        return made[-1]

    yield make
    for w in made:
        w.close()


def test_busy_requests_sums_running_and_queued_only():
    assert drain_mod.busy_requests(METRICS.format(running=3.0, queued=2.0)) == 5.0
    assert drain_mod.busy_requests(METRICS.format(running=0.0, queued=0.0)) == 0.0


def test_waits_until_requests_finish(worker_factory):
    worker = worker_factory([(2, 1), (1, 0), (0, 0), (0, 0)])
    assert drain_mod.drain(worker.url, timeout=10, interval=0.01, quiet_polls=2) == "drained"
    assert worker.hits == 4  # did not return on the first idle poll


def test_a_request_arriving_between_idle_polls_resets_the_wait(worker_factory):
    worker = worker_factory([(0, 0), (0, 1), (0, 0), (0, 0)])
    assert drain_mod.drain(worker.url, timeout=10, interval=0.01, quiet_polls=2) == "drained"
    assert worker.hits == 4


def test_gives_up_at_the_timeout(worker_factory):
    worker = worker_factory([(1, 0)])
    start = time.monotonic()
    outcome = drain_mod.drain(worker.url, timeout=0.3, interval=0.05, quiet_polls=2)
    assert outcome.startswith("timeout with 1 requests")
    assert time.monotonic() - start < 2


def test_returns_at_once_when_the_server_is_gone():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "unreachable" in drain_mod.drain(f"http://127.0.0.1:{port}/metrics", 10, 0.01, 2)


def test_expands_env_in_the_url(worker_factory, monkeypatch, capsys):
    worker = worker_factory([(0, 0)])
    monkeypatch.setenv("LWS_LEADER_ADDRESS", "127.0.0.1")
    url = worker.url.replace("127.0.0.1", "${LWS_LEADER_ADDRESS}")
    assert drain_mod.main(["--metrics-url", url, "--timeout", "5", "--interval", "0.01"]) == 0
    assert "drain: drained" in capsys.readouterr().err


def test_waits_at_least_min_seconds_for_late_routed_requests(worker_factory):
    worker = worker_factory([(0, 0)])
    start = time.monotonic()
    assert drain_mod.drain(worker.url, timeout=10, interval=0.02, quiet_polls=2, min_seconds=0.3) == "drained"
    assert time.monotonic() - start >= 0.3
    assert worker.hits > 2
