"""The Rust gateway's own checks: `cargo test` (routing, breaker, parsers, error mapping, client
protocol, config), `cargo fmt --check` and `cargo clippy -D warnings`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def run(subcommand: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`cargo <subcommand> --manifest-path rust_gateway/Cargo.toml <args>`."""
    env = {**os.environ}
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "m3serve" / "cargo-target"))
    # The same interpreter every time, so pyo3's build configuration (and its build cache) is stable.
    env.setdefault("PYO3_PYTHON", sys.executable)
    cmd = [cargo(), subcommand, "--manifest-path", str(MANIFEST), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_cargo_unit_tests() -> None:
    # --release reuses the dependencies the bootstrap build (maturin, release) already compiled.
    r = run("test", "--release", "--lib", timeout=1400)
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
