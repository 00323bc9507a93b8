#!/usr/bin/env bash
# Round 11 device calls (issue 3; calls 1-4 and 7 on an H200, 5-6 and 8-10 on an H100, see the round 11 notes).
# Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round11.sh [ab,score,fp8split,checkx,extend,prefill]
#   ab:      kernel time of both extend attention passes (_extend_kernel), torch.profiler, per layer: the previous
#            round's kernels (a copy of HEAD's kernels/ in .ab/base, carried; MSA_KERNELS_DIR) against this tree
#            under each of $AB_SETTINGS (default: the tree as is). Cases: $AB_CASES (default below, the B=8 case
#            twice). Calls 1 and 10 ran it on versions since removed (round 11 notes: one int64 record per union
#            member and a lazy O rescale on top, MSA_EXTEND_LAZY; the scalars loaded a step ahead by hand,
#            MSA_EXTEND_PREFETCH, with AB_SETTINGS="MSA_EXTEND_PREFETCH=0 MSA_EXTEND_STAGES=2 MSA_NONE=1").
#   score:   extend index scoring (scoring + merge kernels, per layer) with 128-row items on 8 warps at 2 stages
#            (two programs per SM, each key load serving twice the rows) and at 3 stages, against the default
#            (64 rows, 4 warps, 3 stages), the default measured first and last
#   fp8split: decode as served (profile_decode.py: CUDA graphs, graph plan) at B=32 on 60k with fp8 K/V and index-K,
#            attention alone and the layer, under each of $FP8_SPLIT_SETTINGS; the bf16 layer under the defaults
#            first and last (the fp8 target is a ratio to our bf16 layer)
#   checkx:  pytest -m gpu of extend attention (full M3 shapes; the wide-score-range case included)
#   extend / prefill: bench_msa's section against upstream
# Everything lands in $OUT/r11 and is packed into $OUT/r11.tgz at exit.
set -u
source "$(dirname "$0")/device_out.sh"
round_start r11 ab,checkx "$@"
export PYTHONUNBUFFERED=1
if has ab; then
  BASE="MSA_KERNELS_DIR=$PWD/.ab/base/kernels"
  for c in ${AB_CASES:-extend_b8_overlap_shared extend_b1_overlap extend_b1_random prefill_64k_overlap extend_b8_overlap_shared}; do
    for s in "$BASE" ${AB_SETTINGS:-MSA_NONE=1}; do kernel_times "$c" _extend_kernel "$s"; done
  done
fi
if has score; then
  for c in ${SCORE_CASES:-extend_b8_overlap_shared extend_b1_overlap prefill_64k}; do
    for s in MSA_NONE=1 "MSA_EXTEND_ROWS=128 MSA_SCORE_WARPS=8 MSA_SCORE_STAGES=2" \
             "MSA_EXTEND_ROWS=128 MSA_SCORE_WARPS=8 MSA_SCORE_STAGES=3" MSA_NONE=2; do
      # shellcheck disable=SC2086  # $s holds VAR=value words
      kernel_times "$c" "_score_kernel|_merge_kernel" $s
    done
  done
fi
if has fp8split; then
  pd() {  # CASE ENV=VALUE...
    local c=$1; shift
    env "$@" python3 benchmarks/kernels/profile_decode.py --cases "$c" --targets 0 --stages attn,layer --sets 8 \
      --out "$OUT" --tag "${c}_$(echo "$*" | tr ' =' '_-')" 2>&1 | tee -a "$OUT/fp8split.log" | grep -v "^case"
  }
  pd 32x60000 MSA_NONE=1
  for s in ${FP8_SPLIT_SETTINGS:-MSA_NONE=2 MSA_DECODE_CHUNK=128 MSA_DECODE_NSPLIT=8 MSA_DECODE_NSPLIT=2 \
      MSA_DECODE_STAGES=4 MSA_DECODE_PAGES_FIRST=1 MSA_NONE=3}; do
    echo "== $s"
    # shellcheck disable=SC2086  # $s holds VAR=value words
    pd 32x60000f $s
  done
  pd 32x60000 MSA_NONE=4
fi
if has checkx; then gpu_tests gpu_tests_extend.log tests/kernels/test_extend_attention.py; fi
if has extend; then bench_eager r11 extend; fi
if has prefill; then bench_eager r11 prefill; fi
exit 0  # a step left out is not a failure
