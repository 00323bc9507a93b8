"""Correct SwiGLU-OAI for M3 in SGLang's torch-native MoE (the path every out-of-tree platform takes).

Upstream bug (sglang 0.5.23, layers/moe/fused_moe_native.py): `moe_forward_native` applies the GPT-OSS
SwiGLU with *interleaved* gate/up columns (x[..., ::2], x[..., 1::2]) whenever `gemm1_alpha` is set,
ignoring `MoeRunnerConfig.gate_up_interleaved`. M3 loads w13 as [gate; up] halves
(gate_up_interleaved=False; only the CUDA path re-interleaves), so the activation mixes gate and up
channels: no error, just logprobs off by up to ~2 against transformers.

For configs with gemm1_alpha set and halves layout we compute the experts ourselves with the halves-layout
activation: on CUDA with the grouped Triton kernels of moe_grouped.py (no host sync, so decode can run in
CUDA graphs) for decode-sized batches and whenever a graph is being captured; for longer eager batches
(prefill, extend) with two torch._grouped_mm calls (no host sync either); otherwise (CPU, expert biases) with
an expert loop of dense GEMMs. Everything else goes to SGLang's original function.
M3SERVE_MOE=loop|grouped|grouped_mm|auto (default auto) forces one path, for benchmarks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import marker

TARGET = "sglang.srt.layers.moe.fused_moe_native.moe_forward_native"


def swiglu_oai_halves(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """SwiGLU-OAI over [gate | up] halves: clamp, gate * sigmoid(alpha * gate) * (up + 1)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def needs_halves_fix(cfg) -> bool:
    return (
        getattr(cfg, "gemm1_alpha", None) is not None
        and getattr(cfg, "activation", "silu") == "silu"
        and not getattr(cfg, "gate_up_interleaved", True)
    )


def moe_halves_forward(layer: torch.nn.Module, x: torch.Tensor, topk_output, cfg) -> torch.Tensor:
    """Routed experts for tokens x [T, H]: sum_k w_k * down_e(act(gate_up_e(x))) with e = topk_ids[:, k]."""
    if cfg.apply_router_weight_on_input:
        raise NotImplementedError("m3serve MoE: apply_router_weight_on_input is not used by M3")
    if cfg.gemm1_clamp_limit is None:
        raise NotImplementedError("m3serve MoE: SwiGLU-OAI needs gemm1_clamp_limit (swiglu_limit)")
    topk_weights, topk_ids, _ = topk_output
    w13_bias = getattr(layer, "w13_weight_bias", None)
    w2_bias = getattr(layer, "w2_weight_bias", None)
    t, k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1).long()
    order = flat_ids.argsort()
    token_of = order // k  # token of each (token, slot) pair, grouped by expert
    # One read-back of the per-expert counts (the loop slices by them): torch.bincount on a GPU reads the ids'
    # maximum back first, a second stream sync.
    counts = _expert_counts(flat_ids, layer.num_experts).tolist()
    out_pairs = x.new_empty(t * k, x.shape[-1])
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start : start + n]
        h = F.linear(x[rows], layer.w13_weight[expert])
        if w13_bias is not None:
            h = (h.float() + w13_bias[expert]).to(x.dtype)
        h = swiglu_oai_halves(h, cfg.gemm1_alpha, cfg.gemm1_clamp_limit)
        y = F.linear(h, layer.w2_weight[expert])
        if w2_bias is not None:
            y = (y.float() + w2_bias[expert]).to(x.dtype)
        out_pairs[order[start : start + n]] = y
        start += n
    return _combine(out_pairs, topk_weights, x.dtype)


def _expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(token, slot) pairs per expert, on the ids' device (no read-back)."""
    return torch.zeros(num_experts, dtype=torch.int32, device=flat_ids.device).scatter_add_(
        0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))


