"""Host-side work list of the index top-k kernels, built once per forward batch (plan time).

The scoring kernel walks *items*. An item is a set of query rows (row = token * H_idx + index head) that
read the same index-K pages for one range of logical blocks [j0, j1) (a *chunk*); the kernel scores every
block of the range against every row and keeps each row's best few blocks of that chunk. Only historical
blocks (j < the row's local block) are scored: they lie wholly before the query, so no token-level causal
mask is needed, and the local block is forced into the selection afterwards.

- extend/prefill: rows are a run of consecutive tokens of one request (all its index heads), so one
  K-block load feeds a [rows x 128] x [128 x 128] tensor-core product;
- decode: rows are the index heads of one request; when several requests read the same pages for a chunk
  (a shared prefix) their rows are packed into one item, so the page is read once per batch, not once
  per request.

Chunks split long histories so that there are enough items to fill the GPU; each chunk leaves candidates
that a merge kernel reduces. When one chunk covers every row's history the scoring kernel finishes the
selection itself (`final`).

Every size here is fixed at plan time: the run step allocates nothing whose size depends on data and
never syncs, so decode can run inside CUDA graphs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..layout import BLOCK_SIZE, MSAInputError
from ..plan import MSAPlan
from ..transfer import to_device

# Rows (tokens x index heads) of one extend item. Round 7, H100, scoring kernel per layer (extend 2,048 on 60k /
# 8 x 2,048 on a shared 60k / prefill 64k): 128 rows (8 warps) 220 / 2,149 / 4,536 us, 64 rows (4 warps, 3
# stages, as index_topk picks for tiles under 128 rows) 198 / 1,918 / 4,157 us, 256 rows 284 / 2,284 / 4,284 us.
EXTEND_ROWS = 64
MAX_SHARED_ROWS = 64  # rows of one decode item: requests sharing a page are packed up to this many rows
ITEMS_PER_SM = 2  # items wanted per SM before chunks are split further


@dataclass
class TopkWork:
    items: torch.Tensor  # int32 [n_items, 6]: page-table row, j0, j1, row offset, row count, chunk id
    rows: torch.Tensor  # int32 [n_rows_listed]: flat rows (token * H + head) of the items, item after item
    n_items: torch.Tensor  # int32 [1]: read by the kernel, so the grid need not change with the data
    n_items_host: int
    block_m: int  # rows per item tile (power of two)
    chunk_blocks: int  # blocks per chunk (CB); chunk c covers blocks [c*CB, (c+1)*CB)
    n_chunks: int  # chunks of the longest history (C)
    keep: int  # candidates kept per (row, chunk) (KS, power of two)
    final: bool  # one chunk per row: the scoring kernel writes the selection itself
    grid: int  # persistent programs of the scoring kernel
    heads: int
    candidates: torch.Tensor | None = None  # int64 [T*H, C, KS] per-chunk (score, block) keys (split runs)
    grid_items: bool = False  # decode graph mode: items are (request, chunk) computed in the kernel


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _row_tiles(plan: MSAPlan, heads: int, tokens_per_tile: int):
    """Consecutive-token tiles of every request: (request, first flat row, row count, history blocks)."""
    req, row0, nrow, hist = [], [], [], []
    indptr = plan.qo_indptr_list
    for b, (seq, n) in enumerate(zip(plan.seq_lens_list, plan.q_lens_list)):
        for t0 in range(0, n, tokens_per_tile):
            t1 = min(n, t0 + tokens_per_tile)
            req.append(b)
            row0.append((indptr[b] + t0) * heads)
            nrow.append((t1 - t0) * heads)
            hist.append((seq - n + t1 - 1) // BLOCK_SIZE)  # local block of the tile's last token
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return as_t(req), as_t(row0), as_t(nrow), as_t(hist)


def _split_chunks(req, row0, nrow, hist, chunk_blocks, final):
    """One item per (tile, chunk) of the tile's history [0, hist); exactly one per tile when `final`."""
    nch = torch.ones_like(hist) if final else (hist + chunk_blocks - 1) // chunk_blocks
    tile = torch.repeat_interleave(torch.arange(len(req)), nch)
    first = torch.cumsum(nch, 0) - nch
    chunk = torch.arange(int(nch.sum())) - first[tile]
    j0 = chunk * chunk_blocks
    j1 = torch.minimum(j0 + chunk_blocks, hist[tile])
    return req[tile], j0, j1, row0[tile], nrow[tile], chunk


