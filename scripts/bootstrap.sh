#!/usr/bin/env bash
# Set up everything m3serve needs on a fresh Linux machine (no GPU needed), idempotently:
#   .venv/       Python 3.10+ virtual environment with m3serve (Rust gateway built by maturin),
#                the MSA kernel library, the benchmark client and the test tools;
#   .tools/bin/  helm, kubeconform and helm-unittest, built from the Go module proxy.
# Re-running it is cheap: pip skips what is installed, cargo reuses its build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

PYTHON=${PYTHON:-python3}
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"
  else
    step "no Rust toolchain found: installing Debian's cargo (needs root)"
    apt-get update -qq && apt-get install -y -qq cargo rustc >/dev/null
  fi
fi
# Keep the Rust build cache outside the checkout so a fresh clone does not rebuild every crate.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/m3serve/cargo-target}

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
step "installing Python packages (first run downloads torch and sglang: ~11 GB, several minutes)"
.venv/bin/python -m pip install -q --upgrade pip wheel
.venv/bin/python -m pip install --progress-bar off -q \
  -e ./kernels -e ./benchmarks -e ".[test]"

step "checking the gateway extension loads"
.venv/bin/python -c "import m3serve._gateway as g; print('m3serve._gateway', g.version())"

if [ -x scripts/install_helm_tools.sh ] || [ -f scripts/install_helm_tools.sh ]; then
  step "installing helm tools into .tools/bin"
  bash scripts/install_helm_tools.sh "$root/.tools/bin"
fi
step "bootstrap done"
