#!/usr/bin/env bash
# Nsight Compute profiles of the MSA kernels at M3 shapes (one device call). Writes $OUT/ncu.tgz.
set -u
source "$(dirname "$0")/device_out.sh"
device_out ncu
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis"
prof() {  # case, kernel regex, launches to skip
  ncu --clock-control none --kernel-name "regex:$2" --launch-skip "$3" --launch-count 1 $SECTIONS \
    python3 benchmarks/kernels/ncu_targets.py "$1" > "$OUT/$1_$2.txt" 2>&1
  echo "== $1 $2"; grep -E "Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|No Eligible|Stall|Warp Cycles Per Issued" "$OUT/$1_$2.txt" | head -14
}
prof decode_b1_60k _decode_kernel 3
prof decode_b1_60k _merge_kernel 3
prof decode_b1_60k _score_kernel 3
prof decode_b8_shared_60k _score_kernel 3
prof extend_b1_overlap _score_kernel 3
prof extend_b1_overlap _extend 3
