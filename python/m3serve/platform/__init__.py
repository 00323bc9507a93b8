"""The portable SGLang platform: SGLang on plain PyTorch (CPU) or PyTorch + Triton (CUDA without sgl_kernel).

Registered as the `sglang.srt.platforms` entry point `m3serve_portable`. SGLang calls `activate()`; it
returns a platform class path only when SGLANG_PLATFORM selects this platform, so installing m3serve on
a GPU host changes nothing there. The flavour is chosen by M3SERVE_DEVICE (cpu | cuda), defaulting to
cuda when a GPU is visible.
"""

from __future__ import annotations

import os

from .env import PLATFORM_NAME, apply_env_defaults, selected_device

__all__ = ["PLATFORM_NAME", "activate", "apply_env_defaults", "selected_device"]

_CLASSES = {
    "cpu": "m3serve.platform.cpu.PortableCpuPlatform",
    "cuda": "m3serve.platform.cuda.PortableCudaPlatform",
}


def activate() -> str | None:
    """SGLang's platform hook: our class path when selected, else None (inert)."""
    if os.environ.get("SGLANG_PLATFORM") != PLATFORM_NAME:
        return None
    device = selected_device()
    # setdefault: the env is inherited by SGLang's scheduler/detokenizer processes spawned later.
    apply_env_defaults(device)
    return _CLASSES[device]
