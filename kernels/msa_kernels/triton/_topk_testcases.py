"""Random batches and the selection check shared by the index top-k tests (CPU interpreter and GPU).

Batches draw fresh random index queries and keys, scatter every request's pages over the pool at
random (non-contiguous page tables), and can make requests share their first pages (a cached prefix).
`check_selection` compares a kernel's selection with the reference: structure first (ascending ids,
-1 tail, local block present, no future block), then set equality up to near-ties.
"""

from __future__ import annotations

import torch

from ..layout import BLOCK_SIZE, num_blocks
from ..plan import MSAPlan, plan
from ..reference import index_topk as reference_index_topk
from ..reference.paged import gather_sequence
from ..reference.scoring import index_block_scores
from ..testing import selection_disagreements


def make_batch(
    seq_lens: list[int],
    q_lens: list[int],
    heads: int,
    *,
    shared_blocks: int = 0,
    q_dtype: torch.dtype = torch.float16,
    k_dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    dim: int = 128,
    spare_pages: int = 3,
    topk: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[MSAPlan, torch.Tensor, torch.Tensor]:
    """A batch over a scattered page pool. The first `shared_blocks` blocks of every request that long
    map to the same pages (a shared prefix); all other pages are private."""
    g = generator
    batch = len(seq_lens)
    width = max([num_blocks(s) for s in seq_lens] + [1])
    num_pages = batch * width + spare_pages
    perm = torch.randperm(num_pages, generator=g)
    page_table = perm[: batch * width].view(batch, width).clone()
    if shared_blocks:
        page_table[:, :shared_blocks] = page_table[0, :shared_blocks]
    # Index keys are RMS-normed in M3 (entries O(1)); queries too. Draw fresh values each call.
    # On a GPU draw on the device (pools reach gigabytes); `generator` only seeds CPU draws.
    on_cpu = torch.device(device).type == "cpu"
    rand = (lambda *shape: torch.randn(*shape, generator=g)) if on_cpu else (
        lambda *shape: torch.randn(*shape, device=device))
    index_k_cache = rand(num_pages * BLOCK_SIZE, 1, dim).to(k_dtype)
    p = plan(page_table.to(torch.int32).to(device), seq_lens, q_lens, num_pages=num_pages, topk=topk)
    q_idx = rand(p.num_tokens, heads, dim).to(q_dtype)
    return p, q_idx, index_k_cache


def reference_block_scores(p: MSAPlan, q_idx: torch.Tensor, index_k_cache: torch.Tensor) -> torch.Tensor:
    """float32 [T, H, max blocks] block maxima of every query row (-inf where not visible)."""
    nblk = max([num_blocks(s) for s in p.seq_lens_list] + [1])
    out = torch.full((q_idx.shape[0], q_idx.shape[1], nblk), float("-inf"), device=q_idx.device)
    for b, (lo, hi) in enumerate(p.token_ranges()):
        if hi == lo:
            continue
        keys = gather_sequence(index_k_cache, p.page_table[b], p.seq_lens_list[b])
        scores = index_block_scores(q_idx[lo:hi], keys, p.q_pos[lo:hi].to(q_idx.device))
        out[lo:hi, :, : scores.shape[-1]] = scores
    return out


def check_structure(p: MSAPlan, got: torch.Tensor) -> None:
    """Ascending ids, -1 only at the tail, the local block present, nothing after it, right count."""
    t_count, heads, topk = got.shape
    local = (p.q_pos.to(got.device).long() // BLOCK_SIZE)[:, None, None]
    g = got.long()
    valid = g >= 0
    assert bool((g >= -1).all()), "ids below -1 (unwritten output?)"
    assert bool((valid[..., 1:] <= valid[..., :-1]).all()), "-1 padding is not at the tail"
    nxt = torch.where(valid[..., 1:], g[..., 1:], torch.full_like(g[..., 1:], 1 << 40))
    assert bool((nxt > g[..., :-1]).all()), "ids are not strictly ascending"
    assert bool(((g == local) & valid).any(-1).all()), "the local block is missing"
    assert bool(((g <= local) | ~valid).all()), "a block after the local block was selected"
    want_count = torch.clamp(local[..., 0] + 1, max=topk).expand(t_count, heads)
    assert torch.equal(valid.sum(-1), want_count), "wrong number of selected blocks"


def check_selection(p: MSAPlan, q_idx: torch.Tensor, index_k_cache: torch.Tensor, got: torch.Tensor) -> dict:
    """Assert `got` is a valid selection equal to the reference's up to near-ties; return the counts."""
    assert got.dtype == torch.int32 and got.shape == (q_idx.shape[0], q_idx.shape[1], p.topk), (
        f"bad output {got.dtype} {tuple(got.shape)}"
    )
    check_structure(p, got)
    want = reference_index_topk(p, q_idx, index_k_cache)
    scores = reference_block_scores(p, q_idx, index_k_cache)
    differ, bad = selection_disagreements(got, want, scores)
    assert bad == 0, f"{bad} of {differ} differing rows are not near-ties"
    return {"rows": got.shape[0] * got.shape[1], "differ": differ, "exact": bool(torch.equal(got, want))}
