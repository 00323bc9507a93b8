#!/usr/bin/env bash
# Round 7 device call (issue 3): TMA (bulk tensor copy) loads of whole pages in the extend/prefill attention.
# Usage on the device machine, from the repository root:  bash benchmarks/kernels/run_round7.sh [check,sweep,bench]
#   check: pytest -m gpu of the extend attention (full M3 shapes, TMA on and off)
#   sweep: kernel times (torch.profiler, warm) of the extend attention launches per setting (first call, when
#          the defaults were TMA at 2 stages in both passes)
#   confirm: the same for the chosen defaults (union pass TMA at 3 stages, wide pass gathered) against the
#          gathered loads at 2 and 3 stages
#   bench: bench_msa extend + prefill against upstream (MSA_TMA=1, the default), and extend B=1 and prefill
#          with MSA_TMA=0
# Everything lands in $OUT/r7 and is packed into $OUT/r7.tgz at exit.
set -u
source "$(dirname "$0")/device_out.sh"
device_out r7
STEPS=${1:-check,sweep}  # check,sweep,confirm,ws,bench,ab
has() { [[ ",$STEPS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
attn_times() {  # $1 case, rest: env settings; prints the extend kernel's time per layer
  local case=$1; shift
  local line
  line=$(env "$@" python3 benchmarks/kernels/ncu_targets.py "$case" --profile 2>&1 | tee -a "$OUT/sweep_$case.log" \
    | grep "_extend_kernel" | awk '{s += $(NF-2)} END {print s}')
  printf '%-26s %-70s extend attention %8s us/layer\n' "$case" "$*" "$line" | tee -a "$OUT/sweep.txt"
}
if has check; then
  python3 -m pytest -q -m gpu tests/kernels/test_extend_attention.py > "$OUT/gpu_tests.log" 2>&1
  tail -3 "$OUT/gpu_tests.log"
fi
if has sweep; then
  for s in "MSA_TMA=0" "MSA_TMA=1" "MSA_EXTEND_STAGES=3" "MSA_EXTEND_STAGES=4" "MSA_EXTEND_WARPS=8" \
           "MSA_EXTEND_WARPS=8 MSA_EXTEND_STAGES=3" "MSA_EXTEND_KSUB=128 MSA_EXTEND_WARPS=8" \
           "MSA_TMA=0 MSA_EXTEND_WARPS=8"; do
    attn_times extend_b1_overlap $s
  done
  for s in "MSA_TMA=0" "MSA_TMA=1" "MSA_EXTEND_WIDE_STAGES=3" "MSA_EXTEND_WIDE_WARPS=8" \
           "MSA_EXTEND_WIDE_KSUB=64" "MSA_EXTEND_WIDE_WARPS=2"; do
    attn_times extend_b1_random $s
  done
fi
if has confirm; then
  for s in "MSA_TMA=0" "MSA_TMA=0 MSA_EXTEND_STAGES=3" "MSA_NONE=1" "MSA_TMA=1" ; do
    attn_times extend_b1_overlap $s
    attn_times extend_b8_overlap_shared $s
  done
  for s in "MSA_TMA=0" "MSA_NONE=1" "MSA_EXTEND_WIDE_TMA=1"; do
    attn_times extend_b1_random $s
  done
fi
if has ws; then
  # Softmax with the scale folded into one FMA (MSA_EXTEND_FMA=1) and Triton's Hopper warp specialization of the
  # whole-page loop (MSA_EXTEND_WS=1). The fastest setting on extend_b1_overlap then runs the GPU tests and the
  # benchmarks (bench), so one call measures the winner against upstream.
  for s in "MSA_TMA=0" "MSA_NONE=1" "MSA_EXTEND_FMA=1" "MSA_EXTEND_WS=1" "MSA_EXTEND_WS=1 MSA_EXTEND_WARPS=8" \
           "MSA_EXTEND_WS=1 MSA_EXTEND_FMA=1" "MSA_NONE=2"; do
    attn_times extend_b1_overlap $s
  done
  BEST=$(grep extend_b1_overlap "$OUT/sweep.txt" | grep -v "MSA_TMA=0" | awk '$NF=="us/layer" && $(NF-1)+0 > 0' \
    | awk '{t=$(NF-1); $1=""; sub(/extend attention.*/, ""); print t, $0}' | sort -n | head -1 \
    | cut -d' ' -f2-)
  echo "best setting: $BEST" | tee "$OUT/best.txt"
  export $BEST
  python3 -m pytest -q -m gpu tests/kernels/test_extend_attention.py > "$OUT/gpu_tests_best.log" 2>&1
  tail -1 "$OUT/gpu_tests_best.log"
fi
if has bench; then
  for sec in extend prefill; do
    python3 benchmarks/kernels/bench_msa.py --only $sec --budget-s 200 --tag r7_$sec --out "$OUT/bench" \
      > "$OUT/bench_$sec.log" 2>&1
    sed -n '/## Summary/,/##/p' "$OUT/bench"/*r7_$sec.md | grep "^| extend\|^| prefill" | cut -c1-120
  done
fi
if has ab; then  # our arm with gathered loads, against upstream in the same call
  env MSA_TMA=0 python3 benchmarks/kernels/bench_msa.py --only extend --match "B=1 " --budget-s 100 --tag r7_extend_tma0 \
    --out "$OUT/bench" > "$OUT/bench_extend_tma0.log" 2>&1
  grep "^| extend B=1" "$OUT/bench"/*r7_extend_tma0.md | head -2 | cut -c1-120
  env MSA_TMA=0 python3 benchmarks/kernels/bench_msa.py --only prefill --budget-s 100 --tag r7_prefill_tma0 \
    --out "$OUT/bench" > "$OUT/bench_prefill_tma0.log" 2>&1
  grep "^| prefill B=1" "$OUT/bench"/*r7_prefill_tma0.md | head -1 | cut -c1-120
fi
