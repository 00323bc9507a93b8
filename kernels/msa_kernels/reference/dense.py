"""References for dense decode over SGLang's token-slot lists (M3's full-attention layers 0-2).

A request's keys are the slots `kv_indices[kv_indptr[r]:kv_indptr[r + 1]]` of a cache [slots, kv_heads, dim]
(the layout SGLang's Triton attention backend hands its decode kernel). `chunk_leaders` is the sharing map the
Triton kernel computes on the device: which request reads each chunk of keys on behalf of the others.
"""

from __future__ import annotations

import torch

from ..layout import MSAInputError, accumulation_dtype


def dense_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal decode attention: q [B, Hq, D] (one new token per request, already stored in the cache) against all
    of the request's tokens; GQA groups of Hq / Hkv query heads per KV head. Returns [B, Hq, D] in q's dtype;
    a request with no tokens gets zeros."""
    batch, hq, dim = q.shape
    hkv = k_cache.shape[1]
    if hq % hkv:
        raise MSAInputError(f"{hq} query heads do not split into {hkv} KV groups")
    if kv_indptr.numel() < batch + 1:
        raise MSAInputError(f"kv_indptr has {kv_indptr.numel()} entries for {batch} requests (needs batch + 1)")
    acc = accumulation_dtype(q.dtype)
    scale = dim ** -0.5 if scale is None else scale
    bounds = kv_indptr.tolist()
    out = torch.zeros(batch, hq, dim, dtype=acc, device=q.device)
    for r in range(batch):
        slots = kv_indices[bounds[r]:bounds[r + 1]].long()
        if slots.numel() == 0:
            continue
        k = k_cache[slots].to(acc).repeat_interleave(hq // hkv, dim=1)  # [L, Hq, D]
        v = v_cache[slots].to(acc).repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[r].to(acc), k) * scale
        out[r] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
    return out.to(q.dtype)


def chunk_leaders(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, chunk: int, num_chunks: int) -> torch.Tensor:
    """int32 [num_chunks, B]: for chunk c (keys c*chunk .. (c+1)*chunk - 1) of request r, the first request whose
    chunk c lists the very same slots, both chunks complete; r itself when none does or r's chunk is partial;
    -1 where r has no keys in chunk c."""
    bounds = kv_indptr.tolist()
    batch = len(bounds) - 1
    out = torch.full((num_chunks, batch), -1, dtype=torch.int32)
    for c in range(num_chunks):
        lo, hi = c * chunk, (c + 1) * chunk
        for r in range(batch):
            length = bounds[r + 1] - bounds[r]
            if lo >= length:
                continue
            out[c, r] = r
            if hi > length:
                continue
            mine = kv_indices[bounds[r] + lo:bounds[r] + hi]
            for s in range(r):
                if bounds[s + 1] - bounds[s] >= hi and torch.equal(kv_indices[bounds[s] + lo:bounds[s] + hi], mine):
                    out[c, r] = s
                    break
    return out
