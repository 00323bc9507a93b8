"""Block-sparse extend/prefill attention that loads each selected K/V block once per tile of queries.

Why this shape (numbers for M3 on one H100: 2,048 new tokens, 16 blocks x 128 keys, D = 128):
- Per (query, KV head) the useful work is 16 blocks x 128 keys x 16 heads x 4 x 128 = 16.8 MFLOP over 1 MiB
  of bf16 K/V: 16 FLOP/B if every query reloads its blocks (upstream's query-major kernel), which pins it
  to L2 bandwidth (~5.5 TB/s x 16 = ~88 TFLOP/s, what upstream measures). Reaching 400 TFLOP/s needs each
  K/V tile reused by >= 8 queries' rows while it sits in shared memory.
- The literal KV-block-major form (a program per block, gathering every query that picked it) gets that
  reuse for any selection, but each (query, head, block) then leaves a partial (o, lse) that a second pass
  merges: 16 partials x 64 heads x 128 x 2 B = 256 KiB per query even in bf16, i.e. 1 GiB of HBM traffic
  (write + read) at T = 2,048, ~0.35 ms at 3 TB/s: already more than the 0.34 ms that 400 TFLOP/s allows
  for the whole 137 GFLOP.
- So the merge stays on chip. The main pass tiles QG consecutive queries of one request with the G heads of
  one KV group (M = QG x G = 128 rows: 8 queries x 16 heads at TP4 / full model, 16 x 8 at TP8; see
  `TILE_ROWS`) and walks
  the *union* of their selected blocks in one online softmax; a row whose query did not pick the current
  block is masked (a per-block bitmask of the tile's queries). Every K/V tile loaded feeds all M rows and no
  partial leaves the SM. Useful fraction = sum of per-query selections / (QG x |union|): consecutive
  queries share their local block and, in real selections, recent and "hot" blocks, so with high overlap
  |union| is close to 16; with random selections it grows toward QG x 15 + 1 (~108 measured).
- Tiles whose union exceeds UNION_MAX_BY_ROWS go to a second, "wide" pass. Default: the same kernel over the same
  tiles, gated on device by the first pass's per-tile flags (no host sync, so the call stays CUDA-graph
  capturable); a flagged tile's program serves its queries one at a time (M = G rows, each query's own <= 16
  blocks: upstream's query-major work, no waste), an unflagged one exits after one load.
  Opt-in (`wide_pass="kv_major"`, env MSA_EXTEND_WIDE_PASS): the KV-major pass of `_attn_kvmajor` (sorted
  entries, one program per segment of a block's entries, partials + merge; one host sync).

Measured on an H100 80GB HBM3 (Triton 3.6, torch 2.11; 64 q / 4 KV heads, bf16, T = 2,048 on a 59,904-token
prefix, eager, median of 5; matmul 777 TFLOP/s, copy 2.98 TB/s in the same run):
- high overlap (union 16 per tile): 478 us = 287 TFLOP/s useful at batch 1 (upstream 1,623 us: 3.4x);
  batch 8: 3.31 ms = 332 TFLOP/s (upstream 12.9 ms: 3.9x); fp8 K/V 652 us; prefill of 16k: 330 TFLOP/s.
  Per-GPU splits fill the chip less (2,048 / 8 x 1 KV head = 256 programs): 16/1 heads 229 us, 8/1 179 us.
- round 2 (full benchmark, same card type): high overlap 555 us at batch 1 (240 TFLOP/s, layer 4.03x
  upstream), 3.51 ms at batch 8 (303 TFLOP/s); random 1.48 ms / 9.65 ms (90-110 TFLOP/s, the query-major
  wide pass at the L2 ceiling: ~1 MiB of K/V per query and KV head).
- random selections (union ~108 per tile): union walk alone 2.60 ms (53 TFLOP/s), KV-major pass alone
  2.90 ms: both slower than upstream's 1.62 ms there; the default query-major wide pass was not timed yet.
  The 400 TFLOP/s target is met by neither extreme; what limits the high-overlap case is the short walk per
  program (16 blocks) behind a per-tile setup, the softmax between the two MMAs of each step and 1 CTA per SM.
- round 7: whole pages load through TMA (below) with 3 stages in flight: the union pass went 466 -> 409 us at
  batch 1 (336 TFLOP/s of kernel time; H100 and H200 alike) and 3.53 -> 3.06 ms at batch 8 (H200); the layer
  is 4.38x upstream at batch 1 and 3.55x at batch 8 (H100, benchmarks/results/msa_kernels_r7_notes.md).
  The KV-major pass was rewritten into per-block segments (K/V loaded once per segment).
- round 8: 64-row tiles took the union pass to 377 us at batch 1 and 2.84 ms at batch 8 on one H200, and made it
  10-13% slower on an H100; round 9 found them 10% slower on another H200, so every card keeps 128 (TILE_ROWS).
  The KV-major segment pass, timed at last, loses: 1,683 us against 1,086 us for the wide pass on random
  selections (segments 763 us, the partials' merge 879 us, the union pass 41 us), 48.1 against 32.0 ms for
  prefill 64k. Writing and reading the partials costs more than the K/V reloads they save.
- round 9: the wide pass ran one program per query, each through its tile's whole prologue before its gate said
  there was nothing to do (65,536 such programs at batch 8 on overlap selections, ~0.26 ms of an H100); they now
  exit after one flag load. Layer at batch 8, overlap: 3.59x -> 4.01x upstream, attention 396 TFLOP/s useful.

K/V loads. The union pass's blocks that lie wholly before every query of its tile are whole, written pages, and
load with one TMA (bulk tensor copy) per step (`_attn_common.tma_descriptor`; `tma=False` or MSA_TMA=0 gathers
instead, as does a cache layout TMA cannot address). Blocks holding the tile's own queries keep masked gathers.
The wide pass keeps gathered loads: its 16-row tiles ran 10% slower with TMA.

Each program first builds its tile's union (deduplicated, compacted, fully visible blocks first), the
bitmask of which queries picked each block and the blocks' page ids into a small scratch area, then runs two
loops: blocks wholly before every query of the tile (no causal mask, unmasked loads), then the rest
(token-level causal mask, loads masked at the sequence end so unwritten slots are never read).

fp8 (e4m3) caches: K and V are widened to q's dtype on load; k_scale folds into the score multiplier and
v_scale into the output. Tile lists live in plan.extras (built on the first call: make that call before a
CUDA-graph capture).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import BLOCK_SIZE, MSAInputError
from ..plan import MSAPlan
from ..transfer import to_device
from . import widen
from ._attn_common import NEG_BIG, check_attention_inputs, is_fp8, kv_descriptors, next_pow2, score_scale
from ._attn_kvmajor import kv_major_pass

_ROWS = 128  # the most MMA rows of one tile: a KV group larger than this is refused
# MMA rows per union tile (queries x heads of one KV group) and the union width above which a tile goes to the
# wide pass. Union pass kernel time (2,048 queries on a 60k prefix, overlap selections), 128 against 64 rows:
# - H100 (round 8): 128 rows won, 408 against 449 us at B=1 and 3,026 against 3,415 us at B=8 (shared prefix).
# - H200, round 8 (one machine): 64 rows won, 408 -> 377 us and 3,064 -> 2,842 us.
# - H200, round 9 (another machine, two A/B rounds in one call): 128 rows won, 407 against 448 us and 3,062
#   against 3,405 us; the layer against upstream went 4.22x -> 4.48x (B=1) and 3.53x -> 3.77x (B=8).
#   Its 128-row times equal round 8's; only the 64-row times moved.
# So every card runs 128 rows (a 64-row program's win depends on two of them sharing an SM well, which one H200
# did and the other did not); MSA_EXTEND_TILE_ROWS overrides it for A/B runs.
# UNION_MAX: the union walk costs ~21.5 us per block of average union width on 4-query tiles (H200), the
# query-major wide pass ~1,045 us on random selections, so that crossover sits near 48 blocks (measured: 1,086
# us with 48, 1,294 us with 64, where random 4-query tiles, union ~60, stay in the union walk). On 8-query
# tiles it sat near 64 (H100, round 2: ~23 us per block plus ~110 us against ~1.6 ms).
TILE_ROWS = 128
UNION_MAX_BY_ROWS = {128: 64, 64: 48}


@triton.jit
def _softmax_step(q, k, v, s_mask, m_i, l_i, acc, qk_scale):
    s = tl.dot(q, tl.trans(k.to(q.dtype)))
    s = tl.where(s_mask, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def _tile_attention(
    q_ptr, k_ptr, v_ptr, sel_ptr, page_ptr, seq_ptr, qpos_ptr, union_ptr, bits_ptr, pages_ptr, out_ptr,
    k_desc, v_desc, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_st, stride_sh,
    stride_pb, stride_ot, stride_oh, qk_scale, v_scale, union_max, req, q0, qn, kvh, scratch,
    G: tl.constexpr, QG: tl.constexpr, M: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr,
    TOPK_P2: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr, KSUB: tl.constexpr, TMA: tl.constexpr,
):
    """One tile: queries q0 .. q0 + qn - 1 (qn <= QG) of request `req` with the G heads of KV head `kvh`, over
    the union of their selections; `scratch` is the tile's E-entry area in union/bits/pages. Returns whether the
    union was wider than union_max, in which case nothing was walked or written."""
    seq_len = tl.load(seq_ptr + req)
    page_row = page_ptr + req * stride_pb
    sel_tile = sel_ptr + q0.to(tl.int64) * stride_st + kvh * stride_sh

    # ---- The query tile (row r: query q0 + r // G, head kvh * G + r % G), loaded first so its latency
    # hides behind the union step.
    r = tl.arange(0, M)
    r_q = r // G
    row_ok = (r_q < qn) & (r < QG * G)
    t = (q0 + r_q).to(tl.int64)
    cols = tl.arange(0, D)
    q = tl.load(q_ptr + t[:, None] * stride_qt + (kvh * G + r % G)[:, None] * stride_qh + cols[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pos = tl.load(qpos_ptr + t, mask=row_ok, other=-1)
    # ---- The union of the tile's selections, and for each member the bitmask of queries that chose it.
    e = tl.arange(0, E)
    e_q = e // TOPK_P2
    e_j = e % TOPK_P2
    x = tl.load(sel_tile + e_q * stride_st + e_j, mask=(e_q < qn) & (e_j < TOPK), other=-1)
    jj = tl.arange(0, TOPK_P2)
    dup = e < 0
    bits = tl.zeros([E], tl.int32)
    for qq in tl.static_range(QG):
        row = tl.load(sel_tile + qq * stride_st + jj, mask=(jj < TOPK) & (qq < qn), other=-2)
        hit = tl.max((x[:, None] == row[None, :]).to(tl.int32), 1) > 0
        dup = dup | (hit & (qq < e_q))
        bits = bits | (hit.to(tl.int32) << qq)
    keep = (x >= 0) & ~dup
    min_local = tl.load(qpos_ptr + q0) // BLOCK  # blocks before it are wholly visible to every query here
    full = keep & (x < min_local)
    part = keep & ~full
    n_full = tl.sum(full.to(tl.int32), 0)
    n_all = tl.sum(keep.to(tl.int32), 0)
    dest = tl.where(full, tl.cumsum(full.to(tl.int32), 0) - 1, n_full + tl.cumsum(part.to(tl.int32), 0) - 1)
    tl.store(union_ptr + scratch + dest, x, mask=keep)
    tl.store(bits_ptr + scratch + dest, bits, mask=keep)
    # page ids looked up here, all at once, so the block loops below carry no dependent page-table load
    tl.store(pages_ptr + scratch + dest, tl.load(page_row + x, mask=keep, other=0), mask=keep)
    tl.debug_barrier()  # the scratch written above by all threads is read back below by all threads
    skip = n_all > union_max  # too little overlap: the wide pass serves this tile instead
    # a skipped tile walks nothing and writes nothing (zero trip counts keep the loops pipelinable)
    n_full = tl.where(skip, 0, n_full)
    n_all = tl.where(skip, 0, n_all)

    m_i = tl.full([M], NEG_BIG, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    k_base = k_ptr + kvh * stride_kh + cols[None, :]
    v_base = v_ptr + kvh * stride_vh + cols[None, :]
    # The first loop's blocks are whole pages a request wrote, so with TMA (k_desc/v_desc) each step is one
    # bulk copy; the second loop keeps masked gathers: slots past a sequence's end may hold anything (NaN).
    # Each block is walked in KSUB-key steps: 64 for the union pass (4 warps; 21% faster than 128
    # keys / 8 warps on an H100, see _launch), 128 for the 16-row query-major wide pass. ptxas reports
    # 255 registers either way (spills: ~450 B per thread at KSUB 128 / 8 warps, ~80 B at 64 / 8 warps).
    nk = tl.arange(0, KSUB)
    SPB: tl.constexpr = BLOCK // KSUB  # steps per block
    for it in range(0, n_full * SPB):
        i = it // SPB
        chose = ((tl.load(bits_ptr + scratch + i) >> r_q) & 1) != 0
        if TMA:  # whole, written pages: one bulk tensor copy per tile (see _attn_common.kv_descriptors)
            slot0 = tl.load(pages_ptr + scratch + i) * BLOCK + (it % SPB) * KSUB
            k = k_desc.load([slot0, kvh * D])
            v = v_desc.load([slot0, kvh * D])
        else:
            slot = tl.load(pages_ptr + scratch + i).to(tl.int64) * BLOCK + (it % SPB) * KSUB + nk
            k = tl.load(k_base + slot[:, None] * stride_ks)
            v = tl.load(v_base + slot[:, None] * stride_vs)
        m_i, l_i, acc = _softmax_step(q, k, v, chose[:, None], m_i, l_i, acc, qk_scale)
    for it in range(n_full * SPB, n_all * SPB):
        i = it // SPB
        blk = tl.load(union_ptr + scratch + i)
        chose = ((tl.load(bits_ptr + scratch + i) >> r_q) & 1) != 0
        tok = (it % SPB) * KSUB + nk
        slot = tl.load(pages_ptr + scratch + i).to(tl.int64) * BLOCK + tok
        key_pos = blk * BLOCK + tok
        in_seq = key_pos < seq_len
        k = tl.load(k_base + slot[:, None] * stride_ks, mask=in_seq[:, None], other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs, mask=in_seq[:, None], other=0.0)
        visible = chose[:, None] & (key_pos[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale)
    o = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(out_ptr + t[:, None] * stride_ot + (kvh * G + r % G)[:, None] * stride_oh + cols[None, :],
             o.to(out_ptr.dtype.element_ty), mask=(row_ok & ~skip)[:, None])
    return skip


@triton.jit(do_not_specialize=["stride_pb", "union_max"])
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, sel_ptr, page_ptr, seq_ptr, qpos_ptr, tile_req_ptr, tile_q0_ptr, tile_qn_ptr,
    union_ptr, bits_ptr, pages_ptr, wide_ptr, out_ptr, k_desc, v_desc,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_st, stride_sh, stride_pb,
    stride_ot, stride_oh,
    qk_scale, v_scale, union_max,
    HKV: tl.constexpr, G: tl.constexpr, QG: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    TOPK: tl.constexpr, TOPK_P2: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr, GATED: tl.constexpr,
    KSUB: tl.constexpr, TMA: tl.constexpr, QG_TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    if GATED:
        # Second pass, over the first pass's tiles x QG_TILE (that pass's queries per tile): program
        # (tile * QG_TILE + i, kvh) serves query i of a tile that pass found too wide, alone (QG = 1: its own
        # <= TOPK blocks); the others exit after one flag load. Until round 9 one program per query ran the whole tile
        # prologue before finding nothing to do: ~0.26 ms of an H100 at batch 8 on high-overlap selections
        # (3,042 -> 2,785 us for both passes). A loop over a tile's queries in one program was slower on random
        # selections (1,305 against 1,208 us, H100), so each query keeps its own program.
        part = tile % QG_TILE  # grid (tiles x QG_TILE, HKV), head-major: see _launch
        tile = tile // QG_TILE
        if tl.load(wide_ptr + tile * HKV + kvh) != 0:
            qn = tl.load(tile_qn_ptr + tile)
            if part < qn:
                req = tl.load(tile_req_ptr + tile)
                q0 = tl.load(tile_q0_ptr + tile)
                _tile_attention(
                    q_ptr, k_ptr, v_ptr, sel_ptr, page_ptr, seq_ptr, qpos_ptr, union_ptr, bits_ptr, pages_ptr,
                    out_ptr, k_desc, v_desc, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                    stride_st, stride_sh, stride_pb, stride_ot, stride_oh, qk_scale, v_scale, union_max,
                    req, q0 + part, 1, kvh, ((tile * HKV + kvh) * QG_TILE + part) * E,
                    G, QG, M, D, TOPK, TOPK_P2, E, BLOCK, KSUB, TMA)
    else:
        req = tl.load(tile_req_ptr + tile)
        q0 = tl.load(tile_q0_ptr + tile)
        qn = tl.load(tile_qn_ptr + tile)
        skip = _tile_attention(
            q_ptr, k_ptr, v_ptr, sel_ptr, page_ptr, seq_ptr, qpos_ptr, union_ptr, bits_ptr, pages_ptr, out_ptr,
            k_desc, v_desc, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_st,
            stride_sh, stride_pb, stride_ot, stride_oh, qk_scale, v_scale, union_max,
            req, q0, qn, kvh, (tile * HKV + kvh) * E,
            G, QG, M, D, TOPK, TOPK_P2, E, BLOCK, KSUB, TMA)
        tl.store(wide_ptr + tile * HKV + kvh, skip.to(tl.int32))


def tile_rows() -> int:
    """MMA rows of a union tile: MSA_EXTEND_TILE_ROWS (A/B knob, 16..128) if set, else TILE_ROWS."""
    env = os.environ.get("MSA_EXTEND_TILE_ROWS")
    if env is None:
        return TILE_ROWS
    rows = int(env)
    if not 16 <= rows <= _ROWS:
        raise MSAInputError(f"MSA_EXTEND_TILE_ROWS must be within 16..{_ROWS}, got {rows}")
    return rows


def queries_per_tile(group: int, rows: int | None = None) -> int:
    """Queries stacked in one union tile of `rows` rows (default: `tile_rows()`); at most 16, since the
    per-block query bitmask is an int32."""
    return max(1, min(16, (rows if rows is not None else tile_rows()) // group))


def _tiles(plan: MSAPlan, qg: int, device: torch.device):
    """(request, first query, query count) of every tile (QG consecutive queries of one request), and the
    tile of every query token. Built with tensor ops on the host (once per plan): the per-tile Python loop it
    replaced took ~2 ms at 8 x 2,048 new tokens, spent with the GPU idle after the plan's device sync."""
    key = ("extend_attention.tiles", qg, str(device))
    got = plan.extras.get(key)
    if got is None:
        q_lens = torch.tensor(plan.q_lens_list, dtype=torch.int64)
        starts = torch.cumsum(q_lens, 0) - q_lens  # first token of each request
        per_req = (q_lens + qg - 1) // qg  # tiles of each request
        req = torch.repeat_interleave(torch.arange(len(q_lens)), per_req)
        first_tile = torch.cumsum(per_req, 0) - per_req
        lo = (torch.arange(len(req)) - first_tile[req]) * qg  # the tile's first query within its request
        qn = (q_lens[req] - lo).clamp(max=qg)
        tile_of = torch.repeat_interleave(torch.arange(len(req)), qn)
        got = tuple(to_device(a.to(torch.int32), device) for a in (req, starts[req] + lo, qn, tile_of))
        plan.extras[key] = got
    return got


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
    out: torch.Tensor | None = None,
    union_max: int | None = None,
    wide_pass: str | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """Extend/prefill attention: q [T, Hq, D] (the plan's new tokens), selected [T, Hkv, topk] -> [T, Hq, D].

    `out` (optional, q's shape and dtype) receives the result; tests pass a poisoned one. `union_max` sets
    the union width above which a tile goes to the wide pass (default UNION_MAX_BY_ROWS, env MSA_EXTEND_UNION_MAX;
    -1 sends every tile there, a huge value none); `wide_pass` picks it: "query" (default, env
    MSA_EXTEND_WIDE_PASS) or "kv_major". `tma` loads whole pages with TMA (default: env MSA_TMA, on; see
    `_attn_common.kv_descriptors`)."""
    hq, hkv, dim = check_attention_inputs(plan, q, k_cache, v_cache, selected, k_scale, v_scale)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise MSAInputError(f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if q.shape[0] == 0:
        return out
    group = hq // hkv
    if group > _ROWS:
        raise MSAInputError(f"a KV group of {group} query heads exceeds the {_ROWS}-row tile")
    rows = tile_rows()
    qg = queries_per_tile(group, rows)
    topk = selected.shape[2]
    if union_max is None:
        union_max = int(os.environ.get("MSA_EXTEND_UNION_MAX", UNION_MAX_BY_ROWS.get(rows, 64)))
    if wide_pass is None:
        wide_pass = os.environ.get("MSA_EXTEND_WIDE_PASS", "query")
    if wide_pass not in ("query", "kv_major"):
        raise MSAInputError(f"wide_pass must be 'query' or 'kv_major', got {wide_pass!r}")
    qk_scale = score_scale(scale, dim, k_scale, is_fp8(k_cache))
    v_mult = float(v_scale) if is_fp8(k_cache) else 1.0
    if widen.wanted(plan, k_cache):  # fp8 K/V: attend over 16-bit copies of the batch's pages (scales kept above)
        compact, pages = widen.compact_plan(plan)
        if widen.fits(pages, k_cache, 2):
            plan = compact
            k_cache, v_cache = widen.widen_pages(k_cache, pages, q.dtype), widen.widen_pages(v_cache, pages, q.dtype)
    wide, tile_of = _launch(plan, q, k_cache, v_cache, selected, out, qk_scale, v_mult, qg, union_max, None, tma)
    if union_max < qg * topk:  # some tile may be too wide for the union walk
        if wide_pass == "kv_major":
            kv_major_pass(plan, q, k_cache, v_cache, selected, tile_of, wide, out, qk_scale, v_mult, qg)
        else:  # query-major: each query of a wide tile alone, over its own <= 16 blocks
            _launch(plan, q, k_cache, v_cache, selected, out, qk_scale, v_mult, qg, 1 << 30, wide, tma)
    return out


def _launch(plan, q, k_cache, v_cache, selected, out, qk_scale, v_mult, qg, union_max, gate, tma):
    """One launch over the tiles of qg queries. Without `gate`: the union walk, which flags (and skips) the tiles
    whose union exceeds union_max; returns (those flags per tile and KV head, the tile of each token). With
    `gate` = those flags: the wide pass over the same tiles, each query of a flagged tile alone."""
    hkv = k_cache.shape[1]
    group = q.shape[1] // hkv
    topk = selected.shape[2]
    topk_p2 = next_pow2(topk)
    walk_qg = qg if gate is None else 1  # queries per MMA tile
    parts = 1 if gate is None else qg  # programs per tile: the wide pass runs one per query
    rows = max(16, next_pow2(walk_qg * group))
    tile_req, tile_q0, tile_qn, tile_of = _tiles(plan, qg, q.device)
    n_tiles = tile_req.shape[0]
    entries = next_pow2(walk_qg) * topk_p2
    union = torch.empty(n_tiles * hkv * parts * entries, dtype=torch.int32, device=q.device)
    bits = torch.empty_like(union)
    pages = torch.empty_like(union)
    wide = torch.empty(n_tiles * hkv, dtype=torch.int32, device=q.device) if gate is None else gate
    knob = "WIDE_" if gate is not None else ""  # the gated (wide) pass has its own knobs
    # Measured on an H100 (round 2, 2,048 queries on a 60k prefix, high-overlap selections, union pass):
    # KSUB 128 / 8 warps 676 us, KSUB 64 / 8 warps 662 us, KSUB 64 / 4 warps 534 us (128-row tiles; 64-row
    # tiles, MSA_EXTEND_TILE_ROWS=64, keep KSUB 64, 4 warps, 3 stages: 2 stages tied, KSUB 32 was slower); the
    # query-major wide pass (M = 16) was best at its old setting (KSUB 128, 4 warps: 1.36 ms; 2 warps 1.37, 8 warps
    # 1.60, KSUB 32 1.78 ms on random selections).
    # TMA, round 7 (H200, same inputs, attention kernel time per layer): the union pass 467 us gathered,
    # 459 us with TMA at 2 stages, 420 us at 3 stages (422 at 4; 8 warps 511-547). The wide pass got slower
    # with TMA (1,090 -> 1,207 us): its 16-row tiles want many small loads in flight, not 32 KiB copies, so
    # it keeps gathered loads unless MSA_EXTEND_WIDE_TMA=1. H100 (third call): 466 -> 409 us for the union
    # pass. Tried there and dropped: the scale folded into one FMA with a per-row mask (419 us), Triton's
    # Hopper warp specialization of the whole-page loop (fails to compile in Triton 3.6).
    union_pass = gate is None and rows >= 64
    num_warps = int(os.environ.get(f"MSA_EXTEND_{knob}WARPS", 4))
    ksub = int(os.environ.get(f"MSA_EXTEND_{knob}KSUB", os.environ.get("MSA_EXTEND_KSUB", 64 if union_pass else 128)))
    if gate is not None:
        tma = tma is not False and os.environ.get("MSA_EXTEND_WIDE_TMA", "0") == "1"
    descs = kv_descriptors(k_cache, v_cache, ksub, tma)
    k_desc, v_desc = descs if descs is not None else (k_cache, v_cache)  # placeholders the kernel ignores
    stages_default = 3 if descs is not None else 2
    num_stages = int(os.environ.get(f"MSA_EXTEND_{knob}STAGES", os.environ.get("MSA_EXTEND_STAGES", stages_default)))
    # Grid (tiles x parts, KV heads): the wide pass's programs go head-major, every query of KV head 0, then
    # head 1, ..., so its random reads stay within one head's K/V at a time (~30 MB at 60k: L2-sized). The
    # earlier (tiles, heads, parts) grid swept every head's K/V once per query slot of a tile; against it, H100
    # (round 10, kernel time, two A/B rounds): 1% off at B=1 random (1,198 against 1,209 us), a tie at B=8
    # random and in prefill 64k. The pass is bound by L2-to-SM traffic, not by HBM.
    _extend_kernel[(n_tiles * parts, hkv)](
        q, k_cache, v_cache, selected, plan.page_table, plan.seq_lens, plan.q_pos, tile_req, tile_q0, tile_qn,
        union, bits, pages, wide, out, k_desc, v_desc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        selected.stride(0), selected.stride(1), plan.page_table.stride(0), out.stride(0), out.stride(1),
        qk_scale, v_mult, union_max,
        HKV=hkv, G=group, QG=walk_qg, M=rows, D=q.shape[2], TOPK=topk, TOPK_P2=topk_p2, E=entries,
        BLOCK=BLOCK_SIZE, GATED=gate is not None, KSUB=ksub, TMA=descs is not None, QG_TILE=parts,
        num_warps=num_warps, num_stages=num_stages,
    )
    return wide, tile_of
