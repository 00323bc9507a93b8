"""Index scoring + block top-k Triton kernels on the CPU, through the Triton interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before the kernels are defined, and other tests
in the same process may already have imported them, so every case runs in a fresh subprocess: pytest
calls this file as a script with the case name. Inputs are fp16 (the interpreter's bf16 arithmetic is
not trustworthy), small shapes, fresh random values each run, and the output is poisoned before the run.
Each case checks both the plain path (one chunk per row: the scoring kernel writes the selection) and
the split path (histories cut into chunks, candidates merged by the merge kernel), whose candidate
buffers are poisoned too.
"""

from __future__ import annotations

import pytest
from interpreter_child import interpreted_main, run_interpreted

POISON = -7  # no valid selection entry is ever -7


def _run_selection(p, q_idx, kc, target_items):
    import torch

    from msa_kernels.triton._topk_testcases import check_selection
    from msa_kernels.triton.index_topk import index_topk, prepare_index_topk

    work = prepare_index_topk(p, q_idx.shape[1], kc.shape[0] // 128, target_items=target_items)
    if work.candidates is not None:
        work.candidates.fill_(2**62 + 12345)  # a huge real-looking key: must never be read
    out = torch.full((q_idx.shape[0], q_idx.shape[1], p.topk), POISON, dtype=torch.int32)
    index_topk(p, q_idx, kc, out=out)
    assert not bool((out == POISON).any()), "some output entries were never written"
    res = check_selection(p, q_idx, kc, out)
    res.update(final=work.final, items=work.n_items_host, block_m=work.block_m, chunks=work.n_chunks)
    return res


def _both_paths(seq_lens, q_lens, heads, **kw):
    """Run the batch once unsplit (huge target: few items) and once split into chunks (target 64)."""
    import copy

    from msa_kernels.triton._topk_testcases import make_batch

    p, q_idx, kc = make_batch(seq_lens, q_lens, heads, **kw)
    p2 = copy.copy(p)
    p2.extras = {}
    return [_run_selection(p, q_idx, kc, target_items=1), _run_selection(p2, q_idx, kc, target_items=64)]


def _graph_decode_selection(seqs, page_table, heads, width, num_pages, target_items):
    """Decode through a graph plan (static buffers updated by device copies, items computed in the kernel from
    the lengths), fp16 keys and queries drawn fresh, poisoned candidates and output; returns (work, check)."""
    import torch

    from msa_kernels import graph_decode_plan, update_graph_decode_plan
    from msa_kernels import plan as make_plan
    from msa_kernels.triton._topk_testcases import check_selection
    from msa_kernels.triton.index_topk import index_topk, prepare_graph_decode_topk

    batch = len(seqs)
    kc = torch.randn(num_pages * 128, 1, 128).to(torch.float16)
    gp = graph_decode_plan(batch, width, "cpu")
    work = prepare_graph_decode_topk(gp, heads, num_pages, target_items=target_items)
    update_graph_decode_plan(gp, page_table, torch.tensor(seqs))
    q = torch.randn(batch, heads, 128).to(torch.float16)
    work.candidates.fill_(2**62 + 12345)
    out = torch.full((batch, heads, 16), POISON, dtype=torch.int32)
    index_topk(gp, q, kc, out=out)
    assert not bool((out == POISON).any())
    return work, check_selection(make_plan(page_table, seqs, num_pages=num_pages), q, kc, out)


# ---- cases (run inside the interpreter subprocess) ---------------------------------------------------


def case_decode_mixed_lengths():
    # short and long requests in one batch: 1 token, exactly one block, exactly 16 blocks, 16 blocks + 1
    # token, lengths off the block grid, and longer histories that need the top-k
    seqs = [1, 128, 2048, 2049, 130, 3000, 5000]
    res = _both_paths(seqs, [1] * len(seqs), heads=4)
    assert not res[0]["final"] or res[0]["items"] >= 1
    assert not res[1]["final"], "target 64 should split the histories into chunks"
    return res


def case_decode_one_and_two_heads():
    res = _both_paths([2600, 900, 4100], [1, 1, 1], heads=1) + _both_paths([4100, 257], [1, 1], heads=2)
    return res + _both_paths([1500, 900], [1, 1], heads=4, topk=8)  # another top-k: 7 best + the local block


def case_decode_shared_prefix():
    # 6 sessions on one 3,000-token prefix (23 shared blocks), each with its own tail; the packed work
    # list must read each shared page once for the batch (one item per chunk, not one per request)
    from msa_kernels.triton._topk_testcases import make_batch
    from msa_kernels.triton.index_topk import prepare_index_topk

    seqs = [3000 + 37 * i for i in range(6)]
    res = _both_paths(seqs, [1] * 6, heads=4, shared_blocks=23)
    p, _, kc = make_batch(seqs, [1] * 6, heads=4, shared_blocks=23)
    work = prepare_index_topk(p, 4, kc.shape[0] // 128, target_items=64)
    private_items = sum(-(-((s - 1) // 128) // work.chunk_blocks) for s in seqs)
    assert work.n_items_host < private_items / 3, (work.n_items_host, private_items)
    assert work.block_m >= 32, "an item should hold the rows (4 heads) of several requests"
    return res


def case_extend_mixed():
    # a prefix of 730 + 40 new tokens; 2,100 cached + 40 new; an empty prefix (plain prefill of 200);
    # a request with no new token; and a decode-like request of one token, all in one extend batch
    return _both_paths([770, 2140, 200, 900, 1500], [40, 40, 150, 0, 1], heads=4)


def case_extend_one_head_exact_16_blocks():
    # H_idx = 1 (tensor parallel 4): 128 tokens per tile; a sequence of exactly 16 blocks
    return _both_paths([2048, 2200], [150, 64], heads=1)


def case_fp8_index_k():
    import os

    import torch

    res = _both_paths([3100, 260], [1, 1], heads=4, k_dtype=torch.float8_e4m3fn)
    # extend batches score 16-bit copies of their pages (triton.widen) unless MSA_FP8_WIDEN=0
    for widen in ("1", "0"):
        os.environ["MSA_FP8_WIDEN"] = widen
        res += _both_paths([2300], [45], heads=2, k_dtype=torch.float8_e4m3fn)
        res += _both_paths([2600, 200], [1, 30], heads=4, k_dtype=torch.float8_e4m3fn)
    # bf16 queries on fp8 keys, unwidened: the products run in fp16 (fp8_in_f16), exact for both operands. (Widened,
    # bf16 queries score bf16 copies: the interpreter's bf16 dot is not trustworthy, so that path is checked on the
    # GPU, test_index_topk_gpu.)
    res += _both_paths([2600, 200], [1, 30], heads=4, q_dtype=torch.bfloat16, k_dtype=torch.float8_e4m3fn)
    os.environ.pop("MSA_FP8_WIDEN")
    return res


def case_mixed_dtypes():
    # q and keys of different 16/32-bit dtypes: both go to fp32, no key is rounded to q's dtype first
    import torch

    res = _both_paths([2300, 700], [1, 1], heads=4, q_dtype=torch.float32, k_dtype=torch.float16)
    res += _both_paths([2200], [40], heads=2, q_dtype=torch.float16, k_dtype=torch.float32)
    return res


def case_graph_refresh():
    # A decode work list sized at capture time (for_graph) is refilled in place for later batches of the
    # same size: other lengths, a shared prefix, a short request; a batch that does not fit is refused.
    import torch

    from msa_kernels import MSAInputError
    from msa_kernels import plan as make_plan
    from msa_kernels.triton._topk_testcases import check_selection
    from msa_kernels.triton.index_topk import index_topk, prepare_index_topk, refresh_index_topk

    batch, width, heads = 4, 32, 4
    num_pages = batch * width + 8
    kc = torch.randn(num_pages * 128, 1, 128).to(torch.float16)

    def table(shared_blocks=0):
        pt = torch.randperm(num_pages)[: batch * width].view(batch, width).to(torch.int32)
        pt[:, :shared_blocks] = pt[0, :shared_blocks]
        return pt

    captured = make_plan(table(), [3600] * batch)
    work = prepare_index_topk(captured, heads, num_pages, target_items=12, for_graph=True)
    assert not work.final and work.block_m == 16
    results = []
    for seqs, shared in [([3500, 1, 2049, 3100], 0), ([3400, 3450, 3599, 130], 20)]:
        new = make_plan(table(shared), seqs)
        refresh_index_topk(captured, new, heads, num_pages)
        q = torch.randn(batch, heads, 128).to(torch.float16)
        work.candidates.fill_(2**62 + 12345)
        out = torch.full((batch, heads, 16), POISON, dtype=torch.int32)
        index_topk(captured, q, kc, out=out)  # the captured plan's buffers, the new batch's data
        assert not bool((out == POISON).any())
        results.append(check_selection(new, q, kc, out))
    assert results[1]["rows"] and work.n_items_host < 12, "shared pages should pack into fewer items"
    try:
        refresh_index_topk(captured, make_plan(table(), [4000, 5, 5, 5]), heads, num_pages)
    except MSAInputError as e:
        results.append(str(e))
    else:
        raise AssertionError("a longer history than captured must not fit")
    return results


def case_graph_decode_device_items():
    # A decode graph plan: static buffers updated by device copies, items computed in the kernel from the
    # lengths. Lengths of 1 token, exactly one block, exactly 16 blocks, 16 blocks + 1 token, off-grid, the
    # longest the plan holds, and one request of few blocks beside long ones; chunks forced small.
    import torch

    heads, width = 4, 30
    results = []
    # The last batch is short: the step's chunks shrink below the capture-time size.
    for seqs in ([1, 128, 2048, 2049, 3001, width * 128], [700, 129, 3333, 2, 1900, 130],
                 [300, 129, 1, 700, 2, 1000]):
        batch = len(seqs)
        num_pages = batch * width + 5
        used = max(-(-s // 128) for s in seqs)
        pt = torch.randperm(num_pages)[: batch * used].view(batch, used).to(torch.int32)
        work, res = _graph_decode_selection(seqs, pt, heads, width, num_pages, target_items=24)
        assert work.grid_items and work.n_chunks > 1, (work.n_chunks, work.chunk_blocks)
        results.append(res)
    return results


def case_graph_decode_shared_prefix():
    # Graph-plan decode on shared prefixes: members of a group split each shared chunk's blocks and write
    # per-block keys. Requests 0-5 share 40 blocks (more members than one sub-group of 16 // 4 = 4), request 6
    # shares only the first 21 of them, requests 7-8 share another 30-block prefix, request 9 is private and
    # short. Run with several chunk sizes (the step's chunk comes from the longest history).
    import torch

    # 1 and 2 index heads (the per-GPU splits of tensor parallelism) make sub-groups of 16 and 8 requests.
    # Target 10 gives one 64-block chunk per request: longer than a candidate row (16), so no sharing is tried
    # and every request scores its own pages.
    width = 48
    seqs = [5200, 5300, 5400, 5500, 5600, 6000, 5700, 4000, 4100, 700]
    num_pages = len(seqs) * width + 64
    results = []
    for heads, target in ((4, 40), (4, 80), (4, 160), (2, 80), (1, 80), (4, 10)):
        pt = torch.randperm(num_pages)[: len(seqs) * width].view(len(seqs), width).to(torch.int32)
        pt[1:6, :40] = pt[0, :40]
        pt[6, :21] = pt[0, :21]
        pt[8, :30] = pt[7, :30]
        results.append(_graph_decode_selection(seqs, pt, heads, width, num_pages, target_items=target)[1])
    return results


def case_merge_in_many_slices():
    # The merge keeps a running best over fixed slices of candidates; a 16-key slice makes every row's
    # candidates span several slices (later slices with few or no keys beating the running worst), in
    # decode, extend and the graph plan's device items.
    import torch

    from msa_kernels.triton import _topk_kernels as tk

    tk.MERGE_SLICE = 16
    res = _both_paths([7000, 5100, 2049], [1, 1, 1], heads=4)
    res += _both_paths([6000, 3000], [30, 20], heads=2)
    assert not res[1]["final"] and not res[3]["final"]
    seqs, heads, width = [7000, 130, 4500], 4, 60
    num_pages = len(seqs) * width
    pt = torch.randperm(num_pages)[: len(seqs) * width].view(len(seqs), width).to(torch.int32)
    return res + [_graph_decode_selection(seqs, pt, heads, width, num_pages, target_items=24)[1]]


def case_bad_inputs():
    import torch

    from msa_kernels import MSAInputError
    from msa_kernels.triton._topk_testcases import make_batch
    from msa_kernels.triton.index_topk import index_topk

    p, q_idx, kc = make_batch([600, 300], [1, 1], heads=4)
    problems = {
        "tokens": lambda: index_topk(p, q_idx[:1], kc),
        "head dim": lambda: index_topk(p, q_idx[..., :64].contiguous(), kc),
        "index heads": lambda: index_topk(p, q_idx, kc.expand(-1, 2, -1)),
        "dtype": lambda: index_topk(p, q_idx.to(torch.int32), kc),
        "out": lambda: index_topk(p, q_idx, kc, out=torch.empty(2, 4, 8, dtype=torch.int32)),
    }
    # a page table entry outside the pool (the plan accepts it when not told the pool size)
    from msa_kernels import plan as make_plan

    pt = p.page_table.clone()
    pt[0, 2] = kc.shape[0] // 128 + 5
    bad_plan = make_plan(pt, p.seq_lens_list, p.q_lens_list)
    problems["page outside pool"] = lambda: index_topk(bad_plan, q_idx, kc)
    # extend: block 3 lies only in the history of the later tokens (tokens 300-599, local blocks 2-4), so
    # only the request's later items read it; the per-request check must still see it
    pe, qe, kce = make_batch([600], [300], heads=4)
    pt_e = pe.page_table.clone()
    pt_e[0, 3] = kce.shape[0] // 128 + 7
    problems["extend page outside pool"] = lambda: index_topk(make_plan(pt_e, [600], [300]), qe, kce)
    seen = {}
    for name, call in problems.items():
        try:
            call()
        except MSAInputError as e:
            seen[name] = str(e)
        else:
            raise AssertionError(f"{name}: no MSAInputError")
    assert "outside the index-K pool" in seen["page outside pool"], seen["page outside pool"]
    assert f"request 0 maps block 3 to page {kce.shape[0] // 128 + 7}" in seen["extend page outside pool"], seen[
        "extend page outside pool"]
    return seen


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_index_topk_interpreter(name):
    run_interpreted(__file__, name)


if __name__ == "__main__":
    interpreted_main(CASES)
