"""The MSA reference obeys M3's selection rules and its paged form equals its contiguous form.

Inputs are drawn fresh each run (no fixed seed): the oracle must hold on any valid input.
"""

from __future__ import annotations

import pytest
import torch

from msa_kernels import BLOCK_SIZE, MSAInputError, plan
from msa_kernels.reference import (
    gather_sequence,
    index_block_scores,
    index_topk,
    select_blocks,
    sparse_attention,
    sparse_attention_paged,
    store,
)


def _naive_selection(scores: torch.Tensor, pos: int, topk: int = 16) -> set[int]:
    """One row, written the slow obvious way: sort (score desc, id asc) over earlier blocks."""
    qb = pos // BLOCK_SIZE
    if qb + 1 <= topk:
        return set(range(qb + 1))
    hist = sorted(range(qb), key=lambda j: (-float(scores[j]), j))[: topk - 1]
    return set(hist) | {qb}


@pytest.mark.parametrize("seq_len", [1, 127, 128, 1000, 2048, 2049, 3000, 16 * 128, 16 * 128 + 1])
def test_selection_rules_match_the_slow_definition(seq_len):
    heads, dim = 3, 16
    q = torch.randn(seq_len, heads, dim)
    k = torch.randn(seq_len, dim)
    pos = torch.arange(seq_len)
    scores = index_block_scores(q, k, pos)
    sel = select_blocks(scores, pos)
    assert sel.dtype == torch.int32 and sel.shape == (seq_len, heads, 16)
    rows = torch.randint(0, seq_len, (min(seq_len, 64),)).tolist() + [seq_len - 1]
    for t in rows:
        for h in range(heads):
            got = sel[t, h]
            valid = got[got >= 0].tolist()
            assert valid == sorted(valid), "ids ascend"
            assert (got[len(valid):] == -1).all(), "-1 padding at the tail"
            assert set(valid) == _naive_selection(scores[t, h], t), (t, h)
            assert t // BLOCK_SIZE in valid, "local block always kept"


def test_block_max_is_causal_inside_the_local_block():
    q = torch.randn(300, 1, 8)
    k = torch.randn(300, 8)
    pos = torch.tensor([130])
    s = index_block_scores(q[130:131], k, pos)
    full = q[130, 0] @ k.T
    assert torch.allclose(s[0, 0, 0], full[:128].max())
    assert torch.allclose(s[0, 0, 1], full[128:131].max()), "tokens after the query do not count"
    assert s[0, 0, 2] == float("-inf")


def test_ties_prefer_lower_block_ids():
    nblk = 40
    scores = torch.zeros(1, 1, nblk)  # every historical block ties
    sel = select_blocks(scores, torch.tensor([nblk * BLOCK_SIZE - 1]))
    assert sel[0, 0].tolist() == list(range(15)) + [nblk - 1]
    scores[0, 0, 30] = 1.0  # a higher score beats any tie
    sel = select_blocks(scores, torch.tensor([nblk * BLOCK_SIZE - 1]))
    assert sel[0, 0].tolist() == list(range(14)) + [30, nblk - 1]


