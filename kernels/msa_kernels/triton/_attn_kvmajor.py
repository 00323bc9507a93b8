"""KV-block-major pass of the extend kernel (opt-in: `wide_pass="kv_major"`) for tiles that barely overlap.

When the 8 (or 16) queries of a tile picked mostly different blocks, walking their union wastes most of each
MMA (useful fraction ~1/8). Their (query, KV head, slot) selection entries are instead sorted by
(request, KV head, block) and cut into runs of at most QB entries that picked the same block: each run is
one tile of QB x G = 128 rows, so each block's K/V is loaded for up to QB queries at once, wherever in the
batch they sit. Each (entry, head) leaves a normalized partial o (q's dtype) and its log2-sum-exp, stored at
the entry's sorted position; `merge_kernel` folds a query's <= 16 partials in one vectorized load.

Cost model (why this is only the fallback): partials are 16 x G x 128 x 2 B per (query, KV head), written
and read once: 512 KiB per query at 64 heads, HBM traffic comparable to the MMA time at 400 TFLOP/s, so it
beats the union walk only when the union is several times wider than 16 blocks.

The host side (`kv_major_pass`) compacts the wide tiles' entries with one device sync (nonzero): extend and
prefill run eagerly in the serving engine, and the sync lets the pass cost nothing when no tile is wide.

Measured on an H100 (64 q / 4 KV heads, T = 2,048 on a 60k prefix, every tile sent here): 2.90 ms with
random selections and 2.81 ms with high-overlap ones, against 2.60 ms and 0.48 ms for the union walk and
1.62 ms for upstream's query-major kernel; hence not the default. Not yet profiled: ptxas reports the tile
kernel at 255 registers with ~512 B of spills per thread, and each tile waits on a chain of dependent loads
(tile start -> entries -> gathered Q rows); those are the first suspects.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BLOCK_SIZE
from ._attn_common import NEG_BIG, cdiv, next_pow2

_KEY_SHIFT = 20  # sort key = ((request * Hkv + kv head) << 20) | block: up to 2^20 blocks (134M tokens)
_CHUNK_TOKENS = 2048  # queries per pass: bounds the partials (2048 x Hq x 16 x 128 x 2 B)
_PROGRAMS = 528  # 4 per SM: each loops over its share of run tiles, so loads of one overlap another's math


@triton.jit
def kv_tile_kernel(
    q_ptr, k_ptr, v_ptr, page_ptr, seq_ptr, qpos_ptr, skey_ptr, flat_ptr, tile_start_ptr, tile_len_ptr,
    part_o_ptr, part_lse_ptr, n_tiles, tpp, t_base, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs,
    stride_vh, stride_pb, qk_scale, v_scale,
    HKV: tl.constexpr, G: tl.constexpr, QB: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, M)
    r_e = r // G
    r_h = r % G
    cols = tl.arange(0, D)
    n = tl.arange(0, BLOCK)
    for it in range(pid * tpp, tl.minimum(pid * tpp + tpp, n_tiles)):
        start = tl.load(tile_start_ptr + it)
        count = tl.load(tile_len_ptr + it)
        key = tl.load(skey_ptr + start)
        blk = key & ((1 << KEY_SHIFT) - 1)
        rk = key >> KEY_SHIFT  # request * HKV + kv head
        req = rk // HKV
        head = rk % HKV
        row_ok = (r_e < count) & (r < QB * G)
        flat = tl.load(flat_ptr + start + r_e, mask=row_ok, other=0)  # (t_local * HKV + head) * TOPK + j
        t = t_base + flat // (HKV * TOPK)
        q = tl.load(q_ptr + t[:, None] * stride_qt + (head * G + r_h)[:, None] * stride_qh + cols[None, :],
                    mask=row_ok[:, None], other=0.0)
        q_pos = tl.load(qpos_ptr + t, mask=row_ok, other=-1)
        seq_len = tl.load(seq_ptr + req)
        slot = tl.load(page_ptr + req * stride_pb + blk).to(tl.int64) * BLOCK + n
        key_pos = blk * BLOCK + n
        in_seq = key_pos < seq_len
        k = tl.load(k_ptr + slot[:, None] * stride_ks + head * stride_kh + cols[None, :],
                    mask=in_seq[:, None], other=0.0)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + head * stride_vh + cols[None, :],
                    mask=in_seq[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = tl.where(key_pos[None, :] <= q_pos[:, None], s * qk_scale, float("-inf"))
        m = tl.maximum(tl.max(s, 1), NEG_BIG)
        p = tl.exp2(s - m[:, None])
        l_sum = tl.sum(p, 1)
        o = tl.dot(p.to(q.dtype), v.to(q.dtype))
        l_safe = tl.where(l_sum > 0, l_sum, 1.0)
        o = o * (v_scale / l_safe)[:, None]
        lse = tl.where(l_sum > 0, m + tl.log2(l_safe), float("-inf"))
        part = (start + r_e).to(tl.int64) * G + r_h  # partials live at the entry's sorted position
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
        # runs of equal keys, cut into tiles of at most QB entries
        is_start = torch.ones(n_ent, dtype=torch.bool, device=dev)
        is_start[1:] = skey[1:] != skey[:-1]
        run_start = is_start.nonzero().squeeze(1)
        run_end = torch.cat([run_start[1:], torch.tensor([n_ent], device=dev)])
        run_id = torch.cumsum(is_start.long(), 0) - 1
        rank = torch.arange(n_ent, device=dev) - run_start[run_id]
        tile_start = (rank % qb == 0).nonzero().squeeze(1)
        tile_len = torch.clamp(run_end[run_id[tile_start]] - tile_start, max=qb)
        n_tiles = tile_start.shape[0]
        pos = torch.full(((hi - lo) * hkv * topk,), -1, dtype=torch.int32, device=dev)
        pos[flat] = torch.arange(n_ent, dtype=torch.int32, device=dev)
        part_o = torch.empty(n_ent * group * dim, dtype=q.dtype, device=dev)
        part_lse = torch.empty(n_ent * group, dtype=torch.float32, device=dev)
        tpp = cdiv(n_tiles, _PROGRAMS)
        rows = max(16, next_pow2(qb * group))
        kv_tile_kernel[(cdiv(n_tiles, tpp),)](
            q, k_cache, v_cache, plan.page_table, plan.seq_lens, plan.q_pos, skey, flat, tile_start,
            tile_len.to(torch.int32), part_o, part_lse, n_tiles, tpp, lo, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
            plan.page_table.stride(0), qk_scale, v_scale,
            HKV=hkv, G=group, QB=qb, M=rows, D=dim, TOPK=topk, BLOCK=BLOCK_SIZE, KEY_SHIFT=_KEY_SHIFT,
            num_warps=8 if rows >= 128 else 4, num_stages=2,
        )
        dc = max(16, min(dim, next_pow2(max(1, 64 * 256 // (next_pow2(topk) * gpad)))))
        merge_kernel[(pairs.shape[0],)](
            part_o, part_lse, pos, pairs.to(torch.int32), out, lo, out.stride(0), out.stride(1),
            HKV=hkv, G=group, GPAD=gpad, D=dim, DC=dc, TOPK=topk, TOPK_P2=next_pow2(topk), num_warps=8,
        )
