"""The references over SGLang's paged pool: gather each request's tokens, then the contiguous oracles.

Also `store`, the write of new tokens' K, V and index-K into their slots (with fp8 quantization).
"""

from __future__ import annotations

import torch

from ..layout import MSAInputError, accumulation_dtype, check_cache, slots_for_positions
from ..plan import MSAPlan
from .attention import sparse_attention
from .scoring import index_block_scores, select_blocks


def dequantize(cache: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Cache values in the accumulation dtype (float32, float64 for float64 caches); fp8 holds value / scale."""
    out = cache.to(accumulation_dtype(cache.dtype))
    return out if scale is None else out * scale


def gather_sequence(cache: torch.Tensor, page_row: torch.Tensor, length: int, scale: float | None = None):
    """Tokens 0..length-1 of one request from a slot-major cache, as float32 [length, heads, dim]."""
    slots = slots_for_positions(page_row.to(cache.device), torch.arange(length, device=cache.device))
    return dequantize(cache[slots], scale)


def store(
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index_k: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index_k_cache: torch.Tensor | None,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> None:
    """Write new tokens into their slots. k, v: [T, Hkv, D]; index_k: [T, D] or [T, 1, D]; slots: [T].
    fp8 caches store value / scale (index-K in fp8 uses no scale: it is RMS-normed to O(1))."""
    if slots.dim() != 1 or slots.shape[0] != k.shape[0]:
        raise MSAInputError(f"slots must be [T={k.shape[0]}], got {tuple(slots.shape)}")
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= k_cache.shape[0]):
        raise MSAInputError(f"slot ids must lie in [0, {k_cache.shape[0]}), got [{int(slots.min())}, "
                            f"{int(slots.max())}]")
    s = slots.long()
    k_cache[s] = (k.float() / k_scale if k_scale else k).to(k_cache.dtype)
    v_cache[s] = (v.float() / v_scale if v_scale else v).to(v_cache.dtype)
    if index_k is not None and index_k_cache is not None:
        ik = index_k.reshape(index_k.shape[0], 1, -1)
        index_k_cache[s] = ik.to(index_k_cache.dtype)


def index_topk(plan: MSAPlan, q_idx: torch.Tensor, index_k_cache: torch.Tensor) -> torch.Tensor:
    """Selections for every new token of the batch: int32 [T, H_idx, 16], ascending, -1 padded."""
    check_cache("index_k_cache", index_k_cache, heads=1)
    if q_idx.shape[0] != plan.num_tokens:
        raise MSAInputError(f"q_idx has {q_idx.shape[0]} tokens, the plan {plan.num_tokens}")
    out = torch.empty(q_idx.shape[0], q_idx.shape[1], plan.topk, dtype=torch.int32, device=q_idx.device)
    for b, (lo, hi) in enumerate(plan.token_ranges()):
        if hi == lo:
            continue
        length = plan.seq_lens_list[b]
        keys = gather_sequence(index_k_cache, plan.page_table[b], length, None)
        pos = plan.q_pos[lo:hi].to(q_idx.device)
        scores = index_block_scores(q_idx[lo:hi], keys, pos)
        out[lo:hi] = select_blocks(scores, pos, plan.topk)
    return out


def sparse_attention_paged(
    plan: MSAPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    selected: torch.Tensor,
    scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention of every new token over its request's paged K/V: [T, Hq, D] in q's dtype."""
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache, heads=k_cache.shape[1], dim=k_cache.shape[2])
    if q.shape[0] != plan.num_tokens:
        raise MSAInputError(f"q has {q.shape[0]} tokens, the plan {plan.num_tokens}")
    out = torch.empty_like(q)
    for b, (lo, hi) in enumerate(plan.token_ranges()):
        if hi == lo:
            continue
        length = plan.seq_lens_list[b]
        k = gather_sequence(k_cache, plan.page_table[b], length, k_scale)
        v = gather_sequence(v_cache, plan.page_table[b], length, v_scale)
        pos = plan.q_pos[lo:hi].to(q.device)
        out[lo:hi] = sparse_attention(q[lo:hi], k, v, selected[lo:hi], pos, scale)
    return out
