"""Decode plans for CUDA graphs: plan once at capture, update on the device inside the graph.

A CUDA graph replays fixed kernels on fixed buffers, so the per-batch plan cannot be rebuilt on the host
between replays without a sync and milliseconds of host work per step. A graph decode plan instead holds
static device buffers sized for `batch` requests of up to `max_pages` pages; `update_graph_decode_plan_from_slots`
(one capturable launch; `update_graph_decode_plan` takes a ready page table instead) writes the step's page table
and lengths into them at the start of the captured step, and the top-k work list derives its items from those
lengths in the kernel
(`index_topk.prepare_graph_decode_topk`). The decode attention kernel already reads only device state.

    plan = graph_decode_plan(batch, max_pages, device)
    prepare_graph_decode_topk(plan, index_heads, num_pages)      # before capture
    # inside the captured step, once, before the first sparse layer:
    update_graph_decode_plan_from_slots(plan, req_to_token, req_pool_indices, seq_lens)
    selected = index_topk(plan, q_idx, index_k_cache); o = sparse_attention(plan, q, ...)

Trade-off: without the page table on the host, requests that share prefix pages each read them (the
eager path packs them into one read per batch).
"""

from __future__ import annotations

import os

import torch

from .layout import BLOCK_SIZE, TOPK_BLOCKS, MSAInputError
from .plan import MSAPlan


def graph_decode_plan(batch: int, max_pages: int, device: torch.device | str, topk: int = TOPK_BLOCKS) -> MSAPlan:
    """A decode plan of static buffers for `batch` requests of up to `max_pages` pages each."""
    if batch < 1 or max_pages < 1:
        raise MSAInputError(f"a graph decode plan needs batch >= 1 and max_pages >= 1, got {batch}, {max_pages}")
    device = torch.device(device)
    ones = torch.ones(batch, dtype=torch.int32, device=device)
    return MSAPlan(
        page_table=torch.zeros(batch, max_pages, dtype=torch.int32, device=device),
        seq_lens=ones.clone(),
        q_lens=ones,
        qo_indptr=torch.arange(batch + 1, dtype=torch.int32, device=device),
        q_pos=torch.zeros(batch, dtype=torch.int32, device=device),
        q_req=torch.arange(batch, dtype=torch.int32, device=device),
        seq_lens_list=[max_pages * BLOCK_SIZE] * batch,  # the sizing bound; the real lengths live on the device
        q_lens_list=[1] * batch,
        topk=topk,
    )


def update_graph_decode_plan(plan: MSAPlan, page_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Write this step's page table [batch, <= max_pages] and lengths [batch] (>= 1) into the plan's
    buffers. Device ops only, so it can be captured; shapes are checked, values are not (no sync)."""
    batch, width = plan.page_table.shape
    if page_table.dim() != 2 or page_table.shape[0] != batch or page_table.shape[1] > width:
        raise MSAInputError(f"page table {tuple(page_table.shape)} does not fit the graph plan's {batch} x {width}")
    if tuple(seq_lens.shape) != (batch,):
        raise MSAInputError(f"seq_lens {tuple(seq_lens.shape)} must be [{batch}]")
    plan.page_table[:, : page_table.shape[1]].copy_(page_table)
    plan.seq_lens.copy_(seq_lens)
    torch.sub(plan.seq_lens, 1, out=plan.q_pos)


def update_graph_decode_plan_from_slots(
    plan: MSAPlan, slot_table: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor
) -> None:
    """Like update_graph_decode_plan, with the page table read from a token-slot table (SGLang's
    req_to_token [requests, max_context]: the slot of each token; page = first slot of a block / 128) at the
    batch's `rows`. One launch on CUDA (capturable); torch ops elsewhere. Shapes are checked, values are not."""
    batch, width = plan.page_table.shape
    if tuple(rows.shape) != (batch,) or tuple(seq_lens.shape) != (batch,):
        raise MSAInputError(f"rows {tuple(rows.shape)} and seq_lens {tuple(seq_lens.shape)} must be [{batch}]")
    if slot_table.dim() != 2 or slot_table.stride(1) != 1:
        raise MSAInputError(f"slot_table must be a row-contiguous [requests, tokens] table, got {tuple(slot_table.shape)}")
    if slot_table.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from .triton.graph_update import update_from_slots

        update_from_slots(plan.page_table, plan.seq_lens, plan.q_pos, slot_table, rows, seq_lens, BLOCK_SIZE)
        return
    n_pages = min(width, -(-slot_table.shape[1] // BLOCK_SIZE))
    update_graph_decode_plan(plan, pages_from_slots(slot_table, rows, n_pages), seq_lens)


def pages_from_slots(slot_table: torch.Tensor, rows: torch.Tensor, n_pages: int) -> torch.Tensor:
    """Page table [len(rows), n_pages] of a token-slot table (SGLang's req_to_token): page p of a request holds
    slots [p*128, p*128+128), so its id is the block's first slot / 128. Reads only those first slots."""
    starts = torch.arange(n_pages, device=slot_table.device) * BLOCK_SIZE
    return slot_table[rows.long()[:, None], starts[None, :]] // BLOCK_SIZE
