"""KV-block-major pass of the extend kernel: for query tiles whose selections barely overlap.

When the 8 (or 16) queries of a tile picked mostly different blocks, walking their union wastes most of each
MMA (useful fraction ~1/8). Their (query, KV head, slot) selection entries are instead sorted by
(request, KV head, block): runs of entries that picked the same block become the rows of one tile (QB
entries x G heads = 128 rows), so each block's K/V is loaded for up to QB queries at once, wherever in the
batch they sit. Each program takes QB consecutive sorted entries; the distinct blocks among them (usually 1,
at a run boundary 2) are processed one after another with the other rows masked. Each (entry, head) leaves a
normalized partial o (q's dtype) and its log2-sum-exp; `merge_kernel` folds a query's <= 16 partials.

Cost model (why this is only the fallback): partials are 16 x G x 128 x 2 B per (query, KV head) written
and read once, 512 KiB per query at 64 heads: HBM traffic comparable to the MMA time at 400 TFLOP/s, so it
wins over the union walk only when the union is several times wider than 16 blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._attn_common import NEG_BIG


@triton.jit
def kv_major_kernel(
    q_ptr, k_ptr, v_ptr, page_ptr, seq_ptr, qpos_ptr, skey_ptr, perm_ptr, part_o_ptr, part_lse_ptr,
    n_entries, t_base, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_pb,
    qk_scale, v_scale,
    HKV: tl.constexpr, G: tl.constexpr, QB: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    TOPK: tl.constexpr, BLOCK: tl.constexpr, KEY_SHIFT: tl.constexpr,
):
    pid = tl.program_id(0)
    e = pid * QB + tl.arange(0, QB)
    e_ok = e < n_entries
    keys = tl.load(skey_ptr + e, mask=e_ok, other=-1)
    keys = tl.where(keys < 0, 1 << 62, keys)  # padding and "not ours" entries sort as a huge key
    first = tl.min(keys, 0)
    if first < (1 << 62):
        r = tl.arange(0, M)
        r_e = r // G
        r_h = r % G
        r_key = tl.load(skey_ptr + pid * QB + r_e, mask=(pid * QB + r_e) < n_entries, other=-1)
        r_key = tl.where(r_key < 0, 1 << 62, r_key)
        flat = tl.load(perm_ptr + pid * QB + r_e, mask=(pid * QB + r_e) < n_entries, other=0)  # (t*HKV+h)*TOPK+j
        t = t_base + flat // (HKV * TOPK)
        kvh = (flat // TOPK) % HKV
        cols = tl.arange(0, D)
        n = tl.arange(0, BLOCK)
        q = tl.load(q_ptr + t[:, None] * stride_qt + (kvh * G + r_h)[:, None] * stride_qh + cols[None, :],
                    mask=(r_key < (1 << 62))[:, None], other=0.0)
        q_pos = tl.load(qpos_ptr + t)
        cur = first
        n_distinct = tl.sum(((keys < (1 << 62)) & (keys != tl.min(keys, 0))).to(tl.int32), 0)  # upper bound
        for _ in range(0, n_distinct + 1):
            if cur < (1 << 62):
                blk = cur & ((1 << KEY_SHIFT) - 1)
                rk = cur >> KEY_SHIFT  # req * HKV + kv head
                req = rk // HKV
                head = rk % HKV
                seq_len = tl.load(seq_ptr + req)
                slot = tl.load(page_ptr + req * stride_pb + blk).to(tl.int64) * BLOCK + n
                key_pos = blk * BLOCK + n
                in_seq = key_pos < seq_len
                k = tl.load(k_ptr + slot[:, None] * stride_ks + head * stride_kh + cols[None, :],
                            mask=in_seq[:, None], other=0.0)
                v = tl.load(v_ptr + slot[:, None] * stride_vs + head * stride_vh + cols[None, :],
                            mask=in_seq[:, None], other=0.0)
                mine = r_key == cur
                s = tl.dot(q, tl.trans(k.to(q.dtype)))
                visible = mine[:, None] & (key_pos[None, :] <= q_pos[:, None])
                s = tl.where(visible, s * qk_scale, float("-inf"))
                m = tl.maximum(tl.max(s, 1), NEG_BIG)
                p = tl.exp2(s - m[:, None])
                l_sum = tl.sum(p, 1)
                o = tl.dot(p.to(q.dtype), v.to(q.dtype))
                l_safe = tl.where(l_sum > 0, l_sum, 1.0)
                o = o * (v_scale / l_safe)[:, None]
                lse = tl.where(l_sum > 0, m + tl.log2(l_safe), float("-inf"))
                part = flat.to(tl.int64) * G + r_h
                tl.store(part_o_ptr + part[:, None] * D + cols[None, :], o.to(part_o_ptr.dtype.element_ty),
                         mask=mine[:, None])
                tl.store(part_lse_ptr + part, lse, mask=mine)
                cur = tl.min(tl.where(keys > cur, keys, 1 << 62), 0)


@triton.jit
def merge_kernel(
    part_o_ptr, part_lse_ptr, sel_ptr, wide_ptr, tile_of_ptr, out_ptr, t_base,
    stride_st, stride_sh, stride_ot, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
):
    """out[t, kvh*G : (kvh+1)*G] from the KV-major partials of query t (only for queries of wide tiles)."""
    t_local = tl.program_id(0)
    kvh = tl.program_id(1)
    t = t_base + t_local
    tile = tl.load(tile_of_ptr + t)
    if tl.load(wide_ptr + tile * HKV + kvh) != 0:
        rows = tl.arange(0, GPAD)
        cols = tl.arange(0, D)
        m = tl.full([GPAD], NEG_BIG, tl.float32)
        l_sum = tl.zeros([GPAD], tl.float32)
        acc = tl.zeros([GPAD, D], tl.float32)
        for j in range(TOPK):
            blk = tl.load(sel_ptr + t.to(tl.int64) * stride_st + kvh * stride_sh + j)
            if blk >= 0:
                part = ((t_local.to(tl.int64) * HKV + kvh) * TOPK + j) * G + rows
                lse = tl.load(part_lse_ptr + part, mask=rows < G, other=float("-inf"))
                o = tl.load(part_o_ptr + part[:, None] * D + cols[None, :], mask=(rows < G)[:, None], other=0.0)
                m_new = tl.maximum(m, lse)
                alpha = tl.exp2(m - m_new)
                w = tl.exp2(lse - m_new)
                acc = acc * alpha[:, None] + o.to(tl.float32) * w[:, None]
                l_sum = l_sum * alpha + w
                m = m_new
        res = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + (kvh * G + rows)[:, None] * stride_oh + cols[None, :],
                 res.to(out_ptr.dtype.element_ty), mask=(rows < G)[:, None])
