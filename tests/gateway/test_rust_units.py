"""The Rust gateway's own checks: `cargo test` (routing, breaker, parsers, error mapping, client
protocol, config), `cargo fmt --check` and `cargo clippy -D warnings`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "rust_gateway" / "Cargo.toml"
pytestmark = [pytest.mark.timeout(1500)]


def cargo() -> str:
    found = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(found).exists():
        pytest.fail("cargo is not installed: run scripts/bootstrap.sh")
    return found


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "m3serve" / "cargo-target"))
    return subprocess.run(
        [cargo(), *args, "--manifest-path", str(MANIFEST)]
        if args[0] != "fmt"
        else [cargo(), "fmt", "--manifest-path", str(MANIFEST), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_cargo_unit_tests() -> None:
    r = run("test", "--lib", timeout=1400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    # The server-half suites must have run (not filtered out or compiled away).
    for suite in [
        "routing::policy::tests",
        "routing::prefix::tests",
        "workers::breaker::tests",
        "workers::client::tests",
        "api::params::tests",
        "error::tests",
        "workers::kubernetes::tests",
        "prompt_model::tests",
    ]:
        assert suite in out, f"{suite} did not run"
    assert " 0 passed" not in out


def test_cargo_fmt() -> None:
    r = run("fmt", "--check", timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def test_cargo_clippy() -> None:
    r = run("clippy", "--all-targets", "--", "-D", "warnings", timeout=1400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