def _naive_attention(q, k, v, sel, pos, scale):
    t_count, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty(t_count, hq, d, dtype=torch.float64)
    for t in range(t_count):
        for n in range(hq):
            g = n // (hq // hkv)
            blocks = {int(b) for b in sel[t, g] if b >= 0}
            keys = [s for s in range(int(pos[t]) + 1) if s // BLOCK_SIZE in blocks]
            logits = torch.stack([q[t, n].double() @ k[s, g].double() for s in keys]) * scale
            p = torch.softmax(logits, 0)
            out[t, n] = sum(p[i] * v[keys[i], g].double() for i in range(len(keys)))
    return out


def test_sparse_attention_matches_a_per_key_loop():
    seq_len, hq, hkv, d = 2200, 4, 2, 8
    q, k, v = torch.randn(seq_len, hq, d), torch.randn(seq_len, hkv, d), torch.randn(seq_len, hkv, d)
    pos = torch.arange(seq_len)
    sel = select_blocks(index_block_scores(torch.randn(seq_len, hkv, d), torch.randn(seq_len, d), pos), pos)
    rows = torch.tensor([0, 5, 127, 128, 2047, 2048, 2199])
    got = sparse_attention(q[rows], k, v, sel[rows], pos[rows], scale=0.3)
    want = _naive_attention(q[rows], k, v, sel[rows], pos[rows], 0.3)
    assert (got.double() - want).abs().max() < 1e-5


def test_sparse_attention_rejects_selection_without_local_block():
    q, k = torch.randn(1, 2, 8), torch.randn(300, 1, 8)
    sel = torch.full((1, 1, 16), -1, dtype=torch.int32)
    sel[0, 0, 0] = 0
    with pytest.raises(MSAInputError, match="local block"):
        sparse_attention(q, k, k, sel, torch.tensor([200]))


def _scattered_pool(lengths, hkv, d, extra_pages=7, dtype=torch.float32):
    need = [-(-n // BLOCK_SIZE) for n in lengths]
    pages = sum(need) + extra_pages
    perm = torch.randperm(pages)
    table = torch.full((len(lengths), max(need) + 2), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n]
        used += n
    k_cache = torch.randn(pages * BLOCK_SIZE, hkv, d).to(dtype)
    v_cache = torch.randn(pages * BLOCK_SIZE, hkv, d).to(dtype)
    i_cache = torch.randn(pages * BLOCK_SIZE, 1, d).to(dtype)
    return table, k_cache, v_cache, i_cache, pages


def test_paged_reference_equals_contiguous_on_scattered_pages():
    lengths, q_lens = [3000, 130, 2048], [700, 130, 1]  # extend on a prefix, prefill, decode
    hq, hkv, d = 4, 2, 16
    table, kc, vc, ic, pages = _scattered_pool(lengths, hkv, d)
    p = plan(table, lengths, q_lens, num_pages=pages)
    q_idx = torch.randn(p.num_tokens, hkv, d)
    q = torch.randn(p.num_tokens, hq, d)
    sel = index_topk(p, q_idx, ic)
    out = sparse_attention_paged(p, q, kc, vc, sel)
    for b, (lo, hi) in enumerate(p.token_ranges()):
        n = lengths[b]
        keys = gather_sequence(ic, table[b], n)[:, 0]
        k = gather_sequence(kc, table[b], n)
        v = gather_sequence(vc, table[b], n)
        pos = torch.arange(n - q_lens[b], n)
        want_sel = select_blocks(index_block_scores(q_idx[lo:hi], keys, pos), pos)
        assert torch.equal(sel[lo:hi], want_sel)
        assert torch.allclose(out[lo:hi], sparse_attention(q[lo:hi], k, v, want_sel, pos), atol=1e-6)


def test_plan_rejects_page_tables_that_do_not_cover_the_sequence():
    table = torch.tensor([[0, 1, -1]], dtype=torch.int32)
    with pytest.raises(MSAInputError, match="entry 2 is -1"):
        plan(table, [300], [1], num_pages=4)
    with pytest.raises(MSAInputError, match="needs 4"):
        plan(table, [500], [1], num_pages=8)
    with pytest.raises(MSAInputError, match="outside the pool's 1 pages"):
        plan(table, [200], [1], num_pages=1)
    with pytest.raises(MSAInputError, match="cannot exceed"):
        plan(table, [10], [11])


def test_store_round_trips_bf16_and_fp8():
    t_count, hkv, d = 50, 2, 16
    slots = torch.randperm(4 * BLOCK_SIZE)[:t_count]
    k, v, ik = torch.randn(t_count, hkv, d), torch.randn(t_count, hkv, d), torch.randn(t_count, d)
    for dtype, scale, tol in ((torch.bfloat16, None, 1e-2), (torch.float8_e4m3fn, 0.05, 0.08)):
        kc = torch.full((4 * BLOCK_SIZE, hkv, d), float("nan")).to(dtype)
        vc, ic = kc.clone(), torch.full((4 * BLOCK_SIZE, 1, d), float("nan")).to(dtype)
        store(slots, k, v, ik, kc, vc, ic, k_scale=scale, v_scale=scale)
        back = kc[slots].float() * (scale or 1.0)
        assert ((back - k).abs() <= tol * k.abs().clamp(min=1)).all()
        assert not ic[slots].float().isnan().any()
    with pytest.raises(MSAInputError, match="slot ids"):
        store(torch.tensor([10_000]), k[:1], v[:1], ik[:1], kc, vc, ic)
