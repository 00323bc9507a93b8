#!/usr/bin/env bash
# The device command of the end-to-end benchmark (one call): unpack the bundle, run the three arms, write
# summary.json, summary.md and logs.tar.gz into $OUT (or E2E_OUT), print the table last.
#   bash benchmarks/agentic/gpu/run_gpu.sh [--quick] [run_e2e.py options]
#   --quick = --shape quick --budget-s 255 (a smoke of the whole pipeline within a 5-minute call)
#   --sequential = the full shape without --parallel-start (one worker on the GPU at a time)
# Default: --shape full --budget-s 540 --parallel-start --warmup-turns same (for a 10-minute call).
# Every other option goes to run_e2e.py (a later repeat of a default option wins), e.g.
#   --cuda-graph-arms all --graph-fallback     decode CUDA graphs (eager restart where a graph start fails)
#   --arms ours,upstream --concurrency 1,4,8,16 --repeats 3 --budget-s 510
set -uo pipefail
cd "$(dirname "$0")/../../.."
OUTDIR=${E2E_OUT:-${OUT:-/tmp/m3e2e/out}}
mkdir -p "$OUTDIR"
t0=$(date +%s)
setup=$(bash benchmarks/agentic/gpu/setup_site.sh) || { echo "setup failed" | tee "$OUTDIR/setup_failed.txt"; exit 1; }
eval "$setup"
echo "[e2e] setup took $(( $(date +%s) - t0 )) s; PYTHONPATH=$PYTHONPATH"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Triton's cache on the scratch disk; keep it between the arms of this call.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/m3e2e/triton_cache}
args=(--shape full --budget-s 540 --parallel-start --warmup-turns same)
if [ "${1:-}" = "--quick" ]; then
  shift
  args=(--shape quick --budget-s 255 --parallel-start)
elif [ "${1:-}" = "--sequential" ]; then
  # One worker on the GPU at a time (for sweeps: upstream's graph capture alone takes ~45 GB at batch 16).
  shift
  args=(--shape full --budget-s 540 --warmup-turns same)
fi
python3 benchmarks/agentic/gpu/run_e2e.py --out "$OUTDIR" --work /tmp/m3e2e/work "${args[@]}" "$@"
