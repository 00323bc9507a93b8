"""KV-block-major pass of the extend kernel (opt-in: `wide_pass="kv_major"`) for tiles that barely overlap.

When the 8 (or 16) queries of a tile picked mostly different blocks, walking their union wastes most of each
MMA (useful fraction ~1/8). Their (query, KV head, slot) selection entries are instead sorted by
(request, KV head, block). Each run of entries that picked the same block is cut into segments of at most
SEGMENT_CHUNKS x QB entries, one program each: the program loads the block's K/V once and walks its entries
QB at a time (QB x G rows per MMA, as in the union tile), wherever in the batch those queries sit. Each
(entry, head) leaves a normalized partial o (q's dtype) and its log2-sum-exp at the entry's sorted position;
`merge_kernel` folds a query's <= 16 partials in one vectorized load.

Cost model: partials are 16 x G x 128 x 2 B per (query, KV head), written and read once: 512 KiB per query at
64 heads, ~1 GiB at 2,048 queries (~0.35 ms at 3 TB/s), against ~0.35-0.45 ms of MMA at 300-400 TFLOP/s. The
query-major wide pass (the default) instead reads ~1 MiB of K/V per query and KV head from L2 (~1.1-1.2 ms at
2,048 random queries, round 7). So this pass pays only if the partial traffic overlaps the math.

The host side (`kv_major_pass`) compacts and sorts the wide tiles' entries with five device syncs (nonzero,
one transfer of the chunk bounds), however many chunks there are: extend and prefill run eagerly in the serving
engine, and the first sync lets the pass cost nothing when no tile is wide.

Measured: the first version (one program per QB-entry tile, K/V reloaded per tile, a program looping over its
share of tiles) took 2.90 ms on an H100 with random selections at 2,048 queries on a 60k prefix, every tile sent
here, against 1.62 ms for upstream. Each tile waited on a chain of dependent loads, and there was no loop for
Triton to pipeline. This segment form (round 7) loads K/V once per segment and pipelines the entry -> query-row
loads across the segment's chunks. Round 8 (H200, same inputs, attention kernels per layer): 1,683 us against
1,086 us for the query-major wide pass, and 48.1 against 32.0 ms for prefill 64k. The segments alone (763 us)
beat the wide pass; `merge_kernel` (879 us, ~1.2 TB/s over the partials) is what loses, and even at full HBM
bandwidth the pass would only tie. Kept opt-in for that reason; see benchmarks/results/msa_kernels_r8_notes.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BLOCK_SIZE, MSAInputError
from ._attn_common import NEG_BIG, next_pow2

_KEY_SHIFT = 20  # sort key = ((request * Hkv + kv head) << 20) | block: up to 2^20 blocks (134M tokens)
_CHUNK_TOKENS = 2048  # queries per pass: bounds the partials (2048 x Hq x 16 x 128 x 2 B)
_CHUNK_SHIFT = 44  # sort key's top bits: the chunk, so that each chunk's entries are one contiguous slice
SEGMENT_CHUNKS = 8  # MMA tiles of QB entries per program; a run of one block longer than this is split


@triton.jit
def kv_segment_kernel(
    q_ptr, k_ptr, v_ptr, page_ptr, seq_ptr, qpos_ptr, skey_ptr, flat_ptr, seg_start_ptr, seg_len_ptr,
    part_o_ptr, part_lse_ptr, ent_base, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pb,
    qk_scale, v_scale,
    HKV: tl.constexpr, G: tl.constexpr, QB: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr, CHUNK_SHIFT: tl.constexpr,
):
    """One segment: up to SEGMENT_CHUNKS x QB sorted entries that picked the same (request, KV head, block).
    The block's K/V is loaded once; the loop then walks the entries QB at a time (QB x G = M rows per MMA),
    leaving one normalized partial (o, lse2) per entry and head at the entry's sorted position."""
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    count = tl.load(seg_len_ptr + seg)
    key = tl.load(skey_ptr + start)
    blk = key & ((1 << KEY_SHIFT) - 1)
    rk = (key >> KEY_SHIFT) & ((1 << (CHUNK_SHIFT - KEY_SHIFT)) - 1)  # request * HKV + kv head
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
        flat = tl.load(flat_ptr + e, mask=row_ok, other=0)  # (t * HKV + head) * TOPK + j
        t = (flat // (HKV * TOPK)).to(tl.int64)  # t x stride_qt passes 2^31 beyond ~256k tokens
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
        part = (e - ent_base).to(tl.int64) * G + r_h  # at the entry's sorted position within its chunk
        tl.store(part_o_ptr + part[:, None] * D + cols[None, :], o.to(part_o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def merge_kernel(
    part_o_ptr, part_lse_ptr, pos_ptr, pairs_ptr, out_ptr, ent_base, stride_ot, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, DC: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
):
    """out[t, h*G : (h+1)*G] of one (query, KV head) of a wide tile from its <= TOPK partials."""
    pair = tl.load(pairs_ptr + tl.program_id(0))  # t * HKV + h
    t = (pair // HKV).to(tl.int64)
    h = pair % HKV
    j = tl.arange(0, TOPK_P2)
    rows = tl.arange(0, GPAD)
    # sorted position of each selected slot's partial, -1 if the slot is empty
    pos = tl.load(pos_ptr + pair.to(tl.int64) * TOPK + j, mask=j < TOPK, other=-1)
    ok = (pos >= 0)[:, None] & (rows < G)[None, :]
    base = (pos - ent_base).to(tl.int64)[:, None] * G + rows[None, :]  # [TOPK, GPAD], within the chunk
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
    """Run the KV-major pass over the entries of wide tiles (wide: int32 [tiles * Hkv]); no-op if none.

    All wide entries are sorted once, by (chunk of _CHUNK_TOKENS queries, request and KV head, block); each
    chunk then runs the segment and merge kernels on its contiguous slice, so the partials never exceed one
    chunk's, and the pass takes five device syncs however many chunks there are."""
    t_count, hq, dim = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    topk = selected.shape[2]
    gpad = max(16, next_pow2(group))
    seg_cap = qb * SEGMENT_CHUNKS  # entries per program: bounds the imbalance of very popular blocks
    wide_tok = wide.view(-1, hkv)[tile_of.long()] != 0  # [T, Hkv]
    if not bool(wide_tok.any()):  # sync 1: skip everything when all tiles overlapped enough
        return
    if plan.batch_size * hkv >= 1 << (_CHUNK_SHIFT - _KEY_SHIFT):
        raise MSAInputError(f"{plan.batch_size} requests x {hkv} KV heads overflow the KV-major sort key")
    dev = q.device
    pairs = wide_tok.flatten().nonzero().squeeze(1)  # sync 2; t * Hkv + h, ascending
    sel = selected.reshape(-1, topk)[pairs].long()  # [P, topk]
    ent = sel >= 0
    flat = (pairs[:, None] * topk + torch.arange(topk, device=dev)[None, :])[ent]  # (t * Hkv + h) * topk + j
    t = flat // (hkv * topk)
    head = (flat // topk) % hkv
    req = plan.q_req.long()[t]
    key = ((t // _CHUNK_TOKENS) << _CHUNK_SHIFT) | ((req * hkv + head) << _KEY_SHIFT) | sel[ent]
    skey, order = torch.sort(key)
    flat = flat[order]
    n_ent = skey.shape[0]
    # runs of equal keys (a chunk boundary always starts one), cut into segments of at most seg_cap entries
    is_start = torch.ones(n_ent, dtype=torch.bool, device=dev)
    is_start[1:] = skey[1:] != skey[:-1]
    run_start = is_start.nonzero().squeeze(1)  # sync 3
    run_end = torch.cat([run_start[1:], torch.tensor([n_ent], device=dev)])
    run_id = torch.cumsum(is_start.long(), 0) - 1
    rank = torch.arange(n_ent, device=dev) - run_start[run_id]
    seg_start = (rank % seg_cap == 0).nonzero().squeeze(1)  # sync 4
    seg_len = torch.clamp(run_end[run_id[seg_start]] - seg_start, max=seg_cap).to(torch.int32)
    seg_start32 = seg_start.to(torch.int32)
    pos = torch.full((t_count * hkv * topk,), -1, dtype=torch.int32, device=dev)
    pos[flat] = torch.arange(n_ent, dtype=torch.int32, device=dev)
    # each chunk's slice of the entries, of the segments and of the pairs (sync 5: one transfer for all three)
    n_chunks = (t_count + _CHUNK_TOKENS - 1) // _CHUNK_TOKENS
    first = torch.arange(n_chunks + 1, device=dev)
    ent_b = torch.searchsorted(skey, first << _CHUNK_SHIFT)
    bounds = torch.cat([ent_b, torch.searchsorted(seg_start, ent_b),
                        torch.searchsorted(pairs, first * _CHUNK_TOKENS * hkv)]).tolist()
    ent_b, seg_b, pair_b = bounds[: n_chunks + 1], bounds[n_chunks + 1 : 2 * n_chunks + 2], bounds[2 * n_chunks + 2 :]
    most = max(b - a for a, b in zip(ent_b, ent_b[1:]))
    part_o = torch.empty(most * group * dim, dtype=q.dtype, device=dev)
    part_lse = torch.empty(most * group, dtype=torch.float32, device=dev)
    pairs32 = pairs.to(torch.int32)
    rows = max(16, next_pow2(qb * group))
    dc = max(16, min(dim, next_pow2(max(1, 64 * 256 // (next_pow2(topk) * gpad)))))
    for c in range(n_chunks):
        if seg_b[c + 1] > seg_b[c]:
            kv_segment_kernel[(seg_b[c + 1] - seg_b[c],)](
                q, k_cache, v_cache, plan.page_table, plan.seq_lens, plan.q_pos, skey, flat, seg_start32[seg_b[c]:],
                seg_len[seg_b[c]:], part_o, part_lse, ent_b[c], q.stride(0), q.stride(1),
                k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                plan.page_table.stride(0), qk_scale, v_scale,
                HKV=hkv, G=group, QB=qb, M=rows, D=dim, TOPK=topk, BLOCK=BLOCK_SIZE, KEY_SHIFT=_KEY_SHIFT,
                CHUNK_SHIFT=_CHUNK_SHIFT, num_warps=8 if rows >= 128 else 4, num_stages=3,
            )
        if pair_b[c + 1] > pair_b[c]:
            merge_kernel[(pair_b[c + 1] - pair_b[c],)](
                part_o, part_lse, pos, pairs32[pair_b[c]:], out, ent_b[c], out.stride(0), out.stride(1),
                HKV=hkv, G=group, GPAD=gpad, D=dim, DC=dc, TOPK=topk, TOPK_P2=next_pow2(topk), num_warps=8,
            )
