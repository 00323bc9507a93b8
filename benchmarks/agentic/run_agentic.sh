#!/usr/bin/env bash
# agentic-60k-c8 (research/perf_anchors.md section 4.1) against a running OpenAI-compatible endpoint:
# a sweep over concurrency 1,4,8,16, 3 repeats each (the summary is their median), JSON + plots in
# benchmarks/results/agentic/.
#
#   benchmarks/agentic/run_agentic.sh BASE_URL LABEL [more `m3serve bench` options]
#   e.g. benchmarks/agentic/run_agentic.sh http://127.0.0.1:8000/v1 ours --tokenizer /models/m3-slice
#
# Environment: CONCURRENCY (default 1,4,8,16), REPEATS (default 3), OUT_DIR (default benchmarks/results/agentic).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
base_url=$1 label=$2
shift 2
cd "$(dirname "$0")/../.."
out_dir=${OUT_DIR:-benchmarks/results/agentic}
mkdir -p "$out_dir"
bench=${M3SERVE:-.venv/bin/m3serve}
exec "$bench" bench \
  --base-url "$base_url" \
  --prefix-tokens 60000 --user-tokens 1024 --tool-result-tokens 1536 --turns 8 --output-tokens 256 \
  --concurrency "${CONCURRENCY:-1,4,8,16}" --repeats "${REPEATS:-3}" --warmup-requests 1 \
  --output "$out_dir/$label.json" --output-details \
  "$@"
