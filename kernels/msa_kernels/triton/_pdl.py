"""Programmatic dependent launch (PDL) for the chain of small decode kernels.

A decode layer is a chain of dependent launches (plan update, index scoring, top-k merge, attention), each a
few microseconds of work. Without PDL a kernel's launch only begins when the previous one has fully drained,
so every link pays the launch latency again (~2.5 us per kernel measured in CUDA-graph replay on an H200).
With PDL (Hopper and later) the next kernel is launched while the previous one still runs; its programs wait
in `griddepcontrol.wait` until the previous grid has completed and its memory is visible.

Contract of every kernel launched with `launch_pdl=True` here: it calls `pdl_prologue` (wait, then allow the
next kernel to launch) before it touches global memory at all, so it observes everything the previous
kernel wrote and cannot overwrite what that kernel still reads. Memory order is therefore exactly that of
plain launches; only the launch latency overlaps. A kernel that follows a launch without PDL is unaffected.

Only small launches use it (`small=True`: decode batches of at most PDL_MAX_BATCH requests). Measured on an
H200 (graph replay, benchmarks/kernels/profile_decode.py): a decode layer at batch 1 went 27.5 -> 24.8 us
(60k) and 23.1 -> 20.8 us (8k), but batch 32 at 60k went 166 -> 173 us and batch 8 on a shared prefix
56 -> 57 us: the next kernel's programs, launched early, sit on the SMs beside a bandwidth-bound kernel.

MSA_PDL=0 turns it off, MSA_PDL=all on for every size (A/B benchmarks). It is off on the CPU (the Triton
interpreter cannot run the PTX) and before Hopper.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

PDL_MAX_BATCH = 4


def pdl_enabled(device: torch.device, small: bool = True) -> bool:
    """Launch with PDL: CUDA, compute capability 9.0 or later, a small launch (or MSA_PDL=all), not MSA_PDL=0."""
    mode = os.environ.get("MSA_PDL", "1")
    if device.type != "cuda" or mode == "0" or not (small or mode == "all"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_launch_options(device: torch.device, small: bool = True) -> dict:
    """Extra launch keywords and the PDL constexpr for a kernel that calls `pdl_prologue(PDL)` first."""
    return {"launch_pdl": True, "PDL": True} if pdl_enabled(device, small) else {"PDL": False}


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
