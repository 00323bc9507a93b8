"""One launch that points a decode graph plan at this step's batch (see msa_kernels.graph).

Per request: its length and query position, and the page of each of its blocks, read from SGLang's token-slot
table (page = first slot of the block / 128). Only the pages that hold the sequence are written; columns past
them keep stale ids that no kernel reads. Replaces 5-6 small torch launches (gather, divide, copies), whose
fixed cost showed at batch 1 (H100: ~8-10 µs of a 28-34 µs decode layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pdl import PDL_MAX_BATCH, pdl_launch_options, pdl_prologue

COLUMNS = 256  # page-table columns written per loop step


@triton.jit
def _update_kernel(slots_ptr, stride_slots, rows_ptr, seq_src_ptr, pt_ptr, stride_pt, seq_ptr, q_pos_ptr, width,
                   PAGE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    b = tl.program_id(0)
    row = tl.load(rows_ptr + b).to(tl.int64)
    n = tl.load(seq_src_ptr + b).to(tl.int32)
    tl.store(seq_ptr + b, n)
    tl.store(q_pos_ptr + b, n - 1)
    need = tl.minimum((n + PAGE - 1) // PAGE, width)
    for c0 in range(0, need, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < need
        first = tl.load(slots_ptr + row * stride_slots + cols.to(tl.int64) * PAGE, mask=ok, other=0)
        tl.store(pt_ptr + b * stride_pt + cols, (first // PAGE).to(tl.int32), mask=ok)


def update_from_slots(page_table: torch.Tensor, seq_lens: torch.Tensor, q_pos: torch.Tensor,
                      slot_table: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, page: int) -> None:
    batch, width = page_table.shape
    _update_kernel[(batch,)](slot_table, slot_table.stride(0), rows, lengths, page_table, page_table.stride(0),
                             seq_lens, q_pos, width, PAGE=page, BLOCK=COLUMNS,
                             **pdl_launch_options(page_table.device, batch <= PDL_MAX_BATCH))
