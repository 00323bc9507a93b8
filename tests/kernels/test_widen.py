"""triton.widen: the compact page numbering of an extend batch and the 16-bit copies of its fp8 pages (plain
PyTorch, no kernel). The kernels that run on them are checked in test_extend_attention and test_index_topk_interp."""

from __future__ import annotations

import pytest
import torch


def _plan(table: torch.Tensor, seqs: list[int], q_lens: list[int]):
    import msa_kernels

    return msa_kernels.plan(table, seqs, q_lens, num_pages=int(table.max()) + 1)


def test_compact_plan_renumbers_only_used_pages_and_keeps_sharing() -> None:
    from msa_kernels.triton import widen

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    pool = torch.randperm(400, generator=gen).to(torch.int32)
    table = torch.full((3, 12), -1, dtype=torch.int32)
    table[0, :10] = pool[:10]
    table[1, :10] = pool[:10]  # shares request 0's pages (a shared prefix)
    table[1, 6:9] = pool[10:13]
    table[2, :3] = pool[20:23]
    table[2, 3:12] = pool[100:109]  # beyond request 2's length: not touched
    seqs = [10 * 128 - 5, 9 * 128, 2 * 128 + 1]
    plan = _plan(table, seqs, [5, 3, 2])
    compact, pages = widen.compact_plan(plan)
    assert widen.compact_plan(plan)[0] is compact  # built once per plan
    used = [table[b, : -(-s // 128)] for b, s in enumerate(seqs)]
    want = torch.unique(torch.cat(used).long())
    assert torch.equal(pages, want)
    for b, s in enumerate(seqs):
        n = -(-s // 128)
        assert torch.equal(pages[compact.page_table[b, :n].long()], table[b, :n].long())
    assert torch.equal(compact.page_table[0, :6], compact.page_table[1, :6])  # shared pages stay one page
    assert compact.seq_lens_list == plan.seq_lens_list and compact.extras is not plan.extras


def test_widened_pages_are_exact_and_in_page_order() -> None:
    from msa_kernels.triton import widen

    cache = (torch.randn(6 * 128, 2, 64) * 40).to(torch.float8_e4m3fn)
    pages = torch.tensor([4, 1, 5])
    wide = widen.widen_pages(cache, pages, torch.bfloat16)
    assert wide.shape == (3 * 128, 2, 64) and wide.dtype == torch.bfloat16
    for i, p in enumerate(pages.tolist()):
        assert torch.equal(wide[i * 128:(i + 1) * 128].float(), cache[p * 128:(p + 1) * 128].float())


@pytest.mark.parametrize("decode", [True, False])
def test_widening_is_for_extend_on_fp8_only(decode: bool, monkeypatch) -> None:
    from msa_kernels.triton import widen

    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    plan = _plan(table, [500], [1 if decode else 20])
    f8 = torch.zeros(512, 1, 64, dtype=torch.float8_e4m3fn)
    assert widen.wanted(plan, f8) is (not decode)
    assert not widen.wanted(plan, f8.to(torch.bfloat16))
    monkeypatch.setenv("MSA_FP8_WIDEN", "0")
    assert not widen.wanted(plan, f8)
    monkeypatch.setenv("MSA_FP8_WIDEN_MAX_MB", "0")
    assert not widen.fits(torch.arange(4), f8, 2)
    monkeypatch.delenv("MSA_FP8_WIDEN_MAX_MB")
    assert widen.fits(torch.arange(4), f8, 2)


def test_both_gathers_give_the_same_pages() -> None:
    """Whole pages as int64 rows (contiguous caches) and slot by slot (others) must agree."""
    from msa_kernels.triton import widen

    cache = (torch.randn(6 * 128, 4, 64) * 40).to(torch.float8_e4m3fn)
    pages = torch.tensor([5, 1, 3])
    strided = torch.empty(6 * 128, 5, 64, dtype=torch.float8_e4m3fn)[:, :4]
    strided.copy_(cache)
    assert not strided.is_contiguous()
    assert torch.equal(widen.widen_pages(strided, pages, torch.float16).float(),
                       widen.widen_pages(cache, pages, torch.float16).float())
