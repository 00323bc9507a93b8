"""Block-sparse attention over selected 128-token blocks: the pure-PyTorch oracle (float32).

For query token t (position pos[t]) and query head n of KV group g = n // (Hq / Hkv):
  keys allowed = { s : s // 128 in selected[t, g]  and  s <= pos[t] }
  o[t, n]      = softmax_s(q[t, n] . k[s, g] * scale) . v[s, g]
The causal mask inside the local block is token-level; every other selected block lies wholly before the
query. A query with no allowed key (impossible for valid selections: the local block holds the query
itself) would produce NaN, so the inputs are checked instead.
"""

from __future__ import annotations

import torch

from ..layout import BLOCK_SIZE, MSAInputError, accumulation_dtype, num_blocks

_ROWS_PER_CHUNK = 128


def block_keep_mask(selected: torch.Tensor, nblk: int) -> torch.Tensor:
    """[T, G, topk] block ids (-1 = none) -> bool [T, G, nblk]: which blocks each (token, group) reads."""
    t_count, groups, _ = selected.shape
    keep = torch.zeros(t_count, groups, nblk + 1, dtype=torch.bool, device=selected.device)
    idx = selected.long().masked_fill(selected < 0, nblk)
    keep.scatter_(-1, idx, True)
    return keep[..., :nblk]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [S, Hkv, D] of one sequence (positions 0..S-1); selected: [T, Hkv, topk];
    q_pos: [T]. Returns [T, Hq, D] in q's dtype, accumulated in float32 (float64 for float64 inputs)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise MSAInputError(f"q must be [T, Hq, D], k and v [S, Hkv, D]; got {tuple(q.shape)}, "
                            f"{tuple(k.shape)}, {tuple(v.shape)}")
    t_count, hq, dim = q.shape
    seq_len, hkv, _ = k.shape
    if hq % hkv:
        raise MSAInputError(f"{hq} query heads do not split into {hkv} KV groups")
    if selected.shape[:2] != (t_count, hkv):
        raise MSAInputError(f"selected must be [T={t_count}, Hkv={hkv}, topk], got {tuple(selected.shape)}")
    if t_count and int(q_pos.max()) >= seq_len:
        raise MSAInputError(f"query position {int(q_pos.max())} is beyond the {seq_len} cached tokens")
    scale = dim**-0.5 if scale is None else scale
    group = hq // hkv
    nblk = num_blocks(seq_len)
    local_blk = q_pos.to(selected.device).long() // BLOCK_SIZE
    if t_count and not (selected.long() == local_blk[:, None, None]).any(-1).all():
        raise MSAInputError("every query's selection must contain its local block")
    acc = accumulation_dtype(q.dtype, k.dtype)
    kf = k.to(acc)
    vf = v.to(acc)
    key_pos = torch.arange(seq_len, device=k.device)
    out = torch.empty(t_count, hq, dim, dtype=q.dtype, device=q.device)
    for lo in range(0, t_count, _ROWS_PER_CHUNK):
        hi = min(lo + _ROWS_PER_CHUNK, t_count)
        keep_blk = block_keep_mask(selected[lo:hi], nblk)  # [t, G, nblk]
        keep = keep_blk.repeat_interleave(BLOCK_SIZE, dim=-1)[..., :seq_len]  # [t, G, S]
        keep = keep & (key_pos[None, None, :] <= q_pos[lo:hi, None, None].to(k.device))
        qf = q[lo:hi].to(acc).view(hi - lo, hkv, group, dim)
        logits = torch.einsum("tgnd,sgd->tgns", qf, kf) * scale
        logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        o = torch.einsum("tgns,sgd->tgnd", probs, vf)
        out[lo:hi] = o.reshape(hi - lo, hq, dim).to(q.dtype)
    return out