def _check_pages(page_table_cpu: torch.Tensor, req, j0, j1, num_pages: int) -> None:
    """Every index-K page the items read must exist in the pool. A request's items together read its blocks
    [0, its largest j1) (chunks tile each tile's history from block 0), so one row prefix per request is
    checked rather than every item's range: at 8 x 2,048 new tokens on a 60k prefix that is 4k page lookups
    instead of 500k (1,024 items x ~480 blocks), ~100 -> ~1 ms of host time per forward batch (2-core CPU)."""
    if len(req) == 0:
        return
    reach = torch.zeros(page_table_cpu.shape[0], dtype=torch.int64)
    reach.scatter_reduce_(0, req.long(), j1.long(), reduce="amax")  # blocks [0, reach[b]) of request b are read
    width = int(reach.max())
    if width == 0:
        return
    cols = torch.arange(width)
    used = cols[None, :] < reach[:, None]
    pages = page_table_cpu[:, :width].long()
    bad = used & ((pages < 0) | (pages >= num_pages))
    if bad.any():
        b, k = (int(x) for x in bad.nonzero()[0])
        raise MSAInputError(
            f"page table of request {b} maps block {k} to page {int(pages[b, k])}, "
            f"outside the index-K pool's {num_pages} pages"
        )


def _pack_shared(page_table_cpu, req, j0, j1, row0, nrow, chunk, heads, max_rows):
    """Decode: merge items of different requests that read the same pages for the same chunk.

    Returns items and their row list; each group of identical (j0, pages of [j0, j1)) becomes
    ceil(members / requests-per-item) items whose rows are the members' rows back to back.
    """
    width = max(1, int((j1 - j0).max()))
    cols = j0[:, None] + torch.arange(width)[None, :]
    pages = page_table_cpu[req[:, None], cols.clamp(max=page_table_cpu.shape[1] - 1)].long()
    pages = torch.where(cols < j1[:, None], pages, torch.full_like(pages, -1))
    keys = torch.cat([j0[:, None], (j1 - j0)[:, None], pages], 1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    order = torch.sort(group, stable=True).indices
    group = group[order]
    counts = torch.bincount(group)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(group)) - start[group]  # position of each member inside its group
    per_item = max(1, max_rows // heads)
    items_of_group = (counts + per_item - 1) // per_item
    item_base = torch.cumsum(items_of_group, 0) - items_of_group
    item = item_base[group] + rank // per_item  # members of one item are contiguous in `order`
    n_items = int(items_of_group.sum())
    first = torch.zeros(n_items, dtype=torch.int64)
    first.scatter_reduce_(0, item, torch.arange(len(item)), reduce="amin", include_self=False)
    members = torch.bincount(item, minlength=n_items)
    m_req, m_row0 = req[order], row0[order]
    rows = (m_row0[:, None] + torch.arange(heads)[None, :]).reshape(-1)
    f = order[first]
    return (req[f], j0[f], j1[f], first * heads, members * heads, chunk[f]), rows, m_req


def build_topk_work(
    plan: MSAPlan, heads: int, num_pages: int, device: torch.device, sm_count: int,
    target_items: int | None = None, like: TopkWork | None = None, for_graph: bool = False,
) -> TopkWork:
    """Build the work list for `heads` index heads. `target_items` (default ITEMS_PER_SM x SMs) is how
    many items the split aims for; tests lower it to exercise the split and merge paths on small shapes.

    With `like` (a work list a CUDA graph was captured with), the new list keeps `like`'s compile-time
    sizing (chunk size, rows per item, candidates kept, split or not) and is written into `like`'s
    buffers in place; MSAInputError if this batch does not fit them (capture a graph sized for it).
    With `for_graph`, the buffers are sized for the worst case of this batch's lengths (no page shared,
    items of up to MAX_SHARED_ROWS rows) so that later batches of at most these lengths fit."""
    if heads < 1:
        raise MSAInputError(f"q_idx must have at least one index head, got {heads}")
    target = target_items if target_items is not None else ITEMS_PER_SM * sm_count
    decode = plan.is_decode
    extend_rows = int(os.environ.get("MSA_EXTEND_ROWS", EXTEND_ROWS))  # A/B knob for benchmarks
    tokens_per_tile = 1 if decode else max(1, extend_rows // heads)
    req, row0, nrow, hist = _row_tiles(plan, heads, tokens_per_tile)
    max_hist = int(hist.max()) if len(hist) else 0
    # The page ids on the host (a stream sync): decode packs shared pages by them; extend needs them only to
    # check pages the plan did not (plan(check_pages=False) callers vouch for theirs).
    check = plan.pages_need_check(num_pages)
    pt_cpu = plan.page_table.cpu() if decode or check else None

    live = hist > 0
    if like is not None:
        chunk_blocks, final = like.chunk_blocks, like.final
        n_chunks = -(-max_hist // chunk_blocks) if max_hist else 0
        if (final and n_chunks > 1) or (not final and n_chunks > like.n_chunks):
            raise MSAInputError(
                f"a history of {max_hist} blocks does not fit the captured top-k sizing "
                f"({like.n_chunks} chunks of {chunk_blocks} blocks): capture a graph sized for it"
            )
    else:
        chunk_blocks = _choose_chunk_blocks(plan, decode, req, hist, live, max_hist, target, pt_cpu)
        n_chunks = -(-max_hist // chunk_blocks) if max_hist else 0
        final = n_chunks <= 1
    if not final:
        # Tiles with no historical block need no item: the merge gives them their local block alone.
        req, row0, nrow, hist = req[live], row0[live], nrow[live], hist[live]
    # In a final run every tile gets an item (possibly empty: j0 = j1 = 0) because the item writes the output.
    items_req, j0, j1, irow0, inrow, chunk = _split_chunks(req, row0, nrow, hist, chunk_blocks, final)
    if check:
        _check_pages(pt_cpu, items_req, j0, j1, num_pages)

    total_rows = plan.num_tokens * heads
    capacity_items, capacity_rows = len(items_req), int(inrow.sum())  # before any packing: worst case
    if decode and len(items_req):
        max_rows = like.block_m if like is not None else MAX_SHARED_ROWS
        (items_req, j0, j1, irow0, inrow, chunk), rows, _ = _pack_shared(
            pt_cpu, items_req, j0, j1, irow0, inrow, chunk, heads, max_rows
        )
    else:
        rows = torch.arange(total_rows, dtype=torch.int64)
    # Longest items first: the persistent programs then finish close together.
    order = torch.sort(j1 - j0, descending=True, stable=True).indices
    items = torch.stack([items_req, j0, j1, irow0, inrow, chunk], 1)[order].to(torch.int32)
    rows = rows.to(torch.int32)
    n_items = items.shape[0]
    block_m = max(16, _pow2(int(inrow.max())) if n_items else 1)  # tl.dot needs >= 16 rows
    if like is not None:
        return _refill(like, items, rows, block_m, total_rows, heads)
    keep = min(_pow2(max(1, plan.topk - 1)), _pow2(chunk_blocks))
    if for_graph:
        if decode:
            block_m = max(block_m, _pow2(min(MAX_SHARED_ROWS, plan.batch_size * heads)))
        item_buf = torch.zeros(max(1, capacity_items), 6, dtype=torch.int32)
        row_buf = torch.zeros(max(1, capacity_rows, total_rows), dtype=torch.int32)
        item_buf[:n_items], row_buf[: rows.numel()] = items, rows
        items, rows = item_buf, row_buf
    work_list = TopkWork(
        items=to_device(items.contiguous(), device),
        rows=to_device(rows, device) if len(rows) else torch.zeros(1, dtype=torch.int32, device=device),
        n_items=to_device(torch.tensor([n_items], dtype=torch.int32), device),
        n_items_host=n_items,
        block_m=block_m,
        chunk_blocks=chunk_blocks,
        n_chunks=n_chunks,
        keep=keep,
        final=final,
        grid=max(1, min(items.shape[0], 4 * sm_count)),
        heads=heads,
    )
    if not final:
        work_list.candidates = torch.empty(total_rows, n_chunks, keep, dtype=torch.int64, device=device)
    return work_list


def _choose_chunk_blocks(plan, decode, req, hist, live, max_hist, target, pt_cpu) -> int:
    """Blocks per chunk: enough items (~target) to fill the GPU, or one chunk when tiles alone do."""
    if decode and bool(live.any()):
        # Work counted in unique pages: a page shared by many requests is read once.
        cols = torch.arange(max_hist)[None, :]
        used = cols < hist[live, None]
        pages = pt_cpu[req[live, None], cols.clamp(max=pt_cpu.shape[1] - 1)].long()
        work = int(torch.unique(pages[used]).numel())
    else:
        work = int(hist.sum())
    if (not decode and len(req) >= target) or max_hist == 0:
        return max(1, max_hist)
    return min(max(1, -(-work // target)), max_hist)


def _refill(like: TopkWork, items, rows, block_m, total_rows, heads) -> TopkWork:
    """Write a rebuilt work list into a captured one's buffers (sizes checked: the graph reads these)."""
    n_items = items.shape[0]
    problems = []
    if heads != like.heads:
        problems.append(f"{heads} index heads, captured with {like.heads}")
    if block_m > like.block_m:
        problems.append(f"items of {block_m} rows, captured with {like.block_m}")
    if n_items > like.items.shape[0]:
        problems.append(f"{n_items} items, capacity {like.items.shape[0]}")
    if rows.numel() > like.rows.numel():
        problems.append(f"{rows.numel()} listed rows, capacity {like.rows.numel()}")
    if like.candidates is not None and like.candidates.shape[0] != total_rows:
        problems.append(f"{total_rows} query rows, captured with {like.candidates.shape[0]}")
    if problems:
        raise MSAInputError("batch does not fit the captured top-k work list: " + "; ".join(problems))
    if n_items:
        like.items[:n_items].copy_(items)
    if rows.numel():
        like.rows[: rows.numel()].copy_(rows)
    like.n_items.fill_(n_items)
    like.n_items_host = n_items
    return like


def build_graph_decode_work(
    batch: int, heads: int, max_blocks: int, topk: int, device: torch.device, sm_count: int,
    target_items: int | None = None,
) -> TopkWork:
    """The work of a decode CUDA graph: `batch` requests of up to `max_blocks` blocks, items computed on
    the device (request b, chunk c -> blocks [c*CB, min((c+1)*CB, local))), so that a replay needs no host
    work. The number of chunks per request is fixed (enough for ~target items per batch); the blocks per
    chunk CB are chosen in the kernels at each step from the batch's longest history (the smallest power of
    two whose chunks cover it), so short and long steps both spread over the GPU. `chunk_blocks` holds the
    largest CB (the longest context), which sizes how many candidates a chunk keeps. Compared with the
    host-built list, shared-prefix pages are read once per request, not once per batch (no packing)."""
    if batch < 1 or heads < 1 or max_blocks < 1:
        raise MSAInputError(f"graph decode work needs batch, heads, max_blocks >= 1, got {batch}, {heads}, "
                            f"{max_blocks}")
    if heads > MAX_SHARED_ROWS:
        raise MSAInputError(f"{heads} index heads exceed the decode tile ({MAX_SHARED_ROWS} rows)")
    target = target_items if target_items is not None else ITEMS_PER_SM * sm_count
    # About `target` items once histories are long: a power of two at or below target / batch.
    n_chunks = min(_pow2(max(1, target // batch) + 1) // 2, _pow2(max_blocks), 512)
    chunk_blocks = _pow2(-(-max_blocks // n_chunks))
    keep = min(_pow2(max(1, topk - 1)), chunk_blocks)
    n_items = batch * n_chunks
    return TopkWork(
        items=torch.zeros(1, 6, dtype=torch.int32, device=device),
        rows=torch.zeros(1, dtype=torch.int32, device=device),
        n_items=torch.tensor([n_items], dtype=torch.int32, device=device),
        n_items_host=n_items,
        block_m=max(16, _pow2(heads)),
        chunk_blocks=chunk_blocks,
        n_chunks=n_chunks,
        keep=keep,
        final=False,
        grid=max(1, min(n_items, 4 * sm_count)),
        heads=heads,
        candidates=torch.empty(batch * heads, n_chunks, keep, dtype=torch.int64, device=device),
        grid_items=True,
    )
