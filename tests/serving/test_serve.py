"""`m3serve serve` end to end: the tiny model on CPU behind the gateway, a request, then a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from m3serve.serving.processes import ManagedProcess, free_port

IMAGE_CACHE_MB = 48  # not the gateway's default: the test sees it arrive
READY_TIMEOUT_S = float(os.environ.get("M3SERVE_TEST_STARTUP_TIMEOUT", "420")) + 120


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{entry.name}: {cmd[:160]}")
    return found


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = dict(os.environ, M3SERVE_CACHE_DIR=str(root / "cache"), PYTHONUNBUFFERED="1")
    out = root / "serve.out"
    # Not a new session of its own would be closer to a terminal, but the test must never leak it.
    proc = ManagedProcess("m3serve serve", [sys.executable, "-m", "m3serve.cli", "serve", "--port", str(port),
                                            "--log-dir", str(root / "logs"),
                                            f"--gateway-arg=--image-cache-mb={IMAGE_CACHE_MB}"], env, out).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while "m3serve is ready." not in out.read_text(errors="replace"):
            if not proc.alive():
                pytest.fail(f"m3serve serve exited early ({proc.proc.returncode}):\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"m3serve serve not ready after {READY_TIMEOUT_S:.0f} s:\n{proc.log_tail()}")
            time.sleep(1)
        yield proc, out, root
    finally:
        proc.stop()


def test_serve_answers_then_stops_cleanly_on_ctrl_c(serve):
    proc, out, root = serve
    text = out.read_text()
    base = re.search(r"OpenAI base URL: (\S+)", text).group(1)
    model = re.search(r"\(model: ([^)]+)\)", text).group(1)
    assert "curl " in text and "/v1/chat/completions" in text

    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        reply = json.loads(r.read())
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1
    # --gateway-arg reached the gateway
    with urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert f"m3gw_image_cache_max_bytes {IMAGE_CACHE_MB << 20}" in metrics, metrics[-2000:]

    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C, delivered to `serve` alone: it must stop its children
    try:
        proc.proc.wait(timeout=90)
    except Exception:
        pytest.fail(f"m3serve serve did not exit after SIGINT:\n{proc.log_tail()}")
    assert proc.proc.returncode == 0
    assert "all processes stopped" in out.read_text()
    time.sleep(1)
    leftovers = _processes_mentioning(str(root))
    assert not leftovers, f"processes outlived m3serve serve: {leftovers}"


def test_gateway_args_need_the_gateway(capsys):
    from m3serve.serving.serve import main

    assert main(["--no-gateway", "--gateway-arg=--image-cache-mb=8"]) == 2
    assert "--gateway-arg needs the gateway" in capsys.readouterr().err
