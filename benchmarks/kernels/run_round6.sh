#!/usr/bin/env bash
# Round 6 device call (issue 3): GPU tests of the decode kernels, and the A/B of fp16 products for fp8 caches
# (MSA_FP8_F16 = none | index | both, bench_msa --only fp8). Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round6.sh [check,fp8]
# Everything lands in $OUT/r6 and is packed into $OUT/r6.tgz at exit (the device tool returns at most 8 files).
# The round's dropped decode-fusion attempts were measured with profile_decode.py from uncommitted code; see
# benchmarks/results/msa_kernels_r6_notes.md.
set -u
FINAL=${OUT:-/tmp/out}
OUT=$FINAL/r6
mkdir -p "$OUT"
trap 'tar czf "$FINAL/r6.tgz" -C "$FINAL" r6 && rm -rf "$OUT"' EXIT
export PYTHONPATH=kernels:python:benchmarks
STEPS=${1:-check,fp8}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
if has check; then
  python3 -m pytest -q -m gpu tests/kernels/test_decode_attention.py tests/kernels/test_index_topk_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
fi
if has fp8; then
  for c in none index both; do
    MSA_FP8_F16=$c python3 benchmarks/kernels/bench_msa.py --only fp8 --budget-s 60 --tag r6_fp8_$c \
      --out "$OUT/bench" > "$OUT/bench_fp8_$c.log" 2>&1
    echo "MSA_FP8_F16=$c"; grep -A3 "fp8 speedup" "$OUT/bench"/*r6_fp8_$c*.md | tail -2
  done
fi
