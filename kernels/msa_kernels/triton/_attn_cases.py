"""Random problem builders for the sparse attention kernels' tests and GPU checks (no kernel code here).

A case is a paged pool holding every request's tokens on scattered pages, new-token queries, and selections
of the kind index_topk emits (ascending block ids, -1 padded, always holding the query's local block). Two
selection styles: "random" (little overlap between neighbouring queries: the worst case for K/V reuse) and
"recent" (each query takes a few hot blocks plus its most recent ones: high overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BLOCK_SIZE, TOPK_BLOCKS, num_blocks
from ..plan import MSAPlan, plan


@dataclass
class AttnCase:
    plan: MSAPlan
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    selected: torch.Tensor
    k_scale: float | None = None
    v_scale: float | None = None


def random_selection(q_pos: torch.Tensor, hkv: int, style: str, gen: torch.Generator,
                     topk: int = TOPK_BLOCKS) -> torch.Tensor:
    """int32 [T, hkv, topk] selections for queries at absolute positions q_pos (on gen's device).

    Rows that see at most topk blocks take them all; others take their local block plus topk - 1 earlier
    blocks: uniformly at random ("random"), or 4 hot blocks per head shared by every query then the most
    recent ones ("recent")."""
    dev = gen.device
    local = q_pos.to(dev).long() // BLOCK_SIZE
    t_count = local.shape[0]
    nblk = int(local.max()) + 1 if t_count else 1
    j = torch.arange(nblk, device=dev)
    hist = j[None, None, :] < local[:, None, None]  # [T, 1, NB]
    if style == "random":
        score = torch.rand(t_count, hkv, nblk, generator=gen, device=dev)
    elif style == "recent":
        score = j.float()[None, None, :].expand(t_count, hkv, nblk).clone()
        for h in range(hkv):
            hot = torch.tensor([7 * i + h for i in range(4)], device=dev)
            score[:, h, hot[hot < nblk]] += 1e9
    else:
        raise ValueError(style)
    score = score.masked_fill(~hist, float("-inf"))
    k = min(topk - 1, nblk)
    best = score.topk(k, dim=-1)
    chosen = best.indices.masked_fill(torch.isinf(best.values), -1)
    chosen = torch.cat([chosen, local[:, None, None].expand(t_count, hkv, 1)], -1)
    if chosen.shape[-1] < topk:
        chosen = torch.nn.functional.pad(chosen, (0, topk - chosen.shape[-1]), value=-1)
    key = torch.where(chosen < 0, torch.full_like(chosen, 1 << 40), chosen)
    chosen = key.sort(-1).values
    return torch.where(chosen >= (1 << 40), -1, chosen).to(torch.int32)


def build_case(
    seq_lens: list[int],
    q_lens: list[int],
    hq: int,
    hkv: int,
    dim: int = 128,
    dtype: torch.dtype = torch.float16,
    cache_dtype: torch.dtype | None = None,
    style: str = "random",
    device: str = "cpu",
    seed: int | None = None,
    spare_pages: int = 3,
) -> AttnCase:
    """A batch of requests (seq_lens tokens each, the last q_lens new) on a pool of shuffled pages."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator(device).manual_seed(seed)
    pages_needed = [num_blocks(s) for s in seq_lens]
    total_pages = sum(pages_needed) + spare_pages
    perm = torch.randperm(total_pages, generator=gen)
    max_pages = max(pages_needed) + 1
    page_table = torch.full((len(seq_lens), max_pages), -1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(pages_needed):
        page_table[b, :n] = perm[at : at + n].to(torch.int32)
        at += n
    slots = total_pages * BLOCK_SIZE
    k = torch.randn(slots, hkv, dim, generator=dgen, device=device)
    v = torch.randn(slots, hkv, dim, generator=dgen, device=device)
    # Slots no request owns (tails of last pages, spare pages) hold NaN: a kernel that reads past a sequence's
    # end, or a page it did not select, turns the output NaN instead of passing by luck.
    owned = torch.zeros(slots, dtype=torch.bool, device=device)
    pt = page_table.to(device)
    for b, s in enumerate(seq_lens):
        pos = torch.arange(s, device=device)
        owned[pt[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE] = True
    k[~owned] = float("nan")
    v[~owned] = float("nan")
    k_scale = v_scale = None
    if cache_dtype is not None and cache_dtype != dtype:  # fp8: store value / scale
        k_scale, v_scale = 0.0125, 0.02
        k_cache = (k * 0.5 / k_scale).to(cache_dtype)
        v_cache = (v / v_scale * 0.5).to(cache_dtype)
    else:
        k_cache, v_cache = (k * 0.5).to(dtype), v.to(dtype)
    p = plan(page_table.to(device), seq_lens, q_lens, num_pages=total_pages)
    q = torch.randn(p.num_tokens, hq, dim, generator=dgen, device=device).to(dtype)
    sel = random_selection(p.q_pos, hkv, style, dgen)
    return AttnCase(p, q, k_cache, v_cache, sel, k_scale, v_scale)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere (e.g. an unwritten poisoned element) gives inf."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))
