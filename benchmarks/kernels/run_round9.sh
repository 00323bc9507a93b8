#!/usr/bin/env bash
# Round 9 device calls (issue 3). Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round9.sh [check,rows,extend,prefill]
#   check:   pytest -m gpu of the extend attention (full M3 shapes)
#   rows:    the union pass's kernel time, 128-row tiles (the default) against 64 (MSA_EXTEND_TILE_ROWS=64, its
#            union threshold 48), two A/B rounds, extend B=1 and B=8 overlap; then the layer against upstream with 64
#   score:   the extend scoring kernel's pipeline depth (MSA_SCORE_STAGES 2 / 3 / 4) at B=8 on a shared prefix
#   ncu:     Nsight Compute on the scoring and union-pass kernels of extend B=8 overlap (pipe utilization, stalls)
#   wide:    the attention kernels (union pass + wide pass) of this tree against another version's, extend B=1
#            random and overlap, B=8 overlap, prefill 64k random. The other version is an untracked copy made
#            before the call: `mkdir r9_head && git archive 3f8de6e kernels | tar -x -C r9_head` (round 8's kernels;
#            ncu_targets.py imports it through MSA_KERNELS_DIR); delete it afterwards
#   extend / prefill: bench_msa's section against upstream (prefill: random and high-overlap selections)
#   (calls 1-2 also ran a step `defer`: the whole-page loop with each step's P.V deferred to the next one, so
#   that the next score MMA could overlap the softmax; it lost and the code was removed, see
#   benchmarks/results/msa_kernels_r9_notes.md)
# Everything lands in $OUT/r9 and is packed into $OUT/r9.tgz at exit.
set -u
source "$(dirname "$0")/device_out.sh"
round_start r9 check,extend,prefill "$@"
if has check; then
  gpu_tests gpu_tests.log tests/kernels/test_extend_attention.py
fi
if has rows; then
  R64="MSA_EXTEND_TILE_ROWS=64 MSA_EXTEND_UNION_MAX=48"
  for c in extend_b1_overlap extend_b8_overlap_shared; do
    for s in "MSA_NONE=1" "$R64" "MSA_NONE=2" "$R64 MSA_NONE=3"; do kernel_times $c _extend_kernel $s; done
  done
  # shellcheck disable=SC2086  # R64 holds two VAR=value words
  (export $R64; bench_eager r9_rows64 extend)
fi
if has score; then
  for s in "MSA_NONE=1" "MSA_SCORE_STAGES=2" "MSA_SCORE_STAGES=4" "MSA_NONE=2"; do
    kernel_times extend_b8_overlap_shared _score_kernel $s
  done
fi
if has ncu; then
  for k in _score_kernel _extend_kernel; do
    ncu --clock-control none --kernel-name "regex:$k" --launch-skip 3 --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      --section InstructionStats --section MemoryWorkloadAnalysis --print-details all \
      python3 benchmarks/kernels/ncu_targets.py extend_b8_overlap_shared > "$OUT/ncu_b8_$k.txt" 2>&1
    echo "== $k"
    grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Tensor|GMMA|Stall" \
      "$OUT/ncu_b8_$k.txt" | head -24 | cut -c1-110
  done
fi
if has wide; then
  for c in extend_b1_overlap extend_b8_overlap_shared extend_b1_random prefill_64k; do
    kernel_times $c _extend_kernel MSA_NONE=1
    if [ -d r9_head/kernels ]; then kernel_times $c _extend_kernel MSA_KERNELS_DIR=r9_head/kernels; fi
  done
fi
if has extend; then bench_eager r9 extend; fi
if has prefill; then bench_eager r9 prefill; fi
exit 0  # a step left out is not a failure
