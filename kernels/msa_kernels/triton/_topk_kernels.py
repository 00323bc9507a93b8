"""Triton kernels of index scoring + block top-k (see `_topk_worklist` for the items they walk).

`_score_kernel`: persistent programs walk the items. For each item it loads the rows' index queries once,
then for every block j of the item's range loads that block's 128 index keys (one page, contiguous slots)
and takes, per row, the max over the block of q . k:
  - on tensor cores (`tl.dot` of the [rows x 128] query tile against the [128 x 128] key block) when the
    item has >= 16 rows (extend tiles, decode requests packed on a shared prefix);
  - on CUDA cores (multiply + reduce over the head dim, a block in sub-blocks) when it has fewer (the 1-4
    index heads of one decode request): no padding of a few rows to an MMA tile.
The token-level score matrix never leaves registers: each row keeps a running top-KS of (block max, id),
replacing its current minimum when a better block arrives (no sort). Finally it either writes those
candidates for the merge kernel, or (one chunk covers the history) selects and writes the output itself.

`_merge_kernel`: per row, the best TOPK-1 of its chunks' candidates plus the local block.

Selection: TOPK-1 passes of argmax over the candidates (TOPK-1 = 15, candidates a few hundred at most
per row in practice), then a 16-wide sort of the ids into ascending order with -1 at the tail.
"""

from __future__ import annotations

import triton
import triton.language as tl

_NO_ID = tl.constexpr(2147483647)  # sorts after every block id; mapped back to -1


@triton.jit
def _select_and_store(scores, ids, local, rows, row_ok, out_ptr,
                      R: tl.constexpr, L: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr):
    """scores/ids [R, L] candidates of R rows -> out[row, :TOPK]: the best TOPK-1 ids (score > -inf) and
    the local block, ascending, -1 padded."""
    col = tl.arange(0, L)
    ocol = tl.arange(0, TOPK_P2)
    chosen = tl.full([R, TOPK_P2], -1, tl.int32)
    for k in tl.static_range(TOPK - 1):
        best = tl.max(scores, 1)
        arg = tl.argmax(scores, 1)
        hit = col[None, :] == arg[:, None]
        best_id = tl.sum(tl.where(hit, ids, 0), 1)
        best_id = tl.where(best > float("-inf"), best_id, -1)
        chosen = tl.where(ocol[None, :] == k, best_id[:, None], chosen)
        scores = tl.where(hit, float("-inf"), scores)
    chosen = tl.where(ocol[None, :] == TOPK - 1, local[:, None], chosen)
    key = tl.where(chosen < 0, _NO_ID, chosen)
    key = tl.sort(key, 1)
    res = tl.where(key == _NO_ID, -1, key)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * TOPK + ocol[None, :]
    tl.store(ptrs, res, mask=row_ok[:, None] & (ocol < TOPK)[None, :])


