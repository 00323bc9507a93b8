"""CPU flavour: SGLang's generic PyTorch paths on the host, no sgl_kernel, no CPU engine.

Being an out-of-tree (OOT) platform is what matters: SGLang sends OOT platforms down its torch-native
paths (rotary embedding, fused ops' forward_native, the native MoE), while its in-tree CPU engine
(SGLANG_USE_CPU_ENGINE) would need sgl_kernel's CPU ops, which are not on PyPI.
"""

from __future__ import annotations

import torch
from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform


class PortableCpuPlatform(CpuDeviceMixin, SRTPlatform):
    """Host memory and device ops from SGLang's CPU mixin; identity OOT so core picks torch-native paths."""

    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    # No Triton launches, no graph capture on the host.
    capabilities = PlatformCapabilities()

    def get_default_attention_backend(self) -> str:
        # Dense layers stay on SGLang's own torch backend; M3's sparse layers are routed by our plugin.
        return "torch_native"

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    def get_torch_distributed_backend_str(self) -> str:
        return "gloo"

    # SGLang's /start_profile asks the platform for its profiler activity; the mixin's default raises, which
    # took the whole worker down with it.
    def get_torch_profiler_activity_str(self) -> str:
        return "CPU"

    def get_torch_profiler_activity(self) -> torch.profiler.ProfilerActivity:
        return torch.profiler.ProfilerActivity.CPU
