#!/usr/bin/env bash
# Round 7 device call (issue 3): TMA (bulk tensor copy) loads of whole pages in the extend/prefill attention.
# Usage on the device machine, from the repository root:  bash benchmarks/kernels/run_round7.sh [check,sweep,bench]
#   check: pytest -m gpu of the extend attention (full M3 shapes, TMA on and off); topk: of the index top-k
#   sweep: kernel times (torch.profiler, warm) of the extend attention launches per setting (first call, when
#          the defaults were TMA at 2 stages in both passes)
#   confirm: the same for the chosen defaults (union pass TMA at 3 stages, wide pass gathered) against the
#          gathered loads at 2 and 3 stages
#   score: the scoring kernel's time per layer with and without TMA index-K loads, and at 3 stages
#   score2: the same for 4 warps instead of 8, and 256 or 64 rows per extend item instead of 128
#   score3: 32 and 128 rows per extend item once 64 was the default
#   kvmajor: attention kernels' time with the KV-major segment pass as the wide pass, against the default
#   bench: bench_msa extend + prefill against upstream (the defaults); ab: extend B=1 and prefill, MSA_TMA=0
#   decode: bench_msa decode at 60k as served, MSA_TMA=1 and 0 (the scoring kernel's index-K loads)
# Everything lands in $OUT/r7 and is packed into $OUT/r7.tgz at exit.
set -u
source "$(dirname "$0")/device_out.sh"
round_start r7 check,sweep "$@"  # check,topk,sweep,confirm,score,score2,score3,kvmajor,bench,ab,decode (run in this order, decode before bench)
attn_times() { local case=$1; shift; kernel_times "$case" _extend_kernel "$@"; }
if has check; then
  gpu_tests gpu_tests.log tests/kernels/test_extend_attention.py
fi
if has topk; then
  gpu_tests gpu_tests_topk.log tests/kernels/test_index_topk_gpu.py
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
if has score; then
  # TMA loads of index-K pages in the scoring kernel, and its pipelining depth (MSA_SCORE_STAGES)
  for c in extend_b1_overlap extend_b8_overlap_shared; do
    for s in "MSA_TMA=0" "MSA_TMA=1" "MSA_SCORE_STAGES=3"; do
      kernel_times $c _score_kernel $s
    done
  done
  for c in decode_b1_60k decode_b8_shared_60k; do
    for s in "MSA_TMA=0" "MSA_TMA=1"; do kernel_times $c _score_kernel $s; done
  done
fi
if has score2; then
  # Scoring tiles: warps per program and rows per extend item (tokens x index heads)
  for c in extend_b1_overlap extend_b8_overlap_shared prefill_64k; do
    for s in "MSA_NONE=1" "MSA_SCORE_WARPS=4" "MSA_EXTEND_ROWS=256" "MSA_EXTEND_ROWS=64"; do
      kernel_times $c _score_kernel $s
    done
  done
fi
if has score3; then  # after 64 rows became the default: 32 rows, and 128 again
  for c in extend_b1_overlap extend_b8_overlap_shared prefill_64k; do
    for s in "MSA_EXTEND_ROWS=32" "MSA_EXTEND_ROWS=128"; do kernel_times $c _score_kernel $s; done
  done
fi
if has kvmajor; then  # the KV-major segment pass (opt-in wide pass, unmeasured when written) against the default
  for c in extend_b1_random prefill_64k; do
    for s in "MSA_NONE=1" "MSA_EXTEND_WIDE_PASS=kv_major"; do
      kernel_times $c "_extend_kernel|kv_segment_kernel| merge_kernel" $s
    done
  done
fi
if has decode; then  # decode at 60k as served, TMA index-K loads on and off, against upstream in each run
  for t in 1 0; do
    env MSA_TMA=$t python3 benchmarks/kernels/bench_msa.py --only decode --match "N=60000" --budget-s 90 \
      --tag r7_decode_tma$t --out "$OUT/bench" > "$OUT/bench_decode_tma$t.log" 2>&1
    echo "MSA_TMA=$t"; grep -A12 "## Decode as served" "$OUT/bench"/*r7_decode_tma$t.md | grep "^| decode" | cut -c1-150
  done
fi
if has bench; then
  bench_eager r7
fi
if has ab; then  # our arm with gathered loads, against upstream in the same call
  env MSA_TMA=0 python3 benchmarks/kernels/bench_msa.py --only extend --match "B=1 " --budget-s 100 --tag r7_extend_tma0 \
    --out "$OUT/bench" > "$OUT/bench_extend_tma0.log" 2>&1
  grep "^| extend B=1" "$OUT/bench"/*r7_extend_tma0.md | head -2 | cut -c1-120
  env MSA_TMA=0 python3 benchmarks/kernels/bench_msa.py --only prefill --budget-s 100 --tag r7_prefill_tma0 \
    --out "$OUT/bench" > "$OUT/bench_prefill_tma0.log" 2>&1
  grep "^| prefill B=1" "$OUT/bench"/*r7_prefill_tma0.md | head -1 | cut -c1-120
fi
