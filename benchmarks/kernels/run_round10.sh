#!/usr/bin/env bash
# Round 10 device calls (issue 3). Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round10.sh [check,checkx,split,order,decode,fp8,extend,prefill]
#   check:   pytest -m gpu of decode attention and index top-k (full M3 shapes)
#   checkx:  pytest -m gpu of extend attention
#   split:   decode attention and the served layer (profile_decode.py: CUDA graphs, graph plan) at B=1, B=8
#            private / shared and B=32 on 60k under the settings in $SPLIT_SETTINGS. Call 1 ran it on a TMA variant
#            of the decode attention (MSA_DECODE_TMA), which lost and was removed (round 10 notes)
#   order:   (call 2) the extend attention kernels (both passes) with the wide pass's grid head-major against the
#            old (tiles, heads, query slot) order (MSA_EXTEND_WIDE_ORDER=part; the knob went once head-major was
#            adopted), on random selections
#   score:   (call 6; MSA_SCORE_KSUB belonged to a scoring-kernel variant since removed, see the round 10 notes)
#            extend index scoring with 128-row items in 64-key steps (MSA_EXTEND_ROWS=128 MSA_SCORE_KSUB=64: each
#            key load serves twice the rows of the default 64-row items, at the default's 64 accumulator registers
#            per thread), 4 warps at 2 / 3 stages and 8 warps, against the default;
#            first the index top-k GPU tests with that setting
#   decode / fp8 / extend / prefill: bench_msa's section against upstream (decode at 60k only)
# Everything lands in $OUT/r10 and is packed into $OUT/r10.tgz at exit.
set -u
source "$(dirname "$0")/device_out.sh"
round_start r10 check,split,decode,fp8 "$@"
if has check; then
  gpu_tests gpu_tests_decode.log tests/kernels/test_decode_attention.py tests/kernels/test_index_topk_gpu.py
fi
if has checkx; then gpu_tests gpu_tests_extend.log tests/kernels/test_extend_attention.py; fi
if has split; then
  CASES=1x60000,8x60000s,8x60000,32x60000
  for s in ${SPLIT_SETTINGS:-MSA_NONE=1 MSA_DECODE_NSPLIT=16 MSA_DECODE_NSPLIT=4 MSA_NONE=2}; do
    echo "== $s"
    # shellcheck disable=SC2086  # $s holds VAR=value words
    env $s python3 benchmarks/kernels/profile_decode.py --cases $CASES --targets 0 --stages attn,layer --sets 8 \
      --out "$OUT" --tag "${s// /_}" 2>&1 | tee -a "$OUT/split.log" | grep -v "^case"
  done
fi
if has order; then
  for c in extend_b1_random extend_b8_random_shared prefill_64k; do
    for s in MSA_NONE=1 MSA_EXTEND_WIDE_ORDER=part; do kernel_times $c _extend_kernel $s; done
  done
  for s in MSA_NONE=2 MSA_EXTEND_WIDE_ORDER=part; do kernel_times extend_b1_random _extend_kernel $s; done
fi
if has score; then
  R128="MSA_EXTEND_ROWS=128 MSA_SCORE_KSUB=64 MSA_SCORE_WARPS=4 MSA_SCORE_STAGES=2"
  # shellcheck disable=SC2086  # R128 holds VAR=value words
  (export $R128; gpu_tests gpu_tests_topk_rows128_ksub64.log tests/kernels/test_index_topk_gpu.py)
  for c in extend_b8_overlap_shared extend_b1_overlap prefill_64k; do
    for s in "MSA_NONE=1" "$R128" "MSA_EXTEND_ROWS=128 MSA_SCORE_KSUB=64 MSA_SCORE_WARPS=4 MSA_SCORE_STAGES=3" \
             "MSA_EXTEND_ROWS=128 MSA_SCORE_KSUB=64 MSA_SCORE_WARPS=8" "MSA_NONE=2"; do
      # shellcheck disable=SC2086
      kernel_times $c "_score_kernel|_merge_kernel" $s
    done
  done
fi
if has decode; then
  python3 benchmarks/kernels/bench_msa.py --only decode --match N=60000 --budget-s 120 --tag r10_decode \
    --out "$OUT/bench" > "$OUT/bench_decode.log" 2>&1
  sed -n '/## Decode as served/,/## Every/p' "$OUT/bench"/*r10_decode.md | grep "^| decode" | cut -c1-130
fi
if has fp8; then
  for s in ${FP8_SETTINGS:-MSA_NONE=1}; do
    env $s python3 benchmarks/kernels/bench_msa.py --only fp8 --budget-s 120 --tag "r10_fp8_${s}" --out "$OUT/bench" \
      > "$OUT/bench_fp8_$s.log" 2>&1
    echo "== fp8 $s"
    grep "^| decode.*\(attn\|layer\) \|^| decode-fp8 .*| 0\.9" "$OUT/bench"/*"r10_fp8_${s}.md" | cut -c1-150
  done
fi
if has extend; then bench_eager r10 extend; fi
if has prefill; then bench_eager r10 prefill; fi
exit 0  # a step left out is not a failure
