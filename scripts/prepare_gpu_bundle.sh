#!/usr/bin/env bash
# Prepare the upstream baseline for benchmarks/kernels/bench_msa.py, into the git-ignored .baseline/:
#
#   .baseline/wheels/         sglang==0.5.23 and apache-tvm-ffi==0.1.11 wheels, as pip downloads them
#   .baseline/sglang_min/     ONLY upstream's MSA kernel files, unzipped unchanged from the wheel:
#                               sglang/kernels/ops/attention/minimax_sparse/**      (Triton MSA kernels)
#                               sglang/kernels/ops/attention/minimax_decode_topk.py (radix top-k wrapper)
#                               sglang/kernels/jit/csrc/minimax/minimax_decode_topk.cuh + include/sgl_kernel/
#                             plus OUR OWN stand-ins (written below, a few lines each) for the sglang
#                             utility modules those files import: sglang.srt.environ, .runtime_context,
#                             .utils and sglang.kernels.jit.utils (a plain nvcc + tvm-ffi loader).
#   .baseline/site/tvm_ffi/   apache-tvm-ffi for CPython 3.12 (the device's Python), unzipped from its wheel
#
# Upstream code is never committed: .baseline/ is in .gitignore. The device has no internet, so the
# benchmark call carries .baseline/sglang_min and .baseline/site (a few MiB) with `carry`.
# Usage: bash scripts/prepare_gpu_bundle.sh   (idempotent; needs pip and unzip, no GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=.baseline
PY=${PYTHON:-python3}
mkdir -p "$BASE/wheels"

if ! ls "$BASE"/wheels/sglang-0.5.23-*.whl >/dev/null 2>&1; then
  # 0.5.23 ships CPython 3.11 wheels only; we unzip pure-Python/header files from it, so the tag is moot.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_34_x86_64 sglang==0.5.23 -d "$BASE/wheels"
fi
if ! ls "$BASE"/wheels/apache_tvm_ffi-0.1.11-*.whl >/dev/null 2>&1; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    apache-tvm-ffi==0.1.11 -d "$BASE/wheels"
fi
SGL_WHL=$(ls "$BASE"/wheels/sglang-0.5.23-*.whl | head -1)
TVM_WHL=$(ls "$BASE"/wheels/apache_tvm_ffi-0.1.11-*.whl | head -1)

rm -rf "$BASE/sglang_min" "$BASE/site"
mkdir -p "$BASE/sglang_min" "$BASE/site"
unzip -q -o "$SGL_WHL" -d "$BASE/sglang_min" \
  'sglang/kernels/ops/attention/minimax_sparse/*' \
  'sglang/kernels/ops/attention/minimax_decode_topk.py' \
  'sglang/kernels/jit/csrc/minimax/minimax_decode_topk.cuh' \
  'sglang/kernels/jit/include/sgl_kernel/*'
find "$BASE/sglang_min" -name __pycache__ -prune -exec rm -rf {} +
unzip -q -o "$TVM_WHL" 'tvm_ffi/*' -d "$BASE/site"

S="$BASE/sglang_min/sglang"
for pkg in "" kernels kernels/ops kernels/ops/attention kernels/jit srt; do
  mkdir -p "$S/$pkg"
  [ -f "$S/$pkg/__init__.py" ] || echo '"""m3serve bench stand-in package (not upstream code)."""' >"$S/$pkg/__init__.py"
done
mkdir -p "$S/srt/utils" "$S/kernels/jit/utils"

cat >"$S/srt/environ.py" <<'EOF'
"""m3serve stand-in for sglang.srt.environ: only the flag the MSA decode indexer reads."""
import os


class _Flag:
    def __init__(self, name, default):
        self.name, self.default = name, default

    def get(self):
        raw = os.environ.get(self.name)
        return self.default if raw is None else raw.strip().lower() in ("1", "true", "yes", "on")


class _Envs:
    SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX = _Flag("SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX", True)
    SGLANG_JIT_LOG_RESOURCE_USAGE = _Flag("SGLANG_JIT_LOG_RESOURCE_USAGE", False)


envs = _Envs()
EOF

cat >"$S/srt/runtime_context.py" <<'EOF'
"""m3serve stand-in for sglang.srt.runtime_context: the platform's SM90 test."""
import functools

import torch


