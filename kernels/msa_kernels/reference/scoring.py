"""Index scoring and block selection: the pure-PyTorch oracle (float32 accumulation).

Semantics (MiniMax-M3, `sparse_score_type = "max"`, one shared index-K head):
  score[t, h, s]  = q_idx[t, h] . k_idx[s]   for s <= pos[t], else -inf   (raw dot product: a positive
                    scale would not change the selection, and transformers applies none)
  block[t, h, j]  = max over the 128 tokens s of block j of score[t, h, s]
  selection       = the local block pos[t] // 128, plus the 15 best earlier blocks; when at most 16 blocks
                    are visible, all of them. Ties: higher score first, then the lower block id.
Selections are returned as ascending block ids, padded with -1 at the tail: the order the attention
kernels consume them in (set semantics are what the model defines).
"""

from __future__ import annotations

import torch

from ..layout import BLOCK_SIZE, TOPK_BLOCKS, MSAInputError, accumulation_dtype, num_blocks

_ROWS_PER_CHUNK = 256  # bounds the [rows, heads, keys] score matrix this reference materializes


def index_block_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Per-block maxima of the causal index scores.

    q_idx: [T, H, D] index queries; k_idx: [S, D] (or [S, 1, D]) index keys of one sequence at positions
    0..S-1; q_pos: [T] absolute positions (each < S). Returns [T, H, ceil(S / 128)] in the accumulation
    dtype (float32, or float64 for float64 inputs), -inf for
    blocks with no visible token.
    """
    if k_idx.dim() == 3:
        if k_idx.shape[1] != 1:
            raise MSAInputError(f"k_idx must have one shared index head, got shape {tuple(k_idx.shape)}")
        k_idx = k_idx[:, 0]
    if q_idx.dim() != 3 or k_idx.dim() != 2 or q_idx.shape[-1] != k_idx.shape[-1]:
        raise MSAInputError(
            f"q_idx must be [T, H, D] and k_idx [S, D] with equal D, got {tuple(q_idx.shape)} and "
            f"{tuple(k_idx.shape)}"
        )
    if q_pos.shape != (q_idx.shape[0],):
        raise MSAInputError(f"q_pos must be [T={q_idx.shape[0]}], got {tuple(q_pos.shape)}")
    seq_len = k_idx.shape[0]
    if q_pos.numel() and int(q_pos.max()) >= seq_len:
        raise MSAInputError(f"query position {int(q_pos.max())} is beyond the {seq_len} index keys")
    nblk = num_blocks(seq_len)
    pad = nblk * BLOCK_SIZE - seq_len
    acc = accumulation_dtype(q_idx.dtype, k_idx.dtype)
    k = k_idx.to(acc)
    key_pos = torch.arange(seq_len, device=k.device)
    out = torch.empty(q_idx.shape[0], q_idx.shape[1], nblk, dtype=acc, device=k.device)
    for lo in range(0, q_idx.shape[0], _ROWS_PER_CHUNK):
        hi = min(lo + _ROWS_PER_CHUNK, q_idx.shape[0])
        s = torch.einsum("thd,sd->ths", q_idx[lo:hi].to(acc), k)
        future = key_pos[None, None, :] > q_pos[lo:hi, None, None].to(k.device)
        s = s.masked_fill(future, float("-inf"))
        if pad:
            s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        out[lo:hi] = s.view(hi - lo, q_idx.shape[1], nblk, BLOCK_SIZE).amax(-1)
    return out


def select_blocks(block_scores: torch.Tensor, q_pos: torch.Tensor, topk: int = TOPK_BLOCKS) -> torch.Tensor:
    """Block selection per query token and index head.

    block_scores: [T, H, NB] float; q_pos: [T]. Returns int32 [T, H, topk], ascending block ids, -1 padded.
    """
    if block_scores.dim() != 3:
        raise MSAInputError(f"block_scores must be [T, H, blocks], got {tuple(block_scores.shape)}")
    if topk < 1:
        raise MSAInputError(f"topk must be >= 1, got {topk}")
    t_count, heads, nblk = block_scores.shape
    device = block_scores.device
    q_blk = (q_pos.to(device).long() // BLOCK_SIZE)  # the local block of each query
    if t_count and int(q_blk.max()) >= nblk:
        raise MSAInputError(f"a query's local block {int(q_blk.max())} is beyond the {nblk} scored blocks")
    blk = torch.arange(nblk, device=device)
    historical = blk[None, :] < q_blk[:, None]  # [T, NB]
    scores = block_scores.to(accumulation_dtype(block_scores.dtype))
    if torch.isnan(scores.masked_fill(~historical[:, None, :], 0.0)).any():
        raise MSAInputError("block_scores contain NaN in visible blocks")
    ranked = scores.masked_fill(~historical[:, None, :], float("-inf"))
    # Stable descending sort: among equal scores the lower block id stays first.
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    n_hist = min(topk - 1, nblk)
    best = order[..., :n_hist]  # [T, H, n_hist]
    valid = torch.gather(historical[:, None, :].expand(-1, heads, -1), -1, best)
    best = best.masked_fill(~valid, -1)
    # With at most `topk` visible blocks every historical block ranks in the top `topk - 1` (they are the only
    # finite candidates, and the stable sort keeps them ahead of masked ones), so one rule covers both cases.
    local = q_blk[:, None, None].expand(-1, heads, 1)
    chosen = torch.full((t_count, heads, topk), -1, dtype=torch.long, device=device)
    chosen[..., :n_hist] = best
    chosen[..., n_hist : n_hist + 1] = local
    # Ascending ids with the -1 padding at the tail.
    key = torch.where(chosen < 0, torch.full_like(chosen, nblk + 1), chosen)
    chosen = torch.sort(key, dim=-1).values
    return torch.where(chosen > nblk, torch.full_like(chosen, -1), chosen).to(torch.int32)
