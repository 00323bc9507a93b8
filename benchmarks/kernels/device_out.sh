# Sourced by the device-call scripts. `device_out NAME` makes $OUT/NAME the working folder (OUT then points at it)
# and packs it into $OUT/NAME.tgz at exit, since the device tool returns at most 8 files. Sets PYTHONPATH.
device_out() {
  FINAL=${OUT:-/tmp/out}
  OUT=$FINAL/$1
  mkdir -p "$OUT"
  trap "tar czf '$FINAL/$1.tgz' -C '$FINAL' '$1' && rm -rf '$OUT'" EXIT
  export PYTHONPATH=kernels:python:benchmarks
}
# `bench_eager TAG`: bench_msa's extend and prefill sections against upstream (eager, GPU head start), results in
# $OUT/bench as msa_kernels_TAG_{extend,prefill}.*, their summary rows printed.
bench_eager() {
  for sec in extend prefill; do
    python3 benchmarks/kernels/bench_msa.py --only $sec --budget-s 200 --tag "$1_$sec" --out "$OUT/bench" \
      > "$OUT/bench_$sec.log" 2>&1
    sed -n '/## Summary/,/##/p' "$OUT/bench"/*"$1_$sec".md | grep "^| extend\|^| prefill" | cut -c1-120
  done
}
