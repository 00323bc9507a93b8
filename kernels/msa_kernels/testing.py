"""Helpers for tests that compare a kernel's selection with the reference's."""

from __future__ import annotations

import torch


def selection_disagreements(
    got: torch.Tensor, want: torch.Tensor, block_scores: torch.Tensor, atol: float = 1e-3, rtol: float = 1e-3
) -> tuple[int, int]:
    """Compare two selections [T, H, topk] (ascending ids, -1 padded) as sets.

    Returns (rows that differ, rows whose difference is NOT a near-tie). A difference is a near-tie when
    every block chosen by only one side scores (in the float32 `block_scores` [T, H, NB]) within
    atol + rtol*|score| of every block chosen by only the other side, i.e. the two sides only disagree
    about which of some almost equally scored blocks made the cut.
    """
    t_count, heads, _ = got.shape
    nblk = block_scores.shape[-1]
    g = torch.zeros(t_count, heads, nblk + 1, dtype=torch.bool, device=got.device)
    w = torch.zeros_like(g)
    g.scatter_(-1, got.long().masked_fill(got < 0, nblk), True)
    w.scatter_(-1, want.long().masked_fill(want < 0, nblk), True)
    g, w = g[..., :nblk], w[..., :nblk]
    differ = (g != w).any(-1)
    rows = differ.nonzero().tolist()
    bad = 0
    for t, h in rows:
        only_g = block_scores[t, h][g[t, h] & ~w[t, h]]
        only_w = block_scores[t, h][w[t, h] & ~g[t, h]]
        if only_g.numel() != only_w.numel():
            bad += 1
            continue
        tol = atol + rtol * torch.cat([only_g, only_w]).abs().max()
        if (only_g.max() - only_w.min()).abs() > tol or (only_w.max() - only_g.min()).abs() > tol:
            bad += 1
    return len(rows), bad
