#!/usr/bin/env bash
# Build the offline bundle for the end-to-end GPU benchmark (benchmarks/agentic/gpu/), into the
# git-ignored .baseline/e2e/ (never committed; upstream code travels only in there):
#
#   .baseline/e2e/wheels/                 cp312 wheels of what SGLang 0.5.23 needs beyond the GPU image
#                                         (research/sglang_gpu_feasibility.md section 4: 31 packages,
#                                         versions pinned below to the ones our CPU SGLang runs with)
#   .baseline/e2e/sglang_stripped.tar.xz  the sglang 0.5.23 wheel's Python files + dist-info, without
#                                         multimodal_gen/, test/, benchmark/, *.so (Rust extensions:
#                                         SGLang falls back to its Python radix tree) and the *.cu/*.cuh
#                                         files outside sglang/kernels/jit/
#   .baseline/e2e/stubs/                  our own few-line stand-ins for IPython.display and soundfile
#                                         (notebook/audio imports only; put LAST on PYTHONPATH so a real
#                                         package wins where the image has one)
#   .baseline/e2e/dist/                   m3serve-0.1.0.dist-info (entry points only: the portable
#                                         platform and the M3 plugin are found through it, since m3serve
#                                         itself travels as source on PYTHONPATH)
#   .baseline/e2e/gateway/                m3serve's Rust gateway extension (_gateway.abi3.so), when this
#                                         checkout has one built (abi3, x86-64, glibc >= 2.34)
#   .baseline/e2e/MANIFEST.txt            what is in it, sizes, sha256 of the tarball
#
# m3serve, msa_kernels and m3bench are not copied: they travel with the working tree and go on
# PYTHONPATH (python/, kernels/, benchmarks/). The device call carries .baseline/e2e (about 35 MiB;
# the limit is 64 MiB per call with the repository). Setup there: benchmarks/agentic/gpu/setup_site.sh.
#
# Usage: bash scripts/prepare_gpu_e2e_bundle.sh   (idempotent; needs pip, unzip, tar, xz; no GPU)
# Env: PYTHON (default .venv/bin/python if present, else python3), E2E_BUNDLE (default .baseline/e2e),
#      SGLANG_WHEEL (an already downloaded sglang 0.5.23 wheel; default: .baseline/wheels/ or download).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUNDLE=${E2E_BUNDLE:-.baseline/e2e}
CACHE=.baseline/e2e_cache  # downloads, kept between builds
mkdir -p "$BUNDLE" "$CACHE/wheels"

# The packages SGLang 0.5.23 imports that the GPU image (KINDS.md: torch 2.11, triton 3.6, transformers
# 5.17, tokenizers, numpy, safetensors, huggingface_hub, httpx ...) lacks, or has at a version sglang
# refuses (transformers). Keep exactly one version of each.
WHEELS=(
  annotated-types==0.8.0 apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 dill==0.4.1 distro==1.9.0
  fastapi==0.165.0 gguf==0.19.0 jiter==0.19.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  loguru==0.7.3 msgspec==0.22.0 openai==2.8.0 openai-harmony==0.0.4 opentelemetry-api==1.45.2
  orjson==3.13.0 partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.14.4
  pydantic-core==2.50.5 python-multipart==0.0.34 pyzmq==27.3.0 referencing==0.37.0 rpds-py==2026.9.1
  setproctitle==1.3.8 sniffio==1.3.1 starlette==1.10.0 transformers==5.19.0 typing-inspection==0.4.5
  uvicorn==0.54.0 xgrammar==0.2.7
)
PLATFORMS=()
for n in 39 35 34 31 28 27 24 17 5; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

