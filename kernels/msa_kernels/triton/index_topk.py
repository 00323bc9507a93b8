"""Index scoring + block top-k on Triton: `index_topk(plan, q_idx, index_k_cache) -> int32 [T, H_idx, topk]`.

Same semantics as `msa_kernels.reference.index_topk`: per query token and index head, the max over each
historical 128-token block of q_idx . k_idx, the best topk-1 of those blocks plus the local block (all
blocks when at most topk are visible), as ascending block ids padded with -1.

Plan/run split: `prepare_index_topk(plan, heads, num_pages)` builds the work list once per batch (host
work, one page-table copy) and stores it in `plan.extras`; it runs on the first call if the caller did not
run it. The run step only launches kernels (a scoring kernel, plus a merge kernel when histories are split
into chunks), never syncs, and allocates only the output (none with `out=`). CUDA graphs: prepare with
`for_graph=True` before capture, capture `index_topk(..., out=static)`, and before each replay call
`refresh_index_topk(captured_plan, new_plan, ...)`, which rewrites the captured buffers for the new batch.
"""

from __future__ import annotations

import os

import torch

from ..layout import BLOCK_SIZE, MSAInputError, check_cache
from ..plan import MSAPlan
from . import widen
from ._topk_kernels import launch_merge, launch_score
from ._topk_worklist import TopkWork, build_graph_decode_work, build_topk_work

_EXTRAS_KEY = "triton_index_topk"
# Software-pipelining depth of the key-block loads in the scoring kernel. Items under 128 rows (decode: 16-64
# rows; extend: 64 rows since round 7, see _topk_worklist.EXTEND_ROWS) run 4 warps and 3 stages at ~70 KB of
# shared memory. Extend tiles of 128 rows (MSA_EXTEND_ROWS=128, 8 warps) hold 64 KB plus 32 KB per
# stage. Measured on an H100: a split extend (2,048 tokens on 60k: 320 items, about one wave) ran 346 us
# with 2 stages (two programs per SM) against 420 us with 3; unsplit runs with many items (prefill 64k,
# 8 x 2,048 on 60k) ran 12-33% faster with 3 stages.
# Round 7: index-K pages load through TMA (`_attn_common.tma_descriptor`): H100, scoring kernel 228 -> 221 us
# (extend 2,048 on 60k), 2,373 -> 2,165 us (8 x 2,048 on a shared 60k), 6.0 -> 5.5 us (decode B=1 60k), 12.1 ->
# 10.1 us (decode B=8 shared); 3 stages for split extend stayed slower with TMA (240 us).
DECODE_STAGES = 3
EXTEND_STAGES_SPLIT = 2
EXTEND_STAGES_FINAL = 3
_INDEX_K_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU (the Triton interpreter in tests): a few "SMs" so that histories get split


def prepare_index_topk(
    plan: MSAPlan, heads: int, num_pages: int, device: torch.device | None = None,
    target_items: int | None = None, for_graph: bool = False,
) -> TopkWork:
    """Build (or fetch) the work list of this batch for `heads` index heads over a pool of `num_pages`.

    `for_graph=True` sizes the buffers for the worst case of this batch's lengths, so that a CUDA graph
    captured with this plan can replay later batches (see `refresh_index_topk`): capture with a plan whose
    sequences are as long as the longest the graph will serve."""
    device = plan.page_table.device if device is None else device
    cache = plan.extras.setdefault(_EXTRAS_KEY, {})
    key = (heads, num_pages, str(device))  # the first call decides target_items and for_graph
    if key not in cache:
        cache[key] = build_topk_work(plan, heads, num_pages, device, _sm_count(device), target_items,
                                     for_graph=for_graph)
    return cache[key]


def prepare_graph_decode_topk(
    plan: MSAPlan, heads: int, num_pages: int, device: torch.device | None = None, target_items: int | None = None,
) -> TopkWork:
    """Give a decode graph plan (msa_kernels.graph.graph_decode_plan) its device-computed work list: the
    captured top-k then follows whatever lengths `update_graph_decode_plan` writes, with no host step."""
    device = plan.page_table.device if device is None else device
    cache = plan.extras.setdefault(_EXTRAS_KEY, {})
    key = (heads, num_pages, str(device))
    cache[key] = build_graph_decode_work(plan.batch_size, heads, plan.page_table.shape[1], plan.topk, device,
                                         _sm_count(device), target_items)
    return cache[key]


