"""Host-to-device copies that do not synchronize the stream.

A plain `tensor.to("cuda")` from pageable host memory (what `torch.tensor(list, device=...)` does too) is a
copy followed by a stream synchronize: the host waits until the GPU has run everything queued before it. In
the middle of a served forward that drains the GPU's queue, and the GPU then idles while the host launches
the next layer's kernels one by one. Measured on an H200 (benchmarks/results/served_step_split_r13_notes.md):
per extend step of 8 x 2,048 tokens on a 60k prefix, the plan's syncs and copies left the GPU idle for
tens of milliseconds. A pinned staging copy and an asynchronous copy keep the host ahead: torch's pinned
allocator keeps the staging buffer alive until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (a host tensor) on `device`, copied without a stream synchronize where the device is a GPU."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