class _Platform:
    @property
    def is_sm90(self):
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@functools.cache
def get_platform():
    return _Platform()
EOF

cat >"$S/srt/utils/__init__.py" <<'EOF'
"""m3serve stand-in for sglang.srt.utils: the two platform tests the MSA kernels import."""


def is_gfx95_supported():
    return False


def is_xpu():
    return False
EOF

cat >"$S/kernels/jit/utils/__init__.py" <<'EOF'
"""m3serve stand-in for sglang.kernels.jit.utils: build a header-only CUDA kernel with nvcc for sm_90a and
load it through tvm-ffi (what upstream's JIT loader does, minus its cache and toolchain plumbing)."""
import functools
import hashlib
import os
import pathlib
import subprocess

import torch

_JIT = pathlib.Path(__file__).resolve().parents[1]
_INCLUDE = _JIT / "include"
_CSRC = _JIT / "csrc"
_BUILD = pathlib.Path(os.environ.get("M3_BASELINE_JIT_DIR", "/tmp/m3_baseline_jit"))
_DTYPES = {torch.int32: "int32_t", torch.int64: "int64_t", torch.float32: "fp32_t",
           torch.float16: "fp16_t", torch.bfloat16: "bf16_t"}
_FFI_INCLUDES = ["tvm/ffi/container/tensor.h", "tvm/ffi/dtype.h", "tvm/ffi/error.h",
                 "tvm/ffi/extra/c_env_api.h", "tvm/ffi/function.h"]


def cache_once(fn):
    return functools.cache(fn)


def is_arch_support_pdl():
    return torch.cuda.get_device_capability()[0] >= 9


class _Args(list):
    def __str__(self):
        return ", ".join(self)


def make_cpp_args(*args):
    def conv(a):
        if isinstance(a, bool):
            return "true" if a else "false"
        if isinstance(a, torch.dtype):
            return _DTYPES[a]
        return str(a)

    return _Args(conv(a) for a in args)


class _TorchStreamModule:
    """Calls each exported function with tvm-ffi's current stream set to torch's (CUDA-graph safe)."""

    def __init__(self, mod):
        self._mod = mod

    def __getattr__(self, name):
        import tvm_ffi

        fn = getattr(self._mod, name)

        def call(*args):
            with tvm_ffi.use_torch_stream():
                return fn(*args)

        return call


def load_jit(*args, cuda_files=(), cuda_wrappers=(), extra_cuda_cflags=None, extra_include_paths=None, **_):
    import tvm_ffi
    from tvm_ffi.libinfo import find_dlpack_include_path, find_include_path, find_libtvm_ffi

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}{'a' if major == 9 else ''}"
    lines = [f"#include <{h}>" for h in _FFI_INCLUDES]
    lines += [f'#include "{_CSRC / f}"' for f in cuda_files]
    lines += ["namespace sglang {"]
    lines += [f"TVM_FFI_DLL_EXPORT_TYPED_FUNC({e}, ({k}));" for e, k in cuda_wrappers]
    lines += ["}"]
    src = "\n".join(lines) + "\n"
    key = hashlib.sha1((src + arch + " ".join(map(str, args))).encode()).hexdigest()[:16]
    out = _BUILD / f"{args[0]}_{key}"
    so = out / "module.so"
    if not so.exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "wrapper.cu").write_text(src)
        lib = pathlib.Path(find_libtvm_ffi())
        incs = [str(_INCLUDE), find_include_path(), find_dlpack_include_path()] + list(extra_include_paths or [])
        cmd = ["nvcc", f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-DSGL_CUDA_ARCH={major * 100 + minor * 10}",
               "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-shared",
               *[f"-I{i}" for i in incs], *(extra_cuda_cflags or []), str(out / "wrapper.cu"), "-o", str(so),
               f"-L{lib.parent}", f"-l{lib.stem.removeprefix('lib')}", f"-Xlinker=-rpath={lib.parent}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed for {args[0]}:\n{done.stderr[-4000:]}")
    return _TorchStreamModule(tvm_ffi.load_module(str(so)))
EOF

echo "prepared $BASE/sglang_min ($(du -sh "$BASE/sglang_min" | cut -f1)) and $BASE/site ($(du -sh "$BASE/site" | cut -f1))"
echo "device command: see benchmarks/kernels/README.md (carry .baseline/sglang_min and .baseline/site)"
