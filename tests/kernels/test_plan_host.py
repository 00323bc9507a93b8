"""The plan from host lengths: the same plan as from tensors, and page checks only where asked for (CPU)."""

from __future__ import annotations

import random

import pytest
import torch

import msa_kernels
from msa_kernels import MSAInputError


def _batch(rng: random.Random):
    seqs = [rng.randint(1, 700) for _ in range(rng.randint(1, 4))]
    q_lens = [rng.randint(1, s) for s in seqs]
    width = max(-(-s // 128) for s in seqs)
    table = torch.tensor([rng.sample(range(64), width) for _ in seqs], dtype=torch.int32)
    return table, seqs, q_lens


def test_host_lists_and_tensors_give_the_same_plan():
    table, seqs, q_lens = _batch(random.Random())
    a = msa_kernels.plan(table, seqs, q_lens, num_pages=64)
    b = msa_kernels.plan(table, torch.tensor(seqs), torch.tensor(q_lens), num_pages=64)
    for name in ("page_table", "seq_lens", "q_lens", "qo_indptr", "q_pos", "q_req"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.qo_indptr_list == a.qo_indptr.tolist() == [0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()]
    assert a.token_ranges() == list(zip(a.qo_indptr_list, a.qo_indptr_list[1:]))
    assert a.pages_checked_for == 64 and not a.pages_trusted
    assert not a.pages_need_check(64) and a.pages_need_check(32)


def test_page_ids_checked_unless_the_caller_vouches_for_them():
    table, seqs, q_lens = _batch(random.Random())
    table[0, 0] = 1000  # outside a pool of 64 pages
    with pytest.raises(MSAInputError, match="outside the pool's 64 pages"):
        msa_kernels.plan(table, seqs, q_lens, num_pages=64)
    trusted = msa_kernels.plan(table, seqs, q_lens, num_pages=64, check_pages=False)
    assert trusted.pages_trusted and not trusted.pages_need_check(64) and trusted.pages_checked_for is None
    unchecked = msa_kernels.plan(table, seqs, q_lens)  # no pool given: kernels check against theirs
    assert unchecked.pages_need_check(64)


@pytest.mark.parametrize("bad, match", [
    (dict(q_lens=[5]), "must match"),
    (dict(seq_lens=[-1, 3], q_lens=[0, 1]), "seq_lens must be >= 0"),
    (dict(seq_lens=[300, 3], q_lens=[301, 1]), "cannot exceed"),
    (dict(seq_lens=[100_000, 3], q_lens=[1, 1]), "needs 782"),
])
def test_lengths_are_checked_without_the_page_ids(bad, match):
    table = torch.zeros(2, 4, dtype=torch.int32)
    args = dict(seq_lens=[300, 3], q_lens=[1, 1]) | bad
    with pytest.raises(MSAInputError, match=match):
        msa_kernels.plan(table, args["seq_lens"], args["q_lens"], check_pages=False)


def test_extend_work_list_checks_pages_of_an_unchecked_plan_only():
    from msa_kernels.triton._topk_worklist import build_topk_work

    table = torch.tensor([[0, 900, 2, 3]], dtype=torch.int32)  # page 900 (a scored block) is outside 16 pages
    seqs, q_lens = [500], [100]
    with pytest.raises(MSAInputError, match="outside the index-K pool's 16 pages"):
        build_topk_work(msa_kernels.plan(table, seqs, q_lens), 4, 16, torch.device("cpu"), 4)
    trusted = msa_kernels.plan(table, seqs, q_lens, check_pages=False)
    assert build_topk_work(trusted, 4, 16, torch.device("cpu"), 4).n_items_host > 0
