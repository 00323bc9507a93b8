"""Triton kernels of index scoring + block top-k (see `_topk_worklist` for the items they walk).

`_score_kernel`: persistent programs walk the items. For each item it loads the rows' index queries once,
then for every block j of the item's range loads that block's 128 index keys (one page, contiguous slots)
and takes, per row, the max over the block of q . k on tensor cores (`tl.dot` of the [rows x 128] query
tile against the [128 x 128] key block). Rows are 128 tokens x heads in extend tiles, the heads of
several requests on a shared prefix in packed decode items, and one request's 1-4 heads (padded to the
16-row minimum of `tl.dot`) in private decode items: a CUDA-core variant (multiply + reduce over the
head dim) was measured 7-10x slower on an H100, its reductions being shuffle-bound, while the padded
rows cost no memory traffic. The token-level score matrix never leaves registers: each row keeps a
running top-KS of (block max, id) keys, replacing its current minimum when a better block arrives. Finally it either writes those
candidates for the merge kernel, or (one chunk covers the history) selects and writes the output itself.

`_merge_kernel`: per row, the best TOPK-1 of its chunks' candidates plus the local block.

Candidates are stored compacted: a chunk of CB blocks has at most min(KS, CB) real keys, and the scoring
kernel keeps them in its first slots, so it writes only those, back to back, and a row's real candidates are
one contiguous run of used_chunks x min(KS, CB) keys. The merge walks that run in slices of MERGE_SLICE keys
with a running best TOPK-1: per slice it drops every key below the running worst, then moves the best
remaining key in while it beats the worst (at most TOPK-1 max-reductions for the first slice, fewer
for later ones). The slice width is fixed, so one compiled merge serves every history length (the earlier
merge padded each row to a constexpr width, 64 / 256 / 1,024 / powers of 2: a compile per new width while
serving, and 15 full passes over mostly empty keys). Measured on an H200 (graph replay, batch 1, merge
kernel alone): 7.3 -> 6.5 us at 60k (470 candidates, one slice), 9.4 -> 13 us at 256k (2,048 candidates:
four slices, and random keys keep beating the running worst in later slices). A bitonic top-k per slice
(tl.topk) measured slower still (8.1 / 27 us). When a row spans several slices, a lower bound of its final
selection (`_lower_bound`: the 15th largest of 32 group maxima) first drops most keys: H100, merge alone,
256k 13.3 / 12.7 -> 11.9 / 11.6 us over two A/B rounds, 1M 18.0 / 17.7 -> 18.5 / 15.0 us, one slice unchanged.
When one slice holds all of a row's candidates (decode up to ~240k tokens of history, extend's split items), the
best TOPK-1 are picked directly: one max-reduction per pick in a static loop, where the running best costs two
or three reductions per step plus a loop test. Measured on an H100 (torch.profiler, round 6; MSA_MERGE_DIRECT=0
restores the running best): merge 7.6 -> 5.0 us at decode B=1 60k, 7.8 -> 5.5 us at B=8 on a shared 60k
prefix, 62 -> 40 us for extend (2,048 tokens on 60k).

Selection output: the blocks of the best TOPK-1 keys and the local block, sorted by a 16-wide sort of the
ids: ascending, -1 at the tail.

Decode in CUDA graphs (items computed on the device) reads a shared prefix's pages once per sub-group of up to
BLOCK_M // H requests, not once per request (`_graph_item_rows`). Measured on an H200 (graph replay, B=8 on one
60k prefix): the scoring kernel 25.9 -> 11.8 us, the served layer 1.35x upstream (was 1.03x); private batches
pay the group test (B=8 60k: 35.5 -> 36.9 us). MSA_GRAPH_SHARE=0 turns it off.

Both kernels start with `pdl_prologue` (programmatic dependent launch, see `_pdl`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._attn_common import fp8_in_f16, tma_descriptor, to_f16_clamped
from ._pdl import PDL_MAX_BATCH, pdl_launch_options, pdl_prologue

_NO_ID = tl.constexpr(2147483647)  # sorts after every block id; mapped back to -1
# A (block max, block id) pair travels as one int64 key: the score's bits made order-preserving in the high
# word, 0x7FFFFFFF - id in the low word. A larger key is a higher score, then a lower id (the reference's
# tie rule), and one max/min reduction finds both the score and its block.
_NONE_KEY = tl.constexpr(-(2**63) + 2**40)  # below every real key (those are > -2**63 + 2**55)
_VALID_MIN = tl.constexpr(-(2**63) + 2**41)  # keys above this are real candidates
_PINNED = tl.constexpr(2**63 - 1)  # fills running-best slots past TOPK-1: never the worst, never selected


@triton.jit
def _pack_key(score, block_id):
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE order as signed integers
    low = 0x7FFFFFFF - (block_id + tl.zeros_like(bits))  # block_id may be a scalar loop index
    return (ordered.to(tl.int64) << 32) | low.to(tl.int64)


@triton.jit
def _key_block(key):
    return (0x7FFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def _select_and_store(keys, local, rows, row_ok, out_ptr,
                      R: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr):
    """keys [R, L] candidate keys of R rows -> out[row, :TOPK]: the blocks of the best TOPK-1 real keys and
    the local block, ascending, -1 padded. TOPK-1 passes of one max-reduction each (no sort of L)."""
    ocol = tl.arange(0, TOPK_P2)
    chosen = tl.full([R, TOPK_P2], -1, tl.int32)
    for k in tl.static_range(TOPK - 1):
        best = tl.max(keys, 1)
        best_id = tl.where(best > _VALID_MIN, _key_block(best), -1)
        chosen = tl.where(ocol[None, :] == k, best_id[:, None], chosen)
        keys = tl.where(keys == best[:, None], _NONE_KEY, keys)
    _store_sorted(chosen, local, rows, row_ok, out_ptr, R, TOPK, TOPK_P2)


@triton.jit
def _store_sorted(chosen, local, rows, row_ok, out_ptr, R: tl.constexpr, TOPK: tl.constexpr,
                  TOPK_P2: tl.constexpr):
    """chosen [R, TOPK_P2] block ids (-1 = none) in columns < TOPK-1 -> out[row, :TOPK]: those ids and the
    local block (column TOPK-1), ascending, -1 padded."""
    ocol = tl.arange(0, TOPK_P2)
    chosen = tl.where(ocol[None, :] == TOPK - 1, local[:, None], chosen)
    order = tl.where(chosen < 0, _NO_ID, chosen)
    order = tl.sort(order, 1)
    res = tl.where(order == _NO_ID, -1, order)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * TOPK + ocol[None, :]
    tl.store(ptrs, res, mask=row_ok[:, None] & (ocol < TOPK)[None, :])


@triton.jit
def _lower_bound(cand_ptr, base, row_ok, n_valid, longest,
                 R: tl.constexpr, W: tl.constexpr, FOLD: tl.constexpr, TOPK: tl.constexpr):
    """A key that each row's (TOPK-1)-th best candidate reaches: fold the row's candidates into FOLD groups,
    take each group's maximum (FOLD distinct keys) and return the (TOPK-1)-th largest of those. Keys below it
    can never be selected. Cheap: one pass over the slices and TOPK-1 reductions over FOLD keys."""
    col = tl.arange(0, W)
    gmax = tl.full([R, W], _NONE_KEY, tl.int64)
    for s0 in range(0, longest, W):
        c = s0 + col
        keys = tl.load(cand_ptr + base + c[None, :], mask=row_ok[:, None] & (c[None, :] < n_valid[:, None]),
                       other=_NONE_KEY)
        gmax = tl.maximum(gmax, keys)
    g = tl.max(tl.reshape(gmax, [R, W // FOLD, FOLD]), 1)
    for _ in tl.static_range(TOPK - 2):
        g = tl.where(g == tl.max(g, 1)[:, None], _NONE_KEY, g)
    return tl.max(g, 1)


@triton.jit
def _select_from_run(cand_ptr, row_stride, rows, row_ok, n_valid, local, out_ptr,
                     R: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
                     FOLD: tl.constexpr, DIRECT: tl.constexpr):
    """Rows' real candidates are cand[row * row_stride + c] for c < n_valid[row]: the best TOPK-1 of them, stored
    as the selection (see the module docstring). Within one slice of W keys directly; over several, a running
    best over the slices, where with FOLD > 0 keys below a lower bound of the final selection are dropped first
    (`_lower_bound`)."""
    col = tl.arange(0, W)
    base = rows.to(tl.int64)[:, None] * row_stride
    longest = tl.max(tl.where(row_ok, n_valid, 0), 0)
    if DIRECT and longest <= W:
        # One slice holds every row's candidates: take the best TOPK-1 directly, one max-reduction per pick and
        # a static loop (the running best below needs two or three reductions per step and a loop test).
        keys = tl.load(cand_ptr + base + col[None, :], mask=row_ok[:, None] & (col[None, :] < n_valid[:, None]),
                       other=_NONE_KEY)
        _select_and_store(keys, local, rows, row_ok, out_ptr, R, TOPK, TOPK_P2)
    else:
        _select_running_best(cand_ptr, base, rows, row_ok, n_valid, longest, local, out_ptr, R, W, TOPK, TOPK_P2,
                             FOLD)


@triton.jit
def _select_running_best(cand_ptr, base, rows, row_ok, n_valid, longest, local, out_ptr,
                         R: tl.constexpr, W: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
                         FOLD: tl.constexpr):
    """Rows whose candidates span several W-key slices: a running best TOPK-1 over the slices."""
    tcol = tl.arange(0, TOPK_P2)
    col = tl.arange(0, W)
    # Distinct sentinels, so that "the slot holding the worst key" is exactly one slot.
    top = tl.where(tcol[None, :] < TOPK - 1, tl.full([R, TOPK_P2], _NONE_KEY, tl.int64) + tcol[None, :],
                   tl.full([R, TOPK_P2], _PINNED, tl.int64))
    floor = tl.full([R], _VALID_MIN, tl.int64)
    if FOLD > 0:
        floor = tl.maximum(floor, _lower_bound(cand_ptr, base, row_ok, n_valid, longest, R, W, FOLD, TOPK))
    for s0 in range(0, longest, W):
        c = s0 + col
        keys = tl.load(cand_ptr + base + c[None, :], mask=row_ok[:, None] & (c[None, :] < n_valid[:, None]),
                       other=_NONE_KEY)
        worst = tl.min(top, 1)
        keys = tl.where((keys > worst[:, None]) & (keys >= floor[:, None]) & (keys > _VALID_MIN), keys, _NONE_KEY)
        best = tl.max(keys, 1)
        need = best > worst
        while tl.max(need.to(tl.int32), 0) > 0:
            top = tl.where((top == worst[:, None]) & need[:, None], best[:, None], top)
            keys = tl.where(keys == best[:, None], _NONE_KEY, keys)  # keys are unique (one per block)
            worst = tl.min(top, 1)
            best = tl.max(keys, 1)
            need = best > worst
    chosen = tl.where((tcol[None, :] < TOPK - 1) & (top > _VALID_MIN), _key_block(top), -1)
    _store_sorted(chosen, local, rows, row_ok, out_ptr, R, TOPK, TOPK_P2)


@triton.jit
def _graph_chunk_blocks(q_pos_ptr, n_req, n_chunks, PAGE: tl.constexpr, BATCH_P2: tl.constexpr):
    """Decode graph mode: blocks per chunk for this step, from the longest history in the batch: the
    smallest power of two with n_chunks chunks covering it (so short steps still spread over many items)."""
    b = tl.arange(0, BATCH_P2)
    longest = tl.max(tl.load(q_pos_ptr + b, mask=b < n_req, other=0)) // PAGE
    cb = longest * 0 + 1  # a tensor from the start: the loop carries one type
    while cb * n_chunks < longest:
        cb *= 2
    return cb


@triton.jit
def _graph_item_rows(pt_ptr, stride_pt, q_pos_ptr, n_req, b_ref, j0, j1, chunk_blocks, r,
                     H: tl.constexpr, PAGE: tl.constexpr, KS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BATCH_P2: tl.constexpr, SHARE: tl.constexpr):
    """Rows and block range of the graph-mode item (request b_ref, chunk [j0, j0 + CB)).

    Private: b_ref's H rows over [j0, j1). Shared (SHARE, CB <= KS): when the chunk lies wholly in the
    history of several requests that map it to the same pages (a shared prefix), those members split its
    blocks. Member m of a sub-group of up to BLOCK_M // H members scores its share of the blocks against all
    the sub-group's rows and writes each block's key into that block's own candidate slot (CB <= KS: every
    block has one), so a shared page is read once per sub-group, not once per request. Every member
    computes the same group: members are exactly the requests with identical pages for the chunk."""
    row_ok = r < H
    row = b_ref * H + r
    jj0 = j0
    jj1 = j1
    shared = j1 < 0  # a false scalar of the right type
    # Sharing needs a candidate slot per block of the chunk (CB <= KS). Long histories get longer chunks (B=32
    # at 60k: 64 blocks), and the group test (a [batch, KS] page-table gather before the first key load) would
    # only add latency there: 88 -> 92 us at B=32 x 60k fp8 on an H100 (round 12), so it is skipped.
    if SHARE:
        if chunk_blocks <= KS:
            PER: tl.constexpr = BLOCK_M // H
            bb = tl.arange(0, BATCH_P2)
            cc = tl.arange(0, KS)
            in_b = bb < n_req
            full = in_b & (tl.load(q_pos_ptr + bb, mask=in_b, other=0) // PAGE >= j0 + chunk_blocks)
            cmask = cc < chunk_blocks
            mine_full = j1 == j0 + chunk_blocks
            pages = tl.load(pt_ptr + bb.to(tl.int64)[:, None] * stride_pt + (j0 + cc)[None, :],
                            mask=full[:, None] & cmask[None, :], other=-1)
            mine = tl.load(pt_ptr + b_ref.to(tl.int64) * stride_pt + j0 + cc, mask=cmask & mine_full, other=-2)
            same = tl.sum(((pages == mine[None, :]) | (cc >= chunk_blocks)[None, :]).to(tl.int32), 1) == KS
            member = full & same
            g = tl.sum(member.to(tl.int32), 0)
            shared = mine_full & (g > 1)
            rank = tl.sum((member & (bb < b_ref)).to(tl.int32), 0)
            sg0 = (rank // PER) * PER  # first rank of this member's sub-group
            gs = tl.maximum(tl.minimum(PER, g - sg0), 1)  # >= 1 also where unshared (where() evaluates both)
            m = rank - sg0
            pos = tl.cumsum(member.to(tl.int32), 0) - 1  # rank of every member
            mi = r // H
            req_r = tl.sum(tl.where(member[None, :] & (pos[None, :] == sg0 + mi[:, None]), bb[None, :], 0), 1)
            row = tl.where(shared, req_r * H + r % H, row)
            row_ok = tl.where(shared, (mi < gs) & (r < PER * H), row_ok)
            jj0 = tl.where(shared, j0 + (m * chunk_blocks) // gs, j0)
            jj1 = tl.where(shared, j0 + ((m + 1) * chunk_blocks) // gs, j1)
    return row, row_ok, jj0, jj1, shared


@triton.jit(do_not_specialize=["stride_pt", "n_chunks", "chunk_blocks"])
def _score_kernel(
    q_ptr, stride_qt, stride_qh,
    kc_ptr, stride_ks, kc_desc,
    pt_ptr, stride_pt,
    q_pos_ptr,
    items_ptr, n_items_ptr, rows_ptr,
    cand_ptr, n_chunks,
    out_ptr, chunk_blocks,
    H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, KS: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    FINAL: tl.constexpr, K_NEEDS_CAST: tl.constexpr, IN_F32: tl.constexpr, F16_FOR_FP8: tl.constexpr,
    GRID_ITEMS: tl.constexpr, BATCH_P2: tl.constexpr, SHARE: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr,
):
    pdl_prologue(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_items = tl.load(n_items_ptr)
    if GRID_ITEMS:
        chunk_blocks = _graph_chunk_blocks(q_pos_ptr, n_items // n_chunks, n_chunks, PAGE, BATCH_P2)
    # Real keys of a chunk: at most its block count, and they fill the first slots of `top` (see below).
    ks_eff = tl.minimum(chunk_blocks, KS)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    kcol = tl.arange(0, KS)
    tok = tl.arange(0, PAGE)
    for item in range(pid, n_items, nprog):
        if GRID_ITEMS:
            # Decode in a CUDA graph: item = request * n_chunks + chunk, its range from the request's
            # position on the device (no host-built list; chunks past the history are empty).
            b_ref = item // n_chunks
            chunk = item % n_chunks
            j0 = chunk * chunk_blocks
            j1 = tl.maximum(tl.minimum(j0 + chunk_blocks, tl.load(q_pos_ptr + b_ref) // PAGE), j0)
            row, row_ok, jj0, jj1, shared = _graph_item_rows(
                pt_ptr, stride_pt, q_pos_ptr, n_items // n_chunks, b_ref, j0, j1, chunk_blocks, r,
                H, PAGE, KS, BLOCK_M, BATCH_P2, SHARE)
        else:
            base = items_ptr + item * 6
            b_ref = tl.load(base)
            j0 = tl.load(base + 1)
            j1 = tl.load(base + 2)
            row_off = tl.load(base + 3)
            n_rows = tl.load(base + 4)
            chunk = tl.load(base + 5)
            row_ok = r < n_rows
            row = tl.load(rows_ptr + row_off + r, mask=row_ok, other=0)
            jj0 = j0
            jj1 = j1
            shared = j1 < 0
        t = row // H
        h = row % H
        local = tl.load(q_pos_ptr + t, mask=row_ok, other=0) // PAGE
        q = tl.load(q_ptr + t.to(tl.int64)[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        if IN_F32:
            q = q.to(tl.float32)
        if F16_FOR_FP8:  # fp8 keys widen to fp16 in one exact conversion (see _attn_common.fp8_in_f16)
            q = to_f16_clamped(q)
        # Distinct sentinels, so that "the slot holding the row minimum" is always exactly one slot. They are
        # replaced lowest first, so a chunk's real keys sit in its first slots (the compacted store relies on it).
        top = tl.full([BLOCK_M, KS], _NONE_KEY, tl.int64) + kcol[None, :]
        page_row = pt_ptr + b_ref.to(tl.int64) * stride_pt
        cand_row = cand_ptr + row.to(tl.int64) * (n_chunks * KS) + chunk * ks_eff
        next_page = tl.load(page_row + jj0, mask=jj0 < jj1, other=0)
        for j in range(jj0, jj1):
            # The next block's page id is fetched one iteration ahead: the key load never waits on it.
            slot0 = next_page.to(tl.int64) * PAGE
            next_page = tl.load(page_row + j + 1, mask=j + 1 < jj1, other=0)
            if TMA:  # historical blocks are whole written pages: one bulk copy (_attn_common.tma_descriptor)
                kt = tl.trans(kc_desc.load([slot0.to(tl.int32), 0]))
            else:
                kt = tl.load(kc_ptr + (slot0 + tok)[None, :] * stride_ks + d[:, None])  # [D, PAGE]
            if F16_FOR_FP8:
                kt = kt.to(tl.float16)
            elif K_NEEDS_CAST:
                kt = kt.to(tl.float32).to(q.dtype)
            if IN_F32:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            key = _pack_key(tl.max(s, 1), j)
            # Historical blocks only (j < local block); later blocks of a tile's earlier rows stay out.
            key = tl.where(j < local, key, _NONE_KEY)
            if SHARE:
                tl.store(cand_row + (j - j0), key, mask=row_ok & shared)  # the block's own slot
            worst = tl.min(top, 1)
            put = (top == worst[:, None]) & (key > worst)[:, None]
            top = tl.where(put, key[:, None], top)
        if FINAL:
            _select_and_store(top, local, row, row_ok, out_ptr, BLOCK_M, TOPK, TOPK_P2)
        else:
            tl.store(cand_row[:, None] + kcol[None, :], top, mask=(row_ok & ~shared)[:, None] & (kcol < ks_eff)[None, :])


@triton.jit(do_not_specialize=["n_rows", "n_chunks", "chunk_blocks"])
def _merge_kernel(
    cand_ptr, q_pos_ptr, out_ptr,
    n_rows, n_chunks, chunk_blocks,
    H: tl.constexpr, PAGE: tl.constexpr, KS: tl.constexpr, RB: tl.constexpr, W: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, GRID_ITEMS: tl.constexpr, BATCH_P2: tl.constexpr,
    FOLD: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    if GRID_ITEMS:
        chunk_blocks = _graph_chunk_blocks(q_pos_ptr, n_rows // H, n_chunks, PAGE, BATCH_P2)
    rows = tl.program_id(0) * RB + tl.arange(0, RB)
    row_ok = rows < n_rows
    local = tl.load(q_pos_ptr + rows // H, mask=row_ok, other=0) // PAGE
    used_chunks = (local + chunk_blocks - 1) // chunk_blocks  # chunks that hold this row's history
    n_valid = used_chunks * tl.minimum(chunk_blocks, KS)
    _select_from_run(cand_ptr, n_chunks * KS, rows, row_ok, n_valid, local, out_ptr, RB, W, TOPK, TOPK_P2, FOLD,
                     DIRECT)


def _batch_p2(work, plan) -> int:
    """BATCH_P2 matters only to graph-mode items; elsewhere a constant, so that the kernels do not compile a
    new variant for every batch size met while serving."""
    return triton.next_power_of_2(max(1, plan.batch_size)) if work.grid_items else 1


def launch_score(work, plan, q_idx, index_k_cache, out, num_warps: int, num_stages: int, tma: bool | None = None):
    # The dot runs in q's dtype when the keys convert to it exactly (same dtype, or fp8 keys: e4m3 values
    # are exact in bf16 and fp16); otherwise (bf16 q with fp16 keys, fp32 anywhere) both go to fp32 and the
    # dot runs in full fp32 precision, so no key loses bits before the product. bf16 queries on fp8 keys run in
    # fp16 instead (`fp8_in_f16`: one exact widening per key, not two through fp32).
    exact_in_q = index_k_cache.dtype == q_idx.dtype or (
        index_k_cache.dtype == torch.float8_e4m3fn and q_idx.dtype in (torch.bfloat16, torch.float16))
    in_f32 = not exact_in_q or q_idx.dtype == torch.float32
    cand = work.candidates if not work.final else out
    # fp32 keys (reference-precision runs) stay on gathered loads: 64 KiB per staged page is too much
    desc = tma_descriptor(index_k_cache, 128, tma) if index_k_cache.element_size() <= 2 else None
    _score_kernel[(work.grid,)](
        q_idx, q_idx.stride(0), q_idx.stride(1),
        index_k_cache, index_k_cache.stride(0), desc if desc is not None else index_k_cache,
        plan.page_table, plan.page_table.stride(0),
        plan.q_pos,
        work.items, work.n_items, work.rows,
        cand, max(1, work.n_chunks),
        out, work.chunk_blocks,
        H=work.heads, D=q_idx.shape[2], PAGE=128,
        BLOCK_M=work.block_m, KS=work.keep,
        TOPK=plan.topk, TOPK_P2=triton.next_power_of_2(plan.topk),
        FINAL=work.final, K_NEEDS_CAST=index_k_cache.dtype != q_idx.dtype, IN_F32=in_f32,
        F16_FOR_FP8=fp8_in_f16(q_idx, index_k_cache, "index"),
        GRID_ITEMS=work.grid_items, BATCH_P2=_batch_p2(work, plan),
        SHARE=work.grid_items and _batch_p2(work, plan) > 1 and os.environ.get("MSA_GRAPH_SHARE", "1") != "0",
        TMA=desc is not None, num_warps=num_warps, num_stages=num_stages,
        **pdl_launch_options(q_idx.device, plan.is_decode and plan.batch_size <= PDL_MAX_BATCH),
    )


# Keys per merge slice, one row per program and one warp: the selection's max-reductions are latency-bound,
# inside one warp they are shuffles only, across warps each adds shared-memory round trips and barriers (a
# 4-row, 8-warp program took ~10 us for 470 candidates a row on an H100). 512 keys = 16 per lane.
MERGE_SLICE = 512


def merge_fold(width: int, topk: int) -> int:
    """Groups of the merge's lower bound (0: off): up to 32 (one per lane of a 512-key slice), and at least the
    TOPK-1 it selects, or the bound would not bound anything. MSA_MERGE_BOUND=0 turns it off (A/B)."""
    fold = min(32, width)
    if topk < 2 or fold < topk - 1 or os.environ.get("MSA_MERGE_BOUND", "1") == "0":
        return 0
    return fold


def launch_merge(work, plan, out):
    n_rows = plan.num_tokens * work.heads
    _merge_kernel[(n_rows,)](
        work.candidates, plan.q_pos, out,
        n_rows, work.n_chunks, work.chunk_blocks,
        H=work.heads, PAGE=128, KS=work.keep, RB=1, W=MERGE_SLICE, FOLD=merge_fold(MERGE_SLICE, plan.topk),
        DIRECT=os.environ.get("MSA_MERGE_DIRECT", "1") != "0",
        TOPK=plan.topk, TOPK_P2=triton.next_power_of_2(plan.topk),
        GRID_ITEMS=work.grid_items, BATCH_P2=_batch_p2(work, plan),
        num_warps=1, **pdl_launch_options(out.device, plan.is_decode and plan.batch_size <= PDL_MAX_BATCH),
    )