def refresh_index_topk(captured: MSAPlan, new: MSAPlan, heads: int, num_pages: int) -> TopkWork:
    """Point a captured decode graph's top-k at a new batch of the same size, before `graph.replay()`.

    Copies the new page table and query positions into the captured plan's tensors (the buffers the
    captured kernels read) and rebuilds the work list into the captured work list's buffers, keeping its
    compile-time sizing. Host work only; call it outside the graph. MSAInputError if the batch does not
    fit (more requests or tokens, a page table of another width, histories longer than captured)."""
    cache = captured.extras.get(_EXTRAS_KEY, {})
    key = (heads, num_pages, str(captured.page_table.device))
    if key not in cache:
        raise MSAInputError("the captured plan has no top-k work list: run prepare_index_topk before capture")
    if new.page_table.shape != captured.page_table.shape or new.q_pos.shape != captured.q_pos.shape:
        raise MSAInputError(
            f"new batch (page table {tuple(new.page_table.shape)}, {new.q_pos.shape[0]} tokens) does not match "
            f"the captured one ({tuple(captured.page_table.shape)}, {captured.q_pos.shape[0]} tokens)"
        )
    if new.topk != captured.topk:
        raise MSAInputError(f"topk {new.topk} differs from the captured {captured.topk}")
    like = cache[key]
    build_topk_work(new, heads, num_pages, like.items.device, _sm_count(like.items.device), like=like)
    captured.page_table.copy_(new.page_table)
    captured.q_pos.copy_(new.q_pos)
    return like


def _check(plan: MSAPlan, q_idx: torch.Tensor, index_k_cache: torch.Tensor) -> None:
    check_cache("index_k_cache", index_k_cache, heads=1)
    if index_k_cache.dtype not in _INDEX_K_DTYPES:
        raise MSAInputError(f"index_k_cache dtype must be one of {_INDEX_K_DTYPES}, got {index_k_cache.dtype}")
    if q_idx.dim() != 3:
        raise MSAInputError(f"q_idx must be [T, H_idx, D], got shape {tuple(q_idx.shape)}")
    if q_idx.shape[0] != plan.num_tokens:
        raise MSAInputError(f"q_idx has {q_idx.shape[0]} tokens, the plan {plan.num_tokens}")
    dim = q_idx.shape[2]
    if dim != index_k_cache.shape[2]:
        raise MSAInputError(f"q_idx head dim {dim} differs from index_k_cache's {index_k_cache.shape[2]}")
    if dim < 16 or dim & (dim - 1):
        raise MSAInputError(f"index head dim must be a power of two >= 16, got {dim}")
    if q_idx.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise MSAInputError(f"q_idx must be bf16, fp16 or fp32, got {q_idx.dtype}")
    if q_idx.stride(2) != 1 or index_k_cache.stride(2) != 1:
        raise MSAInputError("q_idx and index_k_cache must be contiguous in their last (head dim) axis")
    if q_idx.device != index_k_cache.device or q_idx.device != plan.page_table.device:
        raise MSAInputError(
            f"q_idx ({q_idx.device}), index_k_cache ({index_k_cache.device}) and the plan "
            f"({plan.page_table.device}) must be on one device"
        )
    if not 1 <= plan.topk <= 64:
        raise MSAInputError(f"topk must be in [1, 64], got {plan.topk}")


def index_topk(
    plan: MSAPlan, q_idx: torch.Tensor, index_k_cache: torch.Tensor, out: torch.Tensor | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """Selections for every new token of the batch: int32 [T, H_idx, topk], ascending, -1 padded.
    `out`, when given, is written in place (a static buffer inside CUDA graphs). `tma` loads index-K pages
    with TMA (default: env MSA_TMA, on; see `_attn_common.tma_descriptor`)."""
    _check(plan, q_idx, index_k_cache)
    if widen.wanted(plan, index_k_cache):  # extend/prefill on fp8 index-K: score 16-bit copies of its pages
        compact, pages = widen.compact_plan(plan)
        if widen.fits(pages, index_k_cache, 1):
            plan, index_k_cache = compact, widen.widen_pages(index_k_cache, pages, q_idx.dtype)
    heads = q_idx.shape[1]
    work = prepare_index_topk(plan, heads, index_k_cache.shape[0] // BLOCK_SIZE, q_idx.device)
    shape = (q_idx.shape[0], heads, plan.topk)
    if out is None:
        out = torch.empty(shape, dtype=torch.int32, device=q_idx.device)
    elif out.shape != shape or out.dtype != torch.int32 or not out.is_contiguous() or out.device != q_idx.device:
        raise MSAInputError(f"out must be a contiguous int32 {shape} tensor on {q_idx.device}, got "
                            f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if q_idx.shape[0] == 0:
        return out
    if work.block_m >= 128:
        warps, stages = 8, (EXTEND_STAGES_FINAL if work.final else EXTEND_STAGES_SPLIT)
    else:
        warps, stages = 4, DECODE_STAGES
    stages = int(os.environ.get("MSA_SCORE_STAGES", stages))  # A/B knobs for benchmarks
    warps = int(os.environ.get("MSA_SCORE_WARPS", warps))
    launch_score(work, plan, q_idx, index_k_cache, out, warps, stages, tma)
    if not work.final:
        launch_merge(work, plan, out)
    return out
