"""The served extend path never synchronizes the stream (run on the lent GPU; never in CI).

A sync in the middle of a forward drains the GPU's queue, and the GPU then waits on the host for every later
launch (benchmarks/results/served_step_split_r13_notes.md measured what that cost). torch's sync debug mode
turns every synchronizing call (a read-back, a pageable host-to-device copy) into an error.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_plan_index_topk_and_attention_do_not_sync():
    import msa_kernels
    from msa_kernels import ops

    rng = random.Random()
    dev = torch.device("cuda")
    seqs = [rng.randint(2_000, 9_000) for _ in range(3)]
    q_lens = [rng.randint(1, 700) for _ in seqs]
    width = max(-(-s // 128) for s in seqs)
    pool = 3 * width + 8
    slots = pool * 128
    k_cache = torch.randn(slots, 4, 128, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    idx_k = torch.randn(slots, 1, 128, device=dev, dtype=torch.bfloat16)
    perm = torch.randperm(pool, device=dev)[: 3 * width].view(3, width)  # scattered pages
    req_to_token = (perm[:, :, None] * 128 + torch.arange(128, device=dev)).view(3, -1).to(torch.int32)
    n = sum(q_lens)
    q = torch.randn(n, 64, 128, device=dev, dtype=torch.bfloat16)
    q_idx = torch.randn(n, 4, 128, device=dev, dtype=torch.bfloat16)

    def layer():
        pages = msa_kernels.pages_from_slots(req_to_token, torch.arange(3, device=dev), width)
        p = msa_kernels.plan(pages, seqs, q_lens, num_pages=pool, check_pages=False)
        sel = ops.index_topk(p, q_idx, idx_k)
        return sel, ops.sparse_attention(p, q, k_cache, v_cache, sel, 128 ** -0.5)

    want_sel, want_out = layer()  # compiles, and the allocator's first blocks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got_sel, got_out = layer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(got_sel, want_sel)
    assert torch.equal(got_out, want_out)
