"""Extend and prefill on fp8 caches: widen the pages a batch touches to q's dtype once per layer, then run the
16-bit kernels on that copy.

Why: the extend kernels are compute-bound and reuse every loaded page across many queries, so Triton's widening of
8-bit tiles inside them is paid over and over (each 64-row scoring tile converts every page again). Measured on an
H100 (round 12, `bench_msa --fp8-extend`, same data in both): the fp8 layer ran at 0.44-0.72x of bf16 (B=8 x 2,048
new tokens on a 60k shared prefix: 10.7 ms against 4.7). The pages themselves are few next to that work (B=8 on a
shared 60k prefix touches ~500 pages: 60 MiB of fp8 K/V and 8 MiB of index-K), so one gather-and-widen pass per
layer costs little: with it the fp8 layer is 0.54-1.00x of bf16 (B=8 shared prefix 7.0 ms on high-overlap
selections, 11.8 against 11.5 on random ones; prefill 64k random 39.7 against 39.8), the widening ~0.15-0.3 ms of
it. The rest of the gap on high-overlap inputs is their index-K ramp, which e4m3 rounds into ties (data, not
path). e4m3 values are exact in bf16 and fp16, so the results match the fp8 kernels up to summation order; the
caches' scales move into the kernels' multipliers as before.

Decode keeps its fp8 kernels (bytes-bound: widening would double its traffic). A batch whose widened K/V would
exceed MAX_WIDEN_BYTES (MSA_FP8_WIDEN_MAX_MB) also keeps them, and MSA_FP8_WIDEN=0 turns widening off (A/B). A
mixed batch (decode rows beside an extend, as chunked prefill schedules them) widens its decode rows' pages too:
the cap bounds that cost (~0.5 ms a layer at the full 1 GiB on an H100).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..layout import BLOCK_SIZE
from ..plan import MSAPlan
from ._attn_common import env_switch, is_fp8

MAX_WIDEN_BYTES = 1 << 30  # K + V widened, per layer call: ~240k tokens at 4 KV heads of 128


def wanted(plan: MSAPlan, cache: torch.Tensor) -> bool:
    """Whether an op on this plan and cache should run on widened pages (extend/prefill on an fp8 cache)."""
    return is_fp8(cache) and not plan.is_decode and env_switch("MSA_FP8_WIDEN", True)


def compact_plan(plan: MSAPlan) -> tuple[MSAPlan, torch.Tensor]:
    """(a copy of `plan` whose page table numbers the batch's pages 0..U-1, those U page ids ascending).

    Built once per plan (kept in plan.extras, so every layer and both ops share it and the copy keeps the work
    lists the kernels attach to it). Identical pages keep identical numbers, so shared-prefix packing still sees
    the sharing."""
    key = ("widen", "compact")
    hit = plan.extras.get(key)
    if hit is not None:
        return hit
    table = plan.page_table
    used_pages = (plan.seq_lens.to(torch.int64) + BLOCK_SIZE - 1) // BLOCK_SIZE
    col = torch.arange(table.shape[1], device=table.device)
    used = col[None, :] < used_pages[:, None]
    pages = torch.unique(table[used].to(torch.int64))  # sorted
    remapped = torch.searchsorted(pages, table.to(torch.int64).clamp_min(0))
    remapped = torch.where(used, remapped, torch.zeros_like(remapped)).to(torch.int32)
    compact = dataclasses.replace(plan, page_table=remapped, extras={})
    plan.extras[key] = (compact, pages)
    return compact, pages


def widen_pages(cache: torch.Tensor, pages: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[len(pages) * BLOCK_SIZE, heads, D] in `dtype`: those pages of an fp8 cache, values as stored (exact).

    A contiguous cache is gathered page by page as rows of int64 (64 KiB rows at 4 KV heads), then cast: on an
    H100 (round 12) that took the attention of B=1 x 2,048 on 60k from 672 to 621 µs against a slot-by-slot byte
    gather, and beat both a one-pass Triton kernel of the word widening (its layout changes went through shared
    memory: 1,562 µs) and widening only the selected pages (an index_put with accumulate plus a host sync:
    1,568 µs)."""
    slots, heads, dim = cache.shape
    if cache.is_contiguous() and (BLOCK_SIZE * heads * dim) % 8 == 0:
        raw = cache.view(torch.uint8).view(torch.int64).view(slots // BLOCK_SIZE, -1).index_select(0, pages)
    else:  # slot by slot, as bytes: index_select does not take every fp8 dtype
        idx = (pages[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE, device=pages.device)[None, :]).reshape(-1)
        raw = cache.view(torch.uint8).index_select(0, idx)
    return raw.view(torch.uint8).view(cache.dtype).view(-1, heads, dim).to(dtype)


def fits(pages: torch.Tensor, cache: torch.Tensor, copies: int) -> bool:
    """Whether `copies` widened 16-bit copies of these pages stay within MAX_WIDEN_BYTES (MSA_FP8_WIDEN_MAX_MB)."""
    cap = int(os.environ.get("MSA_FP8_WIDEN_MAX_MB", MAX_WIDEN_BYTES >> 20)) << 20
    per_page = BLOCK_SIZE * cache.shape[1] * cache.shape[2] * 2
    return copies * pages.numel() * per_page <= cap