wheel_name() {  # pip's file-name form of a requirement's project name: lower case, - . -> _
  echo "${1%%==*}" | tr 'A-Z.-' 'a-z__'
}
have_wheel() {  # NAME==VERSION already in the cache?
  local stem ver f
  stem=$(wheel_name "$1") ver=${1##*==}
  for f in "$CACHE"/wheels/*.whl; do
    [ -e "$f" ] || continue
    local base
    base=$(basename "$f" | tr 'A-Z.-' 'a-z__')
    case "$base" in "${stem}_$(echo "$ver" | tr '.-' '__')"_*) return 0 ;; esac
  done
  return 1
}
missing=()
for req in "${WHEELS[@]}"; do have_wheel "$req" || missing+=("$req"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "downloading ${#missing[@]} cp312 wheels: ${missing[*]}"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$CACHE/wheels" "${missing[@]}"
fi
rm -rf "$BUNDLE/wheels"
mkdir -p "$BUNDLE/wheels"
for req in "${WHEELS[@]}"; do
  stem=$(wheel_name "$req") ver=$(echo "${req##*==}" | tr '.-' '__')
  found=""
  for f in "$CACHE"/wheels/*.whl; do
    base=$(basename "$f" | tr 'A-Z.-' 'a-z__')
    case "$base" in "${stem}_${ver}"_*) found=$f ;; esac
  done
  [ -n "$found" ] || { echo "error: no wheel for $req in $CACHE/wheels" >&2; exit 1; }
  case "$(basename "$found")" in
    *-cp312-*|*-abi3-*|*-py3-*|*-py2.py3-*) ;;
    *) echo "error: $(basename "$found") is not usable on CPython 3.12" >&2; exit 1 ;;
  esac
  cp "$found" "$BUNDLE/wheels/"
done

# sglang: the Python files of the 0.5.23 wheel (cp311 or cp312: they differ only in the .so files we drop).
SGL_WHL=${SGLANG_WHEEL:-}
if [ -z "$SGL_WHL" ]; then
  SGL_WHL=$(ls .baseline/wheels/sglang-0.5.23-*.whl "$CACHE"/sglang-0.5.23-*.whl 2>/dev/null | head -1 || true)
fi
if [ -z "$SGL_WHL" ]; then
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 sglang==0.5.23 -d "$CACHE" \
  || "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_34_x86_64 sglang==0.5.23 -d "$CACHE"
  SGL_WHL=$(ls "$CACHE"/sglang-0.5.23-*.whl | head -1)
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
unzip -q "$SGL_WHL" -d "$TMP/sg"
rm -rf "$TMP/sg/sglang/multimodal_gen" "$TMP/sg/sglang/test" "$TMP/sg/sglang/benchmark"
find "$TMP/sg" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
# CUDA sources: keep only those of SGLang's tvm-ffi JIT kernels (sglang/kernels/jit/, ~0.7 MB compressed),
# so SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX=1 (upstream's radix decode top-k, built by nvcc at run time
# instead of Triton top-k kernels that recompile as sequences grow) can be tried without a new bundle.
find "$TMP/sg" \( -name '*.cu' -o -name '*.cuh' \) -not -path '*/sglang/kernels/jit/*' -delete
# The RECORD lists files we removed; pip is never run on this tree, so drop it rather than lie.
rm -f "$TMP"/sg/sglang-*.dist-info/RECORD
(cd "$TMP/sg" && find . -type f | LC_ALL=C sort | tar --owner=0 --group=0 --mtime='2026-01-01' -cf - -T - ) \
  | xz -6 -T2 >"$BUNDLE/sglang_stripped.tar.xz"

# Stand-ins for notebook/audio-only imports (our own code, a few lines each).
rm -rf "$BUNDLE/stubs"
mkdir -p "$BUNDLE/stubs/IPython"
cat >"$BUNDLE/stubs/IPython/__init__.py" <<'EOF'
"""m3serve e2e bundle stand-in: sglang/utils.py imports IPython.display for notebooks only."""
EOF
cat >"$BUNDLE/stubs/IPython/display.py" <<'EOF'
"""m3serve e2e bundle stand-in for IPython.display (notebook helpers are never used by the server)."""


class HTML(str):
    pass


def display(*args, **kwargs):
    return None
EOF
cat >"$BUNDLE/stubs/soundfile.py" <<'EOF'
"""m3serve e2e bundle stand-in for soundfile: only SGLang's audio endpoints use it, and fail loudly here."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("soundfile is not installed on this machine (m3serve e2e bundle stand-in)")


read = write = info = SoundFile = _unavailable
EOF

# m3serve's entry points (python/ travels as source; importlib.metadata finds them through this).
rm -rf "$BUNDLE/dist"
DI="$BUNDLE/dist/m3serve-0.1.0.dist-info"
mkdir -p "$DI"
printf 'Metadata-Version: 2.1\nName: m3serve\nVersion: 0.1.0\n' >"$DI/METADATA"
cat >"$DI/entry_points.txt" <<'EOF'
[console_scripts]
m3serve = m3serve.cli:main

[sglang.srt.platforms]
m3serve_portable = m3serve.platform:activate

[sglang.srt.plugins]
m3serve_m3 = m3serve.plugin:register
EOF

rm -rf "$BUNDLE/gateway"
if [ -f python/m3serve/_gateway.abi3.so ]; then
  mkdir -p "$BUNDLE/gateway"
  cp python/m3serve/_gateway.abi3.so "$BUNDLE/gateway/"
  # A debug build carries ~10 MiB of symbols; the call's 64 MiB limit counts every byte.
  if command -v strip >/dev/null; then strip --strip-unneeded "$BUNDLE/gateway/_gateway.abi3.so"; fi
fi

{
  echo "m3serve e2e GPU bundle, built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "sglang wheel: $(basename "$SGL_WHL")"
  echo "sglang_stripped.tar.xz sha256 $(sha256sum "$BUNDLE/sglang_stripped.tar.xz" | cut -d' ' -f1)"
  echo "wheels (${#WHEELS[@]}):"
  (cd "$BUNDLE/wheels" && ls -1)
  [ -d "$BUNDLE/gateway" ] && echo "gateway: _gateway.abi3.so sha256 $(sha256sum "$BUNDLE/gateway/_gateway.abi3.so" | cut -d' ' -f1)"
  echo "size: $(du -sh "$BUNDLE" | cut -f1)"
} >"$BUNDLE/MANIFEST.txt"
n=$(ls "$BUNDLE/wheels" | wc -l)
[ "$n" -eq ${#WHEELS[@]} ] || { echo "error: $n wheels in $BUNDLE/wheels, expected ${#WHEELS[@]}" >&2; exit 1; }
echo "prepared $BUNDLE ($(du -sh "$BUNDLE" | cut -f1)): $n wheels, stripped sglang, stubs, entry points$([ -d "$BUNDLE/gateway" ] && echo ', gateway')"
echo "device command: see benchmarks/agentic/gpu/README.md (carry $BUNDLE)"
