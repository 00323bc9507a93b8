"""Paged block-sparse decode attention (one new token per request), split-K over the selected pages.

Work split. For request b and KV head g the token's <= 16 selected blocks (128 tokens each, one page each)
are cut into units of CHUNK tokens and dealt to NSPLIT programs (`decode_config` holds the measured
choice), so that batch 1 with one KV head still puts 8 programs on the chip. Each program packs the G query
heads of its KV group into one MMA tile (M = G padded to 16; every K/V byte it loads serves all G heads),
runs an online softmax over its units and writes a normalized partial (o, log2-sum-exp). The merge happens
in the same launch: every program takes a ticket from a per-(request, KV head) counter after writing its
partial; the program that draws the last ticket merges the NSPLIT partials by log-sum-exp, writes the
output and resets the counter to zero for the next call. There is no host sync and no allocation that
depends on data, so the call captures into a CUDA graph (the counters and partial buffers are cached in
plan.extras per (device, batch, heads, split) and reused; make the first call before capturing).

Bytes: the kernel reads each selected page's K and V once (4 MiB per request at M3's full 4 KV heads and 16
blocks of bf16) plus the partials (NSPLIT x 16 x 128 x 4 B per request and KV head: 1-3% of that), so large
batches are bytes-bound and batch 1 is latency-bound.

Measured on an H100 80GB HBM3 (Triton 3.6; CUDA graph of 16 calls, each on its own random selection over a
60k context; bytes bound = selected K/V bytes / measured copy bandwidth 2.93 TB/s):
- 64 q / 4 KV heads, bf16: batch 1 10.0 us (8 splits); batch 8 24.6 us (16 splits); batch 32 58-65 us
  (4 splits) = 71-80% of the 46 us bytes bound. A variant of the loop measured 2 splits ~10% faster than 4
  at batch 32 (55-60 us), hence the default of 2 there (not re-timed with this loop). Upstream (same card
  type, its own run): 8.8 / 21.6 / 55.1 us. So this kernel is at parity with upstream, not below its floor:
  batch 1 is a chain of dependent memory latencies (selection -> page table -> K/V -> partial -> ticket ->
  merge) that the split does not shorten.
- 16 q / 1 KV head (TP4): batch 1 8.3 us (8 splits), batch 8 12.2 us, batch 32 24.4 us (16 splits).
- fp8 K/V, 64/4 heads (round 12, CUDA graphs, profile_decode): batch 32 ~41 us on the H100 (36 us on an H200),
  batch 8 on a shared prefix 16 us, batch 1 10.4 us: 1.3x faster than bf16 at batch 32, far from its halved bytes
  bound. The time follows the units a program walks more than their bytes (bf16 and fp8 differ by 1.3x, not 2x);
  a strided-read probe reads one head's pages 1-11% slower at 4 KV heads than at 1, so it is not the cache layout.

fp8 (e4m3) caches hold value / scale. K and V load as int32 words and widen to fp16 by bit operations
(`e4m3_words_to_f16`, exact; the products then run in fp16): Triton's own widening of an 8-bit tile moves it
into the MMA layout byte by byte first. Measured against byte loads in the same calls: batch 8 on a shared prefix
16.1 vs 18.2 us and batch 1 10.4 vs 11.2 us (H100), batch 32 a tie on the H100 (41 us) and 36 vs 38 us on an
H200. Caches whose strides are not whole words keep byte loads (MSA_FP8_WORDS=0 forces them, for A/B). k_scale
folds into the score multiplier and v_scale into the output, each with the words' 2^8.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import BLOCK_SIZE, MSAInputError
from ..plan import MSAPlan
from ._attn_common import (
    E4M3_WORDS_GAIN,
    NEG_BIG,
    cdiv,
    check_attention_inputs,
    e4m3_words,
    e4m3_words_to_f16,
    env_switch,
    fp8_in_f16,
    is_fp8,
    merge_partials,
    next_pow2,
    score_scale,
    to_f16_clamped,
)
from ._pdl import PDL_MAX_BATCH, pdl_launch_options, pdl_prologue


@triton.jit
def _kv_tile(ptr, slot, stride_s, head_off, valid, CHUNK: tl.constexpr, D: tl.constexpr, FP8_WORDS: tl.constexpr):
    """One head's K or V rows [CHUNK, D] at `slot` (rows not `valid` read as 0). FP8_WORDS: `ptr` holds int32
    words of 4 e4m3 values, widened here to fp16 x 2^-8 (e4m3_words_to_f16)."""
    if FP8_WORDS:
        w = tl.arange(0, D // 4)
        words = tl.load(ptr + slot[:, None] * stride_s + head_off + w[None, :], mask=valid[:, None], other=0)
        tile = e4m3_words_to_f16(words, CHUNK, D // 4)
    else:
        c = tl.arange(0, D)
        tile = tl.load(ptr + slot[:, None] * stride_s + head_off + c[None, :], mask=valid[:, None], other=0.0)
    return tile


@triton.jit(do_not_specialize=["stride_pb"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, sel_ptr, page_ptr, seq_ptr, out_ptr, part_o_ptr, part_lse_ptr, ticket_ptr,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_st, stride_sh, stride_pb,
    stride_ot, stride_oh,
    qk_scale, v_scale,
    HKV: tl.constexpr, G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, NSPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr,
    F16_FOR_FP8: tl.constexpr, PDL: tl.constexpr, PAGES_FIRST: tl.constexpr, UP2: tl.constexpr,
    FP8_WORDS: tl.constexpr,
):
    pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    seq_len = tl.load(seq_ptr + b)
    rows = tl.arange(0, GPAD)
    cols = tl.arange(0, D)
    n = tl.arange(0, CHUNK)
    q = tl.load(
        q_ptr + b * stride_qt + (kvh * G + rows)[:, None] * stride_qh + cols[None, :],
        mask=(rows < G)[:, None],
        other=0.0,
    )
    if F16_FOR_FP8 or FP8_WORDS:  # fp8 K/V with the products in fp16 (words widen to fp16; see fp8_in_f16)
        q = to_f16_clamped(q)
    UPB: tl.constexpr = BLOCK // CHUNK  # units per block
    UPP: tl.constexpr = (TOPK * UPB + NSPLIT - 1) // NSPLIT  # units per program
    m_i = tl.full([GPAD], NEG_BIG, tl.float32)
    l_i = tl.zeros([GPAD], tl.float32)
    acc = tl.zeros([GPAD, D], tl.float32)
    sel_row = sel_ptr + b * stride_st + kvh * stride_sh
    if PAGES_FIRST:
        # Every unit's block and page as vectors before the loop: each unit's K/V addresses then depend on
        # registers only, not on two dependent loads (block id, then page) issued in the unit's own step.
        # (Both paths stage K/V through shared memory with cp.async (sm_90a SASS, round 11); the gain is the
        # shorter chain before each unit's copies.)
        ui = tl.arange(0, UP2)
        uj = (split * UPP + ui) // UPB
        blks = tl.load(sel_row + uj, mask=(ui < UPP) & (uj < TOPK), other=-1)
        pages = tl.load(page_ptr + b * stride_pb + tl.maximum(blks, 0), mask=blks >= 0, other=0)
    for u in range(split * UPP, split * UPP + UPP):
        j = u // UPB
        sub = u % UPB
        if PAGES_FIRST:
            mine = ui == u - split * UPP
            blk = tl.sum(tl.where(mine, blks, 0), 0)
            page = tl.sum(tl.where(mine, pages, 0), 0).to(tl.int64)
        else:
            blk = tl.load(sel_row + j, mask=j < TOPK, other=-1)
            page = tl.load(page_ptr + b * stride_pb + tl.maximum(blk, 0)).to(tl.int64)
        tok = sub * CHUNK + n
        valid = (blk >= 0) & (blk * BLOCK + tok < seq_len)
        slot = page * BLOCK + tok
        k = _kv_tile(k_ptr, slot, stride_ks, kvh * stride_kh, valid, CHUNK, D, FP8_WORDS)
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _kv_tile(v_ptr, slot, stride_vs, kvh * stride_vh, valid, CHUNK, D, FP8_WORDS)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc * (v_scale / l_safe)[:, None]
    if NSPLIT == 1:
        tl.store(out_ptr + b * stride_ot + (kvh * G + rows)[:, None] * stride_oh + cols[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=(rows < G)[:, None])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        part = (pid_bh * NSPLIT + split) * GPAD + rows
        tl.store(part_o_ptr + part[:, None] * D + cols[None, :], o)
        tl.store(part_lse_ptr + part, lse)
        if FUSED_MERGE:
            # Every thread's partial stores happen before the barrier; the gpu-scope acq_rel ticket then
            # publishes them to (and, for the last program, acquires everyone else's) before the merge.
            tl.debug_barrier()
            ticket = tl.atomic_add(ticket_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            if ticket == NSPLIT - 1:
                merge_partials(part_o_ptr + pid_bh * NSPLIT * GPAD * D, part_lse_ptr + pid_bh * NSPLIT * GPAD,
                               out_ptr + b * stride_ot + kvh * G * stride_oh, stride_oh, NSPLIT, G, GPAD, D)
                tl.atomic_xchg(ticket_ptr + pid_bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, GPAD: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    merge_partials(part_o_ptr + pid_bh * NSPLIT * GPAD * D, part_lse_ptr + pid_bh * NSPLIT * GPAD,
                   out_ptr + b * stride_ot + kvh * G * stride_oh, stride_oh, NSPLIT, G, GPAD, D)


def decode_config(pairs: int, topk: int) -> tuple[int, int]:
    """(CHUNK tokens per unit, NSPLIT programs per (request, KV head)) for `pairs` (request, KV head) pairs.

    Measured on an H100 (graph replay, 60k context, random pages): whole-page units up to 32 pairs, half
    pages beyond; about 8 splits per pair at 1-8 pairs (fewer programs lose to latency, more lose to the
    merge), 4 at 32-255 pairs (round 2, batch 32 x 4 KV heads: fp8 K/V 39.4 us with 4 splits vs 47.1 with
    2, bf16 equal or better; an older loop had favoured 2), 2 at 256-511, none from 512 pairs up, where the
    grid is full without splitting. MSA_DECODE_CHUNK / MSA_DECODE_NSPLIT override (benchmarks).
    """
    chunk = BLOCK_SIZE if pairs < 64 else 64  # half pages: fewer registers (ptxas), 7% faster at batch 32
    if pairs >= 512:
        nsplit = 1
    elif pairs >= 256:
        nsplit = 2
    elif pairs >= 64:
        # Round 2 (H100, graph replay, batch 32 x 60k): 4 splits vs 2: fp8 K/V 39.4 vs 47.1 us, bf16
        # 55.3 vs 55.3 and 56.8 vs 63.1 us (two input sets); 1 split 71 us.
        nsplit = 4
    elif pairs >= 32:
        nsplit = 4
    else:
        nsplit = 8
    nsplit = min(nsplit, topk)
    chunk = int(os.environ.get("MSA_DECODE_CHUNK", chunk))
    nsplit = int(os.environ.get("MSA_DECODE_NSPLIT", nsplit))
    return chunk, nsplit


def pages_first(pairs: int) -> bool:
    """Look up every unit's block and page before the unit loop (PAGES_FIRST) below 64 (request, KV head) pairs.

    Measured on an H100 (round 10, attention alone in CUDA graphs, 60k, two A/B rounds in one call): B=1
    8.1 / 8.3 us against 8.9 / 9.0 per-unit lookups, B=8 on a shared prefix 17.9 / 17.9 against 19.8 / 18.5; but
    B=32 (128 pairs, half-page units) 58.9 / 59.3 against 54.7 / 55.4. MSA_DECODE_PAGES_FIRST=0/1 overrides (A/B)."""
    return env_switch("MSA_DECODE_PAGES_FIRST", pairs < 64)


def _work_buffers(plan: MSAPlan, device: torch.device, pairs: int, nsplit: int, gpad: int, dim: int):
    """Partials and tickets, allocated once per plan and shape: reuse keeps the call CUDA-graph capturable
    and the tickets' zero state is restored by the kernel itself."""
    key = ("decode_attention", str(device), pairs, nsplit, gpad, dim)
    bufs = plan.extras.get(key)
    if bufs is None:
        bufs = (
            torch.empty(pairs * nsplit * gpad * dim, dtype=torch.float32, device=device),
            torch.empty(pairs * nsplit * gpad, dtype=torch.float32, device=device),
            torch.zeros(pairs, dtype=torch.int32, device=device),
        )
        plan.extras[key] = bufs
    return bufs


