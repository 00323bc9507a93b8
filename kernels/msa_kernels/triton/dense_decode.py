"""Dense decode attention that reads a prefix shared by several requests once per batch (M3's layers 0-2).

Why: in agentic traffic the requests of a decode batch share a long cached prefix (8 sessions on one 60k-token
system prompt + tools). SGLang's Triton decode kernel reads every request's K/V on its own, so one dense layer
at batch 8 reads the prefix 8 times: ~1 GB a step at 60k, 0.7 ms on an H200 (round 14's trace,
`served_step_split_h200_r14_fused_on.md`), more than the seven sparse layers together.

How: every request's keys are cut into chunks of CHUNK tokens (chunk c = keys c*CHUNK .. (c+1)*CHUNK - 1).
1. `_leaders_kernel` finds, for each complete chunk of each request, the first request whose chunk lists the
   very same cache slots (the radix cache hands shared prefixes out as the same slots); a request's last,
   partial chunk leads itself. Comparing the chunks' first slots first makes unshared pairs cost one load.
2. `_chunk_kernel`: the leader of a chunk loads each K/V block of it once and applies it to the queries of
   every member (request) of the chunk: the G query heads of a KV group of up to MT members form one MMA tile
   of MT*G rows (M3: 16 heads x 8 members = 128 rows). It writes one normalized partial (o, log2-sum-exp) per
   member, head and chunk. Other requests' programs skip the chunk.
3. `_merge_kernel` combines each request's chunk partials by log-sum-exp.
No host sync, no allocation that depends on data: the call captures into a CUDA graph. Grids depend on the
batch size and `max_len` only (the longest context the caller can send; the plugin passes the server's
context length), and programs loop over chunks, so unused chunks cost a loop bound, not a launch.

Bytes per step at batch B on a P-token shared prefix plus private tails T_r: P + sum(T_r) tokens of K/V instead
of B*P + sum(T_r), plus the partials (B x Hq x chunks x (D + 1) fp32 written and read once).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import MSAInputError

DEFAULT_CHUNK = 1024  # tokens: 59 chunks x 4 KV heads on a 60k prefix, enough programs for 132 SMs at batch 1
MAX_CHUNKS = 128  # partial buffers hold at most this many chunks per request: longer contexts get longer chunks
PROGRAMS_PER_REQUEST = 64  # chunk programs per (request, KV head); each loops over every 64th chunk
TILE_ROWS = 128  # query rows of one MMA tile: members x heads per group
BLOCK_N = 128  # keys per step of a chunk (H100, round 15: 128 x 3 stages beat 64 on private and batch-32 chunks)


def chunk_size(max_len: int) -> int:
    """The chunk (a power of two, at least DEFAULT_CHUNK) that keeps `max_len` within MAX_CHUNKS chunks."""
    need = max(1, triton.cdiv(max_len, MAX_CHUNKS))
    return max(DEFAULT_CHUNK, triton.next_power_of_2(need))


@triton.jit
def _leaders_kernel(kv_indptr, kv_indices, leader, B, NCH, CHUNK: tl.constexpr, NPROG: tl.constexpr,
                    CMP: tl.constexpr, BPAD: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    start_r = tl.load(kv_indptr + r).to(tl.int64)
    len_r = (tl.load(kv_indptr + r + 1) - tl.load(kv_indptr + r)).to(tl.int32)
    # Every earlier request's bounds at once: one round of loads per chunk, not one chain per candidate.
    s_ids = tl.arange(0, BPAD)
    earlier = s_ids < r
    start_s = tl.load(kv_indptr + s_ids, mask=earlier, other=0).to(tl.int64)
    len_s = (tl.load(kv_indptr + s_ids + 1, mask=earlier, other=0) - start_s).to(tl.int32)
    for c in range(pid, NCH, NPROG):
        lo = c * CHUNK
        lead = r * 0 - 1
        if lo < len_r:
            lead = r
            if lo + CHUNK <= len_r:
                # Candidates: earlier requests with a complete chunk c that starts on the same slot; the radix
                # cache makes that almost always a shared chunk, which the full comparison then confirms.
                first_r = tl.load(kv_indices + start_r + lo)
                full = earlier & (lo + CHUNK <= len_s)
                firsts = tl.load(kv_indices + start_s + lo, mask=full, other=-1)
                todo = full & (firsts == first_r)
                for _ in range(0, tl.sum(todo.to(tl.int32), 0)):
                    if lead == r:
                        s = tl.min(tl.where(todo, s_ids, BPAD), 0)
                        base_s = tl.sum(tl.where(s_ids == s, start_s, 0), 0)
                        diff = r * 0
                        for t in range(0, CHUNK, CMP):
                            offs = lo + t + tl.arange(0, CMP)
                            a = tl.load(kv_indices + start_r + offs)
                            b = tl.load(kv_indices + base_s + offs)
                            diff += tl.sum((a != b).to(tl.int32))
                        if diff == 0:
                            lead = s
                        todo = todo & (s_ids != s)
        tl.store(leader + c * B + r, lead)


@triton.jit
def _attend_tile(Q, K, V, kv_indices, PO, PL, qk_scale, start_r, lo, hi, h, c, t0, n_members, is_member, rank, s_ids,
                 stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_ob, stride_oh, stride_oc, stride_lb, stride_lh,
                 G: tl.constexpr, MT: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Members t0 .. t0+MT-1 (by rank) of chunk c: their G heads of KV head h as one tile of MT*G query rows,
    over keys lo .. hi-1 of the leader's slot list; writes each member's normalized partial and log2-sum-exp."""
    offs_d = tl.arange(0, D)
    heads = h * G + tl.arange(0, G)
    # The members of this tile, by rank: request ids [MT] (0 where the tile runs past the members).
    j = t0 + tl.arange(0, MT)
    pick = (rank[None, :] == j[:, None]) & is_member[None, :]
    req = tl.sum(tl.where(pick, s_ids[None, :], 0), 1).to(tl.int64)
    valid = j < n_members
    q_ptr = Q + req[:, None, None] * stride_qb + heads[None, :, None] * stride_qh + offs_d[None, None, :]
    q = tl.reshape(tl.load(q_ptr, mask=valid[:, None, None], other=0.0), (MT * G, D))
    m_i = tl.full((MT * G,), float("-inf"), tl.float32)
    l_i = tl.zeros((MT * G,), tl.float32)
    acc = tl.zeros((MT * G, D), tl.float32)
    for n0 in range(lo, hi, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        in_range = offs_n < hi
        slots = tl.load(kv_indices + start_r + offs_n, mask=in_range, other=0).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=in_range[:, None],
                    other=0.0)
        v = tl.load(V + slots[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=in_range[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o = tl.reshape(acc / l_i[:, None], (MT, G, D))
    lse = tl.reshape(m_i + tl.log2(l_i), (MT, G))
    o_ptr = PO + req[:, None, None] * stride_ob + heads[None, :, None] * stride_oh + c * stride_oc + offs_d[None, None, :]
    tl.store(o_ptr, o, mask=valid[:, None, None])
    tl.store(PL + req[:, None] * stride_lb + heads[None, :] * stride_lh + c, lse, mask=valid[:, None])


@triton.jit
def _chunk_kernel(Q, K, V, kv_indptr, kv_indices, leader, PO, PL, qk_scale, B,
                  stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                  stride_ob, stride_oh, stride_oc, stride_lb, stride_lh, NCH,
                  CHUNK: tl.constexpr, NPROG: tl.constexpr, G: tl.constexpr, MT: tl.constexpr, MT1: tl.constexpr,
                  BPAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    start_r = tl.load(kv_indptr + r).to(tl.int64)
    len_r = (tl.load(kv_indptr + r + 1) - tl.load(kv_indptr + r)).to(tl.int32)
    # A request longer than max_len (a caller's bug) must not index past the sharing map or the partials.
    n_chunks = tl.minimum(tl.cdiv(len_r, CHUNK), NCH)
    s_ids = tl.arange(0, BPAD)
    for c in range(pid, n_chunks, NPROG):
        if tl.load(leader + c * B + r) == r:
            leads = tl.load(leader + c * B + s_ids, mask=s_ids < B, other=-2)
            is_member = leads == r
            rank = tl.cumsum(is_member.to(tl.int32), 0) - 1
            n_members = tl.sum(is_member.to(tl.int32), 0)
            lo = c * CHUNK
            hi = tl.minimum(lo + CHUNK, len_r)
            if n_members == 1:
                # A chunk no other request shares (private tails, unshared batches): the smallest tile, so that
                # these chunks stay bound by their bytes, not by MMA rows of absent members.
                _attend_tile(Q, K, V, kv_indices, PO, PL, qk_scale, start_r, lo, hi, h, c, 0, n_members, is_member,
                             rank, s_ids, stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_ob, stride_oh, stride_oc, stride_lb, stride_lh, G=G, MT=MT1, D=D, BLOCK=BLOCK)
            else:
                for t0 in range(0, n_members, MT):
                    _attend_tile(Q, K, V, kv_indices, PO, PL, qk_scale, start_r, lo, hi, h, c, t0, n_members,
                                 is_member, rank, s_ids, stride_qb, stride_qh, stride_kt, stride_kh, stride_vt,
                                 stride_vh, stride_ob, stride_oh, stride_oc, stride_lb, stride_lh, G=G, MT=MT, D=D,
                                 BLOCK=BLOCK)


@triton.jit
def _merge_kernel(PO, PL, Out, kv_indptr, stride_ob, stride_oh, stride_oc, stride_lb, stride_lh,
                  stride_outb, stride_outh, NCH, CHUNK: tl.constexpr, CB: tl.constexpr, D: tl.constexpr):
    # One (request, query head) per program, CB chunks per step: a few dependent loads instead of one per chunk.
    r = tl.program_id(0)
    hd = tl.program_id(1)
    length = (tl.load(kv_indptr + r + 1) - tl.load(kv_indptr + r)).to(tl.int32)
    n_chunks = tl.minimum(tl.cdiv(length, CHUNK), NCH)
    offs_d = tl.arange(0, D)
    m = tl.max(tl.full((CB,), float("-inf"), tl.float32), 0)
    l_sum = tl.sum(tl.zeros((CB,), tl.float32), 0)
    acc = tl.zeros((D,), tl.float32)
    for c0 in range(0, n_chunks, CB):
        cs = c0 + tl.arange(0, CB)
        live = cs < n_chunks
        lse = tl.load(PL + r * stride_lb + hd * stride_lh + cs, mask=live, other=float("-inf"))
        o = tl.load(PO + r * stride_ob + hd * stride_oh + cs[:, None] * stride_oc + offs_d[None, :],
                    mask=live[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        a = tl.exp2(m - m_new)
        w = tl.where(live, tl.exp2(lse - m_new), 0.0)
        acc = acc * a + tl.sum(o * w[:, None], 0)
        l_sum = l_sum * a + tl.sum(w, 0)
        m = m_new
    out = tl.where(l_sum > 0, acc / tl.maximum(l_sum, 1e-30), 0.0)
    tl.store(Out + r * stride_outb + hd * stride_outh + offs_d, out.to(Out.dtype.element_ty))


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indptr: torch.Tensor,
           kv_indices: torch.Tensor) -> tuple[int, int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise MSAInputError(f"q must be [B, Hq, D] and the caches [slots, Hkv, D] alike; got q {tuple(q.shape)}, "
                            f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    batch, hq, dim = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[2] != dim or hq % hkv:
        raise MSAInputError(f"{hq} query heads of dim {dim} do not fit {hkv} KV heads of dim {k_cache.shape[2]}")
    group = hq // hkv
    if group & (group - 1) or group > TILE_ROWS or dim & (dim - 1) or dim < 16:
        raise MSAInputError(f"query heads per KV head ({group}) and head dim ({dim}) must be powers of two "
                            f"(group <= {TILE_ROWS}, dim >= 16)")
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise MSAInputError(f"q and the caches must share one 16-bit dtype; got {q.dtype}, {k_cache.dtype}, "
                            f"{v_cache.dtype}")
    if kv_indptr.dtype not in (torch.int32, torch.int64) or kv_indices.dtype not in (torch.int32, torch.int64):
        raise MSAInputError("kv_indptr and kv_indices must be int32 or int64")
    if kv_indptr.numel() < batch + 1:
        raise MSAInputError(f"kv_indptr has {kv_indptr.numel()} entries for {batch} requests (needs batch + 1)")
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise MSAInputError("q and the caches must be contiguous in their last dimension")
    return batch, hq, hkv, dim


def dense_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float | None,
    max_len: int,
    out: torch.Tensor | None = None,
    chunk: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over each request's slots `kv_indices[kv_indptr[r]:kv_indptr[r+1]]`
    (at most `max_len` of them: keys past the last chunk that `max_len` spans are ignored, never read or written
    out of bounds), reading chunks that requests share once. Returns [B, Hq, D] (into `out` if
    given). `workspace` = (leader int32 [chunks, B], partial o fp32 [B, Hq, chunks, D], partial lse fp32
    [B, Hq, chunks]) lets tests poison the buffers; they are allocated per call otherwise."""
    batch, hq, hkv, dim = _check(q, k_cache, v_cache, kv_indptr, kv_indices)
    group = hq // hkv
    chunk = chunk or chunk_size(max_len)
    if chunk < BLOCK_N or chunk & (chunk - 1):
        raise MSAInputError(f"chunk must be a power of two >= {BLOCK_N}, got {chunk}")
    nch = max(1, triton.cdiv(max_len, chunk))
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if workspace is None:
        leader = torch.empty(nch, batch, dtype=torch.int32, device=q.device)
        po = torch.empty(batch, hq, nch, dim, dtype=torch.float32, device=q.device)
        pl = torch.empty(batch, hq, nch, dtype=torch.float32, device=q.device)
    else:
        leader, po, pl = workspace
        if leader.shape != (nch, batch) or po.shape != (batch, hq, nch, dim) or pl.shape != (batch, hq, nch):
            raise MSAInputError(f"workspace shapes {[tuple(t.shape) for t in workspace]} do not fit "
                                f"{nch} chunks x {batch} requests x {hq} heads")
    nprog = min(nch, PROGRAMS_PER_REQUEST)
    bpad = max(2, triton.next_power_of_2(batch))
    _leaders_kernel[(nprog, batch)](kv_indptr, kv_indices, leader, batch, nch, CHUNK=chunk, NPROG=nprog,
                                    CMP=min(chunk, 256), BPAD=bpad)
    one = max(1, 16 // group)  # tl.dot needs 16 rows
    members = max(one, min(triton.next_power_of_2(batch), TILE_ROWS // group))
    block = int(os.environ.get("MSA_DENSE_BLOCK_N", BLOCK_N))  # A/B knob for benchmarks
    scale = dim ** -0.5 if scale is None else scale
    log2e = 1.4426950408889634
    _chunk_kernel[(nprog, batch, hkv)](
        q, k_cache, v_cache, kv_indptr, kv_indices, leader, po, pl, scale * log2e, batch,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        po.stride(0), po.stride(1), po.stride(2), pl.stride(0), pl.stride(1), nch,
        CHUNK=chunk, NPROG=nprog, G=group, MT=members, MT1=one, BPAD=bpad, D=dim,
        BLOCK=block, num_warps=8 if members * group >= 128 else 4, num_stages=int(os.environ.get("MSA_DENSE_STAGES", 3)),
    )
    _merge_kernel[(batch, hq)](po, pl, out, kv_indptr, po.stride(0), po.stride(1), po.stride(2), pl.stride(0),
                               pl.stride(1), out.stride(0), out.stride(1), nch, CHUNK=chunk, CB=32, D=dim)
    return out
