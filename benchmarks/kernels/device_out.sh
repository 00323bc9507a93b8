# Sourced by the device-call scripts. `device_out NAME` makes $OUT/NAME the working folder (OUT then points at it)
# and packs it into $OUT/NAME.tgz at exit, since the device tool returns at most 8 files. Sets PYTHONPATH.
device_out() {
  FINAL=${OUT:-/tmp/out}
  OUT=$FINAL/$1
  mkdir -p "$OUT"
  trap "tar czf '$FINAL/$1.tgz' -C '$FINAL' '$1' && rm -rf '$OUT'" EXIT
  export PYTHONPATH=kernels:python:benchmarks
}
# `round_start NAME DEFAULT_STEPS [STEPS]`: the round scripts' preamble: `device_out NAME`, the comma-separated
# steps to run in $STEPS (the script's first argument, else DEFAULT_STEPS; `has STEP` tests one) and the card's name
# in $OUT/card.txt.
round_start() {
  device_out "$1"
  STEPS=${3:-$2}
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
}
has() { [[ ",$STEPS," == *",$1,"* ]]; }
# `gpu_tests LOG FILE...`: pytest -m gpu of those test files into $OUT/LOG; prints its summary line.
gpu_tests() {
  local log=$1; shift
  python3 -m pytest -q -m gpu "$@" > "$OUT/$log" 2>&1
  tail -1 "$OUT/$log"
}
# `bench_eager TAG [SECTIONS]`: bench_msa's extend and prefill sections (or those named, comma-separated) against
# upstream (eager, GPU head start), results in $OUT/bench as msa_kernels_TAG_{extend,prefill}.*, summary rows printed.
bench_eager() {
  local sections=${2:-extend,prefill}
  for sec in ${sections//,/ }; do
    python3 benchmarks/kernels/bench_msa.py --only $sec --budget-s 200 --tag "$1_$sec" --out "$OUT/bench" \
      > "$OUT/bench_$sec.log" 2>&1
    sed -n '/## Summary/,/##/p' "$OUT/bench"/*"$1_$sec".md | grep "^| extend\|^| prefill" | cut -c1-120
  done
}
# `kernel_times CASE REGEX [ENV=VALUE...]`: one ncu_targets.py case under torch.profiler with those settings; prints
# the summed time per layer of the kernels matching REGEX to $OUT/sweep.txt (full log in $OUT/sweep_CASE.log).
kernel_times() {  # $1 case, $2 kernel-name regex, rest: env settings; prints that kernel's time per layer
  local case=$1 kernel=$2; shift 2
  local line
  line=$(env "$@" python3 benchmarks/kernels/ncu_targets.py "$case" --profile 2>&1 | tee -a "$OUT/sweep_$case.log" \
    | grep -E "$kernel" | awk '{s += $(NF-2)} END {print s}')
  printf '%-26s %-44s %-16s %8s us/layer\n' "$case" "$*" "$kernel" "$line" | tee -a "$OUT/sweep.txt"
}
