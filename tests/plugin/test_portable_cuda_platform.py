"""The portable CUDA platform answers the questions SGLang asks it outside model code (checked on the CPU: the
answers need no GPU). A platform method left to SGLang's default raises NotImplementedError, and where SGLang
asks at run time (e.g. /start_profile) that took the whole worker down."""

from __future__ import annotations

import torch

from m3serve.platform.cpu import PortableCpuPlatform
from m3serve.platform.cuda import PortableCudaPlatform


def test_profiler_activity_is_answered() -> None:
    cuda = PortableCudaPlatform()
    assert cuda.get_torch_profiler_activity_str() == "CUDA"
    assert cuda.get_torch_profiler_activity() == torch.profiler.ProfilerActivity.CUDA
    cpu = PortableCpuPlatform()
    assert cpu.get_torch_profiler_activity_str() == "CPU"
    assert cpu.get_torch_profiler_activity() == torch.profiler.ProfilerActivity.CPU


def test_basic_answers() -> None:
    cuda = PortableCudaPlatform()
    assert cuda.get_torch_distributed_backend_str() == "nccl"
    assert cuda.get_default_attention_backend() == "triton"
    assert cuda.get_group_coordinator_device(1) == torch.device("cuda", 1)
