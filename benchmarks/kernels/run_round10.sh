#!/usr/bin/env bash
# Round 10 device calls (issue 3). Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round10.sh [check,split,decode,fp8,extend,prefill]
#   check:   pytest -m gpu of decode attention and index top-k (full M3 shapes)
#   checkx:  pytest -m gpu of extend attention
#   split:   decode attention and the served layer (profile_decode.py: CUDA graphs, graph plan) at B=1, B=8
#            private / shared and B=32 on 60k: TMA half-page units (the default) against gathered loads
#            (MSA_DECODE_TMA=0), and TMA with other split counts and pipeline depths
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
  for s in ${SPLIT_SETTINGS:-"MSA_NONE=1" "MSA_DECODE_TMA=0" "MSA_DECODE_NSPLIT=16" "MSA_DECODE_NSPLIT=4" "MSA_NONE=2"}; do
    echo "== $s"
    # shellcheck disable=SC2086  # $s holds VAR=value words
    env $s python3 benchmarks/kernels/profile_decode.py --cases $CASES --targets 0 --stages attn,layer --sets 8 \
      --out "$OUT" --tag "${s// /_}" 2>&1 | tee -a "$OUT/split.log" | grep -v "^case"
  done
fi
if has decode; then
  python3 benchmarks/kernels/bench_msa.py --only decode --match N=60000 --budget-s 120 --tag r10_decode \
    --out "$OUT/bench" > "$OUT/bench_decode.log" 2>&1
  sed -n '/## Decode as served/,/## Every/p' "$OUT/bench"/*r10_decode.md | grep "^| decode" | cut -c1-130
fi
if has fp8; then  # TMA (default) against gathered loads in the fp8 attention
  for s in MSA_NONE=1 MSA_DECODE_TMA=0; do
    env $s python3 benchmarks/kernels/bench_msa.py --only fp8 --budget-s 120 --tag "r10_fp8_${s}" --out "$OUT/bench" \
      > "$OUT/bench_fp8_$s.log" 2>&1
    echo "== fp8 $s"
    grep "^| decode.*\(attn\|layer\) \|^| decode-fp8 .*| 0\.9" "$OUT/bench"/*"r10_fp8_${s}.md" | cut -c1-150
  done
fi
if has extend; then bench_eager r10 extend; fi
if has prefill; then bench_eager r10 prefill; fi
exit 0  # a step left out is not a failure