@triton.jit
def _score_kernel(
    q_ptr, stride_qt, stride_qh,
    kc_ptr, stride_ks,
    pt_ptr, stride_pt,
    q_pos_ptr,
    items_ptr, n_items_ptr, rows_ptr,
    cand_s_ptr, cand_i_ptr, n_chunks,
    out_ptr,
    H: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, KS: tl.constexpr, SUB: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
    USE_DOT: tl.constexpr, FINAL: tl.constexpr, K_NEEDS_CAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_items = tl.load(n_items_ptr)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    kcol = tl.arange(0, KS)
    tok = tl.arange(0, PAGE)
    for item in range(pid, n_items, nprog):
        base = items_ptr + item * 6
        b_ref = tl.load(base)
        j0 = tl.load(base + 1)
        j1 = tl.load(base + 2)
        row_off = tl.load(base + 3)
        n_rows = tl.load(base + 4)
        chunk = tl.load(base + 5)
        row_ok = r < n_rows
        row = tl.load(rows_ptr + row_off + r, mask=row_ok, other=0)
        t = row // H
        h = row % H
        local = tl.load(q_pos_ptr + t, mask=row_ok, other=0) // PAGE
        q = tl.load(q_ptr + t.to(tl.int64)[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        top_s = tl.full([BLOCK_M, KS], float("-inf"), tl.float32)
        top_i = tl.full([BLOCK_M, KS], -1, tl.int32)
        page_row = pt_ptr + b_ref.to(tl.int64) * stride_pt
        next_page = tl.load(page_row + j0, mask=j0 < j1, other=0)
        for j in range(j0, j1):
            # The next block's page id is fetched one iteration ahead: the key load never waits on it.
            slot0 = next_page.to(tl.int64) * PAGE
            next_page = tl.load(page_row + j + 1, mask=j + 1 < j1, other=0)
            if USE_DOT:
                kt = tl.load(kc_ptr + (slot0 + tok)[None, :] * stride_ks + d[:, None])  # [D, PAGE]
                if K_NEEDS_CAST:
                    kt = kt.to(tl.float32).to(q.dtype)
                if IEEE:
                    s = tl.dot(q, kt, input_precision="ieee")
                else:
                    s = tl.dot(q, kt)
                bmax = tl.max(s, 1)
            else:
                # A few rows: CUDA-core dot products, the block in SUB-token pieces to bound registers.
                qf = q.to(tl.float32)
                bmax = tl.full([BLOCK_M], float("-inf"), tl.float32)
                for sb in tl.static_range(PAGE // SUB):
                    st = sb * SUB + tl.arange(0, SUB)
                    k = tl.load(kc_ptr + (slot0 + st)[:, None] * stride_ks + d[None, :]).to(tl.float32)
                    s = tl.sum(qf[:, None, :] * k[None, :, :], 2)  # [BLOCK_M, SUB]
                    bmax = tl.maximum(bmax, tl.max(s, 1))
            # Historical blocks only (j < local block); later blocks of a tile's earlier rows stay out.
            bmax = tl.where(j < local, bmax, float("-inf"))
            worst = tl.min(top_s, 1)
            slot = tl.argmin(top_s, 1)
            better = bmax > worst
            put = better[:, None] & (kcol[None, :] == slot[:, None])
            top_s = tl.where(put, bmax[:, None], top_s)
            top_i = tl.where(put, j, top_i)
        if FINAL:
            _select_and_store(top_s, top_i, local, row, row_ok, out_ptr, BLOCK_M, KS, TOPK, TOPK_P2)
        else:
            off = (row.to(tl.int64)[:, None] * n_chunks + chunk) * KS + kcol[None, :]
            tl.store(cand_s_ptr + off, top_s, mask=row_ok[:, None])
            tl.store(cand_i_ptr + off, top_i, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(
    cand_s_ptr, cand_i_ptr, q_pos_ptr, out_ptr,
    n_rows, n_chunks, chunk_blocks,
    H: tl.constexpr, PAGE: tl.constexpr, KS: tl.constexpr, RB: tl.constexpr, LP: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
):
    rows = tl.program_id(0) * RB + tl.arange(0, RB)
    row_ok = rows < n_rows
    local = tl.load(q_pos_ptr + rows // H, mask=row_ok, other=0) // PAGE
    used_chunks = (local + chunk_blocks - 1) // chunk_blocks  # chunks that hold this row's history
    col = tl.arange(0, LP)
    ok = row_ok[:, None] & ((col // KS)[None, :] < used_chunks[:, None]) & (col < n_chunks * KS)[None, :]
    off = rows.to(tl.int64)[:, None] * (n_chunks * KS) + col[None, :]
    s = tl.load(cand_s_ptr + off, mask=ok, other=float("-inf"))
    ids = tl.load(cand_i_ptr + off, mask=ok, other=-1)
    _select_and_store(s, ids, local, rows, row_ok, out_ptr, RB, LP, TOPK, TOPK_P2)


def launch_score(work, plan, q_idx, index_k_cache, out, sub_tokens: int, num_warps: int, num_stages: int):
    use_dot = work.block_m >= 16
    k_dtype = index_k_cache.dtype
    cast = k_dtype != q_idx.dtype
    cand_s = work.cand_scores if not work.final else out
    cand_i = work.cand_ids if not work.final else out
    _score_kernel[(work.grid,)](
        q_idx, q_idx.stride(0), q_idx.stride(1),
        index_k_cache, index_k_cache.stride(0),
        plan.page_table, plan.page_table.stride(0),
        plan.q_pos,
        work.items, work.n_items, work.rows,
        cand_s, cand_i, max(1, work.n_chunks),
        out,
        H=work.heads, D=q_idx.shape[2], PAGE=128,
        BLOCK_M=work.block_m, KS=work.keep, SUB=sub_tokens,
        TOPK=plan.topk, TOPK_P2=triton.next_power_of_2(plan.topk),
        USE_DOT=use_dot, FINAL=work.final, K_NEEDS_CAST=cast, IEEE=q_idx.dtype.itemsize == 4,
        num_warps=num_warps, num_stages=num_stages,
    )


def launch_merge(work, plan, out):
    n_rows = plan.num_tokens * work.heads
    lp = triton.next_power_of_2(work.n_chunks * work.keep)
    rb = max(1, min(64, 2048 // lp))
    _merge_kernel[(triton.cdiv(n_rows, rb),)](
        work.cand_scores, work.cand_ids, plan.q_pos, out,
        n_rows, work.n_chunks, work.chunk_blocks,
        H=work.heads, PAGE=128, KS=work.keep, RB=rb, LP=lp,
        TOPK=plan.topk, TOPK_P2=triton.next_power_of_2(plan.topk),
        num_warps=4 if lp * rb <= 2048 else 8,
    )
