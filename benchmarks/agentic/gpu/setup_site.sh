#!/usr/bin/env bash
# On the GPU machine: unpack the offline bundle (scripts/prepare_gpu_e2e_bundle.sh) into a site folder and
# print the PYTHONPATH to use (source it: `eval "$(bash benchmarks/agentic/gpu/setup_site.sh)"`).
#   site: the 31 wheels (pip --target, no index, no deps) + stripped sglang 0.5.23 + m3serve's entry points
#   repo: python/ (m3serve), kernels/ (msa_kernels), benchmarks/ (m3bench) on PYTHONPATH as source
#   stubs (IPython.display, soundfile) LAST, so a real package wins where the image has one.
# Env: E2E_BUNDLE (default .baseline/e2e), E2E_SITE (default /tmp/m3e2e/site), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/../../.."
REPO=$(pwd)
B=${E2E_BUNDLE:-$REPO/.baseline/e2e}
SITE=${E2E_SITE:-/tmp/m3e2e/site}
PY=${PYTHON:-python3}
[ -d "$B/wheels" ] || { echo "setup_site: no bundle at $B (run scripts/prepare_gpu_e2e_bundle.sh and carry it)" >&2; exit 1; }
rm -rf "$SITE"
mkdir -p "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$B"/wheels/*.whl >&2
tar -xJf "$B/sglang_stripped.tar.xz" -C "$SITE"
cp -r "$B"/dist/. "$SITE"/
if [ -f "$B/gateway/_gateway.abi3.so" ] && [ ! -f "$REPO/python/m3serve/_gateway.abi3.so" ]; then
  cp "$B/gateway/_gateway.abi3.so" "$REPO/python/m3serve/"
fi
echo "export PYTHONPATH=$SITE:$REPO/python:$REPO/kernels:$REPO/benchmarks:$B/stubs"