def _combine(out_pairs: torch.Tensor, topk_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T*k, H] expert outputs in (token, slot) order -> [T, H]: their sum weighted by the router."""
    t, k = topk_weights.shape
    weighted = out_pairs.view(t, k, -1).to(topk_weights.dtype) * topk_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(dtype)


def moe_grouped_mm_forward(layer: torch.nn.Module, x: torch.Tensor, topk_output, cfg) -> torch.Tensor:
    """The expert loop's math as two `torch._grouped_mm` calls over the (token, slot) pairs sorted by expert.

    Why: the loop reads the per-expert counts back to the host (a stream sync per MoE layer) and launches about
    a dozen kernels per expert. In a served extend step the host then fell behind the GPU: on an H200, 8 x 2,048
    new tokens on m3-slice left the GPU idle ~60 ms of a 263 ms step (benchmarks/results/
    served_step_split_h200_r13_after_syncs.md). Here the group offsets stay on the device and the layer is a
    handful of launches. Same operands and rounding points as the loop (bf16 GEMM outputs, activation in x's
    dtype); the GEMMs' summation order may differ."""
    topk_weights, topk_ids, _ = topk_output
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()
    order = flat_ids.argsort(stable=True)  # pairs grouped by expert
    offsets = torch.cumsum(_expert_counts(flat_ids, layer.num_experts), 0, dtype=torch.int32)
    h = torch._grouped_mm(x[order // k], layer.w13_weight.transpose(1, 2), offs=offsets)
    h = swiglu_oai_halves(h, cfg.gemm1_alpha, cfg.gemm1_clamp_limit)
    y = torch._grouped_mm(h, layer.w2_weight.transpose(1, 2), offs=offsets)
    out_pairs = torch.empty_like(y)
    out_pairs[order] = y
    return _combine(out_pairs, topk_weights, x.dtype)


# Above this many tokens an eager batch (prefill, extend) leaves the grouped Triton kernels (tuned for decode's
# weight reads) for two grouped GEMMs (torch._grouped_mm), or the loop of cuBLAS GEMMs where those are missing.
GROUPED_MAX_TOKENS = 256
MOE_PATH_ENV = "M3SERVE_MOE"
GROUPED_MM_ENV = "M3SERVE_MOE_GROUPED_MM"


def _hopper_or_newer(x: torch.Tensor) -> bool:
    """torch._grouped_mm was measured and tested on Hopper (H200, round 13); older GPUs keep the loop."""
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def _grouped_paths_fit(layer, x: torch.Tensor, cfg) -> bool:
    """What both grouped paths compute: on CUDA, no expert biases, router weights applied after the experts."""
    return (x.is_cuda and getattr(layer, "w13_weight_bias", None) is None
            and getattr(layer, "w2_weight_bias", None) is None and not cfg.apply_router_weight_on_input)


def use_grouped_mm(layer, x: torch.Tensor, cfg) -> bool:
    """Whether an eager call that the grouped Triton kernels do not take goes to torch._grouped_mm."""
    mode = os.environ.get(MOE_PATH_ENV, "auto")
    if mode == "auto" and os.environ.get(GROUPED_MM_ENV, "1") == "0":  # A/B: extends back on the loop
        return False
    return (mode in ("auto", "grouped_mm") and _grouped_paths_fit(layer, x, cfg) and hasattr(torch, "_grouped_mm")
            and _hopper_or_newer(x) and cfg.gemm1_clamp_limit is not None)


def use_grouped(layer, x: torch.Tensor, cfg) -> bool:
    """Whether this call goes to the grouped Triton kernels (see the module docstring)."""
    if not _grouped_paths_fit(layer, x, cfg):
        return False
    mode = os.environ.get(MOE_PATH_ENV, "auto")
    if mode not in ("auto", "loop", "grouped", "grouped_mm"):
        raise ValueError(f"{MOE_PATH_ENV} must be auto, loop, grouped or grouped_mm, got {mode!r}")
    if torch.cuda.is_current_stream_capturing():
        if mode == "loop":
            raise RuntimeError(f"{MOE_PATH_ENV}=loop cannot run inside a CUDA graph: pass --disable-cuda-graph")
        return True
    return mode == "grouped" or (mode == "auto" and x.shape[0] <= GROUPED_MAX_TOKENS)


def moe_grouped_forward(layer: torch.nn.Module, x: torch.Tensor, topk_output, cfg) -> torch.Tensor:
    from .moe_grouped import grouped_moe_swiglu_oai

    if cfg.gemm1_clamp_limit is None:
        raise NotImplementedError("m3serve MoE: SwiGLU-OAI needs gemm1_clamp_limit (swiglu_limit)")
    topk_weights, topk_ids, _ = topk_output
    return grouped_moe_swiglu_oai(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                                  cfg.gemm1_alpha, cfg.gemm1_clamp_limit)


# A profiler range around every MoE call, so a trace attributes the experts' kernels (the loop path's cuBLAS
# GEMMs look like every other GEMM by name): benchmarks/agentic/gpu/trace_split.py reads it.
PROFILE_RANGE = "m3serve.moe"


def fix_moe_layout(original, layer, x, topk_output, moe_runner_config, *args, **kwargs):
    if not torch.autograd._profiler_enabled():  # the serving path: no range, no cost
        return _fix_moe_layout(original, layer, x, topk_output, moe_runner_config, *args, **kwargs)
    with torch.profiler.record_function(PROFILE_RANGE):
        return _fix_moe_layout(original, layer, x, topk_output, moe_runner_config, *args, **kwargs)


def _fix_moe_layout(original, layer, x, topk_output, moe_runner_config, *args, **kwargs):
    if args or kwargs or not needs_halves_fix(moe_runner_config):
        return original(layer, x, topk_output, moe_runner_config, *args, **kwargs)
    if use_grouped(layer, x, moe_runner_config):
        marker.record("moe_grouped", "M3 MoE: grouped Triton kernels (SwiGLU-OAI over halves, graph-safe)")
        return moe_grouped_forward(layer, x, topk_output, moe_runner_config)
    if use_grouped_mm(layer, x, moe_runner_config):
        marker.record("moe_grouped_mm", "M3 MoE: two grouped GEMMs (torch._grouped_mm, no host sync)")
        return moe_grouped_mm_forward(layer, x, topk_output, moe_runner_config)
    marker.record("moe_halves_fix", "M3 MoE: SwiGLU-OAI applied over [gate; up] halves (upstream layout fix)")
    return moe_halves_forward(layer, x, topk_output, moe_runner_config)
