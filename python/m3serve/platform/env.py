"""Environment the portable platform needs, shared by `activate()` and the worker launcher.

Why each flag:
  * SGLANG_OPT_USE_BF16_ROUTER_GEMM=0: M3's router otherwise calls torch.mm(out_dtype=fp32), which
    exists only for CUDA tensors; 0 routes it through the plain fp32 linear gate.
  * SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX=0: the radix top-k is a CUDA JIT kernel built against
    SGLang's kernel headers; our plugin does selection through msa_kernels anyway.
  * TORCHDYNAMO_DISABLE=1 (CPU only): a few SGLang activations are @torch.compile'd; on CPU Inductor
    would need a C++ toolchain and minutes of compile on a 2-core box for no gain.
"""

from __future__ import annotations

import os

PLATFORM_NAME = "m3serve_portable"
DEVICES = ("cpu", "cuda")

ENV_DEFAULTS: dict[str, str] = {
    "SGLANG_OPT_USE_BF16_ROUTER_GEMM": "0",
    "SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX": "0",
}
CPU_ENV_DEFAULTS: dict[str, str] = {"TORCHDYNAMO_DISABLE": "1"}


def selected_device() -> str:
    """M3SERVE_DEVICE when set, else cuda if a GPU is visible, else cpu."""
    device = os.environ.get("M3SERVE_DEVICE", "").strip().lower()
    if device:
        if device not in DEVICES:
            raise ValueError(f"M3SERVE_DEVICE is {device!r}, expected one of {DEVICES}")
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def env_defaults(device: str) -> dict[str, str]:
    """The variables (and values) the platform sets unless the user already did."""
    out = dict(ENV_DEFAULTS)
    if device == "cpu":
        out.update(CPU_ENV_DEFAULTS)
    return out


def apply_env_defaults(device: str, environ: dict | None = None) -> None:
    env = os.environ if environ is None else environ
    for key, value in env_defaults(device).items():
        env.setdefault(key, value)
