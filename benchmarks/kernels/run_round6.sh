#!/usr/bin/env bash
# Round 6 device call (issue 3): GPU tests of the decode kernels, and the A/B of fp16 products for fp8 caches
# (MSA_FP8_F16 = none | index | both, bench_msa --only fp8). Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round6.sh [check,fp8,tune,eager,direct]
# Everything lands in $OUT/r6 and is packed into $OUT/r6.tgz at exit (the device tool returns at most 8 files).
# The round's dropped decode-fusion attempts were measured with profile_decode.py from uncommitted code; see
# benchmarks/results/msa_kernels_r6_notes.md.
set -u
source "$(dirname "$0")/device_out.sh"
round_start r6 check,fp8,tune "$@"
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
if has tune; then
  # Decode at B=1-8 (graph plan as served): attention splits. The round also measured MSA_GRAPH_ROWS=32/64 (rows
  # per scoring item on shared prefixes, a knob since removed): no gain (profile_decode_h200_r6_tune.json).
  for v in MSA_NONE=1 MSA_DECODE_NSPLIT=8 MSA_DECODE_NSPLIT=2; do
    echo "== $v"
    env "$v" python3 benchmarks/kernels/profile_decode.py --cases 8x60000s,8x60000,4x60000s,1x60000 --targets 0 \
      --stages score,merge,attn,layer --tag "r6_${v//=/_}" --out "$OUT" 2>&1 | grep -v -i warn | tail -4
  done
  python3 benchmarks/kernels/bench_msa.py --only decode --match "N=60000" --budget-s 90 --tag r6_decode \
    --out "$OUT/bench" > "$OUT/bench_decode.log" 2>&1
  grep -A12 "## Decode as served" "$OUT/bench"/*r6_decode*.md | grep "^| decode" | cut -c1-150
fi
if has eager; then
  # Extend and prefill re-timed with the GPU head start in time_eager (us_cold keeps the previous method).
  bench_eager r6
fi
if has direct; then
  # Single-slice merge picks the best 15 directly (MSA_MERGE_DIRECT=1, default) vs the running best (=0).
  gpu_tests gpu_tests_direct.log tests/kernels/test_index_topk_gpu.py
  for d in 1 0; do
    for c in decode_b1_60k decode_b8_shared_60k extend_b1_overlap extend_b1_random; do
      MSA_MERGE_DIRECT=$d python3 benchmarks/kernels/ncu_targets.py $c --profile 2>&1 | grep "us/layer" \
        | sed "s/^/direct=$d /" | tee -a "$OUT/kernel_times_direct.txt" | grep -i "merge"
    done
    MSA_MERGE_DIRECT=$d python3 benchmarks/kernels/profile_decode.py --cases 1x60000,8x60000s,1x262144 --targets 0 \
      --stages merge,layer --tag "r6_direct$d" --out "$OUT" 2>&1 | grep -v -i warn | tail -3
    MSA_MERGE_DIRECT=$d python3 benchmarks/kernels/bench_msa.py --only extend --match "B=1 " --budget-s 100 \
      --tag "r6_extend_direct$d" --out "$OUT/bench" > "$OUT/bench_extend_direct$d.log" 2>&1
    grep "^| extend B=1" "$OUT/bench"/*r6_extend_direct$d.md | head -2 | cut -c1-110
  done
fi
