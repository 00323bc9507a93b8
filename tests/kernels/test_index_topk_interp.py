"""Index scoring + block top-k Triton kernels on the CPU, through the Triton interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before the kernels are defined, and other tests
in the same process may already have imported them, so every case runs in a fresh subprocess: pytest
calls this file as a script with the case name. Inputs are fp16 (the interpreter's bf16 arithmetic is
not trustworthy), small shapes, fresh random values each run, and the output is poisoned before the run.
Each case checks both the plain path (one chunk per row: the scoring kernel writes the selection) and
the split path (histories cut into chunks, candidates merged by the merge kernel), whose candidate
buffers are poisoned too. The decode-graph cases also count, through the scoring kernel's debug counter,
the index-K blocks it reads, which must equal what the device packing of shared prefixes should read
(`graph_decode_block_loads`): a kernel that silently stops packing fails them.
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
    import torch

    res = _both_paths([3100, 260], [1, 1], heads=4, k_dtype=torch.float8_e4m3fn)
    res += _both_paths([2300], [45], heads=2, k_dtype=torch.float8_e4m3fn)
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


def _graph_step(seqs, heads, page_table, num_pages, target_items, width=None):
    """One step of a decode graph plan on `page_table` [batch, used] (fresh q and keys, poisoned outputs):
    the selection must match the reference, and the index-K blocks the scoring kernel reads (its debug
    counter) must be exactly what `graph_decode_block_loads` says the device packing reads."""
    import torch

    from msa_kernels import graph_decode_plan, update_graph_decode_plan
    from msa_kernels import plan as make_plan
    from msa_kernels.triton._topk_testcases import check_selection
    from msa_kernels.triton._topk_worklist import graph_decode_block_loads
    from msa_kernels.triton.index_topk import index_topk, prepare_graph_decode_topk

    batch = len(seqs)
    kc = torch.randn(num_pages * 128, 1, 128).to(torch.float16)
    gp = graph_decode_plan(batch, width or page_table.shape[1], "cpu")
    work = prepare_graph_decode_topk(gp, heads, num_pages, target_items=target_items)
    update_graph_decode_plan(gp, page_table, torch.tensor(seqs))
    q = torch.randn(batch, heads, 128).to(torch.float16)
    work.candidates.fill_(2**62 + 12345)  # a huge real-looking key: every slot the merge reads must be written
    work.load_counter = torch.zeros(1, dtype=torch.int32)
    out = torch.full((batch, heads, 16), POISON, dtype=torch.int32)
    index_topk(gp, q, kc, out=out)
    assert not bool((out == POISON).any()), "some output entries were never written"
    res = check_selection(make_plan(page_table, seqs, num_pages=num_pages), q, kc, out)
    want = graph_decode_block_loads(work, gp.page_table, torch.tensor(seqs))
    got = int(work.load_counter.item())
    assert got == want["blocks"], f"kernel read {got} index-K blocks, the packing model {want}"
    res.update(want, read=got, block_m=work.block_m, pack=work.pack_shared, chunks=work.n_chunks)
    return res


def _prefix_table(groups, batch, width, num_pages):
    """Page table [batch, width] of private random pages, and the pool's unused pages; `groups` =
    [(requests, shared blocks)]: those requests map their first blocks to the same pages (a radix-cache
    prefix), then to their own."""
    import torch

    perm = torch.randperm(num_pages).to(torch.int32)
    pt = perm[: batch * width].view(batch, width).clone()
    for reqs, shared in groups:
        pt[reqs, :shared] = pt[reqs[0], :shared].clone()
    return pt, perm[batch * width :]


def case_graph_shared_prefix():
    # 8 requests, 4 heads (32-row tiles: up to 8 requests an item), small chunks (CB 4 at this length):
    # 7 requests share a 15-block prefix (chunks 0-2 shared, chunk 3 diverges after 3 of its 4 blocks),
    # with different lengths: one ends inside the prefix (its chunk there is a private tail), one is a
    # padded entry (seq_len 1) whose page row starts with the prefix (it has no full chunk: never packed).
    # Then the same batch as two interleaved groups (even / odd requests) on two different prefixes, the
    # first request ending inside its prefix (its pages equal the leader's on that chunk, but it is not full:
    # were it counted as a member, the chunk's group would rank its full requests from 1 and none would lead).
    width, batch = 24, 8
    num_pages = batch * width + 4
    seqs = [2900, 2500, 1, 700, 3050, 2000, 2600, 1300]
    pt, _ = _prefix_table([([0, 1, 2, 3, 4, 5, 6], 15)], batch, width, num_pages)
    a = _graph_step(seqs, 4, pt, num_pages, target_items=64)
    assert a["pack"] and a["chunk_blocks"] == 4 and a["packed_items"] == 3, a
    assert a["read"] < 0.7 * a["unpacked"], a
    pt, _ = _prefix_table([([0, 2, 4, 6], 18), ([1, 3, 5, 7], 12)], batch, width, num_pages)
    b = _graph_step([1500, 2500, 2800, 2900, 2700, 1700, 1, 2300], 4, pt, num_pages, target_items=64)
    assert b["packed_items"] == 7 and b["read"] < 0.7 * b["unpacked"], b  # 4 chunks of 3 + 3 chunks of 4
    return [a, b]


def case_graph_shared_heads_1_2_3():
    # The same prefix batch with 1, 2 and 3 index heads (tensor-parallel splits; 3 does not divide the
    # tile: its last rows hold no member)
    width, batch = 20, 6
    num_pages = batch * width + 4
    seqs = [2500, 1, 2200, 1900, 2450, 1000]
    res = []
    for heads in (1, 2, 3):
        pt, _ = _prefix_table([([0, 1, 2, 3, 4, 5], 12)], batch, width, num_pages)
        r = _graph_step(seqs, heads, pt, num_pages, target_items=48)
        assert r["pack"] and r["packed_items"] == 3 and r["read"] < 0.7 * r["unpacked"], r
        res.append(r)
    return res


def case_graph_shared_more_than_one_item():
    # More requests on one prefix than an item holds: 20 requests x 4 heads (64-row tiles: 16 an item) ->
    # two leaders per shared chunk (16 + 3, a padded entry aside); 70 requests x 1 head (64 an item) -> 64 + 5.
    res = []
    for batch, heads, shared, target in ((20, 4, 6, 64), (70, 1, 4, 140)):
        width = shared + 3
        num_pages = batch * width + 4
        seqs = [128 * (shared + 1) + 29 * (i % 9) for i in range(batch)]
        seqs[3] = 1  # a padded entry
        pt, _ = _prefix_table([(list(range(batch)), shared)], batch, width, num_pages)
        r = _graph_step(seqs, heads, pt, num_pages, target_items=target)
        per_item = r["block_m"] // heads
        assert r["pack"] and per_item < batch - 1, r
        full_shared_chunks = shared // r["chunk_blocks"]
        assert r["packed_items"] == 2 * full_shared_chunks and full_shared_chunks >= 1, r
        res.append(r)
    return res


def case_graph_shared_diverges_in_chunk():
    # Requests 0-3 share every page but one per chunk: request 1 has its own last block of each chunk,
    # request 2 its own middle block, request 3 the shared first blocks in another order. Equal on part of
    # a chunk is not equal: nothing of theirs may pack. Requests 4 and 5 are identical and pack on their
    # three full chunks (CB 4 here).
    width, batch = 16, 6
    num_pages = batch * width + 8
    pt, spare = _prefix_table([([0, 1, 2, 3], 16), ([4, 5], 16)], batch, width, num_pages)
    pt[1, 3::4] = spare[:4]
    pt[2, 1::4] = spare[4:8]
    pt[3, 0::4] = pt[0, 0::4].flip(0)
    seqs = [2000, 2000, 1990, 2010, 1800, 1900]
    r = _graph_step(seqs, 4, pt, num_pages, target_items=32)
    assert r["chunk_blocks"] == 4 and r["pack"], r
    assert r["packed_items"] == 3 and r["read"] == r["unpacked"] - 3 * 4, r  # only requests 4 and 5 pack
    return r


def case_graph_batch_one():
    # One request: packing is compiled out (the 16-row private tile), every block read once.
    import torch

    width = 20
    pt = torch.randperm(width + 3)[:width].view(1, width).to(torch.int32)
    r = _graph_step([2500], 4, pt, width + 3, target_items=16)
    assert not r["pack"] and r["block_m"] == 16 and r["read"] == r["unpacked"], r
    return r


def case_graph_decode_device_items():
    # A decode graph plan: static buffers updated by device copies, items computed in the kernel from the
    # lengths. Lengths of 1 token, exactly one block, exactly 16 blocks, 16 blocks + 1 token, off-grid, the
    # longest the plan holds, and one request of few blocks beside long ones; chunks forced small. No page
    # is shared: packing is on but finds no partner, every request reads its own history once.
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
        r = _graph_step(seqs, heads, pt, num_pages, target_items=24, width=width)
        assert r["pack"] and r["chunks"] > 1, r
        assert r["read"] == r["unpacked"] and r["packed_items"] == 0, r
        results.append(r)
    return results


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
    seen = {}
    for name, call in problems.items():
        try:
            call()
        except MSAInputError as e:
            seen[name] = str(e)
        else:
            raise AssertionError(f"{name}: no MSAInputError")
    assert "outside the index-K pool" in seen["page outside pool"], seen["page outside pool"]
    return seen


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_index_topk_interpreter(name):
    run_interpreted(__file__, name)


if __name__ == "__main__":
    interpreted_main(CASES)
