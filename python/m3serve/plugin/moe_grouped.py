"""M3's routed experts as two grouped Triton GEMMs with no host sync, so decode can run in CUDA graphs.

Why: on the portable platform SGLang sends MoE layers to its torch-native path, which copies the per-expert
token counts to the host and loops over experts in Python. A CUDA graph cannot capture that (the copy is a
host sync), so M3 had to run eagerly, and eager decode of the scaled benchmark model spent most of its
~42 ms step there (benchmarks/results/agentic_e2e_h100_full.md).

How: the (token, slot) pairs are sorted by expert on the device; every expert's pairs are cut into tiles of
BLOCK_M rows; a tile list (expert, first sorted pair, rows) of a size fixed by the token count is built with
torch ops only. Kernel 1 computes, per tile and BLOCK_N columns, gate and up over the tile's rows in one
pass over the expert's weights and applies SwiGLU-OAI over M3's [gate; up] halves layout; kernel 2 applies
the down projection and the routing weight. Each expert's weights are read once per tile, so decode reads
each routed expert once; experts nobody routed to cost nothing. Tiles past the real count exit at once
(the grid is sized for the worst case, as graph replay needs).

Precision: fp32 accumulation; the activation runs on fp32 sums (the torch loop rounds the GEMM output to
the activation dtype first), so results agree with it to bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Pairs (token x routed slot) per tile: 16 is the smallest tensor-core M; larger batches use 64.
SMALL_BLOCK_M = 16
LARGE_BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 64


class MoEKernelInputError(ValueError):
    """The grouped MoE kernels were called with tensors they do not handle."""


@triton.jit
def _tile(tile, pairs_ptr, tile_expert_ptr, tile_first_ptr, tile_rows_ptr, BLOCK_M: tl.constexpr):
    """(expert, pair ids, row mask) of one tile of the expert-sorted (token, slot) pairs."""
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    first = tl.load(tile_first_ptr + tile)
    row_ok = tl.arange(0, BLOCK_M) < tl.load(tile_rows_ptr + tile)
    pair = tl.load(pairs_ptr + first + tl.arange(0, BLOCK_M), mask=row_ok, other=0).to(tl.int64)
    return expert, pair, row_ok


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, h_ptr, pairs_ptr, tile_expert_ptr, tile_first_ptr, tile_rows_ptr, n_tiles_ptr,
    hidden, inter, stride_xt, stride_we, stride_wn, stride_hp,
    alpha, limit,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile >= tl.load(n_tiles_ptr):
        return
    expert, pair, row_ok = _tile(tile, pairs_ptr, tile_expert_ptr, tile_first_ptr, tile_rows_ptr, BLOCK_M)
    token = pair // TOPK
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < inter
    w_base = w13_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < hidden
        xs = tl.load(x_ptr + token[:, None] * stride_xt + offs_k[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (inter + offs_n)[None, :] * stride_wn + offs_k[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(xs, w_gate, acc_gate)
        acc_up = tl.dot(xs, w_up, acc_up)
    # SwiGLU-OAI (gpt-oss style) over halves: clamp, gate * sigmoid(alpha * gate) * (up + 1).
    gate = tl.minimum(acc_gate, limit)
    up = tl.minimum(tl.maximum(acc_up, -limit), limit)
    act = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
    tl.store(h_ptr + pair[:, None] * stride_hp + offs_n[None, :], act.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, y_ptr, weight_ptr, pairs_ptr, tile_expert_ptr, tile_first_ptr, tile_rows_ptr, n_tiles_ptr,
    hidden, inter, stride_hp, stride_we, stride_wn, stride_yp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile >= tl.load(n_tiles_ptr):
        return
    expert, pair, row_ok = _tile(tile, pairs_ptr, tile_expert_ptr, tile_first_ptr, tile_rows_ptr, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < hidden
    w_base = w2_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < inter
        hs = tl.load(h_ptr + pair[:, None] * stride_hp + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(hs, w, acc)
    weight = tl.load(weight_ptr + pair, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    tl.store(y_ptr + pair[:, None] * stride_yp + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def block_m_for(num_pairs: int) -> int:
    return SMALL_BLOCK_M if num_pairs <= 256 else LARGE_BLOCK_M


def expert_tiles(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Device-only tile list: (pairs sorted by expert, tile expert, tile first pair, tile rows, tile count).

    Its length is the worst case for this many pairs (ceil(pairs / block_m) + experts): a CUDA graph
    captured for a batch size replays any routing of that size."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    pairs = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0)
    max_tiles = -(-flat.numel() // block_m) + num_experts
    tile = torch.arange(max_tiles, device=flat.device)
    expert = torch.searchsorted(tile_end, tile, right=True).clamp(max=num_experts - 1)
    local = tile - (tile_end - tiles_per_expert)[expert]
    pair_start = torch.cumsum(counts, 0) - counts
    first = pair_start[expert] + local * block_m
    rows = (counts[expert] - local * block_m).clamp(min=0, max=block_m)
    return pairs, expert.to(torch.int32), first.to(torch.int32), rows.to(torch.int32), tile_end[-1:].to(torch.int32)


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    problems = []
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        problems.append(f"x must be [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(x.shape)}, "
                        f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    else:
        e, two_i, h = w13.shape
        if h != x.shape[1] or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
            problems.append(f"shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
        if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
            problems.append("x, w13 and w2 must be contiguous in their last axis")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        problems.append(f"topk ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)} must be [T, k] "
                        f"with T = {x.shape[0]}")
    if len({x.device, w13.device, w2.device, topk_ids.device}) != 1:
        problems.append("all tensors must be on one device")
    if problems:
        raise MoEKernelInputError("grouped MoE: " + "; ".join(problems))


def grouped_moe_swiglu_oai(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    alpha: float, limit: float,
) -> torch.Tensor:
    """sum_k w[t, k] * down_e(swiglu_oai(gate_up_e(x[t]))) with e = topk_ids[t, k]; [T, H] in x's dtype."""
    _check(x, w13, w2, topk_weights, topk_ids)
    t, k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    if t == 0:
        return x.new_zeros(0, hidden)
    block_m = block_m_for(t * k)
    pairs, tile_expert, tile_first, tile_rows, n_tiles = expert_tiles(topk_ids, num_experts, block_m)
    max_tiles = tile_expert.shape[0]
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(max_tiles, triton.cdiv(inter, BLOCK_N))](
        x, w13, h, pairs, tile_expert, tile_first, tile_rows, n_tiles,
        hidden, inter, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        float(alpha), float(limit),
        TOPK=k, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    y = torch.empty(t * k, hidden, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _down_kernel[(max_tiles, triton.cdiv(hidden, BLOCK_N))](
        h, w2, y, weights, pairs, tile_expert, tile_first, tile_rows, n_tiles,
        hidden, inter, h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return y.view(t, k, hidden).sum(dim=1).to(x.dtype)
