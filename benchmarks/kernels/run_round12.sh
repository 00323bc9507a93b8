#!/usr/bin/env bash
# Round 12 device calls (issue 3: fp8 decode attention loading K/V as 32-bit words; benchmarks/results/
# msa_kernels_r12_notes.md). Calls 1-4 ran earlier forms of some steps (the notes say which); as committed:
# Usage on the device machine, from the repository root:
#   bash benchmarks/kernels/run_round12.sh [checkd,fp8ab,tp,strided,fp8rep,fp8bench]
#   checkd:   pytest -m gpu of decode attention (full M3 shapes; fp8 as words and as bytes)
#   fp8ab:    decode as served (profile_decode.py: CUDA graphs, graph plan), attention alone and the layer, fp8 K/V
#             and index-K: K/V as bytes (MSA_FP8_WORDS=0) against words (1, the default), interleaved and
#             repeated, at B=32 on 60k, then B=8 on a shared 60k prefix and B=1; our bf16 layer first and last
#   tp:       the same at the per-GPU split of tensor parallelism 4 (MSA_BENCH_HEADS=16/1), B=32
#   strided:  strided_read.py: one KV head's pages read out of [slots, heads, D] at 4 heads and at 1, fp8 and bf16
#   fp8rep:   bench_msa's fp8 section at 64/4 six times, bytes and words alternating
#   fp8bench: bench_msa's fp8 section (ours bf16 and fp8 layers, selection agreement) as the round's result, at
#             M3's full heads (64/4) and at the per-GPU split of tensor parallelism 4 and 8 (16/1, 8/1)
# Everything lands in $OUT/r12 and is packed into $OUT/r12.tgz at exit.
set -u
source "$(dirname "$0")/device_out.sh"
round_start r12 checkd,fp8ab,tp,strided,fp8rep,fp8bench "$@"
export PYTHONUNBUFFERED=1
pd() {  # CASE ENV=VALUE...: one profile_decode run, its row prefixed by the settings
  local c=$1; shift
  env "$@" python3 benchmarks/kernels/profile_decode.py --cases "$c" --targets 0 --stages attn,layer --sets 8 \
    --out "$OUT" --tag "${c}_$(echo "$*" | tr ' =/' '_-x')" 2>&1 | tee -a "$OUT/profile.log" \
    | grep -v "^case" | sed "s|^|$(printf '%-40s' "$*") |"
}
fp8_bench() {  # TAG ENV=VALUE...: bench_msa's fp8 section, its summary row printed
  local tag=$1; shift
  env "$@" python3 benchmarks/kernels/bench_msa.py --only fp8 --budget-s 120 --tag "$tag" --out "$OUT/bench" \
    > "$OUT/bench_$tag.log" 2>&1
  echo "$* $(sed -n '/## fp8/,/## Every/p' "$OUT/bench"/*"$tag".md | grep "^| decode")"
}
if has checkd; then gpu_tests gpu_tests_decode.log tests/kernels/test_decode_attention.py; fi
if has fp8ab; then
  pd 32x60000 MSA_NONE=1
  for rep in 1 2 3; do for w in 0 1; do pd 32x60000f MSA_FP8_WORDS=$w; done; done
  for c in 8x60000sf 1x60000f; do for rep in 1 2; do for w in 0 1; do pd "$c" MSA_FP8_WORDS=$w; done; done; done
  pd 32x60000 MSA_NONE=2
fi
if has tp; then
  pd 32x60000 MSA_BENCH_HEADS=16/1 MSA_NONE=1
  for rep in 1 2; do for w in 0 1; do pd 32x60000f MSA_BENCH_HEADS=16/1 MSA_FP8_WORDS=$w; done; done
  pd 32x60000 MSA_BENCH_HEADS=16/1 MSA_NONE=2
fi
if has strided; then python3 benchmarks/kernels/strided_read.py --out "$OUT" 2>&1 | tee "$OUT/strided.log"; fi
if has fp8rep; then
  for rep in 1 2 3; do for w in 0 1; do fp8_bench "r12_fp8rep_w${w}_$rep" MSA_FP8_WORDS=$w; done; done
fi
if has fp8bench; then
  for h in ${BENCH_HEADS:-64/4 16/1 8/1}; do fp8_bench "r12_fp8_$(echo "$h" | tr / x)" MSA_BENCH_HEADS=$h; done
fi
exit 0  # a step left out is not a failure
