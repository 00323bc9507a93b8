"""`m3serve gateway`: flags -> config, the argv `m3serve serve` uses, and clean exits on signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import free_port, wait_until

from m3serve.gateway import build_parser, config_from_args, gateway_command, main

pytestmark = pytest.mark.timeout(120)


def test_gateway_command_runs_the_cli_module():
    cmd = gateway_command(["http://a:1", "http://b:2"], "/m", "0.0.0.0", 8080, ["--api-key", "k"])
    assert cmd[:4] == [sys.executable, "-m", "m3serve.cli", "gateway"]
    assert cmd[cmd.index("--worker-urls") + 1 : cmd.index("--model-path")] == ["http://a:1", "http://b:2"]
    assert cmd[-2:] == ["--api-key", "k"] and "8080" in cmd
    with pytest.raises(ValueError):
        gateway_command([], "/m", "h", 1)


def test_flags_become_config():
    args = build_parser().parse_args(
        [
            "--worker-urls",
            "http://w:1",
            "--model-path",
            "/m",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--max-body-mb",
            "1",
            "--k8s-selector",
            "app=w",
            "--k8s-namespace",
            "ns",
            "--image-cache-mb",
            "1.5",
        ]
    )
    cfg = config_from_args(args)
    assert cfg["image_cache_bytes"] == 1536 * 1024
    assert cfg["worker_urls"] == ["http://w:1"] and cfg["api_keys"] == ["a", "b"]
    assert cfg["max_body_bytes"] == 1024 * 1024
    assert cfg["kubernetes"]["label_selector"] == "app=w" and cfg["kubernetes"]["namespace"] == "ns"
    assert "admin_key" not in cfg or cfg["admin_key"] is not None


def test_main_refuses_bad_arguments(capsys, tmp_path):
    assert main(["--worker-urls", "http://w:1"]) == 2  # no --model-path
    assert "--model-path" in capsys.readouterr().err
    # the Rust side validates too, naming the problem
    assert main(["--worker-urls", "ftp://w", "--tokenizer-mode", "bytes"]) == 2
    assert "ftp://w" in capsys.readouterr().err
    # an unreadable checkpoint is reported, not a crash
    assert (
        main(
            [
                "--worker-urls",
                "http://127.0.0.1:9",
                "--model-path",
                str(tmp_path / "missing"),
                "--port",
                str(free_port()),
            ]
        )
        == 1
    )
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a negative cache size is named
        main(["--worker-urls", "http://w:1", "--image-cache-mb", "-1"])
    assert "--image-cache-mb" in capsys.readouterr().err
    assert main(["--worker-urls", "http://w:1", "--tokenizer-mode", "bytes", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer_mode"] == "bytes"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_gateway_exits_cleanly_on_signal(sig, tmp_path):
    port = free_port()
    cmd = gateway_command(
        ["http://127.0.0.1:9"], str(tmp_path), "127.0.0.1", port, ["--tokenizer-mode", "bytes"]
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/liveness", timeout=1).status_code == 200, 30
        )
        time.sleep(0.2)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