def sparse_attention(
    plan: MSAPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    selected: torch.Tensor,
    scale: float | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    *,
    fused_merge: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] (one token per request), selected [B, Hkv, topk] -> [B, Hq, D].

    `out` (optional, q's shape and dtype) receives the result; tests pass a poisoned one."""
    if not plan.is_decode:
        raise MSAInputError("decode attention needs one new token per request (plan.q_lens all 1)")
    hq, hkv, dim = check_attention_inputs(plan, q, k_cache, v_cache, selected, k_scale, v_scale)
    group = hq // hkv
    if group > 64:
        raise MSAInputError(f"a KV group of {group} query heads exceeds the decode tile (64 rows)")
    batch = q.shape[0]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise MSAInputError(f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if batch == 0:
        return out
    fp8 = is_fp8(k_cache)
    topk = selected.shape[2]
    gpad = max(16, next_pow2(group))
    pairs = batch * hkv
    chunk, nsplit = decode_config(pairs, topk)
    units_per_program = cdiv(topk * (BLOCK_SIZE // chunk), nsplit) if nsplit >= 1 else 0
    if chunk not in (16, 32, 64, 128) or units_per_program < 1:
        raise MSAInputError(f"bad decode split: chunk {chunk}, nsplit {nsplit}")
    if fused_merge is None:
        fused_merge = os.environ.get("MSA_DECODE_FUSED_MERGE", "1") != "0"
    part_o, part_lse, tickets = _work_buffers(plan, q.device, pairs, nsplit, gpad, dim)
    qk_scale = score_scale(scale, dim, k_scale, fp8)
    v_mult = float(v_scale) if fp8 else 1.0
    k_arg, v_arg = k_cache, v_cache
    if fp8 and env_switch("MSA_FP8_WORDS", True):  # round 12: 0 loads bytes (A/B)
        k_words, v_words = e4m3_words(k_cache), e4m3_words(v_cache)
        if k_words is not None and v_words is not None:
            k_arg, v_arg = k_words, v_words
            qk_scale, v_mult = qk_scale * E4M3_WORDS_GAIN, v_mult * E4M3_WORDS_GAIN
    _decode_kernel[(pairs, nsplit)](
        q, k_arg, v_arg, selected, plan.page_table, plan.seq_lens, out, part_o, part_lse, tickets,
        q.stride(0), q.stride(1), k_arg.stride(0), k_arg.stride(1), v_arg.stride(0), v_arg.stride(1),
        selected.stride(0), selected.stride(1), plan.page_table.stride(0), out.stride(0), out.stride(1),
        qk_scale, v_mult,
        HKV=hkv, G=group, GPAD=gpad, D=dim, TOPK=topk, BLOCK=BLOCK_SIZE, CHUNK=chunk, NSPLIT=nsplit,
        FUSED_MERGE=fused_merge, F16_FOR_FP8=fp8_in_f16(q, k_cache, "attn"),
        PAGES_FIRST=pages_first(pairs), FP8_WORDS=k_arg is not k_cache,
        UP2=next_pow2(units_per_program), num_warps=4,
        num_stages=int(os.environ.get("MSA_DECODE_STAGES", 3)),
        **pdl_launch_options(q.device, batch <= PDL_MAX_BATCH),
    )
    if nsplit > 1 and not fused_merge:
        _merge_kernel[(pairs,)](part_o, part_lse, out, out.stride(0), out.stride(1),
                                HKV=hkv, G=group, GPAD=gpad, D=dim, NSPLIT=nsplit, num_warps=4,
                                **pdl_launch_options(q.device, batch <= PDL_MAX_BATCH))
    return out
