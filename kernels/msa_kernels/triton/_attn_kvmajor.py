"""KV-block-major pass of the extend kernel (opt-in: `wide_pass="kv_major"`) for tiles that barely overlap.

When the 8 (or 16) queries of a tile picked mostly different blocks, walking their union wastes most of each
MMA (useful fraction ~1/8). Their (query, KV head, slot) selection entries are instead sorted by
(request, KV head, block). Each run of entries that picked the same block is cut into segments of at most
SEGMENT_CHUNKS x QB entries, one program each: the program loads the block's K/V once and walks its entries
QB at a time (QB x G = 128 rows per MMA), wherever in the batch those queries sit. Each (entry, head) leaves a
normalized partial o (q's dtype) and its log2-sum-exp at the entry's sorted position; `merge_kernel` folds a
query's <= 16 partials in one vectorized load.

Cost model: partials are 16 x G x 128 x 2 B per (query, KV head), written and read once: 512 KiB per query at
64 heads, ~1 GiB at 2,048 queries (~0.35 ms at 3 TB/s), against ~0.35-0.45 ms of MMA at 300-400 TFLOP/s. The
query-major wide pass (the default) instead reads ~1 MiB of K/V per query and KV head from L2 (~1.1-1.2 ms at
2,048 random queries, round 7). So this pass pays only if the partial traffic overlaps the math.

The host side (`kv_major_pass`) compacts the wide tiles' entries with one device sync (nonzero): extend and
prefill run eagerly in the serving engine, and the sync lets the pass cost nothing when no tile is wide.

Measured: the first version (one program per QB-entry tile, K/V reloaded per tile, a program looping over its
share of tiles) took 2.90 ms on an H100 with random selections at 2,048 queries on a 60k prefix, every tile sent
here, against 1.62 ms for upstream. Each tile waited on a chain of dependent loads, and there was no loop for
Triton to pipeline. This segment form (round 7) loads K/V once per segment and pipelines the entry -> query-row
loads across the segment's chunks. It is correct on the CPU interpreter and on no GPU yet: its speed is unmeasured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BLOCK_SIZE
from ._attn_common import NEG_BIG, next_pow2

_KEY_SHIFT = 20  # sort key = ((request * Hkv + kv head) << 20) | block: up to 2^20 blocks (134M tokens)
_CHUNK_TOKENS = 2048  # queries per pass: bounds the partials (2048 x Hq x 16 x 128 x 2 B)
SEGMENT_CHUNKS = 8  # MMA tiles of QB entries per program; a run of one block longer than this is split


@triton.jit
def kv_segment_kernel(
    q_ptr, k_ptr, v_ptr, page_ptr, seq_ptr, qpos_ptr, skey_ptr, flat_ptr, seg_start_ptr, seg_len_ptr,
    part_o_ptr, part_lse_ptr, t_base, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pb,
    qk_scale, v_scale,
    HKV: tl.constexpr, G: tl.constexpr, QB: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr,
):
    """One segment: up to SEGMENT_CHUNKS x QB sorted entries that picked the same (request, KV head, block).
    The block's K/V is loaded once; the loop then walks the entries QB at a time (QB x G = M rows per MMA),
    leaving one normalized partial (o, lse2) per entry and head at the entry's sorted position."""
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_len_ptr + seg)
    key = tl.load(skey_ptr + start)
    blk = key & ((1 << KEY_SHIFT) - 1)
    rk = key >> KEY_SHIFT  # request * HKV + kv head
    req = rk // HKV
    head = rk % HKV
    r = tl.arange(0, M)
    r_e = r // G
    r_h = r % G
    cols = tl.arange(0, D)
    n = tl.arange(0, BLOCK)
    seq_len = tl.load(seq_ptr + req)
    slot = tl.load(page_ptr + req * stride_pb + blk).to(tl.int64) * BLOCK + n
    key_pos = blk * BLOCK + n
    in_seq = key_pos < seq_len  # the block may hold a query's own position: slots past the end are never read
    k = tl.load(k_ptr + slot[:, None] * stride_ks + head * stride_kh + cols[None, :], mask=in_seq[:, None], other=0.0)
    v = tl.load(v_ptr + slot[:, None] * stride_vs + head * stride_vh + cols[None, :], mask=in_seq[:, None], other=0.0)
    k = k.to(q_ptr.dtype.element_ty)
    v = v.to(q_ptr.dtype.element_ty)
    for c in range(0, count, QB):
        row_ok = (c + r_e < count) & (r < QB * G)
        e = start + c + r_e
        flat = tl.load(flat_ptr + e, mask=row_ok, other=0)  # (t_local * HKV + head) * TOPK + j
        t = t_base + flat // (HKV * TOPK)
        q = tl.load(q_ptr + t[:, None] * stride_qt + (head * G + r_h)[:, None] * stride_qh + cols[None, :],
                    mask=row_ok[:, None], other=0.0)
        q_pos = tl.load(qpos_ptr + t, mask=row_ok, other=-1)
        s = tl.dot(q, tl.trans(k))
        s = tl.where((key_pos[None, :] <= q_pos[:, None]) & in_seq[None, :], s * qk_scale, float("-inf"))
        m = tl.maximum(tl.max(s, 1), NEG_BIG)
        p = tl.exp2(s - m[:, None])
        l_sum = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v)
        l_safe = tl.where(l_sum > 0, l_sum, 1.0)
        o = o * (v_scale / l_safe)[:, None]
        lse = tl.where(l_sum > 0, m + tl.log2(l_safe), float("-inf"))
        part = e.to(tl.int64) * G + r_h  # partials live at the entry's sorted position
        tl.store(part_o_ptr + part[:, None] * D + cols[None, :], o.to(part_o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def merge_kernel(
    part_o_ptr, part_lse_ptr, pos_ptr, pairs_ptr, out_ptr, t_base, stride_ot, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
):
    """out[t, h*G : (h+1)*G] of one (query, KV head) of a wide tile from its <= TOPK partials."""
    pair = tl.load(pairs_ptr + tl.program_id(0))  # t_local * HKV + h
    t = (t_base + pair // HKV).to(tl.int64)
    h = pair % HKV
    j = tl.arange(0, TOPK_P2)
    rows = tl.arange(0, GPAD)
    # sorted position of each selected slot's partial, -1 if the slot is empty
    pos = tl.load(pos_ptr + pair.to(tl.int64) * TOPK + j, mask=j < TOPK, other=-1)
    ok = (pos >= 0)[:, None] & (rows < G)[None, :]
    base = pos.to(tl.int64)[:, None] * G + rows[None, :]  # [TOPK, GPAD]
    lse = tl.load(part_lse_ptr + base, mask=ok, other=float("-inf"))
    mx = tl.maximum(tl.max(lse, 0), NEG_BIG)
    w = tl.exp2(lse - mx[None, :])
    den = tl.sum(w, 0)
    den = tl.where(den > 0, den, 1.0)
    for c0 in tl.static_range(0, D, DC):
        cols = c0 + tl.arange(0, DC)
        o = tl.load(part_o_ptr + base[:, :, None] * D + cols[None, None, :], mask=ok[:, :, None], other=0.0)
        acc = tl.sum(o.to(tl.float32) * w[:, :, None], 0)
        tl.store(out_ptr + t * stride_ot + (h * G + rows)[:, None] * stride_oh + cols[None, :],
                 (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=(rows < G)[:, None])


def kv_major_pass(plan, q, k_cache, v_cache, selected, tile_of, wide, out, qk_scale, v_scale, qb) -> None:
    """Run the KV-major pass over the entries of wide tiles (wide: int32 [tiles * Hkv]); no-op if none."""
    t_count, hq, dim = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    topk = selected.shape[2]
    gpad = max(16, next_pow2(group))
    seg_cap = qb * SEGMENT_CHUNKS  # entries per program: bounds the imbalance of very popular blocks
    wide_tok = wide.view(-1, hkv)[tile_of.long()] != 0  # [T, Hkv]
    if not bool(wide_tok.any()):  # the one sync: skip everything when all tiles overlapped enough
        return
    dev = q.device
    for lo in range(0, t_count, _CHUNK_TOKENS):
        hi = min(t_count, lo + _CHUNK_TOKENS)
        pairs = wide_tok[lo:hi].flatten().nonzero().squeeze(1)  # t_local * Hkv + h
        if pairs.numel() == 0:
            continue
        sel = selected[lo:hi].reshape(-1, topk)[pairs].long()  # [P, topk]
        ent = sel >= 0
        flat = (pairs[:, None] * topk + torch.arange(topk, device=dev)[None, :])[ent]  # (t_local*Hkv+h)*topk+j
        t_local = flat // (hkv * topk)
        head = (flat // topk) % hkv
        req = plan.q_req[lo:hi].long()[t_local]
        key = ((req * hkv + head) << _KEY_SHIFT) | sel[ent]
        skey, order = torch.sort(key)
        flat = flat[order]
        n_ent = skey.shape[0]
        # runs of equal keys, cut into segments of at most seg_cap entries
        is_start = torch.ones(n_ent, dtype=torch.bool, device=dev)
        is_start[1:] = skey[1:] != skey[:-1]
        run_start = is_start.nonzero().squeeze(1)
        run_end = torch.cat([run_start[1:], torch.tensor([n_ent], device=dev)])
        run_id = torch.cumsum(is_start.long(), 0) - 1
        rank = torch.arange(n_ent, device=dev) - run_start[run_id]
        seg_start = (rank % seg_cap == 0).nonzero().squeeze(1)
        seg_len = torch.clamp(run_end[run_id[seg_start]] - seg_start, max=seg_cap)
        pos = torch.full(((hi - lo) * hkv * topk,), -1, dtype=torch.int32, device=dev)
        pos[flat] = torch.arange(n_ent, dtype=torch.int32, device=dev)
        part_o = torch.empty(n_ent * group * dim, dtype=q.dtype, device=dev)
        part_lse = torch.empty(n_ent * group, dtype=torch.float32, device=dev)
        rows = max(16, next_pow2(qb * group))
        kv_segment_kernel[(seg_start.shape[0],)](
            q, k_cache, v_cache, plan.page_table, plan.seq_lens, plan.q_pos, skey, flat, seg_start.to(torch.int32),
            seg_len.to(torch.int32), part_o, part_lse, lo, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            plan.page_table.stride(0), qk_scale, v_scale,
            HKV=hkv, G=group, QB=qb, M=rows, D=dim, TOPK=topk, BLOCK=BLOCK_SIZE, KEY_SHIFT=_KEY_SHIFT,
            num_warps=8 if rows >= 128 else 4, num_stages=3,
        )
        dc = max(16, min(dim, next_pow2(max(1, 64 * 256 // (next_pow2(topk) * gpad)))))
        merge_kernel[(pairs.shape[0],)](
            part_o, part_lse, pos, pairs.to(torch.int32), out, lo, out.stride(0), out.stride(1),
            HKV=hkv, G=group, GPAD=gpad, D=dim, DC=dc, TOPK=topk, TOPK_P2=next_pow2(topk), num_warps=8,
        )
