# Sourced by the device-call scripts: `device_out NAME` makes $OUT/NAME the working folder (OUT then points at it)
# and packs it into $OUT/NAME.tgz at exit, since the device tool returns at most 8 files. Sets PYTHONPATH.
device_out() {
  FINAL=${OUT:-/tmp/out}
  OUT=$FINAL/$1
  mkdir -p "$OUT"
  trap "tar czf '$FINAL/$1.tgz' -C '$FINAL' '$1' && rm -rf '$OUT'" EXIT
  export PYTHONPATH=kernels:python:benchmarks
}
