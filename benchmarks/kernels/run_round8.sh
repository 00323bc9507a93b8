#!/usr/bin/env bash
# Round 8 device calls (issue 3). Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round8.sh [union,extend,prefill]
#   check: pytest -m gpu of the extend attention (full M3 shapes)
#   union: the union pass's kernel time (extend B=1 and B=8 overlap) at fewer keys per step (KSUB 32), which
#          halves its shared memory so that two programs can share an SM, against the defaults (KSUB 64, 3 stages)
#   rows64: 64-row union tiles (4 queries x 16 heads, MSA_EXTEND_TILE_ROWS=64): half the shared memory, so two
#          programs per SM, and narrower unions (random selections then mostly stay in the union pass)
#   (call 8 ran a step decode_tma: the GPU decode tests, then the decode attention kernel with K/V units through
#   TMA against gathered loads; measured no faster, that switch and the step were removed)
#   extend / prefill: bench_msa's section against upstream with the defaults (64-row scoring tiles since round 7)
# Everything lands in $OUT/r8 and is packed into $OUT/r8.tgz at exit.
set -u
source "$(dirname "$0")/device_out.sh"
round_start r8 union "$@"
if has check; then
  gpu_tests gpu_tests.log tests/kernels/test_extend_attention.py
fi
if has union; then
  for s in "MSA_NONE=1" "MSA_EXTEND_KSUB=32" "MSA_EXTEND_KSUB=32 MSA_EXTEND_STAGES=4" \
           "MSA_EXTEND_KSUB=32 MSA_EXTEND_STAGES=2" "MSA_EXTEND_STAGES=2" "MSA_NONE=2"; do
    for c in extend_b1_overlap extend_b8_overlap_shared; do kernel_times $c _extend_kernel $s; done
  done
fi
if has rows64; then
  R64="MSA_EXTEND_TILE_ROWS=64 MSA_EXTEND_KSUB=64 MSA_EXTEND_WIDE_KSUB=128"
  for c in extend_b1_overlap extend_b8_overlap_shared extend_b1_random; do
    kernel_times $c _extend_kernel MSA_NONE=1
    kernel_times $c _extend_kernel $R64
    kernel_times $c _extend_kernel $R64 MSA_EXTEND_STAGES=2
  done
  kernel_times extend_b1_random _extend_kernel $R64 MSA_EXTEND_UNION_MAX=48
  kernel_times extend_b1_random _score_kernel MSA_NONE=1
fi
if has rows_ab; then  # 128-row tiles (rounds 2-7) against the 64-row default, in one call on one card
  R128="MSA_EXTEND_TILE_ROWS=128 MSA_EXTEND_UNION_MAX=64"
  for c in extend_b1_overlap extend_b8_overlap_shared; do
    kernel_times $c _extend_kernel MSA_NONE=1
    kernel_times $c _extend_kernel $R128
    kernel_times $c _extend_kernel MSA_NONE=2
  done
  env $R128 python3 benchmarks/kernels/bench_msa.py --only extend --match overlap --budget-s 100 --tag r8_extend_rows128 \
    --out "$OUT/bench" > "$OUT/bench_extend_rows128.log" 2>&1
  grep "^| extend B=" "$OUT/bench"/*r8_extend_rows128.md | head -2 | cut -c1-140
fi
if has extend; then bench_eager r8 extend; fi
if has prefill; then bench_eager r8 prefill; fi
exit 0  # a step left out is not a failure
