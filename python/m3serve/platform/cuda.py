"""CUDA flavour: tensors on the GPU, Triton and PyTorch where SGLang would call sgl_kernel.

For GPU machines without SGLang's CUDA kernel package. SGLang decides "CUDA or not" at import time in
~100 modules (`_is_cuda = is_cuda()` followed by `from sgl_kernel import ...`), before plugins load, so
the worker also puts `cuda_site/` on PYTHONPATH: its sitecustomize makes `is_cuda()` False in every
SGLang process. What remains runs through the generic torch/Triton paths on `cuda` tensors.
"""

from __future__ import annotations

import torch
from sglang.srt.platforms.cuda import CudaDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform


class PortableCudaPlatform(CudaDeviceMixin, SRTPlatform):
    _enum = PlatformEnum.OOT
    device_name = "cuda"
    device_type = "cuda"
    capabilities = PlatformCapabilities(supports_triton=True, graph_capture=True)

    def get_default_attention_backend(self) -> str:
        return "triton"

    def get_graph_runner_cls(self):
        # OOT platforms must name their decode graph runner; the in-tree CUDA one works on these tensors.
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

        return DecodeCudaGraphRunner

    def get_group_coordinator_device(self, local_rank: int) -> torch.device:
        return torch.device("cuda", local_rank)

    def get_torch_distributed_backend_str(self) -> str:
        return "nccl"

    # SGLang's /start_profile asks the platform for its profiler activity; the mixin's default raises, which
    # took the whole worker down with it.
    def get_torch_profiler_activity_str(self) -> str:
        return "CUDA"

    def get_torch_profiler_activity(self) -> torch.profiler.ProfilerActivity:
        return torch.profiler.ProfilerActivity.CUDA

    # SGLang's norms and rotary embeddings dispatch, on an out-of-tree platform, to forwards registered
    # for this key (m3serve.platform.cuda_ops.sglang_forwards: one Triton launch each), else native torch.
    # SGLang first asks for the key when an op first runs, after its layers are imported: the forwards are
    # registered then, by the platform, so every plugin set running on it (the benchmark's upstream arm
    # excludes m3serve's M3 plugin) gets the same ops.
    def get_dispatch_key_name(self) -> str:
        from .cuda_ops import sglang_forwards

        sglang_forwards.register_once()
        return sglang_forwards.DISPATCH_KEY
